"""Writing generated observations: FITS files and PNG figures.

Images go to FITS: one primary HDU (C, H, W) with BANDS, SURVEY, PIXSCALE, ZP and a
tangent-plane WCS centred on the object (CDELT from the pixel scale; CRVAL from the
object's ra/dec when known), plus an IVAR extension. Spectra go to FITS binary tables
(WAVELENGTH, FLUX, IVAR, RESOLUTION). `write_npz` puts any records (images, spectra,
scalars) of one object into one .npz instead, their metadata as arrays beside them.
Figures show input / generated / truth / residual.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

from ..shards.schema import Image, Spectrum  # noqa: E402


def write_image_fits(path: str | Path, image: Image, ra: float = 0.0, dec: float = 0.0,
                     extra: dict | None = None) -> None:
    c, h, w = image.flux.shape
    hdr = fits.Header()
    hdr["SURVEY"] = image.survey
    hdr["BANDS"] = ",".join(image.bands)
    hdr["PIXSCALE"] = (float(image.pixel_scale), "arcsec / pixel")
    hdr["ZP"] = (float(image.zero_point), "AB mag of one flux unit")
    hdr["OBJECT"] = image.object_id
    # A celestial WCS for the two image axes; the third axis is the band index.
    hdr["WCSAXES"] = 3
    hdr["CTYPE1"], hdr["CTYPE2"], hdr["CTYPE3"] = "RA---TAN", "DEC--TAN", "BAND"
    hdr["CRPIX1"], hdr["CRPIX2"], hdr["CRPIX3"] = (w + 1) / 2, (h + 1) / 2, 1
    hdr["CRVAL1"], hdr["CRVAL2"], hdr["CRVAL3"] = float(ra), float(dec), 1
    hdr["CDELT1"] = -image.pixel_scale / 3600.0
    hdr["CDELT2"] = image.pixel_scale / 3600.0
    hdr["CDELT3"] = 1
    hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
    for i, (b, f) in enumerate(zip(image.bands, np.asarray(image.psf_fwhm))):
        hdr[f"BAND{i}"] = b
        hdr[f"PSF{i}"] = (float(f), f"PSF FWHM arcsec, {b}")
    for k, v in (extra or {}).items():
        hdr[k[:8].upper()] = v
    hdus = [fits.PrimaryHDU(image.flux.astype(np.float32), header=hdr),
            fits.ImageHDU(image.ivar.astype(np.float32), name="IVAR"),
            fits.ImageHDU(image.mask.astype(np.uint8), name="MASK")]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def write_spectrum_fits(path: str | Path, spec: Spectrum, extra: dict | None = None) -> None:
    cols = [fits.Column("WAVELENGTH", "D", unit="Angstrom", array=spec.wavelength),
            fits.Column("FLUX", "E", unit="1e-17 erg/s/cm2/Angstrom", array=spec.flux),
            fits.Column("IVAR", "E", array=spec.ivar),
            fits.Column("RESOLUTION", "E", array=np.asarray(spec.resolution))]
    hdu = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
    hdu.header["INSTRUME"] = spec.instrument
    hdu.header["OBJECT"] = spec.object_id
    for k, v in (extra or {}).items():
        hdu.header[k[:8].upper()] = v
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)


def write_npz(path: str | Path, records: dict, ra: float = 0.0, dec: float = 0.0) -> None:
    """{name: Image | Spectrum | Scalar} -> one .npz; member names are `<name>/<field>`."""
    arrays = {"ra": np.float64(ra), "dec": np.float64(dec)}
    for name, rec in records.items():
        if isinstance(rec, Image):
            fields = dict(flux=rec.flux, ivar=rec.ivar, mask=rec.mask, bands=np.array(rec.bands),
                          pixel_scale=rec.pixel_scale, survey=rec.survey, zero_point=rec.zero_point,
                          psf_fwhm=np.asarray(rec.psf_fwhm))
        elif isinstance(rec, Spectrum):
            fields = dict(flux=rec.flux, ivar=rec.ivar, mask=rec.mask, wavelength=rec.wavelength,
                          instrument=rec.instrument, resolution=np.asarray(rec.resolution))
        else:  # Scalar
            fields = dict(value=rec.value, uncertainty=rec.uncertainty, scalar_name=rec.name)
        arrays.update({f"{name}/{k}": np.asarray(v) for k, v in fields.items()})
    np.savez_compressed(path, **arrays)


def _rgb(image: Image, bands: Sequence[int], scale: float) -> np.ndarray:
    """asinh-stretched RGB (H, W, 3) of three band planes, common scale for comparison."""
    flux = np.where(image.mask, 0.0, image.flux)  # masked pixels drawn black
    planes = [flux[i] * 10 ** (-0.4 * (image.zero_point - 22.5)) for i in bands]  # nanomaggies
    rgb = np.stack(planes[::-1], axis=-1)  # reddest band -> R
    return np.clip(np.arcsinh(rgb / scale) / np.arcsinh(1.0 / scale) * 0.5, 0, 1)


def _rgb_bands(image: Image) -> list[int]:
    c = image.flux.shape[0]
    return [0, c // 2, c - 1] if c >= 3 else [0] * 3


def image_figure(path: str | Path, given: Image | None, generated: Sequence[Image],
                 truth: Image | None = None, title: str = "", estimate: Image | None = None) -> None:
    """Row: given (its survey) | generated samples | the point estimate (if given) | truth |
    residual/sigma in one band (of the estimate if given, else of the first sample)."""
    panels = ([("given " + given.survey, given)] if given is not None else [])
    panels += [(f"generated {g.survey}" + (f" #{k}" if len(generated) > 1 else ""), g)
               for k, g in enumerate(generated)]
    if estimate is not None:
        panels.append(("point estimate", estimate))
    if truth is not None:
        panels.append(("truth " + truth.survey, truth))
    ncol = len(panels) + (truth is not None)
    fig, axes = plt.subplots(1, ncol, figsize=(2.3 * ncol, 2.6), squeeze=False)
    ref = truth if truth is not None else generated[0]
    scale = max(float(np.percentile(np.abs(ref.flux * 10 ** (-0.4 * (ref.zero_point - 22.5))), 99)), 1e-3) / 3
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(_rgb(img, _rgb_bands(img), scale), origin="lower")
        ax.set_title(name, fontsize=8)
    if truth is not None:
        b = min(2, truth.flux.shape[0] - 1)
        sigma = 1 / np.sqrt(np.maximum(truth.ivar[b], 1e-30))
        shown = estimate if estimate is not None else generated[0]
        res = (shown.flux[b] - truth.flux[b]) / sigma
        ax = axes[0][-1]
        im = ax.imshow(res, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
        ax.set_title(f"({'est' if estimate is not None else 'gen'} - truth)/sigma {truth.bands[b]}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes[0]:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def spectrum_figure(path: str | Path, given: Spectrum | None, generated: Sequence[Spectrum],
                    truth: Spectrum | None = None, title: str = "", refined: Sequence[Spectrum] = (),
                    estimate: Spectrum | None = None) -> None:
    """Overplotted spectra: given, generated samples, truth (noiseless), the samples
    pulled to the given data (`refined`, generate.spectrum_consistency) where there are any,
    and the point estimate (Pipeline.estimate) if given."""
    fig, ax = plt.subplots(figsize=(9, 3))
    if given is not None:
        ax.plot(given.wavelength, given.flux, lw=0.5, color="0.6", label=f"given {given.instrument}")
    if truth is not None:
        ax.plot(truth.wavelength, truth.flux, lw=0.8, color="k", label=f"truth {truth.instrument}")
    for k, g in enumerate(generated):
        ax.plot(g.wavelength, g.flux, lw=0.7, alpha=0.8, color=f"C{k % 10}",
                label=f"generated {g.instrument}" if k == 0 else None)
    for k, g in enumerate(refined):
        ax.plot(g.wavelength, g.flux, lw=0.7, alpha=0.8, color="C3",
                label="pulled to the given data" if k == 0 else None)
    if estimate is not None:
        ax.plot(estimate.wavelength, estimate.flux, lw=1.1, ls="--", color="darkgreen", label="point estimate")
    ax.set_xlabel("wavelength [Angstrom]")
    ax.set_ylabel("flux [1e-17 erg/s/cm2/A]")
    shown = ([truth.flux] if truth is not None else []) + [g.flux[~g.mask] for g in (*generated, *refined)]
    lo, hi = np.percentile(np.concatenate(shown), [1, 99.5])
    ax.set_ylim(lo - 0.2 * abs(hi - lo), hi + 0.3 * abs(hi - lo))
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
