"""1-D spectra on any wavelength grid -> a flux-scale token + FSQ tokens, one model for
every instrument.

    tok = SpectrumTokenizer(SpectrumConfig())       # tiny: 2048 px / 16 -> 1 + 128 tokens
    ids = tok.encode(sdss_spectra)                  # list of Spectrum -> (B, 129)
    [desi] = tok.decode(ids[:1], like=desi_template)   # Spectrum on exactly like.wavelength
    loss, metrics = tok.training_loss(spectra)      # chi-square on the internal grid

Native grid in. Each spectrum is rebinned onto one internal grid, uniform in ln(lambda)
from lambda_min to lambda_max with n_pixels pixels, by inverse-variance-weighted
rebinning: internal pixel i gets f_i = sum_j M_ij w_j f_j / sum_j M_ij w_j, where M_ij
is the fraction of native pixel j inside pixel i and w_j its ivar (0 where masked), and
ivar_i = sum_j M_ij w_j: each native pixel's information is shared among the internal
pixels it overlaps, so the total is conserved (as desispec's resample_flux does; the
marginal variance of f_i would double-count pixels split between neighbours). Native
pixels whose centre lies outside [lambda_min, lambda_max] are masked and counted
(`n_out_of_range`), or refused with an error naming the object and field when
`out_of_range='error'`; a spectrum with no usable pixel inside the range is always refused.

Flux scale. scale = the ivar-weighted median of |f| on the internal grid; log10(scale)
is quantised uniformly over [log_scale_min, log_scale_max] into the vocabulary, and
that id is token 0. The network sees and predicts y = f / scale_q (the quantised scale,
so decode multiplies back exactly what encode divided by).

Network. Conv1d encoder (input channels: arcsinh(y), good-pixel flag, log resolving
power; `patch` pixels folded into channels first), FSQ on n_pixels / downsample
positions, mirrored decoder back to the internal grid. Resolution conditioning
(`condition_resolution`): the decoder's last layers also see log(R) of the *target*
(`like.resolution`, resampled onto the internal grid), so the same tokens can be
decoded at the line-spread of another instrument. It only learns to
use this where the training data hold one object at several resolutions; with one
record per object it mostly learns R as a property of the input. The decoded internal
spectrum is linearly interpolated (in ln lambda) onto `like.wavelength`; target pixels
outside [lambda_min, lambda_max] come back masked (or refused with out_of_range='error').

Loss: reduced chi-square on the internal grid, sum w (y_hat - y)^2 / n_good, with
w = ivar * scale_q^2 capped at 1 / min_sigma^2 (no pixel claims a precision better
than min_sigma in units of the scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse
import torch
from einops import rearrange
from torch import nn

from ..shards.schema import RecordError, Spectrum
from .base import Tokenizer, as_list, register_tokenizer
from .layers import Downsample, ResBlock, Upsample, conv, norm, pyramid_halvings
from .quantizer import FSQuantizer

R_REF = 3000.0   # resolving power that maps to 0 in the log-resolution channel


@dataclass
class SpectrumConfig:
    lambda_min: float = 3500.0        # internal grid, vacuum Angstrom
    lambda_max: float = 10000.0
    n_pixels: int = 2048              # internal pixels, uniform in ln(lambda)
    downsample: int = 16              # internal pixels per FSQ token, a power of two
    patch: int = 4                    # pixels folded into channels at the stem (<= downsample)
    levels: tuple[int, ...] = (8, 5, 5, 5)    # FSQ levels: vocab = their product
    channels: int = 32                # width at full resolution; doubles per halving ...
    hidden: int = 64                  # ... up to this width
    head: int = 8                     # width of the full-resolution output head
    log_scale_min: float = -3.0       # log10 flux-scale range of token 0, 1e-17 erg/s/cm^2/A
    log_scale_max: float = 4.0
    min_sigma: float = 0.01           # floor on a pixel's sigma in units of the scale
    out_of_range: str = "mask"        # native pixels outside the grid: 'mask' (counted) | 'error'
    condition_resolution: bool = True  # decoder sees the target's log resolving power


@lru_cache(maxsize=32)
def _rebin_matrix(native_ln: bytes, ln_min: float, ln_max: float,
                  n: int) -> scipy.sparse.csr_matrix:
    """(n, L) sparse M: M_ij = fraction of native pixel j inside internal pixel i."""
    ln_wl = np.frombuffer(native_ln, dtype=np.float64)                  # (L,)
    mid = 0.5 * (ln_wl[1:] + ln_wl[:-1])
    edges = np.concatenate([[2 * ln_wl[0] - mid[0]], mid, [2 * ln_wl[-1] - mid[-1]]])  # (L+1,)
    u = (edges - ln_min) / (ln_max - ln_min) * n                       # in internal-pixel units
    lo, hi = u[:-1], u[1:]                                              # (L,)
    span = int(np.ceil((hi - lo).max())) + 1
    rows, cols, vals = [], [], []
    for k in range(span + 1):
        i = np.floor(lo).astype(np.int64) + k                           # (L,) candidate pixel
        overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None) / (hi - lo)
        ok = (overlap > 0) & (i >= 0) & (i < n)
        rows.append(i[ok]); cols.append(np.flatnonzero(ok)); vals.append(overlap[ok])
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n, len(ln_wl)))


def weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cw = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cw, 0.5 * cw[-1])])


def _template_ivar(ivar: np.ndarray, wavelength: np.ndarray) -> np.ndarray:
    """The template's ivar (L,) if its shape matches, else ones; a pixel the template lacks
    (ivar 0, masked) gets the ivar interpolated from its unmasked neighbours."""
    ivar = np.asarray(ivar, dtype=np.float32)
    if ivar.shape != wavelength.shape:
        return np.ones(wavelength.shape, dtype=np.float32)
    ok = np.isfinite(ivar) & (ivar > 0)
    if not ok.any():
        return np.ones(wavelength.shape, dtype=np.float32)
    out = ivar.copy()
    out[~ok] = np.interp(wavelength[~ok], wavelength[ok], ivar[ok])
    return out


@register_tokenizer
class SpectrumTokenizer(Tokenizer):
    Config = SpectrumConfig
    kind = "spectrum"

    def __init__(self, config: SpectrumConfig):
        super().__init__(config)
        c = config
        halvings = pyramid_halvings("SpectrumConfig", c.n_pixels, c.downsample, c.patch)
        if not 0 < c.lambda_min < c.lambda_max:
            raise ValueError(f"SpectrumConfig: need 0 < lambda_min < lambda_max, got {c.lambda_min}, {c.lambda_max}")
        if not c.log_scale_min < c.log_scale_max or not c.min_sigma > 0:
            raise ValueError(f"SpectrumConfig: need log_scale_min < log_scale_max and min_sigma > 0; got {c}")
        if c.out_of_range not in ("mask", "error"):
            raise ValueError(f"SpectrumConfig.out_of_range must be 'mask' or 'error', got {c.out_of_range!r}")
        self.ln_min, self.ln_max = float(np.log(c.lambda_min)), float(np.log(c.lambda_max))
        ln_edges = np.linspace(self.ln_min, self.ln_max, c.n_pixels + 1)
        self.ln_centres = 0.5 * (ln_edges[1:] + ln_edges[:-1])           # (n,) internal grid
        self.n_out_of_range = 0                                          # native pixels masked so far
        widths = [min(c.channels * 2 ** k, c.hidden) for k in range(halvings + 1)]
        self.quantizer = FSQuantizer(c.levels)
        enc = [conv(1, 3 * c.patch, widths[0]), ResBlock(widths[0], 1)]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [Downsample(a, b, 1), ResBlock(b, 1)]
        enc += [norm(widths[-1]), nn.GELU(), conv(1, widths[-1], self.quantizer.dim, kernel=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [conv(1, self.quantizer.dim, widths[-1]), ResBlock(widths[-1], 1)]
        for a, b in zip(widths[:0:-1], widths[-2::-1]):
            dec += [Upsample(a, b, 1), ResBlock(b, 1)]
        dec += [norm(widths[0]), nn.GELU(), conv(1, widths[0], c.head * c.patch, kernel=1)]
        self.decoder = nn.Sequential(*dec)
        extra = 1 if c.condition_resolution else 0
        self.head = nn.Sequential(nn.GELU(), conv(1, c.head + extra, c.head), nn.GELU(),
                                  conv(1, c.head, 1, kernel=1))

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    @property
    def n_tokens(self) -> int:
        return 1 + self.config.n_pixels // self.config.downsample

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def wavelength(self) -> np.ndarray:
        """(n_pixels,) internal grid centres, Angstrom."""
        return np.exp(self.ln_centres)

    # -- flux scale token ----------------------------------------------------------------
    def scale_token(self, scale: np.ndarray) -> np.ndarray:
        c, V = self.config, self.vocab_size
        u = (np.log10(np.maximum(scale, 10 ** c.log_scale_min)) - c.log_scale_min) / (c.log_scale_max - c.log_scale_min)
        return np.clip(np.floor(u * V), 0, V - 1).astype(np.int64)

    def scale_value(self, token: np.ndarray) -> np.ndarray:
        c, V = self.config, self.vocab_size
        return 10 ** (c.log_scale_min + (np.asarray(token) + 0.5) / V * (c.log_scale_max - c.log_scale_min))

    # -- records <-> internal grid ------------------------------------------------------
    def _log_resolution(self, rec: Spectrum) -> np.ndarray:
        """(n,) log(R / R_REF) of `rec` interpolated onto the internal grid."""
        R = np.asarray(rec.resolution, dtype=np.float64)
        R = np.where(np.isfinite(R) & (R > 0), R, R_REF)
        return np.log(np.interp(self.ln_centres, np.log(rec.wavelength), R) / R_REF).astype(np.float32)

    def rebin(self, rec: Spectrum) -> tuple[np.ndarray, np.ndarray]:
        """A Spectrum -> (flux, ivar) on the internal grid, each (n_pixels,); ivar 0 = no data."""
        if not isinstance(rec, Spectrum):
            raise TypeError(f"SpectrumTokenizer: expected a Spectrum record, got {type(rec).__name__}")
        rec.validate()
        c, oid = self.config, rec.object_id
        wl = np.asarray(rec.wavelength, dtype=np.float64)
        good = ~rec.mask & (rec.ivar > 0)
        outside = (wl < c.lambda_min) | (wl > c.lambda_max)
        n_out = int((good & outside).sum())
        if n_out and c.out_of_range == "error":
            raise RecordError(
                f"object {oid!r}: field 'spectrum.wavelength': {n_out} unmasked pixel(s) outside the "
                f"supported range [{c.lambda_min:g}, {c.lambda_max:g}] A (spectrum covers {wl[0]:.1f}-"
                f"{wl[-1]:.1f} A); mask them, or use out_of_range='mask' or a wider lambda range")
        good &= ~outside
        if not good.any():
            raise RecordError(
                f"object {oid!r}: field 'spectrum.wavelength': no unmasked pixel inside the supported "
                f"range [{c.lambda_min:g}, {c.lambda_max:g}] A (spectrum covers {wl[0]:.1f}-{wl[-1]:.1f} A;"
                " wavelengths must be vacuum Angstrom)")
        self.n_out_of_range += n_out
        ln_wl = np.log(wl)
        M = _rebin_matrix(ln_wl.tobytes(), self.ln_min, self.ln_max, c.n_pixels)
        w = np.where(good, rec.ivar, 0.0).astype(np.float64)
        f = np.where(good, rec.flux, 0.0).astype(np.float64)
        den = M @ w                                                      # (n,)
        has = den > 0
        flux = np.where(has, (M @ (w * f)) / np.where(has, den, 1), 0.0)
        ivar = den                              # each native pixel's ivar split by overlap fraction
        return flux.astype(np.float32), ivar.astype(np.float32)

    def _prepare(self, records: list) -> dict[str, torch.Tensor]:
        """y = f / scale_q, its weight w, good flag, log-resolution (B, n); scale tokens (B,)."""
        rows = [self.rebin(r) for r in records]
        flux = np.stack([f for f, _ in rows])                            # (B, n)
        ivar = np.stack([iv for _, iv in rows])                          # (B, n)
        good = ivar > 0
        scale = np.array([weighted_median(np.abs(f[g]), iv[g]) for f, iv, g in zip(flux, ivar, good)])
        token = self.scale_token(scale)                                  # (B,)
        scale_q = self.scale_value(token)[:, None].astype(np.float32)    # (B, 1)
        y = flux / scale_q
        w = np.where(good, np.minimum(ivar * scale_q ** 2, self.config.min_sigma ** -2), 0.0)
        log_r = np.stack([self._log_resolution(r) for r in records])     # (B, n)
        device = self.device
        t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)
        return dict(y=t(y), w=t(w), good=t(good, torch.bool), log_r=t(log_r), token=t(token, torch.long))

    # -- the network -------------------------------------------------------------------
    def encode_latent(self, y: torch.Tensor, good: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
        """y, good, log_r (B, n) -> latent (B, d, n / downsample)."""
        x = torch.where(good, torch.asinh(y), torch.zeros_like(y))
        inp = torch.stack([x, good.float(), log_r], dim=1)               # (B, 3, n)
        inp = rearrange(inp, "b k (l p) -> b (k p) l", p=self.config.patch)   # (B, 3p, n/p)
        return self.encoder(inp)

    def decode_latent(self, z_q: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
        """z_q (B, d, n / downsample), target log_r (B, n) -> y_hat (B, n)."""
        h = self.decoder(z_q)                                            # (B, K p, n/p)
        h = rearrange(h, "b (k p) l -> b k (l p)", p=self.config.patch)   # (B, K, n)
        if self.config.condition_resolution:
            h = torch.cat([h, log_r[:, None]], dim=1)                    # (B, K + 1, n)
        return self.head(h)[:, 0]                                        # (B, n)

    # -- the contract ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, records) -> torch.LongTensor:
        """One Spectrum or a list (any wavelength grid) -> (B, 1 + n_pixels / downsample)."""
        batch = self._prepare(as_list(records))
        _, ids, _ = self.quantizer(self.encode_latent(batch["y"], batch["good"], batch["log_r"]))
        return torch.cat([batch["token"][:, None], ids], dim=1)          # (B, n_tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, like) -> list[Spectrum]:
        """(B, n_tokens) ids -> Spectra on exactly `like.wavelength`, with its instrument and
        resolution (one template for all rows, or one per row). ivar is copied from the
        template where its shape matches (its masked pixels get ivar interpolated from
        their neighbours), else ones. Target pixels outside [lambda_min,
        lambda_max] come back masked (flux 0, ivar 0), or are refused when out_of_range='error';
        every other pixel has mask False."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ValueError(f"SpectrumTokenizer.decode: expected tokens (B, {self.n_tokens}), got {tuple(tokens.shape)}")
        likes = as_list(like)
        if len(likes) == 1:
            likes = likes * len(tokens)
        if len(likes) != len(tokens):
            raise ValueError(f"SpectrumTokenizer.decode: {len(likes)} templates for {len(tokens)} rows")
        c = self.config
        for t in likes:
            if not isinstance(t, Spectrum):
                raise TypeError(f"SpectrumTokenizer.decode: like must be Spectrum records, got {type(t).__name__}")
            wl = np.asarray(t.wavelength)
            if wl.ndim != 1 or len(wl) < 2 or not np.all(np.diff(wl) > 0):
                raise RecordError(f"object {t.object_id!r}: field 'spectrum.wavelength': need a strictly "
                                  "increasing 1-D grid to decode onto")
            if c.out_of_range == "error" and (wl[0] < c.lambda_min or wl[-1] > c.lambda_max):
                raise RecordError(f"object {t.object_id!r}: field 'spectrum.wavelength': target grid "
                                  f"{wl[0]:.1f}-{wl[-1]:.1f} A reaches outside the decodable range "
                                  f"[{c.lambda_min:g}, {c.lambda_max:g}] A")
            if np.asarray(t.resolution).shape != wl.shape:
                raise RecordError(f"object {t.object_id!r}: field 'spectrum.resolution': shape "
                                  f"{np.asarray(t.resolution).shape} != wavelength {wl.shape}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"SpectrumTokenizer.decode: token ids must lie in [0, {self.vocab_size})")
        device = self.device
        log_r = torch.as_tensor(np.stack([self._log_resolution(t) for t in likes]), device=device)
        z_q = self.quantizer.codes(tokens[:, 1:].to(device), (self.n_tokens - 1,))   # (B, d, n / ds)
        y_hat = self.decode_latent(z_q, log_r).cpu().numpy().astype(np.float64)     # (B, n)
        scale = self.scale_value(tokens[:, 0].cpu().numpy())                         # (B,)
        out = []
        for b, t in enumerate(likes):
            wl = np.asarray(t.wavelength, dtype=np.float64)
            outside = (wl < c.lambda_min) | (wl > c.lambda_max)             # masked: nothing decoded there
            flux = np.interp(np.log(wl), self.ln_centres, y_hat[b]) * scale[b]
            flux = np.where(outside, 0.0, flux).astype(np.float32)
            ivar = _template_ivar(t.ivar, wl)
            ivar[outside] = 0.0
            out.append(Spectrum(flux=flux, ivar=ivar, mask=outside,
                                wavelength=wl.copy(), instrument=t.instrument,
                                resolution=np.asarray(t.resolution, dtype=np.float32).copy(),
                                object_id=t.object_id))
        return out

    def training_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        """Reduced chi-square of the reconstruction on the internal grid (+ FSQ aux, 0)."""
        batch = self._prepare(as_list(records))
        z_q, ids, aux = self.quantizer(self.encode_latent(batch["y"], batch["good"], batch["log_r"]))
        y_hat = self.decode_latent(z_q, batch["log_r"])                  # (B, n)
        chi2 = (batch["w"] * (y_hat - batch["y"]) ** 2).sum() / batch["good"].sum().clamp_min(1)
        return chi2 + aux, {"recon": float(chi2.detach()), **self.quantizer.usage(ids),
                            "scale_tokens_used": float(len(torch.unique(batch["token"])))}

    @torch.no_grad()
    def reduced_chi2(self, records) -> np.ndarray:
        """(B,) chi-square per unmasked in-range native pixel of each record's encode -> decode
        round trip, on the record's own grid with its own ivar."""
        records = as_list(records)
        decoded = self.decode(self.encode(records), like=records)
        c, out = self.config, []
        for r, d in zip(records, decoded):
            ok = ~r.mask & (r.ivar > 0) & (r.wavelength >= c.lambda_min) & (r.wavelength <= c.lambda_max)
            out.append(float((r.ivar * (np.where(ok, r.flux, 0) - d.flux) ** 2)[ok].sum() / max(ok.sum(), 1)))
        return np.array(out)
