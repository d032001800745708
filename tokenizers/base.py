"""The tokenizer contract, and saving/loading as safetensors + JSON.

Every tokenizer is an `nn.Module` with:

    vocab_size: int                 ids are in [0, vocab_size)
    n_tokens:   int                 tokens per object (per record)
    shared_vocabulary: bool         True when an id means the same thing in every modality the
                                    tokenizer serves (one image model for every survey, one
                                    spectrum model for every grid), so the FM may share their
                                    token and position embeddings; False where each modality
                                    has ids of its own (the scalar tokenizer's per-name bins)
    encode(records) -> LongTensor (B, n_tokens)      records: one record or a sequence
    decode(tokens, like) -> list[record]             like: template record(s) giving the
                                                     target bands / wavelength grid / name
    save(dir); Cls.from_pretrained(dir)              dir/config.json + dir/model.safetensors

`config.json` holds {"class": "<ClassName>", "config": {...the typed config...}, plus
anything the tokenizer fitted that is not a tensor}; nothing is unpickled from disk.
`load_tokenizer(dir)` builds whichever class the config names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import from_dict, to_dict

TOKENIZERS: dict[str, type["Tokenizer"]] = {}


def register_tokenizer(cls):
    TOKENIZERS[cls.__name__] = cls
    return cls


def as_list(records) -> list:
    """One record or a sequence of records -> list."""
    if isinstance(records, (list, tuple)):
        return list(records)
    return [records]


class Tokenizer(nn.Module):
    """Base class: subclasses set `Config` (a dataclass) and implement encode/decode."""

    Config: type = None
    kind: str = ""  # 'image' | 'spectrum' | 'scalar'
    shared_vocabulary: bool = False
    decodes_expected: bool = False   # implements decode_expected (ids are codes with a mean)

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def n_tokens(self) -> int:
        raise NotImplementedError

    @property
    def code_levels(self) -> tuple[int, ...]:
        """The grid the ids lie on (mixed radix, axis 0 fastest; fm.codes): FSQ's levels,
        (n_bins,) for ordered bins; () when ids have no such order."""
        return ()

    @property
    def code_segments(self) -> tuple:
        """((n positions, levels), ...) in token order: the grid each position's ids lie on
        (fm.modality); by default code_levels at every position."""
        return ((self.n_tokens, self.code_levels),) if self.code_levels else ()

    def allowed_ids(self) -> torch.Tensor:
        """BoolTensor (n_tokens, vocab_size): the ids each token position may take (what a
        sampler may draw). Every id everywhere, unless a tokenizer says otherwise."""
        return torch.ones(self.n_tokens, self.vocab_size, dtype=torch.bool)

    def encode(self, records) -> torch.LongTensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, like) -> list:
        raise NotImplementedError

    def decode_expected(self, probs: torch.Tensor, like) -> list:
        """(B, n_tokens, V) distributions over each token's ids -> records decoded from each
        token's mean code (a point estimate); for tokenizers whose ids are codes in a space
        their decoder reads (the image and spectrum tokenizers)."""
        raise NotImplementedError(f"{type(self).__name__} has no decode_expected: its ids have no mean code "
                                  f"to decode; draw samples and decode them instead")

    # Fitted non-tensor state (e.g. normalisation constants) goes here; JSON-able.
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"))
        cfg = dict(**{"class": type(self).__name__, "kind": self.kind,
                      "vocab_size": self.vocab_size, "n_tokens": self.n_tokens},
                   config=to_dict(self.config), extra=self.extra_state())
        (d / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "Tokenizer":
        d = Path(directory)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d}: no config.json (not a saved tokenizer)")
        meta = json.loads((d / "config.json").read_text())
        klass = TOKENIZERS.get(meta["class"]) if cls is Tokenizer else cls
        if klass is None:
            raise ValueError(f"{d}: unknown tokenizer class {meta['class']!r}; known: {sorted(TOKENIZERS)}")
        if klass.__name__ != meta["class"]:
            raise ValueError(f"{d} holds a {meta['class']}, not a {klass.__name__}")
        tok = klass(from_dict(klass.Config, meta["config"]))
        tok.load_extra_state(meta.get("extra", {}))
        state = load_file(str(d / "model.safetensors"), device=map_location)
        tok.load_state_dict(state)
        tok.eval()
        return tok


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load any saved tokenizer; its class is read from config.json."""
    from . import image, scalar, spectrum  # noqa: F401  (register the classes)
    return Tokenizer.from_pretrained(directory)
