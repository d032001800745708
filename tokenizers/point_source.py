"""A point source drawn from each band's PSF, with its band fluxes as tokens of their own.

    ps = PointSource(anchors=(4800, 6300, 7800, 9000, 9800))      # g, r, i, z, y slots
    fit = ps.fit(flux_nmgy, ivar_nmgy, good, fwhm_px)      # (B, C, H, W) stamps, (B, C) FWHM in pixels
    ids = ps.tokens(fit, wavelength, present, pixel_scale)  # (B, 2 + K): offset x, offset y, K slot fluxes
    drawn = ps.render(ids, fwhm_px, wavelength, present, pixel_scale, size)   # (B, C, H, W) nanomaggies

The image tokenizer's grid codes are 10 bits per 4 x 4 pixel cell, through a latent
averaged over the bands; a star's band fluxes sit in the one or two cells over its core,
and they come back 2-20% wrong (bench/RESULTS.md: HSC-like stars chi2 0.38 against PCA's
0.071 at the same bits). A scene model (the Tractor, scarlet) draws a point source from
the PSF with a flux per band. Here that part is not learned (a learned one became a broad
glow under the conv decoder's stamp, bench/RESULTS.md): it is fitted at encode time, by
weighted least squares, and the conv network codes what it leaves.

Fit. Each band's PSF is a circular Moffat (`beta`) of the record's FWHM, averaged over
2 x 2 sub-pixels of each pixel, centred on pixel (size // 2, size // 2) plus a sub-pixel
offset shared by the bands. Gauss-Newton on (one flux per band, dx, dy), weighted by
ivar, over the pixels within `radius` FWHMs of the centre. The object is a point source
when the fitted model leaves less than `max_unexplained` of the weighted sum of squares of
its core (sum w (d - m)^2 / sum w d^2; a galaxy's core is broader than the PSF and leaves
more) and that sum reaches `min_snr`^2 (a faint source is left to the grid). Else no point
source is drawn and the tokens say so.

Tokens, band-agnostic. The offset (arcsec, so that it holds on any pixel grid) takes two
tokens: id 0 in the first = no point source, else ids 1..bins-1 cut [-max_offset,
max_offset]. The fluxes: u = arcsinh(F / flux_unit) of each band goes to the anchor
nearest its effective wavelength (the band registry): anchors at u, g, r, i, z, y make
the tokens the point source's ugrizy photometry, whichever survey's version of a band
came in. An anchor no band reaches takes its nearest neighbours' values (least squares
with a small first-difference penalty), and two bands that reach one anchor share it
(their mean). Each anchor is one token of `bins` uniform bins over [u_min, u_max], so a
band's flux comes back to half a bin (0.5% above flux_unit). Decoding reads each target
band's flux off its nearest anchor: encode DES-like g,r,i,z, draw the point source in
HSC-like y (from z). The encoder subtracts the point source as it will be decoded
(quantised), so the grid codes what the tokens leave.
"""
from __future__ import annotations

import numpy as np
import torch

SUB = 2   # sub-pixels per pixel side for the pixel-integrated PSF (4: the same fits, 4x the time)


def moffat_stamps(dx: torch.Tensor, dy: torch.Tensor, fwhm_px: torch.Tensor, beta: float, size: int,
                  window: int | None = None, sub: int = SUB, gradient: bool = False):
    """Unit-flux pixel-integrated Moffats: dx, dy (B,) pixels from the centre of pixel
    (size // 2, size // 2); fwhm_px (B, C) -> (B, C, n, n), each summing to ~1 (less the
    light beyond), on the whole stamp (n = size) or its central `window` pixels. With
    `gradient`, also its derivatives with respect to dx and dy (the same shape)."""
    dev, dt = fwhm_px.device, fwhm_px.dtype
    n = size if window is None else min(window, size)
    lo = size // 2 - n // 2
    s = (torch.arange(sub, device=dev, dtype=dt) + 0.5) / sub - 0.5                      # (S,)
    coord = (torch.arange(lo, lo + n, device=dev, dtype=dt) - size // 2)[:, None] + s[None]   # (n, S)
    x = coord.reshape(1, 1, 1, 1, n, sub) - dx.reshape(-1, 1, 1, 1, 1, 1)               # (B, 1, 1, 1, n, S)
    y = coord.reshape(1, 1, n, sub, 1, 1) - dy.reshape(-1, 1, 1, 1, 1, 1)               # (B, 1, n, S, 1, 1)
    alpha2 = ((fwhm_px / (2 * np.sqrt(2 ** (1 / beta) - 1))).clamp_min(0.05) ** 2)[..., None, None, None, None]
    q = 1 + (x ** 2 + y ** 2) / alpha2                                                    # (B, C, n, S, n, S)
    prof = (beta - 1) / (np.pi * alpha2) * q ** (-beta)                                  # per pixel^2
    P = prof.mean(dim=(3, 5))                                                             # (B, C, n, n)
    if not gradient:
        return P
    k = prof * (2 * beta) / (q * alpha2)      # d prof / d dx = k x (x = coord - dx), likewise y
    return P, (k * x).mean(dim=(3, 5)), (k * y).mean(dim=(3, 5))


def anchor_matrix(wavelength: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """wavelength (B, C) Angstrom, anchors (K,) increasing -> (B, C, K): one-hot, each band
    reading the anchor nearest its wavelength (its slot: u, g, r, i, z, y for anchors
    placed at those bands)."""
    nearest = (wavelength[..., None] - anchors).abs().argmin(-1)                          # (B, C)
    return torch.nn.functional.one_hot(nearest, len(anchors)).to(wavelength.dtype)


class PointSource:
    """Fit, tokenise and draw a point source; see the module docstring. No parameters
    are learned."""

    def __init__(self, anchors: tuple[float, ...], bins: int = 1000, beta: float = 3.0, radius: float = 1.5,
                 max_unexplained: float = 0.02, min_snr: float = 20.0, flux_unit: float = 1.0,
                 u_range: tuple[float, float] = (-1.0, 9.0), max_offset: float = 0.6, smooth: float = 1e-6):
        if len(anchors) < 2 or any(b <= a for a, b in zip(anchors[:-1], anchors[1:])) or bins < 3:
            raise ValueError(f"PointSource: need >= 2 increasing anchor wavelengths and bins >= 3; got "
                             f"{anchors}, {bins}")
        self.anchors = torch.tensor(anchors, dtype=torch.float64)
        self.bins, self.beta, self.radius = int(bins), float(beta), float(radius)
        self.max_unexplained, self.min_snr, self.flux_unit = float(max_unexplained), float(min_snr), float(flux_unit)
        self.u_range, self.max_offset, self.smooth = tuple(u_range), float(max_offset), float(smooth)

    @property
    def n_tokens(self) -> int:
        return 2 + len(self.anchors)

    # -- fit ------------------------------------------------------------------------------
    def fit(self, flux: torch.Tensor, ivar: torch.Tensor, good: torch.Tensor, fwhm_px: torch.Tensor,
            iterations: int = 3) -> dict[str, torch.Tensor]:
        """flux, ivar (B, C, H, W) in nanomaggies per pixel (absent bands: good False),
        fwhm_px (B, C) -> dict(flux (B, C) nanomaggies, dx, dy (B,) pixels, unexplained (B,),
        snr2 (B,) the core's weighted sum of squares, is_point (B,) bool)."""
        B, C, H, W = flux.shape
        n = min(H, int(np.ceil(2 * self.radius * float(fwhm_px.max()))) + 3)   # the central window holding the core
        lo = H // 2 - n // 2
        cut = (slice(None), slice(None), slice(lo, lo + n), slice(W // 2 - n // 2, W // 2 - n // 2 + n))
        dt = torch.float64
        f = flux[cut].to(dt)
        fw = fwhm_px.to(dt).clamp_min(0.5)
        yy, xx = torch.meshgrid(torch.arange(lo, lo + n, dtype=dt, device=f.device) - H // 2,
                                torch.arange(W // 2 - n // 2, W // 2 - n // 2 + n, dtype=dt, device=f.device) - W // 2,
                                indexing="ij")
        core = (xx ** 2 + yy ** 2).sqrt()[None, None] <= self.radius * fw[..., None, None]     # (B, C, n, n)
        w = torch.where(good[cut] & core, ivar[cut].to(dt), torch.zeros((), dtype=dt, device=f.device))
        dx = torch.zeros(B, dtype=dt, device=f.device)
        dy = torch.zeros_like(dx)
        P = moffat_stamps(dx, dy, fw, self.beta, H, window=n)
        amp = (w * P * f).sum((2, 3)) / (w * P * P).sum((2, 3)).clamp_min(1e-30)              # fluxes at the centre

        def s(a, b):   # (B, C) weighted inner products per band
            return (w * a * b).sum((2, 3))

        for _ in range(iterations):   # Gauss-Newton on (C fluxes, dx, dy); the fluxes' block is diagonal
            P, Px, Py = moffat_stamps(dx, dy, fw, self.beta, H, window=n, gradient=True)
            Gx, Gy = amp[..., None, None] * Px, amp[..., None, None] * Py                    # (B, C, n, n)
            r = f - amp[..., None, None] * P
            N = torch.zeros(B, C + 2, C + 2, dtype=dt, device=f.device)
            N[:, range(C), range(C)] = s(P, P)
            N[:, :C, C], N[:, :C, C + 1] = s(P, Gx), s(P, Gy)
            N[:, C, :C], N[:, C + 1, :C] = N[:, :C, C], N[:, :C, C + 1]
            N[:, C, C], N[:, C + 1, C + 1] = s(Gx, Gx).sum(1), s(Gy, Gy).sum(1)
            N[:, C, C + 1] = N[:, C + 1, C] = s(Gx, Gy).sum(1)
            g = torch.cat([s(P, r), s(Gx, r).sum(1, keepdim=True), s(Gy, r).sum(1, keepdim=True)], 1)   # (B, C+2)
            d = torch.diagonal(N, dim1=1, dim2=2)
            N = N + torch.diag_embed(torch.where(d > 0, 1e-9 * d, torch.ones_like(d)))   # absent bands: flux 0
            step = torch.linalg.solve(N, g)
            amp = amp + step[:, :C]
            dx = (dx + step[:, C].clamp(-0.5, 0.5)).clamp(-1.5, 1.5)
            dy = (dy + step[:, C + 1].clamp(-0.5, 0.5)).clamp(-1.5, 1.5)
        P = moffat_stamps(dx, dy, fw, self.beta, H, window=n)                                 # the final fluxes
        amp = (w * P * f).sum((2, 3)) / (w * P * P).sum((2, 3)).clamp_min(1e-30)
        m = amp[..., None, None] * P
        snr2 = (w * f * f).sum((1, 2, 3))
        unexplained = (w * (f - m) ** 2).sum((1, 2, 3)) / snr2.clamp_min(1e-30)
        is_point = (unexplained < self.max_unexplained) & (snr2 >= self.min_snr ** 2) & (amp.sum(1) > 0)
        return dict(flux=amp, dx=dx, dy=dy, unexplained=unexplained, snr2=snr2, is_point=is_point)

    # -- tokens ---------------------------------------------------------------------------
    def _u_step(self) -> float:
        return (self.u_range[1] - self.u_range[0]) / self.bins

    def tokens(self, fit: dict[str, torch.Tensor], wavelength: torch.Tensor, present: torch.Tensor,
               pixel_scale: torch.Tensor) -> torch.Tensor:
        """The fit (above), band wavelengths (B, C) Angstrom, present (B, C), pixel_scale (B,)
        arcsec -> (B, 2 + K) ids: offset x, offset y (arcsec; 0 = no point source), K anchors."""
        anchors = self.anchors.to(wavelength.device)
        M = anchor_matrix(wavelength.double(), anchors) * present[..., None]                # (B, C, K)
        u = torch.asinh(fit["flux"] / self.flux_unit) * present                              # (B, C)
        K = len(anchors)
        D = torch.diff(torch.eye(K, dtype=torch.float64, device=M.device), dim=0)               # (K-1, K) first differences
        A = M.transpose(1, 2) @ M + self.smooth * (D.T @ D) + 1e-9 * torch.eye(K, dtype=torch.float64, device=M.device)
        a = torch.linalg.solve(A, (M.transpose(1, 2) @ u[..., None]))[..., 0]             # (B, K)
        ids_flux = ((a - self.u_range[0]) / self._u_step()).floor().clamp(0, self.bins - 1).long()
        off = torch.stack([fit["dx"], fit["dy"]], 1) * pixel_scale.double()[:, None]          # (B, 2) arcsec
        t = (off.clamp(-self.max_offset, self.max_offset) + self.max_offset) / (2 * self.max_offset)
        ids_off = 1 + (t * (self.bins - 2)).round().long()                                    # (B, 2) in [1, bins-1]
        ids = torch.cat([ids_off, ids_flux], 1)
        ids[~fit["is_point"]] = 0
        return ids

    def values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 2 + K) ids -> (is_point (B,), offset (B, 2) arcsec, anchor u (B, K))."""
        ids = ids.long()
        is_point = ids[:, 0] > 0
        t = (ids[:, :2].double() - 1).clamp_min(0) / (self.bins - 2)
        off = t * 2 * self.max_offset - self.max_offset
        u = self.u_range[0] + (ids[:, 2:].double() + 0.5) * self._u_step()
        return is_point, off, u

    def render(self, ids: torch.Tensor, fwhm_px: torch.Tensor, wavelength: torch.Tensor, present: torch.Tensor,
               pixel_scale: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 2 + K) ids, the target bands' fwhm_px, wavelength, present (B, C), pixel_scale
        (B,) -> (B, C, size, size) the point source in nanomaggies per pixel (0 where none)."""
        is_point, off, u = self.values(ids.to(wavelength.device))
        M = anchor_matrix(wavelength.double(), self.anchors.to(wavelength.device))        # (B, C, K)
        flux = self.flux_unit * torch.sinh((M @ u[..., None])[..., 0])                       # (B, C)
        flux = flux * present * is_point[:, None]
        px = off / pixel_scale.double()[:, None]                                             # (B, 2) pixels
        P = moffat_stamps(px[:, 0], px[:, 1], fwhm_px.double().clamp_min(0.5), self.beta, size)
        return flux[..., None, None] * P
