"""Epochs that are safe under many ranks: every rank and worker gets the same number of samples.

    ds = EpochStream("data/tokens/train", decode="tokens", seed=0, shuffle=1000)   # rank from env
    ds.samples_per_rank()        # the same on every rank: ceil(total / (world * workers)) * workers
    for epoch in range(3):
        ds.set_epoch(epoch)
        for object_id, tokens, meta in ds: ...

    endless = EpochStream(dirs, decode="tokens", epochs=None)   # epoch after epoch, reshuffled

How an epoch is cut. Each epoch the shard order is shuffled with (seed, epoch): a new
order every epoch, the same order on every rank and in every rerun. The samples in that
shard order form the epoch's sequence of `total` samples (counts from the manifests).
With `world` ranks and `W` DataLoader workers per rank there are `world * W` slots; slot
s = rank * W + worker reads the contiguous positions [s * n, (s + 1) * n) of the
sequence, so a slot opens at most the shards its range touches (two slots may share a
shard, each reading its own part).

The remainder (`remainder=`):
  'pad' (default): n = ceil(total / slots); the last slot's range wraps around to the
        start of the sequence, repeating at most slots - 1 samples. Every sample is seen
        every epoch.
  'drop': n = floor(total / slots); the last total mod slots samples of the sequence
        (a different tail each epoch) are not seen this epoch.
Either way every slot yields exactly n samples, so every rank yields W * n per epoch and
makes the same number of batches: no rank waits at the end of an epoch for another.

Corrupt shards: a shard that fails is skipped with a warning and counted (see
`reader.StreamStats`); the slot tops up its n samples from the shards that follow in the
epoch order (wrapping around), so the count stays exact. A slot whose every shard fails
raises a RuntimeError naming the shards instead of waiting forever.
"""
from __future__ import annotations

import bisect
from itertools import count
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from torch.utils.data import IterableDataset

from .reader import (StreamStats, decoded, decoder, rank_and_world, shard_samples, shuffled,
                     worker_and_count)
from .writer import read_manifest

REMAINDER_MODES = ("pad", "drop")


def manifest_shards(sources: str | Path | Iterable[str | Path]) -> tuple[list[str], list[int]]:
    """Shard paths and sample counts listed by the manifests of one or more shard directories."""
    dirs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    urls, counts = [], []
    for d in dirs:
        for s in read_manifest(d)["shards"]:
            urls.append(str(Path(d) / s["name"]))
            counts.append(int(s["count"]))
    if not urls:
        raise ValueError(f"no shards listed in the manifest(s) of {[str(d) for d in dirs]}")
    return urls, counts


def slot_range(total: int, n_slots: int, slot: int, remainder: str) -> tuple[int, int]:
    """(start position, number of samples) of slot `slot` among `n_slots` in an epoch of `total`."""
    if remainder not in REMAINDER_MODES:
        raise ValueError(f"remainder must be one of {REMAINDER_MODES}, got {remainder!r}")
    n = -(-total // n_slots) if remainder == "pad" else total // n_slots
    if n == 0:
        raise ValueError(f"{total} sample(s) cannot give each of {n_slots} rank x worker slot(s) one "
                         "sample with remainder='drop'; use remainder='pad' or fewer ranks/workers")
    return slot * n, n


class EpochStream(IterableDataset):
    """Rank- and worker-balanced epochs over the shards of one or more shard directories.

    sources:    a shard directory (with manifest.json) or a list of them, read as one dataset.
    decode:     'raw' or 'tokens' (see reader.stream).
    rank, world_size: default from torch.distributed, else $RANK / $WORLD_SIZE, else 0 / 1.
    seed:       seeds the per-epoch shard order and the sample shuffle buffer.
    shuffle:    sample shuffle buffer size within a slot (0: shard order, samples in order).
    remainder:  'pad' or 'drop' (module docstring).
    epoch:      the first epoch; `set_epoch` changes it.
    epochs:     epochs per iteration (None: endless, each epoch reshuffled).
    stats:      counts corrupt shards and samples skipped.
    num_workers: the DataLoader workers it will run in (for len(); checked when iterated).
    """

    def __init__(self, sources, decode: str = "raw", rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, shuffle: int = 0,
                 remainder: str = "pad", epoch: int = 0, epochs: int | None = 1,
                 stats: StreamStats | None = None, num_workers: int | None = None):
        super().__init__()
        decoder(decode)
        self.urls, self.counts = manifest_shards(sources)
        self.total = sum(self.counts)
        self.decode, self.seed, self.shuffle, self.remainder = decode, seed, shuffle, remainder
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.epoch, self.epochs = epoch, epochs
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        self.stats = stats if stats is not None else StreamStats()
        self.num_workers = num_workers
        slot_range(self.total, self.world_size * (num_workers or 1), 0, remainder)   # fail early

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in this epoch's order: the same on every rank, new each epoch."""
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.urls))

    def samples_per_slot(self, num_workers: int = 1) -> int:
        return slot_range(self.total, self.world_size * num_workers, 0, self.remainder)[1]

    def samples_per_rank(self, num_workers: int = 1) -> int:
        """Samples each rank yields per epoch with `num_workers` DataLoader workers."""
        return num_workers * self.samples_per_slot(num_workers)

    def __len__(self) -> int:
        """Samples this rank yields in one pass with `num_workers` DataLoader workers (default 1)."""
        if self.epochs is None:
            raise TypeError("an endless EpochStream (epochs=None) has no length")
        return self.epochs * self.samples_per_rank(self.num_workers or 1)

    def _slot_samples(self, order: np.ndarray, start: int, n: int) -> Iterator:
        """Exactly n decoded samples from position `start` of the epoch sequence on, wrapping
        around, topping up past shards and samples that fail."""
        counts = [self.counts[i] for i in order]
        ends = np.cumsum(counts)                                         # position after each shard
        start %= self.total
        k = bisect.bisect_right(ends, start)
        skip = int(start - (ends[k] - counts[k]))
        got, barren = 0, 0                # barren: shards in a row that gave no good sample
        while got < n:
            url = self.urls[order[k]]
            before = got
            for sample in decoded(shard_samples(url, self.stats, skip=skip), self.decode, self.stats):
                yield sample
                got += 1
                if got == n:
                    return
            barren = 0 if got > before else barren + 1
            if barren > len(order):
                raise RuntimeError(f"rank {self.rank}: no readable sample in any of {len(order)} shard(s) "
                                   f"(corrupt: {sorted(self.stats.corrupt_shards)}); {got} of {n} yielded")
            k, skip = (k + 1) % len(order), 0

    def _one_epoch(self, epoch: int, slot: int, n_slots: int) -> Iterator:
        start, n = slot_range(self.total, n_slots, slot, self.remainder)
        samples = self._slot_samples(self.shard_order(epoch), start, n)
        if self.shuffle:
            samples = shuffled(samples, self.shuffle, np.random.default_rng([self.seed, epoch, slot]))
        return samples

    def __iter__(self) -> Iterator:
        worker, n_workers = worker_and_count()
        if self.num_workers is not None and max(self.num_workers, 1) != n_workers:
            raise ValueError(f"EpochStream: num_workers={self.num_workers} but iterated in {n_workers} worker(s)")
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        epochs = count(self.epoch) if self.epochs is None else range(self.epoch, self.epoch + self.epochs)
        for epoch in epochs:
            yield from self._one_epoch(epoch, slot, n_slots)
