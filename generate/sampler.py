"""The sampler: walks a schedule, filling each target modality's tokens step by step.

    tokens = generate(model, inputs, schedule, seed=0)

inputs: {modality_key: LongTensor (B, n_key)}, -1 marks a token not given (a modality
        may be partly known); modalities absent from the dict are not given.
model:  anything with `logits(inputs, targets) -> {key: (B, m, vocab)}`, where
        targets = {key: LongTensor (B, m) positions} (`omnisky.fm.model.FourM`).
Returns the inputs with every scheduled target filled in (B, n_target).

MaskGIT: each step samples every masked token, then keeps the most confident ones
(log-probability plus Gumbel noise scaled by the temperature) and re-masks the rest;
the number left masked follows the cosine or linear token schedule. ROAR: the same
loop with a random order instead of confidence. Classifier-free guidance runs the model
a second time with only the target's own known tokens as input.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .schedule import TargetSchedule


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k and nucleus filtering on the last axis; removed entries get -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def _gumbel(shape, gen: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=device).clamp_(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def guided_logits(model, inputs: dict, target: str, positions: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """(B, m, V) logits for `positions` of `target`, with classifier-free guidance."""
    cond = model.logits(inputs, {target: positions})[target].float()
    if guidance == 0:
        return cond
    uncond = model.logits({target: inputs[target]}, {target: positions})[target].float()
    return cond + guidance * (cond - uncond)


def _n_unknown(cur: torch.Tensor, target: str) -> int:
    """The number of unknown (-1) tokens per row of cur (B, n), the same in every row."""
    n = int((cur[0] == -1).sum())
    if not torch.all((cur == -1).sum(1) == n):
        raise ValueError(f"{target}: every row must have the same number of unknown tokens")
    return n


@torch.no_grad()
def unknown_logits(model, inputs: dict, target: str, guidance: float = 0.0,
                   allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, m) of the tokens inputs[target] does not know (-1) and their logits
    (B, m, V), guided, with the ids `allowed` (n_tokens, V) forbids at -inf."""
    cur = inputs[target]
    m = _n_unknown(cur, target)
    positions = (cur == -1).nonzero()[:, 1].view(cur.shape[0], m)      # (B, m)
    logits = guided_logits(model, inputs, target, positions, guidance)  # (B, m, V)
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device)[positions], float("-inf"))
    return positions, logits


@torch.no_grad()
def fill_target(model, inputs: dict, step: TargetSchedule, n_tokens: int,
                gen: torch.Generator, on_step: Callable | None = None,
                allowed: torch.Tensor | None = None, stop_after: int | None = None) -> torch.Tensor:
    """Sample every unknown token of `step.target`; returns LongTensor (B, n_tokens).
    allowed: optional BoolTensor (n_tokens, V), the ids each position may take (e.g. a
    tokenizer whose first token is a flux scale with fewer bins than the vocabulary).
    stop_after: walk only the first `stop_after` of the schedule's steps; the tokens not yet
    revealed stay -1 (what `target_distribution` completes)."""
    batch = next(iter(inputs.values())).shape[0] if inputs else None
    device = next(model.parameters()).device
    cur = inputs.get(step.target)
    if cur is None:
        cur = torch.full((batch, n_tokens), -1, dtype=torch.long, device=device)
    cur = cur.clone()
    n_unknown = _n_unknown(cur, step.target)
    for t in range(1, step.steps + 1 if stop_after is None else min(stop_after, step.steps) + 1):
        if int((cur[0] == -1).sum()) == 0:
            break
        positions, logits = unknown_logits(model, {**inputs, step.target: cur}, step.target, step.guidance, allowed)
        m = positions.shape[1]
        temp = max(step.temperature_at(t), 1e-6)
        logits = filter_logits(logits / temp, step.top_k, step.top_p)  # (B, m, V)
        logp = logits.log_softmax(-1)
        sampled = (logp + _gumbel(logp.shape, gen, device)).argmax(-1)  # (B, m)
        keep_masked = min(step.n_masked_after(t, n_unknown), m - 1) if t < step.steps else 0
        n_reveal = m - keep_masked
        if step.scheme == "maskgit":
            score = logp.gather(-1, sampled[..., None])[..., 0] + temp * _gumbel(sampled.shape, gen, device)
        else:  # roar: random order
            score = torch.rand(sampled.shape, generator=gen, device=device)
        reveal = score.topk(n_reveal, dim=-1).indices                   # (B, n_reveal)
        cur.scatter_(1, positions.gather(1, reveal), sampled.gather(1, reveal))
        if on_step is not None:
            on_step(step.target, t, cur)
    return cur


@torch.no_grad()
def generate(model, inputs: dict, schedule: Sequence[TargetSchedule], n_tokens: dict[str, int],
             seed: int = 0, allowed: dict[str, torch.Tensor] | None = None) -> dict:
    """Walk `schedule`; each finished target joins the conditioning. Same seed, same tokens.
    allowed: {target: BoolTensor (n_tokens, V)} ids each position may take (default: all)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {k: v.to(device) for k, v in inputs.items()}
    if not out:
        raise ValueError("generate: give at least one input modality (or a partially known target)")
    for step in schedule:
        if step.target not in n_tokens:
            raise KeyError(f"target {step.target!r} is not a modality of this model; known: {sorted(n_tokens)}")
        out[step.target] = fill_target(model, out, step, n_tokens[step.target], gen,
                                       allowed=(allowed or {}).get(step.target))
    return out


@torch.no_grad()
def token_probabilities(model, inputs: dict, target: str, n_tokens: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, n_tokens, V) probabilities of every token of `target` given `inputs` at once
    (for one-token scalars this is the full posterior over the bins), softmax(logits / T)."""
    if not temperature > 0:
        raise ValueError(f"token_probabilities: temperature must be > 0, got {temperature}")
    batch = next(iter(inputs.values())).shape[0]
    device = next(model.parameters()).device
    positions = torch.arange(n_tokens, device=device).expand(batch, n_tokens)
    given = {k: v.to(device) for k, v in inputs.items() if k != target}
    return (model.logits(given, {target: positions})[target].float() / temperature).softmax(-1)


@torch.no_grad()
def target_distribution(model, inputs: dict, target: str, vocab_size: int,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, V = vocab_size) a distribution over every token of `target`: one-hot where inputs[target]
    knows the token (>= 0), the model's probabilities given everything known elsewhere
    (each unknown token's marginal, at temperature 1, restricted to `allowed`)."""
    cur = inputs[target]                                                # (B, n), -1 unknown
    probs = torch.nn.functional.one_hot(cur.clamp_min(0), vocab_size).float()   # (B, n, V)
    if _n_unknown(cur, target):
        positions, logits = unknown_logits(model, inputs, target, 0.0, allowed)   # (B, m), (B, m, V)
        probs.scatter_(1, positions[..., None].expand(-1, -1, vocab_size), logits.softmax(-1))
    return probs
