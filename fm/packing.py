"""Padded token batches -> packed rows of real tokens, and back.

    ids, mod, pos, pad = trim(pad, ids, mod, pos)      # drop trailing all-padding columns
    layout = Layout(pad)                                # pad (B, N), True at padding
    x = embed(layout.pack(ids))                         # (T, D): the T real tokens only
    h = mlp(x)                                          # position-wise layers run on (T, D)
    a = attend(layout.unpack(h))                        # (B, N, D), zeros at padding

Only attention needs the (B, N) layout (which tokens belong to which object). Every
position-wise layer (embeddings, norms, projections, MLPs, output heads) runs on the
packed rows, so no work is spent on padding: a batch's cost follows its real tokens, not
its token budgets (input budget a modality cannot use stays padding, see fm.masking).
"""
from __future__ import annotations

import torch


def trim(pad: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the trailing columns that are padding in every row (keeping at least one):
    pad (B, N) and tensors (B, N, ...) -> (B, n, ...) each, pad first."""
    used = (~pad).any(0).nonzero()                  # (k, 1) columns holding a real token
    n = int(used[-1]) + 1 if len(used) else 1
    return tuple(t[:, :n] for t in (pad, *tensors))


class Layout:
    """Where the real tokens of a padded (B, N) batch are: `index` holds their flat
    positions b * N + n in row-major order, so packed row t is real token t."""

    def __init__(self, pad: torch.Tensor):
        if pad.dim() != 2 or pad.dtype != torch.bool:
            raise ValueError(f"Layout: pad must be a (B, N) bool tensor, got {tuple(pad.shape)} {pad.dtype}")
        self.pad = pad                                              # (B, N)
        self.batch, self.length = pad.shape
        self.index = (~pad).flatten().nonzero().squeeze(1)          # (T,)

    @property
    def tokens(self) -> int:
        return len(self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (T, ...): the real tokens' rows."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, N, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])
