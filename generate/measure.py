"""Measurements an astronomer makes on an image or a spectrum, used to check what the
model generates against the truth and against its inputs.

- `image_photometry(image)`: per band, the total flux (nanomaggies, sum of the stamp,
  masked pixels filled with the band's median) with its noise from the ivar, and the
  half-light radius (arcsec) from the curve of growth about the flux-weighted centre of
  the summed bands.
- `image_ellipticity(flux, pixel_scale)`: the shape (e1, e2) of the summed bands from
  second moments about the centre pixel under a round Gaussian weight (sigma 1", as a
  weak-lensing shape measurement weights), e = (Qxx - Qyy, 2 Qxy) / (Qxx + Qyy); the
  orientation and elongation a translated galaxy must carry over.
- `line_fluxes(spectrum, z)`: emission-line fluxes (1e-17 erg/s/cm^2) with their noise,
  by direct integration of the continuum-subtracted flux over a window of +-3 sigma of
  the line (instrumental resolution and an assumed velocity dispersion added in
  quadrature), the continuum the median of side bands between 4 and 9 sigma. [OII]3727,3730
  is one window over both lines. A line whose window or side bands leave the grid, or
  that crosses masked pixels, is NaN.
"""
from __future__ import annotations

import numpy as np

from ..shards.sed import C_KMS, FWHM_PER_SIGMA, LINES
from ..shards.schema import Image, Spectrum

# name -> rest wavelengths (Angstrom) integrated together
EMISSION_LINES = {
    "Halpha": (LINES["Halpha"],),
    "Hbeta": (LINES["Hbeta"],),
    "OIII_5008": (LINES["OIII_5008"],),
    "OII_3727": (LINES["OII_3727"], LINES["OII_3730"]),
}


def _filled(image: Image) -> np.ndarray:
    flux = image.flux.astype(np.float64).copy()
    for j in range(flux.shape[0]):
        good = ~image.mask[j]
        flux[j][~good] = np.median(flux[j][good]) if good.any() else 0.0
    return flux


def image_photometry(image: Image) -> dict[str, np.ndarray]:
    """{'flux': (C,) nanomaggies, 'flux_sigma': (C,), 'r_half': arcsec (float)}."""
    conv = 10 ** (-0.4 * (image.zero_point - 22.5))
    flux = _filled(image)                                                     # (C, H, W)
    var = np.where(image.ivar > 0, 1.0 / np.maximum(image.ivar, 1e-30), 0.0)
    var = np.where(image.mask, np.median(var[~image.mask]) if (~image.mask).any() else 0.0, var)
    total = flux.sum((1, 2)) * conv
    sigma = np.sqrt(var.sum((1, 2))) * conv
    return dict(flux=total, flux_sigma=sigma, r_half=half_light_radius(flux.sum(0), image.pixel_scale))


def image_ellipticity(flux: np.ndarray, pixel_scale: float, weight_arcsec: float = 1.0) -> np.ndarray:
    """flux (C, H, W) -> (e1, e2) of the band sum, Gaussian-weighted moments about pixel (H // 2, W // 2)."""
    img = np.clip(np.asarray(flux, np.float64).sum(0), 0, None)
    h, w = img.shape
    y, x = np.mgrid[:h, :w]
    dy, dx = (y - h // 2) * pixel_scale, (x - w // 2) * pixel_scale
    img = img * np.exp(-(dx ** 2 + dy ** 2) / (2 * weight_arcsec ** 2))
    f = img.sum()
    if f <= 0:
        return np.zeros(2)
    qxx, qyy, qxy = (img * dx ** 2).sum() / f, (img * dy ** 2).sum() / f, (img * dx * dy).sum() / f
    return np.array([qxx - qyy, 2 * qxy]) / (qxx + qyy)


def half_light_radius(plane: np.ndarray, pixel_scale: float) -> float:
    """Radius (arcsec) holding half the total of `plane` (H, W), about its flux-weighted
    centre (positive pixels only for the centre); NaN if the total is not positive."""
    h, w = plane.shape
    y, x = np.mgrid[:h, :w]
    pos = np.clip(plane, 0, None)
    if plane.sum() <= 0 or pos.sum() <= 0:
        return float("nan")
    cy, cx = (pos * y).sum() / pos.sum(), (pos * x).sum() / pos.sum()
    r = np.hypot(y - cy, x - cx).ravel()
    order = np.argsort(r)
    growth = np.cumsum(plane.ravel()[order])
    k = int(np.searchsorted(growth, 0.5 * plane.sum()))
    return float(r[order][min(k, len(r) - 1)] * pixel_scale)


def instrument_sigma(wavelength: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """Gaussian sigma (Angstrom) of the line spread at `wavelength` for resolving power
    `resolution` (same shape; R < 1 is taken as 1)."""
    return np.asarray(wavelength, np.float64) / (np.clip(np.asarray(resolution, np.float64), 1.0, None)
                                                 * FWHM_PER_SIGMA)


def line_sigma(wavelength_obs: float, spectrum: Spectrum, sigma_v: float) -> float:
    """Gaussian sigma (Angstrom) of a line at `wavelength_obs` seen by this spectrum."""
    resolution = float(np.interp(wavelength_obs, spectrum.wavelength, np.asarray(spectrum.resolution)))
    inst = float(instrument_sigma(wavelength_obs, resolution))
    return float(np.hypot(inst, wavelength_obs * sigma_v / C_KMS))


def noise_variance(ivar: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Per-pixel noise variance 1 / ivar (float64, the shape of ivar); a pixel that is not
    `good` gets the median of its plane's good ones (the plane: each index of the first axis
    of an image (C, H, W); the whole of a 1-d spectrum), 1 where a plane has none."""
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0).astype(np.float64)
    planes, goods = (var[None], good[None]) if var.ndim == 1 else (var, good)
    for v, g in zip(planes, goods):          # views: filled in place
        v[~g] = np.median(v[g]) if g.any() else 1.0
    return var


def line_fluxes(spectrum: Spectrum, z: float, sigma_v: float = 100.0,
                lines: dict[str, tuple[float, ...]] = EMISSION_LINES) -> dict[str, tuple[float, float]]:
    """{line: (flux, sigma)} in the spectrum's flux units x Angstrom (see the module docstring)."""
    wave = spectrum.wavelength
    dlam = np.gradient(wave)
    var = np.where(spectrum.ivar > 0, 1.0 / np.maximum(spectrum.ivar, 1e-30), np.inf)
    out = {}
    for name, rest in lines.items():
        obs = np.array(rest) * (1 + z)
        sig = line_sigma(float(obs.mean()), spectrum, sigma_v)
        lo, hi = obs.min() - 3 * sig, obs.max() + 3 * sig
        window = (wave >= lo) & (wave <= hi)
        side = (((wave >= obs.min() - 9 * sig) & (wave < obs.min() - 4 * sig))
                | ((wave > obs.max() + 4 * sig) & (wave <= obs.max() + 9 * sig)))
        if lo < wave[0] or obs.max() + 9 * sig > wave[-1] or window.sum() < 3 or side.sum() < 4 \
                or spectrum.mask[window].any():
            out[name] = (float("nan"), float("nan"))
            continue
        cont = np.median(spectrum.flux[side & ~spectrum.mask])
        flux = float(((spectrum.flux[window] - cont) * dlam[window]).sum())
        out[name] = (flux, float(np.sqrt((var[window] * dlam[window] ** 2).sum())))
    return out
