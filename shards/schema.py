"""Observation records: what one object looks like to one survey or instrument.

Records hold one object each (no batch axis); tokenizers batch them. Missing
modalities are normal: an object is a dict `{modality_key: record}` holding only what
was observed. Modality keys name the kind and the survey: `image.des`, `image.hsc`,
`spectrum.sdss`, `spectrum.desi`, `scalar.redshift`, `scalar.flux_g`, ...

Every record checks itself in `validate()`: bad input raises `RecordError` naming the
object and the field, so NaNs never flow silently downstream. Pixels that are bad
but expected (cosmic rays, saturated, no coverage) carry `mask = True` and `ivar = 0`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np


class RecordError(ValueError):
    """A record's field is malformed; the message names the object and the field."""


def _fail(object_id: str, field_name: str, why: str):
    raise RecordError(f"object {object_id!r}: field {field_name!r}: {why}")


def _check_image_like(object_id: str, name: str, flux, ivar, mask, shape) -> None:
    for fname, arr in (("flux", flux), ("ivar", ivar), ("mask", mask)):
        if arr.shape != shape:
            _fail(object_id, f"{name}.{fname}", f"shape {arr.shape} != {shape}")
    good = ~mask
    if not np.all(np.isfinite(flux[good])):
        n = int((~np.isfinite(flux[good])).sum())
        _fail(object_id, f"{name}.flux", f"{n} unmasked non-finite value(s) (NaN/inf); "
              "mask them (mask=True, ivar=0) or use mask_invalid()")
    if not np.all(np.isfinite(ivar)) or np.any(ivar < 0):
        _fail(object_id, f"{name}.ivar", "negative or non-finite inverse variance")
    if np.any(ivar[good] == 0):
        n = int((ivar[good] == 0).sum())
        _fail(object_id, f"{name}.ivar", f"{n} unmasked pixel(s) with ivar 0; mask them "
              "or use mask_invalid()")


def mask_invalid(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray):
    """Mask pixels with non-finite flux or non-positive/non-finite ivar.

    Returns (flux, ivar, mask, n_masked): masked pixels get flux 0 and ivar 0, and
    `n_masked` counts the pixels newly masked, for the job's summary.
    """
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar <= 0)
    new = bad & ~mask
    mask = mask | bad
    flux = np.where(mask, 0.0, flux).astype(np.float32)
    ivar = np.where(mask, 0.0, ivar).astype(np.float32)
    return flux, ivar, mask, int(new.sum())


@dataclass
class Image:
    """A multiband cut-out from one survey.

    flux:        float32 (C, H, W), survey units: nanomaggies for zero point 22.5
                 (DES/Legacy-like), HSC counts for zero point 27.0; see `zero_point`.
    ivar:        float32 (C, H, W), inverse variance of `flux`, units flux^-2; 0 = no data.
    mask:        bool (C, H, W), True where the pixel is bad and must be ignored.
    bands:       C band names from the registry `shards.bands`, e.g. ('hsc.g', 'hsc.r').
    pixel_scale: arcsec per pixel.
    survey:      survey name, e.g. 'des', 'hsc'.
    zero_point:  AB magnitude of one flux unit: m = zero_point - 2.5 log10(flux).
    psf_fwhm:    float32 (C,), PSF FWHM per band in arcsec.
    """
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    survey: str
    zero_point: float
    psf_fwhm: np.ndarray
    object_id: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.flux.shape)

    def validate(self) -> "Image":
        from . import bands as band_registry
        oid = self.object_id
        if self.flux.ndim != 3:
            _fail(oid, "image.flux", f"expected (C, H, W), got shape {self.flux.shape}")
        if len(self.bands) != self.flux.shape[0]:
            _fail(oid, "image.bands", f"{len(self.bands)} bands for {self.flux.shape[0]} planes")
        for b in self.bands:
            if b not in band_registry.REGISTRY:
                _fail(oid, "image.bands", f"unknown band {b!r}; known: {sorted(band_registry.REGISTRY)}")
        if not (self.pixel_scale > 0):
            _fail(oid, "image.pixel_scale", f"must be > 0 arcsec, got {self.pixel_scale}")
        if np.asarray(self.psf_fwhm).shape != (len(self.bands),):
            _fail(oid, "image.psf_fwhm", f"expected ({len(self.bands)},), got {np.asarray(self.psf_fwhm).shape}")
        _check_image_like(oid, "image", self.flux, self.ivar, self.mask, self.flux.shape)
        return self


@dataclass
class Spectrum:
    """A 1-D spectrum from one spectrograph.

    flux:        float32 (L,), 1e-17 erg/s/cm^2/Angstrom.
    ivar:        float32 (L,), inverse variance of `flux`, (1e-17 erg/s/cm^2/A)^-2; 0 = no data.
    mask:        bool (L,), True where the pixel is bad.
    wavelength:  float64 (L,), vacuum Angstrom, strictly increasing (any sampling:
                 log-linear for SDSS, linear 0.8 A for DESI).
    instrument:  spectrograph name, e.g. 'sdss', 'desi'.
    resolution:  float32 (L,), resolving power R = lambda / FWHM of the line spread.
    """
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    wavelength: np.ndarray
    instrument: str
    resolution: np.ndarray
    object_id: str = ""

    def validate(self) -> "Spectrum":
        oid = self.object_id
        if self.flux.ndim != 1:
            _fail(oid, "spectrum.flux", f"expected (L,), got shape {self.flux.shape}")
        if self.wavelength.shape != self.flux.shape:
            _fail(oid, "spectrum.wavelength", f"shape {self.wavelength.shape} != flux {self.flux.shape}")
        if not np.all(np.diff(self.wavelength) > 0):
            _fail(oid, "spectrum.wavelength", "not strictly increasing")
        if np.asarray(self.resolution).shape != self.flux.shape:
            _fail(oid, "spectrum.resolution", f"shape {np.asarray(self.resolution).shape} != flux {self.flux.shape}")
        _check_image_like(oid, "spectrum", self.flux, self.ivar, self.mask, self.flux.shape)
        if self.mask.all():
            _fail(oid, "spectrum.mask", "every pixel is masked")
        return self


@dataclass
class Scalar:
    """One catalog quantity of one object.

    name:        e.g. 'redshift', 'flux_g' (DES-like g flux, nanomaggies), 'r_half' (arcsec).
    value:       float.
    uncertainty: 1-sigma, same units as value; 0 if exact (e.g. a spectroscopic redshift).
    """
    name: str
    value: float
    uncertainty: float = 0.0
    object_id: str = ""

    def validate(self) -> "Scalar":
        if not np.isfinite(self.value):
            _fail(self.object_id, f"scalar.{self.name}.value", f"non-finite value {self.value}")
        if not (np.isfinite(self.uncertainty) and self.uncertainty >= 0):
            _fail(self.object_id, f"scalar.{self.name}.uncertainty", f"must be finite and >= 0, got {self.uncertainty}")
        return self


Record = Union[Image, Spectrum, Scalar]


@dataclass
class Sample:
    """One object: its observed modalities and, for simulated objects, the truth.

    records: {modality_key: record}, e.g. {'image.des': Image, 'scalar.redshift': Scalar}.
    truth:   {modality_key: noiseless flux array (same shape as the record's flux)} and
             'params': {name: float} physical parameters, for evaluation; {} for real data.
    meta:    JSON-able extras: ra, dec, source file, object class.
    """
    object_id: str
    records: dict[str, Record] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Sample":
        for key, rec in self.records.items():
            kind = key.split(".", 1)[0]
            expect = {"image": Image, "spectrum": Spectrum, "scalar": Scalar}.get(kind)
            if expect is None or not isinstance(rec, expect):
                _fail(self.object_id, key, f"modality key kind {kind!r} does not match record {type(rec).__name__}")
            rec.object_id = self.object_id
            rec.validate()
        return self


def modality_kind(key: str) -> str:
    """'image.hsc' -> 'image'."""
    return key.split(".", 1)[0]
