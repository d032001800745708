"""omnisky-shards: simulate the sky into raw shards, verify them, look at them.

    omnisky-shards simulate --n 2000 --seed 0 --out demo_out/raw/train --shard-size 500 --workers 2
    omnisky-shards verify demo_out/raw/train
    omnisky-shards inspect demo_out/raw/train --png sky.png --n 8

`simulate` cuts the object range into contiguous chunks of --shard-size objects; chunk
k becomes shard `sky-{k:06d}.tar`, whichever worker simulates it, so the output is
byte-identical for any --workers. The manifest records the sky config and per-modality
counts. `verify` exits 1 naming shards whose size or sha256 differ from the manifest,
missing shards, or (with --deep) shards and samples that do not read; `inspect` prints
the manifest, per-modality counts and what could not be read, and draws a PNG grid of the
first objects (every image band, every spectrum).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path


from ..config import ConfigError, from_dict, load_config, parse_overrides, to_dict
from .codec import encode_sample
from .summary import PAIRS
from .writer import ShardWriter, read_manifest

PREFIX = "sky"


def _write_chunk(task: tuple[dict, int, int, int, str]) -> dict:
    """Simulate objects [start, stop) into shard number `index` of `out`; returns the
    manifest entry of the shard and the chunk's modality, pair and masked-pixel counts."""
    from .sky import SkyConfig, simulate
    cfg_dict, index, start, stop, out = task
    cfg = from_dict(SkyConfig, cfg_dict)
    tmp = Path(out) / f".tmp-{PREFIX}-{index:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts, pairs, masked = Counter(), Counter(), Counter()
    with ShardWriter(tmp, prefix=PREFIX, max_count=stop - start, start_index=index) as writer:
        for sample in simulate(cfg, start, stop):
            writer.write(sample.object_id, encode_sample(sample))
            counts.update(list(sample.records))
            pairs.update("+".join(p) for p in PAIRS if all(k in sample.records for k in p))
            masked.update({k: int(r.mask.sum()) for k, r in sample.records.items() if hasattr(r, "mask")})
    (entry,) = writer.shards
    os.replace(tmp / entry["name"], Path(out) / entry["name"])
    shutil.rmtree(tmp)
    return dict(entry=entry, counts=counts, pairs=pairs, masked=masked)


def run_simulate(cfg, out: str | Path, shard_size: int = 500, workers: int = 1,
                 progress: bool = True) -> dict:
    """Simulate `cfg` (a SkyConfig) into raw shards under `out`; returns the manifest."""
    from tqdm import tqdm

    from .sky import warm_up
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size and workers must be >= 1, got {shard_size}, {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PREFIX}-*.tar"):          # a rerun must not leave stale shards
        old.unlink()
    for tmp in out.glob(f".tmp-{PREFIX}-*"):         # nor an interrupted run its half-written ones
        shutil.rmtree(tmp, ignore_errors=True)
    cfg_dict = to_dict(cfg)
    tasks = [(cfg_dict, k, start, min(start + shard_size, cfg.n), str(out))
             for k, start in enumerate(range(0, cfg.n, shard_size))]
    warm_up()                                         # forked workers inherit the tables
    t0 = time.perf_counter()
    results = []
    with tqdm(total=cfg.n, unit="obj", desc="simulate", disable=not progress) as bar:
        if workers == 1 or len(tasks) == 1:
            chunks = map(_write_chunk, tasks)
            for r in chunks:
                results.append(r)
                bar.update(r["entry"]["count"])
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
                for r in pool.imap(_write_chunk, tasks):
                    results.append(r)
                    bar.update(r["entry"]["count"])
    seconds = time.perf_counter() - t0
    counts, pairs, masked = Counter(), Counter(), Counter()
    for r in results:
        counts.update(r["counts"])
        pairs.update(r["pairs"])
        masked.update(r["masked"])
    writer = ShardWriter(out, prefix=PREFIX, max_count=shard_size)
    writer.shards = [r["entry"] for r in results]
    writer.summary = dict(masked_pixels=dict(sorted(masked.items())))
    manifest = writer.close(extra=dict(source="omnisky.sky", sky=cfg_dict,
                                       modality_counts=dict(sorted(counts.items())),
                                       pair_counts=dict(sorted(pairs.items()))))
    rate = cfg.n / seconds if seconds > 0 else float("inf")
    print(f"simulated {cfg.n} objects into {len(tasks)} shard(s) in {out} in {seconds:.1f} s "
          f"({rate:.1f} objects/s, {workers} worker(s))")
    return manifest


def _cmd_simulate(args) -> int:
    from .sky import SkyConfig
    overrides = parse_overrides(args.set)
    if args.n is not None:
        overrides["n"] = args.n
    if args.seed is not None:
        overrides["seed"] = args.seed
    try:
        cfg = load_config(SkyConfig, args.config, overrides)
    except ConfigError as e:
        print(f"omnisky-shards simulate: {e}", file=sys.stderr)
        return 2
    manifest = run_simulate(cfg, args.out, args.shard_size, args.workers, progress=not args.quiet)
    for key, n in manifest["modality_counts"].items():
        print(f"  {key:16s} {n}")
    return 0


def _cmd_verify(args) -> int:
    from .summary import check, report_ok
    try:
        r = check(args.dir, deep=args.deep)
    except FileNotFoundError as e:
        print(f"omnisky-shards verify: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {len(r['ok'])} of {r['shards']} shard(s) match the manifest")
    if r["bad"]:
        print(f"  {len(r['bad'])} differ from the manifest (size or sha256): {', '.join(r['bad'])}")
    if r["missing"]:
        print(f"  {len(r['missing'])} missing: {', '.join(r['missing'])}")
    if r["unlisted"]:
        print(f"  {len(r['unlisted'])} tar file(s) not in the manifest (not streamed): {', '.join(r['unlisted'])}")
    if args.deep:
        s = r["stream"]
        print(f"  read {s['samples_read']} of {r['samples_expected']} sample(s); "
              f"{s['n_corrupt_shards']} corrupt shard(s), {s['n_corrupt_samples']} corrupt sample(s)")
        for name, why in s["corrupt_shards"].items():
            print(f"    {Path(name).name}: {why}")
    return 0 if report_ok(r) else 1


def _cmd_inspect(args) -> int:
    from .grid import draw_grid
    from .reader import StreamStats
    from .summary import summarize
    manifest = read_manifest(args.dir)
    print(f"{args.dir}: kind {manifest.get('kind')}, {manifest.get('total')} object(s) "
          f"in {len(manifest['shards'])} shard(s)")
    for s in manifest["shards"]:
        print(f"  {s['name']}  {s['count']:6d} objects  {s['bytes'] / 1e6:8.2f} MB")
    for key, value in manifest.get("summary", {}).items():
        if value:
            print(f"  summary {key}: {value}")
    stats = StreamStats()
    found = summarize(args.dir, n_keep=args.n, stats=stats)
    total = max(found["objects"], 1)
    print(f"modalities ({found['objects']} object(s) read from the shards):")
    for key, n in list(found["modalities"].items()) + list(found["pairs"].items()):
        tokens = found["tokens_per_modality"].get(key)
        print(f"  {key:28s} {n:6d}  ({100 * n / total:.0f}%)" + (f"  {tokens} tokens" if tokens else ""))
    print(f"read: {stats}")
    if args.png:
        if found["kind"] != "raw":
            print("omnisky-shards inspect: --png needs raw shards (token shards hold no pixels)", file=sys.stderr)
            return 2
        draw_grid(found["first"], args.png)
        print(f"wrote {args.png} ({len(found['first'])} objects)")
    return 0


def _cmd_ingest(args) -> int:
    from .ingest import IngestError, ingest
    from .ingest_catalog import load_catalog_config
    try:
        catalog = load_catalog_config(args.catalog_map) if args.catalog_map else None
        manifest = ingest(args.files, args.out, args.shard_size, args.size, args.match_radius, catalog,
                          args.mmu_instrument)
    except (IngestError, ConfigError, FileNotFoundError) as e:
        print(f"omnisky-shards ingest: {e}", file=sys.stderr)
        return 2
    s = manifest["summary"]
    print(f"ingested {len(args.files)} file(s) into {s['objects']} object(s) in {args.out}: "
          f"{s['matched']} cross-matched, {s['unmatched']} unmatched, "
          f"{s['dropped_sky_fibres']} sky/blank fibre(s) dropped, {s['invalid_pixels']} invalid pixel(s) masked")
    for key in ("masked_scalars", "dropped_rows", "dropped_records", "scalar_conflicts"):
        if s[key]:
            print(f"  {key.replace('_', ' ')}: {s[key]}")
    for key, n in manifest["modality_counts"].items():
        print(f"  {key:16s} {n}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnisky-shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate the sky into raw shards")
    s.add_argument("--n", type=int, default=None, help="number of objects (default: the config's)")
    s.add_argument("--seed", type=int, default=None, help="sky seed (default: the config's)")
    s.add_argument("--out", required=True, help="output shard directory")
    s.add_argument("--shard-size", type=int, default=500, help="objects per shard")
    s.add_argument("--workers", type=int, default=1, help="simulation processes")
    s.add_argument("--config", default=None, help="SkyConfig YAML, e.g. launch/sky/tiny.yaml")
    s.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set image_size=48 p_image_hsc=0.5")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_simulate)
    v = sub.add_parser("verify", help="check shard sizes and checksums against the manifest")
    v.add_argument("dir")
    v.add_argument("--deep", action="store_true", help="also read and decode every sample")
    v.set_defaults(func=_cmd_verify)
    i = sub.add_parser("inspect", help="summarise a shard directory, draw a PNG grid")
    i.add_argument("dir")
    i.add_argument("--png", default=None, help="write a grid of objects to this PNG")
    i.add_argument("--n", type=int, default=8, help="objects in the PNG grid")
    i.set_defaults(func=_cmd_inspect)
    g = sub.add_parser("ingest", help="real survey FITS files -> raw shards, cross-matched by RA/Dec")
    g.add_argument("files", nargs="+", help="Legacy/HSC cut-outs (+ PSF files), SDSS spec-*, DESI coadd-*, "
                   "FITS catalogs, Multimodal Universe HDF5 files")
    g.add_argument("--out", required=True, help="output shard directory")
    g.add_argument("--size", type=int, default=None, help="cut centred size x size image stamps")
    g.add_argument("--shard-size", type=int, default=500, help="objects per shard")
    g.add_argument("--match-radius", type=float, default=1.0, help="cross-match radius, arcsec")
    g.add_argument("--catalog-map", default=None, help="catalog column -> scalar mapping YAML "
                   "(e.g. launch/ingest/sdss_photoz.yaml); needed for FITS catalogs")
    g.add_argument("--mmu-instrument", default=None, help="instrument of MMU spectra whose file does not name it")
    g.set_defaults(func=_cmd_ingest)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
