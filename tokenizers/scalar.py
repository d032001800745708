"""Catalog scalars -> one token each, by quantile binning (one tokenizer serves every name).

    tok = ScalarTokenizer(ScalarConfig(names=("redshift", "flux_r"), n_bins=256,
                                       log_names=("flux_r",)))
    tok.fit(records)                           # iterable of shards.schema.Scalar
    ids = tok.encode([Scalar("redshift", 0.31)])               # (1, 1)
    [z] = tok.decode(ids, like="redshift")     # Scalar: value = bin centre, uncertainty = spread
    value, sigma = tok.value_and_sigma(ids, "redshift")        # (B,) float64 arrays each
    tok.bin_edges("redshift"), tok.bin_centres("redshift")     # (n_bins + 1,), (n_bins,)

    tok = ScalarTokenizer(ScalarConfig(names=("redshift", "flux_g", "flux_r"), log_names=("flux_g", "flux_r"),
                                       colours=(("flux_g", "flux_r"),)))   # + the derived name 'colour_g_r'
    tok.fit(sample.records for sample in samples)                 # one mapping per object: colours need both fluxes
    tok.derive(sample.records)        # {'scalar.colour_g_r': Scalar} to encode beside the fluxes

Every name gets exactly `n_bins` bins, so all scalars share one vocabulary and the FM
sees a fixed table. Edges are quantiles of the training values per name: exact when at
most `reservoir` values of that name were seen (every value is kept), otherwise taken
from a uniform reservoir sample of `reservoir` values (Vitter's algorithm R, one pass,
seeded per name from `seed` and the name, so a name's bins depend only on its own
values and their order), so each bin holds about the same number of training objects. A name seen with fewer than
`n_bins` distinct values is refused with an error (the fix is a smaller `n_bins` or more
data); heavy ties can still leave some bins empty, which is reported, not hidden.

Names in `log_names` are binned in asinh space, asinh(x / softening), with the
softening set to the median reported uncertainty (Lupton et al. 1999 "luptitudes"):
like a log for bright sources, linear and sign-safe for fluxes scattered below zero.
Quantile edges do not depend on the transform; the interpolation between reservoir
values and the empty-bin mid-points do. Edges, centres (median training value in the
bin) and spreads (standard deviation in the bin) are stored in natural units as
buffers, so they travel in model.safetensors.

`colours` (pairs of log_names) adds derived names, `colour_<a>_<b>` (tokenizers.colours:
a difference of asinh magnitudes with the fitted softenings), after `names`: the FM then
sees each colour as one token, which it uses far better than two flux tokens (measured
there). Fitting them needs both fluxes of an object, so `fit` then takes one mapping of
records per object (`Sample.records`); `derive(records)` makes an object's colour records
wherever its fluxes are, for the shard tokenizer and the pipeline to encode beside them.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from ..shards.schema import RecordError, Scalar
from .base import Tokenizer, as_list, register_tokenizer
from .colours import colour_and_sigma, colour_name, derive_colours


@dataclass
class ScalarConfig:
    names: tuple[str, ...] = ("redshift", "flux_g", "flux_r", "flux_i", "flux_z", "r_half")
    n_bins: int = 256            # = vocab_size, shared by every name
    log_names: tuple[str, ...] = ("flux_g", "flux_r", "flux_i", "flux_z", "r_half")
    reservoir: int = 100_000     # values kept per name for the quantiles
    seed: int = 0                # reservoir sampling
    colours: tuple[tuple[str, str], ...] = ()   # (flux_a, flux_b) pairs of log_names -> colour_a_b


class Reservoir:
    """Uniform sample of at most `size` values from a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.seen = size, rng, 0
        self.values: list[float] = []
        self.uncertainties: list[float] = []

    def add(self, value: float, uncertainty: float) -> None:
        if self.seen < self.size:
            self.values.append(value)
            self.uncertainties.append(uncertainty)
        else:
            j = int(self.rng.integers(0, self.seen + 1))
            if j < self.size:
                self.values[j], self.uncertainties[j] = value, uncertainty
        self.seen += 1


@register_tokenizer
class ScalarTokenizer(Tokenizer):
    Config = ScalarConfig
    kind = "scalar"

    def __init__(self, config: ScalarConfig):
        super().__init__(config)
        names = tuple(config.names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"ScalarConfig.names must be non-empty and unique, got {names}")
        unknown = sorted(set(config.log_names) - set(names))
        if unknown:
            raise ValueError(f"ScalarConfig.log_names {unknown} are not in names {names}")
        if config.n_bins < 2:
            raise ValueError(f"ScalarConfig.n_bins must be >= 2, got {config.n_bins}")
        self.colours = tuple((str(a), str(b)) for a, b in config.colours)
        for a, b in self.colours:
            if a not in config.log_names or b not in config.log_names or a == b:
                raise ValueError(f"ScalarConfig.colours: ({a!r}, {b!r}) must be two different fluxes in "
                                 f"log_names {list(config.log_names)} (a colour is a difference of asinh magnitudes)")
        derived = tuple(colour_name(a, b) for a, b in self.colours)
        if set(derived) & set(names) or len(set(derived)) != len(derived):
            raise ValueError(f"ScalarConfig.colours: derived names {list(derived)} repeat or clash with names {names}")
        names = names + derived
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        N, V = len(names), config.n_bins
        self.register_buffer("edges", torch.zeros(N, V + 1, dtype=torch.float64))   # natural units
        self.register_buffer("edges_t", torch.zeros(N, V + 1, dtype=torch.float64)) # transformed
        self.register_buffer("centres", torch.zeros(N, V, dtype=torch.float64))
        self.register_buffer("spreads", torch.zeros(N, V, dtype=torch.float64))
        self.register_buffer("softening", torch.ones(N, dtype=torch.float64))       # asinh scale
        self.register_buffer("n_fit", torch.zeros(N, dtype=torch.int64))            # values seen

    @property
    def vocab_size(self) -> int:
        return self.config.n_bins

    @property
    def code_levels(self) -> tuple[int, ...]:
        """Ordered quantile bins: a one-axis grid."""
        return (self.config.n_bins,)

    @property
    def n_tokens(self) -> int:
        return 1

    # -- transform ----------------------------------------------------------------------
    def _forward(self, i: int, x: np.ndarray) -> np.ndarray:
        if self.names[i] in self.config.log_names:
            return np.arcsinh(x / float(self.softening[i]))
        return x

    def _inverse(self, i: int, y: np.ndarray) -> np.ndarray:
        if self.names[i] in self.config.log_names:
            return np.sinh(y) * float(self.softening[i])
        return y

    # -- fitting ------------------------------------------------------------------------
    def fit(self, records: Iterable) -> dict[str, dict]:
        """Fit the bins of every name from a stream of Scalar records, or of mappings
        {modality key: record} (one per object, e.g. `Sample.records`; other kinds are
        ignored), which `colours` need: an object's colour comes from both its fluxes.

        Records with a non-finite value are skipped with a warning naming the object.
        Returns a report {name: {'n': seen, 'kept': reservoir size, 'empty_bins': k}}.
        Raises ValueError if a name has no values or fewer than n_bins distinct ones."""
        base = [n for n in self.names if n not in {colour_name(a, b) for a, b in self.colours}]
        pools = {n: Reservoir(self.config.reservoir,
                              np.random.default_rng([self.config.seed, zlib.crc32(n.encode())]))
                 for n in base}
        fluxes = sorted({f for pair in self.colours for f in pair})
        objects = Reservoir(self.config.reservoir, np.random.default_rng([self.config.seed, 1]))  # colours' fluxes
        n_bad = n_objects = 0
        for item in records:
            if isinstance(item, Mapping):
                n_objects += 1
                recs = [r for k, r in item.items() if k.startswith("scalar.") and k[7:] in pools]
                if fluxes:   # (F, 2) value, uncertainty of the colours' fluxes; NaN where missing
                    objects.add(np.array([[getattr(item.get(f"scalar.{f}"), a, np.nan) for a in ("value", "uncertainty")]
                                          for f in fluxes], np.float64), 0.0)
            else:
                recs = [item]
            for rec in recs:
                if not isinstance(rec, Scalar):
                    raise TypeError(f"ScalarTokenizer.fit: expected Scalar records, got {type(rec).__name__}")
                if rec.name not in pools:
                    why = "is derived from fluxes, not fitted from records" if rec.name in self.index else \
                        f"is not served by this tokenizer; its names are {list(self.names)}"
                    raise KeyError(f"object {rec.object_id!r}: scalar {rec.name!r} {why}")
                try:
                    rec.validate()
                except RecordError as e:
                    warnings.warn(f"ScalarTokenizer.fit: skipping {e}")
                    n_bad += 1
                    continue
                pools[rec.name].add(float(rec.value), float(rec.uncertainty))
        report = {name: self._fit_name(name, np.asarray(pool.values, np.float64), pool.uncertainties, pool.seen)
                  for name, pool in pools.items()}
        if self.colours:
            if not n_objects:
                raise ValueError("ScalarTokenizer.fit: colours are derived from both fluxes of an object: pass one "
                                 "mapping of records per object (e.g. sample.records), not loose Scalar records")
            table = np.stack(objects.values) if objects.values else np.zeros((0, len(fluxes), 2))   # (N, F, 2)
            soft = {f: float(self.softening[self.index[f]]) for f in fluxes}
            for a, b in self.colours:
                ia, ib = fluxes.index(a), fluxes.index(b)
                value, _ = colour_and_sigma(table[:, ia, 0], table[:, ia, 1], table[:, ib, 0], table[:, ib, 1],
                                            soft[a], soft[b])
                value = value[np.isfinite(value)]
                name = colour_name(a, b)
                report[name] = self._fit_name(name, value, [], len(value))
        if n_bad:
            report["skipped_non_finite"] = n_bad
        return report

    def _fit_name(self, name: str, x: np.ndarray, uncertainties, seen: int) -> dict:
        """Bins of one name from its (reservoir of) values x (R,); returns its report entry."""
        V, i = self.config.n_bins, self.index[name]
        n_distinct = len(np.unique(x))
        if n_distinct < V:
            raise ValueError(
                f"ScalarTokenizer.fit: scalar {name!r} has {seen} value(s) with "
                f"{n_distinct} distinct (after reservoir sampling), fewer than n_bins={V}; "
                f"use more objects, a smaller n_bins, or drop {name!r} from names")
        if name in self.config.log_names:
            u = np.asarray(uncertainties)
            u = u[u > 0]
            soft = np.median(u) if len(u) else 0.01 * np.median(np.abs(x[x != 0]))
            self.softening[i] = float(soft)
        y = np.sort(self._forward(i, x))                                         # (R,)
        edges_y = np.quantile(y, np.linspace(0.0, 1.0, V + 1))                  # (V+1,)
        edges_y = np.maximum.accumulate(edges_y)   # quantile rounding can dip by 1 ulp
        bins = self._bin(edges_y, y)                                            # (R,)
        centres, spreads = np.zeros(V), np.zeros(V)
        x_sorted = np.sort(x)                # same order as y: the transform is monotone
        counts = np.bincount(bins, minlength=V)
        for b in range(V):
            inside = x_sorted[bins == b]
            if len(inside):
                centres[b] = np.median(inside)
                spreads[b] = inside.std()
            else:  # empty (ties): mid-point in transformed space, uniform-width spread
                lo, hi = self._inverse(i, edges_y[b:b + 2])
                centres[b] = float(self._inverse(i, edges_y[b:b + 2].mean()))
                spreads[b] = (hi - lo) / np.sqrt(12)
        self.edges[i] = torch.from_numpy(self._inverse(i, edges_y))
        self.edges_t[i] = torch.from_numpy(edges_y)
        self.centres[i] = torch.from_numpy(centres)
        self.spreads[i] = torch.from_numpy(spreads)
        self.n_fit[i] = seen
        report = dict(n=seen, kept=len(x), empty_bins=int((counts == 0).sum()))
        if report["empty_bins"]:
            warnings.warn(f"ScalarTokenizer.fit: {name!r}: {report['empty_bins']} of {V} "
                          "bins are empty (tied values); they are kept so every name has n_bins bins")
        return report

    def derive(self, records: Mapping) -> dict[str, Scalar]:
        """{modality key: Scalar} of the colours derivable from one object's records (both
        fluxes present and finite) and not already among them; {} without colours."""
        if not self.colours:
            return {}
        soft = {f: float(self.softening[self._name_index(f)]) for pair in self.colours for f in pair}
        return derive_colours(records, self.colours, soft)

    @staticmethod
    def _bin(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Bin index in [0, V) of each value; values beyond the outer edges clip to the end bins."""
        return np.searchsorted(edges[1:-1], x, side="right")

    # -- encode / decode ----------------------------------------------------------------
    def _name_index(self, name: str, object_id: str = "") -> int:
        if name not in self.index:
            raise KeyError(f"object {object_id!r}: scalar {name!r} is not served by this "
                           f"tokenizer; its names are {list(self.names)}")
        i = self.index[name]
        if int(self.n_fit[i]) == 0:
            raise RuntimeError(f"ScalarTokenizer: scalar {name!r} has not been fitted (call fit first)")
        return i

    def bin_edges(self, name: str) -> np.ndarray:
        """(n_bins + 1,) bin edges in the scalar's units; outer edges = training min and max."""
        return self.edges[self._name_index(name)].numpy().copy()

    def bin_centres(self, name: str) -> np.ndarray:
        """(n_bins,) median training value in each bin, in the scalar's units."""
        return self.centres[self._name_index(name)].numpy().copy()

    def bin_spreads(self, name: str) -> np.ndarray:
        """(n_bins,) standard deviation of the training values in each bin."""
        return self.spreads[self._name_index(name)].numpy().copy()

    @torch.no_grad()
    def encode(self, records) -> torch.LongTensor:
        """One Scalar or a list of them (any mix of names) -> (B, 1) bin ids."""
        records = as_list(records)
        ids = torch.empty(len(records), 1, dtype=torch.long)                       # (B, 1)
        rows: dict[int, list[int]] = {}                                            # name -> rows
        for b, rec in enumerate(records):
            if not isinstance(rec, Scalar):
                raise TypeError(f"ScalarTokenizer.encode: expected Scalar, got {type(rec).__name__}")
            rows.setdefault(self._name_index(rec.name, rec.object_id), []).append(b)
            rec.validate()
        for i, bs in rows.items():
            x = np.array([records[b].value for b in bs], dtype=np.float64)       # (b,)
            bins = self._bin(self.edges_t[i].numpy(), self._forward(i, x))
            ids[bs, 0] = torch.from_numpy(bins.astype(np.int64))
        return ids

    def value_and_sigma(self, tokens, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (B,) or (B, 1) of scalar `name` -> (value, sigma), each (B,) float64 in
        the scalar's units: the bin centre (median training value in the bin) and the
        within-bin spread (standard deviation of the training values in the bin)."""
        i = self._name_index(name)
        t = torch.as_tensor(tokens).long().reshape(-1)                             # (B,)
        if t.numel() and (t.min() < 0 or t.max() >= self.vocab_size):
            raise ValueError(f"ScalarTokenizer.value_and_sigma: {name!r} token ids must lie in "
                             f"[0, {self.vocab_size}), got min {int(t.min())} max {int(t.max())}")
        return self.centres[i, t].numpy().copy(), self.spreads[i, t].numpy().copy()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, like) -> list[Scalar]:
        """(B, 1) or (B,) ids -> list of Scalar(value=bin centre, uncertainty=bin spread).

        like: a Scalar, a name string, or a list of them (one per row, or one for all)."""
        tokens = torch.as_tensor(tokens).reshape(len(tokens), -1)                  # (B, 1)
        if tokens.shape[1] != 1:
            raise ValueError(f"ScalarTokenizer.decode: expected (B, 1) tokens, got {tuple(tokens.shape)}")
        likes = as_list(like)
        if len(likes) == 1:
            likes = likes * len(tokens)
        if len(likes) != len(tokens):
            raise ValueError(f"ScalarTokenizer.decode: {len(likes)} templates for {len(tokens)} rows")
        out = []
        for t, tpl in zip(tokens[:, 0].tolist(), likes):
            name, oid = (tpl, "") if isinstance(tpl, str) else (tpl.name, tpl.object_id)
            i = self._name_index(name, oid)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"object {oid!r}: token {t} outside [0, {self.vocab_size})")
            out.append(Scalar(name, float(self.centres[i, t]), float(self.spreads[i, t]), object_id=oid))
        return out
