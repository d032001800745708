"""Attention backends: swappable modules with one signature.

    attend = get_attention("sdpa")          # or "reference", "xformers"
    out = attend(q, k, v, mask)             # q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D)
    out = attend(q, k, v, mask, bias)       # bias: float added to the scores

`mask` is a bool tensor broadcastable to (B, H, Nq, Nk), True = may attend, or None;
`bias` a float tensor broadcastable to the same, added to q k^T / sqrt(D), or None.
A query row whose mask is all False (an object with no input tokens, a padding query)
gives zeros, never NaNs, in every backend: such rows attend to everything internally
(so no softmax over an empty set) and their output is then zeroed, which also stops
gradients flowing through them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _safe_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask with fully-masked rows opened, (…, Nq, 1) bool: row has any key) or (None, None)."""
    if mask is None:
        return None, None
    any_key = mask.any(dim=-1, keepdim=True)          # (B|1, H|1, Nq, 1)
    return mask | ~any_key, any_key


class ReferenceAttention(nn.Module):
    """Plain softmax(q k^T / sqrt(D)) v: slow, obvious, the numerical reference."""

    def forward(self, q, k, v, mask=None, bias=None):
        mask, any_key = _safe_mask(mask)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])     # (B, H, Nq, Nk)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ v                                 # (B, H, Nq, D)
        return out if any_key is None else out * any_key


class SDPAttention(nn.Module):
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math).

    On a CPU, bf16 / fp16 inputs (autocast) are attended in fp32 and the output cast back:
    the CPU flash kernel's bf16 backward is ~3x slower than its fp32 one (AION-shaped bench
    step, d 256, 4 + 4 layers, one thread: 0.50 s in bf16 throughout, 0.42 s with fp32
    attention; 0.61 s all fp32), while the matrix products around it keep bf16's speed."""

    def forward(self, q, k, v, mask=None, bias=None):
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            dtype = q.dtype
            with torch.autocast("cpu", enabled=False):
                return self.forward(q.float(), k.float(), v.float(), mask,
                                    None if bias is None else bias.float()).to(dtype)
        mask, any_key = _safe_mask(mask)
        if bias is not None:   # one additive float mask: the bias, -inf where not allowed
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Nq, D)
        return out if any_key is None else out * any_key


class XFormersAttention(nn.Module):
    """xformers.ops.memory_efficient_attention; CUDA tensors only."""

    def __init__(self):
        super().__init__()
        try:
            import xformers.ops as xops
        except Exception as e:  # ImportError, or a broken build
            raise ImportError(f"attention backend 'xformers' needs the xformers package: {e}") from e
        self.xops = xops

    def forward(self, q, k, v, mask=None, bias=None):
        if q.device.type != "cuda":
            raise RuntimeError("attention backend 'xformers' runs on CUDA tensors only; "
                               f"got {q.device.type} (use attention: sdpa on CPU)")
        mask, any_key = _safe_mask(mask)
        extra, bias = bias, None
        if mask is not None or extra is not None:
            B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            # xformers wants the bias's last dim stored with a stride that is a multiple of 8
            Nk8 = (Nk + 7) // 8 * 8
            bias = q.new_zeros(B, H, Nq, Nk8)[..., :Nk]
            if extra is not None:                   # copied in (differentiably), keeping the stride
                bias.copy_(extra.to(q.dtype).expand(B, H, Nq, Nk))
            if mask is not None:
                bias.masked_fill_(~mask.expand(B, H, Nq, Nk), float("-inf"))
        q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
        out = self.xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Nq, H, D)
        out = rearrange(out, "b n h d -> b h n d")
        return out if any_key is None else out * any_key


BACKENDS = {"reference": ReferenceAttention, "sdpa": SDPAttention, "xformers": XFormersAttention}


def get_attention(name: str) -> nn.Module:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]()
