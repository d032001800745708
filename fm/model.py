"""FourM: the masked multimodal encoder-decoder transformer (4M / AION-1 style).

    model = FourM(FMConfig(dim=256), ModalityTable.from_manifest("out/tokens"))
    loss, per_modality = model(batch)                 # batch from fm.data.collate
    emb, pad = model.encode({"image.des": ids})       # (B, N, D), (B, N)
    vec = model.embed({"image.des": ids})             # (B, D)
    out = model.logits({"image.des": ids}, {"image.hsc": positions})   # {key: (B, m, V)}

Tokens of every modality share one embedding table (local ids are offset per
modality) and get a modality embedding plus a learned per-modality position embedding.
The encoder self-attends over the given tokens (padding masked). The decoder's queries
are modality + position embeddings of the tokens to predict; they self-attend only
within their own modality and cross-attend to the encoder. Each modality has its own
output head, so its logits range over its own vocabulary only.

Only the selected tokens are computed: a batch carries the ids of its token budgets
(masking in the data workers gathers them), all-padding columns are trimmed, and only
the real tokens are embedded and run through the position-wise layers (embeddings,
norms, projections, MLPs, heads) as packed (T, D) rows; attention alone works on the
padded (B, N) layout (fm.packing). Nothing scales with the full token count of a
modality, and budget left unused (padding) costs no compute.

In `encode`/`embed`/`logits`, inputs are `{key: LongTensor (B, n_key)}` with -1 where a
token is not given (a partly known modality); a modality absent from the dict is not
given at all. Given tokens are packed to the front of each row and unused columns are
dropped, so the encoder only sees what is known.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import from_dict, to_dict
from .attention import BACKENDS, get_attention
from .codes import code_features
from .modality import ModalityTable
from .packing import Layout, trim


SKY_ATTENTION_SIGMAS = (0.5, 8.0)   # arcsec: the heads' initial locality widths, geometric between
SKY_FREQUENCIES = tuple(float(f) for f in 1.0 / (0.5 * 2.0 ** (6 * torch.arange(8) / 7)))   # cycles/arcsec:
                                                                  # periods 0.5" .. 32", geometric


def _gathered(params: list[torch.Tensor]):
    """The full parameters while inside, for ZeRO-3 partitioned ones (DeepSpeed's
    GatheredParameters: rank 0's values are kept and re-partitioned on exit); for plain
    tensors nothing."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@dataclass
class FMConfig:
    dim: int = 256
    enc_depth: int = 4
    dec_depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    swiglu: bool = False         # SwiGLU MLP (hidden 2/3 of mlp_ratio*dim: about the same params)
    qk_norm: bool = False        # RMSNorm on queries and keys, per head
    bias: bool = False           # biases in Linear and LayerNorm
    dropout: float = 0.0         # on residual branches and embeddings
    attention: str = "sdpa"      # 'sdpa' | 'xformers' | 'reference'
    checkpointing: bool = False  # activation checkpointing of every block when training
    sky_positions: bool = True   # image tokens also placed by their sky offset (arcsec) where
                                 # the table gives cell_arcsec, beside the cell index (fm.modality)
    sky_attention: bool = False  # attention between sky tokens biased by -w_h * distance^2 (arcsec),
                                 # a learned width per head and layer (Attention.sky_log_w)
    code_geometry: bool = True   # ids also embedded (and scored) by their place on the tokenizer's
                                 # code grid where the table gives code_levels / code_segments (fm.codes)

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"FMConfig: dim {self.dim} is not divisible by heads {self.heads}")
        if self.attention not in BACKENDS:
            raise ValueError(f"FMConfig: unknown attention {self.attention!r}; choose from {sorted(BACKENDS)}")


class MLP(nn.Module):
    def __init__(self, cfg: FMConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.swiglu = cfg.swiglu
        if cfg.swiglu:
            hidden = (int(2 * hidden / 3) + 7) // 8 * 8   # same parameters, a multiple of 8
        self.fc = nn.Linear(cfg.dim, 2 * hidden if cfg.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            a, gate = h.chunk(2, dim=-1)
            h = a * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.drop(self.proj(h))


class Attention(nn.Module):
    """Multi-head attention over packed rows: self-attention, or cross-attention when
    given a context. Projections run on the real tokens only (T, D); the attention
    itself runs on the padded (B, N) layout."""

    def __init__(self, cfg: FMConfig):
        super().__init__()
        self.heads = cfg.heads
        head_dim = cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if cfg.qk_norm else nn.Identity()
        self.attend = get_attention(cfg.attention)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.sky_attention:   # w_h = 1 / (2 sigma_h^2), sigma_h from 0.5" to 8" over the heads
            lo, hi = SKY_ATTENTION_SIGMAS
            sigma = lo * (hi / lo) ** (torch.arange(cfg.heads) / max(cfg.heads - 1, 1))
            self.sky_log_w = nn.Parameter(-torch.log(2 * sigma ** 2))

    def forward(self, x: torch.Tensor, layout: Layout, mask: torch.Tensor | None,
                context: torch.Tensor | None = None, context_layout: Layout | None = None,
                sky_q: tuple | None = None, sky_k: tuple | None = None):
        """x (T, D) rows of `layout`; context (Tk, D) rows of `context_layout` (default:
        x itself); mask broadcastable to (B, H, Nq, Nk), True = may attend; sky_q, sky_k:
        the queries' and keys' sky places for sky attention (FourM._sky_tokens: offsets
        (B, N, 2) in arcsec, on-sky flags (B, N)), sky_k defaulting to sky_q -> (T, D)."""
        if context is None:
            context, context_layout = x, layout
        q = rearrange(layout.unpack(self.q(x)), "b n (h d) -> b h n d", h=self.heads)          # (B, H, Nq, d)
        k, v = rearrange(context_layout.unpack(self.kv(context)), "b n (two h d) -> two b h n d",
                         two=2, h=self.heads)                                                 # (B, H, Nk, d)
        q, k, bias, d = self.q_norm(q), self.k_norm(k), None, q.shape[-1]
        if sky_q is not None and hasattr(self, "sky_log_w"):
            if q.device.type == "cpu":   # attention runs in fp32 on a CPU anyway (fm.attention): keep the channels
                q, k, v = q.float(), k.float(), v.float()
            q, k, v, bias = self._sky_locality(q, k, v, sky_q, sky_q if sky_k is None else sky_k)
        out = self.attend(q, k, v, mask, bias)[..., :d]                                      # (B, H, Nq, d)
        out = layout.pack(rearrange(out, "b h n d -> b n (h d)"))                             # (T, D)
        return self.drop(self.proj(out))

    def _sky_locality(self, q, k, v, sky_q, sky_k):
        """Add -w_h |x_q - x_k|^2 to the scores of pairs of sky tokens -> (q, k, v, bias).

        In fp32 it rides in extra head channels: q gains s_q w (2x, 2y, -1, -|x_q|^2) scaled
        by sqrt(D'), k gains s_k (x, y, |x_k|^2, 1), v zeros, padded to D' a multiple of 8
        (q's own channels scaled by sqrt(D'/d) keep q k / sqrt(d)), so their product is the
        term exactly and the fused kernels keep running: an additive float mask that needs a
        gradient sends SDPA to its math path (attention 2.5x slower at the demo shapes on
        CPU; the feature form 1.2x). In lower precision (bf16 autocast) the expansion would
        cancel terms of ~|x|^2 = 35 arcsec^2 to a precision of 0.5, so there it is the
        equivalent float bias (B, H, Nq, Nk)."""
        (qxy, q_on), (kxy, k_on) = sky_q, sky_k                         # (B, Nq, 2), (B, Nq); keys alike
        w = self.sky_log_w.exp()                                         # (H,)
        if q.dtype != torch.float32:
            d2 = ((qxy[:, :, None] - kxy[:, None]) ** 2).sum(-1) * (q_on[:, :, None] & k_on[:, None])
            return q, k, v, (-w[:, None, None] * d2[:, None]).to(q.dtype)    # (B, H, Nq, Nk)
        B, H, Nq, d = q.shape
        D = d + 4 + (-(d + 4)) % 8
        qf = torch.stack([2 * qxy[..., 0], 2 * qxy[..., 1], -torch.ones_like(qxy[..., 0]), -(qxy ** 2).sum(-1)],
                         -1) * q_on[..., None]                          # (B, Nq, 4)
        kf = torch.stack([kxy[..., 0], kxy[..., 1], (kxy ** 2).sum(-1), torch.ones_like(kxy[..., 0])],
                         -1) * k_on[..., None]                          # (B, Nk, 4)
        qf = w[None, :, None, None] * qf[:, None] * math.sqrt(D)         # (B, H, Nq, 4)
        kf = kf[:, None].expand(-1, H, -1, -1)                           # (B, H, Nk, 4)
        pad = D - d - 4
        q = torch.cat([q * math.sqrt(D / d), qf, q.new_zeros(B, H, Nq, pad)], -1)           # (B, H, Nq, D)
        k = torch.cat([k, kf, k.new_zeros(*k.shape[:3], pad)], -1)                         # (B, H, Nk, D)
        v = torch.cat([v, v.new_zeros(*v.shape[:3], D - d)], -1)                           # (B, H, Nk, D)
        return q, k, v, None


class Block(nn.Module):
    """Pre-norm transformer block over packed rows; with `cross=True` a cross-attention
    to the encoder output sits between self-attention and MLP."""

    def __init__(self, cfg: FMConfig, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.norm_cross = nn.LayerNorm(cfg.dim, bias=cfg.bias) if cross else None
        self.cross = Attention(cfg) if cross else None
        self.norm2 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, layout, mask, context=None, context_layout=None, context_mask=None,
                sky=None, context_sky=None):
        x = x + self.attn(self.norm1(x), layout, mask, sky_q=sky)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), layout, context_mask, context, context_layout,
                               sky if context_sky is not None else None, context_sky)
        return x + self.mlp(self.norm2(x))


class FourM(nn.Module):
    def __init__(self, config: FMConfig, table: ModalityTable):
        super().__init__()
        self.config, self.table = config, table
        D = config.dim
        self.tok_emb = nn.Embedding(table.total_vocab, D)       # every modality's ids, offset
        self.mod_emb = nn.Embedding(len(table), D)
        self.pos_emb = nn.Embedding(table.total_positions, D)   # per-modality positions, offset
        self.register_buffer("vocab_offsets", torch.tensor(table.vocab_offsets), persistent=False)
        self.register_buffer("position_offsets", torch.tensor(table.position_offsets), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.enc_depth))
        self.enc_norm = nn.LayerNorm(D, bias=config.bias)
        self.decoder = nn.ModuleList(Block(config, cross=True) for _ in range(config.dec_depth))
        self.dec_norm = nn.LayerNorm(D, bias=config.bias)
        self.heads = nn.ModuleList(nn.Linear(D, s.vocab_size, bias=config.bias) for s in table)
        self.sky = config.sky_positions and any(spec.cell_arcsec > 0 for spec in table)
        if self.sky:   # Fourier features of the cell centre's (x, y) offset in arcsec -> D
            self.register_buffer("cell_arcsec", torch.tensor([spec.cell_arcsec for spec in table]), persistent=False)
            self.register_buffer("grid_side", torch.tensor([max(spec.grid_side, 1) for spec in table]), persistent=False)
            self.register_buffer("grid_start", torch.tensor([spec.grid_start for spec in table]), persistent=False)
            self.register_buffer("sky_freqs", torch.tensor(SKY_FREQUENCIES), persistent=False)
            self.sky_pos = nn.Linear(4 * len(SKY_FREQUENCIES), D, bias=False)
        self.code = config.code_geometry and any(spec.code_segments for spec, _ in table.spaces)
        if self.code:   # rows and columns of features per distinct grid of each token space (fm.codes)
            kinds, blocks, r, c = {}, [], 0, 0
            pos_kind = torch.full((table.total_positions,), -1, dtype=torch.long)    # grid of each position
            for spec, _ in table.spaces:
                p = table.position_offsets[table.index(spec.key)]
                for n, levels in spec.code_segments:
                    if (spec.token_space, levels) not in kinds:
                        f = code_features(levels)                                      # (prod(levels), P_k)
                        kinds[(spec.token_space, levels)] = len(blocks)
                        blocks.append((r, len(f), c, c + f.shape[1], f))
                        r, c = r + len(f), c + f.shape[1]
                    pos_kind[p:p + n] = kinds[(spec.token_space, levels)]
                    p += n
            feats = torch.zeros(r, c)                                                  # (rows, P) block diagonal
            for r0, size, c0, c1, f in blocks:
                feats[r0:r0 + size, c0:c1] = f
            self.register_buffer("code_feats", feats, persistent=False)
            self.register_buffer("code_pos_kind", pos_kind, persistent=False)
            self.register_buffer("code_kind_row", torch.tensor([b[0] for b in blocks]), persistent=False)
            self.register_buffer("code_kind_size", torch.tensor([b[1] for b in blocks]), persistent=False)
            self.code_kinds = [b[:4] for b in blocks]                                  # (row0, size, col0, col1)
            self.code_mod_kinds = [sorted({int(k) for k in pos_kind[o:o + s.n_tokens] if k >= 0})
                                   for s, o in zip(table, table.position_offsets)]     # per modality
            self.code_mod_whole = [len(ks) == 1 and bool((pos_kind[o:o + s.n_tokens] >= 0).all())
                                   for ks, s, o in zip(self.code_mod_kinds, table, table.position_offsets)]
            self.code_in = nn.Linear(c, D, bias=False)      # features -> a term of the token embedding
            self.code_out = nn.Linear(D, c, bias=False)     # hidden -> a term of each head's logits
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) matrices and embeddings, zero biases, residual projections (`*.proj`)
        scaled by 1/sqrt(2 depth) as in GPT-2. One module at a time, each under
        `_gathered` so that parameters built partitioned (deepspeed.zero.Init, ZeRO-3) get
        the same values as plain ones."""
        depth = self.config.enc_depth + self.config.dec_depth
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            with _gathered(list(module.parameters(recurse=False))):
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.parameters())   # full size under ZeRO-3

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # -- the network ---------------------------------------------------------------------
    def _positions(self, mod, pos):
        """(T,) modality indices and positions -> (T, D) position embeddings: the learned
        row of the position, plus for sky modalities a learned map of Fourier features of
        the cell centre's offset from the stamp centre, x = (column - (side - 1) / 2) *
        cell_arcsec and y likewise from the row (row-major cells, as the image tokenizer
        flattens its grid). Demo budget, same data and seeds: translation chi2 3.34 with
        both, 5.07 with the learned rows alone, 7.04 with the sky features alone."""
        learned = self.pos_emb(pos + self.position_offsets[mod])
        if not self.sky:
            return learned
        xy, on_sky = self._sky_xy(mod, pos)                                        # (T, 2) arcsec, (T,)
        angle = 2 * math.pi * xy[..., None] * self.sky_freqs                       # (T, 2, F)
        feats = torch.cat([angle.sin(), angle.cos()], -1).flatten(1)               # (T, 4F)
        return learned + torch.where(on_sky[:, None], self.sky_pos(feats), 0.0)

    def _sky_xy(self, mod, pos):
        """Modality indices and positions (any shape) -> (offset of the cell centre from the
        stamp centre in arcsec (..., 2), whether the modality has sky geometry (...))."""
        cell, side = self.cell_arcsec[mod], self.grid_side[mod]
        half = (side - 1) / 2
        p = pos - self.grid_start[mod]                                             # cell index (< 0: off the grid)
        return torch.stack([(p % side - half) * cell, (p // side - half) * cell], -1), (cell > 0) & (p >= 0)

    def _sky_tokens(self, mod, pos):
        """(B, N) mod/pos -> (offsets (B, N, 2) arcsec, on-sky (B, N) bool) for sky
        attention; None without it."""
        if not (self.sky and self.config.sky_attention):
            return None
        return self._sky_xy(mod, pos)

    def _embed_tokens(self, ids, mod, pos):
        """Gathered (budgeted) real tokens (T,) -> (T, D): token + modality + position. With
        code geometry the token's term is its learned row plus a learned map of its code's
        Fourier features (fm.codes)."""
        tok = self.tok_emb(ids + self.vocab_offsets[mod])
        if self.code:   # the features of the id on its position's grid (none beyond the grid)
            kind = self.code_pos_kind[pos + self.position_offsets[mod]]                  # (T,)
            k = kind.clamp_min(0)
            on = (kind >= 0) & (ids < self.code_kind_size[k])
            tok = tok + self.code_in(self.code_feats[torch.where(on, self.code_kind_row[k] + ids, 0)] * on[:, None])
        return tok + self.mod_emb(mod) + self._positions(mod, pos)

    def _head_logits(self, m: int, h: torch.Tensor, g: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        """Modality m's logits (..., V_m) from hidden rows h (..., D) at token positions pos
        (...): its head, plus with code geometry, for the rows on each grid of the modality,
        g[:, grid's columns] @ features^T, g = code_out(h) (..., P): the logit of code k gains
        a smooth function of k's place on the grid, shared by the modalities of one token space."""
        logits = self.heads[m](h)
        if not self.code:
            return logits
        V = self.table.specs[m].vocab_size
        kind = None if self.code_mod_whole[m] else self.code_pos_kind[pos + self.table.position_offsets[m]]   # (...)
        for k in self.code_mod_kinds[m]:
            r0, size, c0, c1 = self.code_kinds[k]
            term = g[..., c0:c1] @ self.code_feats[r0:r0 + size, c0:c1].T                # (..., size)
            if not self.code_mod_whole[m]:                   # one grid everywhere (images, scalars): no select
                term = torch.where((kind == k)[..., None], term, 0.0)
            logits = logits + F.pad(term, (0, V - size))
        return logits

    def _queries(self, mod, pos):
        """Decoder queries (T,) -> (T, D): modality + position embeddings of the targets."""
        return self.mod_emb(mod) + self._positions(mod, pos)

    def _block(self, block, *args):
        if self.config.checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @staticmethod
    def _key_mask(pad):
        """pad (B, N) -> (B, 1, 1, N) keys that may be attended to, or None without padding."""
        return rearrange(~pad, "b n -> b 1 1 n") if bool(pad.any()) else None

    def _encode(self, ids, mod, pos, pad):
        """(B, N) ids/mod/pos/pad -> (normalised encoder output (T, D) of the T real
        tokens, their Layout). Only the real tokens are embedded and computed."""
        layout = Layout(pad)
        x = self.drop(self._embed_tokens(*(layout.pack(t) for t in (ids, mod, pos))))   # (T, D)
        mask = self._key_mask(pad)
        sky = self._sky_tokens(mod, pos)
        for block in self.encoder:
            x = self._block(block, x, layout, mask, None, None, None, sky)
        return self.enc_norm(x), layout

    def _decode(self, context, enc_layout, mod, pos, pad, enc_mod=None, enc_pos=None):
        """Decoder over targets (B, M) mod/pos/pad, cross-attending to the packed encoder
        output (whose tokens' (B, N) mod/pos place them on the sky for sky attention)
        -> ((T, D) of the real targets, their Layout)."""
        layout = Layout(pad)
        sky = self._sky_tokens(mod, pos)
        enc_sky = self._sky_tokens(enc_mod, enc_pos) if enc_mod is not None and sky is not None else None
        y = self.drop(self._queries(layout.pack(mod), layout.pack(pos)))                  # (T, D)
        same = rearrange(mod, "b m -> b m 1") == rearrange(mod, "b m -> b 1 m")           # (B, M, M)
        self_mask = rearrange(same & rearrange(~pad, "b m -> b 1 m"), "b q k -> b 1 q k")
        cross_mask = self._key_mask(enc_layout.pad)                                       # (B, 1, 1, N)
        for block in self.decoder:
            y = self._block(block, y, layout, self_mask, context, enc_layout, cross_mask, sky, enc_sky)
        return self.dec_norm(y), layout

    # -- training ------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]):
        """batch (from fm.data.collate): enc_ids/enc_mod/enc_pos/enc_pad (B, Nin),
        dec_mod/dec_pos/dec_targets/dec_pad (B, Ndec). Returns (loss, {key: loss}), where
        loss is the mean over the modalities present of their mean cross-entropy.
        Padding costs nothing: all-padding columns are trimmed and only the real tokens
        are embedded and run through the position-wise layers (fm.packing)."""
        enc_pad, *enc = trim(batch["enc_pad"], batch["enc_ids"], batch["enc_mod"], batch["enc_pos"])
        dec_pad, dec_mod, dec_pos, dec_targets = trim(batch["dec_pad"], batch["dec_mod"], batch["dec_pos"],
                                                      batch["dec_targets"])
        context, enc_layout = self._encode(*enc, enc_pad)
        h, layout = self._decode(context, enc_layout, dec_mod, dec_pos, dec_pad, enc[1], enc[2])   # (T, D)
        if not layout.tokens:
            raise ValueError("batch has no target tokens (every dec_pad is True)")
        mod, pos, targets = layout.pack(dec_mod), layout.pack(dec_pos), layout.pack(dec_targets)   # (T,)
        order = torch.argsort(mod, stable=True)                                           # grouped by modality
        counts = torch.bincount(mod, minlength=len(self.table)).tolist()
        h = h[order]
        g = self.code_out(h).split(counts) if self.code else [None] * len(counts)        # (T_m, P) each
        losses, unused = {}, h.new_zeros(())
        for m, (spec, hm, gm, pm, tm) in enumerate(zip(self.table, h.split(counts), g, pos[order].split(counts),
                                                       targets[order].split(counts))):
            logits = self._head_logits(m, hm, gm, pm)                                     # (T_m, V_m)
            if counts[m]:
                losses[spec.key] = F.cross_entropy(logits.float(), tm)
            else:  # keep every head in the graph (DDP / ZeRO expect a gradient for each)
                unused = unused + 0.0 * logits.sum()
        loss = torch.stack(list(losses.values())).mean() + unused
        return loss, losses

    # -- inference -----------------------------------------------------------------------
    def _pack_inputs(self, inputs: Mapping[str, torch.Tensor], batch: int | None = None):
        """{key: (B, n_key), -1 = not given} -> ids, mod, pos, pad (B, N), given tokens first."""
        unknown = sorted(set(inputs) - set(self.table.keys))
        if unknown:
            raise KeyError(f"input modalities {unknown} are not in the model; known: {self.table.keys}")
        ids, mods, poss = [], [], []
        for key in self.table.keys:
            if key not in inputs:
                continue
            spec, t = self.table[key], torch.as_tensor(inputs[key], device=self.device)
            if t.dim() != 2 or t.shape[1] != spec.n_tokens or (batch is not None and t.shape[0] != batch):
                raise ValueError(f"inputs[{key!r}]: expected shape ({batch or 'B'}, {spec.n_tokens}), got {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"inputs[{key!r}]: token ids must be integers, got {t.dtype}")
            if t.numel() and (t.min() < -1 or t.max() >= spec.vocab_size):
                raise ValueError(f"inputs[{key!r}]: ids must be in [-1, {spec.vocab_size}), got [{t.min()}, {t.max()}]")
            batch = t.shape[0]
            ids.append(t.long())
            mods.append(torch.full_like(ids[-1], self.table.index(key)))
            poss.append(torch.arange(spec.n_tokens, device=self.device).expand(batch, -1))
        if batch is None:
            raise ValueError("encode: no inputs given and no batch size to infer")
        if not ids:  # nothing given: one padding column, the encoder output is all masked
            z = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            return z, z, z, torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        ids, mod, pos = torch.cat(ids, 1), torch.cat(mods, 1), torch.cat(poss, 1)   # (B, N)
        given = ids >= 0
        order = torch.argsort((~given).to(torch.int8), dim=1, stable=True)          # given first
        ids, mod, pos, given = (t.gather(1, order) for t in (ids, mod, pos, given))
        n = max(int(given.sum(1).max()), 1)
        return ids[:, :n].clamp_min(0), mod[:, :n], pos[:, :n], ~given[:, :n]

    def encode(self, inputs: Mapping[str, torch.Tensor]):
        """-> (emb (B, N, D) encoder output, pad (B, N) True where nothing was given)."""
        ids, mod, pos, pad = self._pack_inputs(inputs)
        emb, layout = self._encode(ids, mod, pos, pad)
        return layout.unpack(emb), pad

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the encoder output over the given tokens: (B, D); zeros where none given."""
        emb, pad = self.encode(inputs)
        w = rearrange((~pad).to(emb.dtype), "b n -> b n 1")
        return (emb * w).sum(1) / w.sum(1).clamp_min(1.0)

    def logits(self, inputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]):
        """targets {key: LongTensor (B, m) positions to predict} -> {key: (B, m, V_key)}."""
        if not targets:
            raise ValueError("logits: no targets given")
        mods, poss, sizes = [], [], []
        batch = None
        for key, positions in targets.items():
            spec = self.table[key]
            p = torch.as_tensor(positions, device=self.device).long()
            if p.dim() != 2 or (batch is not None and p.shape[0] != batch):
                raise ValueError(f"targets[{key!r}]: expected positions of shape (B, m), got {tuple(p.shape)}")
            if p.numel() and (p.min() < 0 or p.max() >= spec.n_tokens):
                raise ValueError(f"targets[{key!r}]: positions must be in [0, {spec.n_tokens})")
            batch = p.shape[0]
            poss.append(p)
            mods.append(torch.full_like(p, self.table.index(key)))
            sizes.append(p.shape[1])
        ids, emod, epos, epad = self._pack_inputs(inputs, batch)
        context, enc_layout = self._encode(ids, emod, epos, epad)
        mod, pos = torch.cat(mods, 1), torch.cat(poss, 1)                  # (B, M)
        h, layout = self._decode(context, enc_layout, mod, pos, torch.zeros_like(mod, dtype=torch.bool), emod, epos)
        h = layout.unpack(h)                                                # (B, M, D)
        g = self.code_out(h).split(sizes, dim=1) if self.code else [None] * len(sizes)
        out = {}
        for key, hk, gk, pk in zip(targets, h.split(sizes, dim=1), g, poss):   # (B, m, D) each
            out[key] = self._head_logits(self.table.index(key), hk, gk, pk)       # (B, m, V_key)
        return out

    # -- saving --------------------------------------------------------------------------
    def save(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """dir/config.json ({"fm": FMConfig, "modalities": table}) + dir/model.safetensors.
        `state_dict` overrides the module's own (e.g. parameters gathered from ZeRO-3)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
        cfg = {"fm": to_dict(self.config), "modalities": self.table.to_dict()}
        (d / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu",
                        attention: str | None = None) -> "FourM":
        """Load a saved model; `attention` swaps the backend (e.g. 'sdpa' for an xformers
        model on a CPU)."""
        d = Path(directory)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d}: no config.json (not a saved FourM)")
        cfg = json.loads((d / "config.json").read_text())
        if attention is not None:
            cfg["fm"]["attention"] = attention
        cfg["fm"].setdefault("code_geometry", False)   # models saved before it have no code_in/out
        model = cls(from_dict(FMConfig, cfg["fm"]), ModalityTable.from_dict(cfg["modalities"]))
        model.load_state_dict(load_file(str(d / "model.safetensors"), device=map_location))
        return model.to(map_location).eval()
