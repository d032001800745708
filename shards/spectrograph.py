"""Fibre spectrographs: SDSS-like and DESI-like wavelength grids, resolution, noise.

    spectrum, truth = observe_spectrum(sed, SPECTROGRAPHS["desi"], fibre_fraction=0.4, rng=rng)

The noiseless spectrum is the galaxy SED convolved with the instrument's Gaussian line
spread (see `sed.GalaxySED.spectrum`), times the fraction of the galaxy's light that
enters the fibre. Per-pixel noise: a sky-limited sigma(lambda) read off the real data in
../shared/data (SDSS: sdss_spectra/, three spectra; DESI: desi*/coadd-*, BGS/dark
coadds), extra variance at the strong night-sky lines, and the source's own Poisson term.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy.special import gammainc

from .render import sersic_b
from .schema import Spectrum
from .sed import FWHM_PER_SIGMA, GalaxySED

# Strong night-sky emission lines (vacuum A; O I, Na D, OH bands) and their excess sigma,
# in units of the local sky sigma: subtraction residuals make these pixels noisier.
SKY_LINES = np.array([5578.9, 5891.6, 5897.6, 6302.0, 6365.5, 6865.8, 7278.4, 7343.0, 7823.7,
                      7915.9, 7995.5, 8347.0, 8401.5, 8432.5, 8829.6, 8888.3, 8922.2, 8960.6,
                      9378.5, 9442.4, 9479.4, 9522.1, 9794.7])
SKY_LINE_EXCESS = np.array([4.0, 1.5, 1.5, 3.0, 2.0] + [2.0] * (len(SKY_LINES) - 5))


@dataclass(frozen=True, eq=False)
class Spectrograph:
    """One fibre spectrograph.

    wavelength:     (L,) pixel centres, vacuum Angstrom.
    resolution:     (L,) resolving power lambda / FWHM.
    fibre_diameter: arcsec.
    seeing_fwhm:    median seeing at the fibre, arcsec.
    sigma_knots:    ((wavelength A, per-pixel sky sigma in 1e-17 erg/s/cm^2/A), ...).
    source_var:     variance added per unit of (noiseless) flux, 1e-17 erg/s/cm^2/A.
    """
    name: str
    wavelength: np.ndarray
    resolution: np.ndarray
    fibre_diameter: float
    seeing_fwhm: float
    sigma_knots: tuple[tuple[float, float], ...]
    source_var: float

    @cached_property
    def sky_sigma(self) -> np.ndarray:
        """(L,) per-pixel sky sigma, with the night-sky line residuals."""
        knots = np.array(self.sigma_knots)
        base = np.interp(self.wavelength, knots[:, 0], knots[:, 1])
        width = SKY_LINES / (FWHM_PER_SIGMA * np.interp(SKY_LINES, self.wavelength, self.resolution))
        bump = ((SKY_LINE_EXCESS[:, None] ** 2) * np.exp(
            -0.5 * ((self.wavelength[None, :] - SKY_LINES[:, None]) / width[:, None]) ** 2)).sum(0)
        return base * np.sqrt(1 + bump)


@lru_cache(maxsize=None)
def sdss() -> Spectrograph:
    """SDSS legacy: log-linear grid 3800-9200 A, d(log10 lambda) = 1e-4 (3841 pixels),
    R rising ~1850 -> 2200 blue to red, 3" fibres, 1.5" seeing. The sigma knots are the
    median 1/sqrt(ivar) of the three real SDSS spectra in ../shared/data/sdss_spectra
    (1.6 at 4000 A, 1.2 at 5500, 0.85 at 6500, 1.1 at 8000, 1.5 at 8800); the source term
    matches their growth of variance with flux (~0.03 per unit flux)."""
    loglam = np.round(np.log10(3800.0) + 1e-4 * np.arange(3841), 6)
    wavelength = 10 ** loglam
    resolution = np.interp(wavelength, [3800.0, 9200.0], [1850.0, 2200.0])
    knots = ((3800.0, 2.2), (4000.0, 1.6), (5500.0, 1.2), (6500.0, 0.85), (8000.0, 1.1),
             (8800.0, 1.5), (9200.0, 2.0))
    return Spectrograph("sdss", wavelength, resolution, 3.0, 1.5, knots, 0.03)


@lru_cache(maxsize=None)
def desi() -> Spectrograph:
    """DESI: linear 0.8 A pixels 3600-9824 A (7781 pixels), R rising 2000 -> 5000 over the
    b (2000-3200), r (3200-4100) and z (4100-5000) arms, 1.52" fibres, 1.1" seeing. The
    sigma knots follow the real BGS/dark coadds in ../shared/data/desi*: median per-pixel
    sigma ~0.4 (b), ~0.2 (r), ~0.15 (z) in 1e-17 erg/s/cm^2/A."""
    wavelength = np.round(3600.0 + 0.8 * np.arange(7781), 3)
    resolution = np.interp(wavelength, [3600.0, 5800.0, 5800.01, 7620.0, 7620.01, 9824.0],
                           [2000.0, 3200.0, 3200.0, 4100.0, 4100.0, 5000.0])
    knots = ((3600.0, 1.2), (3800.0, 0.6), (4200.0, 0.42), (5700.0, 0.38), (5800.0, 0.25),
             (7500.0, 0.2), (7700.0, 0.16), (9300.0, 0.17), (9824.0, 0.35))
    return Spectrograph("desi", wavelength, resolution, 1.52, 1.1, knots, 0.01)


SPECTROGRAPHS = {"sdss": sdss, "desi": desi}


def fibre_fraction(bulge_frac: float, r_bulge: float, r_disk: float, r_half: float,
                   seeing_fwhm: float, diameter: float) -> float:
    """Fraction of a galaxy's light inside a centred fibre of `diameter` arcsec, after
    Gaussian seeing. Approximation: the seeing scales the profile by
    s = sqrt(1 + (FWHM / 2)^2 / r_half^2) (half-light radii add in quadrature; a Gaussian's
    is FWHM / 2), and the enclosed light blends the scaled bulge + disk profile with a
    Gaussian of that half-light radius, weighted by how resolved the galaxy is."""
    radius = diameter / 2
    r_psf = seeing_fwhm / 2
    r_tot = np.hypot(r_half, r_psf)
    s = r_tot / max(r_half, 1e-6)
    enclosed = 0.0
    for frac, n, r_e in ((bulge_frac, 4.0, r_bulge), (1 - bulge_frac, 1.0, r_disk)):
        if frac > 0 and r_e > 0:
            enclosed += frac * gammainc(2 * n, sersic_b(n) * (radius / (s * r_e)) ** (1 / n))
    sigma = r_tot / 1.1774                                          # Gaussian of half-light r_tot
    gauss = 1 - np.exp(-0.5 * (radius / sigma) ** 2)
    w = (r_half / r_tot) ** 2
    return float(w * enclosed + (1 - w) * gauss)


def observe_spectrum(sed: GalaxySED, spec: Spectrograph, fibre_frac: float,
                     rng: np.random.Generator, mask_rate: float = 0.001) -> tuple[Spectrum, np.ndarray]:
    """A noisy `Spectrum` of the light of `sed` entering the fibre, and its noiseless
    truth (L,) float32, both in 1e-17 erg/s/cm^2/A."""
    truth = sed.spectrum(spec.wavelength, spec.resolution) * fibre_frac
    var = spec.sky_sigma ** 2 + spec.source_var * np.clip(truth, 0, None)
    flux = truth + rng.standard_normal(truth.shape) * np.sqrt(var)
    mask = rng.random(truth.shape) < mask_rate
    flux = np.where(mask, 0.0, flux).astype(np.float32)
    ivar = np.where(mask, 0.0, 1.0 / var).astype(np.float32)
    record = Spectrum(flux=flux, ivar=ivar, mask=mask, wavelength=spec.wavelength.astype(np.float64),
                      instrument=spec.name, resolution=spec.resolution.astype(np.float32))
    return record, truth.astype(np.float32)
