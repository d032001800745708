"""Train the masked multimodal transformer on token shards, with DeepSpeed ZeRO via accelerate.

    accelerate launch --config_file launch/accelerate/zero2.yaml -m omnisky.train.fm \\
        --config launch/fm/tiny.yaml --data TOKEN_SHARDS_DIR --out OUT [--set key=value] \\
        [--resume] [--stop-after N]

OUT/log.csv          step, loss, loss.<modality>..., lr, tokens_per_s, steps_per_s, tflops_per_s,
                     mfu, peak_mem_gib, eval_loss, elapsed_s (tokens: non-padding input + target
                     tokens of all ranks per second of training; tflops_per_s and mfu per device,
                     model FLOPs as in train/throughput.py, mfu on known GPUs only; peak_mem_gib:
                     the largest over ranks of CUDA max allocated, or peak RSS on CPU)
OUT/tensorboard/     the same figures, with `tensorboard: true` and the package installed
OUT/config.yaml      the resolved training config
OUT/checkpoints/step-N/   accelerator.save_state (DeepSpeed shards) + trainer_state.json
OUT/model/           the consolidated model: FourM.from_pretrained(OUT/model)
OUT/export_check.json     max |logits(live) - logits(OUT/model)| on a fixed probe

Data: every batch is a pure function of (seed, step, slot) (fm/data.py StepBatches):
a run has processes x grad_accum slots, so a resumed run reads exactly the batches the
uninterrupted run read, and 2 processes x 1 micro-step train on the same objects as
1 process x 2 micro-steps. The stream is not passed through `accelerator.prepare`.

Stopping: `--stop-after N` checkpoints and exits after N steps of this invocation;
a file OUT/STOP (looked for every log_every steps) does the same, for schedulers that
warn before a time limit. Either way `--resume` continues at the same step with the
same data. The training config is the one source of the batch size, gradient
accumulation and clipping: they are written into the DeepSpeed config before `prepare`.
The learning rate (warmup + cosine) is set on the optimizer's param groups every step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm

from ..config import load_config, parse_overrides, to_dict
from ..fm.data import StepBatches, fixed_batches, step_loader
from ..fm.masking import MaskingConfig, check_keys
from ..fm.model import FMConfig, FourM
from ..fm.modality import ModalityTable
from ..shards.writer import shard_urls
from .export import check_export, consolidated_state_dict, zero_stage
from .host_memory import pin_mmap_threshold
from .loop import (CSVLog, TensorBoardLog, cosine_lr, finish, load_latest_checkpoint, make_accelerator, on_cpu,
                   save_checkpoint, set_lr)
from .partitioned import model_init_context
from .throughput import TrainingFlops, peak_flops, peak_memory_gib


@dataclass
class TrainFMConfig:
    model: FMConfig = field(default_factory=FMConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    steps: int = 1000            # optimizer steps
    batch_size: int = 32         # objects per rank per micro-step
    grad_accum: int = 1          # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0       # 0 = no clipping
    bf16: bool = True            # bf16 autocast of the forward pass where the GPU has bf16
    cpu_bf16: bool = False       # ... and on a CPU too (worth it with AMX / avx512_bf16; see README)
    ckpt_every: int = 500        # and always at the last step
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0          # 0 = never; loss on fixed batches (--eval-data, else the train shards)
    eval_batches: int = 4
    num_workers: int = 1         # DataLoader workers per rank (masking runs there); also the
                                 # number of data sub-streams per slot, so part of the data order
    shuffle: int = 1000          # object shuffle buffer per sub-stream
    data_segment_steps: int = 1000   # data sub-streams are reseeded every this many steps (a resume
                                     # passes over at most this / num_workers batches per slot)
    tensorboard: bool = False    # also log to OUT/tensorboard (needs the tensorboard package)
    peak_tflops: float = 0.0     # per-device peak for MFU; 0 = from the GPU name (H100 989, A100 312)
    host_mmap_threshold_mib: int = 4   # CPU runs: glibc mmaps blocks >= this and unmaps them on free
                                       # (train/host_memory.py; ZeRO-3 per-rank peak 0.57 of 1 rank's vs 0.70
                                       # with glibc's growing default; 0-4% step time); 0 = glibc's default
    seed: int = 0

    def __post_init__(self):
        streams = max(1, self.num_workers)
        if self.data_segment_steps % streams:
            raise ValueError(f"TrainFMConfig: data_segment_steps ({self.data_segment_steps}) must be a "
                             f"multiple of num_workers ({self.num_workers})")
        if not 0 <= self.host_mmap_threshold_mib <= 32:
            raise ValueError(f"TrainFMConfig: host_mmap_threshold_mib must be 0-32 (glibc's maximum), "
                             f"got {self.host_mmap_threshold_mib}")
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainFMConfig: {name} must be >= 1, got {getattr(self, name)}")


# what fixes the data order: a resume with other values reads other batches
DATA_KEYS = ("seed", "batch_size", "grad_accum", "num_workers", "shuffle", "data_segment_steps", "masking")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2), none on norms and biases."""
    def ndim(p):   # ZeRO-3 partitioned parameters are flat; ds_shape is the full shape
        return len(getattr(p, "ds_shape", p.shape))
    decay = [p for p in model.parameters() if p.requires_grad and ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused on CPU and CUDA (torch >= 2.4): one kernel per
    step, and none of the parameter-sized temporaries (sqrt, div) of the per-tensor loop,
    which ZeRO's single flat partition otherwise makes as large as the partition."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=True)


def configure_deepspeed(accelerator: Accelerator, cfg: TrainFMConfig) -> None:
    """Write the training config's batch size, accumulation and clipping into the
    DeepSpeed config (no-op without DeepSpeed), and fill ZeRO-3's unset or 'auto' bucket sizes
    from the model width (accelerate would look for a Hugging Face `model.config.hidden_size`)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.grad_clip
    if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:   # ZeRO-1/2 keep DeepSpeed's buckets
        fill_zero3_buckets(ds["zero_optimization"], cfg.model.dim)


def fill_zero3_buckets(zero: dict, dim: int) -> None:
    """ZeRO's bucket sizes, where the DeepSpeed config leaves them 'auto' or unset, from the
    model width (what accelerate derives from a Hugging Face hidden_size): reduce dim^2,
    prefetch 0.9 dim^2, persistence 10 dim; and the gathered parameters ZeRO-3 keeps
    (max live, max reuse distance) 12 dim^2, about one transformer block.

    Unset matters: an accelerate YAML without a DeepSpeed JSON names none of them, and
    DeepSpeed's own defaults (reduce bucket 5e8 elements, 1e9 live parameters) make every
    rank hold the whole model's gradients in one flat bucket before reducing them, and
    every gathered layer from the forward to the backward pass, which no number of ranks
    shrinks (bench/fm_memory.py, 140M parameters, 2 ranks / 1: peak RSS 0.81 with
    DeepSpeed's defaults, 0.73 with these buckets, 0.71 with the live cap too)."""
    for key, value in (("reduce_bucket_size", dim * dim), ("stage3_prefetch_bucket_size", int(0.9 * dim * dim)),
                       ("stage3_param_persistence_threshold", 10 * dim),
                       ("stage3_max_live_parameters", 12 * dim * dim), ("stage3_max_reuse_distance", 12 * dim * dim)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value


def check_accumulation(accelerator: Accelerator, model, cfg: TrainFMConfig) -> None:
    """accelerate, DeepSpeed and the config must agree on the micro-steps per optimizer step."""
    seen = {"config grad_accum": cfg.grad_accum, "accelerate": accelerator.gradient_accumulation_steps}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        seen["DeepSpeed"] = model.gradient_accumulation_steps()
    if len(set(seen.values())) != 1:
        raise RuntimeError(f"omnisky.train.fm: gradient accumulation steps disagree: {seen}")


@torch.no_grad()
def evaluate(model, batches, accelerator, autocast) -> float:
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    for batch in batches:
        with autocast():
            loss, _ = model({k: v.to(accelerator.device) for k, v in batch.items()})
        total += loss.float()
    model.train()
    return accelerator.reduce(total / max(len(batches), 1), reduction="mean").item()


def all_max(value: float, device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config YAML (launch/fm/tiny.yaml)")
    p.add_argument("--data", required=True, help="token-shard directory (with manifest.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set steps=100 --set model.dim=256")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="checkpoint and exit after N steps of this invocation (resume later with --resume)")
    p.add_argument("--eval-data", default=None, help="token shards for the eval loss (default: --data)")
    return p.parse_args(argv)


def warn_if_data_changed(extra: dict, cfg: TrainFMConfig, world: int) -> None:
    old = extra.get("config", {})
    now = to_dict(cfg)
    changed = [k for k in DATA_KEYS if k in old and old[k] != now[k]]
    if extra.get("processes", world) != world:
        changed.append(f"processes ({extra['processes']} -> {world})")
    if changed:
        warnings.warn(f"omnisky.train.fm: resuming with other {changed} than the checkpoint's: "
                      f"the data order differs from the uninterrupted run's")


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(TrainFMConfig, args.config, parse_overrides(args.set))
    out = Path(args.out)
    # Plain DDP on CPUs needs cpu=True (ACCELERATE_USE_CPU, which a config file cannot set),
    # or accelerate sets up a gloo group but treats the run as undistributed; DeepSpeed
    # must not get it, or accelerate skips DeepSpeed.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if on_cpu():
        pin_mmap_threshold(cfg.host_mmap_threshold_mib * 2 ** 20)
    accelerator = make_accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                   cpu=not torch.cuda.is_available() and not deepspeed)
    use_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    configure_deepspeed(accelerator, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (out / "STOP").unlink(missing_ok=True)

    table = ModalityTable.from_manifest(args.data)
    check_keys(cfg.masking, table)   # a masking key (or task) naming no modality fails here, not in a worker
    urls = shard_urls(args.data)
    set_seed(cfg.seed)  # same initial weights on every rank
    init_context = model_init_context(accelerator)   # ZeRO-3: built partitioned (train/partitioned.py)
    partitioned = not isinstance(init_context, contextlib.nullcontext)
    with init_context:
        model = FourM(cfg.model, table)
    flops = TrainingFlops(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_accumulation(accelerator, model, cfg)
    start_step, extra = load_latest_checkpoint(accelerator, out) if args.resume else (0, {})
    if args.resume and start_step == 0 and main_proc:
        print(f"--resume: no checkpoint under {out / 'checkpoints'}; starting from step 0")
    if args.resume and main_proc:
        warn_if_data_changed(extra, cfg, world)
    stage = zero_stage(accelerator)
    state_extra = {"config": to_dict(cfg), "modalities": table.to_dict(), "processes": world}

    slots = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)   # this rank's data slots
    dataset = StepBatches(urls, table, cfg.masking, batch_size=cfg.batch_size, slots=slots,
                          streams=max(1, cfg.num_workers), segment_steps=cfg.data_segment_steps,
                          seed=cfg.seed, start_step=start_step, shuffle=cfg.shuffle)
    batches = iter(step_loader(dataset, cfg.num_workers))
    eval_set = (fixed_batches(shard_urls(args.eval_data or args.data), table, cfg.masking,
                              cfg.batch_size, cfg.eval_batches) if cfg.eval_every else [])
    device_type = accelerator.device.type
    bf16 = cfg.bf16 and ((device_type == "cuda" and torch.cuda.is_bf16_supported())
                         or (device_type == "cpu" and cfg.cpu_bf16))
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    peak = peak_flops(accelerator.device, cfg.peak_tflops)

    log = CSVLog(out / "log.csv", start_step if args.resume else None) if main_proc else None
    tb = TensorBoardLog(out / "tensorboard") if main_proc and cfg.tensorboard else None
    if main_proc:
        n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in accelerator.unwrap_model(model).parameters())
        print(f"omnisky.train.fm: {n_params / 1e6:.2f}M parameters, {world} process(es), "
              f"{accelerator.distributed_type.value}{f' ZeRO-{stage}' if use_ds else ''}"
              f"{' (built partitioned)' if partitioned else ''}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}, grad_accum {cfg.grad_accum}, "
              f"global batch {cfg.batch_size * cfg.grad_accum * world}, steps {start_step} -> {cfg.steps}",
              flush=True)

    # window sums for logging: [loss, tokens, flops, stop, per-modality loss..., per-modality count...]
    M = len(table)
    window = torch.zeros(4 + 2 * M, device=accelerator.device, dtype=torch.float64)
    window_steps, window_seconds, t_start = 0, 0.0, time.time()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not main_proc, desc="fm", dynamic_ncols=True)
    model.train()
    step, stop = start_step, False
    while step < cfg.steps and not stop:
        t_step = time.time()
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        data_step, micro = next(batches)
        assert data_step == step, f"data stream at step {data_step}, training at step {step}"
        for batch in micro:
            window[2] += flops(batch)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with autocast():
                    loss, parts = model(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0 and not use_ds:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # DeepSpeed clips itself
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window[0] += loss.detach().float()
            window[1] += (~batch["enc_pad"]).sum() + (~batch["dec_pad"]).sum()
            for key, value in parts.items():
                m = table.index(key)
                window[4 + m] += value.detach().float()
                window[4 + M + m] += 1
        step += 1
        window_steps += 1
        window_seconds += time.time() - t_step   # training time only (not eval, not checkpoints)
        bar.update(1)

        last = step == cfg.steps
        do_eval = cfg.eval_every and (step % cfg.eval_every == 0 or last)
        if step % cfg.log_every == 0 or do_eval or last:
            window[3] = float(main_proc and (out / "STOP").exists())
            totals = accelerator.reduce(window, reduction="sum")
            stop = bool(totals[3].item())
            mem = all_max(peak_memory_gib(accelerator.device), accelerator.device)
            eval_loss = evaluate(model, eval_set, accelerator, autocast) if do_eval and eval_set else None
            if main_proc:
                micro_steps = window_steps * cfg.grad_accum * world
                row = {"step": step, "loss": f"{totals[0].item() / micro_steps:.7f}"}
                for m, key in enumerate(table.keys):
                    count = totals[4 + M + m].item()
                    row[f"loss.{key}"] = f"{totals[4 + m].item() / count:.7f}" if count else ""
                tflops = totals[2].item() / window_seconds / world
                row.update({"lr": f"{lr:.4e}", "tokens_per_s": f"{totals[1].item() / window_seconds:.1f}",
                            "steps_per_s": f"{window_steps / window_seconds:.3f}",
                            "tflops_per_s": f"{tflops / 1e12:.4g}",
                            "mfu": f"{tflops / peak:.4f}" if peak else "",
                            "peak_mem_gib": f"{mem:.3f}",
                            "eval_loss": "" if eval_loss is None else f"{eval_loss:.6f}",
                            "elapsed_s": f"{time.time() - t_start:.1f}"})
                log.write(row)
                if tb is not None:
                    tb.write(row)
                bar.set_postfix(loss=row["loss"], lr=row["lr"], tok_s=row["tokens_per_s"],
                                **({"mfu": row["mfu"]} if peak else {}))
            window.zero_()
            window_steps, window_seconds = 0, 0.0

        stop = stop or (args.stop_after > 0 and step - start_step >= args.stop_after)
        if step % cfg.ckpt_every == 0 or last or stop:
            save_checkpoint(accelerator, out, step, extra=state_extra, keep=cfg.keep_checkpoints)
    bar.close()
    if tb is not None:
        tb.close()

    if step < cfg.steps:   # stopped early: the checkpoint is the state; no export
        if main_proc:
            print(f"omnisky.train.fm: stopped at step {step} of {cfg.steps}; checkpoint "
                  f"{out / 'checkpoints' / f'step-{step}'}; continue with --resume", flush=True)
    else:                  # the consolidated model: FourM.from_pretrained(OUT/model)
        accelerator.wait_for_everyone()
        state = consolidated_state_dict(accelerator, model)
        if main_proc:
            accelerator.unwrap_model(model).save(out / "model", state_dict=state)
        accelerator.wait_for_everyone()
        diff = check_export(accelerator, model, out / "model")
        if main_proc:
            (out / "export_check.json").write_text(json.dumps({"step": step, "max_abs_logit_diff": diff}))
            (out / "STOP").unlink(missing_ok=True)   # finished: nothing for a scheduler to requeue
            print(f"omnisky.train.fm: saved {out / 'model'} at step {step} ({time.time() - t_start:.1f} s); "
                  f"max |logits(live) - logits(saved)| = {diff:.3g}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish(accelerator)  # barrier + destroy_process_group: two-process gloo runs abort at exit otherwise


if __name__ == "__main__":
    main()
