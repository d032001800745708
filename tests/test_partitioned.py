"""train.partitioned: the FM built under deepspeed.zero.Init holds the weights of a plain build,
in the precision the DeepSpeed config asks for, on any CPU (a one-process gloo group, in a
subprocess so that no process group leaks into the other tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = r"""
import json, os, socket, sys, torch
sys.path.insert(0, sys.argv[1])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from types import SimpleNamespace
from test_fm import tiny_table
from omnisky.fm.model import FMConfig, FourM
from omnisky.train.partitioned import model_init_context

cfg = FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2, sky_attention=True)
out = {}
for name, extra in (("fp32", {}), ("bf16", {"bf16": {"enabled": True}})):
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": "auto", **extra}
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds, zero3_init_flag=True)))
    torch.manual_seed(0)
    plain = FourM(cfg, tiny_table()).state_dict()
    torch.manual_seed(0)
    with model_init_context(acc):
        part = FourM(cfg, tiny_table())
    params = list(part.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        got = {k: v.detach().float().clone() for k, v in part.state_dict().items()}
    out[name] = dict(dtypes=sorted({str(p.ds_tensor.dtype) for p in params}),
                     max_diff=max((got[k] - plain[k].float()).abs().max().item() for k in plain))
print(json.dumps(out))
"""


def test_zero_init_builds_the_plain_weights_in_the_configs_precision():
    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tests)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fp32"] == {"dtypes": ["torch.float32"], "max_diff": 0.0}, out
    assert out["bf16"]["dtypes"] == ["torch.bfloat16"] and out["bf16"]["max_diff"] < 0.05, out
