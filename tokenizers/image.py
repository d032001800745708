"""Multiband galaxy stamps -> a grid of FSQ (or LFQ) tokens, with one model for every survey.

    tok = ImageTokenizer(ImageConfig(size=32, downsample=4))   # 8x8 = 64 tokens, vocab 1000
    ids = tok.encode(des_images)                   # list of Image (any registry bands) -> (B, 64)
    [hsc] = tok.decode(ids[:1], like=hsc_template) # Image in the template's bands and units
    loss, metrics = tok.training_loss(images)      # chi-square in arcsinh space + FSQ aux (0)

Band-agnostic. Every band plane enters through one shared conv stem, modulated (FiLM)
by an embedding of the band's metadata: the registry's effective wavelength and width
(`shards.bands.get(name)`), plus the record's pixel scale and that band's PSF FWHM. The
band features are then averaged over the bands present, so any subset of any survey's
bands works and a new survey is a registry entry. The decoder predicts one plane per
band asked for in `like`, conditioned (FiLM) on the same kind of band embedding, so one
can encode DES g,r,i,z and decode HSC y. With `band_dropout` > 0 a random subset of the
input bands is hidden from the encoder now and then while every band is still
reconstructed, which teaches the decoder to predict bands it was not shown (off by
default: in a 2-minute CPU training, 0.25 raised the held-out HSC chi-square from 1.8
to 2.8).

Network. Each band plane [x, good-pixel flag] is folded into patch x patch pixel groups
(space-to-depth) and goes through the FiLM-modulated stem; the band features are
averaged; a conv pyramid (ResBlocks, stride-2 convs) brings the grid down to
size / downsample per side, where a 1x1 conv makes the quantizer's channels (FSQ:
len(levels); LFQ: codebook_bits). The decoder mirrors it and ends in a per-band FiLM
head that emits patch^2 sub-pixels. With `mix_tokens` > 0, MLP-Mixer token-mixing
blocks at the token grid (encoder end, decoder start) let a token carry information
about any part of the stamp: a compact galaxy otherwise gets only the few tokens over
it, while most tokens describe empty sky (held-out tokens of the 600-step tiny model:
9% of the 1000 codes used, perplexity 25). Measured at that budget, mixing improved real
DECaLS stamps (chi2 1.01 vs 1.14) and left the simulated ones and the perplexity as
they were; LFQ doubled the perplexity (49) but reconstructed worse, so FSQ stays.

Units. flux (survey units, zero point zp) -> surface brightness in nanomaggies per
arcsec^2: sb = flux 10^(-0.4 (zp - 22.5)) / pixel_scale^2, then range compression
x = arcsinh(sb / softening), so the sky noise is linear and bright cores are logarithmic.
The loss is a chi-square in x: the weight is the propagated inverse variance
ivar_x = ivar_sb (softening^2 + sb^2), capped at 1 / min_sigma^2 (no pixel may claim a
precision better than min_sigma in x, about min_sigma relative error when bright),
masked pixels weigh 0, and the sum is divided by the number of unmasked pixels (a
reduced chi-square: ~1 when the reconstruction is as good as the noise). A weight that
grows with the pixel's own noisy sb favours its upward fluctuations, and faint galaxy
wings come out ~0.1 sigma per pixel too bright, which over a 32 x 32 stamp is 2-5 sigma
of its photometry; `weights_from: neighbours` takes the sb of the weight from the mean
of the pixel's 8 neighbours instead (`neighbour_mean`), which removes that bias, but the
tiny FM trained on those tokens did worse (bench/RESULTS.md), so 'data' stays the default. A
chi-square in x is also biased where arcsinh bends (S/N 1-10 per pixel): its best fit is
E[arcsinh(noisy sb)], not arcsinh(true sb). With `residual: flux` the residual is taken in
sb itself, sb_hat - sb, with variance sigma_sb^2 + min_sigma^2 (softening^2 + sb_w^2) (the
same floor, in sb), which is linear in the data and so unbiased with 'neighbours'
(`pixel_chi2`; measured in bench/RESULTS.md). With `photometry_weight` > 0 the chi-square of
k x k block sums of the residual is added (`block_photometry_chi2`).

Brightness scale (token 0, with `scale_bins` > 0). A bright core's amplitude is one
number the grid codes otherwise have to spell out between them, and a 10% error in it is
what the min_sigma floor lets pass (bench/RESULTS.md: the bright cores carry ~90% of the chi-square).
With a scale token the object's peak (the brightest 3 x 3 mean of good pixels over its
bands) sets g = max(1, peak / (scale_knee x softening)), log10 g is cut into `scale_bins`
uniform bins over [0, log_scale_max] (token 0, g at the bin's lower edge), and the
compression uses the object's own softening x g: x = arcsinh(sb / (softening g)). Stamps
fainter than the knee are unchanged (g = 1); brighter ones all reach about
arcsinh(knee) at their peak, so the grid codes describe a shape, and a galaxy 10x brighter
has the same codes and a scale 1 dex higher (tested). The FM places token 0 off the sky
grid (fm.modality `grid_start`).

Point source (tokens after the scale token, with `ps_anchors`). A star's band fluxes sit
in the grid cells over its core and come back 2-20% wrong, so a point source drawn from
each band's PSF is fitted at encode time (tokenizers.point_source: a sub-pixel offset,
one flux per band, and the choice: point source or not), tokenised (2 offset tokens and
one flux token per anchor wavelength), drawn again from its tokens and subtracted
before the network sees the stamp; decoding adds it back in each target band. The grid
codes what it leaves. Off by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange, repeat
from torch import nn
import torch.nn.functional as F

from ..shards import bands as band_registry
from ..shards.schema import Image, RecordError
from .base import Tokenizer, as_list, register_tokenizer
from .layers import Downsample, FiLM, ResBlock, TokenMixer, Upsample, conv, norm, pyramid_halvings
from .point_source import PointSource
from .quantizer import make_quantizer

AB_NANOMAGGY_ZP = 22.5   # zero point of the common flux unit (nanomaggies)
N_BAND_FEATURES = 11


@dataclass
class ImageConfig:
    size: int = 32                  # stamp side in pixels (tiny 32, base 96)
    downsample: int = 4             # stamp side / token-grid side, a power of two
    patch: int = 2                  # pixels per side folded into channels at the stem (<= downsample)
    quantizer: str = "fsq"          # 'fsq' (vocab = prod(levels)) or 'lfq' (vocab = 2^codebook_bits)
    levels: tuple[int, ...] = (8, 5, 5, 5)   # FSQ levels: vocab = their product
    codebook_bits: int = 10         # LFQ only: bits per token
    entropy_weight: float = 0.1     # LFQ only: weight of its code-usage entropy loss
    fsq_entropy_weight: float = 0.0  # FSQ: weight of the same code-usage term (tokenizers.quantizer)
    channels: int = 32              # width at full resolution; doubles per halving ...
    hidden: int = 64                # ... up to this width
    band_dim: int = 32              # size of the band embedding
    softening: float = 0.05         # arcsinh softening, nanomaggies per arcsec^2 (~ sky sigma)
    min_sigma: float = 0.1          # floor on a pixel's sigma in arcsinh units (caps the weight; 0.02 left a
                                    # 2-3 sigma background offset on r < 22 galaxies: DES chi2 62 vs 2.5)
    band_dropout: float = 0.0       # training: chance per object of hiding a random band subset
                                    # (> 0 teaches decoding bands not shown; costs recon at 2 min)
    mix_tokens: int = 0             # TokenMixer blocks at the token grid, in encoder and decoder each:
                                    # lets the many sky tokens carry bits about the galaxy (0 = local only)
    weights_from: str = "data"      # x's weight from the pixel's own flux ('data': weighs its upward
                                    # fluctuations more, faint wings come out ~0.1 sigma per pixel too bright)
                                    # or 'neighbours', the mean of its 8 neighbours (independent noise): a
                                    # better round trip, but the tiny FM on its tokens did worse (bench/RESULTS.md)
    residual: str = "asinh"         # 'asinh': the chi-square of x_hat - x with x's weight (above); 'flux': of
                                    # sb_hat - sb in surface brightness with sigma_sb^2 + min_sigma^2 (s^2 +
                                    # sb_w^2) as the variance: linear in the data, so no Jensen bias where
                                    # asinh bends (S/N 1-10), and with 'neighbours' no weight bias either
    photometry_weight: float = 0.0  # weight of the block-photometry chi-square (0 = pixel chi-square only).
                                    # Tiny config, weights_from data, 2 seeds: 0.3 on whole stamps (floor 0.05) took
                                    # stamp flux pulls from 2.4-5.5 to 0.9-1.9 sigma (DES) but chi2 vs truth
                                    # from 0.12-0.15 to 0.16-0.21, and the tiny FM's translation got worse
    photometry_blocks: tuple[int, ...] = (4, 32)   # block sides in pixels (each divides size)
    photometry_floor: float = 0.01  # a block's flux needs no better than this relative precision
    scale_bins: int = 0             # > 0: token 0 is the object's brightness scale g (below), in this many
                                    # log-uniform bins (<= vocab); 0 = no scale token, g = 1
    scale_knee: float = 3.0         # g = max(1, peak sb / (knee x softening)): compression relative to the peak
                                    # (tiny config, chi2 vs truth DES / HSC: knee 1 0.071 / 0.138, 3 0.056 / 0.119,
                                    # 10 0.057 / 0.134, 30 0.110 / 0.263; no scale token 0.100 / 0.269)
    log_scale_max: float = 3.0      # log10 g spanned by the scale bins (brighter peaks: the last bin)
    ps_anchors: tuple[float, ...] = ()   # point-source tokens (tokenizers.point_source): their band fluxes at these
                                    # wavelengths (Angstrom, increasing); () = none
    ps_bins: int = 1000             # bins of each point-source token (<= vocab)
    ps_beta: float = 3.0            # Moffat beta of the point source's PSF
    ps_max_unexplained: float = 0.04  # a point source when the PSF fit leaves less than this of its core's sum of squares
    ps_min_snr: float = 20.0        # ... and the core's S/N reaches this


def band_features(name: str, pixel_scale: float, psf_fwhm: float, object_id: str = "") -> np.ndarray:
    """(N_BAND_FEATURES,) description of one band plane, from the registry and the record."""
    try:
        band = band_registry.get(name)
    except KeyError as e:
        raise RecordError(f"object {object_id!r}: field 'image.bands': {e.args[0]}") from None
    lam, width = _band_metadata(band.name)
    wl = (lam - 7000.0) / 3000.0
    fourier = [f(np.pi * k * wl) for k in (1, 2, 4) for f in (np.sin, np.cos)]
    psf = float(psf_fwhm) if np.isfinite(psf_fwhm) and psf_fwhm > 0 else 1.0
    return np.array([wl, *fourier, np.log(width / 500.0), np.log(pixel_scale / 0.2),
                     psf / pixel_scale / 4.0, np.log(psf)], dtype=np.float32)


_METADATA: dict[str, tuple[float, float]] = {}


def _band_metadata(name: str) -> tuple[float, float]:
    """(effective wavelength, RMS width) in Angstrom, cached per band name."""
    if name not in _METADATA:
        band = band_registry.get(name)
        _METADATA[name] = (band.effective_wavelength, band.width)
    return _METADATA[name]


def to_common(zero_point: float, pixel_scale: float) -> float:
    """Factor from survey flux per pixel to nanomaggies per arcsec^2."""
    return 10 ** (-0.4 * (zero_point - AB_NANOMAGGY_ZP)) / pixel_scale ** 2


@register_tokenizer
class ImageTokenizer(Tokenizer):
    Config = ImageConfig
    kind = "image"
    shared_vocabulary = True   # one latent space for every survey / grid: token i means the same
    decodes_expected = True

    def __init__(self, config: ImageConfig):
        super().__init__(config)
        c = config
        halvings = pyramid_halvings("ImageConfig", c.size, c.downsample, c.patch)
        if not (c.softening > 0 and c.min_sigma > 0 and 0 <= c.band_dropout < 1 and c.mix_tokens >= 0):
            raise ValueError(f"ImageConfig: need softening > 0, min_sigma > 0, 0 <= band_dropout < 1, "
                             f"mix_tokens >= 0; got {c}")
        if c.weights_from not in ("neighbours", "data"):
            raise ValueError(f"ImageConfig.weights_from must be 'neighbours' or 'data', got {c.weights_from!r}")
        if c.residual not in ("asinh", "flux"):
            raise ValueError(f"ImageConfig.residual must be 'asinh' or 'flux', got {c.residual!r}")
        if c.photometry_weight < 0 or c.photometry_floor < 0 or \
                any(k < 1 or c.size % k for k in c.photometry_blocks):
            raise ValueError(f"ImageConfig: need photometry_weight >= 0, photometry_floor >= 0 and "
                             f"photometry_blocks that divide size {c.size}; got {c.photometry_weight}, "
                             f"{c.photometry_floor}, {c.photometry_blocks}")
        if c.scale_bins < 0 or (c.scale_bins and not (c.scale_knee > 0 and c.log_scale_max > 0)):
            raise ValueError(f"ImageConfig: need scale_bins >= 0, scale_knee > 0, log_scale_max > 0; got "
                             f"{c.scale_bins}, {c.scale_knee}, {c.log_scale_max}")
        self.grid = c.size // c.downsample
        widths = [min(c.channels * 2 ** k, c.hidden) for k in range(halvings + 1)]
        self.quantizer = make_quantizer(c.quantizer, c.levels, c.codebook_bits, c.entropy_weight, "ImageConfig",
                                        c.fsq_entropy_weight)
        self.band_mlp = nn.Sequential(nn.Linear(N_BAND_FEATURES, c.band_dim), nn.GELU(),
                                      nn.Linear(c.band_dim, c.band_dim))
        # encoder: shared per-band stem, mean over bands, then a conv pyramid
        self.stem_in = conv(2, 2 * c.patch ** 2, widths[0])   # [x, good] per band plane, patchified
        self.stem_film = FiLM(c.band_dim, widths[0])
        self.stem_out = conv(2, widths[0], widths[0])
        enc = [ResBlock(widths[0], 2)]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [Downsample(a, b, 2), ResBlock(b, 2)]
        enc += [TokenMixer(widths[-1], self.grid ** 2) for _ in range(c.mix_tokens)]
        enc += [norm(widths[-1]), nn.GELU(), conv(2, widths[-1], self.quantizer.dim, kernel=1)]
        self.encoder = nn.Sequential(*enc)
        # decoder: conv pyramid back to full resolution, then a FiLM head per target band
        dec = [conv(2, self.quantizer.dim, widths[-1])]
        dec += [TokenMixer(widths[-1], self.grid ** 2) for _ in range(c.mix_tokens)]
        dec += [ResBlock(widths[-1], 2)]
        for a, b in zip(widths[:0:-1], widths[-2::-1]):
            dec += [Upsample(a, b, 2), ResBlock(b, 2)]
        dec += [norm(widths[0]), nn.GELU()]
        self.decoder = nn.Sequential(*dec)
        self.head_film = FiLM(c.band_dim, widths[0])
        self.head = nn.Sequential(nn.GELU(), conv(2, widths[0], widths[0] // 2), nn.GELU(),
                                  conv(2, widths[0] // 2, c.patch ** 2, kernel=1))
        if c.scale_bins > self.quantizer.vocab_size:
            raise ValueError(f"ImageConfig.scale_bins {c.scale_bins} exceeds the vocabulary {self.quantizer.vocab_size}")
        if c.ps_anchors and (len(c.ps_anchors) < 2 or any(b <= a for a, b in zip(c.ps_anchors[:-1], c.ps_anchors[1:]))):
            raise ValueError(f"ImageConfig.ps_anchors must be >= 2 increasing wavelengths (Angstrom), got {c.ps_anchors}")
        if c.ps_anchors and c.ps_bins > self.quantizer.vocab_size:
            raise ValueError(f"ImageConfig.ps_bins {c.ps_bins} exceeds the vocabulary {self.quantizer.vocab_size}")
        self.point_source = PointSource(tuple(float(a) for a in c.ps_anchors), c.ps_bins, c.ps_beta,
                                        max_unexplained=c.ps_max_unexplained, min_snr=c.ps_min_snr) \
            if c.ps_anchors else None

    @property
    def vocab_size(self) -> int:
        return self.quantizer.vocab_size

    @property
    def code_levels(self) -> tuple[int, ...]:
        """FSQ's levels; LFQ's (2,) * bits (its bit order differs, the grid is the same)."""
        return tuple(self.quantizer.levels)

    @property
    def n_scale(self) -> int:
        """Tokens before the grid: 1 with a scale token, else 0."""
        return int(self.config.scale_bins > 0)

    @property
    def n_point(self) -> int:
        """Point-source tokens after the scale token: 2 + len(ps_anchors), or 0."""
        return self.point_source.n_tokens if self.point_source is not None else 0

    @property
    def grid_start(self) -> int:
        """Tokens before the sky grid: the scale token, then the point source's."""
        return self.n_scale + self.n_point

    @property
    def n_tokens(self) -> int:
        return self.grid_start + self.grid * self.grid

    @property
    def code_segments(self) -> tuple:
        head = ((1, (self.config.scale_bins,)),) if self.n_scale else ()
        head += ((self.n_point, (self.config.ps_bins,)),) if self.n_point else ()
        return head + ((self.grid * self.grid, self.code_levels),)

    def allowed_ids(self) -> torch.Tensor:
        """(n_tokens, vocab_size): the scale token (if any) takes ids below scale_bins, the
        point-source tokens ids below ps_bins."""
        allowed = super().allowed_ids()
        if self.n_scale:
            allowed[0, self.config.scale_bins:] = False
        if self.n_point:
            allowed[self.n_scale:self.grid_start, self.config.ps_bins:] = False
        return allowed

    # -- brightness scale (token 0 when scale_bins > 0) ----------------------------------
    def scale_token(self, sb: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """sb, good (B, C, H, W) -> (B,) scale ids: log10 g = log10(peak / (knee softening)),
        peak = the brightest 3x3 mean of good pixels over the bands, in [0, log_scale_max]
        cut into scale_bins uniform bins (id 0: g = 1, no rescaling)."""
        c = self.config
        box = F.avg_pool2d(torch.where(good, sb, 0.0).flatten(0, 1)[:, None], 3, stride=1)   # (B*C, 1, H-2, W-2)
        peak = box.reshape(sb.shape[0], -1).amax(1)                                          # (B,)
        u = torch.log10((peak / (c.scale_knee * c.softening)).clamp_min(1.0)) / c.log_scale_max
        return (u * c.scale_bins).floor().clamp(0, c.scale_bins - 1).long()

    def scale_value(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) scale ids -> (B,) g, each bin's lower edge (id 0 -> 1 exactly)."""
        c = self.config
        return 10 ** (ids.double() * c.log_scale_max / max(c.scale_bins, 1))

    def softening_of(self, g: torch.Tensor) -> torch.Tensor:
        """(B,) g -> (B, 1, 1, 1) each object's arcsinh softening, softening x g."""
        return (self.config.softening * g).to(torch.float32).reshape(-1, 1, 1, 1)

    def cell_arcsec(self, record) -> float:
        """Side of one token cell on the sky for this record's pixel scale (arcsec)."""
        return float(record.pixel_scale) * self.config.size / self.grid

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- records <-> tensors -----------------------------------------------------------
    def _check(self, rec) -> Image:
        if not isinstance(rec, Image):
            raise TypeError(f"ImageTokenizer: expected an Image record, got {type(rec).__name__}")
        rec.validate()
        if rec.flux.shape[1:] != (self.config.size, self.config.size):
            raise RecordError(
                f"object {rec.object_id!r}: field 'image.flux': stamp is {rec.flux.shape[1]}x"
                f"{rec.flux.shape[2]} pixels but this ImageTokenizer takes {self.config.size}x"
                f"{self.config.size} (config size); cut or pad the stamp")
        return rec

    def _features(self, likes: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Band features (B, C, F) and presence (B, C) of each record's bands, C = most bands."""
        C = max(len(r.bands) for r in likes)
        feat = np.zeros((len(likes), C, N_BAND_FEATURES), dtype=np.float32)
        present = np.zeros((len(likes), C), dtype=bool)
        for b, r in enumerate(likes):
            psf = np.broadcast_to(np.asarray(r.psf_fwhm, dtype=np.float64), (len(r.bands),))
            for c, name in enumerate(r.bands):
                feat[b, c] = band_features(name, r.pixel_scale, psf[c], r.object_id)
            present[b, :len(r.bands)] = True
        return torch.from_numpy(feat), torch.from_numpy(present)

    def _prepare(self, records: list) -> dict[str, torch.Tensor]:
        """Compressed flux x, its weight w, good-pixel mask and raw flux/ivar, all (B, C, H, W)."""
        records = [self._check(r) for r in records]
        feat, present = self._features(records)
        B, C, S = len(records), feat.shape[1], self.config.size
        flux = np.zeros((B, C, S, S), dtype=np.float32)
        ivar = np.zeros((B, C, S, S), dtype=np.float32)
        good = np.zeros((B, C, S, S), dtype=bool)
        factor = np.zeros((B, 1, 1, 1), dtype=np.float32)
        for b, r in enumerate(records):
            n = len(r.bands)
            ok = ~r.mask & (r.ivar > 0)
            flux[b, :n] = np.where(ok, r.flux, 0.0)       # where, not *: masked flux may be NaN
            ivar[b, :n] = np.where(ok, r.ivar, 0.0)
            good[b, :n] = ok
            factor[b] = to_common(r.zero_point, r.pixel_scale)
        flux, ivar, good, factor = (torch.from_numpy(a).to(self.device) for a in (flux, ivar, good, factor))
        feat, present = feat.to(self.device), present.to(self.device)
        ps_ids = None
        if self.point_source is not None:   # fit it, tokenise it, and leave the grid what it does not draw
            fwhm_px, lam, pix = self._band_geometry(records)
            nmgy = (factor * pix.reshape(-1, 1, 1, 1) ** 2).double()                     # survey flux -> nmgy / pixel
            fit = self.point_source.fit(flux * nmgy, ivar / nmgy ** 2, good, fwhm_px)
            ps_ids = self.point_source.tokens(fit, lam, present & good.flatten(2).any(-1), pix)   # seen bands only
            drawn = self.point_source.render(ps_ids, fwhm_px, lam, present, pix, S) / nmgy
            flux = torch.where(good, flux - drawn.to(flux.dtype), torch.zeros_like(flux))
        sb = flux * factor                                               # (B, C, H, W) nmgy/arcsec^2
        scale_ids = self.scale_token(sb, good) if self.n_scale else torch.zeros(B, dtype=torch.long, device=sb.device)
        s = self.softening_of(self.scale_value(scale_ids)) if self.n_scale else self.config.softening   # (B, 1, 1, 1)
        x = torch.asinh(sb / s)
        sb_w = neighbour_mean(sb, good) if self.config.weights_from == "neighbours" else sb
        ivar_sb = ivar / factor ** 2
        if self.config.residual == "flux":   # weight of sb: 1 / (sigma_sb^2 + (min_sigma sqrt(s^2 + sb_w^2))^2)
            w = ivar_sb / (1 + ivar_sb * self.config.min_sigma ** 2 * (s ** 2 + sb_w ** 2))
        else:                                # propagated ivar of x at sb_w, capped
            w = (ivar_sb * (s ** 2 + sb_w ** 2)).clamp(max=self.config.min_sigma ** -2)
        w = torch.where(good, w, torch.zeros_like(w))
        return dict(x=x, sb=sb, w=w, good=good, flux=flux, ivar=ivar, factor=factor, feat=feat, present=present,
                    s=s, scale_ids=scale_ids, ps_ids=ps_ids)

    def _band_geometry(self, likes: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each record's PSF FWHM in pixels and effective wavelengths (B, C), C = most bands
        (0 where absent), and pixel scales (B,), float64 on the model's device."""
        C = max(len(r.bands) for r in likes)
        fwhm, lam = np.zeros((len(likes), C)), np.zeros((len(likes), C))
        for b, r in enumerate(likes):
            psf = np.broadcast_to(np.asarray(r.psf_fwhm, dtype=np.float64), (len(r.bands),))
            fwhm[b, :len(r.bands)] = np.where(np.isfinite(psf) & (psf > 0), psf, 1.0) / r.pixel_scale
            lam[b, :len(r.bands)] = [_band_metadata(n)[0] for n in r.bands]
        pix = np.array([float(r.pixel_scale) for r in likes])
        return tuple(torch.from_numpy(a).to(self.device) for a in (fwhm, lam, pix))

    # -- the network -------------------------------------------------------------------
    def encode_latent(self, x: torch.Tensor, good: torch.Tensor, feat: torch.Tensor,
                      present: torch.Tensor) -> torch.Tensor:
        """x, good (B, C, H, W); feat (B, C, F); present (B, C) -> latent (B, d, h, w)."""
        B = x.shape[0]
        emb = rearrange(self.band_mlp(feat), "b c e -> (b c) e")         # (B*C, E)
        inp = torch.stack([torch.where(good, x, torch.zeros_like(x)), good.float()], dim=2)  # (B, C, 2, H, W)
        p = self.config.patch
        inp = rearrange(inp, "b c k (h p) (w q) -> (b c) (k p q) h w", p=p, q=p)   # (B*C, 2p^2, H/p, W/p)
        h = self.stem_out(F.gelu(self.stem_film(self.stem_in(inp), emb)))  # (B*C, K, H/p, W/p)
        h = rearrange(h, "(b c) k h w -> b c k h w", b=B)               # (B, C, K, H/p, W/p)
        weight = present.float()[:, :, None, None, None]                # (B, C, 1, 1, 1)
        h = (h * weight).sum(1) / weight.sum(1).clamp_min(1.0)          # (B, K, H/p, W/p)
        return self.encoder(h)

    def decode_latent(self, z_q: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """z_q (B, d, h, w); feat (B, C, F) of the target bands -> x_hat (B, C, H, W)."""
        B, C = feat.shape[:2]
        h = self.decoder(z_q)                                            # (B, K, H/p, W/p)
        h = repeat(h, "b k h w -> (b c) k h w", c=C)                    # (B*C, K, H/p, W/p)
        emb = rearrange(self.band_mlp(feat), "b c e -> (b c) e")         # (B*C, E)
        out = self.head(self.head_film(h, emb))                          # (B*C, p^2, H/p, W/p)
        p = self.config.patch
        return rearrange(out, "(b c) (p q) h w -> b c (h p) (w q)", b=B, p=p, q=p)   # (B, C, H, W)

    # -- the contract ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, records) -> torch.LongTensor:
        """One Image or a list (any registry bands, size x size stamps) -> (B, n_tokens): the
        brightness scale first when scale_bins > 0, then the grid's codes row by row."""
        batch = self._prepare(as_list(records))
        z = self.encode_latent(batch["x"], batch["good"], batch["feat"], batch["present"])
        _, ids, _ = self.quantizer(z)                                    # (B, h*w)
        if self.n_point:
            ids = torch.cat([batch["ps_ids"].to(ids), ids], 1)           # (B, n_point + h*w)
        if self.n_scale:
            ids = torch.cat([batch["scale_ids"][:, None].to(ids), ids], 1)   # (B, 1 + ...)
        return ids

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, like) -> list[Image]:
        """(B, n_tokens) ids -> Images in the bands, survey, pixel scale, zero point and
        PSF of `like` (one template for all rows, or one per row). ivar is copied from the
        template where its shape matches (its masked pixels get the band's median ivar),
        else ones; mask is all False."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ValueError(f"ImageTokenizer.decode: expected tokens (B, {self.n_tokens}), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        if self.n_scale and tokens[:, 0].max() >= self.config.scale_bins:
            raise ValueError(f"ImageTokenizer.decode: token 0 (the brightness scale) must lie in "
                             f"[0, {self.config.scale_bins}), got {int(tokens[:, 0].max())}")
        if self.n_point and tokens[:, self.n_scale:self.grid_start].max() >= self.config.ps_bins:
            raise ValueError(f"ImageTokenizer.decode: the point-source tokens {self.n_scale}..{self.grid_start - 1} "
                             f"must lie in [0, {self.config.ps_bins}), got "
                             f"{int(tokens[:, self.n_scale:self.grid_start].max())}")
        z_q = self.quantizer.codes(tokens[:, self.grid_start:], (self.grid, self.grid))  # (B, d, h, w)
        return self._render(z_q, tokens[:, 0] if self.n_scale else None, self._templates(like, len(tokens)),
                            tokens[:, self.n_scale:self.grid_start] if self.n_point else None)

    @torch.no_grad()
    def decode_expected(self, probs: torch.Tensor, like) -> list[Image]:
        """(B, n_tokens, V) a distribution over each token's ids (an FM's, with the tokens it
        has drawn one-hot) -> Images as `decode`, from each grid token's mean code under its
        distribution (quantizer.expected_codes) instead of one drawn code: a point estimate,
        the image of the latent's posterior mean. The brightness-scale token, when there is
        one, takes its most probable bin."""
        probs = torch.as_tensor(probs).float()
        if probs.ndim != 3 or probs.shape[1:] != (self.n_tokens, self.vocab_size):
            raise ValueError(f"ImageTokenizer.decode_expected: expected probs (B, {self.n_tokens}, "
                             f"{self.vocab_size}), got {tuple(probs.shape)}")
        probs = probs.to(self.device)
        z = self.quantizer.expected_codes(probs[:, self.grid_start:], (self.grid, self.grid))   # (B, d, h, w)
        scale = probs[:, 0, :self.config.scale_bins].argmax(-1) if self.n_scale else None
        point = probs[:, self.n_scale:self.grid_start, :self.config.ps_bins].argmax(-1) if self.n_point else None
        return self._render(z, scale, self._templates(like, len(probs)), point)

    def _templates(self, like, n: int) -> list[Image]:
        likes = as_list(like)
        if len(likes) == 1:
            likes = likes * n
        if len(likes) != n:
            raise ValueError(f"ImageTokenizer: {len(likes)} templates (like) for {n} rows")
        for t in likes:
            if not isinstance(t, Image):
                raise TypeError(f"ImageTokenizer: like must be Image records, got {type(t).__name__}")
            if not t.pixel_scale > 0:
                raise RecordError(f"object {t.object_id!r}: field 'image.pixel_scale': must be > 0, got {t.pixel_scale}")
        return likes

    def _render(self, z_q: torch.Tensor, scale_ids: torch.Tensor | None, likes: list[Image],
                point_ids: torch.Tensor | None = None) -> list[Image]:
        """z_q (B, d, h, w) codes (on the grid or not), scale_ids (B,) or None, point-source
        ids (B, n_point) or None -> Images."""
        feat, present = self._features(likes)
        x_hat = self.decode_latent(z_q, feat.to(self.device)).cpu().numpy()         # (B, C, H, W)
        s = (self.softening_of(self.scale_value(scale_ids)).cpu().numpy().astype(np.float64) if self.n_scale
             else np.full((len(likes), 1, 1, 1), self.config.softening))            # (B, 1, 1, 1)
        point = np.zeros(x_hat.shape)
        if point_ids is not None:
            fwhm_px, lam, pix = self._band_geometry(likes)
            point = self.point_source.render(point_ids, fwhm_px, lam, present.to(self.device), pix,
                                             self.config.size).cpu().numpy()          # (B, C, H, W) nmgy / pixel
        out = []
        for b, t in enumerate(likes):
            n = len(t.bands)
            common = to_common(t.zero_point, t.pixel_scale)
            flux = (s[b] * np.sinh(x_hat[b, :n].astype(np.float64)) / common
                    + point[b, :n] / (common * t.pixel_scale ** 2)).astype(np.float32)     # (n, H, W)
            ivar = _template_ivar(t.ivar, flux.shape)
            psf = np.broadcast_to(np.asarray(t.psf_fwhm, dtype=np.float32), (n,)).copy()
            out.append(Image(flux=flux, ivar=ivar, mask=np.zeros(flux.shape, dtype=bool),
                             bands=tuple(t.bands), pixel_scale=float(t.pixel_scale), survey=t.survey,
                             zero_point=float(t.zero_point), psf_fwhm=psf, object_id=t.object_id))
        return out

    def training_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        """Reduced chi-square of the reconstruction in arcsinh space (+ FSQ aux, 0).
        In training mode a random band subset of some objects is hidden from the encoder."""
        batch = self._prepare(as_list(records))
        present = batch["present"]
        shown = present
        if self.training and self.config.band_dropout > 0:
            shown = present & _band_dropout_mask(present, self.config.band_dropout)
        z = self.encode_latent(batch["x"], batch["good"], batch["feat"], shown)
        z_q, ids, aux = self.quantizer(z)
        x_hat = self.decode_latent(z_q, batch["feat"])                   # (B, C, H, W)
        n_good = batch["good"].sum().clamp_min(1)
        chi2 = self.pixel_chi2(x_hat, batch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.photometry_weight > 0):
            flux_hat = batch["s"] * torch.sinh(x_hat.clamp(-30, 30)) / batch["factor"]   # (B, C, H, W)
        with torch.no_grad():  # the same in survey flux units, unclipped: the figure to report
            chi2_flux = (batch["ivar"] * (flux_hat - batch["flux"]) ** 2).sum() / n_good
        metrics = {"recon": float(chi2.detach()), "chi2_flux": float(chi2_flux)}
        loss = chi2 + aux
        if self.config.photometry_weight > 0:
            phot = block_photometry_chi2(flux_hat, batch["flux"], batch["ivar"], batch["good"],
                                         self.config.photometry_blocks, self.config.photometry_floor)
            loss = loss + self.config.photometry_weight * phot
            metrics["photometry"] = float(phot.detach())
        return loss, {**metrics, **self.quantizer.usage(ids)}

    def pixel_chi2(self, x_hat: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reconstruction term: x_hat (B, C, H, W) in arcsinh units against `_prepare`'s
        batch, summed with its weights over the good pixels / their number (config.residual
        picks arcsinh or surface-brightness residuals)."""
        n_good = batch["good"].sum().clamp_min(1)
        if self.config.residual == "flux":
            sb_hat = batch["s"] * torch.sinh(x_hat.clamp(-30, 30))   # (B, C, H, W)
            return (batch["w"] * (sb_hat - batch["sb"]) ** 2).sum() / n_good
        return (batch["w"] * (x_hat - batch["x"]) ** 2).sum() / n_good

    @torch.no_grad()
    def reduced_chi2(self, records) -> np.ndarray:
        """(B,) chi-square per unmasked pixel of each record's encode -> decode round trip,
        in survey flux units with the record's own ivar."""
        records = as_list(records)
        decoded = self.decode(self.encode(records), like=records)
        out = []
        for r, d in zip(records, decoded):
            ok = ~r.mask & (r.ivar > 0)
            out.append(float((r.ivar * (np.where(ok, r.flux, 0) - d.flux) ** 2)[ok].sum() / max(ok.sum(), 1)))
        return np.array(out)


def neighbour_mean(sb: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> the mean of each pixel's good 8 neighbours (0 where it has none).

    A weight computed from the pixel's own noisy value favours its upward fluctuations
    where the truth is faint but positive (ivar_x grows with sb^2): the fit is pulled up.
    Its neighbours' noise is independent of its own, so their mean gives the same weight
    without that bias."""
    B, C, H, W = sb.shape
    ring = torch.ones(1, 1, 3, 3, dtype=sb.dtype, device=sb.device)
    ring[..., 1, 1] = 0
    g = good.to(sb.dtype).reshape(B * C, 1, H, W)
    total = F.conv2d((sb * good).reshape(B * C, 1, H, W), ring, padding=1)
    count = F.conv2d(g, ring, padding=1)
    return (total / count.clamp_min(1)).reshape(B, C, H, W)


def block_photometry_chi2(flux_hat: torch.Tensor, flux: torch.Tensor, ivar: torch.Tensor, good: torch.Tensor,
                          blocks: tuple[int, ...], floor: float) -> torch.Tensor:
    """Mean over block sides k of the reduced chi-square of k x k block sums of the residual.

    All (B, C, H, W) in survey flux units. The pixel chi-square barely sees an offset of a
    tenth of sigma spread over hundreds of pixels, which is what a stamp's photometry
    adds up: k x k sums weigh it k^2 times more (k = the stamp side: the band's total
    flux). A block's variance is the sum of its good pixels' variances plus
    (floor x its observed |flux|)^2, so bright blocks ask for no better than `floor`
    relative precision; blocks without good pixels are left out. ~1 per side when the
    reconstruction is as good as the noise."""
    var = torch.where(good, 1.0 / ivar.clamp_min(1e-30), torch.zeros_like(ivar))
    res = torch.where(good, flux_hat - flux, torch.zeros_like(flux))
    terms = []
    for k in blocks:
        r, v = (F.avg_pool2d(t.flatten(0, 1)[:, None], k) * k * k for t in (res, var))   # (B*C, 1, H/k, W/k)
        f = F.avg_pool2d(torch.where(good, flux, torch.zeros_like(flux)).flatten(0, 1)[:, None], k) * k * k
        v_eff = v + (floor * f) ** 2
        ok = v > 0
        terms.append((r ** 2 / v_eff.clamp_min(1e-30))[ok].mean() if ok.any() else r.sum() * 0)
    return torch.stack(terms).mean()


def _template_ivar(ivar: np.ndarray, shape: tuple) -> np.ndarray:
    """The template's ivar (C, H, W) if its shape matches, else ones; a pixel the template
    lacks (ivar 0, masked) gets its band's median ivar, so the decoded image is valid
    with no pixel masked."""
    ivar = np.asarray(ivar, dtype=np.float32)
    if ivar.shape != tuple(shape):
        return np.ones(shape, dtype=np.float32)
    out = ivar.copy()
    for c in range(len(out)):
        ok = np.isfinite(out[c]) & (out[c] > 0)
        out[c][~ok] = np.median(out[c][ok]) if ok.any() else 1.0
    return out


def _band_dropout_mask(present: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C) bool: True = band shown. With probability p an object with >= 2 bands shows
    each band with probability 1/2, always at least one (drawn from torch's global RNG)."""
    B, C = present.shape
    drop_obj = (torch.rand(B, device=present.device) < p) & (present.sum(1) >= 2)   # (B,)
    keep = torch.rand(B, C, device=present.device) < 0.5
    forced = torch.multinomial(present.float().clamp_min(1e-6), 1)       # (B, 1): one band always shown
    keep.scatter_(1, forced, True)
    return torch.where(drop_obj[:, None], keep, torch.ones_like(keep))
