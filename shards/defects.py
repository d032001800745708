"""Bad pixels of a coadded cut-out: what gets masked, and how often.

    mask, counts = draw_defects((C, H, W), PixelDefects(), rng, pixel_rate=0.002)
    counts == {"pixel": 8, "cosmic_ray": 3, "bad_column": 0, "saturated": 0}

Kinds, each flagged with mask True (the caller sets ivar 0 there) and counted in pixels
(a pixel hit by several kinds counts once, for the first kind in this order):
- pixel:      isolated bad pixels, a fraction `pixel_rate` of all pixels;
- cosmic_ray: residual cosmic-ray tracks the coadd's outlier rejection flagged: a Poisson
              number per band of straight tracks 1-6 pixels long in a random direction;
- bad_column: a segment of a bad CCD column in one band (probability per band);
- saturated:  a saturated star in the cut-out (probability per cut-out): a masked core
              disc of radius 1.5-4 pixels in every band, plus the bleed trail that the
              overflowing charge leaves along the column, longer in redder bands where
              the star is brighter relative to the sky.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PixelDefects:
    """Rates of masked pixels in the simulated cut-outs.

    cosmic_rays:     mean number of flagged cosmic-ray tracks per band per cut-out.
    bad_columns:     probability that a band of a cut-out has a bad column segment.
    saturated_stars: probability that a cut-out holds a saturated star."""
    cosmic_rays: float = 0.3
    bad_columns: float = 0.02
    saturated_stars: float = 0.01

    def __post_init__(self):
        for name in ("cosmic_rays", "bad_columns", "saturated_stars"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"PixelDefects.{name}: must be a finite rate >= 0, got {v}")
        for name in ("bad_columns", "saturated_stars"):
            if getattr(self, name) > 1:
                raise ValueError(f"PixelDefects.{name}: a probability, got {getattr(self, name)}")


KINDS = ("pixel", "cosmic_ray", "bad_column", "saturated")


def _track(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (rows, cols) of a straight track of 1-6 pixels from a random start."""
    length = int(rng.integers(1, 7))
    angle = rng.uniform(0, np.pi)
    t = np.arange(length)
    y = np.round(rng.uniform(0, h) + t * np.sin(angle)).astype(int)
    x = np.round(rng.uniform(0, w) + t * np.cos(angle)).astype(int)
    keep = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    return y[keep], x[keep]


def draw_defects(shape: tuple[int, int, int], defects: PixelDefects, rng: np.random.Generator,
                 pixel_rate: float = 0.0) -> tuple[np.ndarray, dict[str, int]]:
    """(mask (C, H, W) bool, {kind: masked pixels}) for one cut-out."""
    c_n, h, w = shape
    kind = np.zeros(shape, np.int8)                     # 0 = good, else 1 + KINDS index
    layers = {k: np.zeros(shape, bool) for k in KINDS}
    layers["pixel"] = rng.random(shape) < pixel_rate
    for c in range(c_n):
        for _ in range(rng.poisson(defects.cosmic_rays)):
            y, x = _track(h, w, rng)
            layers["cosmic_ray"][c, y, x] = True
        if rng.random() < defects.bad_columns:
            col, lo = rng.integers(w), rng.integers(h)
            layers["bad_column"][c, lo:lo + rng.integers(3, h + 1), col] = True
    if rng.random() < defects.saturated_stars:
        yc, xc = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(1.5, 4.0)
        yy, xx = np.mgrid[:h, :w] + 0.5
        core = np.hypot(yy - yc, xx - xc) < radius                        # (H, W)
        half_width = int(rng.integers(0, 2))                              # bleed 1 or 3 columns wide
        for c in range(c_n):
            bleed = radius * rng.uniform(1.5, 4.0) * (1 + 0.5 * c / max(c_n - 1, 1))
            trail = (np.abs(xx - xc) < half_width + 0.5) & (np.abs(yy - yc) < bleed)
            layers["saturated"][c] = core | trail
    for i, k in reversed(list(enumerate(KINDS))):       # the first kind wins where they overlap
        kind[layers[k]] = i + 1
    counts = {k: int((kind == i + 1).sum()) for i, k in enumerate(KINDS)}
    return kind > 0, counts
