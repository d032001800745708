"""Multimodal Universe HDF5 files -> Samples (images, spectra, and catalog scalars).

    samples, counts = read_mmu("hsc/pdr3_dud_22.5/healpix=1104/001-of-001.hdf5", size=64)
    samples, counts = read_mmu("sdss/healpix=583/001-of-001.hdf5", instrument="sdss",
                               catalog=load_catalog_config("my_columns.yaml"))

The layout (one file is one table; each dataset is a column over N objects):

    object_id (N,), ra (N,), dec (N,)                                     degrees
    image_band (N, C) bytes       'hsc-g', 'des-r', ...: '<survey>-<filter>' -> registry 'survey.filter'
    image_array or image_flux (N, C, H, W)   survey units (the band's registry zero point)
    image_ivar (N, C, H, W)       optional; absent: per-band sky noise (sigma-clipped MAD), meta ivar_source
    image_mask (N, C, H, W)       optional, True = bad
    image_psf_fwhm (N, C)         arcsec
    image_scale (N, C)            arcsec / pixel (one value for all bands of an object)
    spectrum_flux (N, L)          1e-17 erg/s/cm^2/A
    spectrum_ivar (N, L)
    spectrum_lambda (N, L)        Angstrom; MMU pads short spectra at the end with lambda -1
    spectrum_mask (N, L)          optional, True = bad
    spectrum_lsf_sigma (N, L) or (N,)   Gaussian sigma of the line spread, in pixels
    any other (N,) or (N, k) columns: catalog values, made scalars by a `CatalogConfig` mapping

Conversions: resolution R = lambda / (2.3548 * lsf_sigma * d lambda), d lambda the local
pixel width (np.gradient), the same rule as `read_sdss` on SDSS's wdisp. The spectrum's
instrument (record key `spectrum.<instrument>`) is `instrument`, else the file's
'instrument' or 'survey' attribute, else a known survey name in its path.

Bad input: NaN/inf pixels and ivar <= 0 are masked (ivar 0) and counted (`n_invalid`);
trailing padding (lambda <= 0) is cut; an image or spectrum with every pixel masked is
dropped and counted (`counts['dropped_records']`), and an object left with nothing is
dropped. An unknown band, a wavelength grid that is not increasing, mismatched shapes or
a missing column are an `IngestError` naming the file, the object and the field.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import bands as band_registry
from .ingest_catalog import CatalogConfig, samples_from_columns
from .ingest_images import sky_sigma, stamp_slices
from .schema import Image, RecordError, Sample, Spectrum, mask_invalid

FWHM_PER_SIGMA = 2.3548
KNOWN_INSTRUMENTS = ("desi", "sdss", "boss", "eboss", "segue1", "segue2", "gama", "6df", "lamost")


class MMUError(ValueError):
    """An MMU file cannot be read; the message names the file, the object and the field."""


def is_hdf5(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def registry_band(name, where: str) -> str:
    """'hsc-g' / 'HSC-G' / 'hsc.g' -> 'hsc.g' (a registry band), else MMUError."""
    text = (name.decode() if isinstance(name, bytes) else str(name)).strip().lower()
    key = text.replace("-", ".", 1) if "." not in text else text
    if key not in band_registry.REGISTRY:
        raise MMUError(f"{where}: field 'image_band': unknown band {text!r}; known: {sorted(band_registry.REGISTRY)} "
                       "(register a Band in shards.bands for a new survey)")
    return key


def resolution_from_lsf(wavelength: np.ndarray, lsf_sigma: np.ndarray) -> np.ndarray:
    """(L,) R = lambda / FWHM, FWHM = 2.3548 * lsf_sigma (pixels) * local pixel width (A).
    Pixels with a non-positive or non-finite sigma take the median of the others."""
    sigma = np.broadcast_to(np.asarray(lsf_sigma, np.float64), wavelength.shape)
    ok = np.isfinite(sigma) & (sigma > 0)
    if not ok.any():
        raise ValueError("no positive line-spread sigma")
    sigma = np.where(ok, sigma, np.median(sigma[ok]))
    return wavelength / (FWHM_PER_SIGMA * sigma * np.gradient(wavelength))


def _instrument(h5, path: Path, instrument: str | None) -> str:
    if instrument:
        return instrument
    for attr in ("instrument", "survey"):
        if attr in h5.attrs:
            value = h5.attrs[attr]
            return (value.decode() if isinstance(value, bytes) else str(value)).strip().lower()
    for part in [p.lower() for p in path.parts[::-1]]:
        for name in KNOWN_INSTRUMENTS:
            if name == part or part.startswith(name + "_") or part.startswith(name + "-"):
                return name
    raise MMUError(f"{path}: spectra of an unknown instrument: pass instrument=... (--mmu-instrument) "
                   "or give the file an 'instrument' attribute")


def _object_id(value, prefix: str) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    return f"{prefix}-" + text.strip().replace(".", "p").replace("/", "_").replace(" ", "_")


def _image(h5, i: int, oid: str, where: str, size: int | None):
    flux_name = "image_array" if "image_array" in h5 else "image_flux"
    flux = np.asarray(h5[flux_name][i], np.float64)                        # (C, H, W)
    if flux.ndim != 3:
        raise MMUError(f"{where}: field {flux_name!r}: expected (C, H, W) per object, got {flux.shape}")
    names = [registry_band(b, where) for b in np.atleast_1d(h5["image_band"][i])]
    if len(names) != flux.shape[0]:
        raise MMUError(f"{where}: field 'image_band': {len(names)} bands for {flux.shape[0]} planes")
    surveys = {band_registry.get(b).survey for b in names}
    if len(surveys) != 1:
        raise MMUError(f"{where}: field 'image_band': bands of several surveys {sorted(surveys)}")
    scale = np.atleast_1d(np.asarray(h5["image_scale"][i], np.float64))
    if not np.allclose(scale, scale[0], rtol=1e-3):
        raise MMUError(f"{where}: field 'image_scale': bands differ in pixel scale {scale.tolist()}")
    rows, cols = stamp_slices(flux.shape[1:], size, where)
    ivar_source = "file"
    if "image_ivar" in h5:
        ivar = np.asarray(h5["image_ivar"][i], np.float64)[:, rows, cols]
    else:
        ivar_source = "sky_mad"
        ivar = np.broadcast_to((sky_sigma(flux) ** -2.0)[:, None, None], flux.shape)[:, rows, cols].copy()
    mask = (np.asarray(h5["image_mask"][i], bool)[:, rows, cols] if "image_mask" in h5
            else np.zeros(ivar.shape, bool))
    flux = flux[:, rows, cols]
    if not (flux.shape == ivar.shape == mask.shape):
        raise MMUError(f"{where}: fields 'image_ivar'/'image_mask': shapes {ivar.shape}, {mask.shape} "
                       f"!= image {flux.shape}")
    flux, ivar, mask, n_invalid = mask_invalid(flux, ivar, mask)
    survey = surveys.pop()
    image = Image(flux=flux, ivar=ivar, mask=mask, bands=tuple(names), pixel_scale=float(scale[0]), survey=survey,
                  zero_point=band_registry.get(names[0]).zero_point,
                  psf_fwhm=np.atleast_1d(np.asarray(h5["image_psf_fwhm"][i], np.float32)), object_id=oid)
    return f"image.{survey}", image, n_invalid, ivar_source


def _spectrum(h5, i: int, oid: str, where: str, instrument: str):
    wavelength = np.asarray(h5["spectrum_lambda"][i], np.float64)          # (L,)
    flux = np.asarray(h5["spectrum_flux"][i], np.float64)
    ivar = np.asarray(h5["spectrum_ivar"][i], np.float64)
    mask = np.asarray(h5["spectrum_mask"][i], bool) if "spectrum_mask" in h5 else np.zeros(flux.shape, bool)
    if "spectrum_lsf_sigma" not in h5:
        raise MMUError(f"{where}: field 'spectrum_lsf_sigma': missing (needed for the resolution)")
    lsf = np.asarray(h5["spectrum_lsf_sigma"][i], np.float64)
    if not (wavelength.shape == flux.shape == ivar.shape == mask.shape) or wavelength.ndim != 1:
        raise MMUError(f"{where}: fields 'spectrum_*': shapes differ: lambda {wavelength.shape}, flux {flux.shape}, "
                       f"ivar {ivar.shape}, mask {mask.shape}")
    n = len(wavelength)
    while n > 0 and not wavelength[n - 1] > 0:                              # MMU end padding (lambda -1)
        n -= 1
    if n < 2 or not np.all(np.diff(wavelength[:n]) > 0) or not np.all(np.isfinite(wavelength[:n])):
        raise MMUError(f"{where}: field 'spectrum_lambda': wavelength grid is not strictly increasing "
                       f"(or has fewer than 2 positive values)")
    wavelength, flux, ivar, mask = wavelength[:n], flux[:n], ivar[:n], mask[:n]
    try:
        resolution = resolution_from_lsf(wavelength, lsf[:n] if lsf.ndim else lsf)
    except ValueError as e:
        raise MMUError(f"{where}: field 'spectrum_lsf_sigma': {e}") from None
    flux, ivar, mask, n_invalid = mask_invalid(flux, ivar, mask)
    spec = Spectrum(flux=flux, ivar=ivar, mask=mask, wavelength=wavelength, instrument=instrument,
                    resolution=resolution.astype(np.float32), object_id=oid)
    return f"spectrum.{instrument}", spec, n_invalid


def read_mmu(path: str | Path, instrument: str | None = None, catalog: CatalogConfig | None = None,
             size: int | None = None) -> tuple[list[Sample], dict]:
    """An MMU HDF5 file -> (one Sample per object, counts: rows, invalid pixels, dropped records
    and objects, masked scalars)."""
    import h5py
    path = Path(path)
    counts = dict(rows=0, invalid_pixels=0, dropped_records=Counter(), dropped_objects=0, masked_scalars={})
    with h5py.File(path, "r") as h5:
        for col in ("object_id", "ra", "dec"):
            if col not in h5:
                raise MMUError(f"{path}: field {col!r}: missing; datasets: {sorted(h5)}")
        n = len(h5["object_id"])
        has_image, has_spectrum = "image_band" in h5, "spectrum_flux" in h5
        instrument = _instrument(h5, path, instrument) if has_spectrum else None
        ids, ra, dec = h5["object_id"][:], np.asarray(h5["ra"][:], np.float64), np.asarray(h5["dec"][:], np.float64)
        scalars = {}
        if catalog is not None and catalog.columns:
            cols = {k: h5[k][:] for k in h5 if isinstance(h5[k], h5py.Dataset) and h5[k].ndim in (1, 2)
                    and h5[k].dtype.kind in "fiub"}
            units = {k: h5[k].attrs["unit"] for k in cols if "unit" in h5[k].attrs}
            cols.setdefault(catalog.ra, ra)
            cols.setdefault(catalog.dec, dec)
            mine = replace(catalog, columns=tuple(c for c in catalog.columns if c.column in cols))
            if mine.columns:                                # the mapping's columns this file has
                cat_samples, cat_counts = samples_from_columns(cols, units, mine, str(path), kind="mmu")
                scalars = {s.meta["row"]: s.records for s in cat_samples}
                counts["masked_scalars"] = cat_counts["masked"]
        samples = []
        for i in range(n):
            oid = _object_id(ids[i], f"mmu-{instrument or 'img'}")
            where = f"{path}: object {oid!r}"
            records, n_invalid, meta = {}, 0, {}
            if has_image:
                key, image, bad, meta["ivar_source"] = _image(h5, i, oid, where, size)
                n_invalid += bad
                if image.mask.all():
                    counts["dropped_records"][f"{key}: every pixel masked"] += 1
                else:
                    records[key] = image
            if has_spectrum:
                key, spec, bad = _spectrum(h5, i, oid, where, instrument)
                n_invalid += bad
                if spec.mask.all():
                    counts["dropped_records"][f"{key}: every pixel masked"] += 1
                else:
                    records[key] = spec
            records.update(scalars.get(i, {}))
            counts["rows"] += 1
            counts["invalid_pixels"] += n_invalid
            if not records:
                counts["dropped_objects"] += 1
                continue
            if not (np.isfinite(ra[i]) and np.isfinite(dec[i])):
                raise MMUError(f"{where}: fields 'ra'/'dec': not finite ({ra[i]}, {dec[i]})")
            sample = Sample(object_id=oid, records=records,
                            meta=dict(meta, ra=float(ra[i]), dec=float(dec[i]), source=str(path), kind="mmu",
                                      n_invalid=n_invalid))
            try:
                samples.append(sample.validate())
            except RecordError as e:
                raise MMUError(f"{path}: {e}") from None
    counts["dropped_records"] = dict(counts["dropped_records"])
    return samples, counts
