"""Galaxy images: bulge + disk Sersic profiles, PSF convolution by FFT, pixel noise.

    survey = IMAGING["des"]
    image, truth = observe_image(profile, flux_bulge, flux_disk, survey, size=32, rng=rng)

A profile is rendered analytically on a grid oversampled `oversample` times and padded
by `pad` pixels (so the PSF does not wrap light into the stamp), multiplied by each
band's flux per component (bulge and disk have their own colours), convolved with each
band's coadd PSF (`shards.psf`: one Moffat per exposure, analytic transfer function) and
summed over sub-pixels (pixel integration), both in Fourier space, then cropped.

Observation (`observe_scene`, shared by every renderer, e.g. `shards.real_morphology`):
a coadd PSF per band drawn from the survey's seeing distribution (its effective FWHM is
the record's `psf_fwhm`); a number of exposures per band drawn around the survey's
nominal one, which sets the depth of this cut-out (sky sigma ~ 1 / sqrt(exposures));
noise: sky-limited per-pixel sigma from the survey's 5-sigma depth plus the source's own
Poisson term; bad pixels (`shards.defects`: isolated pixels, cosmic-ray tracks, bad
columns, saturated stars with bleed trails) flagged with mask True, flux 0 and ivar 0.
Flux units: the survey's zero point (nanomaggies at 22.5 for DES, HSC counts at 27.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from einops import rearrange
from scipy.fft import fft2, ifft2, next_fast_len
from scipy.special import gammainc, gammaincinv

from . import bands as band_registry
from .defects import PixelDefects, draw_defects
from .psf import CoaddPSF, draw_coadd_psf, moffat_otf  # noqa: F401  (moffat_otf: public here too)
from .schema import Image


@dataclass(frozen=True)
class ImagingSurvey:
    """One imaging survey.

    psf_fwhm:   median PSF FWHM per band, arcsec.
    depth_5sig: 5-sigma point-source depth per band, AB mag (sets the sky sigma per pixel).
    sky_mag:    sky brightness per band, AB mag/arcsec^2 (sets the source Poisson term).
    moffat_beta: Moffat beta of the PSF.
    n_exposures: nominal number of exposures per band in the coadd (the depth above is
                 the depth at this number).
    seeing_scatter: lognormal sigma (natural log) of one exposure's FWHM about the median.
    """
    name: str
    bands: tuple[str, ...]
    pixel_scale: float
    psf_fwhm: tuple[float, ...]
    depth_5sig: tuple[float, ...]
    sky_mag: tuple[float, ...]
    moffat_beta: float = 3.5
    n_exposures: tuple[int, ...] = (1,)
    seeing_scatter: float = 0.0

    def __post_init__(self):
        n = len(self.bands)
        for name in ("psf_fwhm", "depth_5sig", "sky_mag", "n_exposures"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ImagingSurvey {self.name!r}: {name} has {len(getattr(self, name))} "
                                 f"values for {n} bands")

    @property
    def zero_point(self) -> float:
        return band_registry.get(self.bands[0]).zero_point

    def sky_sigma(self) -> np.ndarray:
        """(C,) per-pixel sky sigma in survey flux units, from the 5-sigma point-source
        depth at the median PSF: sigma_flux = sigma_pix sqrt(NEA), NEA = 4 pi sigma_psf^2."""
        f5 = 10 ** (-0.4 * (np.array(self.depth_5sig) - self.zero_point))
        sigma_psf_px = np.array(self.psf_fwhm) / 2.3548 / self.pixel_scale
        return f5 / 5 / np.sqrt(4 * np.pi * sigma_psf_px ** 2)

    def sky_level(self) -> np.ndarray:
        """(C,) sky flux per pixel in survey units."""
        return 10 ** (-0.4 * (np.array(self.sky_mag) - self.zero_point)) * self.pixel_scale ** 2


# DES-like: DECam griz, 0.262"/px (Legacy Surveys), PSF medians of DES DR2 (Abbott et
# al. 2021). Depths: DES DR2 10-sigma 1.95" aperture depths + 0.75 mag -> 5 sigma;
# this gives sigma_pix ~ 0.003 nanomaggies in r, close to the 0.0025 of the real DR9
# cut-out in the DES area (../shared/data/decals). Sky: DES values used by lenstronomy.
# HSC-like: PDR3 Wide PSF medians; depths chosen to reproduce the per-pixel variances
# quoted for HSC coadds (g 1.4e-3 ... y 8.5e-2 counts^2 at zero point 27, i.e. r ~26.3
# at 5 sigma); sky brightness: not found for HSC, Maunakea dark-sky values assumed.
# Exposures: DES wide stacks ~8 90 s exposures per band (10 tilings planned, DR2 median
# a little below); HSC Wide 4 x 150 s in g, r and 6 x 200 s in i, z, y (survey design).
# Single-exposure seeing scatter: DES r-band FWHM 10-90% ~0.8-1.3" about 0.95" (sigma_ln
# ~0.18); HSC i-band quartiles ~0.5-0.7" about 0.6" (sigma_ln ~0.2).
IMAGING = {
    "des": ImagingSurvey("des", ("des.g", "des.r", "des.i", "des.z"), 0.262,
                         (1.11, 0.95, 0.88, 0.83), (25.45, 25.15, 24.55, 23.85),
                         (22.01, 21.15, 19.89, 18.72), moffat_beta=3.5,
                         n_exposures=(8, 8, 8, 8), seeing_scatter=0.18),
    "hsc": ImagingSurvey("hsc", ("hsc.g", "hsc.r", "hsc.i", "hsc.z", "hsc.y"), 0.168,
                         (0.80, 0.75, 0.62, 0.70, 0.69), (26.55, 26.35, 25.85, 25.15, 24.35),
                         (22.0, 21.2, 20.3, 19.2, 18.3), moffat_beta=3.0,
                         n_exposures=(4, 4, 6, 6, 6), seeing_scatter=0.2),
}


@lru_cache(maxsize=None)
def sersic_b(n: float) -> float:
    """b_n such that r_e encloses half the light: gammainc(2n, b_n) = 1/2."""
    return float(gammaincinv(2 * n, 0.5))


def sersic_grid(n: float, r_e: float, q: float, pa: float, x: np.ndarray, y: np.ndarray,
                half_width: float, softening: float = 0.0) -> np.ndarray:
    """Sersic profile sampled at (x, y) arcsec (sub-pixel centres), as flux per sub-pixel
    for unit total flux. r_e is the circularised half-light radius, q = b/a, pa the
    position angle (radians, from +x towards +y). The samples are normalised to sum to
    the analytic fraction of light within `half_width` arcsec of the centre, so a cusp
    sampled coarsely or light beyond the grid does not change the total flux.
    `softening` (arcsec^2) is added to r^2: with an odd oversampling a sub-pixel centre
    falls on the centre, and the n = 4 cusp sampled there would hold far too much light;
    step^2 / 12 (the mean r^2 over a sub-pixel along one axis) tames it."""
    c, s = np.cos(pa), np.sin(pa)
    xp, yp = c * x + s * y, -s * x + c * y
    r = np.sqrt(q * xp ** 2 + yp ** 2 / q + softening)       # circularised elliptical radius
    b = sersic_b(n)
    prof = np.exp(-b * (r / r_e) ** (1 / n))
    inside = gammainc(2 * n, b * (half_width / r_e) ** (1 / n))
    return prof * (inside / prof.sum())


@lru_cache(maxsize=None)
def _fourier_grid(n_grid: int, oversample: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """|k| (N, N) in cycles/arcsec on the fft2 grid, and the transfer function (N, N) of
    summing `oversample` x `oversample` sub-pixels into one pixel."""
    freq = np.fft.fftfreq(n_grid, d=step)
    k = np.hypot(freq[:, None], freq[None, :])
    idx = np.arange(n_grid)
    box = np.exp(2j * np.pi * np.outer(idx, np.arange(oversample)) / n_grid).sum(1)   # (N,)
    return k.astype(np.float32), (box[:, None] * box[None, :]).astype(np.complex64)


@dataclass
class Profile:
    """Bulge (n = 4) + disk (n = 1) light profile; r_* are circularised half-light radii
    in arcsec; (dx, dy) the offset of the centre from the stamp centre in arcsec."""
    r_bulge: float
    r_disk: float
    q: float
    pa: float
    dx: float = 0.0
    dy: float = 0.0


def as_psf(psf: CoaddPSF | np.ndarray, survey: ImagingSurvey) -> CoaddPSF:
    """A CoaddPSF as given, or one Moffat per band of FWHM `psf` (C,) arcsec."""
    return psf if isinstance(psf, CoaddPSF) else CoaddPSF.single(psf, survey.moffat_beta)


def render(profile: Profile, flux_bulge: np.ndarray, flux_disk: np.ndarray,
           psf: CoaddPSF | np.ndarray, survey: ImagingSurvey, size: int, oversample: int = 2,
           pad: int = 6) -> np.ndarray:
    """Noiseless (C, size, size) image in survey flux units per pixel. flux_* are the (C,)
    total fluxes of the components; psf a CoaddPSF or (C,) Moffat FWHMs (arcsec); the
    galaxy centre is the centre of pixel (size // 2, size // 2) plus the profile's offset.

    The PSF convolution and the sub-pixel sums are done in Fourier space: the spectrum
    of the oversampled model times the PSF and pixel-box transfer functions is folded
    onto the native-pixel frequency grid, so the inverse FFT runs at native size."""
    n_pix = next_fast_len(size + 2 * pad)
    n_grid = n_pix * oversample
    step = survey.pixel_scale / oversample
    lo = (n_pix - size) // 2
    centre = (lo + size // 2 + 0.5) * survey.pixel_scale                  # arcsec from the grid corner
    coord = (np.arange(n_grid) + 0.5) * step - centre                     # (N,) sub-pixel centres
    x = coord[None, :] - profile.dx                                        # (1, N)
    y = coord[:, None] - profile.dy                                        # (N, 1)
    psf = as_psf(psf, survey)
    spectrum = np.zeros((psf.n_bands, n_grid, n_grid), dtype=np.complex64)    # (C, N, N)
    for n, r_e, flux in ((4.0, profile.r_bulge, flux_bulge), (1.0, profile.r_disk, flux_disk)):
        if r_e > 0 and np.any(flux != 0):
            comp = sersic_grid(n, r_e, profile.q, profile.pa, x, y, n_grid * step / 2,
                               softening=step ** 2 / 12 if oversample % 2 else 0.0)   # (N, N)
            spectrum += np.asarray(flux, np.float32)[:, None, None] * fft2(comp.astype(np.float32))[None]
        elif np.any(flux != 0):        # r_e = 0: a point source (star, quasar), a phase ramp
            f = np.fft.fftfreq(n_grid)                                     # cycles per sub-pixel
            px, py = (centre + profile.dx) / step - 0.5, (centre + profile.dy) / step - 0.5
            comp_ft = np.exp(-2j * np.pi * (f[None, :] * px + f[:, None] * py)).astype(np.complex64)
            spectrum += np.asarray(flux, np.float32)[:, None, None] * comp_ft[None]
    k, box = _fourier_grid(n_grid, oversample, step)
    spectrum *= psf.otf(k) * box[None]
    # fold the aliases: index k = m * n_pix + k' on each axis
    folded = rearrange(spectrum, "c (m1 k1) (m2 k2) -> c k1 k2 (m1 m2)",
                       m1=oversample, m2=oversample).sum(-1)              # (C, P, P)
    pixels = ifft2(folded).real / oversample ** 2                         # (C, P, P) pixel sums
    return pixels[:, lo:lo + size, lo:lo + size]


def add_noise(truth: np.ndarray, survey: ImagingSurvey, rng: np.random.Generator,
              mask: np.ndarray, depth_factor: np.ndarray | float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flux, ivar, mask) of a noisy observation of the noiseless (C, H, W) `truth`.
    Variance = (sky sigma x depth_factor)^2 (1 + max(truth, 0) / sky level per pixel),
    depth_factor (C,) scaling the survey's median sky sigma; pixels under `mask`
    (C, H, W) get flux 0 and ivar 0."""
    sigma = (survey.sky_sigma() * np.asarray(depth_factor))[:, None, None]  # (C, 1, 1)
    sky = survey.sky_level()[:, None, None]
    var = sigma ** 2 * (1 + np.clip(truth, 0, None) / sky)                # (C, H, W)
    flux = truth + rng.standard_normal(truth.shape) * np.sqrt(var)
    ivar = np.where(mask, 0.0, 1.0 / var)
    flux = np.where(mask, 0.0, flux)
    return flux.astype(np.float32), ivar.astype(np.float32), mask


def observe_scene(draw_truth: Callable[[CoaddPSF], np.ndarray], survey: ImagingSurvey, size: int,
                  rng: np.random.Generator, seeing_scale: float = 1.0, mask_rate: float = 0.002,
                  defects: PixelDefects | None = None, defect_counts: dict | None = None
                  ) -> tuple[Image, np.ndarray]:
    """A noisy `Image` record and its noiseless truth (C, size, size), float32, of the scene
    that `draw_truth(psf)` renders through a coadd PSF. seeing_scale multiplies the
    survey's median FWHM (the seeing of this part of the sky, shared by the bands); each
    band stacks a Poisson number (>= 1) of exposures about the survey's nominal count,
    each with its own FWHM, and its sky sigma grows as sqrt(nominal / exposures).
    `defect_counts`, if given, is filled with the masked pixels of each kind."""
    nominal = np.asarray(survey.n_exposures)
    n_exp = np.maximum(rng.poisson(nominal), 1)                           # (C,)
    psf = draw_coadd_psf(np.asarray(survey.psf_fwhm), n_exp, survey.seeing_scatter,
                         survey.moffat_beta, rng, seeing_scale)
    truth = draw_truth(psf)
    mask, counts = draw_defects(truth.shape, defects or PixelDefects(), rng, mask_rate)
    flux, ivar, mask = add_noise(truth, survey, rng, mask, np.sqrt(nominal / n_exp))
    if defect_counts is not None:
        defect_counts.update(counts)
    image = Image(flux=flux, ivar=ivar, mask=mask, bands=survey.bands, pixel_scale=survey.pixel_scale,
                  survey=survey.name, zero_point=survey.zero_point, psf_fwhm=psf.fwhm_effective())
    return image, truth.astype(np.float32)


def observe_image(profile: Profile, flux_bulge: np.ndarray, flux_disk: np.ndarray,
                  survey: ImagingSurvey, size: int, rng: np.random.Generator,
                  seeing_scale: float = 1.0, oversample: int = 2, mask_rate: float = 0.002,
                  defects: PixelDefects | None = None, defect_counts: dict | None = None
                  ) -> tuple[Image, np.ndarray]:
    """A noisy `Image` of a bulge + disk galaxy and its noiseless truth (`observe_scene`)."""
    return observe_scene(lambda psf: render(profile, flux_bulge, flux_disk, psf, survey, size, oversample),
                         survey, size, rng, seeing_scale, mask_rate, defects, defect_counts)
