"""Stars: point sources with a Planck continuum and absorption lines.

    s = draw_star(mag_r=19.0, rng=rng)      # {"params": ..., "sed": SmoothSED}

A high-latitude field at r ~ 16-23 is mostly halo and thick-disk main-sequence stars
near the turn-off (T_eff ~ 5500-6500 K) and disk K and M dwarfs (3200-5000 K), with a
few hot stars (white dwarfs, blue horizontal branch; 8000-20000 K) (e.g. Juric et al.
2008). The continuum is a Planck function at T_eff; the lines are Gaussian absorption
lines whose equivalent widths follow the spectral type: the Balmer series peaks in A
stars (~12 A at 9500 K, ~4 A in the Sun), the metal lines (Ca II H & K, Mg b, Na D, the
Ca II triplet) grow towards cooler stars. Radial velocities: 40 km/s (disk) or 120 km/s
(halo) dispersions; the star's redshift is v / c.
"""
from __future__ import annotations

import numpy as np

from .sed import C_KMS, SmoothSED

DES_R = ("des.r",)
# vacuum rest wavelengths, A
BALMER = {"Halpha": 6564.61, "Hbeta": 4862.68, "Hgamma": 4341.68, "Hdelta": 4102.89, "Hepsilon": 3971.20}
METALS = {"CaII_K": 3934.78, "CaII_H": 3969.59, "Mgb": 5176.7, "NaD": 5894.6,
          "CaII_8500": 8500.36, "CaII_8544": 8544.44, "CaII_8664": 8664.52}
# equivalent width (A) of each metal line in the coolest stars, per unit of `_metal_strength`
METAL_EW = {"CaII_K": 12.0, "CaII_H": 8.0, "Mgb": 4.0, "NaD": 4.0,
            "CaII_8500": 1.5, "CaII_8544": 3.5, "CaII_8664": 3.0}
STAR_LINES = {**BALMER, **METALS}
STAR_LINE_WAVE = np.array(list(STAR_LINES.values()))
_REST_WAVE = np.geomspace(900.0, 25000.0, 1500)
_HC_K = 1.438777e8                       # h c / k_B, Angstrom K
MAX_DEPTH = 0.6                          # deepest absorption, as a fraction of the continuum


def planck_flambda(wave: np.ndarray, teff: float) -> np.ndarray:
    """Planck f_lambda shape lambda^-5 / (exp(hc / lambda k T) - 1), normalised at 5500 A."""
    def b(w):
        return w ** -5.0 / np.expm1(np.minimum(_HC_K / (w * teff), 700.0))
    return b(np.asarray(wave, float)) / b(5500.0)


def balmer_ew(teff: float) -> float:
    """Equivalent width (A) of the stronger Balmer lines at T_eff (peak in A stars)."""
    return float(1.0 + 11.0 * np.exp(-0.5 * ((np.log10(teff) - np.log10(9500.0)) / 0.13) ** 2))


def _metal_strength(teff: float) -> float:
    return float(np.clip((7000.0 - teff) / 3000.0, 0.05, 1.2))


def draw_teff(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.55:                                                   # turn-off stars
        return float(np.clip(rng.normal(6000.0, 450.0), 4800.0, 7500.0))
    if u < 0.97:                                                   # K and M dwarfs
        return float(10 ** rng.uniform(np.log10(3200.0), np.log10(5000.0)))
    return float(10 ** rng.uniform(np.log10(8000.0), np.log10(20000.0)))   # hot stars


def star_sed(teff: float, rv: float) -> SmoothSED:
    """The SED (unnormalised) of a star of T_eff (K) and radial velocity rv (km/s)."""
    z = rv / C_KMS
    cont = planck_flambda(_REST_WAVE, teff)
    ew = np.array([balmer_ew(teff) * (0.6 if name in ("Halpha", "Hepsilon") else 1.0) for name in BALMER]
                  + [METAL_EW[name] * _metal_strength(teff) for name in METALS])
    at_line = np.interp(STAR_LINE_WAVE, _REST_WAVE, cont)
    # line widths: pressure-broadened Balmer wings in hot stars, metal lines ~ 100 km/s, and
    # no line deeper than MAX_DEPTH of the continuum (strong lines grow by their damping wings)
    sigma_v = np.array([150.0 + 60.0 * balmer_ew(teff)] * len(BALMER) + [100.0] * len(METALS))
    sigma_v = np.maximum(sigma_v, C_KMS * ew / (MAX_DEPTH * np.sqrt(2 * np.pi) * STAR_LINE_WAVE))
    return SmoothSED(z, _REST_WAVE, cont, -ew * at_line * (1 + z), STAR_LINE_WAVE, sigma_v)


def draw_star(mag_r: float, rng: np.random.Generator) -> dict:
    """A star of DES r magnitude mag_r: {'params': dict of floats, 'sed': SmoothSED}."""
    teff = draw_teff(rng)
    rv = float(rng.normal(0.0, 40.0 if teff < 5000.0 else 120.0))
    sed = star_sed(teff, rv)
    sed = sed.scaled(10 ** (-0.4 * mag_r) / sed.maggies(DES_R)[0])
    params = dict(z=float(sed.z), mag_r=float(mag_r), teff=teff, rv=rv, ew_balmer=balmer_ew(teff),
                  r_half=0.0)
    return dict(params=params, sed=sed)
