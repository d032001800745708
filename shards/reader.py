"""Stream raw or token shards with webdataset: shuffled, split by node and worker.

    ds = stream(shard_urls("out/raw"), decode="raw", shuffle=1000, seed=0)
    for sample in ds: ...                # shards.schema.Sample

    ds = stream(urls, decode="tokens", resampled=True, seed=1)   # endless, for training
    for object_id, tokens, meta in ds: ...

A truncated or corrupt shard is skipped with a warning naming it (webdataset's
`warn_and_continue`), never hanging the worker. With `resampled=True` every rank and
worker draws shards at random with replacement, so the stream never ends and no rank
waits for another at an epoch boundary; training counts steps, not epochs.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import webdataset as wds

from .codec import decode_sample, decode_tokens


def _warn(exn: Exception) -> bool:
    warnings.warn(f"omnisky.shards: skipping corrupt data: {exn!r}", stacklevel=2)
    return True


def _decoder(kind: str) -> Callable:
    if kind == "raw":
        return decode_sample
    if kind == "tokens":
        return decode_tokens
    raise ValueError(f"decode must be 'raw' or 'tokens', got {kind!r}")


def stream(urls: str | Iterable[str], decode: str = "raw", shuffle: int = 0, seed: int = 0,
           resampled: bool = False, split: bool = True) -> wds.WebDataset:
    """A webdataset pipeline over `urls` yielding decoded samples.

    shuffle:   sample shuffle buffer size (0: keep shard order, shards in order too).
    seed:      seeds shard and sample shuffling; same seed, same order.
    resampled: draw shards with replacement forever (training streams).
    split:     split shards across distributed ranks and dataloader workers.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("stream: no shard urls given")
    ds = wds.WebDataset(
        urls,
        handler=_warn,
        resampled=resampled,
        shardshuffle=(len(urls) if shuffle and not resampled else False),
        detshuffle=bool(shuffle),
        seed=seed,
        nodesplitter=wds.split_by_node if (split and not resampled) else _every_shard,
        workersplitter=wds.split_by_worker if (split and not resampled) else _every_shard,
        empty_check=False,
    )
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed)
    return ds.map(_decoder(decode), handler=_warn)


def _every_shard(urls):
    """No splitting: resampled streams draw their own shards on every rank/worker."""
    return urls
