"""omnisky-tokenize: raw shards -> token shards, one token shard per raw shard.

    omnisky-tokenize --raw demo_out/raw --tokenizers demo_out/tokenizers --out demo_out/tokens \\
                     [--workers 2] [--batch-size 64] [--augment 8]

TOKDIR holds saved tokenizers in `image/`, `spectrum/`, `scalar/` (any may be missing);
a modality key's kind picks its tokenizer. Raw shard i becomes token shard i with the
objects in the same order; a pool of `--workers` processes takes whole shards, and each
shard is encoded the same way whatever the pool size (one torch thread, fixed batches),
so the output is byte-identical for any K.

`--augment K` (training shards only) writes each object K times, with its images turned
by the first K of the eight dihedral transforms (`shards.augment`: identity, rotations,
mirrors; all of an object's surveys alike, spectra and scalars unchanged); a shard holds
all objects' identity copies first, then all rot90 copies, and so on, so the copies of one
object lie a shard's length apart in the stream.

A scalar tokenizer's derived names (colours from pairs of fluxes, tokenizers.colours)
are made from each object's records before encoding and written as modalities of their
own (`scalar.colour_g_r`), so the FM sees them like any catalog scalar.

Each token sample is `codec.encode_tokens(object_id, {key: int32 (n,)},
meta={'params': ..., 'present': [keys]})`. Modalities with no tokenizer are skipped and
counted; an object with a bad record is skipped with a warning naming it and counted.
The manifest's `modalities` ({key: {kind, vocab_size, n_tokens, tokenizer, token_space,
[cell_arcsec], [code_levels], [code_segments]}}, cell_arcsec for images: the token cell's
side on the sky; code_levels / code_segments: the grid the ids lie on, per position where
positions differ (fm.codes, fm.modality)) is
what the FM builds its modality table from; `token_space` names the tokenizer for
modalities whose ids mean the same thing (image.des and image.hsc), else the key itself.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import torch

from ..shards.augment import DIHEDRAL, dihedral
from ..shards.codec import encode_tokens
from ..shards.reader import StreamStats, stream
from ..shards.schema import RecordError, modality_kind
from ..shards.writer import ShardWriter, read_manifest, shard_urls
from .base import Tokenizer, load_tokenizer

KINDS = ("image", "spectrum", "scalar")
_TOKENIZERS: dict[str, Tokenizer] = {}  # per worker process: kind -> tokenizer


def load_tokenizers(tokdir: str | Path) -> dict[str, Tokenizer]:
    """kind -> tokenizer for each of TOKDIR/{image,spectrum,scalar} that holds one."""
    found = {k: load_tokenizer(Path(tokdir) / k) for k in KINDS
             if (Path(tokdir) / k / "config.json").exists()}
    if not found:
        raise FileNotFoundError(f"{tokdir}: no saved tokenizer in image/, spectrum/ or scalar/")
    return found


def tokenizer_for(tokenizers: dict[str, Tokenizer], key: str) -> Tokenizer | None:
    """The tokenizer serving modality `key`, or None (a scalar needs its name to be served)."""
    tok = tokenizers.get(modality_kind(key))
    if tok is not None and modality_kind(key) == "scalar" and key.split(".", 1)[1] not in tok.names:
        return None
    return tok


def _init_worker(tokdir: str) -> None:
    torch.set_num_threads(1)
    _TOKENIZERS.update(load_tokenizers(tokdir))


def _encode_modality(tok: Tokenizer, key: str, samples: list, batch_size: int,
                     failed: dict[str, str]) -> dict[str, np.ndarray]:
    """object_id -> int32 (n,) for every sample holding `key`; failures go into `failed`."""
    have = []
    for s in samples:
        if key not in s.records or s.object_id in failed:
            continue
        try:
            s.records[key].validate()
            have.append(s)
        except RecordError as e:
            failed[s.object_id] = f"{key}: {e}"
            warnings.warn(f"omnisky-tokenize: skipping object {s.object_id!r}: {e}")
    out = {}
    for start in range(0, len(have), batch_size):
        chunk = have[start:start + batch_size]
        try:
            ids = tok.encode([s.records[key] for s in chunk])                     # (b, n)
            rows = list(zip(chunk, ids))
        except Exception:  # find the bad record(s): encode one by one
            rows = []
            for s in chunk:
                try:
                    rows.append((s, tok.encode([s.records[key]])[0]))
                except Exception as e:
                    failed[s.object_id] = f"{key}: {e}"
                    warnings.warn(f"omnisky-tokenize: skipping object {s.object_id!r}: {key}: {e}")
        for s, t in rows:
            if t.shape != (tok.n_tokens,) or t.min() < 0 or t.max() >= tok.vocab_size:
                failed[s.object_id] = f"{key}: tokens out of range or of shape {tuple(t.shape)}"
                continue
            out[s.object_id] = t.numpy().astype(np.int32)
    return out


def tokenize_shard(url: str, out_dir: str, prefix: str, index: int, batch_size: int, augment: int = 1) -> dict:
    """Encode one raw shard into out_dir/<prefix>-<index>.tar; returns its entry and counts."""
    stats = StreamStats()                     # a corrupt shard or sample: skipped, warned, counted
    samples = list(stream([url], decode="raw", shuffle=0, split=False, stats=stats))
    if "scalar" in _TOKENIZERS:   # derived scalars (colours from fluxes) become modalities of their own
        for s in samples:
            s.records.update(_TOKENIZERS["scalar"].derive(s.records))
    n_in = len(samples)
    samples = [dihedral(s, name) for name in DIHEDRAL[:augment] for s in samples]   # transform-major
    keys = sorted({k for s in samples for k in s.records})
    failed: dict[str, str] = {}
    encoded, skipped, cells = {}, Counter(), {}
    with torch.no_grad():
        for key in keys:
            tok = tokenizer_for(_TOKENIZERS, key)
            if tok is None:
                skipped[key] = sum(key in s.records for s in samples)
                continue
            if modality_kind(key) == "image":
                encoded[key] = _encode_modality(tok, key, samples, batch_size, failed)
            else:   # the copies share the original's record (shards.augment): encode it once
                encoded[key] = _encode_modality(tok, key, samples[:n_in], batch_size, failed)
                for i, s in enumerate(samples[n_in:]):
                    orig = samples[i % n_in].object_id
                    if orig in encoded[key]:
                        encoded[key][s.object_id] = encoded[key][orig]
                    elif orig in failed:
                        failed[s.object_id] = failed[orig]
            if hasattr(tok, "cell_arcsec") and encoded[key]:
                cells[key] = [tok.cell_arcsec(s.records[key]) for s in samples if s.object_id in encoded[key]]
    tmp = Path(out_dir) / f".tmp-{index:06d}"
    writer = ShardWriter(tmp, prefix=prefix, max_count=len(samples) + 1, kind="tokens",
                         start_index=index)
    counts, n_empty = Counter(), 0
    for s in samples:
        if s.object_id in failed:
            continue
        tokens = {k: encoded[k][s.object_id] for k in encoded if s.object_id in encoded[k]}
        if not tokens:
            n_empty += 1
            continue
        counts.update(tokens.keys())
        writer.write(s.object_id, encode_tokens(s.object_id, tokens, meta=dict(
            params=s.params, present=sorted(tokens))))
    writer.close()
    entries = []
    for entry in writer.shards:
        shutil.move(str(tmp / entry["name"]), str(Path(out_dir) / entry["name"]))
        entries.append(entry)
    shutil.rmtree(tmp)
    return dict(url=url, shards=entries, n_in=n_in, counts=dict(counts), cells=cells,
                skipped_no_tokenizer=dict(skipped), failed=failed, no_tokens=n_empty, read=stats)


def tokenize(raw: str | Path, tokdir: str | Path, out: str | Path, workers: int = 1,
             batch_size: int = 64, augment: int = 1) -> dict:
    """Tokenize every shard of `raw` into `out` (each object `augment` times); returns the manifest."""
    if not 1 <= augment <= len(DIHEDRAL):
        raise ValueError(f"omnisky-tokenize: --augment must be 1..{len(DIHEDRAL)} dihedral copies, got {augment}")
    raw, tokdir, out = Path(raw), Path(tokdir), Path(out)
    urls = shard_urls(raw)
    prefix = read_manifest(raw).get("prefix", "shard")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):  # a stale shard from an earlier run must not be streamed
        old.unlink()
    args = [(u, str(out), prefix, i, batch_size, augment) for i, u in enumerate(urls)]
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            _init_worker(str(tokdir))
            results = [tokenize_shard(*a) for a in args]
        finally:
            torch.set_num_threads(threads)
            _TOKENIZERS.clear()
    else:
        method = "fork" if "fork" in get_all_start_methods() else "spawn"  # fork: no re-import
        with ProcessPoolExecutor(workers, mp_context=get_context(method),
                                 initializer=_init_worker, initargs=(str(tokdir),)) as pool:
            results = list(pool.map(tokenize_shard, *zip(*args)))
    tokenizers = load_tokenizers(tokdir)
    counts, skipped, failed, read = Counter(), Counter(), {}, StreamStats()
    for r in results:
        read.merge(r["read"])
        counts.update(r["counts"])
        skipped.update(r["skipped_no_tokenizer"])
        failed.update(r["failed"])
    modalities = {}
    for key in sorted(counts):
        tok = tokenizer_for(tokenizers, key)
        modalities[key] = dict(kind=tok.kind, vocab_size=tok.vocab_size, n_tokens=tok.n_tokens,
                               tokenizer=modality_kind(key),
                               token_space=modality_kind(key) if tok.shared_vocabulary else key)
        if tok.code_levels:   # the FM's code geometry (fm.codes)
            modalities[key]["code_levels"] = list(tok.code_levels)
        if tok.code_segments and tok.code_segments != ((tok.n_tokens, tok.code_levels),):
            modalities[key]["code_segments"] = [[n, list(lv)] for n, lv in tok.code_segments]
        cells = [c for r in results for c in r["cells"].get(key, [])]
        if cells:   # the FM's sky positions (fm.modality); one survey's stamps share a pixel scale
            modalities[key]["cell_arcsec"] = round(float(np.median(cells)), 6)
            if getattr(tok, "grid_start", 0):   # the brightness-scale and point-source tokens precede the grid
                modalities[key]["grid_start"] = int(tok.grid_start)
            if np.ptp(cells) > 0.01 * np.median(cells):
                warnings.warn(f"omnisky-tokenize: {key}: token cells of {min(cells):.4g}-{max(cells):.4g} arcsec "
                              f"(pixel scales differ); the FM places them all at the median {np.median(cells):.4g}")
    writer = ShardWriter(out, prefix=prefix, kind="tokens")
    writer.shards = [e for r in results for e in r["shards"]]
    writer.summary = dict(objects_in=sum(r["n_in"] for r in results),
                          skipped_no_tokenizer=dict(sorted(skipped.items())),
                          failed=len(failed), failed_objects=dict(sorted(failed.items())[:100]),
                          no_tokens=sum(r["no_tokens"] for r in results),
                          corrupt_shards=read.summary()["corrupt_shards"],
                          corrupt_samples=read.n_corrupt_samples)
    return writer.close(extra=dict(
        modalities=modalities, counts=dict(sorted(counts.items())), raw=str(raw.resolve()),
        augment=list(DIHEDRAL[:augment]),
        tokenizers={k: str((tokdir / k).resolve()) for k in sorted(tokenizers)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="omnisky-tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--raw", required=True, help="directory of raw shards (with manifest.json)")
    p.add_argument("--tokenizers", required=True, help="directory holding image/, spectrum/, scalar/")
    p.add_argument("--out", required=True, help="output directory for token shards")
    p.add_argument("--workers", type=int, default=1, help="processes, each taking whole shards")
    p.add_argument("--batch-size", type=int, default=64, help="records per encode call")
    p.add_argument("--augment", type=int, default=1,
                   help="write each object K times, images under the first K of the 8 rotations/mirrors (training shards)")
    a = p.parse_args(argv)
    t0 = time.time()
    m = tokenize(a.raw, a.tokenizers, a.out, workers=a.workers, batch_size=a.batch_size, augment=a.augment)
    s = m["summary"]
    print(f"omnisky-tokenize: {m['total']} objects in {len(m['shards'])} shard(s) -> {a.out} "
          f"in {time.time() - t0:.1f}s; tokens per modality {m['counts']}; "
          f"skipped (no tokenizer) {s['skipped_no_tokenizer']}; failed {s['failed']}; "
          f"no tokens {s['no_tokens']}; corrupt raw shards skipped {len(s['corrupt_shards'])} "
          f"{sorted(Path(u).name for u in s['corrupt_shards'])}, corrupt samples {s['corrupt_samples']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
