"""The one place that joins tokenizers and the FM: observations in, observations out.

    sky = Pipeline.from_pretrained("demo_out/fm/model", "demo_out/tokenizers")
    hsc = sky.translate(samples, source="image.des", target="image.hsc")    # list[list[Image]]
    cons = fit_consistency(sky, paired_samples, "image.des", "image.hsc")     # generate.consistency
    hsc = sky.translate(samples, consistency=cons, n_samples=8)               # pulled to the DES data
    desi = sky.superres(samples)                                              # SDSS -> DESI
    cons = fit_consistency(sky, paired_samples, "spectrum.sdss", "spectrum.desi")
    desi = sky.superres(samples, consistency=cons)                            # pulled to the SDSS data
    img = sky.sample(samples, given=["scalar.redshift", "scalar.flux_r"], target="image.hsc")
    best = sky.estimate(samples, given=["image.des"], target="image.hsc")     # list[Image]: one point estimate each
    cat = fit_catalog_consistency(sky, train_samples, "image.des")            # generate.catalog_consistency
    img = sky.sample(samples, given=[...], target="image.des", catalog=cat)  # pulled to the catalog values
    chain = sky.sample_chain(samples, ["image.des"], sky.schedule(["spectrum.desi", "image.hsc"], steps=8))
    post = sky.predict(samples, given=["image.des"], target="scalar.redshift")
    emb = sky.embed(samples, given=["image.des"])                             # (B, D)
    (probes and similarity search over embeddings: `generate.probe`)

`samples` are `shards.schema.Sample`s (from `shards.reader.stream` or built by hand);
a given modality an object lacks is simply not given for that object. `like` gives the
target's template records (bands, pixel scale, wavelength grid); by default each
object's own target record where it has one, else the survey's standard template.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fm.model import FourM
from ..shards.schema import Sample, modality_kind
from ..tokenizers.base import Tokenizer, load_tokenizer
from .calibration import model_level
from .catalog_consistency import CatalogConsistency, refine_to_catalog
from .consistency import Consistency, known_redshift, refine_translation
from .posterior import bin_quantile
from .sampler import fill_target, generate, target_distribution, token_probabilities
from .schedule import TargetSchedule
from .templates import template_for

# Pipeline.estimate's defaults by the target's kind, measured on the demo's held-out objects
# (bench/RESULTS.md): an image is best as the mean of 8 runs of 2 MaskGIT steps then each token's
# mean code; a spectrum as the pixel-wise median of 8 samples (its mean codes did no better than
# one sample, and about one sample in 2,000 draws its flux-scale token from the far tail, which a mean keeps).
ESTIMATE_REVEAL_STEPS = {"image": 2}          # other kinds: every step (samples)
ESTIMATE_COMBINE = {"spectrum": "median"}     # other kinds: "mean"


def estimate_settings(kind: str, steps: int) -> tuple[int, str]:
    """(reveal_steps, combine) that Pipeline.estimate uses by default for a target of `kind`."""
    return min(ESTIMATE_REVEAL_STEPS.get(kind, steps), steps), ESTIMATE_COMBINE.get(kind, "mean")


class Pipeline:
    def __init__(self, model: FourM, tokenizers: dict[str, Tokenizer]):
        self.model = model.eval()
        self.tokenizers = tokenizers  # kind -> tokenizer
        self.n_tokens = dict(model.table.n_tokens)

    @classmethod
    def from_pretrained(cls, fm_dir: str | Path, tokenizers_dir: str | Path) -> "Pipeline":
        tokenizers = {}
        for kind in ("image", "spectrum", "scalar"):
            d = Path(tokenizers_dir) / kind
            if (d / "config.json").exists():
                tokenizers[kind] = load_tokenizer(d)
        if not tokenizers:
            raise FileNotFoundError(f"{tokenizers_dir}: no image/, spectrum/ or scalar/ tokenizer found")
        return cls(FourM.from_pretrained(fm_dir), tokenizers)

    def tokenizer(self, key: str) -> Tokenizer:
        kind = modality_kind(key)
        if kind not in self.tokenizers:
            raise KeyError(f"no {kind} tokenizer loaded for modality {key!r}")
        return self.tokenizers[kind]

    def allowed_ids(self, key: str) -> torch.Tensor:
        """BoolTensor (n_tokens, V): the ids each token position of `key` may take, as its
        tokenizer states them (e.g. a spectrum's flux-scale token has fewer values)."""
        return torch.as_tensor(self.tokenizer(key).allowed_ids(), dtype=torch.bool)

    # -- tokens in ---------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, samples: Sequence[Sample], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """{key: LongTensor (B, n)}; rows of objects lacking `key` are all -1 (not given).
        Scalars the scalar tokenizer derives (colours) and the model knows join the given
        keys wherever their fluxes are given: a model trained with colours uses them."""
        records = [s.records for s in samples]
        scalar = self.tokenizers.get("scalar")
        if getattr(scalar, "colours", ()):
            records, extra = [dict(r) for r in records], set()
            for recs in records:
                new = {k: r for k, r in scalar.derive({k: r for k, r in recs.items() if k in keys}).items()
                       if k in self.n_tokens}
                recs.update(new)
                extra |= set(new)
            keys = list(keys) + sorted(extra - set(keys))
        out = {}
        for key in keys:
            if key not in self.n_tokens:
                raise KeyError(f"modality {key!r} is not in the model; known: {sorted(self.n_tokens)}")
            have = [i for i, recs in enumerate(records) if key in recs]
            if not have:
                continue
            ids = torch.full((len(samples), self.n_tokens[key]), -1, dtype=torch.long)
            ids[have] = self.tokenizer(key).encode([records[i][key] for i in have]).long()
            out[key] = ids
        return out

    def _likes(self, samples: Sequence[Sample], target: str, like) -> list:
        if like is None:
            size = getattr(getattr(self.tokenizer(target), "config", None), "size", 32)
            return [s.records.get(target) or template_for(target, image_size=size) for s in samples]
        if isinstance(like, (list, tuple)):
            if len(like) != len(samples):
                raise ValueError(f"like: {len(like)} templates for {len(samples)} objects")
            return list(like)
        return [like] * len(samples)

    # -- generation ----------------------------------------------------------------------
    def schedule(self, targets: str | Sequence[str], **kw) -> list[TargetSchedule]:
        """One TargetSchedule per target, walked in order, with the same settings `kw`."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        return [TargetSchedule(t, **kw) for t in targets]

    @torch.no_grad()
    def generate_tokens(self, samples: Sequence[Sample], given: Sequence[str],
                        schedule: Sequence[TargetSchedule], n_samples: int = 1,
                        seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """n_samples token dicts {target: LongTensor (B, n_target)}, one per draw (seed + k),
        walking `schedule`: each finished target joins the conditioning of the next."""
        inputs = self.tokenize(samples, given)
        if not inputs:
            raise ValueError(f"none of the objects has any of the given modalities {list(given)}")
        draws = []
        for k in range(n_samples):
            out = generate(self.model, inputs, schedule, self.n_tokens, seed=seed + k,
                           allowed={s.target: self.allowed_ids(s.target) for s in schedule})
            draws.append({s.target: out[s.target] for s in schedule})
        return draws

    def sample_chain(self, samples: Sequence[Sample], given: Sequence[str],
                     schedule: Sequence[TargetSchedule], like: dict | None = None,
                     n_samples: int = 1, seed: int = 0) -> list[list[dict]]:
        """Records of every target of `schedule`: a list over objects of `n_samples` dicts
        {target: record}. `like` maps a target to its templates (see `sample`)."""
        like = like or {}
        draws = self.generate_tokens(samples, given, schedule, n_samples, seed)
        decoded = {}
        for step in schedule:
            likes = self._likes(samples, step.target, like.get(step.target))
            decoded[step.target] = [self.tokenizer(step.target).decode(d[step.target], like=likes) for d in draws]
        return [[{t: decoded[t][k][i] for t in decoded} for k in range(n_samples)] for i in range(len(samples))]

    def sample(self, samples: Sequence[Sample], given: Sequence[str], target: str, like=None,
               n_samples: int = 1, seed: int = 0, catalog: CatalogConsistency | None = None,
               **schedule) -> list[list]:
        """Records of `target` given `given`: a list over objects of `n_samples` records.
        `schedule`: TargetSchedule settings (scheme, steps, temperature, guidance, ...).
        `catalog` (generate.catalog_consistency.fit_catalog_consistency): each image then pulled
        to the object's given catalog fluxes and half-light radius."""
        chain = self.sample_chain(samples, given, self.schedule(target, **schedule), {target: like}, n_samples, seed)
        gen = [[d[target] for d in draws] for draws in chain]
        if catalog is None:
            return gen
        if catalog.target != target:
            raise ValueError(f"catalog consistency fitted for {catalog.target}, not {target}")
        return [refine_to_catalog(s, g, catalog, given) for s, g in zip(samples, gen)]

    @torch.no_grad()
    def estimate(self, samples: Sequence[Sample], given: Sequence[str], target: str, like=None,
                 n_samples: int = 8, reveal_steps: int | None = None, combine: str | None = None,
                 seed: int = 0, **schedule) -> list:
        """One point estimate of `target` per object (a list of records), for when one best
        image or spectrum matters more than the spread: `n_samples` runs combined pixel by pixel
        (`combine`: "mean" or "median"), each walking only the first `reveal_steps` steps of the
        MaskGIT schedule (a few tokens drawn, with seed + k), then decoding every token still
        unknown from its mean code under the model's probabilities (sampler.target_distribution,
        tokenizer.decode_expected). reveal_steps=0: one deterministic run from the marginals
        alone; reveal_steps = steps: `n_samples` samples (any image or spectrum tokenizer).
        None: the measured defaults of the target's kind (`estimate_settings`: images 2 steps
        and the mean, spectra every step and the median)."""
        tok = self.tokenizer(target)
        step = TargetSchedule(target, **schedule)
        kind = modality_kind(target)
        default_reveal, default_combine = estimate_settings(kind, step.steps)
        reveal_steps = default_reveal if reveal_steps is None else reveal_steps
        combine = combine or default_combine
        if kind not in ("image", "spectrum"):
            raise NotImplementedError(f"estimate: {target} is a {kind}; its point estimate is the posterior "
                                      "median of `predict`")
        if not 0 <= reveal_steps <= step.steps or n_samples < 1 or combine not in ("mean", "median"):
            raise ValueError(f"estimate: need 0 <= reveal_steps <= steps ({step.steps}), n_samples >= 1 and "
                             f"combine 'mean' or 'median', got {reveal_steps}, {n_samples}, {combine!r}")
        if reveal_steps < step.steps and not getattr(tok, "decodes_expected", False):   # duck-typed: no flag
            raise NotImplementedError(f"estimate: {target}'s {type(tok).__name__} has no decode_expected (its ids "
                                      f"have no mean code); use reveal_steps={step.steps} (samples)")
        inputs = self.tokenize(samples, given)
        if not inputs:
            raise ValueError(f"none of the objects has any of the given modalities {list(given)}")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        likes = self._likes(samples, target, like)
        allowed = self.allowed_ids(target)
        runs = []
        for k in range(n_samples if reveal_steps else 1):
            gen = torch.Generator(device=device).manual_seed(seed + k)
            cur = fill_target(self.model, inputs, step, self.n_tokens[target], gen, allowed=allowed,
                              stop_after=reveal_steps)                                    # (B, n), -1 unknown
            if reveal_steps == step.steps:                                                # a sample
                runs.append(tok.decode(cur.cpu(), likes))
                continue
            probs = target_distribution(self.model, {**inputs, target: cur}, target, tok.vocab_size, allowed)
            runs.append(tok.decode_expected(probs, likes))
        pool = np.mean if combine == "mean" else np.median
        return [dataclasses.replace(recs[0], flux=pool([r.flux for r in recs], 0).astype(np.float32))
                for recs in zip(*runs)]

    def translate(self, samples, source: str = "image.des", target: str = "image.hsc",
                  consistency: Consistency | None = None, **kw):
        """Survey translation: the `target` survey's image from the `source` survey's, a list
        over objects of `n_samples` records. `consistency` (generate.consistency.
        fit_consistency): each sample then pulled to the source observation through the
        source survey's PSF, pixels and bands (the samples' spread is the prior's width)."""
        gen = self.sample(samples, [source], target, **kw)
        if consistency is None:
            return gen
        if (consistency.source, consistency.target) != (source, target):
            raise ValueError(f"consistency fitted for {consistency.source} -> {consistency.target}, "
                             f"not {source} -> {target}")
        return [refine_translation(s.records[source], g, consistency, redshift=known_redshift(s))
                for s, g in zip(samples, gen)]

    def superres(self, samples, source: str = "spectrum.sdss", target: str = "spectrum.desi",
                 consistency: Consistency | None = None, **kw):
        """Spectrum super-resolution: the `target` instrument's spectrum from `source`'s.
        `consistency` (generate.consistency.fit_consistency on paired spectra): each sample
        then pulled to the source spectrum through its line spread, pixels and aperture, with
        the emission lines' fluxes fitted where the object's redshift is known
        (generate.spectrum_consistency)."""
        return self.translate(samples, source, target, consistency, **kw)

    # -- posteriors and embeddings -------------------------------------------------------
    @torch.no_grad()
    def predict(self, samples: Sequence[Sample], given: Sequence[str], target: str = "scalar.redshift",
                temperature: float = 1.0, calibration: dict | None = None) -> dict[str, np.ndarray]:
        """Posterior of a one-token scalar from its bin probabilities, softmax(logits / T).
        `calibration` (from `generate.calibration.fit_calibration` on held-out objects) sets T
        and maps the 68% interval's nominal levels 0.16 / 0.84 onto recalibrated ones; the
        point estimate stays the tempered posterior's median (level 0.5: moving it by the
        level map calibrates the CDF, not the estimate, and on multimodal posteriors it jumps
        modes; a strongly biased posterior's interval may then exclude its median). Without it T = `temperature` (1 = as trained) and the levels are nominal.

        Returns {'median', 'lo68', 'hi68', 'mean'} arrays (B,) in the scalar's units and
        'probs' (B, n_bins), 'centres' (n_bins,), 'levels' (3,) the levels read."""
        tok = self.tokenizer(target)
        name = target.split(".", 1)[1]
        if calibration:
            temperature = calibration["temperature"]
        inputs = self.tokenize(samples, given)
        probs = token_probabilities(self.model, inputs, target, 1, temperature)[:, 0].numpy()    # (B, V)
        edges = np.asarray(tok.bin_edges(name), dtype=np.float64)                     # (V+1,)
        centres = np.asarray(tok.bin_centres(name), dtype=np.float64)                 # (V,)
        levels = np.array([model_level(0.16, calibration), 0.5, model_level(0.84, calibration)])
        lo, median, hi = (bin_quantile(probs, edges, q) for q in levels)
        return dict(median=median, lo68=lo, hi68=hi, mean=probs @ centres, probs=probs, centres=centres,
                    levels=levels)

    @torch.no_grad()
    def embed(self, samples: Sequence[Sample], given: Sequence[str]) -> np.ndarray:
        """Pooled encoder embeddings (B, D) of the given modalities."""
        return self.model.embed(self.tokenize(samples, given)).float().numpy()
