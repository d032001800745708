"""Data consistency for survey translation: the generated image, seen through the source
survey, made to agree with the source observation.

A translated image (say HSC-like, from a DES-like observation) is a draw from the model's
posterior, but the model never checks it against the pixels it was given: a sample's
flux or shape can be off by more than the source's noise allows. `refine_translation`
combines the two sources of information as Gaussians:

    prior       H ~ N(M, V)                M: the model's samples' mean, V: their variance
                                           plus (floor x target noise)^2 plus (fraction x
                                           M)^2 (the prior's width where the samples agree:
                                           the noise, and a share of the light itself)
    likelihood  D ~ N(A H, 1 / ivar_src)   D: the source observation, A: the source survey
                                           seen from the target's pixels (below)

and returns the posterior mean (A^T W A + V^-1)^-1 (A^T W D + V^-1 M), found by conjugate
gradients (W = ivar_src; a few thousand unknowns per object). Where the source carries the
information (bright, resolved light) the data win; where it does not (detail below the
source's PSF, the target's extra bands) the model's prior stays. The map is linear in M,
so refining each sample and then averaging equals refining the mean.

The forward operator A (target pixels -> source pixels), per source band i, from the
target band j nearest to it in wavelength:
  1. scale by the colour term: source / target flux of the band pair from colour
     equations (`baselines.fit_colour_terms`, target -> source, fitted on training pairs),
     evaluated at the prior mean's aperture colours;
  2. convolve with the kernel taking the target's effective PSF to the source's, K =
     T_src T_tgt / (T_tgt^2 + lambda) (Moffat transfer functions of the records' FWHMs
     times the pixel boxes), flux kept: where the source PSF is the broader one (DES-like
     seen from HSC-like pixels) lambda only guards against the target's zeros, the other
     way it bounds the sharpening; the FFTs pad the domain by the kernel's reach (the
     square holding all but 1e-4 of its absolute sum), not by the whole domain;
  3. sample bilinearly at the source pixel centres (the object on pixel n // 2 of both
     stamps, plus a sub-pixel shift fitted per object, `SourceView.fit_shift`), times the
     pixel-area ratio and the zero-point conversion.
The unknown image extends `margin_arcsec` beyond the source stamp so that light blurred
in from outside the target stamp has somewhere to come from; that border has prior mean 0
and only the floor's width, and is cut off at the end.

    cons = fit_consistency(pipe, pairs, "image.des", "image.hsc")    # colour terms + prior width,
                                                                     # from paired observations
    refined = refine_translation(source_record, samples, cons)       # one object's samples ->
                                                                     # as many refined Images
    pipe.translate(objects, consistency=cons, n_samples=8)           # the same, in the pipeline

Spectra take the same calls (SDSS-like -> DESI-like super-resolution, its forward operator
the source's line spread, pixels and fibre aperture, and emission lines where the redshift
is known): `generate.spectrum_consistency`.

`fit_consistency` needs no truth: the colour equations come from the pairs' total fluxes
and the prior's width (floor, fraction) is the one of a grid whose refined images lie
closest to the pairs' observed target images (median reduced chi-square; the target's
noise is independent of the source's, so this ranks widths as the chi-square against the
truth would, plus 1).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.fft import next_fast_len

from ..shards.schema import Image, Spectrum
from .baselines import (ColourTerms, _moffat_beta, aperture_fluxes, box_otf, fit_colour_terms, nearest_band,
                        stamp_centre)
from ..shards.render import moffat_otf
from .measure import noise_variance

MARGIN_ARCSEC = 1.0        # unknown image beyond the source stamp, each side
KERNEL_REGULARISER = 1e-3  # lambda of the target -> source PSF kernel
FLOORS = (0.5, 1.0, 2.0, 3.0, 5.0)          # the grid `fit_consistency` picks the prior's width from:
FRACTIONS = (0.0, 0.1, 0.2, 0.4)            # floors (x the target noise) x fractions (of the prior mean)


@dataclass
class Consistency:
    """What refining a translation source -> target needs: the colour equations from the
    target's bands to the source's (images; None for spectra), and the prior's width: `floor`
    (in units of the target's noise) and `fraction` (of the samples' mean), in quadrature
    with the samples' spread."""
    source: str
    target: str
    terms: ColourTerms | None
    floor: float
    fraction: float = 0.0            # prior width also this fraction of the prior mean
    fit: dict | None = None          # "floor,fraction" -> median chi2 on the fitting pairs, when fitted
    line_ew: float | None = None     # spectra: the prior width of the emission lines' equivalent widths
                                     # (Angstrom), fitted where the redshift is known; None: no lines

    def to_json(self) -> dict:
        terms = None if self.terms is None else {
            k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self.terms).items()}
        return dict(source=self.source, target=self.target, floor=self.floor, fraction=self.fraction,
                    terms=terms, fit=self.fit, line_ew=self.line_ew)

    @classmethod
    def from_json(cls, d: dict) -> "Consistency":
        unknown = set(d) - {"source", "target", "floor", "fraction", "terms", "fit", "line_ew"}
        if unknown:
            raise ValueError(f"Consistency: unknown key(s) {sorted(unknown)}")
        t = d.get("terms")
        terms = None if t is None else ColourTerms(
            nearest=list(t["nearest"]), blue=list(t["blue"]), red=list(t["red"]), offset=np.asarray(t["offset"]),
            slope=np.asarray(t["slope"]), colour_range=np.asarray(t["colour_range"]))
        return cls(d["source"], d["target"], terms, float(d["floor"]), float(d.get("fraction", 0.0)), d.get("fit"),
                   d.get("line_ew"))


class SourceView:
    """The forward operator A for one object: target-grid images (S, Ct, n_y, n_x) on the
    extended domain -> source-survey models (S, Cs, hs, ws), a linear torch map (float64),
    with its exact transpose (`adjoint`): both a few FFTs and a gather / scatter."""

    def __init__(self, source: Image, target: Image, ratios: np.ndarray, margin_arcsec: float = MARGIN_ARCSEC):
        ct, h, w = target.flux.shape
        cs, hs, ws = source.flux.shape
        scale = source.pixel_scale / target.pixel_scale                     # source px in target px
        half = max(hs, ws) / 2 * scale + margin_arcsec / target.pixel_scale
        self.pad = max(0, int(math.ceil(half - min(h, w) / 2)))
        n_y, n_x = h + 2 * self.pad, w + 2 * self.pad
        self.shape = (ct, n_y, n_x)
        self.inner = (slice(self.pad, self.pad + h), slice(self.pad, self.pad + w))
        self.nearest = [nearest_band(b, target.bands) for b in source.bands]
        zp = 10 ** (0.4 * (source.zero_point - target.zero_point))
        self.gain = torch.as_tensor(np.asarray(ratios) * scale ** 2 * zp, dtype=torch.float64)   # (Cs,)
        self.fft_shape, self.kernel = _psf_kernel(source, target, self.nearest, (n_y, n_x))
        # source pixel centres in target pixels of the extended domain (the object sits on
        # each stamp's `stamp_centre` pixel)
        self.ys = (np.arange(hs) - stamp_centre(hs)) * scale + self.pad + stamp_centre(h)      # (hs,)
        self.xs = (np.arange(ws) - stamp_centre(ws)) * scale + self.pad + stamp_centre(w)      # (ws,)
        self.scale = scale
        self.set_shift(0.0, 0.0)

    def set_shift(self, dx: float, dy: float) -> None:
        """Source pixel centres moved by (dx, dy) source pixels (see `fit_shift`)."""
        self.shift = torch.tensor([dx, dy], dtype=torch.float64)
        self.index, self.weight = self._bilinear(np.array([[dx, dy]]))
        self.index, self.weight = self.index[0], self.weight[0]              # (4, hs ws) each

    def _bilinear(self, shifts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear interpolation at the source pixel centres for K shifts (K, 2) (dx, dy in
        source pixels): flat indices into the extended domain and their weights, (K, 4, hs ws)
        each; corners outside the domain get weight 0."""
        _, n_y, n_x = self.shape
        y = self.ys[None, :, None] + shifts[:, 1, None, None] * self.scale                 # (K, hs, 1)
        x = self.xs[None, None, :] + shifts[:, 0, None, None] * self.scale                 # (K, 1, ws)
        y, x = np.broadcast_arrays(y, x)
        y0, x0 = np.floor(y), np.floor(x)
        fy, fx = y - y0, x - x0
        index, weight = [], []
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yy, xx = y0 + dy, x0 + dx
                inside = (yy >= 0) & (yy < n_y) & (xx >= 0) & (xx < n_x)
                index.append(np.where(inside, np.clip(yy, 0, n_y - 1) * n_x + np.clip(xx, 0, n_x - 1), 0))
                weight.append(np.where(inside, wy * wx, 0.0))
        k = len(shifts)
        return (torch.as_tensor(np.stack(index, 1).reshape(k, 4, -1), dtype=torch.long),
                torch.as_tensor(np.stack(weight, 1).reshape(k, 4, -1), dtype=torch.float64))

    def _blur(self, image: torch.Tensor) -> torch.Tensor:
        """(S, Ct, n_y, n_x) -> (S, Cs, n_y * n_x): each source band's view before sampling."""
        planes = image[:, self.nearest] * self.gain[:, None, None]              # (S, Cs, n_y, n_x)
        blurred = torch.fft.irfft2(torch.fft.rfft2(planes, s=self.fft_shape) * self.kernel, s=self.fft_shape)
        return blurred[..., :self.shape[1], :self.shape[2]].flatten(2)

    def _sample(self, flat: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(S, Cs, N) at the corners `index` (4, P) -> (S, Cs, P); or (Cs, N) at (K, 4, P) -> (Cs, K, P)."""
        return (flat[..., index] * weight).sum(-2)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image (S, Ct, n_y, n_x) -> (S, Cs, hs, ws) in source units."""
        out = self._sample(self._blur(image), self.index, self.weight)
        return out.reshape(*out.shape[:2], len(self.ys), len(self.xs))

    def fit_shift(self, image: torch.Tensor, data: torch.Tensor, weight: torch.Tensor,
                  max_pixels: float = 1.0, step: float = 0.125) -> tuple[float, float]:
        """Set the shift to the sub-pixel offset (a grid of `step` source pixels within
        +-max_pixels) at which the view of `image` (1, Ct, n_y, n_x) best matches `data`
        (1, Cs, hs, ws) of inverse variance `weight`: the two surveys' stamps are centred
        on the object only to within a pixel each. Returns (dx, dy)."""
        offsets = np.arange(-max_pixels, max_pixels + 1e-9, step)
        dx, dy = np.meshgrid(offsets, offsets, indexing="xy")
        shifts = np.stack([dx.reshape(-1), dy.reshape(-1)], -1)                # (K, 2)
        index, wts = self._bilinear(shifts)                                   # (K, 4, P)
        blurred = self._blur(image)[0]                                        # (Cs, N)
        views = self._sample(blurred, index, wts)                             # (Cs, K, P)
        chi2 = ((views - data[0].flatten(1)[:, None]) ** 2 * weight[0].flatten(1)[:, None]).sum((0, 2))   # (K,)
        best = int(torch.argmin(chi2))
        self.set_shift(float(shifts[best, 0]), float(shifts[best, 1]))
        return float(shifts[best, 0]), float(shifts[best, 1])

    def adjoint(self, residual: torch.Tensor) -> torch.Tensor:
        """A^T: (S, Cs, hs, ws) -> (S, Ct, n_y, n_x), the transpose of the linear map."""
        s, cs = residual.shape[:2]
        _, n_y, n_x = self.shape
        flat = torch.zeros((s, cs, n_y * n_x), dtype=torch.float64)
        spread = (residual.flatten(2)[..., None, :] * self.weight).flatten(2)            # (S, Cs, 4 P)
        flat.index_add_(2, self.index.flatten(), spread)
        planes = torch.fft.irfft2(torch.fft.rfft2(flat.view(s, cs, n_y, n_x), s=self.fft_shape)
                                  * self.kernel.conj(), s=self.fft_shape)[..., :n_y, :n_x]
        out = torch.zeros((s, *self.shape), dtype=torch.float64)
        out.index_add_(1, torch.as_tensor(self.nearest), planes * self.gain[:, None, None])
        return out


def _psf_kernel(source: Image, target: Image, nearest: list[int], shape: tuple[int, int],
                lost: float = 1e-4) -> tuple[tuple[int, int], torch.Tensor]:
    """The kernel taking the target's effective PSF (optics, pixel box and the bilinear
    sampling: a triangle of its pixel, box^2) to each source band's, K = T_src T_tgt / (T_tgt^2
    + lambda), flux kept. Its reach is the half-side of the smallest square holding all but
    `lost` of its absolute sum; returns the FFT shape (the domain `shape` plus that reach,
    rounded up to a fast FFT length, so the convolution wraps only that share around) and K
    on it (Cs, fft_y, fft_x // 2 + 1), complex128."""
    def transfer(fft_shape):
        ky = np.fft.fftfreq(fft_shape[0], d=target.pixel_scale)[:, None]
        kx = np.fft.rfftfreq(fft_shape[1], d=target.pixel_scale)[None, :]
        k = np.sqrt(ky ** 2 + kx ** 2)
        t_tgt = moffat_otf(np.asarray(target.psf_fwhm)[nearest], _moffat_beta(target.survey), k) \
            * box_otf(ky, kx, target.pixel_scale) ** 3
        t_src = moffat_otf(np.asarray(source.psf_fwhm), _moffat_beta(source.survey), k) \
            * box_otf(ky, kx, source.pixel_scale)
        kernel = t_src * t_tgt / (t_tgt ** 2 + KERNEL_REGULARISER)
        return kernel / kernel[:, :1, :1]
    big = (2 * shape[0], 2 * shape[1])
    real = np.fft.irfft2(transfer(big), s=big)                              # (Cs, 2n_y, 2n_x), origin at [0, 0]
    mass = np.abs(np.fft.fftshift(real, axes=(1, 2))).sum(0)
    cy, cx = shape
    total = mass.sum()
    reach = next((r for r in range(1, min(shape) + 1)
                  if mass[cy - r:cy + r + 1, cx - r:cx + r + 1].sum() >= (1 - lost) * total), min(shape))
    fft_shape = (next_fast_len(shape[0] + reach, real=True), next_fast_len(shape[1] + reach, real=True))
    return fft_shape, torch.as_tensor(transfer(fft_shape), dtype=torch.complex128)


class Refinement:
    """One object's refinement problem: the source view (its shift fitted to the samples'
    mean), the source data and weights, and the samples' mean and spread."""

    def __init__(self, source: Image, samples: Sequence[Image], terms: ColourTerms | None):
        if not samples:
            raise ValueError("refine_translation: needs at least one sample of the target image")
        self.like = like = samples[0]
        self.stack = np.stack([s.flux for s in samples]).astype(np.float64)   # (S, Ct, h, w)
        self.mean = self.stack.mean(0)
        self.spread = self.stack.var(0) if len(samples) > 1 else np.zeros_like(self.mean)
        self.noise_var = noise_variance(like.ivar, like.ivar > 0)                              # (Ct, h, w)
        ratios = np.ones(len(source.bands)) if terms is None else \
            terms.flux_ratios(aperture_fluxes(dataclasses.replace(like, flux=self.mean.astype(np.float32))))
        self.view = SourceView(source, like, ratios)
        self.w = torch.as_tensor(np.where(source.mask, 0.0, source.ivar), dtype=torch.float64)[None]
        self.data = torch.as_tensor(np.where(source.mask, 0.0, source.flux), dtype=torch.float64)[None]
        self.view.fit_shift(self._extend(self.mean[None]), self.data, self.w)

    def _extend(self, inner: np.ndarray, border: np.ndarray | float = 0.0) -> torch.Tensor:
        """(P, Ct, h, w) -> (P, Ct, n_y, n_x) on the extended domain, `border` (P, Ct) outside."""
        out = torch.zeros((len(inner), *self.view.shape), dtype=torch.float64)
        out += torch.as_tensor(np.asarray(border, np.float64)).reshape(-1, self.view.shape[0], 1, 1) \
            if np.ndim(border) else border
        iy, ix = self.view.inner
        out[:, :, iy, ix] = torch.as_tensor(inner)
        return out

    def solve(self, centres: np.ndarray, widths: Sequence[tuple[float, float]], iterations: int = 60,
              tol: float = 1e-6) -> np.ndarray:
        """Posterior means (P, Ct, h, w) for prior means `centres` (P, Ct, h, w) and prior
        widths `widths` [(floor, fraction)] * P: variance spread + (floor noise)^2 +
        (fraction mean)^2 inside the target stamp, (floor x the band's median noise)^2 outside."""
        floor = np.array([f for f, _ in widths])[:, None, None, None]
        frac = np.array([r for _, r in widths])[:, None, None, None]
        inner = self.noise_var * floor ** 2 + self.spread + (frac * self.mean) ** 2   # (P, Ct, h, w)
        border = np.median(self.noise_var, axis=(1, 2))[None] * floor[:, :, 0, 0] ** 2     # (P, Ct)
        std = self._extend(inner, border).sqrt()                              # (P, Ct, n_y, n_x)
        prior = self._extend(centres)
        view, w = self.view, self.w
        # x = M + std u minimises |W^1/2 (D - A x)|^2 + |u|^2:  (std A^T W A std + I) u = std A^T W (D - A M)
        rhs = std * view.adjoint(w * (self.data - view(prior)))
        u = conjugate_gradients(lambda v: std * view.adjoint(w * view(std * v)) + v, rhs, iterations, tol)
        iy, ix = view.inner
        return (prior + std * u)[:, :, iy, ix].numpy()


def refinement(source, samples: Sequence, consistency: Consistency, redshift: float | None = None):
    """One object's refinement problem for its kind: images (`Refinement`) or spectra
    (`generate.spectrum_consistency.SpectrumRefinement`; `redshift` places the emission lines)."""
    if isinstance(source, Spectrum):
        from .spectrum_consistency import SpectrumRefinement
        return SpectrumRefinement(source, samples, (consistency.fit or {}).get("aperture_ratio"), redshift)
    return Refinement(source, samples, consistency.terms)


def known_redshift(sample) -> float | None:
    """The object's catalog redshift, where it has one (a `scalar.redshift` record)."""
    rec = sample.records.get("scalar.redshift")
    return None if rec is None else float(rec.value)


def refine_translation(source: Image | Spectrum, samples: Sequence, consistency: Consistency,
                       priors: Sequence[np.ndarray] | None = None, iterations: int = 60,
                       tol: float = 1e-6, redshift: float | None = None) -> list:
    """Each of one object's generated target images pulled to the source observation (see
    the module docstring); their mean is the posterior-mean image.

    source:  the observed source-survey Image (flux, ivar, mask used).
    samples: the model's decoded target-survey Images of this object (1 or more; their
             ivar is the target's noise, which sets the floor's units). Each is the prior
             mean of its own refinement; all share the prior variance (their spread plus
             the floor's and the fraction's).
    priors:  other prior means (Ct, h, w) to refine instead of the samples, with the same
             variance, e.g. [the samples' mean] alone: the map is linear, so that gives the
             mean of the refined samples at 1/S of the cost.
    redshift: spectra only, the object's known redshift: the emission lines' fluxes are
             then fitted too (`generate.spectrum_consistency`)."""
    problem = refinement(source, samples, consistency, redshift)
    centres = problem.stack if priors is None else np.stack([np.asarray(p, np.float64) for p in priors])
    widths = [(consistency.floor, consistency.fraction)] * len(centres)
    refined = problem.solve(centres, widths, consistency.line_ew) if isinstance(source, Spectrum) else \
        problem.solve(centres, widths, iterations, tol)
    return [dataclasses.replace(problem.like, flux=r.astype(np.float32)) for r in refined]


def conjugate_gradients(op, rhs: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """Solve op(u) = rhs for a symmetric positive-definite linear `op`, independently for
    each leading index of rhs (S, ...): stops when every residual fell by `tol` (squared)."""
    dims = tuple(range(1, rhs.ndim))
    u = torch.zeros_like(rhs)
    r, p = rhs.clone(), rhs.clone()
    rr = (r * r).sum(dims, keepdim=True)
    stop = tol * rr
    for _ in range(iterations):
        if bool((rr <= stop).all()):
            break
        ap = op(p)
        alpha = rr / (p * ap).sum(dims, keepdim=True).clamp_min(1e-300)
        u, r = u + alpha * p, r - alpha * ap
        rr_new = (r * r).sum(dims, keepdim=True)
        p = r + (rr_new / rr.clamp_min(1e-300)) * p
        rr = rr_new
    return u


def fit_consistency(pipe, pairs: Sequence, source: str, target: str, floors: Sequence[float] | None = None,
                    fractions: Sequence[float] | None = None, n_samples: int = 8, seed: int = 0,
                    **schedule) -> Consistency:
    """Colour equations (target -> source bands, from the pairs' total fluxes) and the prior
    width (floor, fraction) of the grid floors x fractions whose refined translations (mean
    of `n_samples`) lie closest to the pairs' observed target images (median reduced
    chi-square). pairs: Samples holding both `source` and `target` records."""
    pairs = [s for s in pairs if source in s.records and target in s.records]
    if len(pairs) < 5:
        raise ValueError(f"fit_consistency: needs >= 5 objects with both {source} and {target}, got {len(pairs)}")
    gen = pipe.translate(pairs, source=source, target=target, seed=seed, n_samples=n_samples, **schedule)
    return fit_prior_width(pairs, gen, source, target, floors, fractions)


def fit_prior_width(pairs: Sequence, priors: Sequence[Sequence[Image]], source: str, target: str,
                    floors: Sequence[float] | None = None, fractions: Sequence[float] | None = None) -> Consistency:
    """`fit_consistency` for given prior images: priors[i] are the target-survey Images (the
    samples) of pairs[i], from the model or from anything else (e.g. the classical baseline,
    to measure what the refinement alone buys). Spectra: `spectrum_consistency.fit_spectrum_width`."""
    src0, tgt0 = pairs[0].records[source], pairs[0].records[target]
    if isinstance(src0, Spectrum):
        from .spectrum_consistency import fit_spectrum_width
        return fit_spectrum_width(pairs, priors, source, target, floors, fractions)
    floors, fractions = floors or FLOORS, fractions or FRACTIONS
    terms = fit_colour_terms([(s.records[target], s.records[source]) for s in pairs], tgt0.bands, src0.bands)
    widths = [(float(f), float(r)) for f in floors for r in fractions]
    chi = []                                                                  # (objects, widths)
    for s, g in zip(pairs, priors):
        problem = Refinement(s.records[source], g, terms)
        means = problem.solve(np.repeat(problem.mean[None], len(widths), 0), widths)
        chi.append([chi2_vs_observed(m, s.records[target]) for m in means])
    scores = np.median(np.array(chi), 0)
    floor, fraction = widths[int(np.argmin(scores))]
    return Consistency(source, target, terms, floor, fraction=fraction, fit=dict(
        n_objects=len(pairs), n_samples=len(priors[0]),
        median_chi2_vs_observed={f"{f:g},{r:g}": float(c) for (f, r), c in zip(widths, scores)}))


def chi2_vs_observed(model: np.ndarray, observed) -> float:
    """Mean chi2 per good pixel of `model` against the observed record (Image or Spectrum)."""
    good = ~observed.mask & (observed.ivar > 0)
    return float(np.mean((model[good] - observed.flux[good]) ** 2 * observed.ivar[good]))
