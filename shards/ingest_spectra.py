"""Read real spectra (SDSS spec-*.fits, DESI coadd-*.fits) into `Spectrum` records.

    sample = read_sdss("sdss_spectra/spec-0266-51602-0013.fits")
    sample.records["spectrum.sdss"], sample.records["scalar.redshift"]
    samples, n_dropped = read_desi("desi/coadd-sv3-dark-26065.fits")   # one Sample per target fibre

Units: flux 1e-17 erg/s/cm^2/A, vacuum Angstrom, for both. Resolution R = lambda / FWHM:
SDSS from `wdisp` (the Gaussian sigma of the line spread in pixels of d(log10 lambda) =
1e-4, so FWHM = 2.3548 * wdisp * 1e-4 * ln(10) * lambda and R = 1 / (2.3548 * wdisp *
1e-4 * ln 10), about 1500-2000); DESI from the RMS width of each pixel's row of the
resolution matrix (11 diagonals, 0.8 A pixels). Flagged pixels (SDSS and_mask bits in
SDSS_BAD_BITS, DESI MASK != 0) and pixels with ivar <= 0 or non-finite flux are masked
with ivar 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .ingest_images import coord_id
from .schema import Sample, Scalar, Spectrum, mask_invalid

FWHM_PER_SIGMA = 2.3548
# SDSS SPPIXMASK and_mask bits that make a pixel unusable: FULLREJECT 18, NOSKY 22,
# BRIGHTSKY 23, NODATA 24, COMBINEREJ 25, BADFLUXFACTOR 26, BADSKYCHI 27, REDMONSTER 28.
# Bits 0-15 are fibre-level warnings (e.g. MANYBADCOLUMNS, set over half of a good
# spectrum) and 16, 17, 19-21 are mild; they are kept. or_mask (any exposure) is not used.
SDSS_BAD_BITS = sum(1 << b for b in (18, 22, 23, 24, 25, 26, 27, 28))
DESI_ARMS = ("B", "R", "Z")
DESI_DLAMBDA = 0.8                          # Angstrom, every arm's linear grid step
# Fallback resolving power per arm where a pixel's resolution row is empty (DESI
# spectrograph design values at the arm centres: DESI Collaboration 2022, AJ 164, 207).
DESI_DEFAULT_R = {"B": 2500.0, "R": 3700.0, "Z": 4500.0}


def read_sdss(path: str | Path) -> Sample:
    """An SDSS/BOSS spec-PLATE-MJD-FIBER.fits -> Sample with 'spectrum.sdss' and, where the
    SPECOBJ HDU gives one, 'scalar.redshift' (uncertainty ZERR)."""
    from astropy.io import fits
    path = Path(path)
    with fits.open(path) as hdul:
        coadd = hdul["COADD"].data
        specobj = hdul["SPECOBJ"].data[0] if "SPECOBJ" in hdul else None
        header = hdul[0].header
    names = {n.lower(): n for n in coadd.columns.names}
    col = lambda n: np.asarray(coadd[names[n]], dtype=np.float64)  # noqa: E731
    wavelength = 10.0 ** col("loglam")
    flux, ivar = col("flux"), col("ivar")
    mask = (np.asarray(coadd[names["and_mask"]]).astype(np.int64) & SDSS_BAD_BITS) != 0
    wdisp = col("wdisp")
    good_w = np.isfinite(wdisp) & (wdisp > 0)
    if not good_w.any():
        raise ValueError(f"{path}: field 'wdisp': no positive line-spread width")
    wdisp = np.where(good_w, wdisp, np.median(wdisp[good_w]))
    resolution = 1.0 / (FWHM_PER_SIGMA * wdisp * 1e-4 * np.log(10.0))
    flux, ivar, mask, n_invalid = mask_invalid(flux, ivar, mask)

    def field(name, default=None):
        if specobj is not None and name in specobj.array.names:
            return specobj[name]
        return header.get(name, default)

    ra, dec = field("PLUG_RA"), field("PLUG_DEC")
    if ra is None or dec is None:
        ra, dec = header.get("RA"), header.get("DEC")
    plate, mjd, fiber = field("PLATE"), field("MJD"), field("FIBERID")
    oid = (f"sdss-{int(plate):04d}-{int(mjd)}-{int(fiber):04d}" if None not in (plate, mjd, fiber)
           else coord_id("sdss", float(ra), float(dec)))
    spec = Spectrum(flux=flux, ivar=ivar, mask=mask, wavelength=wavelength, instrument="sdss",
                    resolution=resolution.astype(np.float32))
    records = {"spectrum.sdss": spec}
    z = field("Z")
    if z is not None and np.isfinite(z):
        zerr = field("Z_ERR", 0.0)
        records["scalar.redshift"] = Scalar("redshift", float(z), float(max(zerr, 0.0)))
    meta = dict(ra=float(ra), dec=float(dec), source=str(path), kind="sdss", n_invalid=n_invalid,
                object_class=str(field("CLASS", "")).strip())
    return Sample(object_id=oid, records=records, meta=meta).validate()


def desi_resolution(res: np.ndarray, wavelength: np.ndarray, default: float) -> np.ndarray:
    """(n_diag, L) resolution-matrix diagonals of one fibre -> (L,) R = lambda / FWHM, with
    FWHM = 2.3548 * RMS width (pixels, negative side lobes clipped) * 0.8 A."""
    n_diag = res.shape[0]
    k = np.arange(n_diag, dtype=np.float64)[:, None] - n_diag // 2        # (n_diag, 1) offsets
    w = np.clip(res.astype(np.float64), 0.0, None)                          # (n_diag, L)
    norm = w.sum(axis=0)
    ok = norm > 0
    mean = np.where(ok, (k * w).sum(axis=0) / np.where(ok, norm, 1), 0.0)
    var = np.where(ok, (k ** 2 * w).sum(axis=0) / np.where(ok, norm, 1) - mean ** 2, 0.0)
    ok &= var > 0
    fwhm = FWHM_PER_SIGMA * np.sqrt(np.where(ok, var, 1.0)) * DESI_DLAMBDA
    return np.where(ok, wavelength / fwhm, default)


def join_arms(wavelengths, fluxes, ivars, masks, resolutions, source: str = "desi"):
    """Join arm spectra on one increasing grid of step 0.8 A. Overlapping pixels become
    the inverse-variance-weighted mean of the unmasked arm pixels (ivar summed); R the
    ivar-weighted mean (plain mean where no arm has data). Returns
    (wavelength, flux, ivar, mask, resolution), each (L,)."""
    lo = min(w[0] for w in wavelengths)
    hi = max(w[-1] for w in wavelengths)
    n = int(round((hi - lo) / DESI_DLAMBDA)) + 1
    grid = lo + DESI_DLAMBDA * np.arange(n)                                 # (L,)
    wsum, fsum = np.zeros(n), np.zeros(n)
    rsum_w, rsum, rcount = np.zeros(n), np.zeros(n), np.zeros(n)
    for arm, (w, f, iv, m, r) in enumerate(zip(wavelengths, fluxes, ivars, masks, resolutions)):
        idx = np.rint((w - lo) / DESI_DLAMBDA).astype(int)
        off = np.abs(grid[idx] - w).max()
        if off > 1e-3:
            raise ValueError(f"{source}: arm {arm} wavelengths are off the common 0.8 A grid by {off:.4f} A")
        good = ~m & np.isfinite(f) & np.isfinite(iv) & (iv > 0)
        weight = np.where(good, iv, 0.0)
        np.add.at(wsum, idx, weight)
        np.add.at(fsum, idx, weight * np.where(good, f, 0.0))
        np.add.at(rsum_w, idx, weight * r)
        np.add.at(rsum, idx, r)
        np.add.at(rcount, idx, 1.0)
    has = wsum > 0
    flux = np.where(has, fsum / np.where(has, wsum, 1.0), 0.0)
    resolution = np.where(has, rsum_w / np.where(has, wsum, 1.0), rsum / np.maximum(rcount, 1))
    return grid, flux, wsum, ~has, resolution


def read_desi(path: str | Path) -> tuple[list[Sample], dict[str, int]]:
    """A DESI coadd file -> (one Sample per FIBERMAP row with OBJTYPE 'TGT', {why: number
    of dropped rows}); why is the OBJTYPE ('SKY', '(blank)') or 'TGT (no data)' for a
    target whose every pixel has ivar 0. Each Sample holds 'spectrum.desi' (B, R, Z joined, 3600-9824 A) and
    'scalar.flux_g/r/z' (Legacy Surveys DR9 fluxes in nanomaggies, uncertainty from
    FLUX_IVAR_*) where measured (FLUX_IVAR > 0)."""
    from astropy.io import fits
    path = Path(path)
    with fits.open(path) as hdul:
        fibermap = hdul["FIBERMAP"].data
        arms = {a: dict(wavelength=np.asarray(hdul[f"{a}_WAVELENGTH"].data, np.float64),
                        flux=np.asarray(hdul[f"{a}_FLUX"].data, np.float64),          # (F, L_arm)
                        ivar=np.asarray(hdul[f"{a}_IVAR"].data, np.float64),          # (F, L_arm)
                        mask=np.asarray(hdul[f"{a}_MASK"].data) != 0,                  # (F, L_arm)
                        res=np.asarray(hdul[f"{a}_RESOLUTION"].data, np.float32))      # (F, D, L_arm)
                for a in DESI_ARMS if f"{a}_FLUX" in hdul}
    if not arms:
        raise ValueError(f"{path}: no B/R/Z arm HDUs (B_FLUX, ...)")
    objtype = np.char.strip(np.asarray(fibermap["OBJTYPE"]).astype(str))
    dropped: dict[str, int] = {}
    for t in objtype[objtype != "TGT"]:
        why = str(t) or "(blank)"
        dropped[why] = dropped.get(why, 0) + 1
    samples = []
    for row in np.flatnonzero(objtype == "TGT"):
        fm = fibermap[row]
        oid = f"desi-{int(fm['TARGETID'])}"
        if not any((a["ivar"][row] > 0).any() for a in arms.values()):     # target without data
            dropped["TGT (no data)"] = dropped.get("TGT (no data)", 0) + 1
            continue
        parts = [(a["wavelength"], a["flux"][row], a["ivar"][row], a["mask"][row],
                  desi_resolution(a["res"][row], a["wavelength"], DESI_DEFAULT_R[name]))
                 for name, a in arms.items()]
        wavelength, flux, ivar, mask, resolution = join_arms(*zip(*parts), source=f"{path} {oid}")
        flux, ivar, mask, n_invalid = mask_invalid(flux, ivar, mask)
        records = {"spectrum.desi": Spectrum(flux=flux, ivar=ivar, mask=mask, wavelength=wavelength,
                                             instrument="desi", resolution=resolution.astype(np.float32))}
        for band in "grz":
            name, ivar_name = f"FLUX_{band.upper()}", f"FLUX_IVAR_{band.upper()}"
            if name in fibermap.columns.names:
                fivar = float(fm[ivar_name]) if ivar_name in fibermap.columns.names else 0.0
                if fivar > 0 and np.isfinite(fm[name]):
                    records[f"scalar.flux_{band}"] = Scalar(f"flux_{band}", float(fm[name]), float(fivar ** -0.5))
        meta = dict(ra=float(fm["TARGET_RA"]), dec=float(fm["TARGET_DEC"]), source=str(path), kind="desi",
                    n_invalid=n_invalid, targetid=int(fm["TARGETID"]), photometry="legacy_surveys_dr9")
        samples.append(Sample(object_id=oid, records=records, meta=meta).validate())
    return samples, dropped
