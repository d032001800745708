"""Training-loop helpers shared by the entry points: accelerator, LR schedule, CSV log, checkpoints.

    accelerator = make_accelerator()
    lr = cosine_lr(step, base_lr=1e-3, warmup_steps=100, total_steps=10_000)
    log = CSVLog(out / "log.csv", resume_step=start_step)      # main process only; TensorBoardLog(out / "tb") likewise
    save_checkpoint(accelerator, out, step, extra={...})       # out/checkpoints/step-N
    start_step, extra = load_latest_checkpoint(accelerator, out)

The learning rate is a pure function of the step and is set on the optimizer's param
groups each step; there is no scheduler object to checkpoint (and none that accelerate
would step once per process). The step counter and any JSON-able trainer state live in
`checkpoints/step-N/trainer_state.json` beside accelerate's own state.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch


def on_cpu() -> bool:
    """True when training runs on CPU (no CUDA, or accelerate told to use the CPU)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def make_accelerator(find_unused_parameters: bool = True, **kwargs):
    """An `accelerate.Accelerator` with a gloo process group on CPU (nccl on GPUs).

    find_unused_parameters: DDP tolerates parameters a step does not touch (a batch
    that holds no HSC image leaves the HSC band embedding unused).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend given to a single process breaks accelerate
        handlers.append(InitProcessGroupKwargs(backend="gloo" if on_cpu() else "nccl"))
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def finish(accelerator) -> None:
    """End a run cleanly: wait for every rank, then tear the process group down.

    Two-process gloo runs abort at interpreter exit unless the group is destroyed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # end_training may have torn it down
        accelerator.wait_for_everyone()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
              min_ratio: float = 0.1) -> float:
    """Linear warmup from ~0 to `base_lr` over `warmup_steps`, then cosine to `min_ratio * base_lr`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class CSVLog:
    """Append rows to a CSV file; the columns are fixed by the first row written.

    On resume, rows with step > `resume_step` (written after the checkpoint the run
    resumes from) are dropped, so the log has one row per step.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.exists() and resume_step is not None:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or []) or None
                rows = [r for r in reader if int(r["step"]) <= resume_step]
            if self.fields:
                self._rewrite(rows)
        elif self.path.exists():
            self.path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        if self.fields is None:
            self.fields = list(row)
            self._rewrite([])
        unknown = [k for k in row if k not in self.fields]
        if unknown:  # a column first seen now (e.g. eval_loss): widen the file
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.fields += unknown
            self._rewrite(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)


def read_csv_log(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints under out/checkpoints, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, out: str | Path, step: int, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """accelerator.save_state(out/checkpoints/step-N) plus trainer_state.json (written last,
    so a checkpoint without it is incomplete and ignored). Keeps the newest `keep`."""
    path = Path(out) / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every rank's files are written before it is marked done
    if accelerator.is_main_process:
        state = dict(step=step, extra=extra or {})
        (path / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_latest_checkpoint(accelerator, out: str | Path) -> tuple[int, dict]:
    """Restore the newest complete checkpoint; returns (step, extra). (0, {}) if none."""
    dirs = checkpoint_dirs(out)
    if not dirs:
        return 0, {}
    path = dirs[-1]
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    return int(state["step"]), state.get("extra", {})


class TensorBoardLog:
    """The numeric fields of CSVLog rows as TensorBoard scalars under `directory`, when
    the `tensorboard` package is installed (otherwise a warning, then nothing)."""

    def __init__(self, directory: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            import warnings
            warnings.warn("tensorboard: true but the tensorboard package is not installed "
                          "(pip install tensorboard); logging to CSV only")
            self.writer = None
        else:
            self.writer = SummaryWriter(str(directory))

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue                    # blank cells
            if key != "step":
                self.writer.add_scalar(key.replace(".", "/", 1), number, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
