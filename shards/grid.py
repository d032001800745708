"""A PNG grid of objects: one row per object, one column per (image survey, band) found in
the samples, then one panel with every spectrum (and its noiseless truth where stored).

    draw_grid(samples, "grid.png")      # samples: shards.schema.Sample

Images are shown with an asinh stretch scaled by each plane's robust noise; masked pixels
are drawn at the median. Spectra show unmasked pixels only. The row label gives the
object id and its redshift (true, else the catalog's scalar.redshift).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .schema import Image, Sample, Spectrum

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def stretch(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """asinh stretch scaled by a robust noise estimate (MAD of unmasked pixels), for display."""
    good = img[~mask] if mask is not None and (~mask).any() else img.ravel()
    med = np.median(good)
    scale = 1.4826 * np.median(np.abs(good - med)) + 1e-12
    shown = np.where(mask, med, img) if mask is not None else img
    return np.arcsinh((shown - med) / (3 * scale))


def image_columns(samples: list[Sample]) -> list[tuple[str, str]]:
    """[(modality key, band)] of every image plane in the samples, by key then band order."""
    columns: dict[str, list[str]] = {}
    for s in samples:
        for key, rec in s.records.items():
            if isinstance(rec, Image):
                bands = columns.setdefault(key, [])
                bands.extend(b for b in rec.bands if b not in bands)
    return [(k, b) for k in sorted(columns) for b in columns[k]]


def _label(s: Sample) -> str:
    z = s.params.get("z")
    if z is None and "scalar.redshift" in s.records:
        z = s.records["scalar.redshift"].value
    return f"{s.object_id}\nz={z:.3f}" if z is not None else s.object_id


def draw_grid(samples: list[Sample], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not samples:
        raise ValueError("draw_grid: no samples to draw")
    columns = image_columns(samples)
    spectra = sorted({k for s in samples for k, r in s.records.items() if isinstance(r, Spectrum)})
    n_img, n_spec = len(columns), 4 if spectra else 0
    fig = plt.figure(figsize=(1.3 * n_img + 1.5 * n_spec + 1, 1.4 * len(samples) + 0.4))
    grid = fig.add_gridspec(len(samples), max(n_img + n_spec, 1))
    for row, s in enumerate(samples):
        for col, (key, band) in enumerate(columns):
            ax = fig.add_subplot(grid[row, col])
            ax.set_xticks([]), ax.set_yticks([])
            rec = s.records.get(key)
            if rec is not None and band in rec.bands:
                c = rec.bands.index(band)
                ax.imshow(stretch(rec.flux[c], rec.mask[c]), origin="lower", cmap="gray")
            if row == 0:
                ax.set_title(band, fontsize=7)
            if col == 0:
                ax.set_ylabel(_label(s), fontsize=6)
        if not spectra:
            continue
        ax = fig.add_subplot(grid[row, n_img:])
        for key, color in zip(spectra, COLORS * len(spectra)):
            rec = s.records.get(key)
            if rec is None:
                continue
            good = ~rec.mask
            ax.plot(rec.wavelength[good], rec.flux[good], lw=0.3, color=color, alpha=0.6,
                    label=key.split(".", 1)[1])
            if key in s.truth:
                ax.plot(rec.wavelength, s.truth[key], lw=0.6, color=color)
        ax.tick_params(labelsize=6)
        if not ax.lines:
            ax.axis("off")
        if n_img == 0:
            ax.set_ylabel(_label(s), fontsize=6)
        if ax.lines:
            lo, hi = np.percentile(np.concatenate([line.get_ydata() for line in ax.lines]), [1, 99.5])
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.2 * (hi - lo))
            ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
