"""Shards benchmark: simulation objects/s per core, and streaming samples/s per DataLoader
worker for raw and token shards. Prints one JSON line.

    python bench/shards.py [--n 200] [--workers 2] [--stream-workers 2] [--tokens data/tokens/train]

Simulation runs `omnisky-shards simulate`'s code path (run_simulate) with --workers
processes; per core = objects/s / min(workers, CPU cores). Streaming reads the raw shards
just written, and token shards (--tokens, else synthetic token shards written here with
the token counts of the demo's modality set) through `shards.ranks.EpochStream`: once in
the main process (`*_in_process`: what one worker decodes per second), and in a torch
DataLoader with --stream-workers worker processes handing over lists of --batch decoded
samples (worker start-up included); per worker = samples/s / workers. `*_per_cpu_s` divide
by the CPU seconds spent (this process and its workers): a per-core rate that moves less
with the load of a shared machine than the wall-clock ones; the load average is printed
with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from omnisky.shards.cli import run_simulate
from omnisky.shards.codec import encode_tokens
from omnisky.shards.ranks import EpochStream
from omnisky.shards.sky import SkyConfig, warm_up
from omnisky.shards.writer import ShardWriter, read_manifest

# The demo's token modalities and their token counts (image 64, spectrum 64, scalars 1).
DEMO_TOKENS = {"image.des": 64, "image.hsc": 64, "spectrum.sdss": 64, "spectrum.desi": 64,
               "scalar.redshift": 1, "scalar.flux_g": 1, "scalar.flux_r": 1, "scalar.flux_i": 1,
               "scalar.flux_z": 1, "scalar.r_half": 1}


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("nan")


def synthetic_tokens(directory: Path, n: int, shard_size: int = 1000, seed: int = 0) -> None:
    """n token samples with DEMO_TOKENS' modalities (random ids < 1024) in shards of shard_size."""
    rng = np.random.default_rng(seed)
    with ShardWriter(directory, prefix="tok", max_count=shard_size, kind="tokens") as w:
        for i in range(n):
            tokens = {k: rng.integers(0, 1024, m).astype(np.int32) for k, m in DEMO_TOKENS.items()}
            w.write(f"tok-{i:07d}", encode_tokens(f"tok-{i:07d}", tokens, meta={"params": {"z": 0.1}}))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _as_list(batch: list) -> list:
    return batch


def stream_rate(directory: str | Path, decode: str, workers: int, batch_size: int) -> tuple[int, float, float]:
    """(samples, samples per wall second, per CPU second) of one epoch of `directory`: in the main process (workers 0),
    else in a DataLoader whose `workers` workers hand over lists of `batch_size` samples
    (worker start-up included)."""
    from torch.utils.data import DataLoader
    ds = EpochStream(directory, decode=decode, rank=0, world_size=1, seed=0)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if workers:
        n = sum(len(b) for b in DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_as_list))
    else:
        n = sum(1 for _ in ds)
    return n, rate(n, time.perf_counter() - t0), rate(n, cpu_seconds() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="objects to simulate")
    ap.add_argument("--workers", type=int, default=2, help="simulation processes")
    ap.add_argument("--shard-size", type=int, default=50, help="objects per simulated shard")
    ap.add_argument("--stream-workers", type=int, default=2, help="DataLoader workers for streaming")
    ap.add_argument("--batch", type=int, default=32, help="samples per DataLoader batch")
    ap.add_argument("--tokens", default=None, help="a token-shard folder to stream (default: synthetic)")
    ap.add_argument("--n-tokens", type=int, default=2000, help="synthetic token samples (without --tokens)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    warm_up()  # templates and photometry tables, built once in the parent before the workers fork
    out = dict(n=args.n, workers=args.workers, stream_workers=args.stream_workers, batch=args.batch, cpu_cores=cores)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        t0, c0 = time.perf_counter(), cpu_seconds()
        run_simulate(SkyConfig(n=args.n, seed=0), raw, shard_size=args.shard_size, workers=args.workers,
                     progress=False)
        sim = rate(args.n, time.perf_counter() - t0)
        out["simulate_objects_per_s"] = sim
        out["simulate_objects_per_s_per_core"] = round(sim / min(args.workers, cores), 1)
        out["simulate_objects_per_cpu_s"] = rate(args.n, cpu_seconds() - c0)
        out["raw_bytes_per_object"] = int(sum(s["bytes"] for s in read_manifest(raw)["shards"]) / args.n)
        _, out["stream_raw_samples_per_s_in_process"], out["stream_raw_samples_per_cpu_s_in_process"] = \
            stream_rate(raw, "raw", 0, args.batch)
        _, r, _ = stream_rate(raw, "raw", args.stream_workers, args.batch)
        out["stream_raw_samples_per_s"] = r
        out["stream_raw_samples_per_s_per_worker"] = round(r / args.stream_workers, 1)
        tokens = args.tokens
        if tokens is None:
            tokens = Path(tmp) / "tokens"
            synthetic_tokens(tokens, args.n_tokens)
            out["token_source"] = f"synthetic: {args.n_tokens} objects, {sum(DEMO_TOKENS.values())} tokens each"
        else:
            out["token_source"] = str(tokens)
        _, out["stream_token_samples_per_s_in_process"], out["stream_token_samples_per_cpu_s_in_process"] = \
            stream_rate(tokens, "tokens", 0, args.batch)
        _, r, _ = stream_rate(tokens, "tokens", args.stream_workers, args.batch)
        out["stream_token_samples_per_s"] = r
        out["stream_token_samples_per_s_per_worker"] = round(r / args.stream_workers, 1)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
