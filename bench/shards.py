"""Shards benchmark: simulation objects/s per core, and streaming samples/s for raw and
token shards, single process. Prints one JSON line.

    python bench/shards.py [--n 200] [--tokens demo_out/tokens/train]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from omnisky.shards.cli import run_simulate
from omnisky.shards.reader import stream
from omnisky.shards.sky import SkyConfig, warm_up
from omnisky.shards.writer import shard_urls


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="objects to simulate")
    ap.add_argument("--tokens", default=None, help="a token-shard folder to stream (optional)")
    args = ap.parse_args()
    warm_up()  # templates and photometry tables, built once per process
    out = {"n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_simulate(SkyConfig(n=args.n, seed=0), Path(tmp), shard_size=100, workers=1, progress=False)
        out["simulate_objects_per_s_per_core"] = rate(args.n, time.perf_counter() - t0)
        out["raw_bytes_per_object"] = int(sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / args.n)
        t0 = time.perf_counter()
        n = sum(1 for _ in stream(shard_urls(tmp), decode="raw"))
        out["stream_raw_samples_per_s"] = rate(n, time.perf_counter() - t0)
    if args.tokens:
        t0 = time.perf_counter()
        n = sum(1 for _ in stream(shard_urls(args.tokens), decode="tokens"))
        out["stream_token_samples_per_s"] = rate(n, time.perf_counter() - t0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
