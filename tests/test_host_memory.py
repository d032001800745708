"""glibc's pinned mmap threshold (train/host_memory.py) and the ZeRO config the FM trainer fills."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from omnisky.train.fm import TrainFMConfig, configure_deepspeed, fill_zero3_buckets
from omnisky.train.host_memory import pin_mmap_threshold

PROBE = r"""
import os, sys, torch
from omnisky.train.host_memory import pin_mmap_threshold
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
pinned = pin_mmap_threshold(int(sys.argv[1]))
warm = torch.ones(2 ** 21)   # one 8 MiB block, freed: glibc's default threshold grows past it
del warm
start, big, keep = rss_mib(), [], []
for _ in range(8):          # layer-sized transients, each with a small long-lived block after it
    big.append(torch.ones(2 ** 21))                 # 8 MiB
    keep.append(torch.ones(2 ** 14))                # 64 KiB
del big
print(pinned, rss_mib() - start)
"""


def resident_after_transients(threshold: int) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True)
    pinned, grown = out.stdout.split()
    return pinned == "True", float(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pinned_threshold_returns_freed_layer_sized_tensors_to_the_os():
    pinned, grown_pinned = resident_after_transients(4 * 2 ** 20)
    default, grown_default = resident_after_transients(0)
    assert pinned and not default
    # glibc's growing threshold serves the later 8 MiB blocks from the heap, where the small
    # block above them keeps them resident; pinned, they are unmapped on free
    assert grown_default > 32 and grown_pinned < 8, (grown_default, grown_pinned)


def test_threshold_above_glibcs_maximum_is_refused():
    with pytest.raises(ValueError, match="32 MiB"):
        pin_mmap_threshold(64 * 2 ** 20)
    assert pin_mmap_threshold(0) is False


def test_zero_buckets_filled_where_unset_or_auto_and_kept_where_given():
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 12345}
    fill_zero3_buckets(zero, 256)
    assert zero == {"stage": 3, "reduce_bucket_size": 256 ** 2, "stage3_prefetch_bucket_size": 12345,
                    "stage3_param_persistence_threshold": 2560,
                    "stage3_max_live_parameters": 12 * 256 ** 2, "stage3_max_reuse_distance": 12 * 256 ** 2}


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_fills_buckets_under_zero3_only(stage):
    """What an accelerate YAML hands the trainer: a ZeRO config that names no bucket sizes."""
    ds = {"zero_optimization": {"stage": stage}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)),
                                  num_processes=2)
    cfg = TrainFMConfig(batch_size=4, grad_accum=3)
    configure_deepspeed(accelerator, cfg)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    filled = {"reduce_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"}
    assert (filled <= set(ds["zero_optimization"])) == (stage == 3)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_max_live_parameters"] == 12 * cfg.model.dim ** 2
