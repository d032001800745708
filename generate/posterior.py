"""A one-token scalar's posterior as a piecewise-uniform density over its quantile bins.

    q = bin_quantile(probs, edges, 0.84)     # (B,) the value below which 84% of the mass lies
    u = bin_pit(probs, edges, truth)         # (B,) the posterior CDF at the truth (PIT)

`probs` (B, V) are bin probabilities (the FM's softmax over the scalar's V bins), `edges`
(V + 1,) the tokenizer's bin edges in the scalar's units; within a bin the density is
uniform, so both functions are linear inside the bin they land in. For a calibrated
posterior the PIT values of true values are uniform on [0, 1].
"""
from __future__ import annotations

import numpy as np


def bin_quantile(probs: np.ndarray, edges: np.ndarray, q) -> np.ndarray:
    """(B,) quantile at level q (a float or (B,) levels in [0, 1])."""
    probs, edges = np.asarray(probs, np.float64), np.asarray(edges, np.float64)
    b, v = probs.shape
    q = np.broadcast_to(np.asarray(q, np.float64), (b,))
    cdf = np.cumsum(probs, axis=1)                                              # (B, V)
    i = np.clip((cdf < q[:, None]).sum(1), 0, v - 1)                            # bin crossing q
    rows = np.arange(b)
    below = np.where(i > 0, cdf[rows, i - 1], 0.0)
    frac = np.clip((q - below) / np.maximum(probs[rows, i], 1e-12), 0, 1)
    return edges[i] + frac * (edges[i + 1] - edges[i])


def bin_pit(probs: np.ndarray, edges: np.ndarray, x) -> np.ndarray:
    """(B,) posterior CDF at x (B,): 0 below the first edge, 1 above the last."""
    probs, edges = np.asarray(probs, np.float64), np.asarray(edges, np.float64)
    x = np.asarray(x, np.float64)
    v = probs.shape[1]
    rows = np.arange(len(x))
    i = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, v - 1)         # bin holding x
    cdf_lo = np.concatenate([np.zeros((len(x), 1)), np.cumsum(probs, axis=1)], 1)[rows, i]
    frac = np.clip((x - edges[i]) / np.maximum(edges[i + 1] - edges[i], 1e-300), 0, 1)
    return np.clip(cdf_lo + frac * probs[rows, i], 0.0, 1.0)
