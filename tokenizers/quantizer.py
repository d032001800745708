"""The quantizer adapters: FSQ and LFQ from vector-quantize-pytorch, one interface.

    q = FSQuantizer(levels=(8, 5, 5, 5))          # vocab 8*5*5*5 = 1000, code dim 4
    z_q, ids, aux = q(z)                          # z (B, 4, *grid) -> z_q same shape,
                                                  # ids (B, N) long in [0, 1000), aux = 0
    z_q = q.codes(ids, grid=(8, 8))               # ids (B, N) -> (B, 4, 8, 8)
    z_e = q.expected_codes(probs, grid=(8, 8))    # probs (B, N, 1000) -> (B, 4, 8, 8): sum_id p(id) code(id)
    q.usage(ids)                                  # {'codes_used': ..., 'perplexity': ...}

FSQ (Mentzer et al. 2023) rounds each of the d channels, bounded by tanh, onto its own
small grid of `levels[i]` values with a straight-through gradient. It has no codebook to
learn, so no commitment or codebook loss (aux = 0 by default); the tokenizers project their
features to `len(levels)` channels before it and back after. It has no codebook to
collapse, but its d-dimensional latent can still live on a thin part of the grid: the demo's
image tokenizer emits 25% of its 1000 codes over all 200k training tokens. With
`entropy_weight > 0` (FSQuantizer(levels, entropy_weight=0.1)) aux is LFQ's code-usage
term for FSQ: each channel's bounded value is softly assigned to its levels
(softmax(-distance^2 / temperature)), a token's code distribution is the product over
channels, and aux = weight * (mean per-token entropy - entropy of the batch's mean code
distribution): every code used across the batch, each token confident.

    q = LFQuantizer(bits=10, entropy_weight=0.1)  # vocab 2^10, code dim 10, same interface
    q = make_quantizer("lfq", levels, bits=10)    # what the tokenizers' configs call

LFQ (lookup-free quantization, MAGVIT-v2) takes the sign of each of `bits` channels;
its aux loss (commitment + entropy) pushes every code to be used across a batch while
each position stays confident, the classical cure for a codebook that collapses onto a
few codes (here: sky).
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ


class FSQuantizer(nn.Module):
    def __init__(self, levels: tuple[int, ...], entropy_weight: float = 0.0, temperature: float = 0.5):
        super().__init__()
        if entropy_weight < 0 or temperature <= 0:
            raise ValueError(f"FSQuantizer: entropy_weight must be >= 0 and temperature > 0, "
                             f"got {entropy_weight}, {temperature}")
        self.entropy_weight, self.temperature = float(entropy_weight), float(temperature)
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
        aux = self.usage_entropy_loss(z) if self.entropy_weight and self.training else z.new_zeros(())
        return z_q, ids, aux

    def usage_entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """weight * (mean per-token code entropy - entropy of the batch's mean code distribution),
        from soft assignments of each channel's bounded value (FSQ's own tanh bound, in level
        units, before rounding) to its levels."""
        x = rearrange(z.float(), "b d ... -> (b ...) d")                # (T, d)
        joint, token_entropy = None, 0.0
        for c, l in enumerate(self.levels):
            half_l = (l - 1) * (1 + 1e-3) / 2
            offset = 0.5 if l % 2 == 0 else 0.0
            bounded = torch.tanh(x[:, c] + math.atanh(offset / half_l)) * half_l - offset   # (T,)
            grid = torch.arange(l, device=x.device, dtype=x.dtype) - l // 2                 # (l,) the levels
            p = torch.softmax(-(bounded[:, None] - grid) ** 2 / self.temperature, -1)       # (T, l)
            token_entropy = token_entropy - (p * p.clamp_min(1e-12).log()).sum(-1).mean()
            joint = p if joint is None else (joint[:, :, None] * p[:, None, :]).flatten(1)   # (T, prod)
        q = joint.mean(0)                                                                   # (V,)
        batch_entropy = -(q * q.clamp_min(1e-12).log()).sum()
        return self.entropy_weight * (token_entropy - batch_entropy)

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

    def expected_codes(self, probs: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """probs (B, N, V), a distribution over the ids at each position -> (B, d, *grid), each
        position's mean code under it: the codes lie in a d-dimensional space the decoder
        reads, so a distribution over ids has a mean there (off the grid unless one-hot)."""
        probs = torch.as_tensor(probs).float()
        if probs.ndim != 3 or probs.shape[1] != math.prod(grid) or probs.shape[2] != self.vocab_size:
            raise ValueError(f"{type(self).__name__}: expected probs (B, {math.prod(grid)}, {self.vocab_size}), "
                             f"got {tuple(probs.shape)}")
        table = self.codes(torch.arange(self.vocab_size, device=probs.device)[None], (self.vocab_size,))[0]  # (d, V)
        mean = torch.einsum("bnv,dv->bdn", probs, table.to(probs))                 # (B, d, N)
        return mean.reshape(*mean.shape[:2], *grid)

    @torch.no_grad()
    def usage(self, ids: torch.Tensor) -> dict[str, float]:
        """Fraction of the vocabulary used in `ids`, and the perplexity of their histogram."""
        counts = torch.bincount(ids.reshape(-1), minlength=self.vocab_size).float()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"codes_used": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


class LFQuantizer(FSQuantizer):
    """Lookup-free quantization on `bits` channels: vocab 2^bits, aux = LFQ's commitment +
    entropy loss (0 in eval mode). `usage` is inherited."""

    def __init__(self, bits: int, entropy_weight: float = 0.1, commitment_weight: float = 0.25):
        nn.Module.__init__(self)
        if not 1 <= bits <= 20:
            raise ValueError(f"LFQuantizer: bits must lie in [1, 20], got {bits}")
        self.levels = (2,) * bits
        self.lfq = LFQ(dim=bits, codebook_size=2 ** bits, entropy_loss_weight=entropy_weight,
                       commitment_loss_weight=commitment_weight, channel_first=True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """z (B, bits, *grid) -> z_q (B, bits, *grid) in {-1, 1}, ids (B, N), aux loss."""
        if z.shape[1] != self.dim:
            raise ValueError(f"LFQuantizer: expected {self.dim} channels, got shape {tuple(z.shape)}")
        z_q, ids, aux = self.lfq(z.float())                             # ids (B, *grid)
        if not self.training:
            aux = z.new_zeros(())
        return z_q, rearrange(ids.long(), "b ... -> b (...)"), aux

    def codes(self, ids: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        if ids.ndim != 2 or ids.shape[1] != math.prod(grid):
            raise ValueError(f"LFQuantizer: expected ids (B, {math.prod(grid)}), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"LFQuantizer: token ids must lie in [0, {self.vocab_size}), "
                             f"got min {int(ids.min())} max {int(ids.max())}")
        bits = ((ids[..., None] & self.lfq.mask) != 0).float()         # (B, N, bits), MSB first
        codes = bits * 2 - 1
        spatial = " ".join(f"g{i}" for i in range(len(grid)))
        sizes = {f"g{i}": g for i, g in enumerate(grid)}
        return rearrange(codes, f"b ({spatial}) d -> b d {spatial}", **sizes)


def make_quantizer(kind: str, levels: tuple[int, ...], bits: int, entropy_weight: float = 0.1,
                   where: str = "quantizer", fsq_entropy_weight: float = 0.0) -> FSQuantizer:
    """'fsq' -> FSQuantizer(levels, fsq_entropy_weight); 'lfq' -> LFQuantizer(bits, entropy_weight)."""
    if kind == "fsq":
        return FSQuantizer(levels, fsq_entropy_weight)
    if kind == "lfq":
        return LFQuantizer(bits, entropy_weight)
    raise ValueError(f"{where}: quantizer must be 'fsq' or 'lfq', got {kind!r}")
