"""The real FM training entry point under `accelerate launch`: 1 process, ZeRO-2 and ZeRO-3
on 2 CPU processes, stop + resume, the consolidated export. One module-scoped set of
runs (DeepSpeed's start-up dominates), then the comparisons."""
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
from test_fm import TINY, structured_tokens, tiny_table, write_token_shards  # noqa: E402

from omnisky.fm.data import StepBatches, step_loader  # noqa: E402
from omnisky.fm.masking import MaskingConfig  # noqa: E402
from omnisky.fm.model import FourM  # noqa: E402
from omnisky.shards.writer import shard_urls  # noqa: E402
from omnisky.train.throughput import TrainingFlops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TINY_RUN = ["--set", "model.dim=64", "--set", "model.enc_depth=2", "--set", "model.dec_depth=2",
            "--set", "masking.input_budget=24", "--set", "masking.target_budget=24",
            "--set", "batch_size=4", "--set", "warmup_steps=2", "--set", "log_every=1",
            "--set", "ckpt_every=2", "--set", "eval_every=3", "--set", "eval_batches=2",
            "--set", "num_workers=1", "--set", "shuffle=50", "--set", "data_segment_steps=4",
            "--set", "masking.tasks=[]",   # tiny.yaml's task masks name the demo's modalities
            "--set", f"steps={STEPS}"]
LOSS_TOL = 1e-5   # fp32 on CPU: only the order of the gradient sums differs


def launch(config: str, data: Path, out: Path, *extra: str, timeout: int = 600) -> str:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch/accelerate" / config),
           "-m", "omnisky.train.fm", "--config", str(ROOT / "launch/fm/tiny.yaml"),
           "--data", str(data), "--out", str(out), *TINY_RUN, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def losses(rows: list[dict]) -> torch.Tensor:
    keys = ["loss"] + [f"loss.{k}" for k in sorted(TINY)]
    return torch.tensor([[float(r[k] or "nan") for k in keys] for r in rows], dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 micro-steps (the reference); ZeRO-2 on 2 processes x 2 micro-steps; ZeRO-3
    on 2 processes x 2 micro-steps stopped after 5 steps, its step-5 checkpoint removed as if
    the run had been killed before writing it, then resumed from step 4. The same global
    batch (16) and the same data slots throughout."""
    tmp = tmp_path_factory.mktemp("train_fm")
    data = write_token_shards(tmp / "tokens", n_objects=120, max_count=40)
    out = {name: tmp / name for name in ("single", "zero2", "zero3")}
    logs = {"single": launch("single.yaml", data, out["single"], "--set", "grad_accum=4"),
            "zero2": launch("zero2.yaml", data, out["zero2"], "--set", "grad_accum=2")}
    logs["zero3.stop"] = launch("zero3.yaml", data, out["zero3"], "--set", "grad_accum=2", "--stop-after", "5")
    logs["zero3.rows_at_stop"] = read_log(out["zero3"])
    shutil.rmtree(out["zero3"] / "checkpoints/step-5")
    logs["zero3"] = launch("zero3.yaml", data, out["zero3"], "--set", "grad_accum=2", "--resume")
    return data, out, logs


@pytest.mark.slow
def test_zero2_zero3_match_one_process_and_resume_matches(runs):
    _, out, logs = runs
    assert "1 process(es), NO, fp32, grad_accum 4, global batch 16" in logs["single"]
    assert "2 process(es), DEEPSPEED ZeRO-2, fp32, grad_accum 2, global batch 16" in logs["zero2"]
    assert "2 process(es), DEEPSPEED ZeRO-3 (built partitioned), fp32, grad_accum 2, global batch 16" in logs["zero3.stop"]
    assert "stopped at step 5 of 6" in logs["zero3.stop"] and "steps 4 -> 6" in logs["zero3"]

    rows = {name: read_log(out[name]) for name in out}
    for name in rows:
        assert [int(r["step"]) for r in rows[name]] == list(range(1, STEPS + 1)), name
    ref = losses(rows["single"])
    assert torch.isfinite(ref[:, 0]).all() and (ref[:, 0] > 0).all()
    for name in ("zero2", "zero3"):   # same data, same updates: the same loss curve
        diff = (losses(rows[name]) - ref).abs().nan_to_num(0).max().item()
        assert diff < LOSS_TOL, f"{name} vs 1 process: max |delta loss| {diff}"
    # the resumed run rewrote step 5 (dropped when resuming from step 4) with the same figures
    assert [int(r["step"]) for r in logs["zero3.rows_at_stop"]] == [1, 2, 3, 4, 5]
    assert torch.equal(losses(logs["zero3.rows_at_stop"]), losses(rows["zero3"][:5]))

    row = rows["zero3"][2]
    assert float(row["eval_loss"]) > 0 and float(row["tokens_per_s"]) > 0
    assert float(row["tflops_per_s"]) > 0 and float(row["peak_mem_gib"]) > 0.05
    assert row["mfu"] == ""                                   # no peak FLOP/s known on a CPU
    assert [float(r["lr"]) for r in rows["single"]] == [float(r["lr"]) for r in rows["zero3"]]
    ckpts = sorted(p.name for p in (out["zero3"] / "checkpoints").iterdir())
    assert ckpts == ["step-4", "step-6"]                      # keep_checkpoints: 2
    state = json.loads((out["zero3"] / "checkpoints/step-6/trainer_state.json").read_text())
    assert state["step"] == 6 and state["extra"]["processes"] == 2


@pytest.mark.slow
def test_cpu_bf16_autocast_follows_the_fp32_loss_curve(runs, tmp_path):
    """`cpu_bf16`: bf16 autocast on a CPU (matrix products in bf16, attention in fp32), the
    same run as the 1-process fp32 reference otherwise: its losses within bf16's error."""
    data, out, _ = runs
    log = launch("single.yaml", data, tmp_path / "bf16", "--set", "grad_accum=4", "--set", "cpu_bf16=true")
    assert "1 process(es), NO, bf16 autocast, grad_accum 4" in log
    ref, got = losses(read_log(out["single"])), losses(read_log(tmp_path / "bf16"))
    assert torch.isfinite(got[:, 0]).all()
    rel = ((got - ref).abs() / ref.abs()).nan_to_num(0)
    assert 0 < rel.max().item() < 0.03, rel


@pytest.mark.slow
def test_zero3_export_gives_the_training_models_logits(runs, tmp_path):
    from omnisky.train.export import export_checkpoint
    _, out, logs = runs
    for name in out:   # the run compared the live (ZeRO-sharded) model with the reloaded export
        check = json.loads((out[name] / "export_check.json").read_text())
        assert check["step"] == STEPS and check["max_abs_logit_diff"] == 0.0, (name, check)
    model = FourM.from_pretrained(out["zero3"] / "model")
    assert model.config.dim == 64 and model.table.keys == sorted(TINY)

    # offline: DeepSpeed's ZeRO-3 shards of the last checkpoint -> the same tensors
    offline = export_checkpoint(out["zero3"] / "checkpoints/step-6", tmp_path / "offline")
    saved = load_file(out["zero3"] / "model/model.safetensors")
    assert saved.keys() == offline.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in offline.state_dict().items())
    a = torch.from_numpy(structured_tokens(3)["image.a"]).long()[None]
    target = {"scalar.z": torch.zeros(1, 1, dtype=torch.long)}
    with torch.no_grad():
        reloaded = FourM.from_pretrained(tmp_path / "offline").logits({"image.a": a}, target)["scalar.z"]
        assert torch.equal(reloaded, model.logits({"image.a": a}, target)["scalar.z"])
    # 1 process and ZeRO-2 trained the same weights as ZeRO-3
    for name in ("single", "zero2"):
        other = load_file(out[name] / "model/model.safetensors")
        assert max((other[k] - saved[k]).abs().max().item() for k in saved) < 1e-5, name


def test_step_batches_are_a_function_of_seed_step_and_slot(tmp_path):
    """The data order behind resume and the 1-process / 2-process equivalence."""
    urls = shard_urls(write_token_shards(tmp_path / "tok", n_objects=60, max_count=16))
    table, masking = tiny_table(), MaskingConfig(12, 12)

    def run(slots, start, workers, streams=2, n=6):
        ds = StepBatches(urls, table, masking, batch_size=4, slots=slots, streams=streams,
                         segment_steps=4, seed=7, start_step=start, shuffle=20)
        it = iter(step_loader(ds, workers))
        return [next(it) for _ in range(n)]

    full = run([0, 1], 0, workers=2, n=10)
    assert [s for s, _ in full] == list(range(10))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    for start, workers in ((5, 2), (3, 0), (6, 1)):               # resumed, other worker counts
        for (step, micro), (ref_step, ref) in zip(run([0, 1], start, workers), full[start:]):
            assert step == ref_step and all(same(m, r) for m, r in zip(micro, ref))
    # the slots of one process with 2 micro-steps = those of 2 processes with one each
    for s in (0, 1):
        for (_, micro), (_, ref) in zip(run([s], 0, workers=0), full):
            assert same(micro[0], ref[s])
    assert not same(full[0][1][0], full[0][1][1])                 # slots differ
    assert not same(full[0][1][0], full[4][1][0])                 # segments differ
    with pytest.raises(ValueError, match="multiple"):
        StepBatches(urls, table, masking, batch_size=4, slots=[0], streams=3, segment_steps=4)


def test_training_flops_count_the_matrix_products():
    table = tiny_table()
    from omnisky.fm.model import FMConfig
    D = 32
    model = FourM(FMConfig(dim=D, enc_depth=1, dec_depth=1, heads=2, mlp_ratio=2.0), table)
    m = table.index("scalar.z")
    batch = {"enc_pad": torch.tensor([[False, False, True]]),
             "dec_pad": torch.tensor([[False, True]]), "dec_mod": torch.tensor([[m, 0]])}
    # encoder block: q, kv, proj (4 D^2) + mlp (2 * 2 D^2) per input token; attention 2 D n^2
    enc = 2 * (8 * D * D) + 2 * D * 2 ** 2
    # decoder block per target: self q/kv/proj (4 D^2) + cross q/proj (2 D^2) + mlp (4 D^2);
    # cross k/v (2 D^2) per input token; attention 2 D (1^2 + 1 * 2); head D * 16
    dec = 10 * D * D + 2 * (2 * D * D) + 2 * D * (1 + 2) + D * 16
    assert TrainingFlops(model)(batch) == 6 * (enc + dec)


def test_a_task_naming_no_modality_fails_at_start(tmp_path):
    """A masking task that names a modality the token shards lack is refused before training,
    with the key named, not deep in a data worker."""
    data = write_token_shards(tmp_path / "tokens", n_objects=20, max_count=10)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch/accelerate/single.yaml"),
           "-m", "omnisky.train.fm", "--config", str(ROOT / "launch/fm/tiny.yaml"),
           "--data", str(data), "--out", str(tmp_path / "run"), *TINY_RUN,
           "--set", "masking.tasks=[{inputs: [image.zzz], targets: [image.a], prob: 0.1}]"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "MaskingConfig.tasks" in log and "image.zzz" in log, log[-3000:]
    assert not (tmp_path / "run" / "log.csv").exists()
