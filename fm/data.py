"""Token shards -> masked, fixed-size training batches; masking runs in the data workers.

    ds = MaskedTokenStream(shard_urls("out/tokens"), table, MaskingConfig(), seed=0, rank=rank)
    loader = make_loader(ds, batch_size=32, num_workers=1)
    for batch in loader:      # {enc_ids, enc_mod, enc_pos, enc_pad, dec_mod, dec_pos, dec_targets, dec_pad}
        loss, per_modality = model(batch)

Each rank and each DataLoader worker streams its own endless, resampled sequence of
shards (webdataset), seeded from (masking seed, training seed, rank, worker, epoch),
and draws its own masks, so no two workers repeat each other's samples and a resumed
run (a new `epoch`) does not replay the samples it has already seen. Objects with fewer
than two tokens of known modalities cannot be split into input and target; they are
skipped and counted (`skipped`, warned about once per worker).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..shards.reader import stream
from .masking import MaskingConfig, sample_masks
from .modality import ModalityTable

BATCH_KEYS = ("enc_ids", "enc_mod", "enc_pos", "enc_pad", "dec_mod", "dec_pos", "dec_targets", "dec_pad")


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size masked samples: {name: (B, Nin) or (B, Ndec)} tensors."""
    if not samples:
        raise ValueError("collate: empty batch")
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in BATCH_KEYS}


def masked_samples(objects: Iterable, table: ModalityTable, cfg: MaskingConfig,
                   rng: np.random.Generator, counter: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
    """(object_id, tokens, meta) tuples -> masked samples; too-small objects skipped and counted."""
    for object_id, tokens, _meta in objects:
        n_known = sum(table[k].n_tokens for k in tokens if k in table)
        if n_known < 2:
            if counter is not None:
                if not counter.get("skipped"):
                    warnings.warn(f"omnisky.fm.data: skipping object {object_id!r}: {n_known} token(s) "
                                  f"of known modalities (need 2); further skips are only counted")
                counter["skipped"] = counter.get("skipped", 0) + 1
            continue
        yield sample_masks(tokens, table, cfg, rng, where=f"object {object_id!r}")


class MaskedTokenStream(IterableDataset):
    """Endless stream of masked samples from token shards (one per rank; split by worker)."""

    def __init__(self, urls: list[str], table: ModalityTable, masking: MaskingConfig,
                 seed: int = 0, rank: int = 0, epoch: int = 0, shuffle: int = 1000):
        super().__init__()
        self.urls, self.table, self.masking = list(urls), table, masking
        self.seed, self.rank, self.epoch, self.shuffle = seed, rank, epoch, shuffle
        self.counter: dict = {}

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seq = np.random.SeedSequence([self.masking.seed, self.seed, self.rank, worker, self.epoch])
        stream_seed = int(seq.generate_state(1)[0])
        objects = stream(self.urls, decode="tokens", resampled=True, shuffle=self.shuffle, seed=stream_seed)
        yield from masked_samples(objects, self.table, self.masking, np.random.default_rng(seq), self.counter)


def make_loader(dataset: IterableDataset, batch_size: int, num_workers: int = 1) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def fixed_batches(urls: list[str], table: ModalityTable, masking: MaskingConfig, batch_size: int,
                  n_batches: int, seed: int = 12345) -> list[dict[str, torch.Tensor]]:
    """The same `n_batches` masked batches on every rank and every run (for eval losses):
    the first objects of the shards in order, masked with a fixed seed. Fewer batches if
    the shards hold fewer objects."""
    objects = stream(urls, decode="tokens", shuffle=0, resampled=False, split=False)
    batches, current = [], []
    for sample in masked_samples(objects, table, masking, np.random.default_rng(seed), counter={}):
        current.append(sample)
        if len(current) == batch_size:
            batches.append(collate(current))
            current = []
            if len(batches) == n_batches:
                break
    if current and len(batches) < n_batches:
        batches.append(collate(current))
    return batches
