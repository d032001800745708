"""The quantizer adapter: finite scalar quantization (FSQ) from vector-quantize-pytorch.

    q = FSQuantizer(levels=(8, 5, 5, 5))          # vocab 8*5*5*5 = 1000, code dim 4
    z_q, ids, aux = q(z)                          # z (B, 4, *grid) -> z_q same shape,
                                                  # ids (B, N) long in [0, 1000), aux = 0
    z_q = q.codes(ids, grid=(8, 8))               # ids (B, N) -> (B, 4, 8, 8)
    q.usage(ids)                                  # {'codes_used': ..., 'perplexity': ...}

FSQ (Mentzer et al. 2023) rounds each of the d channels, bounded by tanh, onto its own
small grid of `levels[i]` values with a straight-through gradient. It has no codebook to
learn, so no commitment or codebook loss (aux = 0) and no dead codes to revive; the
tokenizers project their features to `len(levels)` channels before it and back after.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import FSQ


class FSQuantizer(nn.Module):
    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        levels = tuple(int(l) for l in levels)
        if len(levels) < 1 or any(l < 3 for l in levels):
            raise ValueError(f"FSQuantizer: levels must be >= 3 each (got {levels}); "
                             "FSQ needs preserve_symmetry for 2 levels, which we do not use")
        self.levels = levels
        self.fsq = FSQ(levels=list(levels), channel_first=True)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """z (B, d, *grid) -> z_q (B, d, *grid), ids (B, N) with N = prod(grid), aux loss 0."""
        if z.shape[1] != self.dim:
            raise ValueError(f"FSQuantizer: expected {self.dim} channels, got shape {tuple(z.shape)}")
        z_q, ids = self.fsq(z.float())                                  # ids (B, *grid) int32
        ids = rearrange(ids.long(), "b ... -> b (...)")                 # (B, N)
        return z_q, ids, z.new_zeros(())

    def codes(self, ids: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """ids (B, N) -> quantized codes (B, d, *grid)."""
        ids = torch.as_tensor(ids).long()
        if ids.ndim != 2 or ids.shape[1] != math.prod(grid):
            raise ValueError(f"FSQuantizer: expected ids (B, {math.prod(grid)}), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"FSQuantizer: token ids must lie in [0, {self.vocab_size}), "
                             f"got min {int(ids.min())} max {int(ids.max())}")
        codes = self.fsq._indices_to_codes(ids).float()                 # (B, N, d)
        spatial = " ".join(f"g{i}" for i in range(len(grid)))
        sizes = {f"g{i}": g for i, g in enumerate(grid)}
        return rearrange(codes, f"b ({spatial}) d -> b d {spatial}", **sizes)

    @torch.no_grad()
    def usage(self, ids: torch.Tensor) -> dict[str, float]:
        """Fraction of the vocabulary used in `ids`, and the perplexity of their histogram."""
        counts = torch.bincount(ids.reshape(-1), minlength=self.vocab_size).float()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"codes_used": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}
