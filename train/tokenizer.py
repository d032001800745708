"""Train a tokenizer on raw shards: `accelerate launch -m omnisky.train.tokenizer`.

    accelerate launch -m omnisky.train.tokenizer --config launch/tokenizers/image-tiny.yaml \\
        --data demo_out/raw --out demo_out/tokenizers/image [--set steps=50 lr=3e-4] [--resume]
    python -m omnisky.train.tokenizer ...          # one process, same thing
    accelerate launch --config_file launch/accelerate/ddp-cpu.yaml -m omnisky.train.tokenizer ...  # 2 CPU procs

kind image|spectrum: gradient training of `tok.training_loss(records)` with AdamW,
warmup + cosine LR and gradient clipping, on an endless resampled stream (steps are
counted, not epochs); every rank and data worker draws its own seeded stream. OUT gets
log.csv (step, loss, metrics, lr, samples/s; eval rows add eval_* and eval_chi2, the median
reduced chi-square of the held objects' round trips), figures/recon-step-N.png (for
`eval_n` held objects per modality, which the training stream skips: images as input /
decoded / residual rows with a column per band, spectra overplotted with the residual in
sigma below), checkpoints/step-N (accelerate state + trainer_state.json; `--resume`
continues from the newest, at its step: the LR schedule resumes there and the data
stream is reseeded with the step), and finally the tokenizer itself: OUT/config.json +
OUT/model.safetensors. A tqdm bar runs on the main process only.

kind scalar: no gradient; the main process fits the quantile bins on one finite pass over
the shards and saves them (plus fit_report.json and figures/bins.png).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..config import ConfigError, from_dict, load_config, parse_overrides, to_dict
from ..shards.reader import stream
from ..shards.schema import Image, RecordError, Spectrum, modality_kind
from ..shards.writer import shard_urls
from .loop import (CSVLog, cosine_lr, finish, load_latest_checkpoint, make_accelerator,
                   save_checkpoint, set_lr)

TOKENIZER_CLASSES = {"image": "ImageTokenizer", "spectrum": "SpectrumTokenizer",
                     "scalar": "ScalarTokenizer"}


@dataclass
class TokenizerTrainConfig:
    kind: str = "image"                     # image | spectrum | scalar
    modalities: tuple[str, ...] = ()        # e.g. (image.des, image.hsc)
    model: dict = field(default_factory=dict)  # the tokenizer's own Config, validated by it
    steps: int = 1000
    batch_size: int = 16                    # records per step per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0                  # max global grad norm; 0 = off
    eval_every: int = 200
    ckpt_every: int = 500
    num_workers: int = 1                    # DataLoader workers per process
    seed: int = 0
    eval_n: int = 4                         # held objects per modality for eval and figures
    shuffle: int = 256                      # sample shuffle buffer of the training stream


def tokenizer_class(kind: str):
    if kind not in TOKENIZER_CLASSES:
        raise ConfigError(f"kind must be one of {sorted(TOKENIZER_CLASSES)}, got {kind!r}")
    module = importlib.import_module(f"..tokenizers.{kind}", __package__)
    return getattr(module, TOKENIZER_CLASSES[kind])


def build_tokenizer(cfg: TokenizerTrainConfig):
    """The tokenizer named by cfg.kind, its Config validated from cfg.model."""
    for key in cfg.modalities:
        if modality_kind(key) != cfg.kind:
            raise ConfigError(f"modality {key!r} is not of kind {cfg.kind!r}")
    model = dict(cfg.model)
    if cfg.kind == "scalar":  # the names it serves come from the modalities, or must match them
        names = [k.split(".", 1)[1] for k in cfg.modalities]
        if "names" not in model:
            model["names"] = names
        elif names and sorted(model["names"]) != sorted(names):
            raise ConfigError(f"model.names {model['names']} differ from modalities {list(cfg.modalities)}")
    cls = tokenizer_class(cfg.kind)
    return cls(from_dict(cls.Config, model, where=f"{cls.__name__}.Config (config key 'model')"))


class RecordStream(IterableDataset):
    """Endless stream of records of `modalities`, its seed distinct per rank, worker and resume."""

    def __init__(self, urls, modalities, seed: int, rank: int, start_step: int, shuffle: int,
                 skip_ids=frozenset()):
        self.urls, self.modalities, self.shuffle = urls, tuple(modalities), shuffle
        self.seed, self.rank, self.start_step, self.skip_ids = seed, rank, start_step, skip_ids

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed = int(np.random.SeedSequence([self.seed, self.rank, worker, self.start_step])
                   .generate_state(1)[0])
        for sample in stream(self.urls, decode="raw", shuffle=self.shuffle, seed=seed, resampled=True):
            if sample.object_id in self.skip_ids:
                continue
            for key in self.modalities:
                rec = sample.records.get(key)
                if rec is None:
                    continue
                try:
                    yield rec.validate()
                except RecordError as e:
                    warnings.warn(f"omnisky.train.tokenizer: skipping {e}")


def held_records(urls, modalities, n: int) -> dict[str, list]:
    """The first `n` records of each modality, in shard order: fixed eval objects."""
    held = {k: [] for k in modalities}
    for sample in stream(urls, decode="raw", shuffle=0, split=False):
        for key in modalities:
            if key in sample.records and len(held[key]) < n:
                held[key].append(sample.records[key])
        if all(len(v) >= n for v in held.values()):
            break
    return held


class LossModule(nn.Module):
    """DDP needs a forward(): this one is the tokenizer's training loss."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, records):
        return self.tok.training_loss(records)


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()}


def _stretch(x: np.ndarray, scale: float) -> np.ndarray:
    return np.arcsinh(x / scale)


def _sigma(ivar: np.ndarray) -> float:
    """Median per-pixel sigma of the pixels with data (1 where none)."""
    return float(np.median(ivar[ivar > 0] ** -0.5)) if (ivar > 0).any() else 1.0


def plot_reconstructions(held: dict[str, list], decoded: dict[str, list], path: Path, title: str) -> None:
    """Every held record, input vs decoded. An image takes three rows (input, decoded,
    (input - decoded) / sigma) with one column per band; a spectrum takes two rows spanning
    the width (input and decoded overplotted; the residual in units of sigma)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = [(k, a, b) for k in held for a, b in zip(held[k], decoded[k])]
    if not pairs:
        return
    n_cols = max([len(a.bands) for _, a, _ in pairs if isinstance(a, Image)] + [1])
    heights = [h for _, a, _ in pairs for h in ((1, 1, 1) if isinstance(a, Image) else (1.6, 0.8))]
    fig = plt.figure(figsize=(max(9, 1.9 * n_cols), 1.9 * sum(heights) + 0.6))
    gs = fig.add_gridspec(len(heights), n_cols, height_ratios=heights)
    row = 0
    for key, rec, rec_hat in pairs:
        if isinstance(rec, Image):
            for c, band in enumerate(rec.bands):
                x, x_hat = rec.flux[c], rec_hat.flux[c]                             # (H, W)
                sigma = _sigma(rec.ivar[c])
                lo, hi = np.percentile(_stretch(x, sigma), [1, 99.5])
                resid = np.where(rec.mask[c], 0.0, (x - x_hat) / sigma)
                for r, (img, name) in enumerate(((x, "input"), (x_hat, "decoded"))):
                    a = fig.add_subplot(gs[row + r, c])
                    a.imshow(_stretch(img, sigma), vmin=lo, vmax=hi, origin="lower", cmap="gray")
                    a.set_title(f"{key} {rec.object_id} {band} {name}", fontsize=6)
                a = fig.add_subplot(gs[row + 2, c])
                a.imshow(resid, vmin=-5, vmax=5, origin="lower", cmap="RdBu_r")
                a.set_title(f"{band} (input - decoded) / sigma, rms {np.sqrt(np.mean(resid ** 2)):.2f}", fontsize=6)
            row += 3
        elif isinstance(rec, Spectrum):
            ok = ~rec.mask & (rec.ivar > 0) & ~rec_hat.mask
            a = fig.add_subplot(gs[row, :])
            a.plot(rec.wavelength, np.where(ok, rec.flux, np.nan), color="0.6", lw=0.5, label="input")
            a.plot(rec_hat.wavelength, np.where(rec_hat.mask, np.nan, rec_hat.flux), color="C3", lw=0.8,
                   label="decoded")
            a.set_title(f"{key} {rec.object_id}", fontsize=7)
            a.set_ylabel("flux [1e-17 erg/s/cm2/A]", fontsize=6)
            a.legend(fontsize=6, loc="upper right")
            resid = np.where(ok, (rec.flux - rec_hat.flux) * np.sqrt(rec.ivar), np.nan)
            b = fig.add_subplot(gs[row + 1, :], sharex=a)
            b.plot(rec.wavelength, resid, color="k", lw=0.4)
            b.axhline(0, color="C3", lw=0.6)
            b.set_ylim(-5, 5)
            b.set_ylabel("resid / sigma", fontsize=6)
            b.set_xlabel("wavelength [A]", fontsize=6)
            b.set_title(f"reduced chi2 {np.nanmean(resid ** 2):.3f}", fontsize=6)
            row += 2
    for a in fig.axes:
        a.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))   # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def evaluate(tok, held: dict[str, list], out: Path, step: int) -> dict[str, float]:
    """Held-object loss/metrics and a reconstruction figure; the tokenizer is left in train mode."""
    tok.eval()
    records = [r for rs in held.values() for r in rs]
    loss, metrics = tok.training_loss(records)
    decoded = {k: tok.decode(tok.encode(rs), like=rs) if rs else [] for k, rs in held.items()}
    chi2 = [float(np.mean(((r.flux - d.flux) ** 2 * r.ivar)[ok])) for rs, ds in zip(held.values(), decoded.values())
            for r, d in zip(rs, ds) if (ok := ~r.mask & (r.ivar > 0) & ~d.mask).any()]
    plot_reconstructions(held, decoded, out / "figures" / f"recon-step-{step}.png",
                         f"{type(tok).__name__} step {step}: eval loss {float(loss):.4g}, "
                         f"median reduced chi2 {np.median(chi2):.3f}")
    tok.train()
    return {"eval_loss": float(loss), "eval_chi2": float(np.median(chi2)),
            **{f"eval_{k}": v for k, v in _floats(metrics).items()}}


def fit_scalar(cfg: TokenizerTrainConfig, urls: list[str], out: Path) -> None:
    """One finite pass over the shards -> quantile bins -> OUT (main process only)."""
    tok = build_tokenizer(cfg)
    keys = [f"scalar.{n}" for n in tok.names]
    t0 = time.time()
    report = tok.fit(s.records for s in stream(urls, decode="raw", shuffle=0, split=False))   # one mapping per object
    tok.save(out)
    (out / "fit_report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for a, name in zip(axes[0], tok.names):  # bin widths: quantile bins are narrow where data are dense
        edges = tok.bin_edges(name)
        a.step(np.arange(len(edges) - 1), np.diff(edges), where="mid")
        a.set_yscale("log")
        a.set_title(f"{name}: bin width vs id", fontsize=8)
        a.tick_params(labelsize=6)
    fig.tight_layout()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "figures" / "bins.png", dpi=80)
    plt.close(fig)
    print(f"omnisky.train.tokenizer: fitted {len(keys)} scalar(s) in {time.time() - t0:.1f}s: {report}")


def train(cfg: TokenizerTrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> None:
    data, out = Path(data), Path(out)
    urls = shard_urls(data)
    accelerator = make_accelerator()
    main_proc = accelerator.is_main_process
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
    if cfg.kind == "scalar":
        if main_proc:
            fit_scalar(cfg, urls, out)
        finish(accelerator)
        return
    if not cfg.modalities:
        raise ConfigError(f"kind {cfg.kind!r}: list the modalities to train on (e.g. [image.des])")

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    tok = build_tokenizer(cfg)
    model = LossModule(tok)
    optimizer = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if resume:
        start, extra = load_latest_checkpoint(accelerator, out)
        tok.load_extra_state(extra.get("tokenizer", {}))
        accelerator.print(f"omnisky.train.tokenizer: resumed at step {start}")

    held = held_records(urls, cfg.modalities, cfg.eval_n)
    skip = frozenset(r.object_id for rs in held.values() for r in rs)
    loader = DataLoader(RecordStream(urls, cfg.modalities, cfg.seed, accelerator.process_index,
                                     start, cfg.shuffle, skip),
                        batch_size=cfg.batch_size, collate_fn=list, num_workers=cfg.num_workers)
    log = CSVLog(out / "log.csv", resume_step=start if resume else None) if main_proc else None
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start, disable=not main_proc, desc=f"{cfg.kind} tokenizer")
    model.train()
    t_last = time.time()
    for step in range(start, cfg.steps):
        records = next(batches)
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        set_lr(optimizer, lr)
        loss, metrics = model(records)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: non-finite loss {float(loss)}; "
                                     f"objects {[r.object_id for r in records]}")
        accelerator.backward(loss)
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.tensor(math.nan))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        mean_loss = accelerator.reduce(loss.detach(), "mean")
        now = time.time()
        row = dict(step=done, loss=float(mean_loss), lr=lr, grad_norm=float(grad_norm),
                   samples_per_s=cfg.batch_size * accelerator.num_processes / max(now - t_last, 1e-9),
                   **_floats(metrics))
        if main_proc and (done % cfg.eval_every == 0 or done == cfg.steps):
            row.update(evaluate(tok, held, out, done))
        if main_proc:
            log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(accelerator, out, done, extra={"tokenizer": tok.extra_state()})
        t_last = time.time()
    bar.close()
    del batches
    if main_proc:
        tok.save(out)
        print(f"omnisky.train.tokenizer: saved {type(tok).__name__} to {out}")
    finish(accelerator)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="omnisky.train.tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML TokenizerTrainConfig, e.g. launch/tokenizers/image-tiny.yaml")
    p.add_argument("--data", required=True, help="directory of raw shards (with manifest.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", nargs="*", default=[], action="extend", metavar="KEY=VALUE",
                   help="config overrides, e.g. steps=20 model.n_bins=64")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoints/step-N")
    a = p.parse_args(argv)
    cfg = load_config(TokenizerTrainConfig, a.config, parse_overrides(a.set))
    train(cfg, a.data, a.out, resume=a.resume)


if __name__ == "__main__":
    main()
