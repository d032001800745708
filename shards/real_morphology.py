"""Real galaxy morphologies: HST COSMOS stamps as a ground-based survey sees them.

    galaxies = load_real_galaxies()                   # 100 RealGalaxy, ../shared/data/hst_cosmos
    gal = galaxies[7]
    flux = catalog_fluxes(gal, IMAGING["des"])         # (C,) from its HSC g,r,i,z,y magnitudes
    image, truth, pose = observe_real_galaxy(gal, flux, IMAGING["des"], size=32, rng=rng)
    # in the simulated sky: omnisky-shards simulate --set morphology=hst (or hst_catalog),
    # which calls observe_morphology for every galaxy

What GalSim's RealGalaxy does, with numpy FFTs. The HST/ACS F814W stamp (0.03"/pixel) is
the galaxy convolved with the HST PSF, pixel response included. In Fourier space
G(k) = I(k) / P_hst(k) is the galaxy itself; times the survey's coadd PSF and pixel
transfer functions it is the survey image. The division is well posed because the
survey PSF (0.6-1.1") is far wider than HST's (~0.1"): the survey transfer function has
fallen below 1e-6 long before P_hst(k) gets small, and modes where |P_hst| < 1e-2 or
|k| > 8 cycles/arcsec are dropped (a band-limited target, as GalSim's maxk).

The Fourier modes are direct transforms of the stamp and PSF on the lattice the survey
stamp needs (its period chosen so no wrapped light reaches the view), and the survey
image is evaluated exactly at the survey's pixel centres by a direct sum over the modes
(separable in x and y: small matrix products per band), so any pixel scale, sub-pixel
offset, rotation, flip and magnification costs the same: they only move the k vectors. Both stamp and PSF are referred to their light centroids, so the
galaxy's centroid lands on the requested position. Each stamp is first cleaned of the
HST noise away from the galaxy (`clean_stamp`: a soft detection footprint): scaled to a
bright simulated galaxy that noise would show as blotches. The noise within the
footprint stays part of the galaxy (GalSim would whiten it instead); `pick_real_galaxy`
prefers high signal-to-noise stamps for that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import bands as band_registry
from .defects import PixelDefects
from .psf import CoaddPSF, moffat_otf
from .render import ImagingSurvey, observe_scene
from .schema import Image

CATALOG = "real_galaxy_catalog_26_extension_example.fits"
PHOTOMETRY = "real_galaxy_catalog_26_extension_example_fits.fits"
HSC_COLUMNS = ("HSC_g", "HSC_r", "HSC_i", "HSC_z", "HSC_y")
HSC_BANDS = ("hsc.g", "hsc.r", "hsc.i", "hsc.z", "hsc.y")
K_MAX_HST = 8.0          # cycles/arcsec kept from the HST stamp (its PSF transfer ~0.05 there)
MIN_PSF_TRANSFER = 1e-2  # modes where |P_hst(k)| is below this are dropped
MIN_SURVEY_TRANSFER = 1e-6


@dataclass(frozen=True, eq=False)
class RealGalaxy:
    """One HST COSMOS galaxy.

    image:       (H, W) F814W flux per 0.03" pixel (arbitrary units; only shapes are used),
                 the stamp cleaned of the noise away from the galaxy (`clean_stamp`).
    psf:         (Hp, Wp) its HST PSF image, pixel response included, normalised to sum 1.
    pixel_scale: arcsec per pixel of both.
    hsc_mag:     (5,) HSC g, r, i, z, y AB magnitudes of the same object (catalog).
    zphot:       photometric redshift (catalog).
    r_half:      half-light radius of the PSF-deconvolved light, arcsec (from the stamp).
    snr:         the cleaned stamp's signal-to-noise ratio (sum over its footprint)."""
    index: int
    ident: int
    image: np.ndarray
    psf: np.ndarray
    pixel_scale: float
    hsc_mag: np.ndarray
    zphot: float
    r_half: float
    snr: float = np.inf


def _centroid(a: np.ndarray) -> tuple[float, float]:
    """(y, x) first moments, pixels from the array's corner pixel centre."""
    y, x = np.indices(a.shape)
    return float((a * y).sum() / a.sum()), float((a * x).sum() / a.sum())


def _half_light_radius(a: np.ndarray) -> float:
    """Radius (pixels) about the centroid holding half of the stamp's summed light."""
    cy, cx = _centroid(a)
    y, x = np.indices(a.shape)
    r = np.hypot(y - cy, x - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(a.ravel()[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])


def clean_stamp(raw: np.ndarray, noise: float, smooth: float = 2.0, threshold: float = 3.0,
                grow: int = 2) -> np.ndarray:
    """The stamp times a soft footprint of the central galaxy, so that the HST noise of
    the empty sky around it (which a bright rescaling would turn into visible blotches)
    is gone. Footprint: pixels where the stamp smoothed by a Gaussian of `smooth` pixels
    exceeds `threshold` times the smoothed noise (measured), grown by `grow` pixels (joining clumps
    of one galaxy), the connected part holding the brightest smoothed pixel of the
    stamp's central third, its edge softened over ~1.5 pixels."""
    from scipy.ndimage import binary_dilation, gaussian_filter, label
    smoothed = gaussian_filter(raw, smooth)
    # the noise of the smoothed stamp: no less than white noise's, and measured (robust
    # scatter of the stamp, mostly sky) since the drizzled HST noise is correlated
    mad = 1.4826 * np.median(np.abs(smoothed - np.median(smoothed)))
    sigma = max(noise / (2 * np.sqrt(np.pi) * smooth), mad)
    detected = binary_dilation(smoothed > threshold * sigma, iterations=grow)
    labels, _ = label(detected)
    h, w = raw.shape
    centre = smoothed[h // 3:h - h // 3, w // 3:w - w // 3]
    iy, ix = np.unravel_index(np.argmax(centre), centre.shape)
    galaxy = labels == labels[h // 3 + iy, w // 3 + ix]
    if not labels[h // 3 + iy, w // 3 + ix]:                           # nothing detected: keep all
        return raw
    return raw * gaussian_filter(galaxy.astype(np.float64), 1.5)


def hst_dir() -> Path:
    from .sed import shared_data_dir
    return shared_data_dir() / "hst_cosmos"


@lru_cache(maxsize=4)
def load_real_galaxies(path: str | None = None) -> tuple[RealGalaxy, ...]:
    """The RealGalaxyCatalog at `path` (default ../shared/data/hst_cosmos): the image and
    PSF of every row, joined by IDENT with the HSC photometry file."""
    from astropy.io import fits
    root = Path(path) if path else hst_dir()
    for name in (CATALOG, PHOTOMETRY):
        if not (root / name).exists():
            raise FileNotFoundError(f"real galaxies: {root / name} is missing")
    cat = fits.getdata(root / CATALOG, 1)
    phot = fits.getdata(root / PHOTOMETRY, 1)
    by_ident = {int(i): j for j, i in enumerate(phot["IDENT"])}
    images, psfs = {}, {}
    out = []
    for n, row in enumerate(cat):
        ident = int(row["IDENT"])
        if ident not in by_ident:
            raise ValueError(f"real galaxies: IDENT {ident} of {CATALOG} has no row in {PHOTOMETRY}")
        p = phot[by_ident[ident]]
        for store, col, hdu_col in ((images, "GAL_FILENAME", "GAL_HDU"), (psfs, "PSF_FILENAME", "PSF_HDU")):
            fname = str(row[col]).strip()
            if fname not in store:
                store[fname] = fits.open(root / fname, memmap=False)
        raw = np.asarray(images[str(row["GAL_FILENAME"]).strip()][int(row["GAL_HDU"])].data, np.float64)
        psf = np.asarray(psfs[str(row["PSF_FILENAME"]).strip()][int(row["PSF_HDU"])].data, np.float64)
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"real galaxies: IDENT {ident}: stamp has non-finite pixels")
        noise = float(np.sqrt(row["NOISE_VARIANCE"]))
        image = clean_stamp(raw, noise)
        if not image.sum() > 0:
            raise ValueError(f"real galaxies: IDENT {ident}: no light above the noise in the stamp")
        psf = psf / psf.sum()
        scale = float(row["PIXEL_SCALE"])
        r_obs, r_psf = _half_light_radius(image) * scale, _half_light_radius(psf) * scale
        out.append(RealGalaxy(n, ident, image, psf, scale,
                              np.array([float(p[c]) for c in HSC_COLUMNS]), float(p["ZPHOT"]),
                              float(np.sqrt(max(r_obs ** 2 - r_psf ** 2, (scale / 2) ** 2))),
                              float(image.sum() / (noise * np.sqrt((image > 0).sum())))))
    for h in (*images.values(), *psfs.values()):
        h.close()
    return tuple(out)


def catalog_fluxes(gal: RealGalaxy, survey: ImagingSurvey) -> np.ndarray:
    """(C,) fluxes in the survey's units for the galaxy's HSC magnitudes: exact for HSC
    bands, interpolated in magnitude against effective wavelength for others (held flat
    beyond g and y)."""
    lam_hsc = np.array([band_registry.get(b).effective_wavelength for b in HSC_BANDS])
    lam = np.array([band_registry.get(b).effective_wavelength for b in survey.bands])
    mag = np.interp(lam, lam_hsc, gal.hsc_mag)
    zp = np.array([band_registry.get(b).zero_point for b in survey.bands])
    return 10 ** (-0.4 * (mag - zp))


def _spectrum(a: np.ndarray, pixel_scale: float, freq: np.ndarray) -> np.ndarray:
    """(J, J) Fourier transform of the image `a` at frequencies freq (J,) cycles/arcsec on
    each axis ([ky, kx]), phase-referred to its light centroid: two matrix products."""
    cy, cx = _centroid(a)
    ey = np.exp(-2j * np.pi * freq[:, None] * (np.arange(a.shape[0]) - cy)[None] * pixel_scale)  # (J, H)
    ex = np.exp(-2j * np.pi * freq[:, None] * (np.arange(a.shape[1]) - cx)[None] * pixel_scale)  # (J, W)
    return ey @ a @ ex.T


def galaxy_modes(gal: RealGalaxy, cell: float, k_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PSF-deconvolved galaxy's Fourier modes on the lattice k = (i, j) / cell
    (cycles/arcsec, |k| <= k_max), half plane only (the image is real): kx, ky (K,) and
    G (K,) complex, normalised to G(0) = 1, centred on the galaxy's light centroid. Modes
    beyond K_MAX_HST or where |P_hst| < MIN_PSF_TRANSFER are dropped."""
    k_max = min(k_max, K_MAX_HST)
    n = int(np.floor(k_max * cell))
    freq = np.arange(-n, n + 1) / cell                                  # (J,)
    ky, kx = np.meshgrid(freq, freq, indexing="ij")                     # (J, J)
    spec_gal = _spectrum(gal.image, gal.pixel_scale, freq)
    spec_psf = _spectrum(gal.psf, gal.pixel_scale, freq)
    half = (ky > 0) | ((ky == 0) & (kx >= 0))
    keep = half & (np.hypot(kx, ky) <= k_max) & (np.abs(spec_psf) >= MIN_PSF_TRANSFER)
    modes = spec_gal[keep] / spec_psf[keep] / gal.image.sum()
    return kx[keep], ky[keep], modes


def render_real(gal: RealGalaxy, band_flux: np.ndarray, psf: CoaddPSF, survey: ImagingSurvey,
                size: int, rotation: float = 0.0, flip: bool = False, magnification: float = 1.0,
                offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Noiseless (C, size, size) survey image (flux per pixel) of `gal` with total flux
    band_flux (C,), rotated by `rotation` radians (after a flip of y if `flip`), its
    angular size times `magnification`, its centroid at the centre of pixel
    (size // 2, size // 2) plus offset (dx, dy) arcsec."""
    p = survey.pixel_scale
    fwhm_max = float(psf.fwhm.max())
    extent = max(gal.image.shape) * gal.pixel_scale * magnification
    # the sum is periodic with this cell: the nearest copy of the galaxy must put no light
    # (beyond its stamp plus 4 PSF FWHM: < 0.5% of a Moffat's light) on the view, whose
    # corners are size p / sqrt(2) out
    cell = size * p / np.sqrt(2) + extent / 2 + 4 * fwhm_max                    # arcsec
    # no coadd PSF transfers more than its sharpest exposure's Moffat: modes beyond the
    # frequency where that falls below MIN_SURVEY_TRANSFER are not needed
    k_tab = np.linspace(0.0, K_MAX_HST / magnification, 801, dtype=np.float32)
    bound = moffat_otf(np.array([psf.fwhm.min()]), psf.beta, k_tab)[0]
    k_cut = float(k_tab[np.flatnonzero(bound > MIN_SURVEY_TRANSFER).max()])
    # modes in the galaxy's own frame, where sizes are 1 / magnification of the survey's
    kx, ky, modes = galaxy_modes(gal, cell / magnification, k_cut * magnification)
    # the galaxy's frame -> the survey's: flip, rotate, magnify (k scales as 1 / size)
    ky = -ky if flip else ky
    c, s = np.cos(rotation), np.sin(rotation)
    kx, ky = (c * kx - s * ky) / magnification, (s * kx + c * ky) / magnification
    k = np.hypot(kx, ky).astype(np.float32)
    transfer = psf.otf(k) * (np.sinc(kx * p) * np.sinc(ky * p))[None]     # (C, K)
    keep = np.abs(transfer).max(0) > MIN_SURVEY_TRANSFER
    kx, ky, modes, transfer = kx[keep], ky[keep], modes[keep], transfer[:, keep]
    weight = np.where((kx == 0) & (ky == 0), 1.0, 2.0)                  # the other half plane
    coef = (p / cell) ** 2 * weight * modes * np.exp(-2j * np.pi * (kx * offset[0] + ky * offset[1]))
    pos = (np.arange(size) - size // 2) * p                               # pixel centres, arcsec
    ex = np.exp(2j * np.pi * kx[:, None] * pos[None])                    # (K, W)
    ey = np.exp(2j * np.pi * ky[:, None] * pos[None])                    # (K, H)
    out = np.empty((len(band_flux), size, size))
    for b, f in enumerate(np.asarray(band_flux, np.float64)):
        out[b] = ((ey * (f * coef * transfer[b])[:, None]).T @ ex).real   # (H, W)
    return out


def observe_real_galaxy(gal: RealGalaxy, band_flux: np.ndarray, survey: ImagingSurvey, size: int,
                        rng: np.random.Generator, seeing_scale: float = 1.0,
                        magnification: float = 1.0, offset: tuple[float, float] = (0.0, 0.0),
                        mask_rate: float = 0.002, defects: PixelDefects | None = None,
                        defect_counts: dict | None = None, pose: np.random.Generator | None = None
                        ) -> tuple[Image, np.ndarray, dict]:
    """A noisy `Image` of `gal` in a random orientation, its noiseless truth, and the
    orientation {'rotation': radians, 'flip': 0/1}, drawn from `pose` (default: rng);
    noise, PSF and masks as `render.observe_scene`."""
    pose = rng if pose is None else pose
    rotation, flip = float(pose.uniform(0, 2 * np.pi)), bool(pose.random() < 0.5)
    image, truth = observe_scene(
        lambda psf: render_real(gal, band_flux, psf, survey, size, rotation, flip, magnification, offset),
        survey, size, rng, seeing_scale, mask_rate, defects, defect_counts)
    return image, truth, dict(rotation=rotation, flip=float(flip))


MORPHOLOGIES = ("sersic", "hst", "hst_catalog")


def pick_real_galaxy(seed: int, index: int, r_half: float, galaxies: tuple[RealGalaxy, ...],
                     n_nearest: int = 10) -> tuple[RealGalaxy, float]:
    """The real galaxy standing in for object `index` of sky `seed` (the same in every
    survey): one of the `n_nearest` stamps of highest signal-to-noise among the
    2 n_nearest closest in log half-light radius to r_half (arcsec) (a rescaled stamp
    carries its own HST noise along), and the magnification (clipped to 0.5-2) that gives
    it that radius."""
    rng = np.random.default_rng([seed, index, 3])
    log_r = np.log(np.array([g.r_half for g in galaxies]))
    close = np.argsort(np.abs(log_r - np.log(max(r_half, 1e-3))), kind="stable")[:2 * n_nearest]
    nearest = close[np.argsort([-galaxies[j].snr for j in close], kind="stable")[:n_nearest]]
    gal = galaxies[int(nearest[rng.integers(len(nearest))])]
    return gal, float(np.clip(r_half / gal.r_half, 0.5, 2.0))


def observe_morphology(morphology: str, seed: int, index: int, params: dict, band_flux: np.ndarray,
                       survey: ImagingSurvey, size: int, rng: np.random.Generator,
                       seeing_scale: float, offset: tuple[float, float], mask_rate: float,
                       defects: PixelDefects | None = None, defect_counts: dict | None = None
                       ) -> tuple[Image, np.ndarray]:
    """A galaxy's image with a real HST morphology (`SkyConfig.morphology`):
    'hst':         the shape of a real galaxy of about the object's size (`pick_real_galaxy`),
                   with the object's own band fluxes `band_flux` (C,), so every modality
                   of the object stays consistent;
    'hst_catalog': the real galaxy as it is, as GalSim's RealGalaxy: its own size and its
                   catalog HSC magnitudes (`catalog_fluxes`); only the images show it.
    The orientation is drawn once per object, so every survey sees the same galaxy.
    Adds to params: hst_ident, hst_magnification, hst_rotation, hst_flip, and for
    'hst_catalog' hst_zphot and hst_mag_{g,r,i,z,y}."""
    if morphology not in MORPHOLOGIES[1:]:
        raise ValueError(f"SkyConfig.morphology: unknown {morphology!r}; known: {list(MORPHOLOGIES)}")
    galaxies = load_real_galaxies()
    gal, magnification = pick_real_galaxy(seed, index, params["r_half"], galaxies)
    if morphology == "hst_catalog":
        band_flux, magnification = catalog_fluxes(gal, survey), 1.0
        params.update(hst_zphot=gal.zphot, **{f"hst_mag_{b[-1]}": float(m) for b, m in zip(HSC_BANDS, gal.hsc_mag)})
    image, truth, pose = observe_real_galaxy(gal, band_flux, survey, size, rng, seeing_scale, magnification,
                                             offset, mask_rate, defects, defect_counts,
                                             pose=np.random.default_rng([seed, index, 4]))
    params.update(hst_ident=float(gal.ident), hst_magnification=magnification,
                  hst_rotation=pose["rotation"], hst_flip=pose["flip"])
    return image, truth
