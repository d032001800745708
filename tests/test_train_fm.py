"""The real FM training entry point: `accelerate launch` on 2 CPU processes under ZeRO-2."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_fm import TINY, structured_tokens, write_token_shards  # noqa: E402

from omnisky.fm.model import FourM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_RUN = ["--set", "model.dim=64", "--set", "model.enc_depth=2", "--set", "model.dec_depth=2",
            "--set", "masking.input_budget=24", "--set", "masking.target_budget=24",
            "--set", "batch_size=8", "--set", "warmup_steps=2", "--set", "log_every=2",
            "--set", "ckpt_every=4", "--set", "eval_every=3", "--set", "eval_batches=2",
            "--set", "num_workers=1", "--set", "shuffle=50"]


def launch(config: str, data: Path, out: Path, *extra: str, timeout: int = 300) -> str:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch/accelerate" / config),
           "-m", "omnisky.train.fm", "--config", str(ROOT / "launch/fm/tiny.yaml"),
           "--data", str(data), "--out", str(out), *TINY_RUN, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_zero2_two_processes_train_checkpoint_export_resume(tmp_path):
    data = write_token_shards(tmp_path / "tokens", n_objects=120, max_count=40)
    out = tmp_path / "run"
    log = launch("zero2.yaml", data, out, "--set", "steps=6")
    assert "2 process(es), DEEPSPEED ZeRO-2" in log

    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]          # log_every=2, eval_every=3, last
    assert all(float(r["loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert rows[1]["eval_loss"] and float(rows[1]["eval_loss"]) > 0
    assert {f"loss.{k}" for k in TINY} <= set(rows[0])
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-4", "step-6"]
    assert json.loads((out / "checkpoints/step-6/trainer_state.json").read_text())["step"] == 6

    model = FourM.from_pretrained(out / "model")
    assert model.config.dim == 64 and model.table.keys == sorted(TINY)
    a = torch.from_numpy(structured_tokens(3)["image.a"]).long()[None]
    with torch.no_grad():
        logits = model.logits({"image.a": a}, {"scalar.z": torch.zeros(1, 1, dtype=torch.long)})["scalar.z"]
    assert logits.shape == (1, 1, 16) and torch.isfinite(logits).all()

    # resume from step 6 and go on to 8 with lr 0: the log keeps its rows and continues at
    # step 8, and the exported weights are exactly the step-6 ones, so load_state restored them
    before = load_file(out / "model/model.safetensors")
    log = launch("zero2.yaml", data, out, "--set", "steps=8", "--set", "lr=0.0", "--resume")
    assert "steps 6 -> 8" in log
    rows2 = read_log(out)
    assert [int(r["step"]) for r in rows2] == [2, 3, 4, 6, 8]
    assert rows2[:4] == rows
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]
    after = load_file(out / "model/model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
