"""A spectrum seen through another spectrograph: the forward operator of data consistency
for super-resolution (`generate.consistency`).

    view = SpectrumView(sdss_record, desi_like)     # DESI grid -> SDSS pixels
    model = view(x)                                 # x (P, 1, L_desi) -> (P, 1, L_sdss)
    back = view.adjoint(r)                          # (P, 1, L_sdss) -> (P, 1, L_desi)

Each source pixel is the target spectrum broadened by the difference of the two line
spreads (Gaussians of FWHM lambda / R from each record's `resolution`) and averaged over
the source pixel's width: one sparse row of weights summing to 1 over the target pixels
within 4 sigma. Source pixels whose window leaves the target's range are not modelled
(`valid` 0). The two fibres see different shares of the galaxy (SDSS 3", DESI 1.5"), so
the model is multiplied by a smooth aperture ratio p(lambda) = c0 + c1 t, t = (lambda -
6500 A) / 3000 A, fitted to the data by weighted least squares on the prior (`calibrate`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..shards.schema import Spectrum

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
WINDOW_SIGMAS = 4.0


def pixel_edges(wavelength: np.ndarray) -> np.ndarray:
    """(L + 1,) edges of pixels centred on `wavelength` (midpoints, the ends mirrored)."""
    mid = (wavelength[1:] + wavelength[:-1]) / 2
    return np.concatenate([[2 * wavelength[0] - mid[0]], mid, [2 * wavelength[-1] - mid[-1]]])


class SpectrumView:
    def __init__(self, source: Spectrum, target: Spectrum):
        lt, ls = np.asarray(target.wavelength, np.float64), np.asarray(source.wavelength, np.float64)
        width = np.diff(pixel_edges(ls))                                        # (L_s,) Angstrom
        sig_s = ls / np.asarray(source.resolution, np.float64) / FWHM_PER_SIGMA
        sig_t = np.interp(ls, lt, lt / np.asarray(target.resolution, np.float64)) / FWHM_PER_SIGMA
        sigma = np.sqrt(np.maximum(sig_s ** 2 - sig_t ** 2, 0.0) + width ** 2 / 12)   # (L_s,)
        lo = np.searchsorted(lt, ls - WINDOW_SIGMAS * sigma)
        hi = np.searchsorted(lt, ls + WINDOW_SIGMAS * sigma)
        inside = (ls - WINDOW_SIGMAS * sigma >= lt[0]) & (ls + WINDOW_SIGMAS * sigma <= lt[-1])
        span = int(max(1, (hi - lo).max()))
        cols = lo[:, None] + np.arange(span)[None]                              # (L_s, K)
        use = (cols < hi[:, None]) & (cols < len(lt)) & inside[:, None]
        cols = np.minimum(cols, len(lt) - 1)
        dl = np.gradient(lt)
        weights = np.exp(-0.5 * ((lt[cols] - ls[:, None]) / sigma[:, None]) ** 2) * dl[cols] * use
        weights /= np.maximum(weights.sum(1, keepdims=True), 1e-300)
        rows = np.broadcast_to(np.arange(len(ls))[:, None], cols.shape)
        idx = torch.as_tensor(np.stack([rows[use], cols[use]]))
        vals = torch.as_tensor(weights[use])
        self.matrix = torch.sparse_coo_tensor(idx, vals, (len(ls), len(lt)), is_coalesced=True,
                                              check_invariants=False)   # row-major, unique: coalesced
        self.matrix_t = self.matrix.t().coalesce()
        self.shape = (1, len(lt))
        self.valid = torch.as_tensor(inside, dtype=torch.float64)[None, None]   # (1, 1, L_s)
        self.t = torch.as_tensor((ls - 6500.0) / 3000.0)
        self.ratio = torch.ones(len(ls), dtype=torch.float64)                  # p(lambda), see `calibrate`
        self.coefficients = (1.0, 0.0)

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.matrix, x[:, 0].T).T[:, None]               # (P, 1, L_s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (P, 1, L_t) -> (P, 1, L_s)."""
        return self._spread(x) * self.ratio

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """A^T: (P, 1, L_s) -> (P, 1, L_t)."""
        return torch.sparse.mm(self.matrix_t, (r[:, 0] * self.ratio).T).T[:, None]

    def calibrate(self, prior: torch.Tensor, data: torch.Tensor, weight: torch.Tensor) -> None:
        """Fit the aperture ratio c0 + c1 t so that p A(prior) matches `data` (1, 1, L_s) of
        inverse variance `weight`; left at 1 where the fit is degenerate or not positive."""
        m = self._spread(prior)[0, 0]
        w = (weight * self.valid)[0, 0]
        basis = torch.stack([m, m * self.t])                                   # (2, L_s)
        gram = (basis * w) @ basis.T
        rhs = (basis * w) @ data[0, 0]
        if torch.linalg.det(gram) <= 1e-12 * float(gram.diagonal().prod()):
            return
        c0, c1 = (float(v) for v in torch.linalg.solve(gram, rhs))
        ratio = c0 + c1 * self.t
        if not np.isfinite(c0) or float(ratio.min()) <= 0:
            return
        self.ratio, self.coefficients = ratio, (c0, c1)

    def extend(self, inner: np.ndarray, border: np.ndarray | float = 0.0) -> torch.Tensor:
        """The target grid is the whole domain: (P, 1, L_t) as a tensor (`border` unused)."""
        return torch.as_tensor(np.asarray(inner, np.float64)).clone()

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        return x
