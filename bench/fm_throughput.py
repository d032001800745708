"""FM training throughput: one full step (forward, backward, AdamW) on a modality set shaped
like AION-1's, with AION-1's own transformer as the peer in the same run. One JSON line.

    python bench/fm_throughput.py --dim 256 --depth 4 --heads 4 --batch 8 --enc 256 --dec 128 \\
        --peer-python /work/aion-venv/bin/python
    python bench/fm_throughput.py --config launch/fm/base.yaml --batch 64    # on a GPU: MFU

Modalities: an image of 576 tokens (vocab 4375), a spectrum of 273 (vocab 1024), five
scalars of one token (vocab 1024); every object holds all of them. Masks are drawn in
numpy as in the data workers (Dirichlet alpha 5 for inputs and targets), outside the
timed region, and both models get the same batches, the same masks and the same
optimizer (torch's fused AdamW by default; `--adamw loop` is torch's CPU default).

Tokens are counted two ways: `tokens_per_s` counts the real (non-padding) encoder +
decoder tokens of a step, `budget_tokens_per_s` counts batch * (enc + dec) budget slots,
padding included (input budget a modality cannot use stays padding, see fm.masking; the
scalars' share of the input budget mostly does). Both are over the median step time.

The peer (`--peer-python`, the interpreter of a venv with `polymathic-aion`) runs
bench/peers/aion_fm.py in a subprocess at the same width, depth, heads, budgets and
threads, and the two models take steps in strict alternation (one step each, never at
the same time), so load on a shared machine falls on both alike. `speedup_vs_aion` is
AION-1's median step time over ours, i.e. the ratio of tokens/s either way of counting.

`model_gflops_per_step` counts the matrix products over the real tokens (train.throughput,
3x forward), `budget_gflops_per_step` the same as if every budget slot were computed, as
AION-1 does: their ratio is what skipping padding alone can buy. On CUDA the step runs
under bf16 autocast and `mfu` = model FLOPs/s over the GPU's dense bf16 peak (H100: 989
TFLOP/s). `--precision bf16` autocasts on a CPU too, both models alike (on a CPU with AMX
a bf16 matrix product runs ~7x faster than fp32); `--config` takes the model (and the
budgets, batch) from a launch/fm YAML.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from omnisky.config import from_dict
from omnisky.fm.data import collate
from omnisky.fm.masking import MaskingConfig, sample_masks
from omnisky.fm.modality import ModalityTable
from omnisky.fm.model import FMConfig, FourM
from omnisky.train.throughput import TrainingFlops, peak_flops

from aion_like import AION_LIKE, aion_like_table

PEER = Path(__file__).resolve().parent / "peers" / "aion_fm.py"
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}   # torch.optim.AdamW


def make_batches(table: ModalityTable, cfg: MaskingConfig, batch: int, n: int, seed: int = 0):
    """n masked batches and, for the peer, every token of their objects {key: (B, n_key)}."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        objs = [{k: rng.integers(0, v, size=t).astype(np.int32) for k, (v, t) in AION_LIKE.items()}
                for _ in range(batch)]
        masked = collate([sample_masks(o, table, cfg, rng) for o in objs])
        out.append((masked, {k: np.stack([o[k] for o in objs]) for k in table.keys}))
    return out


def write_peer_data(path: Path, table: ModalityTable, data) -> None:
    arrays = {"keys": np.array(table.keys), "n_batches": np.array(len(data))}
    for i, (masked, tokens) in enumerate(data):
        arrays.update({f"{i}/{k}": v.numpy() for k, v in masked.items() if k != "enc_ids" and k != "dec_targets"})
        arrays.update({f"{i}/tokens/{k}": v for k, v in tokens.items()})
    np.savez(path, **arrays)


class Peer:
    """bench/peers/aion_fm.py in a subprocess: one training step per `step(i)` call."""

    def __init__(self, python: str, data: Path, args, threads: int, bf16: bool):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [python, str(PEER), "--data", str(data), "--dim", str(args.dim), "--depth", str(args.depth),
               "--heads", str(args.heads), "--enc", str(args.enc), "--dec", str(args.dec), "--adamw", args.adamw] + ["--bf16"] * bf16
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {PEER.name} exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def step(self, i: int) -> float:
        self.proc.stdin.write(f"step {i}\n")
        self.proc.stdin.flush()
        return self._reply()["step_s"]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Ours:
    """omnisky's FourM with AdamW: one training step per `step(i)` call."""

    def __init__(self, cfg: FMConfig, table: ModalityTable, data, device: torch.device, bf16: bool, adamw: str):
        torch.manual_seed(0)
        self.model = FourM(cfg, table).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **ADAMW[adamw])
        self.batches = [{k: v.to(device) for k, v in masked.items()} for masked, _ in data]
        self.device = device
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, i: int) -> float:
        batch = self.batches[i % len(self.batches)]
        self.sync()
        t0 = time.perf_counter()
        with self.autocast():
            loss, _ = self.model(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sync()
        return time.perf_counter() - t0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="launch/fm YAML: model (and budgets, batch) from it")
    ap.add_argument("--dim", type=int, default=None, help="width (default 256, or the config's)")
    ap.add_argument("--depth", type=int, default=None, help="encoder and decoder layers each (default 4)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    ap.add_argument("--batch", type=int, default=None, help="objects per step (default 8)")
    ap.add_argument("--enc", type=int, default=None, help="input token budget per object (default 256)")
    ap.add_argument("--dec", type=int, default=None, help="target token budget per object (default 128)")
    ap.add_argument("--attention", default=None, help="attention backend (default sdpa)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, ours and the peer's "
                    "(default: torch's, i.e. OMP_NUM_THREADS)")
    ap.add_argument("--peer-python", default=None, help="python of a venv with polymathic-aion (AION-1 peer)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 autocast on CUDA GPUs that have it, else fp32; bf16 also on a CPU (both models)")
    ap.add_argument("--adamw", choices=sorted(ADAMW), default="fused",
                    help="torch AdamW implementation, the same for both models (loop: torch's CPU default)")
    args = ap.parse_args()
    model, masking, batch = {}, {}, 8
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text())
        model, masking, batch = cfg.get("model", {}), cfg.get("masking", {}), cfg.get("batch_size", 8)
    defaults = {"dim": model.get("dim", 256), "depth": model.get("enc_depth", 4), "heads": model.get("heads", 4),
                "batch": batch, "enc": masking.get("input_budget", 256), "dec": masking.get("target_budget", 128),
                "attention": model.get("attention", "sdpa")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if model and model.get("dec_depth", args.depth) != model.get("enc_depth", args.depth):
        raise SystemExit(f"{args.config}: the bench runs equal encoder and decoder depths")
    model.update(dim=args.dim, enc_depth=args.depth, dec_depth=args.depth, heads=args.heads, attention=args.attention)
    return args, from_dict(FMConfig, model)


def main() -> None:
    args, fm_config = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    table = aion_like_table()
    masking = MaskingConfig(args.enc, args.dec, input_alphas=(5.0,), target_alphas=(5.0,))
    data = make_batches(table, masking, args.batch, min(args.warmup + args.steps, 8))

    ours = Ours(fm_config, table, data, device, bf16, args.adamw)
    runners = {"ours": ours}
    with tempfile.TemporaryDirectory() as tmp:
        if args.peer_python:
            write_peer_data(Path(tmp) / "batches.npz", table, data)
            runners["aion"] = Peer(args.peer_python, Path(tmp) / "batches.npz", args, threads, bf16)
        times = {name: [] for name in runners}
        try:
            for i in range(args.warmup + args.steps):      # strict alternation, one step each
                for name, runner in runners.items():
                    dt = runner.step(i)
                    if i >= args.warmup:
                        times[name].append(dt)
        finally:
            if "aion" in runners:
                runners["aion"].close()

    timed = [data[i % len(data)][0] for i in range(args.warmup, args.warmup + args.steps)]
    real = statistics.mean(int((~b["enc_pad"]).sum() + (~b["dec_pad"]).sum()) for b in timed)
    budget = args.batch * (args.enc + args.dec)
    flops = TrainingFlops(ours.model)
    step_flops = statistics.mean(flops(b) for b in timed)
    # the same model FLOPs if every budget slot were computed, padding included (AION-1's way)
    budget_flops = statistics.mean(flops({**b, "enc_pad": torch.zeros_like(b["enc_pad"]),
                                          "dec_pad": torch.zeros_like(b["dec_pad"])}) for b in timed)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": threads,
           "dim": args.dim, "depth": args.depth, "heads": args.heads, "batch": args.batch, "enc": args.enc,
           "dec": args.dec, "attention": args.attention, "swiglu": fm_config.swiglu, "qk_norm": fm_config.qk_norm,
           "bf16": bf16, "adamw": args.adamw, "steps": args.steps, "params_m": round(ours.model.num_params() / 1e6, 2),
           "real_tokens_per_step": round(real, 1), "budget_tokens_per_step": budget}
    for name, ts in times.items():
        prefix = "" if name == "ours" else f"{name}_"
        step_s = statistics.median(ts)
        out[f"{prefix}step_s"] = round(step_s, 4)
        out[f"{prefix}tokens_per_s"] = round(real / step_s, 1)
        out[f"{prefix}budget_tokens_per_s"] = round(budget / step_s, 1)
    step_s = out["step_s"]
    out["model_gflops_per_step"] = round(step_flops / 1e9, 2)
    out["budget_gflops_per_step"] = round(budget_flops / 1e9, 2)
    out["model_tflops_per_s"] = round(step_flops / step_s / 1e12, 4)
    peak = peak_flops(device)
    if peak:
        out["mfu"] = round(step_flops / step_s / peak, 4)
    if "aion" in runners:
        out["aion_params_m"] = runners["aion"].info["params_m"]
        out["aion_threads"] = runners["aion"].info["threads"]
        out["speedup_vs_aion"] = round(out["aion_step_s"] / step_s, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
