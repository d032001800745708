"""Catalog consistency (generate.catalog_consistency): conditional images pulled to the given
fluxes and half-light radius; the maps fitted from observations; JSON; the pipeline's hook."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from omnisky.generate.catalog_consistency import (CatalogConsistency, catalog_fluxes, fit_maps, model_errors,
                                                  refine_to_catalog, stretch)
from omnisky.generate.measure import half_light_radius, image_photometry
from omnisky.generate.templates import template_for
from omnisky.shards.schema import Sample, Scalar

BANDS = "griz"


def blob(r_half: float, fluxes, pixel_scale: float = 0.263, n: int = 32) -> np.ndarray:
    """A round Gaussian of half-light radius r_half (arcsec) on pixel n // 2: (4, n, n) nanomaggies."""
    s = r_half / 1.1774 / pixel_scale
    y, x = np.mgrid[:n, :n] - n // 2
    g = np.exp(-(x ** 2 + y ** 2) / (2 * s ** 2))
    return np.stack([f * g / g.sum() for f in fluxes]).astype(np.float32)


def des_image(flux: np.ndarray, noise: float = 0.0, rng=None):
    img = template_for("image.des", flux.shape[-1])                       # zero point 22.5: nanomaggies
    if noise:
        flux = flux + rng.normal(0, noise, flux.shape).astype(np.float32)
        img = dataclasses.replace(img, ivar=np.full_like(img.ivar, 1 / noise ** 2))
    return dataclasses.replace(img, flux=flux.astype(np.float32))


def catalog_sample(fluxes, sigmas, r_half, r_sigma, image=None) -> Sample:
    recs = {f"scalar.flux_{b}": Scalar(f"flux_{b}", float(f), float(s)) for b, f, s in zip(BANDS, fluxes, sigmas)}
    recs["scalar.r_half"] = Scalar("r_half", float(r_half), float(r_sigma))
    if image is not None:
        recs["image.des"] = image
    return Sample("obj", recs)


def identity_consistency(tau: float = 0.3) -> CatalogConsistency:
    """The stamp holds the whole catalog flux, and shows the catalog disk's half-light radius."""
    return CatalogConsistency("image.des", [f"scalar.flux_{b}" for b in BANDS], [[1.0, 0.0, 0.0]] * 4, [0.0] * 4,
                              [[1.0, 0.0]] * 4, [0.0, 1.0], 0.0, tau, tau)


def test_stretch_scales_the_half_light_radius_and_keeps_the_light():
    flux = blob(0.8, [1.0, 2.0, 3.0, 4.0])
    for factor in (0.8, 1.3):
        out = stretch(flux, factor)
        assert out.shape == flux.shape and out.dtype == flux.dtype
        assert abs(out.sum() / flux.sum() - 1) < 0.01
        r0, r1 = half_light_radius(flux.sum(0), 0.263), half_light_radius(out.sum(0), 0.263)
        assert abs(r1 / r0 / factor - 1) < 0.12, (factor, r0, r1)
    assert np.allclose(stretch(flux, 1.0), flux, atol=1e-6)


def test_refine_pulls_a_precise_catalog_all_the_way_and_a_noisy_one_barely():
    truth_fluxes, r_true = np.array([2.0, 4.0, 6.0, 7.0]), 1.0
    sample_img = des_image(blob(0.7, 0.7 * truth_fluxes))                    # 30% faint, too small
    cons = identity_consistency()
    precise = catalog_sample(truth_fluxes, truth_fluxes * 1e-4, r_true, 1e-4)
    R, _ = cons.stamp_radius(precise, sample_img)                           # the disk through the PSF
    assert r_true < R < np.hypot(r_true, float(np.mean(sample_img.psf_fwhm)))
    (out,) = refine_to_catalog(precise, [sample_img], cons)
    phot = image_photometry(out)
    assert np.allclose(phot["flux"], truth_fluxes, rtol=0.01), phot["flux"]
    assert abs(phot["r_half"] - R) < 0.12, (phot["r_half"], R)              # pixel steps of the measurement
    noisy = catalog_sample(truth_fluxes, truth_fluxes * 10, r_true, 10.0)
    (out,) = refine_to_catalog(noisy, [sample_img], cons)
    assert np.allclose(image_photometry(out)["flux"], 0.7 * truth_fluxes, rtol=0.01)
    # equal widths: half way, in flux
    half = catalog_sample(truth_fluxes, 0.3 * 0.7 * truth_fluxes, r_true, 1e4)
    (out,) = refine_to_catalog(half, [sample_img], cons)
    assert np.allclose(image_photometry(out)["flux"], 0.85 * truth_fluxes, rtol=0.01)


def test_refine_leaves_what_the_catalog_lacks():
    sample_img = des_image(blob(0.7, [1.0, 2.0, 3.0, 4.0]))
    no_catalog = catalog_sample([5, 5, 5, 5], [1e-3] * 4, 1.0, 1e-3)
    no_catalog.records = {"scalar.redshift": Scalar("redshift", 0.3)}
    (out,) = refine_to_catalog(no_catalog, [sample_img], identity_consistency())
    assert np.array_equal(out.flux, sample_img.flux)
    only_g = identity_consistency()
    only_g.fluxes = ["scalar.flux_g", None, None, None]
    (out,) = refine_to_catalog(catalog_sample([5, 5, 5, 5], [1e-3] * 4, 0.7, 10.0), [sample_img], only_g)
    phot = image_photometry(out)
    assert abs(phot["flux"][0] - 5) < 0.05 and np.allclose(phot["flux"][1:], [2, 3, 4], rtol=0.02)
    # only what was given: without r_half given the size stays and the fluxes take the share's
    # median over all sizes (here 1)
    given = ["scalar.redshift", *[f"scalar.flux_{b}" for b in BANDS]]
    (out,) = refine_to_catalog(catalog_sample([5, 5, 5, 5], [1e-3] * 4, 1.5, 1e-3), [sample_img],
                               identity_consistency(), given)
    phot, phot0 = image_photometry(out), image_photometry(sample_img)
    assert np.allclose(phot["flux"], 5, rtol=0.01) and abs(phot["r_half"] - phot0["r_half"]) < 0.01


def test_catalog_fluxes_match_bands_by_name():
    keys = ["scalar.flux_g", "scalar.flux_r", "scalar.redshift", "scalar.flux_z"]
    assert catalog_fluxes(("hsc.g", "hsc.r", "hsc.i", "hsc.z", "hsc.y"), keys) == [
        "scalar.flux_g", "scalar.flux_r", None, "scalar.flux_z", None]


def disk_radius(sample) -> float:
    from omnisky.generate.baselines import catalog_profile_image
    like = template_for("image.des", 32)
    return half_light_radius(catalog_profile_image(sample, like).flux.sum(0), like.pixel_scale)


def synthetic_training_set(n: int = 60, seed: int = 0):
    """Objects whose stamp holds a(r) = 0.95 - 0.1 r of the catalog flux and shows a Gaussian of
    half-light radius 0.1 + 0.9 R, R the catalog disk's through the PSF: the maps fit_maps must find."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = rng.uniform(0.2, 1.5)
        total = rng.uniform(150, 400) * np.array([0.5, 1.0, 1.3, 1.5])
        s = catalog_sample(total, 0.001 * total, r, 0.05)
        img = des_image(blob(0.1 + 0.9 * disk_radius(s), (0.95 - 0.1 * r) * total), noise=0.01, rng=rng)
        s.records["image.des"] = img
        out.append(s)
    return out


def test_fit_maps_recovers_the_stamp_share_and_the_size_map():
    train = synthetic_training_set()
    odd = synthetic_training_set(1, seed=9)[0]                 # a bright stamp whose catalog says no light:
    for b in BANDS:                                            # its disk has no half-light radius
        odd.records[f"scalar.flux_{b}"] = Scalar(f"flux_{b}", -1.0, 1.0)
    train = train + [odd]
    maps = CatalogConsistency(**fit_maps(train, "image.des"), tau_flux=0.3, tau_size=0.3)
    for j in range(4):
        for r in (0.3, 1.0, 1.4):
            pred, _ = maps.stamp_flux(j, 100.0, 1.0, r)
            assert abs(pred / (100 * (0.95 - 0.1 * r)) - 1) < 0.01, (j, r, maps.aperture[j])
        assert maps.aperture_scatter[j] < 0.01
    for s in train[:10]:
        R, _ = maps.stamp_radius(s, s.records["image.des"])
        assert abs(R - image_photometry(s.records["image.des"])["r_half"]) < 0.1, (R, maps.size_map)
    assert abs(maps.size_map[1] - 0.9) < 0.15 and maps.fit["n_objects"] == 61 and maps.fit["n_size"] == 60
    train = train[:60]
    # the model's error: images 20% too bright everywhere -> tau_flux ~ 0 (a bias, no spread) at the floor;
    # scattered by 10% -> ~0.1
    rng = np.random.default_rng(1)
    imgs = [dataclasses.replace(s.records["image.des"], flux=s.records["image.des"].flux * rng.lognormal(0, 0.1))
            for s in train]
    tau_flux, tau_size, figs = model_errors(train, imgs, maps)
    assert 0.06 < tau_flux < 0.15 and figs["model_n_flux"] == 240, (tau_flux, figs)
    assert tau_size == 0.02 and figs["model_n_size"] == 60                 # the observed sizes exactly
    imgs = [dataclasses.replace(im, flux=stretch(im.flux, rng.lognormal(0, 0.2))) for im in imgs]
    assert 0.1 < model_errors(train, imgs, maps)[1] < 0.3


def test_fit_maps_errors_name_what_is_missing():
    train = synthetic_training_set(8)
    with pytest.raises(ValueError, match="need >= 10"):
        fit_maps(train, "image.des")
    train = synthetic_training_set(20)
    for s in train:
        s.records = {k: v for k, v in s.records.items() if not k.startswith("scalar.flux_")}
    with pytest.raises(ValueError, match="no catalog flux"):
        fit_maps(train, "image.des")
    train = synthetic_training_set(20)
    for s in train:                                              # g too noisy to fit its stamp share
        s.records["scalar.flux_g"] = Scalar("flux_g", s.records["scalar.flux_g"].value, 1.0e3)
    maps = fit_maps(train, "image.des")
    assert maps["fluxes"][0] is None and maps["fit"]["n_share"] == [0, 20, 20, 20]
    assert maps["share"][0] == [1.0, 0.0] and all(0.75 < m < 0.95 and 0 < d < 0.2 for m, d in maps["share"][1:])


def test_json_round_trip_and_unknown_keys():
    cons = identity_consistency()
    again = CatalogConsistency.from_json(json.loads(json.dumps(cons.to_json())))
    assert again == cons
    with pytest.raises(ValueError, match="unknown key"):
        CatalogConsistency.from_json({**cons.to_json(), "tau": 1.0})


def test_catalog_profile_baseline_carries_the_catalog_fluxes_and_size():
    from omnisky.generate.baselines import catalog_profile_image
    like = template_for("image.des", 32)
    fluxes = np.array([10.0, 20.0, 30.0, 40.0])
    img = catalog_profile_image(catalog_sample(fluxes, [1.0] * 4, 0.8, 0.1), like)
    phot = image_photometry(img)
    assert img.flux.shape == like.flux.shape and img.bands == like.bands
    assert np.all(phot["flux"] <= fluxes * 1.001) and np.all(phot["flux"] > 0.9 * fluxes), phot["flux"]
    fwhm = float(np.mean(like.psf_fwhm))
    assert 0.8 < phot["r_half"] < np.hypot(0.8, fwhm), phot["r_half"]                  # the PSF broadens it
    star = catalog_profile_image(catalog_sample(fluxes, [1.0] * 4, 0.0, 0.1), like)
    assert image_photometry(star)["r_half"] < 0.8 * fwhm and np.allclose(star.flux.sum((1, 2)), fluxes, rtol=0.02)
