"""Small conv blocks shared by the image (2-D) and spectrum (1-D) tokenizers.

    block = ResBlock(64, dims=2)            # x + conv(act(norm(conv(act(norm(x))))))
    down = Downsample(32, 64, dims=1)       # stride-2 conv: length / 2
    up = Upsample(64, 32, dims=2)           # nearest x2 then conv: size * 2
    film = FiLM(cond_dim=32, channels=64)   # x * (1 + gamma(c)) + beta(c)
    mix = TokenMixer(64, n_positions=64)    # x + MLP over the 8x8 grid positions (global)

`dims` picks Conv1d or Conv2d; every block keeps the channel axis second: (B, C, L) or
(B, C, H, W).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def conv(dims: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    klass = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    return klass(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """Pre-norm residual block of two 3-wide convs."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.norm1, self.conv1 = norm(channels), conv(dims, channels, channels)
        self.norm2, self.conv2 = norm(channels), conv(dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.gelu(self.norm1(x)))
        h = self.conv2(F.gelu(self.norm2(h)))
        return x + h


class Downsample(nn.Module):
    """Halve every spatial axis with a stride-2, 3-wide conv."""

    def __init__(self, c_in: int, c_out: int, dims: int):
        super().__init__()
        self.conv = conv(dims, c_in, c_out, kernel=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double every spatial axis: nearest-neighbour repeat, then a 3-wide conv."""

    def __init__(self, c_in: int, c_out: int, dims: int):
        super().__init__()
        self.conv = conv(dims, c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class FiLM(nn.Module):
    """Feature-wise affine modulation by a condition vector: x * (1 + gamma) + beta.

    x: (N, C, *spatial); cond: (N, D). Zero-initialised, so it starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=-1)                  # (N, C) each
        shape = (*gamma.shape, *([1] * (x.ndim - 2)))                   # (N, C, 1[, 1])
        return x * (1 + gamma.view(shape)) + beta.view(shape)


def n_halvings(factor: int, what: str) -> int:
    """log2 of a power-of-two downsampling factor, or a clear error."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"{what}: downsample must be a power of two >= 1, got {factor}")
    return factor.bit_length() - 1


def pyramid_halvings(what: str, length: int, downsample: int, patch: int) -> int:
    """Halvings of the conv pyramid after patchifying by `patch`, so that `length` pixels
    become `length / downsample` tokens; a clear error naming `what` otherwise."""
    n_halvings(patch, f"{what}.patch")
    if downsample % patch:
        raise ValueError(f"{what}: downsample {downsample} is not a multiple of patch {patch}")
    if length % downsample:
        raise ValueError(f"{what}: size {length} is not a multiple of downsample {downsample}")
    return n_halvings(downsample // patch, f"{what}.downsample / patch")


class TokenMixer(nn.Module):
    """Residual MLP over the positions of a latent grid (MLP-Mixer's token mixing), so that
    every position can carry information about any part of the object, not only its own
    patch: x + W2 gelu(W1 norm(x)) applied along the flattened grid, shared by channels.

    x: (B, C, *grid) with prod(grid) = n_positions. The output layer is zero-initialised,
    so it starts as the identity (a purely local conv network)."""

    def __init__(self, channels: int, n_positions: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or n_positions
        self.norm = norm(channels)
        self.fc1 = nn.Linear(n_positions, hidden)
        self.fc2 = nn.Linear(hidden, n_positions)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(2)                                     # (B, C, N)
        h = self.fc2(F.gelu(self.fc1(h)))                               # (B, C, N)
        return x + h.view_as(x)
