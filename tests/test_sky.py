"""The simulated sky's population: classes, point sources, stellar and quasar spectra,
dust, determinism, and a small version of bench/sky.py's colour check."""
import dataclasses

import numpy as np
import pytest

from omnisky.shards.codec import encode_sample


@pytest.fixture(scope="module")
def points(sky_config):
    """Six stars and quasars, seen by every survey and spectrograph."""
    from omnisky.shards.sky import simulate
    cfg = dataclasses.replace(sky_config, n=6, seed=21, star_fraction=0.5, qso_fraction=0.5, mag_r_max=21.0,
                              p_image_des=1.0, p_image_hsc=1.0, p_spectrum_sdss=1.0, p_spectrum_desi=1.0)
    return list(simulate(cfg))


def test_classes_come_in_the_configured_fractions(sky_config):
    from omnisky.shards.sky import CLASSES, SkyConfig, simulate_catalog
    cfg = dataclasses.replace(sky_config, n=300, seed=3, star_fraction=0.25, qso_fraction=0.1)
    cat = simulate_catalog(cfg, ("des.g", "des.r"))
    frac = np.bincount(cat["class"].astype(int), minlength=3) / cfg.n
    for cls, want, got in zip(CLASSES, (0.65, 0.25, 0.1), frac):
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / cfg.n), (cls, got)
    # every class has its own physics, and the photometry is what the magnitude says
    assert np.all(np.isnan(cat["teff"][cat["class"] != 1])) and np.all(cat["teff"][cat["class"] == 1] > 3000)
    assert np.all(cat["z"][cat["class"] == 2] > 0.1) and np.all(np.abs(cat["z"][cat["class"] == 1]) < 2e-3)
    np.testing.assert_allclose(22.5 - 2.5 * np.log10(cat["flux_des.r"]), cat["mag_r"], atol=1e-6)
    # galaxies: H-alpha luminosity follows the star formation rate
    from scipy.stats import spearmanr
    from omnisky.shards.population import distance_modulus
    gal = cat["class"] == 0
    log_l_ha = np.log10(cat["flux_halpha"][gal]) + 0.4 * distance_modulus(cat["z"][gal])
    assert spearmanr(log_l_ha, cat["log_ssfr"][gal] + cat["log_mstar"][gal]).statistic > 0.8
    with pytest.raises(ValueError, match="star_fraction"):
        SkyConfig(star_fraction=0.8, qso_fraction=0.3)


def test_a_point_source_renders_as_the_psf():
    from omnisky.shards.psf import moffat_profile
    from omnisky.shards.render import IMAGING, Profile, render
    des = IMAGING["des"]
    size, fwhm, dx, dy = 33, np.array([1.1]), 0.09, -0.05
    img = render(Profile(0.0, 0.0, 1.0, 0.0, dx, dy), np.array([2.0]), np.zeros(1), fwhm, des, size, oversample=4)[0]
    y, x = (np.mgrid[:size, :size] - size // 2) * des.pixel_scale
    # the Moffat integrated over each pixel (8 x 8 samples per pixel)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    ref = sum(moffat_profile(np.hypot(x + a * des.pixel_scale - dx, y + b * des.pixel_scale - dy), fwhm[0],
                             des.moffat_beta) for a in sub for b in sub) / 64 * des.pixel_scale ** 2
    assert img.sum() == pytest.approx(2.0 * ref.sum(), rel=1e-3)
    assert np.abs(img - 2.0 * ref).max() < 0.01 * img.max()


def _fwhm_pixels(img: np.ndarray) -> float:
    """FWHM of a centred blob (pixels) from the area above half its peak, on a x8 bicubic
    resampling of the image."""
    from scipy.ndimage import zoom
    fine = zoom(img, 8, order=3)
    return 2 * np.sqrt((fine > fine.max() / 2).sum() / np.pi) / 8


def test_simulated_point_sources_are_psf_shaped(points):
    from omnisky.shards.render import IMAGING, Profile, render
    assert {s.meta["class"] for s in points} == {"star", "qso"}
    for s in points:
        assert s.params["r_half"] == 0.0 and s.params["class"] == {"star": 1.0, "qso": 2.0}[s.meta["class"]]
        for key in ("image.des", "image.hsc"):
            rec, truth = s.records[key], s.truth[key].astype(np.float64)
            size = truth.shape[-1]
            yy, xx = np.mgrid[:size, :size]
            for c in range(len(rec.bands)):
                img = truth[c] / truth[c].sum()
                cy, cx = (img * yy).sum(), (img * xx).sum()
                assert abs(cx - size // 2) < 0.6 and abs(cy - size // 2) < 0.6       # within half a pixel
                # the image's FWHM is that of a Moffat of the record's (coadd) PSF FWHM, measured alike
                ref = render(Profile(0.0, 0.0, 1.0, 0.0, (cx - size // 2) * rec.pixel_scale,
                                     (cy - size // 2) * rec.pixel_scale), np.ones(1), np.zeros(1),
                             rec.psf_fwhm[c:c + 1], IMAGING[key.split(".")[1]], size)[0]
                assert _fwhm_pixels(truth[c]) == pytest.approx(_fwhm_pixels(ref), rel=0.05), (s.object_id, key, c)


def test_galaxies_are_extended(sky_config):
    from omnisky.shards.sky import simulate
    cfg = dataclasses.replace(sky_config, n=4, seed=5, star_fraction=0.0, qso_fraction=0.0)
    for s in simulate(cfg):
        assert s.meta["class"] == "galaxy" and s.params["r_half"] >= 0.1


def _line_window(sed, wave, centre, half):
    """Continuum-subtracted flux and flux-weighted centre of the lines within +-half A."""
    from omnisky.shards.spectrograph import desi
    spec = desi()
    near = np.abs(spec.wavelength - centre) < half
    resid = sed.spectrum(spec.wavelength, spec.resolution) - sed.continuum(spec.wavelength)
    dlam = np.gradient(spec.wavelength)
    flux = np.sum((resid * dlam)[near])
    return flux, np.sum((resid * dlam * spec.wavelength)[near]) / flux


def test_quasar_lines_sit_at_their_observed_wavelengths():
    from omnisky.shards.quasars import QSO_LINES, quasar_sed
    from omnisky.shards.sed import C_KMS, FWHM_PER_SIGMA
    ones, fwhm = np.ones(len(QSO_LINES)), 4000.0
    for z, name in ((0.25, "Halpha"), (1.3, "MgII"), (2.6, "CIV")):      # isolated broad lines
        sed = quasar_sed(z, -0.44, fwhm, ones)
        centre = QSO_LINES[name][0] * (1 + z)
        sigma = centre * fwhm / FWHM_PER_SIGMA / C_KMS
        flux, mean = _line_window(sed, None, centre, 8 * sigma)
        assert mean == pytest.approx(centre, abs=1.0), (z, name)
        assert flux == pytest.approx(sed.line_flux[list(QSO_LINES).index(name)], rel=0.01), (z, name)
        assert 20 < sigma < 60                                   # broad: FWHM 4000 km/s
    # Lyman-alpha: the peak of the line spectrum at z = 2.6
    from omnisky.shards.spectrograph import desi
    sed, spec = quasar_sed(2.6, -0.44, fwhm, ones), desi()
    resid = sed.spectrum(spec.wavelength, spec.resolution) - sed.continuum(spec.wavelength)
    assert spec.wavelength[np.argmax(resid)] == pytest.approx(QSO_LINES["Lyalpha"][0] * 3.6, abs=3.0)
    # the forest: below rest Lyman-alpha the continuum is absorbed, the more at higher z
    from omnisky.shards.sed import igm_transmission
    assert igm_transmission(np.array([1100 * 3.6]), 2.6)[0] < igm_transmission(np.array([1100 * 2.0]), 1.0)[0] < 1
    assert igm_transmission(np.array([1300 * 3.6]), 2.6)[0] == 1.0


def test_stellar_absorption_lines_follow_temperature_and_velocity():
    from omnisky.shards.sed import C_KMS
    from omnisky.shards.stars import BALMER, STAR_LINES, star_sed
    rv = 150.0
    hot, cool = star_sed(9500.0, rv), star_sed(4000.0, rv)
    for name in ("Hbeta", "Halpha"):
        centre = BALMER[name] * (1 + rv / C_KMS)
        flux, mean = _line_window(hot, None, centre, 60)
        assert flux < 0 and mean == pytest.approx(centre, abs=0.5), name
        ew_hot = -flux / hot.continuum(np.array([centre]))[0]
        ew_cool = -_line_window(cool, None, centre, 60)[0] / cool.continuum(np.array([centre]))[0]
        assert ew_hot > 3 * ew_cool, name                                # Balmer lines peak in A stars
    k = STAR_LINES["CaII_K"] * (1 + rv / C_KMS)
    ew = {T: -_line_window(sed, None, k, 15)[0] / sed.continuum(np.array([k]))[0] for T, sed in ((4000, cool), (9500, hot))}
    assert ew[4000] > 3 * ew[9500] > 0                                       # Ca II K: strong in cool stars


def test_point_source_spectra_agree_with_their_photometry(points):
    """The fibre spectrum / fibre fraction through DES r gives mag_r, as for galaxies."""
    import astropy.units as u
    from omnisky.shards import bands
    r = bands.get("des.r").response
    for s in points:
        rec = s.records["spectrum.desi"]
        f = s.truth["spectrum.desi"].astype(np.float64) * 1e-17 / s.params["fibre_frac_desi"]
        maggies = float(r.get_ab_maggies(f * u.erg / u.s / u.cm ** 2 / u.AA, rec.wavelength * u.AA))
        assert -2.5 * np.log10(maggies) == pytest.approx(s.params["mag_r"], abs=0.02), s.object_id
        assert 0.2 < s.params["fibre_frac_desi"] < 1.0


def test_dusty_and_smooth_seds_match_speclite(shared_data):
    import astropy.units as u
    from omnisky.shards import bands
    from omnisky.shards.quasars import QSO_LINES, quasar_sed
    from omnisky.shards.sed import GalaxySED
    from omnisky.shards.stars import star_sed
    names = ("sdss.u", "des.g", "des.r", "hsc.i", "hsc.y")
    lam = np.arange(2900.0, 11500.0, 0.25)
    for sed in (GalaxySED(0.3, np.array([0.0, 0.6, 0.4, 0.0]), ebv=0.13), GalaxySED(0.05, np.eye(4)[0], ebv=0.55),
                star_sed(5200.0, 30.0), quasar_sed(2.2, -0.6, 3500.0, np.ones(len(QSO_LINES)))):
        f = (sed.continuum(lam) + sed._lines(lam, np.full(lam.shape, 3000.0))) * 1e-17
        ref = [float(bands.get(n).response.get_ab_maggies(f * u.erg / u.s / u.cm ** 2 / u.AA, lam * u.AA))
               for n in names]
        np.testing.assert_allclose(sed.maggies(names), ref, rtol=4e-3, err_msg=type(sed).__name__)
    # dust reddens: E(B-V) = 0.2 on a disk makes g - r redder by ~ (k_g - k_r) x 0.2
    gr = [-2.5 * np.log10(np.divide(*GalaxySED(0.1, np.eye(4)[1], ebv=e).maggies(("des.g", "des.r"))))
          for e in (0.0, 0.2)]
    assert 0.15 < gr[1] - gr[0] < 0.3


def test_the_same_seed_gives_the_same_objects_on_both_paths(sky_config):
    from omnisky.shards.sky import simulate, simulate_catalog, simulate_one
    cfg = dataclasses.replace(sky_config, n=6, seed=9, star_fraction=0.3, qso_fraction=0.2)
    a = [encode_sample(s) for s in simulate(cfg)]
    assert a == [encode_sample(simulate_one(cfg, i)) for i in range(6)]
    assert a != [encode_sample(s) for s in simulate(dataclasses.replace(cfg, seed=10))]
    cat = simulate_catalog(cfg, ("des.g", "des.r", "des.i", "des.z"))
    for i, s in enumerate(simulate(cfg)):
        assert cat["class"][i] == s.params["class"] and cat["z"][i] == s.params["z"]
        if "scalar.flux_g" in s.truth:
            for b in "griz":
                assert s.truth[f"scalar.flux_{b}"] == pytest.approx(cat[f"flux_des.{b}"][i], rel=1e-5)


def test_redshifts_follow_depth_and_red_fraction_follows_luminosity(shared_data):
    from omnisky.shards.galaxies import redshift_table
    from omnisky.shards.quasars import redshift_table as qso_table
    table = redshift_table(0.02, 1.2)
    med = [table.median_z(m) for m in (16.0, 17.77, 20.0, 22.0, 24.0)]
    assert np.all(np.diff(med) > 0) and 0.06 < med[0] < 0.12 and 0.45 < med[3] < 0.75
    assert 1.0 < qso_table(3.5).median_z(20.0) < 2.2
    rng = np.random.default_rng(0)
    red_bright = np.mean([table.draw(16.0, rng)[0] == "red" for _ in range(400)])
    red_faint = np.mean([table.draw(23.0, rng)[0] == "red" for _ in range(400)])
    assert red_bright > red_faint + 0.2


def test_sdss_like_colours_match_real_sdss_galaxies(shared_data):
    """bench/sky.py's colour check, small: median g-r in two redshift bins within 0.1 mag."""
    from omnisky.shards.sed import shared_data_dir
    from omnisky.shards.sky import SkyConfig, simulate_catalog
    path = shared_data_dir() / "sdss_photoz" / "sdss_galaxies_dev.fits"
    if not path.exists():
        pytest.skip(f"{path} not found")
    from astropy.io import fits
    with fits.open(path) as hdul:
        d = hdul[1].data
        flux = np.asarray(d["MODELFLUX"], float)[:, 1:3] * 10 ** (0.4 * np.asarray(d["EXTINCTION"], float)[:, 1:3])
        z_real = np.asarray(d["Z"], float)
    cfg = SkyConfig(n=400, seed=4, mag_r_min=13.5, mag_r_max=18.0, star_fraction=0.0, qso_fraction=0.0,
                    z_min=0.005, z_max=0.8)
    cat = simulate_catalog(cfg, ("sdss.g", "sdss.r"))
    sim = np.stack([cat["flux_sdss.g"], cat["flux_sdss.r"]], 1)
    for lo, hi in ((0.03, 0.1), (0.1, 0.2)):
        med = []
        for f, z in ((flux, z_real), (sim, cat["z"])):
            m = 22.5 - 2.5 * np.log10(np.clip(f, 1e-3, None))
            sel = (m[:, 1] > 14.0) & (m[:, 1] < 17.77) & (z > lo) & (z <= hi)
            med.append(np.median(m[sel, 0] - m[sel, 1]))
        assert abs(med[1] - med[0]) < 0.1, (lo, hi, med)
    r = 22.5 - 2.5 * np.log10(cat["flux_sdss.r"])
    assert np.median(cat["z"][(r > 14) & (r < 17.77)]) == pytest.approx(0.10, abs=0.02)
