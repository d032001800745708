"""Train the masked multimodal transformer on token shards, with DeepSpeed ZeRO via accelerate.

    accelerate launch --config_file launch/accelerate/zero2.yaml -m omnisky.train.fm \\
        --config launch/fm/tiny.yaml --data TOKEN_SHARDS_DIR --out OUT [--set key=value] [--resume]

OUT/log.csv          step, loss, loss.<modality>..., lr, tokens_per_s, steps_per_s, eval_loss, elapsed_s
                     (tokens: non-padding input + target tokens of all ranks, per second of training)
OUT/config.yaml      the resolved training config
OUT/checkpoints/step-N/   accelerator.save_state (DeepSpeed shards) + trainer_state.json
OUT/model/           the consolidated model: FourM.from_pretrained(OUT/model)

Every rank streams its own resampled shards and masks them in its DataLoader workers
(fm/data.py); the stream is not passed through `accelerator.prepare`, so nothing is
sliced or dispatched across ranks. The training config is the one source of the batch
size, gradient accumulation and clipping: they are written into the DeepSpeed config
before `prepare`. The learning rate (warmup + cosine) is set on the optimizer's param
groups every step, nanoGPT style, so a resumed run needs only the step number.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm

from ..config import load_config, parse_overrides, to_dict
from ..fm.data import MaskedTokenStream, fixed_batches, make_loader
from ..fm.masking import MaskingConfig
from ..fm.model import FMConfig, FourM
from ..fm.modality import ModalityTable
from ..shards.writer import shard_urls
from .loop import CSVLog, cosine_lr, finish, load_latest_checkpoint, make_accelerator, save_checkpoint, set_lr


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
    ckpt_every: int = 500        # and always at the last step
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0          # 0 = never; loss on fixed batches (--eval-data, else the train shards)
    eval_batches: int = 4
    num_workers: int = 1         # DataLoader workers per rank (masking runs there)
    shuffle: int = 1000          # sample shuffle buffer per worker
    seed: int = 0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def configure_deepspeed(accelerator: Accelerator, cfg: TrainFMConfig) -> None:
    """Write the training config's batch size, accumulation and clipping into the
    DeepSpeed config (no-op without DeepSpeed), and fill ZeRO-3's 'auto' bucket sizes
    from the model width (accelerate would look for a Hugging Face `model.config.hidden_size`)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.grad_clip
    dim = cfg.model.dim
    zero = ds.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", dim * dim), ("stage3_prefetch_bucket_size", int(0.9 * dim * dim)),
                       ("stage3_param_persistence_threshold", 10 * dim)):
        if zero.get(key) == "auto":
            zero[key] = value


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def consolidated_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """Full CPU state dict on every rank; under ZeRO-3 the partitions are gathered first."""
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config YAML (launch/fm/tiny.yaml)")
    p.add_argument("--data", required=True, help="token-shard directory (with manifest.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set steps=100 --set model.dim=256")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--eval-data", default=None, help="token shards for the eval loss (default: --data)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(TrainFMConfig, args.config, parse_overrides(args.set))
    out = Path(args.out)
    # Plain DDP on CPUs needs cpu=True (ACCELERATE_USE_CPU, which a config file cannot set),
    # or accelerate sets up a gloo group but treats the run as undistributed; DeepSpeed
    # must not get it, or accelerate skips DeepSpeed.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = make_accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                   cpu=not torch.cuda.is_available() and not deepspeed)
    use_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    configure_deepspeed(accelerator, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    table = ModalityTable.from_manifest(args.data)
    urls = shard_urls(args.data)
    set_seed(cfg.seed)  # same initial weights on every rank
    model = FourM(cfg.model, table)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  fused=torch.cuda.is_available() or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = load_latest_checkpoint(accelerator, out)[0] if args.resume else 0
    if main_proc and args.resume and start_step == 0:
        print(f"--resume: no checkpoint under {out / 'checkpoints'}; starting from step 0")
    stage = zero_stage(accelerator)

    dataset = MaskedTokenStream(urls, table, cfg.masking, seed=cfg.seed, rank=rank, epoch=start_step,
                                shuffle=cfg.shuffle)
    batches = iter(make_loader(dataset, cfg.batch_size, cfg.num_workers))
    eval_set = (fixed_batches(shard_urls(args.eval_data or args.data), table, cfg.masking,
                              cfg.batch_size, cfg.eval_batches) if cfg.eval_every else [])
    bf16 = cfg.bf16 and accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    log = CSVLog(out / "log.csv", start_step if args.resume else None) if main_proc else None
    if main_proc:
        n_params = accelerator.unwrap_model(model).num_params() if stage < 3 else sum(
            p.ds_numel for p in accelerator.unwrap_model(model).parameters())
        print(f"omnisky.train.fm: {n_params / 1e6:.2f}M parameters, {world} process(es), "
              f"{accelerator.distributed_type.value}{f' ZeRO-{stage}' if use_ds else ''}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}, steps {start_step} -> {cfg.steps}", flush=True)

    # window sums for logging: [loss, tokens, per-modality loss..., per-modality count...]
    M = len(table)
    window = torch.zeros(2 + 2 * M, device=accelerator.device)
    window_steps, window_seconds, t_start = 0, 0.0, time.time()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not main_proc, desc="fm", dynamic_ncols=True)
    model.train()
    step = start_step
    while step < cfg.steps:
        t_step = time.time()
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
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
                window[2 + m] += value.detach().float()
                window[2 + M + m] += 1
        step += 1
        window_steps += 1
        window_seconds += time.time() - t_step   # training time only (not eval, not checkpoints)
        bar.update(1)

        last = step == cfg.steps
        do_eval = cfg.eval_every and (step % cfg.eval_every == 0 or last)
        if step % cfg.log_every == 0 or do_eval or last:
            totals = accelerator.reduce(window, reduction="sum")
            eval_loss = evaluate(model, eval_set, accelerator, autocast) if do_eval and eval_set else None
            if main_proc:
                micro = window_steps * cfg.grad_accum * world
                row = {"step": step, "loss": f"{totals[0].item() / micro:.5f}"}
                for m, key in enumerate(table.keys):
                    count = totals[2 + M + m].item()
                    row[f"loss.{key}"] = f"{totals[2 + m].item() / count:.5f}" if count else ""
                row.update({"lr": f"{lr:.3e}", "tokens_per_s": f"{totals[1].item() / window_seconds:.1f}",
                            "steps_per_s": f"{window_steps / window_seconds:.3f}",
                            "eval_loss": "" if eval_loss is None else f"{eval_loss:.5f}",
                            "elapsed_s": f"{time.time() - t_start:.1f}"})
                log.write(row)
                bar.set_postfix(loss=row["loss"], lr=row["lr"], tok_s=row["tokens_per_s"])
            window.zero_()
            window_steps, window_seconds = 0, 0.0

        if step % cfg.ckpt_every == 0 or last:
            save_checkpoint(accelerator, out, step, extra={"config": to_dict(cfg)}, keep=cfg.keep_checkpoints)
    bar.close()

    # the consolidated model: FourM.from_pretrained(OUT/model)
    accelerator.wait_for_everyone()
    state = consolidated_state_dict(accelerator, model)
    if main_proc:
        accelerator.unwrap_model(model).save(out / "model", state_dict=state)
        print(f"omnisky.train.fm: saved {out / 'model'} at step {step} "
              f"({time.time() - t_start:.1f} s)", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish(accelerator)  # barrier + destroy_process_group: two-process gloo runs abort at exit otherwise


if __name__ == "__main__":
    main()
