"""Code geometry: where each token id lies on its tokenizer's grid of codes.

    coords = code_coordinates((8, 5, 5, 5))     # (1000, 4) in [-1, 1]: FSQ's code of each id
    feats = code_features((8, 5, 5, 5))         # (1000, 4 * 2 * len(CODE_FREQUENCIES))

A token id is not an arbitrary symbol. An FSQ id (the image and spectrum tokenizers) is a
point of a d-dimensional grid with `levels[i]` values per axis, numbered mixed-radix with
the first axis fastest (vector-quantize-pytorch's `FSQ._indices_to_codes`); a scalar id is
one of `n_bins` ordered quantile bins, a one-axis grid. Neighbouring ids on the grid decode
to nearly the same patch, spectrum segment or value. The FM (`FMConfig.code_geometry`)
adds to each id's learned embedding row a learned linear map of Fourier features of its
coordinates, and to each output head's row another, so what it learns about one code
carries over to the codes next to it: with 1,000 image codes and a few thousand objects,
most codes are seen too rarely to be learned one by one.

`levels` of () means no geometry (an id space the tokenizer does not describe).
"""
from __future__ import annotations

import math

import torch

CODE_FREQUENCIES = (0.25, 0.5, 1.0, 2.0, 4.0)   # cycles per unit of coordinate (the grid spans [-1, 1])


def code_coordinates(levels: tuple[int, ...]) -> torch.Tensor:
    """(V, d) float coordinates in [-1, 1] of ids 0..V-1, V = prod(levels), axis 0 fastest."""
    levels = tuple(int(l) for l in levels)
    if not levels or any(l < 2 for l in levels):
        raise ValueError(f"code_coordinates: need levels >= 2 on each axis, got {levels}")
    ids = torch.arange(math.prod(levels))
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    L = torch.tensor(levels)
    digits = (ids[:, None] // basis) % L                                  # (V, d) in [0, L)
    return 2.0 * digits / (L - 1) - 1.0


def code_features(levels: tuple[int, ...], freqs: tuple[float, ...] = CODE_FREQUENCIES) -> torch.Tensor:
    """(V, 2 d F): sin and cos of 2 pi f x for each coordinate x and frequency f."""
    angle = 2 * math.pi * code_coordinates(levels)[..., None] * torch.tensor(freqs)   # (V, d, F)
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(1).float()


def n_features(levels: tuple[int, ...], freqs: tuple[float, ...] = CODE_FREQUENCIES) -> int:
    return 2 * len(levels) * len(freqs) if levels else 0
