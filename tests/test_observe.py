"""The observation side of the simulated sky: coadd PSFs, depth, bad pixels, real HST
morphologies, spectrograph sky residuals."""
import dataclasses

import numpy as np
import pytest

from omnisky.shards.defects import PixelDefects, draw_defects
from omnisky.shards.psf import CoaddPSF, draw_coadd_psf
from omnisky.shards.render import IMAGING, Profile, observe_scene, render


def _fwhm_of_row(row: np.ndarray, pixel_scale: float) -> float:
    """FWHM (arcsec) of a peaked 1-D profile, half-maximum crossings linearly interpolated."""
    half = row.max() / 2
    above = np.flatnonzero(row > half)
    lo = above[0] - (row[above[0]] - half) / (row[above[0]] - row[above[0] - 1])
    hi = above[-1] + (row[above[-1]] - half) / (row[above[-1]] - row[above[-1] + 1])
    return float((hi - lo) * pixel_scale)


def test_point_source_fwhm_matches_the_drawn_coadd_psf():
    des = IMAGING["des"]
    fine = dataclasses.replace(des, pixel_scale=0.05)          # pixel broadening negligible
    psf = draw_coadd_psf(np.array(des.psf_fwhm), np.array(des.n_exposures), des.seeing_scatter,
                         des.moffat_beta, np.random.default_rng(3), seeing_scale=1.1)
    fwhm = psf.fwhm_effective()
    assert np.all((psf.fwhm.min(1) < fwhm) & (fwhm < psf.fwhm.max(1)))   # a blend of the exposures
    star = render(Profile(0.0, 0.004, 1.0, 0.0), np.zeros(4), np.ones(4), psf, fine, 121, oversample=1)
    for c in range(4):
        assert 0.99 < star[c].sum() < 1.0                     # the rest: Moffat wings beyond 3"
        for row in (star[c, 60], star[c, :, 60]):
            assert _fwhm_of_row(row, fine.pixel_scale) == pytest.approx(fwhm[c], rel=0.03)


def test_record_psf_fwhm_follows_the_seeing_distribution():
    hsc = IMAGING["hsc"]
    fwhm = np.array([observe_scene(lambda psf: np.zeros((5, 8, 8)), hsc, 8, np.random.default_rng(s))[0].psf_fwhm
                     for s in range(40)])                                   # (40, 5)
    ratio = np.log(fwhm / np.array(hsc.psf_fwhm))
    assert abs(np.median(ratio)) < 0.08                      # about the survey's median seeing
    assert 0.01 < ratio.std() < hsc.seeing_scatter           # scattered, less than one exposure


def test_blank_image_noise_matches_the_depth():
    des = IMAGING["des"]
    sigma = []
    for s in range(30):
        image, truth = observe_scene(lambda psf: np.zeros((4, 32, 32)), des, 32, np.random.default_rng(s))
        good = ~image.mask
        chi = image.flux[good] * np.sqrt(image.ivar[good])
        assert 0.9 < chi.std() < 1.1                         # ivar tells the noise
        sigma.append([image.flux[c][good[c]].std() for c in range(4)])
    sigma = np.median(sigma, 0)                              # (4,) measured sky sigma per pixel
    # 5-sigma point-source depth from the measured noise (noise-equivalent area of the PSF)
    nea = 4 * np.pi * (np.array(des.psf_fwhm) / 2.3548 / des.pixel_scale) ** 2
    depth = des.zero_point - 2.5 * np.log10(5 * sigma * np.sqrt(nea))
    assert np.allclose(depth, des.depth_5sig, atol=0.1)


def test_bad_pixels_are_flagged_with_ivar_zero_and_counted():
    counts = {}
    defects = PixelDefects(cosmic_rays=3.0, bad_columns=1.0, saturated_stars=1.0)
    image, truth = observe_scene(lambda psf: np.ones((4, 32, 32)), IMAGING["des"], 32,
                                 np.random.default_rng(0), mask_rate=0.01, defects=defects,
                                 defect_counts=counts)
    assert set(counts) == {"pixel", "cosmic_ray", "bad_column", "saturated"}
    assert all(v > 0 for v in counts.values())
    assert sum(counts.values()) == image.mask.sum()
    assert np.all(image.ivar[image.mask] == 0) and np.all(image.flux[image.mask] == 0)
    assert np.all(image.ivar[~image.mask] > 0)
    mask, n = draw_defects((5, 40, 40), PixelDefects(0, 0, 1.0), np.random.default_rng(1))
    assert n["saturated"] == mask.sum() > 0 and mask.all(0).any()   # the star's core: every band
    assert np.all(mask[-1].sum() >= mask[0].sum())                  # the bleed grows to the red
    with pytest.raises(ValueError, match="PixelDefects.bad_columns"):
        PixelDefects(bad_columns=2.0)


def _real_galaxies():
    from omnisky.shards.real_morphology import load_real_galaxies
    try:
        return load_real_galaxies()
    except FileNotFoundError as e:
        pytest.skip(f"HST COSMOS stamps unavailable: {e}")


@pytest.mark.parametrize("survey", ["des", "hsc"])
def test_hst_galaxy_has_catalog_flux_and_centroid(survey):
    from omnisky.shards.real_morphology import catalog_fluxes, render_real
    galaxies = _real_galaxies()
    s = IMAGING[survey]
    psf = CoaddPSF.single(np.array(s.psf_fwhm), s.moffat_beta)
    hsc_flux = 10 ** (-0.4 * (galaxies[0].hsc_mag - 27.0))
    assert np.allclose(catalog_fluxes(galaxies[0], IMAGING["hsc"]), hsc_flux)
    offset = (0.07, -0.11)
    for gal in galaxies[::25]:
        flux = catalog_fluxes(gal, s)
        img = render_real(gal, flux, psf, s, 41, rotation=1.0, flip=True, magnification=1.3, offset=offset)
        assert np.allclose(img.sum((1, 2)), flux, rtol=0.02)
        y, x = (np.indices((41, 41)) - 20) * s.pixel_scale
        w = img[2]
        assert (w * x).sum() / w.sum() == pytest.approx(offset[0], abs=0.01)
        assert (w * y).sum() / w.sum() == pytest.approx(offset[1], abs=0.01)


def test_hst_rendering_deconvolves_the_hst_psf():
    """A known exponential disk, convolved with the real HST PSF and pixelised at 0.03",
    comes back as the analytic disk through the survey PSF: the deconvolution is exact."""
    from scipy.signal import fftconvolve

    from omnisky.shards.real_morphology import RealGalaxy, render_real
    from omnisky.shards.render import sersic_grid
    hst_psf = _real_galaxies()[0].psf
    coord = (np.arange(192) - 95.5) * 0.03
    disk = sersic_grid(1.0, 0.4, 0.6, 0.4, coord[None, :], coord[:, None], 192 * 0.03 / 2)
    stamp = fftconvolve(disk, hst_psf, mode="same")
    gal = RealGalaxy(-1, -1, stamp, hst_psf, 0.03, np.zeros(5), 0.0, 0.4)
    des = IMAGING["des"]
    fwhm = np.array([0.9])
    got = render_real(gal, np.ones(1), CoaddPSF.single(fwhm, des.moffat_beta), des, 33)[0]
    want = render(Profile(0.0, 0.4, 0.6, 0.4), np.zeros(1), np.ones(1), fwhm, des, 33, oversample=4)[0]
    assert np.abs(got - want).max() < 0.01 * want.max()
    # a quarter turn of the galaxy is a quarter turn of the image; a flip mirrors it in y
    turned = render_real(gal, np.ones(1), CoaddPSF.single(fwhm, des.moffat_beta), des, 33, rotation=np.pi / 2)[0]
    assert np.abs(turned - np.rot90(got, k=-1)).max() < 1e-6 * got.max() or \
        np.abs(turned - np.rot90(got, k=1)).max() < 1e-6 * got.max()
    flipped = render_real(gal, np.ones(1), CoaddPSF.single(fwhm, des.moffat_beta), des, 33, flip=True)[0]
    assert np.abs(flipped - got[::-1]).max() < 1e-6 * got.max()


def test_simulate_with_hst_morphology():
    from omnisky.config import load_config
    from omnisky.shards.sky import SkyConfig, simulate
    _real_galaxies()
    cfg = load_config(SkyConfig, None, {"n": 3, "seed": 5, "morphology": "hst", "star_fraction": 0.0,
                                        "qso_fraction": 0.0, "defects.cosmic_rays": 2.0})
    assert cfg.defects.cosmic_rays == 2.0
    n = 0
    for s in simulate(cfg):
        assert "hst_ident" in s.params
        for key, rec in s.records.items():
            if key.startswith("image."):
                assert sum(s.meta["defects"][key].values()) == rec.mask.sum()
        if "image.des" in s.records:
            flux_r = s.truth["image.des"][1].sum()
            assert flux_r == pytest.approx(10 ** (-0.4 * (s.params["mag_r"] - 22.5)), rel=0.03)
            n += 1
    assert n > 0
    with pytest.raises(ValueError, match="SkyConfig.morphology"):
        next(simulate(dataclasses.replace(cfg, morphology="hubble")))


def test_sky_residuals_only_at_sky_lines():
    from omnisky.shards.sky_lines import SKY_LINES
    from omnisky.shards.spectrograph import LINE_HALF_WIDTH_SIGMA, desi, sdss
    for spec in (sdss(), desi()):
        rng = np.random.default_rng(0)
        res = np.stack([spec.sky_residual(rng) for _ in range(200)])          # (200, L)
        lam = spec.wavelength
        sigma = SKY_LINES[:, 0] / (2.3548 * np.interp(SKY_LINES[:, 0], lam, spec.resolution))
        width = np.sqrt(sigma ** 2 + np.interp(SKY_LINES[:, 0], lam, np.gradient(lam)) ** 2 / 12)
        dist = np.min(np.abs(lam[None] - SKY_LINES[:, :1]) / width[:, None], 0)    # (L,) in line widths
        far = dist > LINE_HALF_WIDTH_SIGMA
        assert far.mean() > 0.3 and np.all(res[:, far] == 0)
        strong = SKY_LINES[SKY_LINES[:, 1] > 50, 0]
        at_strong = np.min(np.abs(lam[None] - strong[:, None]), 0) < 1.0
        assert np.all(np.abs(res[:, at_strong]).max(0) > 0)
        expect = spec.sky_continuum * np.sqrt(spec._sky_lines[3])            # rms residual per pixel
        assert np.median(res[:, at_strong].std(0) / expect[at_strong]) == pytest.approx(1.0, rel=0.15)
        # the residual is part of the sky sigma that ivar reports, and raises it at the lines
        knots = np.array(spec.sigma_knots)
        assert np.all(spec.sky_sigma[at_strong] > 1.5 * np.interp(lam[at_strong], knots[:, 0], knots[:, 1]))


def test_sky_line_table_is_what_the_real_desi_data_give():
    from pathlib import Path

    from omnisky.shards.sed import shared_data_dir
    from omnisky.shards.sky_lines import SKY_LINES, measure_sky_lines
    try:
        paths = sorted(Path(shared_data_dir()).glob("desi*/coadd-*.fits"))
    except FileNotFoundError:
        paths = []
    if len(paths) < 4:
        pytest.skip("real DESI coadds unavailable")
    got = measure_sky_lines(paths)
    assert got.shape == SKY_LINES.shape
    assert np.allclose(got[:, 0], SKY_LINES[:, 0], atol=0.05) and np.allclose(got[:, 1], SKY_LINES[:, 1], atol=0.5)
