"""Attenuation of light on its way to us: a dust screen in the source (Calzetti et al.
2000) and the mean Lyman-alpha forest of the intergalactic medium (Faucher-Giguere et
al. 2008). Both are smooth on the scale of any spectrograph's line spread.

    f_obs = f * dust_transmission(wave_rest, ebv) * igm_transmission(wave_obs, z)
"""
from __future__ import annotations

import numpy as np

LYMAN_ALPHA, LYMAN_LIMIT = 1215.67, 911.75


def calzetti_k(wave_rest: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) k(lambda) = A_lambda / E(B-V)_stars, R_V = 4.05, at rest
    wavelengths in A (held constant beyond its 0.12-2.2 micron range)."""
    x = np.clip(np.asarray(wave_rest, float) / 1e4, 0.12, 2.2)
    blue = 2.659 * (-2.156 + 1.509 / x - 0.198 / x ** 2 + 0.011 / x ** 3) + 4.05
    red = 2.659 * (-1.857 + 1.040 / x) + 4.05
    return np.where(x < 0.63, blue, red)


def dust_transmission(wave_rest: np.ndarray, ebv: float) -> np.ndarray:
    """10^(-0.4 k(lambda) E(B-V)): the fraction of light a Calzetti screen lets through."""
    return 10 ** (-0.4 * calzetti_k(wave_rest) * ebv)


def igm_transmission(wave_obs: np.ndarray, z: float) -> np.ndarray:
    """Mean intergalactic transmission of a source at redshift z: exp(-tau) with the
    Lyman-alpha forest tau = 0.0018 (1 + z_abs)^3.92 (Faucher-Giguere et al. 2008),
    1 + z_abs = lambda_obs / 1215.67, blueward of the source's Lyman-alpha; no flux
    below its Lyman limit."""
    wave_obs = np.asarray(wave_obs, float)
    rest = wave_obs / (1 + z)
    tau = 0.0018 * np.clip(wave_obs / LYMAN_ALPHA, 1.0, None) ** 3.92
    return np.where(rest >= LYMAN_ALPHA, 1.0, np.where(rest > LYMAN_LIMIT, np.exp(-tau), 0.0))
