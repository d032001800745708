"""1-D spectra on any wavelength grid -> a flux-scale token + FSQ tokens, one model for
every instrument; decoded onto any wavelength grid at any resolution.

    tok = SpectrumTokenizer(SpectrumConfig())       # 2048 px / 32 -> 1 + 64 tokens (+ 3 per line slot)
    tok.wavelength_range                            # (3500.0, 10500.0) A: SDSS, BOSS, DESI
    ids = tok.encode(sdss_spectra)                  # Spectrum or list of them -> (B, 65)
    [desi] = tok.decode(ids[:1], like=desi_template)   # on like.wavelength, at like.resolution
    loss, metrics = tok.training_loss(spectra)      # ivar-weighted chi-square
    tok.reduced_chi2(spectra, truth=None)           # (B,) round trip on each record's own grid

Units: flux and ivar as in `shards.schema.Spectrum` (1e-17 erg/s/cm^2/A and its inverse
square), vacuum Angstrom, R = lambda / FWHM.

Native grid in. Each spectrum is rebinned onto one internal grid, uniform in ln(lambda)
from lambda_min to lambda_max with n_pixels pixels, by inverse-variance-weighted
rebinning: internal pixel i gets f_i = sum_j M_ij w_j f_j / sum_j M_ij w_j, where M_ij
is the fraction of native pixel j inside pixel i and w_j its ivar (0 where masked), and
ivar_i = sum_j M_ij w_j: each native pixel's information is shared among the internal
pixels it overlaps, so the total is conserved (as desispec's resample_flux does).

Supported range. `wavelength_range` = (lambda_min, lambda_max); the default 3500-10500 A
covers SDSS (3800-9200), BOSS (3600-10400) and DESI (3600-9824). Unmasked native pixels
outside it are masked, counted (`n_out_of_range`) and reported in a warning naming the
object, or refused with a RecordError naming the object and field when
out_of_range='error'; a spectrum with no usable pixel inside the range is always refused.

Flux scale (token 0). scale = the ivar-weighted median of |f| on the internal grid;
log10(scale) is quantised into `scale_bins` uniform bins over [log_scale_min,
log_scale_max] (default 128 bins of 0.055 dex: coarse, so that a generative model
predicts it easily, the within-bin remainder, at most +-6.5 %, left to the shape tokens;
they did not carry it well, leaving the held-out SDSS-like spectra a few % off in scale,
so spectrum-tiny.yaml uses 1,000 bins of 0.007 dex: chi2 against the truth 0.0052 against
0.0063, and the tiny FM's super-resolution no worse). The network sees and predicts
y = f / scale_q with the quantised scale, so decode multiplies back exactly what encode
divided by.

Network. Conv1d encoder (input channels: arcsinh(y), good-pixel flag, log resolving
power of the input; `patch` pixels folded into channels first), FSQ on
n_pixels / downsample positions, mirrored decoder back to the internal grid.

Line spread and decode (a forward model, as in Melchior et al. 2022's spender). The
decoder's output is the spectrum at the model's own resolution, `model_resolution` =
1 / (2 d ln lambda) (a Gaussian line spread of FWHM two internal pixels). To produce an
observation, it is (1) broadened by a Gaussian of sigma^2 = sigma_R^2 - sigma_model^2 in
ln lambda, with sigma_R = 1 / (2.3548 R) from the target's resolving power at each
wavelength, then (2) resampled flux-conservingly onto the target pixels (the mean of the
piecewise-linear spectrum over each target pixel; see resample.py). Training applies (1)
with the *input's* R, so the tokens describe the spectrum before the instrument's line
spread and one set of tokens decodes at SDSS's or DESI's resolution alike: the
super-resolution path. Asking for R above `model_resolution` gives lines no sharper than
the model's (the tiny grid's R is ~950; spectrum-base's ~7500).

Emission lines (`line_slots` > 0; lines.py). The conv tokens learn narrow lines slowly
(a 30-sigma H-alpha kept at 0-2 % after the tiny config's training), so encode fits what
their decode misses with up to `line_slots` Gaussian lines (matching pursuit against the
input's ivar and line spread) and appends 3 tokens per line: position on a quarter-pixel
grid, flux, velocity dispersion. Decode integrates each line over the target's own pixels
at the target's own resolution. Round trip on 200 held-out simulated DESI-like spectra
(demo tokenizer, 8 slots, min_snr 4): H-alpha line flux 0.98 of the truth (|error| median
0.08) against 0.00 without the line tokens; H-beta 0.91, [OII] 1.00; chi-square against the
truth 0.0124 (0.0132 without).

Loss: reduced chi-square on the internal grid, sum w (y_hat - y)^2 / n_good, with
w = ivar * scale_q^2 capped at 1 / min_sigma^2 (no pixel claims a precision better
than min_sigma in units of the scale). With `blind_spot` = p > 0 (training only), a
random fraction p of the `patch`-pixel blocks is hidden from the encoder (flagged as
no data) and the loss counts the hidden blocks alone (Noise2Self, Batson & Royer 2019):
a pixel's own noise can then never lower its loss, so the tokens spend no bits on noise
and the decoder learns the expected noiseless spectrum. Measured on the simulated sky
(launch/tokenizers/spectrum-tiny.yaml, 450 steps): blind_spot 0.3 lowers the held-out
SDSS-like chi-square against the truth from 0.017 to 0.011 (DESI-like 0.021 -> 0.023)
at the cost of fitting less of the noise (chi-square against the input 0.99 -> 1.00), and
does worse on bright real spectra; it is off by default. At 4,000 steps without it the
tokens fit the noise (SDSS-like 0.020 against the truth), so spectrum-tiny.yaml trains with
0.15 (bench/RESULTS.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ..shards.schema import RecordError, Spectrum
from .base import Tokenizer, as_list, register_tokenizer
from .layers import Downsample, ResBlock, Upsample, conv, norm, pyramid_halvings
from .lines import SUB, LineCodec
from .quantizer import FSQuantizer
from .resample import gaussian_broaden, pixel_edges, rebin_matrix, resample_matrix

R_REF = 3000.0          # resolving power that maps to 0 in the log-resolution input channel
FWHM_PER_SIGMA = 2.3548


@dataclass
class SpectrumConfig:
    lambda_min: float = 3500.0        # internal grid and supported range, vacuum Angstrom
    lambda_max: float = 10500.0
    n_pixels: int = 2048              # internal pixels, uniform in ln(lambda)
    downsample: int = 32              # internal pixels per FSQ token, a power of two
    patch: int = 4                    # pixels folded into channels at the stem (<= downsample)
    levels: tuple[int, ...] = (8, 5, 5, 5)    # FSQ levels: vocab = their product
    fsq_entropy_weight: float = 0.0   # weight of FSQ's code-usage entropy term (tokenizers.quantizer)
    channels: int = 32                # width at full resolution; doubles per halving ...
    hidden: int = 96                  # ... up to this width
    head: int = 8                     # width of the full-resolution output head
    scale_bins: int = 128             # flux-scale token ids 0 .. scale_bins - 1 (<= vocab)
    log_scale_min: float = -3.0       # log10 flux-scale range of token 0, 1e-17 erg/s/cm^2/A
    log_scale_max: float = 4.0
    min_sigma: float = 0.01           # floor on a pixel's sigma in units of the scale
    out_of_range: str = "mask"        # native pixels outside the range: 'mask' (warned, counted) | 'error'
    line_spread: bool = True          # decode/training broaden by the target's/input's resolution
    blind_spot: float = 0.0           # training: fraction of patches hidden from the encoder and scored alone
    line_slots: int = 0               # emission lines coded explicitly, 3 tokens each (lines.py; 0 = none)
    line_width_bins: int = 16         # velocity-dispersion bins, 10-1000 km/s
    line_amp_bins: int = 125          # log10 line-flux bins ...
    line_log_amp_min: float = -2.0    # ... over this range, in units of the flux scale x internal pixels
    line_log_amp_max: float = 3.0
    line_min_snr: float = 5.0         # a line is coded when its matched-filter significance reaches this


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
    decodes_expected = True
    shared_vocabulary = True   # one latent space for every survey / grid: token i means the same

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
        self.quantizer = FSQuantizer(c.levels, c.fsq_entropy_weight)
        if not 2 <= c.scale_bins <= self.quantizer.vocab_size:
            raise ValueError(f"SpectrumConfig.scale_bins must lie in [2, vocab {self.quantizer.vocab_size}], "
                             f"got {c.scale_bins}")
        if c.line_slots < 0:
            raise ValueError(f"SpectrumConfig.line_slots must be >= 0, got {c.line_slots}")
        self.ln_min, self.ln_max = float(np.log(c.lambda_min)), float(np.log(c.lambda_max))
        self.dln = (self.ln_max - self.ln_min) / c.n_pixels
        self.lines = LineCodec(c.n_pixels, self.dln, c.line_slots, self.quantizer.vocab_size, c.line_amp_bins,
                               c.line_width_bins, c.line_min_snr, c.line_log_amp_min,
                               c.line_log_amp_max) if c.line_slots else None
        self.ln_centres = self.ln_min + self.dln * (np.arange(c.n_pixels) + 0.5)   # (n,) internal grid
        self.n_out_of_range = 0                                          # native pixels masked so far
        widths = [min(c.channels * 2 ** k, c.hidden) for k in range(halvings + 1)]
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
        self.head = nn.Sequential(nn.GELU(), conv(1, c.head, c.head), nn.GELU(), conv(1, c.head, 1, kernel=1))

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    @property
    def code_levels(self) -> tuple[int, ...]:
        """FSQ's levels. Token 0 (the flux-scale bin) shares the ids, not their meaning: the
        FM's learned rows and positions carry it."""
        return tuple(self.quantizer.levels)

    @property
    def code_segments(self) -> tuple:
        """Token 0 on the flux-scale bins' 1-D grid, the FSQ codes on FSQ's, each line's
        three tokens on theirs (lines.py)."""
        segs = ((1, (self.config.scale_bins,)), (self.n_shape_tokens, self.code_levels))
        return segs + (self.lines.code_segments if self.lines is not None else ())

    @property
    def n_tokens(self) -> int:
        return 1 + self.n_shape_tokens + 3 * self.config.line_slots

    @property
    def n_shape_tokens(self) -> int:
        """The conv (FSQ) tokens, after the flux-scale token and before the line tokens."""
        return self.config.n_pixels // self.config.downsample

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def wavelength(self) -> np.ndarray:
        """(n_pixels,) internal grid centres, Angstrom."""
        return np.exp(self.ln_centres)

    @property
    def wavelength_range(self) -> tuple[float, float]:
        """(lambda_min, lambda_max) vacuum Angstrom: what encode reads and decode writes."""
        return float(self.config.lambda_min), float(self.config.lambda_max)

    @property
    def model_resolution(self) -> float:
        """Resolving power of the decoder's output (FWHM = two internal pixels): the
        sharpest line spread decode can honour."""
        return 1.0 / (2.0 * self.dln)

    # -- flux scale token ----------------------------------------------------------------
    def allowed_ids(self) -> torch.Tensor:
        """(n_tokens, vocab_size): token 0 is the flux scale, which has `scale_bins` values;
        the line tokens (if any) take the ranges of lines.py."""
        allowed = super().allowed_ids()
        allowed[0, self.config.scale_bins:] = False
        if self.lines is not None:
            allowed[1 + self.n_shape_tokens:] = self.lines.allowed(self.vocab_size)
        return allowed

    def scale_token(self, scale: np.ndarray) -> np.ndarray:
        """(B,) flux scales, 1e-17 erg/s/cm^2/A -> (B,) token ids in [0, scale_bins)."""
        c = self.config
        u = (np.log10(np.maximum(scale, 10 ** c.log_scale_min)) - c.log_scale_min) / (c.log_scale_max - c.log_scale_min)
        return np.clip(np.floor(u * c.scale_bins), 0, c.scale_bins - 1).astype(np.int64)

    def scale_value(self, token: np.ndarray) -> np.ndarray:
        """(B,) token ids -> (B,) quantised flux scales (bin centres in log10)."""
        c = self.config
        t = np.clip(np.asarray(token), 0, c.scale_bins - 1)
        return 10 ** (c.log_scale_min + (t + 0.5) / c.scale_bins * (c.log_scale_max - c.log_scale_min))

    # -- records <-> internal grid ------------------------------------------------------
    def _resolution(self, rec: Spectrum) -> np.ndarray:
        """(n,) resolving power of `rec` interpolated onto the internal grid (R_REF where unset)."""
        R = np.asarray(rec.resolution, dtype=np.float64)
        R = np.where(np.isfinite(R) & (R > 0), R, R_REF)
        return np.interp(self.ln_centres, np.log(rec.wavelength), R)

    def line_spread_px(self, resolution: np.ndarray) -> np.ndarray:
        """(..., n) resolving power on the internal grid -> Gaussian sigma (internal pixels)
        that takes the model's output to that resolution (0 where R >= model_resolution)."""
        s_target = 1.0 / (FWHM_PER_SIGMA * np.asarray(resolution, dtype=np.float64))
        s_model = 1.0 / (FWHM_PER_SIGMA * self.model_resolution)
        return np.sqrt(np.clip(s_target ** 2 - s_model ** 2, 0, None)) / self.dln

    def lsf_px(self, resolution: np.ndarray) -> np.ndarray:
        """(..., n) resolving power -> the instrument's Gaussian line-spread sigma in internal
        pixels (what an unresolved emission line looks like; lines.py)."""
        return 1.0 / (FWHM_PER_SIGMA * np.asarray(resolution, dtype=np.float64) * self.dln)

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
        where = (f"{n_out} unmasked pixel(s) outside the supported range [{c.lambda_min:g}, "
                 f"{c.lambda_max:g}] A (spectrum covers {wl[0]:.1f}-{wl[-1]:.1f} A)")
        if n_out and c.out_of_range == "error":
            raise RecordError(f"object {oid!r}: field 'spectrum.wavelength': {where}; mask them, "
                              "or use out_of_range='mask' or a wider lambda range")
        good &= ~outside
        if not good.any():
            raise RecordError(
                f"object {oid!r}: field 'spectrum.wavelength': no unmasked pixel inside the supported "
                f"range [{c.lambda_min:g}, {c.lambda_max:g}] A (spectrum covers {wl[0]:.1f}-{wl[-1]:.1f} A;"
                " wavelengths must be vacuum Angstrom)")
        if n_out:
            warnings.warn(f"SpectrumTokenizer: object {oid!r}: masked {where}")
        self.n_out_of_range += n_out
        M = rebin_matrix(np.log(wl).tobytes(), self.ln_min, self.ln_max, c.n_pixels)
        w = np.where(good, rec.ivar, 0.0).astype(np.float64)
        f = np.where(good, rec.flux, 0.0).astype(np.float64)
        den = M @ w                                                      # (n,)
        has = den > 0
        flux = np.where(has, (M @ (w * f)) / np.where(has, den, 1), 0.0)
        ivar = den                              # each native pixel's ivar split by overlap fraction
        return flux.astype(np.float32), ivar.astype(np.float32)

    def _prepare(self, records: list) -> dict[str, torch.Tensor]:
        """y = f / scale_q, its weight w, good flag, log-resolution, line spread (B, n); scale tokens (B,)."""
        rows = [self.rebin(r) for r in records]
        flux = np.stack([f for f, _ in rows])                            # (B, n)
        ivar = np.stack([iv for _, iv in rows])                          # (B, n)
        good = ivar > 0
        scale = np.array([weighted_median(np.abs(f[g]), iv[g]) for f, iv, g in zip(flux, ivar, good)])
        token = self.scale_token(scale)                                  # (B,)
        scale_q = self.scale_value(token)[:, None].astype(np.float32)    # (B, 1)
        y = flux / scale_q
        w = np.where(good, np.minimum(ivar * scale_q ** 2, self.config.min_sigma ** -2), 0.0)
        R = np.stack([self._resolution(r) for r in records])             # (B, n)
        device = self.device
        t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)
        return dict(y=t(y), w=t(w), good=t(good, torch.bool), log_r=t(np.log(R / R_REF)),
                    sigma=t(self.line_spread_px(R)), lsf=t(self.lsf_px(R)), token=t(token, torch.long))

    # -- the network -------------------------------------------------------------------
    def encode_latent(self, y: torch.Tensor, good: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
        """y, good, log_r (B, n) -> latent (B, d, n / downsample)."""
        x = torch.where(good, torch.asinh(y), torch.zeros_like(y))
        inp = torch.stack([x, good.float(), log_r], dim=1)               # (B, 3, n)
        inp = rearrange(inp, "b k (l p) -> b (k p) l", p=self.config.patch)   # (B, 3p, n/p)
        return self.encoder(inp)

    def decode_latent(self, z_q: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """z_q (B, d, n / downsample) -> y_hat (B, n) on the internal grid, at the model's
        resolution, or broadened by `sigma` (B, n) internal pixels when given."""
        h = self.decoder(z_q)                                            # (B, K p, n/p)
        h = rearrange(h, "b (k p) l -> b k (l p)", p=self.config.patch)   # (B, K, n)
        y = self.head(h)[:, 0]                                           # (B, n)
        if sigma is not None and self.config.line_spread:
            y = gaussian_broaden(y, sigma)
        return y

    # -- the contract ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, records) -> torch.LongTensor:
        """One Spectrum or a list (any wavelength grid) -> (B, n_tokens): the flux-scale
        token, the shape tokens blue to red (n_pixels / downsample), then the emission-line
        tokens (3 per line slot, lines.py), fitted to what the shape tokens' decode misses."""
        batch = self._prepare(as_list(records))
        z_q, ids, _ = self.quantizer(self.encode_latent(batch["y"], batch["good"], batch["log_r"]))
        out = [batch["token"][:, None], ids]
        if self.lines is not None:
            resid = batch["y"] - self.decode_latent(z_q, batch["sigma"])          # (B, n)
            lines = self.lines.fit(resid * batch["good"], batch["w"], batch["lsf"])
            out.append(self.lines.to_tokens(lines))
        return torch.cat(out, dim=1)                                     # (B, n_tokens)

    def _check_template(self, t) -> np.ndarray:
        c = self.config
        if not isinstance(t, Spectrum):
            raise TypeError(f"SpectrumTokenizer.decode: like must be Spectrum records, got {type(t).__name__}")
        wl = np.asarray(t.wavelength, dtype=np.float64)
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
        return wl

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, like) -> list[Spectrum]:
        """(B, n_tokens) ids -> Spectra on exactly `like.wavelength`, broadened to
        `like.resolution` and averaged over its pixels, with its instrument (one template
        for all rows, or one per row). ivar is copied from the template where its shape
        matches (its masked pixels get ivar interpolated from their neighbours), else ones.
        Target pixels whose centre lies outside `wavelength_range` come back masked (flux 0,
        ivar 0), or are refused when out_of_range='error'; every other pixel has mask False."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ValueError(f"SpectrumTokenizer.decode: expected tokens (B, {self.n_tokens}), got {tuple(tokens.shape)}")
        likes, grids = self._templates(like, len(tokens))
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"SpectrumTokenizer.decode: token ids must lie in [0, {self.vocab_size})")
        if tokens.numel() and tokens[:, 0].max() >= self.config.scale_bins:
            raise ValueError(f"SpectrumTokenizer.decode: token 0 (flux scale) must lie in "
                             f"[0, {self.config.scale_bins}), got {int(tokens[:, 0].max())}")
        bad = ~self.allowed_ids().gather(1, tokens.cpu().T).T                        # (B, n_tokens)
        if bad.any():
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"SpectrumTokenizer.decode: row {b}, token {i} (id {int(tokens[b, i])}) is outside "
                             "the ids that position takes (allowed_ids())")
        n_shape = self.n_shape_tokens
        z_q = self.quantizer.codes(tokens[:, 1:1 + n_shape].to(self.device), (n_shape,))   # (B, d, n / ds)
        scale = self.scale_value(tokens[:, 0].cpu().numpy())                         # (B,)
        return self._render(z_q, scale, tokens[:, 1 + n_shape:].cpu(), likes, grids)

    @torch.no_grad()
    def decode_expected(self, probs: torch.Tensor, like) -> list[Spectrum]:
        """(B, n_tokens, V) a distribution over each token's ids (an FM's, with the tokens it
        has drawn one-hot) -> Spectra as `decode`, from each shape token's mean code under its
        distribution (quantizer.expected_codes) and the flux scale's mean under token 0's: a
        point estimate. Emission-line tokens (line_slots > 0) take their most probable ids."""
        probs = torch.as_tensor(probs).float()
        if probs.ndim != 3 or probs.shape[1:] != (self.n_tokens, self.vocab_size):
            raise ValueError(f"SpectrumTokenizer.decode_expected: expected probs (B, {self.n_tokens}, "
                             f"{self.vocab_size}), got {tuple(probs.shape)}")
        likes, grids = self._templates(like, len(probs))
        n_shape, bins = self.n_shape_tokens, self.config.scale_bins
        z = self.quantizer.expected_codes(probs[:, 1:1 + n_shape].to(self.device), (n_shape,))   # (B, d, n / ds)
        p0 = probs[:, 0, :bins].double()
        p0 = p0 / p0.sum(-1, keepdim=True).clamp_min(1e-30)                         # (B, bins)
        scale = (p0.cpu().numpy() * self.scale_value(np.arange(bins))[None]).sum(-1)      # (B,) mean flux scale
        return self._render(z, scale, probs[:, 1 + n_shape:].argmax(-1).cpu(), likes, grids)

    def _templates(self, like, n: int) -> tuple[list[Spectrum], list[np.ndarray]]:
        likes = as_list(like)
        if len(likes) == 1:
            likes = likes * n
        if len(likes) != n:
            raise ValueError(f"SpectrumTokenizer.decode: {len(likes)} templates for {n} rows")
        return likes, [self._check_template(t) for t in likes]

    def _render(self, z_q: torch.Tensor, scale: np.ndarray, line_ids: torch.Tensor, likes: list[Spectrum],
                grids: list[np.ndarray]) -> list[Spectrum]:
        """z_q (B, d, n / ds) codes (on the grid or not), scale (B,) flux scales, line_ids
        (B, 3 line_slots) -> Spectra on the templates' grids (see decode)."""
        c = self.config
        sigma = np.stack([self.line_spread_px(self._resolution(t)) for t in likes])   # (B, n)
        y_hat = self.decode_latent(z_q, torch.as_tensor(sigma, dtype=torch.float32, device=self.device))
        y_hat = y_hat.cpu().numpy().astype(np.float64)                              # (B, n)
        lines = self.lines.from_tokens(line_ids) if self.lines is not None else None
        out = []
        for b, (t, wl) in enumerate(zip(likes, grids)):
            outside = (wl < c.lambda_min) | (wl > c.lambda_max)             # masked: nothing decoded there
            A = resample_matrix(np.log(wl).tobytes(), self.ln_min, self.ln_max, c.n_pixels)
            y_t = A @ y_hat[b]                                               # (L,) in units of the scale
            if lines is not None:
                y_t = y_t + self._lines_on(lines.row(b), t, wl)
            flux = np.where(outside, 0.0, y_t * scale[b]).astype(np.float32)
            ivar = _template_ivar(t.ivar, wl)
            ivar[outside] = 0.0
            out.append(Spectrum(flux=flux, ivar=ivar, mask=outside,
                                wavelength=wl.copy(), instrument=t.instrument,
                                resolution=np.asarray(t.resolution, dtype=np.float32).copy(),
                                object_id=t.object_id))
        return out

    def _lines_on(self, lines, like: Spectrum, wl: np.ndarray) -> np.ndarray:
        """One spectrum's Lines (K,) -> (L,) their flux on `like`'s pixels at `like`'s
        resolution, in units of the flux scale (lines.py: exact pixel integrals)."""
        if not bool((lines.pos >= 0).any()):
            return np.zeros(len(wl))
        edges_u = (pixel_edges(np.log(wl)) - self.ln_min) / self.dln - 0.5           # (L + 1,)
        ln_q = self.ln_min + (lines.pos.double().numpy() / SUB + 0.5) * self.dln        # (K,) line centres
        R = np.asarray(like.resolution, dtype=np.float64)
        R = np.interp(ln_q, np.log(wl), np.where(np.isfinite(R) & (R > 0), R, R_REF))
        y = self.lines.render(lines, torch.as_tensor(edges_u), torch.as_tensor(self.lsf_px(R)))
        return y.double().numpy()

    def training_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        """Reduced chi-square of the reconstruction, broadened to each input's resolution,
        on the internal grid (+ FSQ's code-usage term, 0 unless fsq_entropy_weight)."""
        batch = self._prepare(as_list(records))
        good, scored = batch["good"], batch["good"]                      # (B, n)
        p = self.config.blind_spot
        if self.training and p > 0:
            patch = self.config.patch
            hide = torch.rand(good.shape[0], good.shape[1] // patch, device=good.device) < p
            hide = hide.repeat_interleave(patch, dim=1)                  # (B, n) whole patches
            good, scored = good & ~hide, good & hide
        z_q, ids, aux = self.quantizer(self.encode_latent(batch["y"], good, batch["log_r"]))
        y_hat = self.decode_latent(z_q, batch["sigma"])                  # (B, n)
        chi2 = (batch["w"] * scored * (y_hat - batch["y"]) ** 2).sum() / scored.sum().clamp_min(1)
        return chi2 + aux, {"recon": float(chi2.detach()), **self.quantizer.usage(ids),
                            "scale_tokens_used": float(len(torch.unique(batch["token"])))}

    @torch.no_grad()
    def reduced_chi2(self, records, truth=None) -> np.ndarray:
        """(B,) chi-square per unmasked in-range native pixel of each record's encode -> decode
        round trip, on the record's own grid with its own ivar: against the record's flux,
        or against `truth` ((L,) noiseless flux per record) when given."""
        records = as_list(records)
        truth = [r.flux for r in records] if truth is None else list(truth)
        if len(truth) != len(records):
            raise ValueError(f"SpectrumTokenizer.reduced_chi2: {len(truth)} truths for {len(records)} records")
        decoded = self.decode(self.encode(records), like=records)
        c, out = self.config, []
        for r, t, d in zip(records, truth, decoded):
            ok = ~r.mask & (r.ivar > 0) & (r.wavelength >= c.lambda_min) & (r.wavelength <= c.lambda_max)
            out.append(float((r.ivar * (np.where(ok, t, 0) - d.flux) ** 2)[ok].sum() / max(ok.sum(), 1)))
        return np.array(out)
