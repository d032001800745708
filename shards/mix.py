"""Mix several sample streams with weights, reproducibly, and open a training stream.

    sky = EpochStream("data/tokens/sky", decode="tokens", epochs=None, seed=0)
    real = EpochStream("data/tokens/real", decode="tokens", epochs=None, seed=0)
    for object_id, tokens, meta in mix([sky, real], weights=[0.7, 0.3], seed=0): ...

    ds = training_stream({"data/tokens/sky": 0.7, "data/tokens/real": 0.3}, decode="tokens")
    urls, p = shard_weights({"data/tokens/sky": 0.7, "data/tokens/real": 0.3})  # for shard samplers

Each draw picks stream i with probability weights[i] (normalised) from a generator seeded
by (seed, rank, DataLoader worker): the same picks in every rerun, different picks on
different ranks and workers. A component that runs out is iterated again, so give
endless components (`EpochStream(..., epochs=None)`, each pass a reshuffled epoch); a
component that yields nothing at all is an error, not a hang. With `length` set, one
pass yields exactly `length` samples per worker, the same on every rank; without it the
mix is endless (training counts steps).
"""
from __future__ import annotations

from itertools import count
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from torch.utils.data import IterableDataset

from .ranks import EpochStream, manifest_shards
from .reader import StreamStats, rank_and_world, worker_and_count


class Mix(IterableDataset):
    """Weighted mixture of iterables; see `mix`."""

    def __init__(self, streams: Sequence[Iterable], weights: Sequence[float], seed: int = 0,
                 length: int | None = None, rank: int | None = None):
        super().__init__()
        if len(streams) == 0 or len(streams) != len(weights):
            raise ValueError(f"mix: {len(streams)} stream(s) for {len(weights)} weight(s)")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mix: weights must be finite, >= 0 and not all 0, got {list(weights)}")
        if length is not None and length < 1:
            raise ValueError(f"mix: length must be >= 1 or None, got {length}")
        self.streams, self.p, self.seed, self.length = list(streams), w / w.sum(), seed, length
        self.rank = rank_and_world(rank, None)[0] if rank is None else rank
        self.drawn = np.zeros(len(streams), dtype=np.int64)     # samples taken from each stream

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless mix (length=None) has no length")
        return self.length * worker_and_count()[1]

    def _next(self, iters: list, i: int):
        try:
            return next(iters[i])
        except StopIteration:
            iters[i] = iter(self.streams[i])                    # run out: another pass
            try:
                return next(iters[i])
            except StopIteration:
                raise RuntimeError(f"mix: stream {i} ({self.streams[i]!r}) yields no samples") from None

    def __iter__(self):
        worker, _ = worker_and_count()
        rng = np.random.default_rng([self.seed, self.rank, worker, 0x313])
        iters = [iter(s) for s in self.streams]
        for _ in (count() if self.length is None else range(self.length)):
            i = int(rng.choice(len(self.p), p=self.p))
            self.drawn[i] += 1
            yield self._next(iters, i)


def mix(streams: Sequence[Iterable], weights: Sequence[float], seed: int = 0,
        length: int | None = None, rank: int | None = None) -> Mix:
    """Draw from `streams` with probabilities `weights` (see the module docstring)."""
    return Mix(streams, weights, seed, length, rank)


def training_stream(sources: str | Path | Sequence[str | Path] | Mapping[str | Path, float],
                    decode: str = "tokens", seed: int = 0, shuffle: int = 1000,
                    remainder: str = "pad", rank: int | None = None, world_size: int | None = None,
                    stats: StreamStats | None = None) -> Iterable:
    """An endless, rank-balanced training stream. `sources` is one shard directory, a list of
    directories read as one dataset, or {directory: weight} to mix datasets."""
    stats = stats if stats is not None else StreamStats()
    kw = dict(decode=decode, rank=rank, world_size=world_size, shuffle=shuffle, remainder=remainder,
              epochs=None, stats=stats)
    if not isinstance(sources, Mapping):
        return EpochStream(sources, seed=seed, **kw)
    streams = [EpochStream(d, seed=seed + 1000 * i, **kw) for i, d in enumerate(sources)]
    return Mix(streams, list(sources.values()), seed=seed, rank=streams[0].rank)


def shard_weights(sources: Mapping[str | Path, float]) -> tuple[list[str], np.ndarray]:
    """{shard directory: weight} -> (every shard's path, (n_shards,) draw probabilities) such
    that a sampler drawing shards with these probabilities reads directory d with probability
    weight_d / sum(weights), its shards in proportion to their sample counts (for samplers
    that draw shards with replacement, e.g. `rng.choice(len(urls), p=p)`)."""
    w = np.asarray(list(sources.values()), dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"shard_weights: weights must be finite, >= 0 and not all 0, got {list(w)}")
    urls, probs = [], []
    for d, weight in zip(sources, w / w.sum()):
        u, counts = manifest_shards(d)
        c = np.asarray(counts, dtype=np.float64)
        if c.sum() <= 0:
            raise ValueError(f"shard_weights: {d} holds no samples")
        urls += u
        probs.append(weight * c / c.sum())
    return urls, np.concatenate(probs)
