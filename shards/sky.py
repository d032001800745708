"""The simulated sky: a deterministic stream of galaxies, stars and quasars seen by
several surveys.

    cfg = load_config(SkyConfig, "launch/sky/tiny.yaml", overrides={"n": 100})
    for sample in simulate(cfg, start=0, stop=10):     # shards.schema.Sample
        sample.records["image.des"], sample.truth["image.des"], sample.params["z"]
    cat = simulate_catalog(cfg, ("sdss.g", "sdss.r"), 0, 5000)   # photometry only, fast

Object i draws its physics from `np.random.default_rng([seed, i, 1])` and its
observation from `[seed, i, 2]`, so any slice of the sky can be simulated on its own
(parallel workers), one seed always gives the same objects, and the catalog path sees
exactly the objects that the full path renders. Each object is seen by a random subset
of: `image.des` (DECam g,r,i,z), `image.hsc` (HSC g,r,i,z,y), `spectrum.sdss`,
`spectrum.desi`, and the catalog scalars `scalar.redshift`, `scalar.flux_{g,r,i,z}`
(DES-like, nanomaggies), `scalar.r_half`.

The population: a class (galaxy, star, quasar) with the configured fractions; an
apparent DES r magnitude from the number counts of its class (galaxies dlog10 N / dm =
0.33, Metcalfe et al. 2000; stars 0.15 at high latitude; quasars 0.5); then the
physics of shards.galaxies (luminosity-function redshifts, bulge + disk, dust, lines),
shards.stars (Planck continuum, absorption lines) or shards.quasars (power law, broad
lines, Lyman-alpha forest). Stars and quasars are point sources (PSF-shaped images,
the point-source fibre fraction).

Sample.params (floats): class (0 galaxy, 1 star, 2 quasar; Sample.meta['class'] names
it), z, mag_r (DES r, AB), r_half (arcsec; 0 for point sources), fibre_frac_{sdss,desi}
(when observed); galaxies also abs_mag_r, gr_rest, log_mstar (Msun), is_red (0/1), type
(disk template coordinate 0 = E .. 3 = Im), bulge_frac (r-band B/T), log_ssfr (Gyr^-1),
ebv_disk (continuum E(B-V) over the templates'), ew_halpha (A, rest), flux_halpha
(1e-17 erg/s/cm^2, total), ebv_gas, log_nii_halpha, log_oiii_hbeta, sigma_v (km/s),
r_half_kpc, r_bulge, r_disk (arcsec), sersic_n (4 B/T + 1 (1 - B/T), nominal),
axis_ratio, ellipticity (1 - q), position_angle (rad); stars teff (K), rv (km/s),
ew_balmer (A); quasars alpha_nu, fwhm_broad (km/s), ew_<line> (A, rest).
Sample.truth: the noiseless flux of each image/spectrum (same shape as its flux) and the
true value of each scalar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .galaxies import draw_galaxy, redshift_table as galaxy_redshift_table
from .population import _distances, magnitude_from_counts
from .sed import CompositeSED
from .quasars import draw_quasar, redshift_table as quasar_redshift_table
from .defects import PixelDefects
from .real_morphology import observe_morphology
from .render import IMAGING, Profile, observe_image
from .schema import Sample, Scalar
from .spectrograph import SPECTROGRAPHS, fibre_fraction, observe_spectrum
from .stars import draw_star

DES_BANDS = IMAGING["des"].bands
HSC_BANDS = IMAGING["hsc"].bands
PHOT_BANDS = DES_BANDS + HSC_BANDS
CLASSES = ("galaxy", "star", "qso")


@dataclass
class SkyConfig:
    """n objects from seed; images are image_size x image_size pixels in both surveys.
    star_fraction, qso_fraction: the share of stars and quasars (the rest are galaxies);
    *_count_slope: dlog10 N / dm of each class between mag_r_min and mag_r_max (DES r);
    p_*: the probability that a survey sees an object (every object gets >= 1 image);
    p_scalars: the probability of each catalog scalar group (redshift, fluxes, size);
    mask_rate, defects: isolated bad pixels, and the rates of cosmic rays, bad columns and
    saturated stars (shards.defects; masked pixels per kind in Sample.meta['defects']);
    morphology: galaxy images from Sersic profiles ('sersic') or real HST COSMOS stamps
    ('hst': their shapes, the object's fluxes; 'hst_catalog': as they are, at their
    catalog HSC magnitudes), see shards.real_morphology."""
    n: int = 2000
    seed: int = 0
    image_size: int = 32
    oversample: int = 2
    mag_r_min: float = 17.5
    mag_r_max: float = 23.0
    count_slope: float = 0.33
    star_fraction: float = 0.1
    qso_fraction: float = 0.03
    star_count_slope: float = 0.15
    qso_count_slope: float = 0.5
    z_min: float = 0.02
    z_max: float = 1.2
    qso_z_max: float = 3.5
    r_half_max: float = 2.0
    p_image_des: float = 0.8
    p_image_hsc: float = 0.7
    p_spectrum_sdss: float = 0.7
    p_spectrum_desi: float = 0.7
    p_scalars: float = 0.9
    mask_rate: float = 0.002
    defects: PixelDefects = field(default_factory=PixelDefects)
    morphology: str = "sersic"

    def __post_init__(self):
        if not (0 <= self.star_fraction and 0 <= self.qso_fraction and self.star_fraction + self.qso_fraction <= 1):
            raise ValueError(f"SkyConfig: star_fraction={self.star_fraction} and qso_fraction="
                             f"{self.qso_fraction} must be >= 0 and sum to <= 1")
        if not (0 < self.z_min < self.z_max <= 1.6):
            raise ValueError(f"SkyConfig: need 0 < z_min < z_max <= 1.6, got {self.z_min}, {self.z_max}")
        if not (0.1 < self.qso_z_max <= 5.0):
            raise ValueError(f"SkyConfig: qso_z_max={self.qso_z_max} must lie in (0.1, 5]")


def draw_object(cfg: SkyConfig, i: int) -> dict:
    """Object i's physics (depends only on cfg.seed and i): {'params', 'class', 'profile',
    'components': (bulge-or-point SED, disk SED or None), 'total': the summed SED}."""
    rng = np.random.default_rng([cfg.seed, i, 1])
    u = rng.random()
    cls = "star" if u < cfg.star_fraction else "qso" if u < cfg.star_fraction + cfg.qso_fraction else "galaxy"
    slope = {"galaxy": cfg.count_slope, "star": cfg.star_count_slope, "qso": cfg.qso_count_slope}[cls]
    mag_r = magnitude_from_counts(rng.random(), slope, cfg.mag_r_min, cfg.mag_r_max)
    if cls == "galaxy":
        g = draw_galaxy(mag_r, cfg.z_min, cfg.z_max, cfg.r_half_max, rng)
        out = dict(params=g["params"], profile=g["profile"], components=(g["bulge"], g["disk"]),
                   total=CompositeSED((g["bulge"], g["disk"])))
    else:
        p = draw_star(mag_r, rng) if cls == "star" else draw_quasar(mag_r, cfg.qso_z_max, rng)
        out = dict(params=p["params"], profile=Profile(0.0, 0.0, 1.0, 0.0),
                   components=(p["sed"], None), total=p["sed"])
    out["params"] = {"class": float(CLASSES.index(cls)), **out["params"]}
    out["class"] = cls
    return out


def simulate_catalog(cfg: SkyConfig, bands: Sequence[str], start: int = 0, stop: int | None = None
                     ) -> dict[str, np.ndarray]:
    """Noiseless photometry of objects start .. stop-1 without rendering anything:
    {'flux_<band>': nanomaggies (N,), every params key (N,), NaN where a class lacks it}."""
    stop = cfg.n if stop is None else stop
    rows = [draw_object(cfg, i) for i in range(start, stop)]
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    out = {k: np.array([r["params"].get(k, np.nan) for r in rows], float) for k in keys}
    flux = np.array([r["total"].maggies(tuple(bands)) for r in rows]).reshape(len(rows), len(bands)) * 1e9
    out.update({f"flux_{b}": flux[:, j] for j, b in enumerate(bands)})
    return out


def _catalog_flux_sigma(r_half: float) -> np.ndarray:
    """(4,) DES-like catalog flux errors (nanomaggies) for a galaxy of half-light radius
    r_half: sky sigma per pixel x sqrt(noise-equivalent area of the seeing-convolved galaxy)."""
    survey = IMAGING["des"]
    sigma_psf = np.array(survey.psf_fwhm) / 2.3548
    nea = 4 * np.pi * (sigma_psf ** 2 + (r_half / 1.1774) ** 2) / survey.pixel_scale ** 2
    return survey.sky_sigma() * np.sqrt(nea)


def _maggies(sed, names: tuple[str, ...]) -> np.ndarray:
    return np.zeros(len(names)) if sed is None else sed.maggies(names)


def simulate_one(cfg: SkyConfig, i: int) -> Sample:
    """Object i of the sky with config cfg (depends only on cfg.seed and i)."""
    obj = draw_object(cfg, i)
    params = obj["params"]
    bulge, disk = obj["components"]
    rng = np.random.default_rng([cfg.seed, i, 2])
    oid = f"sky{cfg.seed}-{i:07d}"
    u = rng.random(6)
    see_des, see_hsc = u[0] < cfg.p_image_des, u[1] < cfg.p_image_hsc
    if not (see_des or see_hsc):                                    # every object has an image
        see_des = u[0] * cfg.p_image_hsc < u[1] * cfg.p_image_des
        see_hsc = not see_des
    see = {"image.des": see_des, "image.hsc": see_hsc,
           "spectrum.sdss": u[2] < cfg.p_spectrum_sdss, "spectrum.desi": u[3] < cfg.p_spectrum_desi}
    sample = Sample(object_id=oid, params=params,
                    meta=dict(source="omnisky.sky", seed=cfg.seed, index=i, **{"class": obj["class"]},
                              ra=float(150.1 + 2 * (rng.random() - 0.5)),
                              dec=float(2.2 + 2 * (rng.random() - 0.5))))
    for name in ("des", "hsc"):
        survey = IMAGING[name]
        seeing = float(np.exp(0.1 * rng.standard_normal()))
        offset = (rng.random(2) - 0.5) * survey.pixel_scale
        if not see[f"image.{name}"]:
            continue
        units = 10 ** (0.4 * survey.zero_point)
        counts = sample.meta.setdefault("defects", {}).setdefault(f"image.{name}", {})
        if cfg.morphology != "sersic" and obj["class"] == "galaxy":     # real HST morphologies
            flux = (bulge.maggies(survey.bands) + _maggies(disk, survey.bands)) * units
            image, truth = observe_morphology(cfg.morphology, cfg.seed, i, params, flux, survey,
                                              cfg.image_size, rng, seeing, tuple(offset),
                                              cfg.mask_rate, cfg.defects, counts)
            sample.records[f"image.{name}"], sample.truth[f"image.{name}"] = image, truth
            continue
        profile = Profile(**{**obj["profile"].__dict__, "dx": offset[0], "dy": offset[1]})
        image, truth = observe_image(profile, bulge.maggies(survey.bands) * units,
                                     _maggies(disk, survey.bands) * units, survey, cfg.image_size,
                                     rng, seeing_scale=seeing, oversample=cfg.oversample,
                                     mask_rate=cfg.mask_rate, defects=cfg.defects, defect_counts=counts)
        sample.records[f"image.{name}"], sample.truth[f"image.{name}"] = image, truth
    total = obj["total"]
    for name in ("sdss", "desi"):
        spec = SPECTROGRAPHS[name]()
        seeing = spec.seeing_fwhm * float(np.exp(0.1 * rng.standard_normal()))
        if not see[f"spectrum.{name}"]:
            continue
        frac = fibre_fraction(params.get("bulge_frac", 0.0), params.get("r_bulge", 0.0),
                              params.get("r_disk", 0.0), params["r_half"], seeing, spec.fibre_diameter)
        record, truth = observe_spectrum(total, spec, frac, rng, mask_rate=cfg.mask_rate / 2)
        sample.records[f"spectrum.{name}"], sample.truth[f"spectrum.{name}"] = record, truth
        params[f"fibre_frac_{name}"] = frac
    # catalog scalars
    has = rng.random(3) < cfg.p_scalars
    sigma_z = 3e-5 * (1 + params["z"])
    z_obs = params["z"] + sigma_z * rng.standard_normal()
    flux_true = total.maggies(DES_BANDS) * 1e9                                 # nanomaggies
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


def warm_up(cfg: SkyConfig | None = None) -> None:
    """Build the per-process tables (photometry, convolved templates, distances, noise
    curves, and with cfg the redshift tables) now, e.g. in a parent process before it
    forks its workers."""
    from .sed import _fine_continua, _phot_tables
    _phot_tables()
    _fine_continua()
    _distances()
    if cfg is not None:
        galaxy_redshift_table(cfg.z_min, cfg.z_max)
        quasar_redshift_table(cfg.qso_z_max)
    for make in SPECTROGRAPHS.values():
        make().sky_sigma
