"""Read raw or token shards: one tar reader, corrupt shards skipped, warned about and counted.

    ds = stream(shard_urls("out/raw"), decode="raw", shuffle=1000, seed=0)
    for sample in ds: ...                # shards.schema.Sample

    stats = StreamStats()
    ds = stream(urls, decode="tokens", resampled=True, seed=1, stats=stats)  # endless
    for object_id, tokens, meta in ds: ...
    print(stats)                         # "2 corrupt shard(s) skipped: ...; 0 corrupt sample(s)"

Shards are webdataset tars (members `<key>.<ext>`, a sample's members consecutive), read
here with `tarfile` in stream mode so a truncated or garbage shard fails at a known
place: the shard is skipped from that point with a warning naming it, counted in
`StreamStats.corrupt_shards`, and the stream goes on to the next shard; nothing waits,
so no worker hangs. A sample that does not decode (a bad npz, no meta.json) is skipped,
warned about naming its key and shard, and counted in `corrupt_samples`. A sample cut
by a truncation is never yielded half-read.

`stream` splits the shards across ranks and DataLoader workers (`split=True`) like
webdataset's split_by_node/worker: ranks may then get different sample counts. For
training epochs where every rank must get the same number of batches, use
`shards.ranks.EpochStream`; to mix datasets, `shards.mix.Mix`.

Counts live in the process that reads: with DataLoader workers each worker has its own
copy of `stats`.
"""
from __future__ import annotations

import os
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .codec import decode_sample, decode_tokens

MAX_LISTED = 100          # corrupt samples listed by name in a summary; the rest only counted


@dataclass
class StreamStats:
    """What a reader skipped. corrupt_shards: {shard path: reason}; corrupt_samples:
    {'key @ shard': reason} (the first MAX_LISTED); n_corrupt_samples counts them all;
    samples: samples yielded."""
    corrupt_shards: dict[str, str] = field(default_factory=dict)
    corrupt_samples: dict[str, str] = field(default_factory=dict)
    n_corrupt_samples: int = 0
    samples: int = 0

    def shard_failed(self, url: str, exn: BaseException) -> None:
        why = f"{type(exn).__name__}: {exn}"
        warnings.warn(f"omnisky.shards: skipping corrupt shard {url}: {why}", stacklevel=3)
        self.corrupt_shards.setdefault(str(url), why)

    def sample_failed(self, key: str, url: str, exn: BaseException) -> None:
        why = f"{type(exn).__name__}: {exn}"
        warnings.warn(f"omnisky.shards: skipping corrupt sample {key!r} in {url}: {why}", stacklevel=3)
        self.n_corrupt_samples += 1
        if len(self.corrupt_samples) < MAX_LISTED:
            self.corrupt_samples[f"{key} @ {url}"] = why

    def merge(self, other: "StreamStats") -> "StreamStats":
        for url, why in other.corrupt_shards.items():
            self.corrupt_shards.setdefault(url, why)
        for k, why in other.corrupt_samples.items():
            if len(self.corrupt_samples) < MAX_LISTED:
                self.corrupt_samples.setdefault(k, why)
        self.n_corrupt_samples += other.n_corrupt_samples
        self.samples += other.samples
        return self

    def summary(self) -> dict:
        """JSON-able, for a job's manifest summary."""
        return dict(samples_read=self.samples, corrupt_shards=dict(sorted(self.corrupt_shards.items())),
                    n_corrupt_shards=len(self.corrupt_shards), n_corrupt_samples=self.n_corrupt_samples,
                    corrupt_samples=dict(sorted(self.corrupt_samples.items())))

    def __str__(self) -> str:
        names = ", ".join(os.path.basename(u) for u in sorted(self.corrupt_shards)) or "none"
        return (f"{len(self.corrupt_shards)} corrupt shard(s) skipped ({names}); "
                f"{self.n_corrupt_samples} corrupt sample(s) skipped; {self.samples} sample(s) read")


def split_key(name: str) -> tuple[str, str]:
    """'dir/sky-0000042.image.des.npz' -> ('dir/sky-0000042', 'image.des.npz') (webdataset's rule:
    the key ends at the first '.' of the base name)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def shard_samples(url: str, stats: StreamStats | None = None, skip: int = 0) -> Iterator[dict[str, bytes]]:
    """The samples of one tar shard in order, as {ext: bytes, '__key__': key, '__url__': url}.

    The first `skip` samples are passed over without reading their bytes. On a read error
    (truncated, not a tar, unreadable) the shard ends there: a warning names it and `stats`
    counts it; the sample being read when it failed is dropped."""
    stats = stats if stats is not None else StreamStats()
    index, key, members = 0, None, {}
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                k, ext = split_key(info.name)
                if k != key:
                    if members:
                        yield members
                    if key is not None:
                        index += 1
                    key, members = k, {}
                if index < skip:
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                if not members:
                    members = {"__key__": k, "__url__": str(url)}
                members[ext] = data
        if members:
            yield members
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        stats.shard_failed(str(url), exn)


def decoder(kind: str) -> Callable:
    if kind == "raw":
        return decode_sample
    if kind == "tokens":
        return decode_tokens
    raise ValueError(f"decode must be 'raw' or 'tokens', got {kind!r}")


def decoded(samples: Iterable[dict[str, bytes]], decode: str, stats: StreamStats) -> Iterator:
    """Decode member dicts; a sample that fails is warned about (key and shard), counted, skipped."""
    fn = decoder(decode)
    for members in samples:
        try:
            out = fn(members)
        except Exception as exn:      # noqa: BLE001 - any decode failure of one sample is skipped
            stats.sample_failed(members.get("__key__", "?"), members.get("__url__", "?"), exn)
            continue
        stats.samples += 1
        yield out


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Shuffle with a `buffer`-sized reservoir (webdataset's scheme): O(buffer) memory."""
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = int(rng.integers(buffer))
        pool[j], item = item, pool[j]
        yield item
    rng.shuffle(pool)
    yield from pool


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed (if initialised), else $RANK/$WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        r, w = 0, 1
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                r, w = dist.get_rank(), dist.get_world_size()
            else:
                r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ImportError:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def worker_and_count() -> tuple[int, int]:
    """(DataLoader worker id, number of workers); (0, 1) outside a DataLoader worker."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:
        return 0, 1
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream:
    """Iterable over decoded samples of `urls`; see `stream`."""

    def __init__(self, urls: list[str], decode: str, shuffle: int, seed: int, resampled: bool,
                 split: bool, stats: StreamStats):
        decoder(decode)                                  # fail early on a bad kind
        self.urls, self.decode, self.shuffle, self.seed = urls, decode, shuffle, seed
        self.resampled, self.split, self.stats = resampled, split, stats

    def _shard_order(self, rng: np.random.Generator) -> Iterator[str]:
        if self.resampled:                               # with replacement, forever
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        urls = self.urls
        if self.split:
            rank, world = rank_and_world()
            worker, n_workers = worker_and_count()
            urls = urls[rank::world][worker::n_workers]
        if self.shuffle:
            urls = [urls[i] for i in rng.permutation(len(urls))]
        yield from urls

    def _samples(self, rng: np.random.Generator) -> Iterator:
        barren = 0                           # shards in a row that gave no decoded sample
        for url in self._shard_order(rng):
            before = self.stats.samples
            yield from decoded(shard_samples(url, self.stats), self.decode, self.stats)
            barren = 0 if self.stats.samples > before else barren + 1
            if self.resampled and barren > 2 * len(self.urls) + 10:      # endless, yet nothing reads
                raise RuntimeError(f"stream: {barren} shard draws in a row gave no sample "
                                   f"(corrupt: {sorted(self.stats.corrupt_shards)})")

    def __iter__(self):
        worker, _ = worker_and_count()
        rng = np.random.default_rng([self.seed, worker])
        samples = self._samples(rng)
        return shuffled(samples, self.shuffle, rng) if self.shuffle else samples


def stream(urls: str | Iterable[str], decode: str = "raw", shuffle: int = 0, seed: int = 0,
           resampled: bool = False, split: bool = True, stats: StreamStats | None = None) -> ShardStream:
    """An iterable over `urls` yielding decoded samples.

    decode:    'raw' -> shards.schema.Sample; 'tokens' -> (object_id, {key: int32 (n,)}, meta).
    shuffle:   sample shuffle buffer size; also shuffles the shard order (0: files in order).
    seed:      seeds shard and sample shuffling (and resampling); same seed, same order.
    resampled: draw shards with replacement forever (endless training streams).
    split:     split shards across distributed ranks and DataLoader workers.
    stats:     a StreamStats that counts corrupt shards and samples skipped.
    """
    urls = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not urls:
        raise ValueError("stream: no shard urls given")
    return ShardStream([str(u) for u in urls], decode, shuffle, seed, resampled, split,
                       stats if stats is not None else StreamStats())
