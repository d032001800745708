"""Data for bench/tokenizers.py: raw-shard samples, a simulated held-out sky, and the real
samples in ../shared/data read with omnisky's own readers.

    samples = load_samples(Path("demo_out/raw/train"), limit=2000)     # list of Sample
    heldout = simulate_heldout(200, seed=12345, workdir=tmp)           # raw-shard folder
    real_images(32)   # {'image.hsc': [...], 'image.legacy': [...]}: cut-outs tiled into 32x32 stamps
    real_spectra()    # [Spectrum]: DESI coadd targets (B, R, Z joined)
"""
from __future__ import annotations

from pathlib import Path

from omnisky.config import load_config
from omnisky.shards.reader import stream
from omnisky.shards.schema import Image, Spectrum
from omnisky.shards.writer import shard_urls

ROOT = Path(__file__).resolve().parents[1]


def load_samples(raw: Path, limit: int | None = None) -> list:
    out = []
    for s in stream(shard_urls(raw), decode="raw", shuffle=0, split=False):
        out.append(s)
        if limit and len(out) >= limit:
            break
    return out


def simulate_heldout(n: int, seed: int, workdir: Path) -> Path:
    from omnisky.shards.cli import run_simulate
    from omnisky.shards.sky import SkyConfig
    cfg = load_config(SkyConfig, ROOT / "launch/sky/tiny.yaml", {"n": n, "seed": seed})
    out = workdir / f"heldout-seed{seed}"
    run_simulate(cfg, out, shard_size=100, workers=1, progress=False)
    return out


def tiles(img: Image, size: int, stride: int) -> list[Image]:
    """size x size stamps of an Image on a grid of step `stride` (object ids get the offset)."""
    _, H, W = img.flux.shape
    out = []
    for y in range(0, H - size + 1, stride):
        for x in range(0, W - size + 1, stride):
            sl = (slice(None), slice(y, y + size), slice(x, x + size))
            out.append(Image(flux=img.flux[sl].copy(), ivar=img.ivar[sl].copy(), mask=img.mask[sl].copy(),
                             bands=img.bands, pixel_scale=img.pixel_scale, survey=img.survey,
                             zero_point=img.zero_point, psf_fwhm=img.psf_fwhm.copy(),
                             object_id=f"{img.object_id}-{y}-{x}"))
    return out


def real_images(size: int) -> dict[str, list[Image]]:
    """Real HSC (Cut_HSC*.fits, 50x50) and DECaLS (256x256) cut-outs tiled into size x size stamps."""
    from omnisky.shards.ingest import _psf_for
    from omnisky.shards.ingest_images import read_hsc, read_legacy
    from omnisky.shards.sed import shared_data_dir
    data = shared_data_dir()
    out: dict[str, list[Image]] = {"image.hsc": [], "image.legacy": []}
    for p in sorted((data / "hsc_cosmos").glob("Cut_HSC*.fits")):
        img = read_hsc(p, _psf_for(p, "hsc", {})).records["image.hsc"]
        out["image.hsc"] += tiles(img, size, max((img.flux.shape[1] - size) // 2, 1))
    for p in sorted((data / "decals").glob("cutout_*.fits")):
        img = read_legacy(p, _psf_for(p, "legacy", {})).records["image.legacy"]
        out["image.legacy"] += tiles(img, size, size)
    return {k: v for k, v in out.items() if v}


def real_spectra() -> list[Spectrum]:
    from omnisky.shards.ingest_spectra import read_desi
    from omnisky.shards.sed import shared_data_dir
    data = shared_data_dir()
    out = []
    for p in sorted(data.glob("desi*/coadd-*.fits")):
        samples, _ = read_desi(p)
        out += [s.records["spectrum.desi"] for s in samples if "spectrum.desi" in s.records]
    return out


