"""4M-style input/target masking, run in the data workers (numpy only).

    cfg = MaskingConfig(input_budget=128, target_budget=128)
    rng = np.random.default_rng(0)
    m = sample_masks({"image.des": ids_64, "scalar.redshift": ids_1}, table, cfg, rng)
    m["enc_ids"]  # (input_budget,)  ...  m["dec_targets"]  # (target_budget,)

For one object (which holds only some modalities):
1. Input shares over the modalities the object HAS come from a Dirichlet distribution
   whose concentration is drawn from a mixture (`input_alphas`; small alpha puts most of
   the budget on one modality, large alpha spreads it). Each modality first gets its
   `min_input_tokens[key]` (as far as it has tokens), then the rest of `input_budget` is
   a multinomial draw with those shares; counts are capped at the modality's tokens (and
   `max_input_tokens[key]`). Budget a modality cannot use is not moved elsewhere: it
   becomes padding (which costs no compute, see fm.packing), so sometimes an object is
   seen only through, say, its redshift.
   With probability `whole_modality_prob` an object is masked as the tasks use the model
   instead: its inputs are whole modalities (a random number k in [1, M - 1] of its M
   modalities, in random order, each taken whole, i.e. up to its `max_input_tokens`, where
   it still fits in the budget), as in translation (all of image.des given) or a posterior
   (image + fluxes given). Those modalities then get no targets.
2. Target shares come from a second Dirichlet (`target_alphas`). Each modality first
   gets its `min_target_tokens[key]` of the tokens not chosen as inputs, then the rest
   of `target_budget` is filled from those tokens, moving budget a modality cannot use
   to the others (every target slot is training signal), capped by `max_target_tokens`.
   With `tasks`, an object is instead masked as one of the tasks the model is used for,
   each with its probability: a `TaskMask` names the input modalities, given whole in
   their order as far as the input budget holds them (up to `max_input_tokens`), and the
   target modalities, which share the target budget by Dirichlet shares (nothing else is
   input or target; the minimums do not apply). An object that lacks one of the task's
   modalities is masked by the Dirichlets. The random Dirichlet masks seldom make the
   whole-image translation case (inputs: all of one survey's image, targets: the other's,
   ~2% of the objects in the demo) that survey translation asks of the model.
3. At least one input and one target token are kept when the object has two or more
   tokens. Which tokens of a modality are inputs or targets is a random permutation:
   input and target positions are disjoint.

Minimums are honoured as far as the object's tokens allow (inputs first: a one-token
scalar with a minimum of 1 input and 1 target is an input); a modality the object lacks
gets nothing. The minimums of all modalities must fit in the budgets.

Output (fixed sizes, so the collate is a stack): ids are local to their modality,
`*_mod` is the modality's index in the table, `*_pos` the position inside the
modality, `*_pad` is True at padding (whose other fields are 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .modality import ModalityTable


@dataclass
class TaskMask:
    inputs: tuple[str, ...]              # modalities given whole, in this order, as the budget allows
    targets: tuple[str, ...]             # modalities predicted (they share the target budget)
    prob: float                          # chance per object (that has all of them) of this mask

    def __post_init__(self):
        self.inputs, self.targets = tuple(self.inputs), tuple(self.targets)
        if not self.inputs or not self.targets or set(self.inputs) & set(self.targets):
            raise ValueError(f"TaskMask: need inputs and targets, disjoint; got {self.inputs} -> {self.targets}")
        if not 0.0 < self.prob <= 1.0:
            raise ValueError(f"TaskMask {self.inputs} -> {self.targets}: prob must be in (0, 1], got {self.prob}")


@dataclass
class MaskingConfig:
    input_budget: int = 128              # encoder tokens per object (Nin)
    target_budget: int = 128             # decoder tokens per object (Ndec)
    input_alphas: tuple[float, ...] = (0.2, 1.0, 5.0)   # Dirichlet mixture, chosen uniformly
    target_alphas: tuple[float, ...] = (0.2, 1.0, 5.0)
    max_input_tokens: dict[str, int] = field(default_factory=dict)   # per-modality caps
    max_target_tokens: dict[str, int] = field(default_factory=dict)
    min_input_tokens: dict[str, int] = field(default_factory=dict)   # per-modality floors
    min_target_tokens: dict[str, int] = field(default_factory=dict)
    whole_modality_prob: float = 0.0     # share of objects whose inputs are whole modalities
    tasks: tuple[TaskMask, ...] = ()     # task masks (e.g. image.des -> image.hsc), each with its prob
    seed: int = 0                        # base seed of the masking RNG in the data workers

    def __post_init__(self):
        if self.input_budget < 1 or self.target_budget < 1:
            raise ValueError(f"MaskingConfig: budgets must be >= 1, got {self.input_budget}, {self.target_budget}")
        for side, budget in (("input", self.input_budget), ("target", self.target_budget)):
            lo, hi = getattr(self, f"min_{side}_tokens"), getattr(self, f"max_{side}_tokens")
            for name, d in ((f"min_{side}_tokens", lo), (f"max_{side}_tokens", hi)):
                bad = {k: v for k, v in d.items() if int(v) < 0}
                if bad:
                    raise ValueError(f"MaskingConfig.{name}: counts must be >= 0, got {bad}")
            over = {k: (v, hi[k]) for k, v in lo.items() if k in hi and v > hi[k]}
            if over:
                raise ValueError(f"MaskingConfig.min_{side}_tokens exceed max_{side}_tokens: {over} (min, max)")
            if sum(lo.values()) > budget:
                raise ValueError(f"MaskingConfig.min_{side}_tokens sum to {sum(lo.values())}, "
                                 f"more than the {side}_budget {budget}")
        if not 0.0 <= self.whole_modality_prob <= 1.0:
            raise ValueError(f"MaskingConfig.whole_modality_prob must be in [0, 1], got {self.whole_modality_prob}")
        self.tasks = tuple(t if isinstance(t, TaskMask) else TaskMask(**t) for t in self.tasks)
        if sum(t.prob for t in self.tasks) > 1.0 + 1e-9:
            raise ValueError(f"MaskingConfig.tasks: probabilities sum to {sum(t.prob for t in self.tasks)} > 1")
        for name in ("input_alphas", "target_alphas"):
            alphas = tuple(getattr(self, name))
            if not alphas or any(a <= 0 for a in alphas):
                raise ValueError(f"MaskingConfig.{name}: need positive concentrations, got {alphas}")
            setattr(self, name, alphas)


def _dirichlet(n: int, alphas: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Shares over n modalities from a uniform mixture of symmetric Dirichlets."""
    alpha = alphas[rng.integers(len(alphas))]
    p = rng.dirichlet(np.full(n, alpha))
    p = np.nan_to_num(p, nan=0.0)   # tiny alphas can underflow every component
    return p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)


def _fill(budget: int, weights: np.ndarray, room: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spread `budget` over modalities by `weights`, never past `room`; what one cannot
    take goes to the others (weights renormalised over those with room)."""
    counts = np.zeros_like(room)
    room = room.copy()
    budget = min(budget, int(room.sum()))
    while budget > 0:
        w = np.where(room > 0, weights, 0.0)
        w = w / w.sum() if w.sum() > 0 else (room > 0) / (room > 0).sum()
        draw = np.minimum(rng.multinomial(budget, w), room)
        counts += draw
        room -= draw
        budget -= int(draw.sum())
    return counts


def _whole_inputs(budget: int, floor: np.ndarray, cap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Input counts per modality: the floors, then k in [1, M - 1] modalities in random
    order each raised to its cap where that still fits in the budget (others are skipped)."""
    n_in = floor.copy()
    left = budget - int(floor.sum())
    order = rng.permutation(len(cap))
    for j in order[:rng.integers(1, len(cap))]:
        extra = int(cap[j] - n_in[j])
        if extra <= left:
            n_in[j] += extra
            left -= extra
    return n_in


def check_keys(cfg: MaskingConfig, table: ModalityTable) -> None:
    """Every per-modality min/max in `cfg` names a modality of `table`."""
    for name in ("max_input_tokens", "max_target_tokens", "min_input_tokens", "min_target_tokens"):
        unknown = sorted(set(getattr(cfg, name)) - set(table.keys))
        if unknown:
            raise ValueError(f"MaskingConfig.{name}: unknown modalities {unknown}; the table has {table.keys}")
    for task in cfg.tasks:
        unknown = sorted(set(task.inputs + task.targets) - set(table.keys))
        if unknown:
            raise ValueError(f"MaskingConfig.tasks {task.inputs} -> {task.targets}: unknown modalities "
                             f"{unknown}; the table has {table.keys}")


def _pick_task(tasks: tuple[TaskMask, ...], keys: list[str], rng: np.random.Generator) -> TaskMask | None:
    """The task this object is masked as (None: the Dirichlet masks); one draw when tasks exist."""
    if not tasks:
        return None
    u, acc = rng.random(), 0.0
    for task in tasks:
        acc += task.prob
        if u < acc:
            return task if set(task.inputs + task.targets) <= set(keys) else None
    return None


def _task_counts(task: TaskMask, keys: list[str], n: np.ndarray, in_cap: np.ndarray, tgt_cap: np.ndarray,
                 cfg: MaskingConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Input and target counts per modality for a task mask (module doc, step 1)."""
    n_in, left = np.zeros_like(n), cfg.input_budget
    for key in task.inputs:
        j = keys.index(key)
        n_in[j] = min(int(in_cap[j]), left)
        left -= n_in[j]
    is_target = np.array([k in task.targets for k in keys])
    room = np.where(is_target, np.minimum(n - n_in, tgt_cap), 0)
    p_tgt = np.where(is_target, _dirichlet(len(keys), cfg.target_alphas, rng), 0.0)
    return n_in, _fill(cfg.target_budget, p_tgt, room, rng)


def check_tokens(tokens: Mapping[str, np.ndarray], table: ModalityTable, where: str = "object") -> dict[str, np.ndarray]:
    """The object's tokens for the modalities in `table` (others are ignored), validated."""
    out = {}
    for key, ids in tokens.items():
        if key not in table:
            continue
        spec = table[key]
        ids = np.asarray(ids)
        if ids.shape != (spec.n_tokens,):
            raise ValueError(f"{where}: {key}: expected {spec.n_tokens} tokens, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}: {key}: token ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
            raise ValueError(f"{where}: {key}: token ids must be in [0, {spec.vocab_size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        out[key] = ids.astype(np.int64)
    return out


def _dirichlet_counts(keys: list[str], n: np.ndarray, in_cap: np.ndarray, tgt_cap: np.ndarray,
                      in_min: np.ndarray, cfg: MaskingConfig, rng: np.random.Generator,
                      where: str) -> tuple[np.ndarray, np.ndarray]:
    """Input and target counts per modality from the Dirichlet masks (module doc, steps 1-3)."""
    if len(keys) >= 2 and cfg.whole_modality_prob > 0 and rng.random() < cfg.whole_modality_prob:
        n_in = _whole_inputs(cfg.input_budget, in_min, in_cap, rng)
    else:   # the minimums, then a multinomial budget by Dirichlet shares, capped, no redistribution
        p_in = _dirichlet(len(keys), cfg.input_alphas, rng)
        n_in = np.minimum(in_min + rng.multinomial(cfg.input_budget - in_min.sum(), p_in), in_cap)
    if n_in.sum() == 0:                                   # keep at least one input token
        if not (in_cap > 0).any():
            raise ValueError(f"{where}: max_input_tokens allow no input token for {keys}")
        n_in[rng.choice(np.flatnonzero(in_cap > 0))] = 1
    # targets: the minimums, then fill the budget from what is left, by Dirichlet shares
    room = np.minimum(n - n_in, tgt_cap)
    tgt_min = np.minimum([cfg.min_target_tokens.get(k, 0) for k in keys], room)
    p_tgt = _dirichlet(len(keys), cfg.target_alphas, rng)
    n_tgt = tgt_min + _fill(cfg.target_budget - tgt_min.sum(), p_tgt, room - tgt_min, rng)
    if n_tgt.sum() == 0:                                  # inputs took everything: give one back
        give = np.flatnonzero((n_in > in_min) & (tgt_cap > 0))
        give = give if len(give) else np.flatnonzero((n_in > 0) & (tgt_cap > 0))
        if not len(give) or n_in.sum() < 2:
            raise ValueError(f"{where}: max_target_tokens/max_input_tokens leave no target token for {keys}")
        j = rng.choice(give)
        n_in[j] -= 1
        n_tgt[j] = 1
    return n_in, n_tgt


def sample_masks(tokens: Mapping[str, np.ndarray], table: ModalityTable, cfg: MaskingConfig,
                 rng: np.random.Generator, where: str = "object") -> dict[str, np.ndarray]:
    """One object's tokens -> fixed-size encoder inputs and decoder targets (see module doc)."""
    check_keys(cfg, table)
    tokens = check_tokens(tokens, table, where)
    keys = [k for k in table.keys if k in tokens]   # table order
    n_total = sum(table[k].n_tokens for k in keys)
    if n_total < 2:
        raise ValueError(f"{where}: needs at least 2 tokens of known modalities to mask, "
                         f"has {n_total} ({keys})")
    n = np.array([table[k].n_tokens for k in keys])
    in_cap = np.array([min(table[k].n_tokens, cfg.max_input_tokens.get(k, table[k].n_tokens)) for k in keys])
    tgt_cap = np.array([cfg.max_target_tokens.get(k, table[k].n_tokens) for k in keys])
    in_min = np.minimum([cfg.min_input_tokens.get(k, 0) for k in keys], in_cap)

    task = _pick_task(cfg.tasks, keys, rng)
    if task is not None:
        n_in, n_tgt = _task_counts(task, keys, n, in_cap, tgt_cap, cfg, rng)
    if task is None or n_in.sum() == 0 or n_tgt.sum() == 0:   # caps can empty a task's side
        n_in, n_tgt = _dirichlet_counts(keys, n, in_cap, tgt_cap, in_min, cfg, rng, where)

    enc = {f: [] for f in ("ids", "mod", "pos")}
    dec = {f: [] for f in ("targets", "mod", "pos")}
    for j, key in enumerate(keys):
        order = rng.permutation(n[j])
        pos_in = np.sort(order[:n_in[j]])
        pos_tgt = np.sort(order[n_in[j]:n_in[j] + n_tgt[j]])
        m = table.index(key)
        enc["ids"].append(tokens[key][pos_in]); enc["pos"].append(pos_in); enc["mod"].append(np.full(len(pos_in), m))
        dec["targets"].append(tokens[key][pos_tgt]); dec["pos"].append(pos_tgt); dec["mod"].append(np.full(len(pos_tgt), m))

    out = {}
    for prefix, parts, size in (("enc", enc, cfg.input_budget), ("dec", dec, cfg.target_budget)):
        k = sum(len(a) for a in parts["pos"])
        assert k <= size, (prefix, k, size)
        for name, arrays in parts.items():
            arr = np.zeros(size, np.int64)
            arr[:k] = np.concatenate(arrays)
            out[f"{prefix}_{name}"] = arr
        pad = np.ones(size, bool)
        pad[:k] = False
        out[f"{prefix}_pad"] = pad
    return out
