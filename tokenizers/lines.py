"""Emission-line tokens: the narrow lines a spectrum's conv tokens miss, found by matching
pursuit on their residual and written as a short list of (position, flux, width) tokens.

    codec = LineCodec(n_pixels=2048, dln=5.4e-4, slots=8, vocab=1000)
    lines = codec.fit(resid, w, lsf_u)            # Lines of (B, K): quarter-pixel index (-1 = empty), area, width bin
    ids = codec.to_tokens(lines)                  # (B, 3K) long
    lines = codec.from_tokens(ids)                # quantised back
    y = codec.render(lines.row(b), edges_u, lsf_u)   # (L,) mean over any grid's pixels

Why. A token of the tiny spectrum tokenizer spans 32 internal pixels (~110 A); an emission
line fills one or two of them. Measured on the simulated sky (stop 12): the conv
autoencoder keeps 0-2 % of a 30-sigma H-alpha line after its 450 training steps, on
training objects as on held-out ones, at 24 bits per token as at 12; alone on 16 spectra
it needs ~1,500 steps to learn them (a conv decoder learns to place a sharp feature at a
continuous position slowly). The lines are few and simple, so they are coded explicitly,
as a spectroscopist's line list.

Model. Coordinates u in internal pixels (u = k at the centre of internal pixel k, i.e.
u = (ln lambda - ln_min) / d ln lambda - 1/2). A line is a Gaussian in ln lambda of area
`amp` (in units of the spectrum's quantised flux scale times internal pixels, so its flux
is scale * amp * lambda * d ln lambda), centred at u = j / 4 (a quarter-pixel grid), of
velocity dispersion sigma_v (one of `width_bins` log-spaced values from 10 to 1,000 km/s)
seen through the instrument's line spread: sigma_u^2 = (sigma_v / c / d ln lambda)^2 +
lsf_u^2, lsf_u = 1 / (2.3548 R d ln lambda). `render` integrates it exactly over any pixels
(differences of the normal CDF at their edges), so a decode writes each line at the target
instrument's own resolution on its own grid, sharper than the conv tokens' model
resolution; `fit` matches the same profile integrated over the internal pixels at the
input's resolution.

Fit (greedy matching pursuit, no gradients, one spectrum at a time). For every candidate
position, with a template of sigma_v = 100 km/s and the spectrum's median line spread, the ivar-weighted least-squares fit of template t plus a
constant (the local continuum the conv tokens got wrong) to the residual r over a window of
4 sigma + LOCAL_PX pixels each side (sigma of the widest line spread allowed, that of
R = MIN_RESOLUTION, so that a spectrum's fit does not depend on its batch): A = Cov_w(t, r) / Var_w(t), chi-square gain
A Cov_w(t, r) (weighted sums), so a smooth continuum error is not mistaken for a line. The
best candidate with A > 0 is kept if its significance sqrt(gain) >= `min_snr`; at that
position every width is tried and the best kept; its template (not the constant) is
subtracted, and so on for `slots` lines. Emission only: absorption features are broad and
the conv tokens carry them. With 8,192 candidates and min_snr 5 a pure-noise spectrum yields
a false line about once per thousand spectra.

Tokens. Each slot is three tokens, the lines sorted blue to red, empty slots last:
  a = j // (FINE * 2) (a = n_coarse for an empty slot), r = j % (FINE * 2);
  b = (r % FINE) * amp_bins + the log10(amp) bin (amp_bins uniform bins over
      [log_amp_min, log_amp_max]);
  c = (r // FINE) * width_bins + the width bin;   b = c = 0 for an empty slot.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

SUB = 4                              # candidate positions per internal pixel
FINE = 8                             # positions carried by the flux token (x 2 by the width token)
LOCAL_PX = 4                         # the window beyond 4 sigma over which a local continuum is fitted
MIN_SIGMA_PX = 0.05                  # floor on a line's width (internal px)
C_KMS = 299792.458
SIGMA_V_RANGE = (10.0, 1000.0)       # km/s, the width bins' range (log-spaced centres)
DETECT_SIGMA_V = 100.0               # km/s, the detection template's width
MIN_RESOLUTION = 1000.0              # line spreads are capped at this R's (fixed windows: batch-independent fits)


class Lines(NamedTuple):
    pos: torch.Tensor      # (..., K) long, quarter-pixel index j (u = j / SUB); -1 = empty slot
    amp: torch.Tensor      # (..., K) float, area in units of the flux scale x internal pixels
    width: torch.Tensor    # (..., K) long, width bin

    def row(self, b: int) -> "Lines":
        return Lines(self.pos[b], self.amp[b], self.width[b])


class LineCodec:
    def __init__(self, n_pixels: int, dln: float, slots: int, vocab: int, amp_bins: int = 125,
                 width_bins: int = 16, min_snr: float = 5.0, log_amp_min: float = -2.0,
                 log_amp_max: float = 3.0):
        self.n, self.dln, self.slots = int(n_pixels), float(dln), int(slots)
        self.amp_bins, self.width_bins = int(amp_bins), int(width_bins)
        self.min_snr, self.log_amp_min, self.log_amp_max = float(min_snr), float(log_amp_min), float(log_amp_max)
        self.n_pos = SUB * self.n                                   # candidate positions u = j / SUB
        self.n_coarse = -(-self.n_pos // (2 * FINE))
        if self.n_coarse + 1 > vocab or FINE * self.amp_bins > vocab or 2 * self.width_bins > vocab:
            raise ValueError(f"SpectrumConfig: line tokens need n_pixels * {SUB} / {2 * FINE} + 1 = "
                             f"{self.n_coarse + 1}, {FINE} * line_amp_bins = {FINE * self.amp_bins} and 2 * "
                             f"line_width_bins = {2 * self.width_bins} ids, but the vocab is {vocab}; use fewer "
                             "line_amp_bins, fewer n_pixels or more FSQ levels")
        if not self.log_amp_min < self.log_amp_max or self.amp_bins < 2 or self.width_bins < 1 or self.min_snr <= 0:
            raise ValueError("SpectrumConfig: need line_log_amp range increasing, line_amp_bins >= 2, "
                             f"line_width_bins >= 1, line_min_snr > 0; got {amp_bins}, {width_bins}, {min_snr}, "
                             f"{log_amp_min}, {log_amp_max}")
        self.max_lsf_u = 1.0 / (2.3548 * MIN_RESOLUTION * self.dln)
        detect = math.hypot(DETECT_SIGMA_V / C_KMS / self.dln, self.max_lsf_u)
        widest = math.hypot(SIGMA_V_RANGE[1] / C_KMS / self.dln, self.max_lsf_u)
        self.half, self.half_w = (int(math.ceil(4 * v)) + LOCAL_PX for v in (detect, widest))   # window half-widths, px
        lo, hi = (math.log10(v) for v in SIGMA_V_RANGE)
        step = (hi - lo) / self.width_bins
        self.sigma_v = 10 ** (lo + step * (torch.arange(self.width_bins).float() + 0.5))   # (Nw,) km/s

    @property
    def n_tokens(self) -> int:
        return 3 * self.slots

    @property
    def code_segments(self) -> tuple:
        """The grids the ids of each slot's three tokens lie on (fm.modality), axis 0 fastest:
        coarse position; (flux bin, sub-position); (width bin, sub-position)."""
        return ((1, (self.n_coarse + 1,)), (1, (self.amp_bins, FINE)), (1, (self.width_bins, 2))) * self.slots

    def allowed(self, vocab: int) -> torch.Tensor:
        """(3K, vocab) bool: positions take [0, n_coarse], fluxes [0, FINE amp_bins), widths [0, 2 width_bins)."""
        out = torch.zeros(self.n_tokens, vocab, dtype=torch.bool)
        out[0::3, : self.n_coarse + 1] = True
        out[1::3, : FINE * self.amp_bins] = True
        out[2::3, : 2 * self.width_bins] = True
        return out

    def sigma_u(self, width: torch.Tensor, lsf_u: torch.Tensor) -> torch.Tensor:
        """Width bins and the instrument's line spread (internal px), broadcast -> sigma_u (px)."""
        v = self.sigma_v.to(lsf_u.device)[width] / C_KMS / self.dln
        return torch.sqrt(v ** 2 + lsf_u.float() ** 2).clamp_min(MIN_SIGMA_PX)

    # -- fit -------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, resid: torch.Tensor, w: torch.Tensor, lsf_u: torch.Tensor) -> Lines:
        """resid, w, lsf_u (B, n): residual after the conv tokens, its weight (0 = no data)
        and the input's line-spread sigma (internal px) -> Lines (B, K), blue to red, empty
        last. One spectrum at a time: a spectrum's lines never depend on its batch."""
        rows = [self._fit_row(r.float().clone(), w_.float(), l.float().clamp(max=self.max_lsf_u))
                for r, w_, l in zip(resid, w, lsf_u)]
        if not rows:
            e = resid.new_zeros(0, self.slots)
            return Lines(e.long() - 1, e, e.long())
        return self._sorted(Lines(*(torch.stack(x) for x in zip(*rows))))

    def _fit_row(self, r: torch.Tensor, w: torch.Tensor, lsf: torch.Tensor):
        """One spectrum's matching pursuit: r, w, lsf (n,) -> pos, amp, width (K,)."""
        n, dev, half, half_w = r.shape[0], r.device, self.half, self.half_w
        # detection: one template width per spectrum, every quarter-pixel phase, as correlations
        s_det = max(math.hypot(DETECT_SIGMA_V / C_KMS / self.dln, float(lsf.median())), MIN_SIGMA_PX)
        off = torch.arange(-half, half + 2, device=dev)[None, :] - torch.arange(SUB, device=dev)[:, None] / SUB
        t = _pixel_integral(off - 0.5, off + 0.5, torch.tensor(s_det, device=dev))          # (SUB, W)
        ones = torch.ones(1, t.shape[1], device=dev)
        corr = lambda x, k: F.conv1d(x[None, None], k[:, None, :])[0]      # x padded (L + W - 1,) -> (C, L)
        pad = lambda x: F.pad(x, (half, half + 1))                          # window [i - half, i + half + 1]
        s_t, s_tt, s_w = corr(pad(w), t), corr(pad(w), t ** 2), corr(pad(w), ones)[0].clamp_min(1e-30)
        den = s_tt - s_t ** 2 / s_w                                          # (SUB, n) Var_w(t) x sum w
        wr = pad(w * r)
        num = corr(wr, t) - s_t * corr(wr, ones)[0] / s_w                   # (SUB, n) Cov_w(t, r) x sum w
        reach = half_w + half + 2                                            # pixels whose window a subtraction touches
        widths = torch.arange(self.width_bins, device=dev)
        pos = torch.full((self.slots,), -1, dtype=torch.long, device=dev)
        amp, width = torch.zeros(self.slots, device=dev), torch.zeros(self.slots, dtype=torch.long, device=dev)
        for k in range(self.slots):
            gain = torch.where((num > 0) & (den > 0), num ** 2 / den.clamp_min(1e-30), torch.zeros_like(num))
            flat = gain.T.reshape(-1)                                        # (n SUB,) j = i SUB + phase
            best = int(flat.argmax())
            if float(flat[best]) < self.min_snr ** 2:
                break
            # at the detected position: every width, the instrument's line spread there, a wider window
            i = best // SUB
            win = i + torch.arange(-half_w, half_w + 2, device=dev)
            inside = ((win >= 0) & (win < n)).float()
            win = win.clamp(0, n - 1)
            o = win - best / SUB
            t_b = _pixel_integral(o - 0.5, o + 0.5, self.sigma_u(widths, lsf[i].expand(len(widths)))[:, None]) * inside
            ww, rr = w[win] * inside, r[win]
            den_b, swt_b, sw_b = _design(ww, t_b)                            # (Nw,)
            num_b = (ww * t_b * rr).sum(-1) - swt_b * (ww * rr).sum(-1) / sw_b
            gain_b = torch.where((num_b > 0) & (den_b > 0), num_b ** 2 / den_b.clamp_min(1e-30), torch.zeros_like(num_b))
            wb = int(gain_b.argmax())
            a = num_b[wb] / den_b[wb].clamp_min(1e-30)
            pos[k], amp[k], width[k] = best, a, wb
            r.index_add_(0, win, -a * t_b[wb] * inside)
            lo, hi = max(0, i - reach), min(n, i + reach + 1)                # num changes only there
            wr_s = pad(w * r)[lo:hi + 2 * half + 1]
            num[:, lo:hi] = corr(wr_s, t) - s_t[:, lo:hi] * corr(wr_s, ones)[0] / s_w[lo:hi]
        return pos, amp, width

    @staticmethod
    def _sorted(lines: Lines) -> Lines:
        key = torch.where(lines.pos < 0, torch.iinfo(torch.long).max, lines.pos)
        order = key.argsort(-1)
        return Lines(*(x.gather(-1, order) for x in lines))

    # -- tokens ------------------------------------------------------------------------
    def _amp_bin(self, amp: torch.Tensor) -> torch.Tensor:
        u = (torch.log10(amp.clamp_min(10 ** self.log_amp_min)) - self.log_amp_min) / (self.log_amp_max - self.log_amp_min)
        return (u * self.amp_bins).floor().clamp(0, self.amp_bins - 1).long()

    def _amp_value(self, b: torch.Tensor) -> torch.Tensor:
        return 10 ** (self.log_amp_min + (b.float() + 0.5) / self.amp_bins * (self.log_amp_max - self.log_amp_min))

    def to_tokens(self, lines: Lines) -> torch.Tensor:
        """Lines (B, K) -> (B, 3K) ids: (coarse position, fine position x flux bin, width bin) per slot."""
        empty = lines.pos < 0
        r = lines.pos % (2 * FINE)
        a = torch.where(empty, self.n_coarse, lines.pos // (2 * FINE))
        b = torch.where(empty, 0, (r % FINE) * self.amp_bins + self._amp_bin(lines.amp))
        c = torch.where(empty, 0, (r // FINE) * self.width_bins + lines.width)
        return torch.stack([a, b, c], dim=-1).flatten(-2)

    def from_tokens(self, ids: torch.Tensor) -> Lines:
        """(B, 3K) ids -> Lines (B, K), fluxes at their bin centres. A position past the grid
        (a sampler's free choice) counts as empty."""
        a, b, c = ids[..., 0::3].long(), ids[..., 1::3].long(), ids[..., 2::3].long()
        j = a * 2 * FINE + (c // self.width_bins).clamp(max=1) * FINE + (b // self.amp_bins).clamp(max=FINE - 1)
        empty = (a >= self.n_coarse) | (j >= self.n_pos)
        return Lines(torch.where(empty, -1, j), torch.where(empty, 0.0, self._amp_value(b % self.amp_bins)),
                     torch.where(empty, 0, c % self.width_bins))

    def render(self, lines: Lines, edges_u: torch.Tensor, lsf_u: torch.Tensor) -> torch.Tensor:
        """One spectrum's Lines (K,) on pixels with edges `edges_u` (L + 1,) in internal-pixel
        coordinates, seen with line spread `lsf_u` (K,) px at each line -> (L,) the lines'
        mean over each pixel (their area inside it / its width); empty slots add nothing."""
        keep = lines.pos >= 0
        u = lines.pos[keep].float()[:, None] / SUB                                 # (K', 1)
        s = self.sigma_u(lines.width[keep], lsf_u[keep])[:, None]                   # (K', 1)
        e = edges_u.float()[None]
        area = (lines.amp[keep].float()[:, None] * _pixel_integral(e[:, :-1] - u, e[:, 1:] - u, s)).sum(0)
        return area / (e[0, 1:] - e[0, :-1])


def _design(w_win: torch.Tensor, t: torch.Tensor):
    """Weighted sums for a template plus a constant: Var_w(t) x sum w, sum w t, sum w."""
    sw = w_win.sum(-1).clamp_min(1e-30)
    swt = (w_win * t).sum(-1)
    return (w_win * t ** 2).sum(-1) - swt ** 2 / sw, swt, sw


def _pixel_integral(lo: torch.Tensor, hi: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Area of a unit-area Gaussian of width sigma between offsets lo and hi from its centre."""
    k = 1.0 / (math.sqrt(2.0) * sigma)
    return 0.5 * (torch.erf(hi * k) - torch.erf(lo * k))
