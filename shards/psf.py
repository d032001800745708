"""Point spread functions of coadded images: a Moffat per band and per exposure.

    psf = draw_coadd_psf(survey, rng, seeing_scale=1.0)    # CoaddPSF, bands x exposures
    psf.otf(k)             # (C, *k.shape) transfer functions at |k| cycles/arcsec
    psf.fwhm_effective()   # (C,) FWHM of each band's coadded PSF, arcsec

A coadd of E exposures has the PSF sum_e w_e Moffat(FWHM_e): each exposure's FWHM is
the survey's median times a per-object field factor (`seeing_scale`, shared by the bands)
times a lognormal per-exposure draw (`ImagingSurvey.seeing_scatter`). The exposures are
weighted equally (DES and HSC coadds weight by sky variance, not seeing, and the sky
variance of exposures in one band varies much less than their seeing). Everything is
analytic: the Moffat transfer function is its Hankel transform, so no PSF image is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import gamma, kv


@lru_cache(maxsize=None)
def _moffat_otf_table(beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Radial transfer function of a unit-flux Moffat of alpha = 1, tabulated in
    u = 2 pi k alpha: OTF = 2^(2-beta) / Gamma(beta-1) u^(beta-1) K_(beta-1)(u)."""
    u = np.linspace(0.0, 80.0, 8001)
    nu = beta - 1
    otf = np.ones_like(u)
    otf[1:] = 2 ** (1 - nu) / gamma(nu) * u[1:] ** nu * kv(nu, u[1:])
    return u, otf


def moffat_alpha(fwhm: np.ndarray, beta: float) -> np.ndarray:
    """Moffat core radius alpha (arcsec) for a FWHM (arcsec)."""
    return np.asarray(fwhm) / (2 * np.sqrt(2 ** (1 / beta) - 1))


def moffat_otf(fwhm: np.ndarray, beta: float, k: np.ndarray) -> np.ndarray:
    """(C, *k.shape) transfer functions of unit-flux Moffat PSFs at spatial frequencies
    |k| (cycles/arcsec), from the analytic Hankel transform (no PSF image, no FFT)."""
    alpha = moffat_alpha(fwhm, beta)                                       # (C,)
    u_tab, otf_tab = _moffat_otf_table(float(beta))
    du = u_tab[1] - u_tab[0]
    # linear interpolation on the uniform table, by index (faster than a search)
    x = np.minimum((2 * np.pi / du) * k[None] * alpha.reshape(-1, *([1] * k.ndim)),
                   len(u_tab) - 1.001).astype(np.float32)            # (C, *k.shape)
    i = x.astype(np.int32)
    f = x - i
    otf = otf_tab.astype(np.float32)
    return otf[i] * (1 - f) + otf[i + 1] * f


def moffat_profile(r: np.ndarray, fwhm: np.ndarray, beta: float) -> np.ndarray:
    """Surface brightness (arcsec^-2) of unit-flux Moffats of the given FWHM at radius r;
    broadcasts r against fwhm."""
    alpha = moffat_alpha(fwhm, beta)
    return (beta - 1) / (np.pi * alpha ** 2) * (1 + (r / alpha) ** 2) ** (-beta)


@dataclass(frozen=True)
class CoaddPSF:
    """The PSF of a coadd: per band c, sum_e weight[c, e] Moffat(fwhm[c, e], beta).

    fwhm:   (C, E) per-exposure FWHM, arcsec.
    weight: (C, E) exposure weights, each row summing to 1 (unused exposures weigh 0).
    beta:   Moffat beta."""
    fwhm: np.ndarray
    weight: np.ndarray
    beta: float

    @classmethod
    def single(cls, fwhm: np.ndarray, beta: float) -> "CoaddPSF":
        """One Moffat per band: fwhm (C,)."""
        fwhm = np.asarray(fwhm, np.float64).reshape(-1, 1)
        return cls(fwhm, np.ones_like(fwhm), float(beta))

    @property
    def n_bands(self) -> int:
        return self.fwhm.shape[0]

    def otf(self, k: np.ndarray) -> np.ndarray:
        """(C, *k.shape) float32 transfer functions at |k| (cycles/arcsec)."""
        out = np.zeros((self.n_bands, *k.shape), np.float32)
        for e in range(self.fwhm.shape[1]):
            w = self.weight[:, e].astype(np.float32).reshape(-1, *([1] * k.ndim))
            out += w * moffat_otf(self.fwhm[:, e], self.beta, k)
        return out

    def profile(self, r: np.ndarray) -> np.ndarray:
        """(C, *r.shape) surface brightness (arcsec^-2) at radius r (arcsec)."""
        r = np.asarray(r, np.float64)
        shape = (self.n_bands, self.fwhm.shape[1]) + (1,) * r.ndim
        per_exposure = moffat_profile(r[None, None], self.fwhm.reshape(shape), self.beta)
        return (self.weight.reshape(shape) * per_exposure).sum(1)

    def fwhm_effective(self) -> np.ndarray:
        """(C,) FWHM of each band's coadded PSF (arcsec): twice the radius where the
        summed profile falls to half its peak, by bisection (the profile is monotonic)."""
        peak = self.profile(np.zeros(1))[:, 0]                              # (C,)
        lo = np.zeros(self.n_bands)
        hi = self.fwhm.max(1) * 2.0
        for _ in range(48):
            mid = (lo + hi) / 2
            at_mid = (self.weight * moffat_profile(mid[:, None], self.fwhm, self.beta)).sum(1)   # (C,)
            above = at_mid > peak / 2
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return (lo + hi).astype(np.float32)                                  # 2 * radius


def draw_coadd_psf(median_fwhm: np.ndarray, n_exposures: np.ndarray, seeing_scatter: float,
                   beta: float, rng: np.random.Generator, seeing_scale: float = 1.0) -> CoaddPSF:
    """A coadd PSF: band c stacks n_exposures[c] exposures whose FWHM is
    median_fwhm[c] * seeing_scale * exp(seeing_scatter * N(0, 1)), weighted equally."""
    n_exposures = np.maximum(np.asarray(n_exposures, int), 1)
    e_max = int(n_exposures.max())
    used = np.arange(e_max)[None, :] < n_exposures[:, None]                  # (C, E)
    draws = np.exp(seeing_scatter * rng.standard_normal((len(n_exposures), e_max)))
    fwhm = np.asarray(median_fwhm, np.float64)[:, None] * seeing_scale * draws
    fwhm = np.where(used, fwhm, fwhm[:, :1])                                  # unused: any valid value
    weight = used / n_exposures[:, None]
    return CoaddPSF(fwhm, weight.astype(np.float64), float(beta))
