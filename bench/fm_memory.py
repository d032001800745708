"""Per-rank memory of FM training under DeepSpeed ZeRO-3: 2 processes against 1. One JSON line.

    python bench/fm_memory.py                     # dim 1024, 4 + 4 layers (~140M parameters)
    python bench/fm_memory.py --dim 768 --depth 2 --config launch/accelerate/zero3.yaml

Runs `accelerate launch --config_file <zero3.yaml> --num_processes N` of this script
(`--worker`) for N = 1 and N = 2, one after the other. Each rank builds the FourM (an
AION-shaped modality set, as bench/fm_throughput.py), prepares it with AdamW through
accelerate's DeepSpeed ZeRO-3, takes `--steps` training steps on small batches (so that
parameters, gradients and optimizer state dominate, not activations) and reports:

- peak_rss_gib: the rank's peak resident memory (getrusage ru_maxrss), everything
  included (interpreter, torch, DeepSpeed, the full model where it is built before ZeRO-3
  partitions it, communication buffers);
- zero3_init: whether the model was built partitioned (deepspeed.zero.Init, the accelerate
  config's zero3_init_flag; `--zero3-init on|off` forces it);
- base_rss_gib: its resident memory after imports (DeepSpeed's included) and
  process-group setup, before the model (the floor no sharding can lower);
- state_gib: the bytes of this rank's parameter partition, fp32 master partition,
  gradient partition and AdamW moments, as DeepSpeed holds them.

`peak_ratio` = max per-rank peak RSS with 2 processes / peak RSS with 1 (goal <= 0.6);
`state_ratio` the same for state_gib (ideally 0.5); `p*_peak_after_gib` the peak RSS
after building the model, after prepare() and after the first step, to see which phase
sets the peak. The ranks fill the DeepSpeed config and pin glibc's mmap threshold as
omnisky.train.fm does (fill_zero3_buckets, train/host_memory.py; `--mmap-threshold-mib 0`
leaves glibc's default). `--live K` caps ZeRO-3's gathered parameters (stage3_max_live_parameters,
stage3_max_reuse_distance) at K * dim^2 instead of the trainer's 12 dim^2;
`--sub-group K` sets ZeRO-3's sub_group_size (the optimizer step's flattened fp32
partitions, DeepSpeed's default 1e9 elements: one group) to K * dim^2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # KiB on Linux


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "numel"))


def zero3_state_bytes(model, optimizer) -> dict[str, int]:
    """This rank's share of what ZeRO-3 keeps: parameter partitions (ds_tensor), the fp32
    master partition, gradient partitions and the inner optimizer's state."""
    zero = getattr(optimizer, "optimizer", optimizer)                        # accelerate wrapper -> DeepSpeed
    inner = getattr(zero, "optimizer", zero)                                 # DeepSpeed -> torch AdamW
    out = {"params": tensor_bytes(p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")),
           "master": tensor_bytes(getattr(zero, "fp32_partitioned_groups_flat", [])),
           "grads": tensor_bytes(g for g in getattr(zero, "averaged_gradients", {}).values()
                                 for g in (g if isinstance(g, list) else [g])),
           "optimizer": tensor_bytes(v for s in inner.state.values() for v in s.values())}
    out["total"] = sum(out.values())
    return out


def worker(args) -> None:
    """One rank: build, prepare with ZeRO-3, train `steps` steps, write rank<r>.json."""
    import numpy as np
    import torch

    from omnisky.fm.data import collate
    from omnisky.fm.masking import MaskingConfig, sample_masks
    from omnisky.fm.model import FMConfig, FourM
    from omnisky.train.fm import fill_zero3_buckets, make_optimizer
    from omnisky.train.host_memory import pin_mmap_threshold

    from aion_like import AION_LIKE, aion_like_table
    from omnisky.train.loop import finish, make_accelerator
    from omnisky.train.partitioned import model_init_context

    accelerator = make_accelerator()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        raise SystemExit("fm_memory --worker: run under accelerate launch with a ZeRO-3 DeepSpeed config")
    ds = plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
              train_batch_size=args.batch * accelerator.num_processes, gradient_clipping=1.0)
    zero = ds.setdefault("zero_optimization", {})
    fill_zero3_buckets(zero, args.dim)                                       # as the trainer does
    pin_mmap_threshold(args.mmap_threshold_mib * 2 ** 20)                     # as the trainer does on CPU
    if args.sub_group:   # the step flattens each sub-group's gradients into one fp32 buffer
        zero["sub_group_size"] = args.sub_group * args.dim ** 2
    if args.live:        # gathered parameters kept at most (DeepSpeed's default 1e9 keeps them all)
        zero.update(stage3_max_live_parameters=args.live * args.dim ** 2,
                    stage3_max_reuse_distance=args.live * args.dim ** 2)
    import deepspeed  # noqa: F401  what prepare() imports, so that base_rss counts it
    from transformers.integrations import deepspeed as hf_deepspeed  # noqa: F401
    base = rss_now()

    table = aion_like_table()
    torch.manual_seed(0)
    with model_init_context(accelerator):      # deepspeed.zero.Init when zero3_init_flag is on
        model = FourM(FMConfig(dim=args.dim, enc_depth=args.depth, dec_depth=args.depth, heads=args.dim // 64), table)
    n_params = model.num_params()
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05)             # the trainer's AdamW
    stages = {"built": peak_rss() / GIB}
    model, optimizer = accelerator.prepare(model, optimizer)
    stages["prepared"] = peak_rss() / GIB
    rng = np.random.default_rng(accelerator.process_index)
    masking = MaskingConfig(64, 32)
    for _ in range(args.steps):
        objs = [{k: rng.integers(0, v, size=n) for k, (v, n) in AION_LIKE.items()} for _ in range(args.batch)]
        batch = collate([sample_masks(o, table, masking, rng) for o in objs])
        loss, _ = model({k: v.to(accelerator.device) for k, v in batch.items()})
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stages.setdefault("first_step", peak_rss() / GIB)
    state = zero3_state_bytes(accelerator.unwrap_model(model), optimizer)
    report = {"rank": accelerator.process_index, "processes": accelerator.num_processes, "params": n_params,
              "zero3_init": bool(plugin.zero3_init_flag),
              "peak_rss_gib": peak_rss() / GIB, "base_rss_gib": base / GIB, "end_rss_gib": rss_now() / GIB,
              "state_gib": state["total"] / GIB, "state_parts_gib": {k: v / GIB for k, v in state.items()},
              "peak_rss_after_gib": stages, "loss": float(loss.detach())}
    (Path(args.worker) / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    finish(accelerator)


def launch(args, processes: int, out: Path) -> list[dict]:
    """accelerate launch this script as `processes` ranks; their reports."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(args.config),
           "--num_processes", str(processes),
           *(["--zero3_init_flag", "true" if args.zero3_init == "on" else "false"] if args.zero3_init != "config" else []),
           str(Path(__file__).resolve()), "--worker", str(out),
           "--dim", str(args.dim), "--depth", str(args.depth), "--batch", str(args.batch), "--steps", str(args.steps), "--live", str(args.live),
           "--sub-group", str(args.sub_group), "--mmap-threshold-mib", str(args.mmap_threshold_mib)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if run.returncode or len(reports) != processes:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"fm_memory: the {processes}-process run failed (exit {run.returncode})")
    return reports


def main() -> None:
    from omnisky.train.fm import TrainFMConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "launch" / "accelerate" / "zero3.yaml"),
                    help="accelerate config with DeepSpeed ZeRO-3")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4, help="encoder and decoder layers each")
    ap.add_argument("--batch", type=int, default=2, help="objects per rank and step (budgets 64 + 32)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--live", type=int, default=0, help="stage3_max_live_parameters and _max_reuse_distance "
                    "in dim^2 units (0: the DeepSpeed config's, else the trainer's 12)")
    ap.add_argument("--sub-group", type=int, default=0, help="ZeRO-3 sub_group_size in dim^2 units "
                    "(0: the config's / DeepSpeed's 1e9)")
    ap.add_argument("--mmap-threshold-mib", type=int, default=TrainFMConfig().host_mmap_threshold_mib,
                    help="glibc's pinned mmap threshold (train/host_memory.py; 0: glibc's growing default); "
                         "the trainer's host_mmap_threshold_mib")
    ap.add_argument("--zero3-init", default="config", choices=["config", "on", "off"],
                    help="build the model partitioned (deepspeed.zero.Init): as the accelerate config says, or force it")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: launch(args, n, Path(tmp) / f"p{n}") for n in (1, 2)}
    one, two = runs[1][0], runs[2]
    out = {"config": Path(args.config).name, "dim": args.dim, "depth": args.depth, "heads": args.dim // 64,
           "live_dim2": args.live, "sub_group_dim2": args.sub_group, "mmap_threshold_mib": args.mmap_threshold_mib, "zero3_init": one["zero3_init"],
           "params_m": round(one["params"] / 1e6, 2), "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
           "p1_peak_rss_gib": round(one["peak_rss_gib"], 3), "p1_base_rss_gib": round(one["base_rss_gib"], 3),
           "p1_state_gib": round(one["state_gib"], 3),
           "p1_state_parts_gib": {k: round(v, 3) for k, v in one["state_parts_gib"].items()},
           "p2_peak_rss_gib": [round(r["peak_rss_gib"], 3) for r in two],
           "p2_base_rss_gib": [round(r["base_rss_gib"], 3) for r in two],
           "p2_state_gib": [round(r["state_gib"], 3) for r in two],
           "p1_peak_after_gib": {k: round(v, 3) for k, v in one["peak_rss_after_gib"].items()},
           "p2_peak_after_gib": [{k: round(v, 3) for k, v in r["peak_rss_after_gib"].items()} for r in two]}
    out["peak_ratio"] = round(max(out["p2_peak_rss_gib"]) / out["p1_peak_rss_gib"], 3)
    out["state_ratio"] = round(max(out["p2_state_gib"]) / out["p1_state_gib"], 3)
    out["peak_above_base_ratio"] = round(max(r["peak_rss_gib"] - r["base_rss_gib"] for r in two)
                                         / (one["peak_rss_gib"] - one["base_rss_gib"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
