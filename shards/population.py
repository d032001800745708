"""Where the objects of a flux-limited sky lie: distances, luminosity functions, and the
redshift distribution at a given apparent magnitude.

    table = RedshiftTable(z_grid, {"red": (phi_red, k_red), "blue": (phi_blue, k_blue)})
    name, z = table.draw(mag_r=17.5, rng=rng)

An apparent magnitude m is drawn from the number counts; given m, the population and the
redshift are drawn from p(pop, z | m) ~ dV/dz(z) phi_pop(M = m - DM(z) - K_pop(z), z), the
luminosity function seen through the volume element. The redshift distribution of every
survey then follows its depth: SDSS-like r < 17.77 gives a median z ~ 0.1, r < 22 ~ 0.5.
Cosmology: Planck 2018 (astropy).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

M_GRID = np.arange(8.0, 28.0001, 0.05)             # apparent magnitudes of the tables


@lru_cache(maxsize=None)
def _distances() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """z grid, luminosity distance (Mpc), angular diameter distance (kpc), comoving volume
    per unit redshift per steradian (Mpc^3), Planck18."""
    from astropy.cosmology import Planck18
    z = np.linspace(0.0, 5.0, 2501)
    z[0] = 1e-4
    dvdz = Planck18.differential_comoving_volume(z).value
    return (z, Planck18.luminosity_distance(z).value, Planck18.angular_diameter_distance(z).value * 1e3,
            dvdz)


def distance_modulus(z) -> np.ndarray | float:
    zg, dl, _, _ = _distances()
    out = 5 * np.log10(np.interp(z, zg, dl) * 1e5)                   # D_L / 10 pc
    return float(out) if np.ndim(out) == 0 else out


def kpc_per_arcsec(z: float) -> float:
    zg, _, da, _ = _distances()
    return float(np.interp(z, zg, da) / 206264.806)


def comoving_volume_element(z) -> np.ndarray:
    """dV/dz per steradian, Mpc^3."""
    zg, _, _, dvdz = _distances()
    return np.interp(z, zg, dvdz)


def magnitude_from_counts(u: float, slope: float, lo: float, hi: float) -> float:
    """Inverse CDF of number counts p(m) ~ 10^(slope m) on [lo, hi] at the uniform draw u."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return float(np.log10(a + u * (b - a)) / slope)


def schechter(M: np.ndarray, m_star: float, alpha: float, phi_star: float) -> np.ndarray:
    """Schechter (1976) luminosity function per magnitude, Mpc^-3 mag^-1."""
    x = 10 ** (-0.4 * (np.asarray(M) - m_star))
    return 0.4 * np.log(10) * phi_star * x ** (alpha + 1) * np.exp(-np.minimum(x, 700.0))


def double_power_law(M: np.ndarray, m_star: float, alpha: float, beta: float, phi_star: float) -> np.ndarray:
    """Quasar luminosity function phi* / (10^(0.4 (alpha+1) (M-M*)) + 10^(0.4 (beta+1) (M-M*))),
    Mpc^-3 mag^-1 (Boyle et al. 2000)."""
    d = np.asarray(M) - m_star
    return phi_star / (10 ** (0.4 * (alpha + 1) * d) + 10 ** (0.4 * (beta + 1) * d))


# phi(M, z) -> Mpc^-3 mag^-1; K(z) -> K-correction (mag) so that m = M + DM(z) + K(z)
Population = tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


class RedshiftTable:
    """p(population, z | m) on a grid of apparent magnitudes (M_GRID) and redshifts.

    z_grid: (Z,) increasing cell centres; populations: {name: (phi, kcorr)}."""

    def __init__(self, z_grid: np.ndarray, populations: dict[str, Population]):
        self.names = tuple(populations)
        self.z = np.asarray(z_grid, float)
        self.dz = np.gradient(self.z)
        dm = distance_modulus(self.z)                                   # (Z,)
        dens = []
        for name in self.names:
            phi, kcorr = populations[name]
            M = M_GRID[:, None] - dm[None, :] - np.asarray(kcorr(self.z))[None, :]   # (m, Z)
            dens.append(phi(M, self.z[None, :]) * comoving_volume_element(self.z)[None, :] * self.dz)
        dens = np.stack(dens, axis=1)                                   # (m, P, Z)
        self.counts = dens.sum((1, 2))                                  # (m,) objects per mag per sr
        flat = dens.reshape(len(M_GRID), -1)
        total = flat.sum(1, keepdims=True)
        if not np.all(total > 0):
            raise ValueError("RedshiftTable: a magnitude of M_GRID has no objects in any population")
        self.cdf = np.cumsum(flat / total, axis=1)                      # (m, P*Z)

    def draw(self, mag: float, rng: np.random.Generator) -> tuple[str, float]:
        """(population name, redshift) for an object of apparent magnitude `mag`."""
        row = int(np.clip(np.rint((mag - M_GRID[0]) / (M_GRID[1] - M_GRID[0])), 0, len(M_GRID) - 1))
        cell = min(int(np.searchsorted(self.cdf[row], rng.random() * self.cdf[row, -1])), self.cdf.shape[1] - 1)
        p, j = divmod(cell, len(self.z))
        z = self.z[j] + (rng.random() - 0.5) * self.dz[j]
        return self.names[p], float(z)

    def median_z(self, mag: float) -> float:
        """Median redshift of every population at apparent magnitude `mag` (for checks)."""
        row = int(np.clip(np.rint((mag - M_GRID[0]) / (M_GRID[1] - M_GRID[0])), 0, len(M_GRID) - 1))
        per_z = np.diff(np.concatenate([[0.0], self.cdf[row]])).reshape(len(self.names), -1).sum(0)
        return float(np.interp(0.5, np.cumsum(per_z), self.z))
