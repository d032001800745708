"""The simulated sky: a deterministic stream of galaxies seen by several surveys.

    cfg = load_config(SkyConfig, "launch/sky/tiny.yaml", overrides={"n": 100})
    for sample in simulate(cfg, start=0, stop=10):     # shards.schema.Sample
        sample.records["image.des"], sample.truth["image.des"], sample.params["z"]

Object i draws everything from `np.random.default_rng([seed, i])`, so any slice of the
sky can be simulated on its own (parallel workers) and one seed always gives the same
objects. Each object is seen by a random subset of: `image.des` (DECam g,r,i,z),
`image.hsc` (HSC g,r,i,z,y), `spectrum.sdss`, `spectrum.desi`, and the catalog scalars
`scalar.redshift`, `scalar.flux_{g,r,i,z}` (DES-like, nanomaggies), `scalar.r_half`.

The population (each choice with its source):
- apparent DES r magnitude from number counts dlog10 N / dm = 0.33 (Metcalfe et al. 2000);
- redshift from a Smail et al. form p(z) ~ z^2 exp(-(z / z0)^1.5) whose median grows with
  magnitude (0.08 at r = 17.5, SDSS main-sample like; ~0.5 at r = 22);
- red fraction rising with luminosity (Baldry et al. 2004, 2006) and falling with z;
  red galaxies: E bulge + red disk; blue: disk of type Sbc..Im, sometimes with a bulge
  (about 30% two-component, as in SDSS fits);
- stellar mass from the rest-frame r luminosity and the Bell et al. (2003) g-r M/L
  (-0.093 dex to Chabrier); size from van der Wel et al. (2014) size-mass relations;
- H-alpha EW = 63 A x sSFR / Gyr^-1 (Fumagalli et al. 2012), sSFR ~ (1+z)^1.8.
  Line ratios: H-alpha/H-beta = 2.86 (case B, Osterbrock & Ferland 2006) reddened by
  a gas E(B-V) with Calzetti (2000) k values; [NII]6584/H-alpha falling from massive to
  dwarf types; [OIII]5007/H-beta 0.1 dex below the Kauffmann et al. (2003) star-forming
  line at that [NII]/H-alpha; [OII]3727/H-alpha = 0.56 (ratio of the Kennicutt 1998
  SFR calibrations), reddened; doublet ratios [OIII] 2.98, [NII] 3.05, [OII] 3729/3726 = 1.3.

Sample.params (floats): z, mag_r (DES r, AB), abs_mag_r, gr_rest, log_mstar (Msun),
is_red (0/1), type (disk template coordinate 0 = E .. 3 = Im), bulge_frac (r-band B/T),
log_ssfr (Gyr^-1), ew_halpha (A, rest), flux_halpha (1e-17 erg/s/cm^2, total), ebv_gas,
log_nii_halpha, log_oiii_hbeta, sigma_v (km/s), r_half (arcsec, circularised, intrinsic),
r_half_kpc, r_bulge, r_disk (arcsec), sersic_n (4 B/T + 1 (1 - B/T), nominal),
axis_ratio, ellipticity (1 - q), position_angle (rad), fibre_frac_{sdss,desi} (when observed).
Sample.truth: the noiseless flux of each image/spectrum (same shape as its flux) and the
true value of each scalar.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
from scipy.special import gammainc

from .render import IMAGING, Profile, observe_image, sersic_b
from .schema import Sample, Scalar
from .sed import LINE_NAMES, LINES, GalaxySED, template_maggies, template_mix
from .spectrograph import SPECTROGRAPHS, fibre_fraction, observe_spectrum

DES_BANDS = IMAGING["des"].bands
HSC_BANDS = IMAGING["hsc"].bands
PHOT_BANDS = DES_BANDS + HSC_BANDS
_R = DES_BANDS.index("des.r")
_G = DES_BANDS.index("des.g")


@dataclass
class SkyConfig:
    """n objects from seed; images are image_size x image_size pixels in both surveys.
    p_*: the probability that a survey sees an object (every object gets >= 1 image);
    p_scalars: the probability of each catalog scalar group (redshift, fluxes, size)."""
    n: int = 2000
    seed: int = 0
    image_size: int = 32
    oversample: int = 2
    mag_r_min: float = 17.5
    mag_r_max: float = 23.0
    count_slope: float = 0.33
    z_min: float = 0.02
    z_max: float = 1.2
    r_half_max: float = 2.0
    p_image_des: float = 0.8
    p_image_hsc: float = 0.7
    p_spectrum_sdss: float = 0.7
    p_spectrum_desi: float = 0.7
    p_scalars: float = 0.9
    mask_rate: float = 0.002


@lru_cache(maxsize=None)
def _distances() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z grid, luminosity distance (Mpc), angular diameter distance (kpc), Planck18."""
    from astropy.cosmology import Planck18
    z = np.linspace(0.0, 1.6, 801)
    z[0] = 1e-4
    return z, Planck18.luminosity_distance(z).value, Planck18.angular_diameter_distance(z).value * 1e3


def distance_modulus(z: float) -> float:
    zg, dl, _ = _distances()
    return float(5 * np.log10(np.interp(z, zg, dl) * 1e5))       # D_L / 10 pc


def kpc_per_arcsec(z: float) -> float:
    zg, _, da = _distances()
    return float(np.interp(z, zg, da) / 206264.806)


def _draw_magnitude(cfg: SkyConfig, u: float) -> float:
    """Inverse CDF of p(m) ~ 10^(slope m) on [mag_r_min, mag_r_max]."""
    a = cfg.count_slope
    lo, hi = 10 ** (a * cfg.mag_r_min), 10 ** (a * cfg.mag_r_max)
    return float(np.log10(lo + u * (hi - lo)) / a)


def _draw_redshift(cfg: SkyConfig, mag_r: float, rng: np.random.Generator) -> float:
    z_med = 0.08 + 0.09 * (mag_r - 17.5)
    z0 = z_med / 1.412                       # median of z^2 exp(-(z/z0)^1.5) is 1.412 z0
    for _ in range(100):
        z = z0 * rng.gamma(2.0) ** (1 / 1.5)  # (z/z0)^1.5 ~ Gamma(2)
        if cfg.z_min <= z <= cfg.z_max:
            return float(z)
    return float(np.clip(z, cfg.z_min, cfg.z_max))


def _size_kpc(log_mstar: float, z: float, red: bool, rng: np.random.Generator) -> float:
    """Major-axis half-light radius, kpc: van der Wel et al. (2014) Table 1,
    R = A (M / 5e10)^alpha, log A interpolated in z (0.25, 0.75, 1.25)."""
    zk = (0.25, 0.75, 1.25)
    if red:
        log_a, alpha, scatter = np.interp(z, zk, (0.60, 0.42, 0.22)), 0.75, 0.10
    else:
        log_a, alpha, scatter = np.interp(z, zk, (0.86, 0.78, 0.70)), 0.22, 0.16
    log_r = log_a + alpha * (log_mstar - np.log10(5e10)) + scatter * rng.standard_normal()
    return float(max(10 ** log_r, 0.4))      # the relation flattens at low mass; floor 0.4 kpc


def _composite_half_light(bulge_frac: float, ratio: float) -> float:
    """Half-light radius of bulge (n=4, radius `ratio`) + disk (n=1, radius 1), r-band."""
    r = np.geomspace(0.01, 10.0, 400)
    enclosed = (bulge_frac * gammainc(8.0, sersic_b(4.0) * (r / ratio) ** 0.25)
                + (1 - bulge_frac) * gammainc(2.0, sersic_b(1.0) * r))
    return float(np.interp(0.5, enclosed, r))


def _emission_lines(z: float, t: float, log_ssfr: float, continuum: GalaxySED,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Observed line fluxes (J,) in the units of `continuum` x A, and their parameters."""
    ew_ha = 63.0 * 10 ** log_ssfr                                   # rest-frame A
    ebv = rng.uniform(0.0, 0.35)
    f_ha = ew_ha * (1 + z) * continuum.continuum(np.array([LINES["Halpha"] * (1 + z)]))[0]
    balmer = 2.86 * 10 ** (0.4 * ebv * (3.61 - 2.53))               # k(Hb) - k(Ha), Calzetti
    log_n2 = float(np.clip(-0.3 - 0.3 * (t - 1.0) + 0.1 * rng.standard_normal(), -1.4, -0.25))
    log_o3 = 0.61 / (log_n2 - 0.05) + 1.3 - 0.1 - abs(0.1 * rng.standard_normal())
    f_hb = f_ha / balmer
    f_oii = 0.56 * f_ha * 10 ** (-0.4 * ebv * (4.75 - 2.53))         # k(3727) - k(Ha)
    flux = dict(OII_3727=f_oii / 2.3, OII_3730=f_oii * 1.3 / 2.3, Hbeta=f_hb,
                OIII_5008=f_hb * 10 ** log_o3, Halpha=f_ha, NII_6585=f_ha * 10 ** log_n2)
    flux["OIII_4960"] = flux["OIII_5008"] / 2.98
    flux["NII_6550"] = flux["NII_6585"] / 3.05
    params = dict(ew_halpha=float(ew_ha), ebv_gas=float(ebv), log_nii_halpha=log_n2,
                  log_oiii_hbeta=float(log_o3))
    return np.array([flux[k] for k in LINE_NAMES]), params


def _galaxy(cfg: SkyConfig, rng: np.random.Generator) -> dict:
    """Draw one galaxy's physical parameters and its bulge and disk SEDs."""
    mag_r = _draw_magnitude(cfg, rng.random())
    z = _draw_redshift(cfg, mag_r, rng)
    dm = distance_modulus(z)
    m_abs_rough = mag_r - dm                                        # no K-correction: only ranks luminosity
    f_red = np.clip(0.3 + 0.15 * (-m_abs_rough - 20.0), 0.15, 0.85) * (1 - 0.3 * min(z, 1.0))
    red = bool(rng.random() < f_red)
    if red:
        t = rng.uniform(0.0, 0.5)
        bulge_frac = 1.0 if rng.random() < 0.5 else rng.uniform(0.5, 0.9)
        log_ssfr = -2.6 + 0.3 * rng.standard_normal()
    else:
        t = rng.uniform(0.8, 3.0)
        bulge_frac = 0.0 if rng.random() < 0.7 else rng.uniform(0.05, 0.4)
        log_ssfr = -0.9 + 0.3 * (t - 1.5) - 0.8 * bulge_frac + 0.2 * rng.standard_normal()
    log_ssfr += 1.8 * np.log10(1 + z)                              # Fumagalli et al. 2012
    # continuum: unit total r-band maggies, bulge_frac of it in the E-template bulge
    tm = template_maggies(z, PHOT_BANDS)                            # (K, B)
    w_bulge, w_disk = np.eye(4)[0], template_mix(t)
    w_bulge = w_bulge * bulge_frac / (w_bulge @ tm[:, _R])
    w_disk = w_disk * (1 - bulge_frac) / (w_disk @ tm[:, _R])
    line_flux, line_params = _emission_lines(z, t, log_ssfr, GalaxySED(z, w_bulge + w_disk), rng)
    disk = GalaxySED(z, w_disk, line_flux, sigma_v=rng.uniform(40.0, 150.0))
    bulge = GalaxySED(z, w_bulge)
    scale = 10 ** (-0.4 * mag_r) / (bulge + disk).maggies(PHOT_BANDS)[_R]
    bulge, disk = bulge.scaled(scale), disk.scaled(scale)
    # rest frame: absolute magnitude, colour, stellar mass (Bell et al. 2003, Chabrier)
    rest = (bulge.weights + disk.weights) @ template_maggies(0.0, PHOT_BANDS)
    abs_mag_r = -2.5 * np.log10(rest[_R]) - dm
    gr_rest = -2.5 * np.log10(rest[_G] / rest[_R])
    log_mstar = -0.4 * (abs_mag_r - 4.65) - 0.306 + 1.097 * gr_rest - 0.093
    # size and shape
    q = (float(np.clip(rng.normal(0.75, 0.15), 0.35, 1.0)) if bulge_frac >= 0.5 else
         float(np.sqrt(rng.random() ** 2 * (1 - 0.2 ** 2) + 0.2 ** 2)))   # random inclination, q0 = 0.2
    r_kpc = _size_kpc(log_mstar, z, red, rng) * np.sqrt(q)          # circularised
    r_half = float(np.clip(r_kpc / kpc_per_arcsec(z), 0.1, cfg.r_half_max))
    ratio = 0.35                                                    # bulge / disk radius
    if bulge_frac >= 1.0:
        r_bulge, r_disk = r_half, 0.0
    elif bulge_frac <= 0.0:
        r_bulge, r_disk = 0.0, r_half
    else:
        r_disk = r_half / _composite_half_light(bulge_frac, ratio)
        r_bulge = ratio * r_disk
    profile = Profile(r_bulge, r_disk, q, rng.uniform(0.0, np.pi))
    params = dict(z=z, mag_r=mag_r, abs_mag_r=float(abs_mag_r), gr_rest=float(gr_rest),
                  log_mstar=float(log_mstar), is_red=float(red), type=float(t),
                  bulge_frac=float(bulge_frac), log_ssfr=float(log_ssfr),
                  r_half=r_half, r_half_kpc=float(r_half * kpc_per_arcsec(z)),
                  r_bulge=float(r_bulge), r_disk=float(r_disk),
                  sersic_n=float(4 * bulge_frac + 1 * (1 - bulge_frac)), axis_ratio=q,
                  ellipticity=1 - q, position_angle=float(profile.pa), sigma_v=float(disk.sigma_v),
                  flux_halpha=float(disk.line_flux[LINE_NAMES.index("Halpha")]), **line_params)
    return dict(params=params, bulge=bulge, disk=disk, profile=profile)


def _catalog_flux_sigma(r_half: float) -> np.ndarray:
    """(4,) DES-like catalog flux errors (nanomaggies) for a galaxy of half-light radius
    r_half: sky sigma per pixel x sqrt(noise-equivalent area of the seeing-convolved galaxy)."""
    survey = IMAGING["des"]
    sigma_psf = np.array(survey.psf_fwhm) / 2.3548
    nea = 4 * np.pi * (sigma_psf ** 2 + (r_half / 1.1774) ** 2) / survey.pixel_scale ** 2
    return survey.sky_sigma() * np.sqrt(nea)


def simulate_one(cfg: SkyConfig, i: int) -> Sample:
    """Object i of the sky with config cfg (depends only on cfg.seed and i)."""
    rng = np.random.default_rng([cfg.seed, i])
    oid = f"sky{cfg.seed}-{i:07d}"
    u = rng.random(6)
    see_des, see_hsc = u[0] < cfg.p_image_des, u[1] < cfg.p_image_hsc
    if not (see_des or see_hsc):                                    # every object has an image
        see_des = u[0] * cfg.p_image_hsc < u[1] * cfg.p_image_des
        see_hsc = not see_des
    see = {"image.des": see_des, "image.hsc": see_hsc,
           "spectrum.sdss": u[2] < cfg.p_spectrum_sdss, "spectrum.desi": u[3] < cfg.p_spectrum_desi}
    g = _galaxy(cfg, rng)
    params, bulge, disk = g["params"], g["bulge"], g["disk"]
    sample = Sample(object_id=oid, params=params,
                    meta=dict(source="omnisky.sky", seed=cfg.seed, index=i,
                              ra=float(150.1 + 2 * (rng.random() - 0.5)),
                              dec=float(2.2 + 2 * (rng.random() - 0.5))))
    for name in ("des", "hsc"):
        survey = IMAGING[name]
        seeing = float(np.exp(0.1 * rng.standard_normal()))
        offset = (rng.random(2) - 0.5) * survey.pixel_scale
        if not see[f"image.{name}"]:
            continue
        units = 10 ** (0.4 * survey.zero_point)
        profile = Profile(**{**g["profile"].__dict__, "dx": offset[0], "dy": offset[1]})
        image, truth = observe_image(profile, bulge.maggies(survey.bands) * units,
                                     disk.maggies(survey.bands) * units, survey, cfg.image_size,
                                     rng, seeing_scale=seeing, oversample=cfg.oversample,
                                     mask_rate=cfg.mask_rate)
        sample.records[f"image.{name}"], sample.truth[f"image.{name}"] = image, truth
    total = bulge + disk
    for name in ("sdss", "desi"):
        spec = SPECTROGRAPHS[name]()
        seeing = spec.seeing_fwhm * float(np.exp(0.1 * rng.standard_normal()))
        if not see[f"spectrum.{name}"]:
            continue
        frac = fibre_fraction(params["bulge_frac"], params["r_bulge"], params["r_disk"],
                              params["r_half"], seeing, spec.fibre_diameter)
        record, truth = observe_spectrum(total, spec, frac, rng, mask_rate=cfg.mask_rate / 2)
        sample.records[f"spectrum.{name}"], sample.truth[f"spectrum.{name}"] = record, truth
        params[f"fibre_frac_{name}"] = frac
    # catalog scalars
    has = rng.random(3) < cfg.p_scalars
    sigma_z = 3e-5 * (1 + params["z"])
    z_obs = params["z"] + sigma_z * rng.standard_normal()
    flux_true = (bulge.maggies(DES_BANDS) + disk.maggies(DES_BANDS)) * 1e9     # nanomaggies
    flux_sigma = _catalog_flux_sigma(params["r_half"])
    flux_obs = flux_true + flux_sigma * rng.standard_normal(4)
    r_sigma = 0.1 * params["r_half"] + 0.03
    r_obs = max(params["r_half"] + r_sigma * rng.standard_normal(), 0.01)
    scalars = []
    if has[0]:
        scalars.append(("redshift", z_obs, sigma_z, params["z"]))
    if has[1]:
        scalars += [(f"flux_{b[-1]}", flux_obs[j], flux_sigma[j], flux_true[j])
                    for j, b in enumerate(DES_BANDS)]
    if has[2]:
        scalars.append(("r_half", r_obs, r_sigma, params["r_half"]))
    for name, value, sigma, true in scalars:
        sample.records[f"scalar.{name}"] = Scalar(name, float(value), float(sigma))
        sample.truth[f"scalar.{name}"] = np.float32(true)
    params.update({k: float(v) for k, v in params.items()})
    return sample.validate()


def simulate(cfg: SkyConfig, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    """Objects start .. stop-1 (stop defaults to cfg.n), each a validated Sample."""
    stop = cfg.n if stop is None else stop
    if not (0 <= start <= stop):
        raise ValueError(f"simulate: need 0 <= start <= stop, got start={start}, stop={stop}")
    for i in range(start, stop):
        yield simulate_one(cfg, i)


def warm_up() -> None:
    """Build the per-process tables (photometry, convolved templates, distances, noise
    curves) now, e.g. in a parent process before it forks its workers."""
    from .sed import _fine_continua, _phot_tables
    _phot_tables()
    _fine_continua()
    _distances()
    for make in SPECTROGRAPHS.values():
        make().sky_sigma
