"""Catalog consistency for conditional generation: an image generated from catalog values
(fluxes, half-light radius), made to agree with them.

An image drawn from the model given the tokens of a catalog's redshift, fluxes and size is a
draw from its prior: the scalars' bins and the image tokenizer's round trip leave its stamp
flux and size several catalog sigmas off (README, Results; bench/RESULTS.md). Like the data
consistency of translation (`generate.consistency`), `refine_to_catalog` combines the two
as Gaussians, one number at a time:

  size   prior: the sample's half-light radius r_g (measured as `generate.measure` does, on
         the stamp), width tau_size * r_g. Measurement: the catalog's r_half mapped to the
         radius a stamp shows, R = k0 + k1 R_disk, R_disk measured on the round exponential
         disk of the catalog's r_half and fluxes through the image's PSF and pixels
         (`baselines.catalog_profile_image`), with the catalog's sigma carried through and
         the map's scatter (profiles other than a disk) added.
         The posterior mean r' -> the image is stretched about the stamp centre by r'/r_g,
         flux per unit area scaled by (r_g/r')^2 so that light is kept.
  flux   per band, prior: the stretched sample's stamp flux F_g, width tau_flux * F_g.
         Measurement: the catalog's total flux times the share of it a stamp of this
         survey holds, a(r_half) = a0 + a1 r_half + a2 r_half^2 (light beyond the stamp,
         and a survey's colour term where the catalog's band is another survey's), sigma
         the catalog's times a, plus the map's scatter. The band is scaled to the
         posterior mean F'.

A bright object's catalog values win, a faint one's barely move the sample; the morphology
(shape, orientation, colour gradients) stays the model's. Nothing here needs the truth:

    cons = fit_catalog_consistency(pipe, train_samples, "image.des")   # maps from the training
                                                                      # observations; tau from
                                                                      # the model's samples there
    refined = refine_to_catalog(sample, images, cons, given)          # one object's samples
    pipe.sample(objects, given, "image.des", catalog=cons)            # the same, in the pipeline

`fit_catalog_consistency` fits the two maps on the training objects' observed stamps by
median regression, each object alike (the stamp share at catalog S/N > 100 in that band:
a noisy catalog flux as the regressor would bias it low; a band with fewer than 4 such
objects is left as the model drew it, `fit["n_share"]` counts them; the size map on stamps
of S/N > 20), then draws the model's images for `n_model` of them and sets tau_flux to the
robust spread of their fractional flux errors against the map, less what the catalog's own
noise explains, and tau_size to that of their half-light radii against the observed
stamps' (both floored at 2%). Where r_half is not given, the flux step takes the share's
median over all sizes, its spread the measurement's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..shards.schema import Image
from .baselines import ab_nanomaggies, catalog_profile_image, stamp_centre
from .measure import half_light_radius, image_photometry

FLUX_PREFIX = "scalar.flux_"
SIZE_KEY = "scalar.r_half"
TAU_FLOOR = 0.02                 # the prior's smallest fractional width
MIN_SNR = 20.0                   # fainter stamps do not set the size map
SHARE_MIN_SNR = 100.0            # fainter catalog fluxes do not set the stamp shares
STRETCH_RANGE = (0.5, 2.0)       # the size step stretches by no more than this


def _mad_sigma(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else float("nan")


@dataclass
class CatalogConsistency:
    """What pulling an image of `target` to catalog values needs (see the module docstring).
    `fluxes[j]`: the catalog flux key of the target's band j, or None (band not constrained);
    `aperture[j]`: (a0, a1, a2) of that band's stamp share; `size_map`: (k0 arcsec, k1), the
    stamp's half-light radius k0 + k1 R, R the one of the catalog's round exponential disk
    through the image's PSF (`baselines.catalog_profile_image`)."""
    target: str
    fluxes: list
    aperture: list
    aperture_scatter: list
    share: list                      # per band (median, spread) of the stamp share over all sizes: used
                                     # where r_half is not given
    size_map: list
    size_scatter: float              # arcsec, scatter of the stamp radius about the map
    tau_flux: float                  # the model's fractional flux error (prior width)
    tau_size: float                  # the model's fractional size error
    fit: dict | None = None          # figures of the fit (objects used, raw spreads)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CatalogConsistency":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"CatalogConsistency: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def stamp_flux(self, j: int, flux: float, sigma: float, r_half: float | None) -> tuple[float, float]:
        """Band j's catalog total flux (nanomaggies) and sigma -> the stamp flux it predicts, and
        that prediction's sigma; without r_half the share's median and spread over all sizes."""
        if r_half is None:
            a, spread = self.share[j]
        else:
            a, spread = float(np.polyval(self.aperture[j][::-1], r_half)), self.aperture_scatter[j]
        pred = a * flux
        return pred, float(np.hypot(a * sigma, spread * pred))

    def stamp_radius(self, sample, like: Image) -> tuple[float, float] | None:
        """The half-light radius (arcsec) a stamp like `like` shows of the object, from its catalog
        r_half and fluxes, and that prediction's sigma; None without a catalog r_half."""
        size = _catalog(sample, SIZE_KEY)
        if size is None:
            return None
        R0 = half_light_radius(catalog_profile_image(sample, like).flux.sum(0), like.pixel_scale)
        k0, k1 = self.size_map
        dR = k1 * size[0] / max(R0, 1e-3) * size[1]         # d(R)/d(r_half) ~ r_half / R: seeing adds in quadrature
        return k0 + k1 * R0, float(np.hypot(dR, self.size_scatter))


def _catalog(sample, key: str) -> tuple[float, float] | None:
    rec = sample.records.get(key)
    if rec is None or not np.isfinite(rec.value) or not np.isfinite(rec.uncertainty):
        return None
    return float(rec.value), float(rec.uncertainty)


def _combine(prior: float, prior_sigma: float, meas: float, meas_sigma: float) -> float:
    """Posterior mean of two Gaussians."""
    wp, wm = 1.0 / max(prior_sigma, 1e-12) ** 2, 1.0 / max(meas_sigma, 1e-12) ** 2
    return (wp * prior + wm * meas) / (wp + wm)


def stretch(flux: np.ndarray, factor: float) -> np.ndarray:
    """flux (C, H, W) stretched about the stamp centre (pixel n // 2) by `factor` (> 1: larger),
    bilinearly; per-pixel values scaled by 1 / factor^2 so that the light is kept."""
    C, H, W = flux.shape
    cy, cx = stamp_centre(H), stamp_centre(W)
    ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    src_y, src_x = cy + (ys - cy) / factor, cx + (xs - cx) / factor          # where each pixel comes from
    gy = torch.as_tensor(2 * src_y / (H - 1) - 1).view(H, 1).expand(H, W)
    gx = torch.as_tensor(2 * src_x / (W - 1) - 1).view(1, W).expand(H, W)
    grid = torch.stack([gx, gy], -1)[None]                                   # (1, H, W, 2) x, y
    img = torch.as_tensor(np.asarray(flux, np.float64))[None]                # (1, C, H, W)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return (out / factor ** 2).numpy().astype(flux.dtype)


def refine_to_catalog(sample, images: Sequence[Image], cons: CatalogConsistency,
                      given: Sequence[str] | None = None) -> list[Image]:
    """One object's generated images of `cons.target` -> as many, pulled to the object's
    catalog values: those of `given` (default: all it has) that it has; a missing or
    non-finite value leaves its step out (without r_half the stamp share is its median over
    all sizes, its spread the measurement's)."""
    if given is not None:
        sample = dataclasses.replace(sample, records={k: v for k, v in sample.records.items() if k in set(given)})
    out = []
    size = _catalog(sample, SIZE_KEY)
    # the samples of one object share its survey, bands and PSF: one disk for all of them
    R, sigma_R = cons.stamp_radius(sample, images[0]) if size is not None and len(images) else (None, None)
    for img in images:
        flux = np.asarray(img.flux, np.float64)
        phot = image_photometry(img)
        r_g = phot["r_half"]
        if size is not None and np.isfinite(r_g) and r_g > 0:
            r_post = _combine(r_g, cons.tau_size * r_g, R, sigma_R)
            flux = stretch(flux, float(np.clip(r_post / r_g, *STRETCH_RANGE)))
        conv = ab_nanomaggies(img)                                            # flux units -> nanomaggies
        r_cat = size[0] if size is not None else None
        for j, key in enumerate(cons.fluxes):
            cat = _catalog(sample, key) if key else None
            if cat is None:
                continue
            F_g = float(flux[j].sum()) * conv                                    # nanomaggies
            if F_g <= 0:                             # no light to scale: left as drawn
                continue
            pred, sigma = cons.stamp_flux(j, cat[0], cat[1], r_cat)
            F_post = _combine(F_g, cons.tau_flux * F_g, pred, sigma)
            flux[j] = flux[j] * max(F_post / F_g, 0.0)
        out.append(dataclasses.replace(img, flux=flux.astype(np.float32)))
    return out


def catalog_fluxes(bands: Sequence[str], keys: Sequence[str]) -> list:
    """The catalog flux key of each band, matched on the band's name ('des.g' <- 'scalar.flux_g'),
    None where the catalog has no such band."""
    have = {k[len(FLUX_PREFIX):]: k for k in keys if k.startswith(FLUX_PREFIX)}
    return [have.get(b.split(".")[-1]) for b in bands]


def median_regression(X: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Coefficients b minimising sum |y - X b| (iteratively reweighted least squares)."""
    b = np.linalg.lstsq(X, y, rcond=None)[0]
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.abs(y - X @ b), 1e-6)
        b = np.linalg.lstsq(X * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    return b


def fit_maps(samples: Sequence, target: str, share_min_snr: float = SHARE_MIN_SNR) -> dict:
    """The aperture and size maps (and their scatters) from the objects' observed `target`
    stamps and catalog values; -> keyword arguments of CatalogConsistency (tau left out)."""
    rows = [s for s in samples if target in s.records and _catalog(s, SIZE_KEY) is not None]
    if len(rows) < 10:
        raise ValueError(f"fit_catalog_consistency: {len(rows)} objects have {target} and {SIZE_KEY}; need >= 10")
    bands = rows[0].records[target].bands
    fluxes = catalog_fluxes(bands, rows[0].records.keys())
    if not any(fluxes):
        raise ValueError(f"fit_catalog_consistency: no catalog flux ({FLUX_PREFIX}*) matches a band of "
                         f"{target} {list(bands)}")
    phot = [image_photometry(s.records[target]) for s in rows]
    F_obs = np.array([p["flux"] for p in phot])                              # (N, C) nanomaggies
    F_sig = np.array([p["flux_sigma"] for p in phot])
    r_cat = np.array([_catalog(s, SIZE_KEY)[0] for s in rows])
    aperture, scatter, n_share, share = [], [], [], []
    for j, key in enumerate(fluxes):
        if key is None:
            aperture.append([1.0, 0.0, 0.0])
            scatter.append(0.0)
            n_share.append(0)
            share.append([1.0, 0.0])
            continue
        cat = np.array([_catalog(s, key) or (np.nan, np.nan) for s in rows])  # (N, 2)
        # bright in the catalog only (selected on the regressor, not on the stamp: no bias): the
        # stamp's own noise is ~5x the catalog's, so S/N 100 there is ~20 in the stamp
        ok = (np.isfinite(cat).all(1) & np.isfinite(F_obs[:, j]) & (F_sig[:, j] > 0)
              & (cat[:, 0] > share_min_snr * cat[:, 1]))
        n_share.append(int(ok.sum()))
        if ok.sum() < 4:                           # too few to fit its share: the band is left as drawn
            fluxes[j] = None
            aperture.append([1.0, 0.0, 0.0])
            scatter.append(0.0)
            share.append([1.0, 0.0])
            continue
        # the share y = stamp / catalog flux, its median at each r_half: least absolute deviations
        # (iteratively reweighted), each object alike, as the share's spread between objects (~5%:
        # profiles and their wings beyond the stamp) exceeds these bright objects' noise, and its
        # tail (large galaxies with extended wings) would pull a mean below most objects
        y = F_obs[ok, j] / cat[ok, 0]
        X = np.stack([np.ones_like(y), r_cat[ok], r_cat[ok] ** 2], 1)
        coef = median_regression(X, y)
        resid = y - X @ coef
        noise = np.hypot(F_sig[ok, j] / cat[ok, 0], y * cat[ok, 1] / cat[ok, 0])
        excess = _mad_sigma(resid / (X @ coef)) ** 2 - float(np.median((noise / (X @ coef)) ** 2))
        aperture.append([float(c) for c in coef])
        scatter.append(float(np.sqrt(max(excess, 0.0))))
        share.append([float(np.median(y)), _mad_sigma(y / np.median(y))])
    if not any(fluxes):
        raise ValueError(f"fit_catalog_consistency: no band of {target} has >= 4 objects at catalog S/N > "
                         f"{share_min_snr:g} to fit its stamp share (per band: {n_share})")
    snr = F_obs.sum(1) / np.sqrt((F_sig ** 2).sum(1))
    r_obs = np.array([p["r_half"] for p in phot])
    ok = (snr > MIN_SNR) & np.isfinite(r_obs)
    if ok.sum() < 3:                               # two coefficients, and one to spare
        raise ValueError(f"fit_catalog_consistency: {int(ok.sum())} stamps of {target} have S/N > "
                         f"{MIN_SNR:g}; need >= 3 for the size map")
    R0 = np.full(len(rows), np.nan)
    R0[ok] = [half_light_radius(catalog_profile_image(s, s.records[target]).flux.sum(0), s.records[target].pixel_scale)
              for s, o in zip(rows, ok) if o]
    ok &= np.isfinite(R0)                         # a disk of no positive light (noisy, faint catalog fluxes)
    X = np.stack([np.ones(ok.sum()), R0[ok]], 1)
    k = median_regression(X, r_obs[ok])
    return dict(target=target, fluxes=fluxes, aperture=aperture, aperture_scatter=scatter, share=share,
                size_map=[float(v) for v in k], size_scatter=_mad_sigma(r_obs[ok] - X @ k),
                fit=dict(n_objects=len(rows), n_size=int(ok.sum()), n_share=n_share))


def model_errors(samples: Sequence, images: Sequence[Image], maps: CatalogConsistency) -> tuple[float, float, dict]:
    """The model's fractional errors: flux against the stamp flux the catalog predicts (the
    stamp's own noise is ~5x the catalog's), less what the catalog's noise explains; size
    against the half-light radius measured on the object's observed stamp (S/N > 20: a
    measurement good to ~0.02"). -> (tau_flux, tau_size, raw figures)."""
    target = maps.target
    dflux, nflux, dsize = [], [], []
    for s, img in zip(samples, images):
        size = _catalog(s, SIZE_KEY)
        if size is None:
            continue
        phot = image_photometry(img)
        obs = image_photometry(s.records[target]) if target in s.records else None
        if obs is not None and np.isfinite(phot["r_half"]) and np.isfinite(obs["r_half"]) and \
                obs["flux"].sum() > MIN_SNR * np.sqrt((obs["flux_sigma"] ** 2).sum()):
            dsize.append(phot["r_half"] / obs["r_half"] - 1)
        for j, key in enumerate(maps.fluxes):
            cat = _catalog(s, key) if key else None
            if cat is None:
                continue
            pred, sp = maps.stamp_flux(j, cat[0], cat[1], size[0])
            if pred > 10 * sp:                     # where the catalog pins the flux
                dflux.append(phot["flux"][j] / pred - 1)
                nflux.append(sp / pred)

    def tau(d, n):
        if len(d) < 5:
            return 0.3, float("nan")
        raw = _mad_sigma(d)
        return float(max(np.sqrt(max(raw ** 2 - np.median(np.square(n)), 0.0)), TAU_FLOOR)), raw
    (tf, rf), (ts, rs) = tau(dflux, nflux), tau(dsize, [0.0])
    return tf, ts, dict(model_n_flux=len(dflux), model_n_size=len(dsize), model_flux_spread=rf, model_size_spread=rs)


def fit_catalog_consistency(pipe, samples: Sequence, target: str = "image.des", given: Sequence[str] | None = None,
                            n_model: int = 48, seed: int = 0, share_min_snr: float = SHARE_MIN_SNR,
                            **schedule) -> CatalogConsistency:
    """Maps from the training `samples`' observations, then tau from the model's images of the
    first `n_model` of them given `given` (default: redshift, the matched fluxes, r_half)."""
    maps = CatalogConsistency(**fit_maps(samples, target, share_min_snr), tau_flux=0.3, tau_size=0.3)
    if given is None:
        given = ["scalar.redshift", *[k for k in maps.fluxes if k], SIZE_KEY]
    rows = [s for s in samples if _catalog(s, SIZE_KEY) is not None and target in s.records][:n_model]
    images = [g[0] for g in pipe.sample(rows, list(given), target, seed=seed, **schedule)]
    tau_flux, tau_size, figs = model_errors(rows, images, maps)
    return dataclasses.replace(maps, tau_flux=tau_flux, tau_size=tau_size, fit={**maps.fit, **figs})
