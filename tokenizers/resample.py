"""Wavelength-grid operators of the spectrum tokenizer: native grid -> internal grid,
internal grid -> any target grid, and Gaussian line-spread broadening.

    M = rebin_matrix(native_ln, ln_min, ln_max, n)       # (n, L) sparse, overlap fractions
    A = resample_matrix(target_ln, ln_min, ln_max, n)    # (L_t, n) sparse, pixel means
    y_broad = gaussian_broaden(y, sigma_px)              # (B, n), sigma (B, n) internal pixels

The internal grid has n pixels uniform in ln(lambda) between ln_min and ln_max. Pixel
edges of an arbitrary grid are the mid-points between centres (the end pixels mirrored).

`rebin_matrix` (encode side) gives the fraction of native pixel j inside internal pixel i;
the tokenizer uses it for inverse-variance-weighted rebinning (see spectrum.py).

`resample_matrix` (decode side) is flux-conserving: row t is the mean over target pixel t
of the piecewise-linear interpolant through the internal samples (constant beyond the
first and last internal centre). Where target pixels are wider than internal ones it
averages (the flux density integrated over the pixel is conserved); where they are
narrower it reduces to linear interpolation. Target pixels entirely outside the internal
range get an empty row (the tokenizer masks them).

`gaussian_broaden` convolves each row with a Gaussian whose width varies along the row
(the line spread of an instrument whose resolving power varies with wavelength), in
internal pixels; widths below 0.05 pixel leave the sample unchanged.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

MAX_KERNEL_HALF_WIDTH = 256     # internal pixels; wider line spreads are truncated at 4 sigma of this


def pixel_edges(centres: np.ndarray) -> np.ndarray:
    """(L,) increasing pixel centres -> (L + 1,) edges: mid-points, end pixels mirrored."""
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _internal_units(ln_wl: np.ndarray, ln_min: float, ln_max: float, n: int) -> np.ndarray:
    """Pixel edges of a grid given by ln-lambda centres, in internal-pixel units (0 .. n)."""
    return (pixel_edges(ln_wl) - ln_min) / (ln_max - ln_min) * n


@lru_cache(maxsize=32)
def rebin_matrix(native_ln: bytes, ln_min: float, ln_max: float, n: int) -> scipy.sparse.csr_matrix:
    """(n, L) sparse M: M_ij = fraction of native pixel j inside internal pixel i."""
    ln_wl = np.frombuffer(native_ln, dtype=np.float64)                  # (L,)
    u = _internal_units(ln_wl, ln_min, ln_max, n)                       # (L+1,)
    lo, hi = u[:-1], u[1:]                                              # (L,)
    span = int(np.ceil((hi - lo).max())) + 1
    rows, cols, vals = [], [], []
    for k in range(span + 1):
        i = np.floor(lo).astype(np.int64) + k                           # (L,) candidate pixel
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None) / (hi - lo)
        ok = (overlap > 0) & (i >= 0) & (i < n)
        rows.append(i[ok]); cols.append(np.flatnonzero(ok)); vals.append(overlap[ok])
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n, len(ln_wl)))


@lru_cache(maxsize=32)
def resample_matrix(target_ln: bytes, ln_min: float, ln_max: float, n: int) -> scipy.sparse.csr_matrix:
    """(L_t, n) sparse A: (A y)_t = mean over target pixel t of the piecewise-linear
    interpolant of the internal samples y (knots at the internal centres)."""
    ln_wl = np.frombuffer(target_ln, dtype=np.float64)                  # (L_t,)
    v = np.clip(_internal_units(ln_wl, ln_min, ln_max, n) - 0.5, -0.5, n - 0.5)  # knots at 0..n-1
    a, b = v[:-1], v[1:]                                                # (L_t,) clipped bin ends
    width = b - a
    span = int(np.ceil(width.max())) + 1
    rows, cols, vals = [], [], []
    t_idx = np.arange(len(a))
    for k in range(span + 1):
        s = np.floor(a).astype(np.int64) + k                            # segment [s, s+1]
        t0 = np.clip(np.maximum(a, s) - s, 0, 1)
        t1 = np.clip(np.minimum(b, s + 1) - s, 0, 1)
        ok = (t1 > t0) & (width > 0)
        d1, d2 = (t1 - t0)[ok], (t1 ** 2 - t0 ** 2)[ok] / 2
        left, right = np.clip(s[ok], 0, n - 1), np.clip(s[ok] + 1, 0, n - 1)
        rows += [t_idx[ok], t_idx[ok]]
        cols += [left, right]
        vals += [(d1 - d2) / width[ok], d2 / width[ok]]
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(ln_wl), n))


def gaussian_broaden(y: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """y (B, n), sigma_px (B, n) Gaussian sigma in pixels at each output pixel -> (B, n).
    Kernels are normalised per pixel (a flat spectrum stays flat); edges replicate."""
    smax = float(sigma_px.max()) if sigma_px.numel() else 0.0
    if smax < 0.05:
        return y
    half = min(int(np.ceil(4 * smax)), MAX_KERNEL_HALF_WIDTH)
    k = torch.arange(-half, half + 1, device=y.device, dtype=y.dtype)  # (K,)
    s = sigma_px.clamp_min(1e-3)[..., None]                              # (B, n, 1)
    w = torch.exp(-0.5 * (k / s) ** 2)                                   # (B, n, K)
    windows = F.pad(y[:, None], (half, half), mode="replicate")[:, 0].unfold(-1, 2 * half + 1, 1)  # (B, n, K)
    return (windows * w).sum(-1) / w.sum(-1)
