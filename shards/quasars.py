"""Quasars: point sources with a power-law continuum and broad emission lines.

    q = draw_quasar(mag_r=20.0, z_max=3.5, rng=rng)   # {"params": ..., "sed": SmoothSED}

Continuum: f_nu ~ nu^alpha_nu with alpha_nu ~ N(-0.44, 0.3) blueward of 5000 A rest and
-2.45 redward (the break of the SDSS composite, Vanden Berk et al. 2001), attenuated by
the mean Lyman-alpha forest (sed.igm_transmission). Lines: the composite's equivalent
widths (Vanden Berk et al. 2001, with a 0.15 dex lognormal scatter and the Baldwin effect
left out), broad lines of FWHM 3000-5000 km/s, narrow [OIII] of sigma 200 km/s.
Redshift given the apparent magnitude: the pure-luminosity-evolution double power law
of the 2SLAQ+SDSS luminosity function (Croom et al. 2009: M*_g(z) = -22.17 -
2.5 (1.46 z - 0.328 z^2), alpha = -3.33, beta = -1.42, phi* = 1.67e-6 Mpc^-3 mag^-1), its
K-correction from the mean SED, through shards.population.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .population import RedshiftTable, double_power_law
from .sed import FWHM_PER_SIGMA, SmoothSED

DES_R = ("des.r",)
# name: (vacuum rest wavelength A, rest equivalent width A, broad)
QSO_LINES = {
    "Lyalpha": (1215.67, 92.0, True), "NV": (1240.14, 10.0, True), "SiIV": (1399.8, 8.0, True),
    "CIV": (1549.06, 24.0, True), "CIII": (1908.73, 22.0, True), "MgII": (2798.75, 32.0, True),
    "Hgamma": (4341.68, 13.0, True), "Hbeta": (4862.68, 46.0, True), "OIII_4960": (4960.30, 4.0, False),
    "OIII_5008": (5008.24, 13.0, False), "Halpha": (6564.61, 195.0, True),
}
QSO_LINE_WAVE = np.array([v[0] for v in QSO_LINES.values()])
_EW = np.array([v[1] for v in QSO_LINES.values()])
_BROAD = np.array([v[2] for v in QSO_LINES.values()])
_REST_WAVE = np.geomspace(600.0, 25000.0, 2000)
_BREAK = 5000.0
LF = dict(m_star=-22.17, k1=1.46, k2=-0.328, alpha=-3.33, beta=-1.42, phi_star=1.67e-6)


def quasar_sed(z: float, alpha_nu: float, fwhm: float, ew_scale: np.ndarray) -> SmoothSED:
    """Unnormalised quasar SED at redshift z: slope alpha_nu, broad-line FWHM (km/s),
    per-line multipliers of the composite's equivalent widths (J,)."""
    w = _REST_WAVE
    f_nu = np.where(w < _BREAK, (w / _BREAK) ** -alpha_nu, (w / _BREAK) ** 2.45)
    cont = f_nu / w ** 2 * _BREAK ** 2 / (1 + z)                   # f_lambda, 1 at 5000 A rest
    line_flux = _EW * ew_scale * (1 + z) * np.interp(QSO_LINE_WAVE, w, cont)   # observed: EW (1+z) f_lambda
    sigma_v = np.where(_BROAD, fwhm / FWHM_PER_SIGMA, 200.0)
    return SmoothSED(z, w, cont, line_flux, QSO_LINE_WAVE, sigma_v)


def _kcorr(z: np.ndarray) -> np.ndarray:
    """K(z) in DES r of the mean quasar SED: m = M_r(rest) + DM + K."""
    ones = np.ones(len(_EW))
    rest = quasar_sed(0.0, -0.44, 4000.0, ones).maggies(DES_R)[0]
    return np.array([-2.5 * np.log10(quasar_sed(float(zi), -0.44, 4000.0, ones).maggies(DES_R)[0] / rest)
                     for zi in np.atleast_1d(z)])


def _phi(M: np.ndarray, z: np.ndarray) -> np.ndarray:
    m_star = LF["m_star"] - 2.5 * (LF["k1"] * z + LF["k2"] * z ** 2)
    return double_power_law(M, m_star, LF["alpha"], LF["beta"], LF["phi_star"])


@lru_cache(maxsize=8)
def redshift_table(z_max: float) -> RedshiftTable:
    """p(z | DES r) of quasars on [0.1, z_max] (built once per process)."""
    z = np.arange(0.1, z_max + 1e-9, 0.01)
    return RedshiftTable(z, {"qso": (_phi, _kcorr)})


def draw_quasar(mag_r: float, z_max: float, rng: np.random.Generator) -> dict:
    """A quasar of DES r magnitude mag_r: {'params': dict of floats, 'sed': SmoothSED}."""
    _, z = redshift_table(z_max).draw(mag_r, rng)
    alpha_nu = float(rng.normal(-0.44, 0.3))
    fwhm = float(rng.uniform(3000.0, 5000.0))
    ew_scale = 10 ** (0.15 * rng.standard_normal(len(_EW)))
    sed = quasar_sed(z, alpha_nu, fwhm, ew_scale)
    sed = sed.scaled(10 ** (-0.4 * mag_r) / sed.maggies(DES_R)[0])
    params = dict(z=z, mag_r=float(mag_r), alpha_nu=alpha_nu, fwhm_broad=fwhm, r_half=0.0,
                  **{f"ew_{name.lower()}": float(e) for name, e in zip(QSO_LINES, _EW * ew_scale)})
    return dict(params=params, sed=sed)
