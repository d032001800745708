"""Fibre spectrographs: SDSS-like and DESI-like wavelength grids, resolution, throughput,
sky and noise.

    spectrum, truth = observe_spectrum(sed, SPECTROGRAPHS["desi"](), fibre_frac=0.4, rng=rng)

The noiseless spectrum is the galaxy SED convolved with the instrument's Gaussian line
spread (see `sed.GalaxySED.spectrum`), times the fraction of the galaxy's light that
enters the fibre. The observed one adds:
- noise: a sky-limited sigma(lambda) read off the real data in ../shared/data (SDSS:
  sdss_spectra/, three spectra; DESI: desi*/coadd-*, BGS/dark coadds), raised at the
  night-sky lines (`shards.sky_lines`, measured from the DESI coadds) by their photon
  noise, plus the source's own Poisson term, which grows as 1 / throughput where the
  instrument collects fewer photons per unit flux;
- sky-subtraction residuals: the sky lines' flux (continuum of the dark sky through the
  fibre x each line's equivalent width, at the instrument's resolution) is subtracted
  with a per-line scale error (`sky_residual_scale`, ~1%) and a wavelength error common to
  the spectrum (`sky_residual_shift`, A), leaving scaled-line and derivative-shaped
  residuals at the sky lines and nothing between them. As pipelines with a sky-model
  error term do (DESI), their expected variance is part of ivar.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy.special import gammainc

from .render import sersic_b
from .schema import Spectrum
from .sed import FWHM_PER_SIGMA, GalaxySED
from .sky_lines import SKY_LINES

# Dark-sky continuum between the lines, AB mag/arcsec^2 (assumed: about 0.3-1 mag fainter
# than the broad-band dark-sky brightness of SURVEYS.md, whose red bands are mostly OH).
SKY_CONTINUUM_MAG = ((3600.0, 22.8), (4500.0, 22.5), (5500.0, 22.0), (6500.0, 21.8),
                     (8000.0, 21.6), (9800.0, 21.4))
# Each sky line's profile is cut at this many sigma; beyond it the line puts nothing.
LINE_HALF_WIDTH_SIGMA = 6.0


@dataclass(frozen=True, eq=False)
class Spectrograph:
    """One fibre spectrograph.

    wavelength:     (L,) pixel centres, vacuum Angstrom.
    resolution:     (L,) resolving power lambda / FWHM.
    fibre_diameter: arcsec.
    seeing_fwhm:    median seeing at the fibre, arcsec.
    sigma_knots:    ((wavelength A, per-pixel sky sigma in 1e-17 erg/s/cm^2/A), ...),
                    between the sky lines.
    source_var:     variance added per unit of (noiseless) flux where the throughput peaks,
                    1e-17 erg/s/cm^2/A.
    throughput_knots: ((wavelength A, total throughput: atmosphere, telescope, fibre,
                    spectrograph, detector), ...).
    sky_residual_scale: rms fractional error of the subtracted flux of each sky line.
    sky_residual_shift: rms wavelength error of the subtracted sky (A), one per spectrum.
    """
    name: str
    wavelength: np.ndarray
    resolution: np.ndarray
    fibre_diameter: float
    seeing_fwhm: float
    sigma_knots: tuple[tuple[float, float], ...]
    source_var: float
    throughput_knots: tuple[tuple[float, float], ...]
    sky_residual_scale: float = 0.01
    sky_residual_shift: float = 0.02

    @cached_property
    def throughput(self) -> np.ndarray:
        """(L,) total throughput."""
        knots = np.array(self.throughput_knots)
        return np.interp(self.wavelength, knots[:, 0], knots[:, 1])

    @cached_property
    def sky_continuum(self) -> np.ndarray:
        """(L,) dark-sky continuum through the fibre, 1e-17 erg/s/cm^2/A."""
        knots = np.array(SKY_CONTINUUM_MAG)
        mag = np.interp(self.wavelength, knots[:, 0], knots[:, 1]) - 2.5 * np.log10(
            np.pi * (self.fibre_diameter / 2) ** 2)
        f_nu = 10 ** (-0.4 * (mag + 48.6))                                 # erg/s/cm^2/Hz
        return f_nu * 2.99792458e18 / self.wavelength ** 2 / 1e-17

    @cached_property
    def _sky_lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per line j at pixel l, in units of the sky continuum: P[j, l] = EW_j N(l) (the
        line's flux per A over the continuum's), dP[j, l] = P (lambda - lambda_j) /
        sigma_j^2 (its change per A of shift); returned with their sums over the lines:
        ratio (L,) = sum_j P, shift (L,) = sum_j dP, and var (L,) = the expected
        squared residual over the continuum's square."""
        lam = self.wavelength
        centre, ew = SKY_LINES[:, 0], SKY_LINES[:, 1]
        pixel = np.gradient(lam)
        sigma = np.sqrt((centre / (FWHM_PER_SIGMA * np.interp(centre, lam, self.resolution))) ** 2
                        + np.interp(centre, lam, pixel) ** 2 / 12)           # LSF + pixel, A
        d = lam[None, :] - centre[:, None]                                   # (J, L)
        near = np.abs(d) < LINE_HALF_WIDTH_SIGMA * sigma[:, None]
        prof = np.where(near, ew[:, None] * np.exp(-0.5 * (d / sigma[:, None]) ** 2)
                        / (np.sqrt(2 * np.pi) * sigma[:, None]), 0.0)        # (J, L)
        dprof = prof * d / sigma[:, None] ** 2
        var = (self.sky_residual_scale ** 2 * (prof ** 2).sum(0)
               + self.sky_residual_shift ** 2 * dprof.sum(0) ** 2)
        return prof, prof.sum(0), dprof.sum(0), var

    @cached_property
    def sky_sigma(self) -> np.ndarray:
        """(L,) per-pixel sky sigma: the continuum noise, the sky lines' photon noise
        (variance in proportion to the sky flux) and their expected subtraction residual."""
        knots = np.array(self.sigma_knots)
        base = np.interp(self.wavelength, knots[:, 0], knots[:, 1])
        _, ratio, _, res_var = self._sky_lines
        return np.sqrt(base ** 2 * (1 + ratio) + self.sky_continuum ** 2 * res_var)

    def sky_residual(self, rng: np.random.Generator) -> np.ndarray:
        """(L,) one spectrum's sky-subtraction residual, 1e-17 erg/s/cm^2/A: each line's
        profile times a N(0, sky_residual_scale) scale error, plus the derivative of the
        whole line spectrum times a N(0, sky_residual_shift) wavelength error (A). Zero
        more than LINE_HALF_WIDTH_SIGMA line widths from every sky line."""
        prof, _, shift, _ = self._sky_lines
        scale = self.sky_residual_scale * rng.standard_normal(len(prof))
        delta = self.sky_residual_shift * rng.standard_normal()
        return self.sky_continuum * (scale @ prof + delta * shift)


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
    # total throughput, approximate: SDSS/BOSS system curves (Smee et al. 2013) at airmass 1.2
    throughput = ((3800.0, 0.06), (4500.0, 0.16), (5500.0, 0.21), (6500.0, 0.23), (7500.0, 0.22),
                  (8500.0, 0.16), (9200.0, 0.09))
    return Spectrograph("sdss", wavelength, resolution, 3.0, 1.5, knots, 0.03, throughput,
                        sky_residual_scale=0.015, sky_residual_shift=0.05)


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
    # total throughput, approximate: DESI instrument overview (DESI Collaboration 2022),
    # atmosphere included; the dips at 5800 and 7620 A are the dichroic crossovers
    throughput = ((3600.0, 0.12), (4000.0, 0.30), (4500.0, 0.38), (5700.0, 0.40), (5800.0, 0.33),
                  (5900.0, 0.42), (7500.0, 0.45), (7620.0, 0.36), (7750.0, 0.44), (8500.0, 0.40),
                  (9300.0, 0.30), (9824.0, 0.22))
    return Spectrograph("desi", wavelength, resolution, 1.52, 1.1, knots, 0.01, throughput,
                        sky_residual_scale=0.01, sky_residual_shift=0.02)


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
    relative_throughput = spec.throughput / spec.throughput.max()
    var = spec.sky_sigma ** 2 + spec.source_var * np.clip(truth, 0, None) / relative_throughput
    noise_var = var - spec.sky_continuum ** 2 * spec._sky_lines[3]         # the residual's part
    flux = truth + rng.standard_normal(truth.shape) * np.sqrt(noise_var) + spec.sky_residual(rng)
    mask = rng.random(truth.shape) < mask_rate
    flux = np.where(mask, 0.0, flux).astype(np.float32)
    ivar = np.where(mask, 0.0, 1.0 / var).astype(np.float32)
    record = Spectrum(flux=flux, ivar=ivar, mask=mask, wavelength=spec.wavelength.astype(np.float64),
                      instrument=spec.name, resolution=spec.resolution.astype(np.float32))
    return record, truth.astype(np.float32)
