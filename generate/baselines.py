"""What an astronomer does without the model: the classical baselines we compare with.

- `resample_image`: survey translation the classical way.
  1. resample the source image onto the target's pixel grid (bilinear; both stamps
     centred on the object; flux per pixel scaled by the pixel-area ratio) and convert
     the zero point;
  2. match the PSF: each band is convolved with the kernel that takes the source PSF to
     the target PSF, K = T_target T_source / (T_source^2 + lambda) in Fourier space
     (Moffat transfer functions of the records' own per-band FWHM times the pixel
     responses, and the resampling's for the source; `lambda` the Wiener
     regulariser: a target PSF sharper than the source one is a deconvolution, which
     amplifies noise; `fit_psf_regulariser` picks lambda on training pairs; the kernel
     is normalised to keep the total flux);
  3. scale each target band from the nearest source band by its colour term: the
     magnitude offset m_target - m_source = a + b (source colour), a colour equation
     fitted on training pairs (`fit_colour_terms`), with the colour of the two source
     bands bracketing the target band measured in an aperture on the source image.
- `interpolate_spectrum`: super-resolution by linear interpolation of the source spectrum
  onto the target grid (NaN and masked outside the source range).
- `catalog_profile_image`: an image from catalog values the classical way: a round
  exponential disk of the catalog's half-light radius and per-band fluxes (a point source
  where r_half is 0), convolved with the survey's PSF (Moffat of the template's FWHMs) and
  pixelated; what the catalog alone says, with no shape or orientation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from ..shards import bands as band_registry
from ..shards.render import IMAGING, Profile, moffat_otf, render
from ..shards.schema import Image, Spectrum

APERTURE_ARCSEC = 2.5     # radius of the aperture the source colours are measured in


def band_wavelength(band: str) -> float:
    return band_registry.get(band).effective_wavelength


def nearest_band(target_band: str, source_bands) -> int:
    lam = band_wavelength(target_band)
    return int(np.argmin([abs(band_wavelength(b) - lam) for b in source_bands]))


def colour_pair(target_band: str, source_bands) -> tuple[int, int]:
    """Indices (blue, red) of the source bands bracketing the target band's wavelength
    (the two bluest or reddest where it lies outside them)."""
    lam = np.array([band_wavelength(b) for b in source_bands])
    order = np.argsort(lam)
    k = int(np.clip(np.searchsorted(lam[order], band_wavelength(target_band)), 1, len(lam) - 1))
    return int(order[k - 1]), int(order[k])


def stamp_centre(n: int) -> int:
    """Pixel index of the object along a stamp axis of n pixels: the centre of pixel n // 2
    (the simulated sky and the cut-outs put the object there; for even n that is half a
    pixel off the geometric centre (n - 1) / 2)."""
    return n // 2


def ab_nanomaggies(image: Image) -> float:
    """Factor turning the image's flux units into nanomaggies (zero point 22.5)."""
    return 10 ** (-0.4 * (image.zero_point - 22.5))


def aperture_fluxes(image: Image, radius_arcsec: float = APERTURE_ARCSEC) -> np.ndarray:
    """(C,) flux in nanomaggies inside a circular aperture about the stamp centre (masked
    pixels replaced by the band's median)."""
    c, h, w = image.flux.shape
    y, x = (np.mgrid[:h, :w] - np.array([stamp_centre(h), stamp_centre(w)])[:, None, None]) * image.pixel_scale
    inside = x ** 2 + y ** 2 <= radius_arcsec ** 2
    out = np.empty(c)
    for j in range(c):
        plane = np.where(image.mask[j], np.median(image.flux[j][~image.mask[j]]) if (~image.mask[j]).any() else 0.0,
                         image.flux[j])
        out[j] = plane[inside].sum()
    return out * ab_nanomaggies(image)


def _colour(fluxes: np.ndarray, blue: int, red: int) -> np.ndarray:
    """-2.5 log10(f_blue / f_red), fluxes floored at 1e-3 of the red flux for faint/negative ones."""
    fb, fr = fluxes[..., blue], fluxes[..., red]
    fr = np.maximum(fr, 1e-6)
    return -2.5 * np.log10(np.maximum(fb, 1e-3 * fr) / fr)


@dataclass
class ColourTerms:
    """Per target band j: m_target_j - m_source[nearest_j] = offset_j + slope_j * colour_j,
    colour_j = m_source[blue_j] - m_source[red_j] (clipped to colour_range_j)."""
    nearest: list[int]
    blue: list[int]
    red: list[int]
    offset: np.ndarray
    slope: np.ndarray
    colour_range: np.ndarray   # (C_target, 2)

    def flux_ratios(self, source_fluxes: np.ndarray) -> np.ndarray:
        """(C_target,) target/source flux ratios for an object of these source fluxes (C_source,)."""
        out = np.empty(len(self.nearest))
        for j in range(len(self.nearest)):
            col = np.clip(_colour(source_fluxes, self.blue[j], self.red[j]), *self.colour_range[j])
            out[j] = 10 ** (-0.4 * (self.offset[j] + self.slope[j] * col))
        return out


def fit_colour_terms(pairs, source_bands, target_bands) -> ColourTerms:
    """Fit the colour equations on (source Image, target Image) training pairs (noiseless
    or observed; total fluxes are used). Objects with non-positive fluxes are left out;
    a band with fewer than 5 usable objects gets a colour-free offset (slope 0)."""
    pairs = list(pairs)
    src_tot = np.array([s.flux.sum((1, 2)) * ab_nanomaggies(s) for s, _ in pairs])   # (N, Cs)
    tgt_tot = np.array([t.flux.sum((1, 2)) * ab_nanomaggies(t) for _, t in pairs])   # (N, Ct)
    nearest, blue, red, offset, slope, ranges = [], [], [], [], [], []
    for j, b in enumerate(target_bands):
        i = nearest_band(b, source_bands)
        bl, rd = colour_pair(b, source_bands)
        good = (src_tot[:, i] > 0) & (tgt_tot[:, j] > 0) & (src_tot[:, bl] > 0) & (src_tot[:, rd] > 0)
        dm = -2.5 * np.log10(tgt_tot[good, j] / src_tot[good, i])
        col = _colour(src_tot[good], bl, rd)
        if good.sum() >= 5:
            s, o = np.polyfit(col, dm, 1)
            lo, hi = np.percentile(col, [1, 99])
        else:
            s, o, lo, hi = 0.0, float(np.median(dm)) if good.any() else 0.0, -10.0, 10.0
        nearest.append(i), blue.append(bl), red.append(rd), offset.append(o), slope.append(s), ranges.append((lo, hi))
    return ColourTerms(nearest, blue, red, np.array(offset), np.array(slope), np.array(ranges))


def _moffat_beta(survey: str) -> float:
    return IMAGING[survey].moffat_beta if survey in IMAGING else 3.5


def box_otf(ky: np.ndarray, kx: np.ndarray, pixel: float) -> np.ndarray:
    """Transfer function of a square pixel of side `pixel` arcsec at frequencies (ky, kx)
    in cycles/arcsec (broadcast): the pixel response."""
    return np.sinc(ky * pixel) * np.sinc(kx * pixel)


def psf_matching_kernel(src: Image, like: Image, shape: tuple[int, int], regulariser: float) -> np.ndarray:
    """(C_target, *shape) Fourier-space kernel taking the nearest source band's effective
    PSF to each target band's on `like`'s pixel grid (rfft2 layout). Effective PSFs hold
    the optics (Moffat of the record's FWHM) and the pixel response (a box of the pixel
    size); the source's also the bilinear resampling (a triangle of its pixel size)."""
    ky = np.fft.fftfreq(shape[0], d=like.pixel_scale)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=like.pixel_scale)[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)                                          # cycles / arcsec
    src_fwhm = np.asarray(src.psf_fwhm)[[nearest_band(b, src.bands) for b in like.bands]]
    t_src = moffat_otf(src_fwhm, _moffat_beta(src.survey), k) * box_otf(ky, kx, src.pixel_scale) ** 3   # (C, ky, kx)
    t_tgt = moffat_otf(np.asarray(like.psf_fwhm), _moffat_beta(like.survey), k) * box_otf(ky, kx, like.pixel_scale)
    kernel = t_tgt * t_src / (t_src ** 2 + regulariser)
    return kernel / kernel[:, :1, :1]                                       # total flux kept


def resample_image(src: Image, like: Image, colour_terms: ColourTerms | None = None,
                   psf_regulariser: float | None = 0.05) -> Image:
    """The source image on `like`'s grid, bands and units (see the module docstring).
    psf_regulariser None: no PSF matching (the source PSF stays)."""
    _, h, w = like.flux.shape
    _, hs, ws = src.flux.shape
    # target pixel centres in arcsec from the stamp centre -> source pixel coordinates
    y = (np.arange(h) - stamp_centre(h)) * like.pixel_scale / src.pixel_scale + stamp_centre(hs)
    x = (np.arange(w) - stamp_centre(w)) * like.pixel_scale / src.pixel_scale + stamp_centre(ws)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    area = (like.pixel_scale / src.pixel_scale) ** 2
    zp = 10 ** (0.4 * (like.zero_point - src.zero_point))
    ratios = None if colour_terms is None else colour_terms.flux_ratios(aperture_fluxes(src))
    flux = np.zeros(like.flux.shape, np.float32)
    for j, b in enumerate(like.bands):
        i = nearest_band(b, src.bands)
        plane = np.where(src.mask[i], np.median(src.flux[i][~src.mask[i]]) if (~src.mask[i]).any() else 0.0, src.flux[i])
        term = 1.0 if ratios is None else ratios[j]
        flux[j] = map_coordinates(plane, [yy, xx], order=1, mode="constant") * area * zp * term
    if psf_regulariser is not None:
        pad = (2 * h, 2 * w)   # zero padding against wrap-around
        kernel = psf_matching_kernel(src, like, pad, psf_regulariser)      # (C, 2h, w + 1)
        flux = np.fft.irfft2(np.fft.rfft2(flux, s=pad) * kernel, s=pad)[:, :h, :w].astype(np.float32)
    return dataclasses.replace(like, flux=flux, mask=np.zeros_like(like.mask))


def fit_psf_regulariser(pairs, colour_terms: ColourTerms | None = None,
                        grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0)) -> float:
    """The Wiener regulariser of the lowest median reduced chi-square on (source observed,
    target noiseless truth, target observed) training triples."""
    pairs = list(pairs)
    scores = []
    for lam in grid:
        chi = [np.mean(((resample_image(s, t_obs, colour_terms, lam).flux - truth) ** 2 * t_obs.ivar)[~t_obs.mask])
               for s, truth, t_obs in pairs]
        scores.append(np.median(chi))
    return float(grid[int(np.argmin(scores))])


def interpolate_spectrum(src: Spectrum, like: Spectrum) -> Spectrum:
    good = ~src.mask
    flux = np.interp(like.wavelength, src.wavelength[good], src.flux[good], left=np.nan, right=np.nan)
    return dataclasses.replace(like, flux=flux.astype(np.float32), mask=~np.isfinite(flux))


def catalog_profile_image(sample, like: Image, flux_prefix: str = "scalar.flux_", size_key: str = "scalar.r_half") -> Image:
    """`like`'s survey image of the object's catalog values (see the module docstring): a
    band takes the catalog flux of the same name ('des.g' <- scalar.flux_g, nanomaggies),
    0 where the catalog has none; r_half (arcsec) 0 where the catalog has none."""
    if like.survey not in IMAGING:
        raise ValueError(f"catalog_profile_image: no imaging survey {like.survey!r}; known: {sorted(IMAGING)}")
    rec = sample.records.get(size_key)
    r_half = max(float(rec.value), 0.0) if rec is not None else 0.0
    units = 1.0 / ab_nanomaggies(like)                                   # nanomaggies -> the image's units
    flux = np.array([sample.records[k].value * units if (k := flux_prefix + b.split(".")[-1]) in sample.records
                     else 0.0 for b in like.bands])
    c, h, w = like.flux.shape
    pixels = render(Profile(r_bulge=0.0, r_disk=r_half, q=1.0, pa=0.0), np.zeros(c), flux,
                    np.asarray(like.psf_fwhm, np.float64), IMAGING[like.survey], h)
    return dataclasses.replace(like, flux=pixels.astype(np.float32))
