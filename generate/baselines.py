"""What an astronomer does without the model: the classical baselines we compare with.

- `resample_image`: survey translation by resampling. Maps the source image onto the
  target's pixel grid (bilinear, both stamps centred on the object, flux per pixel scaled
  by the pixel-area ratio), converts zero points, and scales each target band from the
  nearest source band by a colour term (a per-band flux ratio fitted on training data).
  No deconvolution: the source PSF stays.
- `interpolate_spectrum`: super-resolution by linear interpolation of the source spectrum
  onto the target grid (NaN outside the source range).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import map_coordinates

from ..shards import bands as band_registry
from ..shards.schema import Image, Spectrum


def nearest_band(target_band: str, source_bands) -> int:
    lam = band_registry.get(target_band).effective_wavelength
    return int(np.argmin([abs(band_registry.get(b).effective_wavelength - lam) for b in source_bands]))


def fit_colour_terms(pairs, source_bands, target_bands) -> np.ndarray:
    """Median total-flux ratio target/source (in AB-consistent units) per target band,
    over (source Image, target Image) training pairs (noiseless or observed)."""
    ratios = [[] for _ in target_bands]
    for src, tgt in pairs:
        conv_s = 10 ** (-0.4 * (src.zero_point - 22.5))
        conv_t = 10 ** (-0.4 * (tgt.zero_point - 22.5))
        for j, b in enumerate(target_bands):
            i = nearest_band(b, source_bands)
            fs, ft = src.flux[i].sum() * conv_s, tgt.flux[j].sum() * conv_t
            if fs > 0 and ft > 0:
                ratios[j].append(ft / fs)
    return np.array([np.median(r) if r else 1.0 for r in ratios])


def resample_image(src: Image, like: Image, colour_terms: np.ndarray | None = None) -> Image:
    """The source image resampled onto `like`'s grid, bands and units."""
    _, h, w = like.flux.shape
    _, hs, ws = src.flux.shape
    # target pixel centres in arcsec from the stamp centre -> source pixel coordinates
    y = (np.arange(h) - (h - 1) / 2) * like.pixel_scale / src.pixel_scale + (hs - 1) / 2
    x = (np.arange(w) - (w - 1) / 2) * like.pixel_scale / src.pixel_scale + (ws - 1) / 2
    yy, xx = np.meshgrid(y, x, indexing="ij")
    area = (like.pixel_scale / src.pixel_scale) ** 2
    zp = 10 ** (0.4 * (like.zero_point - src.zero_point))
    flux = np.zeros(like.flux.shape, np.float32)
    for j, b in enumerate(like.bands):
        i = nearest_band(b, src.bands)
        plane = np.where(src.mask[i], 0.0, src.flux[i])
        term = 1.0 if colour_terms is None else colour_terms[j]
        flux[j] = map_coordinates(plane, [yy, xx], order=1, mode="constant") * area * zp * term
    return dataclasses.replace(like, flux=flux, mask=np.zeros_like(like.mask))


def interpolate_spectrum(src: Spectrum, like: Spectrum) -> Spectrum:
    good = ~src.mask
    flux = np.interp(like.wavelength, src.wavelength[good], src.flux[good], left=np.nan, right=np.nan)
    return dataclasses.replace(like, flux=flux.astype(np.float32), mask=~np.isfinite(flux))
