"""The modality table: which modalities the FM knows, their vocabularies and token counts.

    table = ModalityTable.from_manifest("out/tokens")        # from omnisky-tokenize's manifest
    table = ModalityTable.from_tokenizers({"image.hsc": tok, ...})
    table.index("image.hsc"), table.vocab_offset("image.hsc"), table.total_vocab

The table is data, never typed by hand twice: it is built from what the tokenizers
declare (`vocab_size`, `n_tokens`) and saved beside the model. Modalities are kept in
sorted key order, so the same set of modalities always gives the same table.

The FM has one concatenated token embedding table: modality `m`'s local id `i` is row
`vocab_offset(m) + i`. Learned position embeddings are concatenated the same way:
position `p` of modality `m` is row `position_offset(m) + p`.

Token spaces. Modalities whose ids come from one tokenizer that gives them one meaning
(`Tokenizer.shared_vocabulary`: the band-agnostic image tokenizer for image.des and
image.hsc, the grid-agnostic spectrum tokenizer for spectrum.sdss and spectrum.desi) name
the same `token_space` and share their rows: an HSC token and a DES token with the same
id start from the same embedding, and position p of both is the same row (the same
token-grid cell, or the same ln-lambda bin), which gives translation and
super-resolution their alignment for free. The modality embedding still tells them
apart, and every modality keeps its own output head. A modality's space defaults to its
own key (nothing shared), which is also how tables saved without spaces load.

Sky geometry. A grid-like image modality states `cell_arcsec`, the side of one token
cell on the sky (the tokenizer's downsample x the survey's pixel scale; omnisky-tokenize
writes it). The FM then adds to a token's learned position row an encoding of its
cell's offset from the stamp centre in arcsec, so a DES-like cell (1.05") and the
HSC-like cells (0.67") covering the same patch of sky share that part of their position
vectors, whatever the two grids (fm.model `sky_positions`). 0 = no sky geometry
(spectra, scalars, old tables). `grid_start` positions come before the square grid and
have no place on the sky (the image tokenizer's brightness-scale token, when it has one).

Code geometry. A modality whose ids lie on a grid of codes states `code_levels`: the FSQ
levels of the image and spectrum tokenizers, (n_bins,) for a scalar's ordered bins
(`Tokenizer.code_levels`, written by omnisky-tokenize). The FM then places each id by its
coordinates on that grid as well as by its own learned row (fm.codes). () = none.
A modality whose positions hold ids of different kinds states `code_segments`, runs of
(n positions, levels) in token order covering all its tokens: the spectrum tokenizer's
flux-scale bin (one position, (scale_bins,)), its FSQ codes, then per emission line a
position bin, a (flux bin, sub-position) pair and a (width bin, sub-position) pair. Each
distinct grid gets its own features, applied only at its positions; ids beyond a
segment's grid (ones it never takes) get none. Without code_segments, code_levels covers
every position.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping


@dataclass(frozen=True)
class ModalitySpec:
    key: str         # 'image.hsc', 'spectrum.desi', 'scalar.redshift', ...
    vocab_size: int  # local ids are in [0, vocab_size)
    n_tokens: int    # tokens per object
    token_space: str = ""   # modalities naming the same space share embeddings ("" = the key)
    cell_arcsec: float = 0.0   # side of a token cell on the sky, for square token grids (0 = none)
    code_levels: tuple[int, ...] = ()   # the ids' grid of codes, axis 0 fastest (() = none; fm.codes)
    code_segments: tuple = ()           # ((n positions, levels), ...) in token order (default: code_levels everywhere)
    grid_start: int = 0        # positions before the square sky grid (off the sky), with cell_arcsec only

    def __post_init__(self):
        if not self.token_space:
            object.__setattr__(self, "token_space", self.key)
        object.__setattr__(self, "code_levels", tuple(int(l) for l in self.code_levels))
        if self.code_levels and (math.prod(self.code_levels) != int(self.vocab_size) or min(self.code_levels) < 2):
            raise ValueError(f"modality {self.key!r}: code_levels {self.code_levels} must be >= 2 each with "
                             f"product vocab_size {self.vocab_size}")
        segs = tuple((int(n), tuple(int(l) for l in lv)) for n, lv in self.code_segments)
        if not segs and self.code_levels:
            segs = ((int(self.n_tokens), self.code_levels),)
        object.__setattr__(self, "code_segments", segs)
        if segs and (sum(n for n, _ in segs) != int(self.n_tokens) or any(n < 1 for n, _ in segs)
                     or any(not lv or min(lv) < 2 or math.prod(lv) > int(self.vocab_size) for _, lv in segs)):
            raise ValueError(f"modality {self.key!r}: code_segments {[[n, list(lv)] for n, lv in segs]} must cover "
                             f"its {self.n_tokens} tokens in runs of >= 1, each grid with levels >= 2 and at most "
                             f"vocab_size {self.vocab_size} codes")
        if not self.key or "." not in self.key:
            raise ValueError(f"modality key {self.key!r} must look like 'kind.name'")
        if int(self.vocab_size) < 1 or int(self.n_tokens) < 1:
            raise ValueError(f"modality {self.key!r}: vocab_size and n_tokens must be >= 1, "
                             f"got {self.vocab_size}, {self.n_tokens}")
        n_grid = int(self.n_tokens) - int(self.grid_start)
        if self.cell_arcsec < 0 or not 0 <= self.grid_start < self.n_tokens or \
                (self.cell_arcsec > 0 and round(n_grid ** 0.5) ** 2 != n_grid) or (self.grid_start and not self.cell_arcsec):
            raise ValueError(f"modality {self.key!r}: cell_arcsec {self.cell_arcsec} needs a square token grid after "
                             f"grid_start {self.grid_start} positions, both >= 0 (n_tokens {self.n_tokens})")

    @property
    def grid_side(self) -> int:
        """Token-grid side of a sky modality (0 without sky geometry)."""
        return round((self.n_tokens - self.grid_start) ** 0.5) if self.cell_arcsec > 0 else 0

    @property
    def kind(self) -> str:
        return self.key.split(".", 1)[0]


class ModalityTable:
    """An ordered set of `ModalitySpec`s with index, vocab and position offsets."""

    def __init__(self, specs: list[ModalitySpec]):
        specs = sorted(specs, key=lambda s: s.key)
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate modality keys in {keys}")
        if not specs:
            raise ValueError("a modality table needs at least one modality")
        self.specs = specs
        self.keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self.vocab_offsets, self.position_offsets = [], []
        self.spaces: list[tuple[ModalitySpec, int]] = []        # (first spec, vocab offset) per token space
        spaces: dict[str, tuple[ModalitySpec, int, int]] = {}   # token space -> (first spec, offsets)
        v = p = 0
        for s in specs:
            if s.token_space in spaces:
                first, sv, sp = spaces[s.token_space]
                if (first.vocab_size, first.n_tokens, first.code_segments) != (s.vocab_size, s.n_tokens, s.code_segments):
                    raise ValueError(f"modalities {first.key!r} and {s.key!r} share token space "
                                     f"{s.token_space!r} but differ in vocab_size/n_tokens/code geometry: "
                                     f"{first.vocab_size}/{first.n_tokens}/{first.code_segments} vs "
                                     f"{s.vocab_size}/{s.n_tokens}/{s.code_segments}")
            else:
                spaces[s.token_space] = (s, v, p)
                self.spaces.append((s, v))
                v += s.vocab_size
                p += s.n_tokens
            self.vocab_offsets.append(spaces[s.token_space][1])
            self.position_offsets.append(spaces[s.token_space][2])
        self.total_vocab, self.total_positions = v, p

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[ModalitySpec]:
        return iter(self.specs)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> ModalitySpec:
        return self.specs[self.index(key)]

    def index(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"modality {key!r} is not in the table; known: {self.keys}")
        return self._index[key]

    def vocab_offset(self, key: str) -> int:
        return self.vocab_offsets[self.index(key)]

    def position_offset(self, key: str) -> int:
        return self.position_offsets[self.index(key)]

    @property
    def n_tokens(self) -> dict[str, int]:
        return {s.key: s.n_tokens for s in self.specs}

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {s.key: s.vocab_size for s in self.specs}

    def __eq__(self, other) -> bool:
        return isinstance(other, ModalityTable) and self.specs == other.specs

    def __repr__(self) -> str:
        rows = ", ".join(f"{s.key}(V={s.vocab_size}, n={s.n_tokens}"
                         + ("" if s.token_space == s.key else f", space={s.token_space}") + ")" for s in self.specs)
        return f"ModalityTable({rows})"

    # -- construction and serialisation --------------------------------------------------
    @classmethod
    def from_dict(cls, modalities: Mapping[str, Mapping[str, Any]]) -> "ModalityTable":
        """{key: {"vocab_size": V, "n_tokens": n, ["token_space": S], ...}} (extra fields such
        as 'kind' ignored; no token_space: the modality's own)."""
        specs = []
        for key, d in modalities.items():
            missing = [f for f in ("vocab_size", "n_tokens") if f not in d]
            if missing:
                raise ValueError(f"modality {key!r}: missing {missing} in {dict(d)}")
            specs.append(ModalitySpec(key, int(d["vocab_size"]), int(d["n_tokens"]), str(d.get("token_space", "")),
                                      float(d.get("cell_arcsec", 0.0)), tuple(d.get("code_levels", ())),
                                      tuple(tuple(x) for x in d.get("code_segments", ())), int(d.get("grid_start", 0))))
        return cls(specs)

    def to_dict(self) -> dict[str, dict]:
        return {s.key: {"vocab_size": s.vocab_size, "n_tokens": s.n_tokens, "token_space": s.token_space,
                        **({"cell_arcsec": s.cell_arcsec} if s.cell_arcsec > 0 else {}),
                        **({"grid_start": s.grid_start} if s.grid_start else {}),
                        **({"code_levels": list(s.code_levels)} if s.code_levels else {}),
                        **({"code_segments": [[n, list(lv)] for n, lv in s.code_segments]}
                           if s.code_segments and s.code_segments != ((s.n_tokens, s.code_levels),) else {})}
                for s in self.specs}

    @classmethod
    def from_manifest(cls, manifest: str | Path | Mapping) -> "ModalityTable":
        """From a token-shard directory (its manifest.json) or an already-read manifest dict."""
        if not isinstance(manifest, Mapping):
            from ..shards.writer import read_manifest
            where = str(manifest)
            manifest = read_manifest(manifest)
        else:
            where = "manifest"
        if "modalities" not in manifest:
            raise ValueError(f"{where}: manifest has no 'modalities' (not a token-shard directory?)")
        return cls.from_dict(manifest["modalities"])

    @classmethod
    def from_tokenizers(cls, tokenizers: Mapping[str, Any]) -> "ModalityTable":
        """{modality_key: tokenizer}: each tokenizer declares `vocab_size` and `n_tokens`; the
        modalities a shared-vocabulary tokenizer serves share a token space named by its kind
        (one tokenizer per kind, as omnisky-tokenize and the Pipeline hold them)."""
        return cls([ModalitySpec(k, int(t.vocab_size), int(t.n_tokens),
                                 t.kind if getattr(t, "shared_vocabulary", False) else k,
                                 code_levels=tuple(getattr(t, "code_levels", ())),
                                 code_segments=tuple(getattr(t, "code_segments", ())))
                    for k, t in tokenizers.items()])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModalityTable":
        return cls.from_dict(json.loads(text))
