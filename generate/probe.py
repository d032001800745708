"""Using embeddings downstream: a linear probe and a similarity search.

    emb = sky.embed(samples, given=["image.des"])            # (N, D)
    probe = LinearProbe.fit(emb[labelled], z[labelled])       # ridge, alpha by leave-one-out
    z_hat = probe.predict(emb)
    idx, sim = similarity_search(emb[:1], emb, k=5)           # the 5 most similar objects
    pcs = PrincipalComponents.fit(emb[labelled])               # features for a tree model
    x = np.hstack([fluxes, pcs.project(emb, k=8)])             # (N, F + 8)

The probe standardises the embeddings (train mean and scale), then fits ridge regression
in closed form for each alpha of a grid and keeps the one with the lowest exact
leave-one-out error (the hat-matrix shortcut), so a probe on a handful of labels is not
an overfit. Targets may be (N,) or (N, T).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = tuple(10.0 ** np.arange(-3, 5.5, 0.5))


@dataclass
class LinearProbe:
    mean: np.ndarray        # (D,)
    scale: np.ndarray       # (D,)
    weight: np.ndarray      # (D, T)
    bias: np.ndarray        # (T,)
    alpha: float
    loo_rmse: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alphas=ALPHAS) -> "LinearProbe":
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"LinearProbe.fit: x must be (N, D) and y (N,) or (N, T); got {x.shape}, {y.shape}")
        if len(x) < 3:
            raise ValueError(f"LinearProbe.fit: need at least 3 labelled objects, got {len(x)}")
        y2 = y.reshape(len(y), -1)
        mean, scale = x.mean(0), x.std(0) + 1e-8
        xs = (x - mean) / scale
        ym = y2.mean(0)
        yc = y2 - ym
        u, s, vt = np.linalg.svd(xs, full_matrices=False)                 # xs = u s vt
        best = None
        for a in alphas:
            d = s / (s ** 2 + a)                                           # (r,)
            w = vt.T @ (d[:, None] * (u.T @ yc))                           # (D, T)
            hat = (u ** 2) @ (s ** 2 / (s ** 2 + a)) + 1.0 / len(x)        # (N,) leverage incl. intercept
            loo = (yc - xs @ w) / np.maximum(1 - hat, 1e-6)[:, None]
            rmse = float(np.sqrt(np.mean(loo ** 2)))
            if best is None or rmse < best[0]:
                best = (rmse, a, w)
        rmse, a, w = best
        return cls(mean, scale, w, ym, float(a), rmse)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias
        return out[:, 0] if out.shape[1] == 1 else out


@dataclass
class PrincipalComponents:
    """The leading principal axes of a set of embeddings. A tree model fed the whole (N, D)
    embedding beside a few catalog features splits on its noise (the demo's redshift from
    fluxes + a 128-d image embedding: worse than the fluxes alone); its first k components
    (4 to 32 there, k chosen on held-out objects) carry what helps."""
    mean: np.ndarray        # (D,)
    axes: np.ndarray        # (r, D), rows by decreasing variance
    variance: np.ndarray    # (r,) variance along each axis

    @classmethod
    def fit(cls, x: np.ndarray) -> "PrincipalComponents":
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"PrincipalComponents.fit: x must be (N >= 2, D); got {x.shape}")
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, vt, s ** 2 / (len(x) - 1))

    def project(self, x: np.ndarray, k: int) -> np.ndarray:
        """(N, k) coordinates along the first k axes (all of them if fewer)."""
        return (np.asarray(x, np.float64) - self.mean) @ self.axes[:k].T


def similarity_search(queries: np.ndarray, pool: np.ndarray, k: int = 5,
                      exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each query (Q, D) to every pool row (N, D); returns the indices
    (Q, k) of the k most similar pool rows, best first, and their similarities (Q, k).
    exclude_self: the queries are pool rows 0..Q-1, and each is left out of its own list."""
    q = np.asarray(queries, np.float64)
    p = np.asarray(pool, np.float64)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"similarity_search: queries (Q, D) and pool (N, D) must share D; got {q.shape}, {p.shape}")
    k = min(k, len(p) - int(exclude_self))
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sim = qn @ pn.T                                                         # (Q, N)
    if exclude_self:
        sim[np.arange(len(q)), np.arange(len(q))] = -np.inf
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, 1)
