"""Generation schedules as plain data.

A schedule is a list of `TargetSchedule`, one per target modality, walked in order:
each finished target joins the conditioning of the next (chained generation).

    schedule = [TargetSchedule("image.hsc", scheme="maskgit", steps=8, temperature=1.0)]
    json.dumps(schedule_to_json(schedule))    # saved beside every output

scheme:               'maskgit' (keep the most confident tokens each step) or 'roar'
                      (random order, autoregressive in chunks).
token_schedule:       how many tokens stay masked after step t of T: 'cosine' or 'linear'.
temperature_schedule: 'constant', 'linear' (decays from `temperature` to `temperature_end`)
                      or 'annealed' (cosine decay to `temperature_end`).
top_k / top_p:        0 / 1.0 switch them off.
guidance:             classifier-free guidance scale; 0 = off, logits =
                      cond + guidance * (cond - uncond).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from ..config import from_dict


@dataclass
class TargetSchedule:
    target: str
    scheme: str = "maskgit"
    steps: int = 8
    token_schedule: str = "cosine"
    temperature: float = 1.0
    temperature_end: float = 0.1
    temperature_schedule: str = "constant"
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 0.0

    def __post_init__(self):
        if self.scheme not in ("maskgit", "roar"):
            raise ValueError(f"schedule for {self.target}: scheme must be 'maskgit' or 'roar', got {self.scheme!r}")
        if self.token_schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule for {self.target}: token_schedule must be 'cosine' or 'linear'")
        if self.temperature_schedule not in ("constant", "linear", "annealed"):
            raise ValueError(f"schedule for {self.target}: temperature_schedule must be constant|linear|annealed")
        if self.steps < 1:
            raise ValueError(f"schedule for {self.target}: steps must be >= 1")

    def n_masked_after(self, step: int, n: int) -> int:
        """Tokens still masked after step `step` (1-based) of `steps`, out of n."""
        r = step / self.steps
        frac = math.cos(math.pi / 2 * r) if self.token_schedule == "cosine" else 1.0 - r
        return 0 if step >= self.steps else min(n - 1, max(0, int(math.floor(n * frac))))

    def temperature_at(self, step: int) -> float:
        """Temperature used at step `step` (1-based)."""
        r = (step - 1) / max(1, self.steps - 1)
        if self.temperature_schedule == "constant":
            return self.temperature
        if self.temperature_schedule == "linear":
            return self.temperature + (self.temperature_end - self.temperature) * r
        return self.temperature_end + (self.temperature - self.temperature_end) * 0.5 * (1 + math.cos(math.pi * r))


def schedule_to_json(schedule: Iterable[TargetSchedule]) -> list[dict]:
    return [asdict(s) for s in schedule]


def schedule_from_json(items: Iterable[dict]) -> list[TargetSchedule]:
    return [from_dict(TargetSchedule, d) for d in items]
