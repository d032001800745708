"""Building the FM already partitioned under ZeRO-3, so no rank ever holds the whole model.

    with model_init_context(accelerator):       # deepspeed.zero.Init under ZeRO-3, else nothing
        model = FourM(cfg.model, table)

ZeRO-3 shards parameters, gradients and optimizer state across ranks at `prepare()`; a
model built plainly first exists in full on every rank (and its full fp32 copy sets the
per-rank peak memory of the first step). Under `deepspeed.zero.Init` each submodule's
parameters are partitioned as soon as its constructor returns; `FourM` then runs its
weight init under `GatheredParameters` one module at a time (fm.model), so the weights
are the same as without it. On by default under ZeRO-3 (the accelerate configs'
`zero3_init_flag`, or ACCELERATE_DEEPSPEED_ZERO3_INIT); `zero3_init_flag: false` turns it off.
"""
from __future__ import annotations

import contextlib
import copy

from .export import zero_stage


def _without_auto(config):
    """The DeepSpeed config with accelerate's unresolved 'auto' entries dropped (zero.Init
    reads only dtype, partitioning and offload settings from it)."""
    if isinstance(config, dict):
        return {k: _without_auto(v) for k, v in config.items() if v != "auto"}
    return config


def model_init_context(accelerator):
    """deepspeed.zero.Init with the run's DeepSpeed config under ZeRO-3 with
    zero3_init_flag; a null context otherwise."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or zero_stage(accelerator) != 3 or not plugin.zero3_init_flag:
        return contextlib.nullcontext()
    import deepspeed
    config = _without_auto(copy.deepcopy(plugin.deepspeed_config))
    # No `dtype`: the config's bf16 / fp16 sections set it (fp32 without them). DeepSpeed 0.18-0.19
    # reads an explicit dtype as `dtype or fp16 if the accelerator has fp16 else bf16 ...`, so on a
    # CPU without mkldnn fp16 (AMD EPYC, AVX-512 without AMX-FP16) any dtype turned into bf16:
    # fp32 weights built in bf16, a run that no longer matched its 1-process twin or its export.
    return deepspeed.zero.Init(config_dict_or_path=config)
