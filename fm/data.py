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

For training, `StepBatches` makes every batch a pure function of (seed, step, slot), so
a resumed run reads exactly what the uninterrupted one read, and the data of a run does
not depend on how its global batch is split between processes and accumulation steps:

    ds = StepBatches(urls, table, masking, batch_size=32, slots=[rank], streams=2, start_step=step)
    for step, micro_batches in step_loader(ds, num_workers=2): ...
"""
from __future__ import annotations

import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..shards.reader import StreamStats, shuffled, stream
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
        if maskable(object_id, tokens, table, counter):
            yield sample_masks(tokens, table, cfg, rng, where=f"object {object_id!r}")


def maskable(object_id: str, tokens: dict, table: ModalityTable, counter: dict | None = None) -> bool:
    """True if the object has >= 2 tokens of known modalities; else counted in
    counter['skipped'] (the first skip warned about)."""
    n_known = sum(table[k].n_tokens for k in tokens if k in table)
    if n_known >= 2:
        return True
    if counter is not None:
        if not counter.get("skipped"):
            warnings.warn(f"omnisky.fm.data: skipping object {object_id!r}: {n_known} token(s) "
                          f"of known modalities (need 2); further skips are only counted")
        counter["skipped"] = counter.get("skipped", 0) + 1
    return False


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


# -- training batches that are a pure function of (seed, step, slot) ----------------------
def slot_objects(urls: list[str], table: ModalityTable, shuffle: int, seed: Sequence[int],
                 counter: dict | None = None) -> Iterator[tuple]:
    """Endless (object_id, tokens, meta) of one data sub-stream: shards drawn with
    replacement and objects reservoir-shuffled, both by an rng seeded with `seed`; objects
    with fewer than two tokens of known modalities are skipped and counted."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))

    stats = StreamStats()

    def drawn():
        while True:
            got = 0
            for _ in range(len(urls)):   # one pass of draws; a pass with nothing readable is fatal
                url = urls[int(rng.integers(len(urls)))]
                for obj in stream([url], decode="tokens", shuffle=0, split=False, stats=stats):
                    got += 1
                    yield obj
            if not got and len(stats.corrupt_shards) >= len(set(urls)):
                raise RuntimeError(f"slot_objects: no shard could be read; corrupt: {stats.corrupt_shards}")

    objects = shuffled(drawn(), shuffle, rng) if shuffle else drawn()
    yield from (obj for obj in objects if maskable(obj[0], obj[1], table, counter))


class StepBatches(IterableDataset):
    """The micro-batches of every optimizer step from `start_step` on, for one rank.

    A run's data is `processes x grad_accum` slots; rank r trains on slots r*A .. r*A+A-1
    (A = grad_accum), so 2 processes x 1 micro-step and 1 process x 2 micro-steps see the
    same objects with the same masks. Slot s reads `streams` sub-streams (one per
    DataLoader worker); step j takes its batch from sub-stream u = j % streams of data
    segment g = j // segment_steps, whose objects come from an rng seeded by
    (seed, s, u, g), as the (j - g*segment_steps) // streams-th run of `batch_size`
    objects; its masks come from an rng seeded by (masking seed, seed, s, j). So every
    batch is a pure function of (seed, step, slot): a run resumed at step j reads what
    the uninterrupted run read, after passing over at most segment_steps / streams
    batches of objects per slot (read, not masked).

    Yields (step, [A collated batches]); worker w serves steps start_step + w + k*workers,
    which is the order in which a DataLoader returns them.
    """

    def __init__(self, urls: list[str], table: ModalityTable, masking: MaskingConfig, *, batch_size: int,
                 slots: Sequence[int], streams: int = 1, segment_steps: int = 1000, seed: int = 0,
                 start_step: int = 0, shuffle: int = 1000):
        super().__init__()
        if streams < 1 or segment_steps < 1 or segment_steps % streams:
            raise ValueError(f"StepBatches: data_segment_steps ({segment_steps}) must be a positive "
                             f"multiple of the number of streams ({streams}, one per DataLoader worker)")
        self.urls, self.table, self.masking = list(urls), table, masking
        self.batch_size, self.slots, self.streams = batch_size, list(slots), streams
        self.segment_steps, self.seed, self.start_step, self.shuffle = segment_steps, seed, start_step, shuffle
        self.counter: dict = {}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b, L, S = self.batch_size, self.segment_steps, self.streams
        readers: dict = {}                 # (slot, sub-stream) -> [segment, objects iterator, objects taken]
        step = self.start_step + worker
        while True:
            g, u = step // L, step % S
            first = (step - g * L) // S * b                # this batch's first object in the sub-stream
            micro = []
            for s in self.slots:
                reader = readers.get((s, u))
                if reader is None or reader[0] != g:       # a new segment: reseed
                    reader = readers[(s, u)] = [g, slot_objects(self.urls, self.table, self.shuffle,
                                                                (self.seed, s, u, g), self.counter), 0]
                for _ in range(first - reader[2]):          # pass over other workers' / done batches
                    next(reader[1])
                batch = [next(reader[1]) for _ in range(b)]
                reader[2] = first + b
                rng = np.random.default_rng(np.random.SeedSequence([self.masking.seed, self.seed, s, step]))
                micro.append(collate([sample_masks(tokens, self.table, self.masking, rng, where=f"object {oid!r}")
                                      for oid, tokens, _ in batch]))
            yield step, micro
            step += workers


def step_loader(dataset: StepBatches, num_workers: int) -> DataLoader:
    """DataLoader over StepBatches: one item per optimizer step, in step order."""
    return DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())


def _as_is(item):
    return item
