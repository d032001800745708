"""Spectral energy distributions: real galaxy templates, smooth point-source continua,
Gaussian lines, dust, photometry.

A galaxy's SED is a non-negative mix of the four Coleman, Wu & Weedman (1980) templates
(E, Sbc, Scd, Im; extended by Bolzonella et al. 2000), redshifted, attenuated by a
Calzetti et al. (2000) screen of colour excess `ebv` on top of the templates' own dust,
plus Gaussian emission lines. Everything is linear in the template weights, so
photometry and instrument-convolved spectra come from tables computed once per process:

    sed = GalaxySED(z=0.3, weights=np.array([1e-2, 0, 0, 0]))   # f_lambda amplitudes
    sed.maggies(("des.g", "des.r"))                             # AB maggies per band
    sed.spectrum(wavelength, resolution)                        # 1e-17 erg/s/cm^2/A

Stars and quasars are `SmoothSED`s: a rest-frame continuum tabulated by the caller
(a Planck function, a power law), smooth on the scale of any line spread so it is
sampled, not convolved, plus the same Gaussian lines; a line with negative flux is an
absorption line. Below rest Lyman-alpha the mean transmission of the intergalactic
medium (Faucher-Giguere et al. 2008) multiplies a smooth continuum (shards.attenuation).

Units: `GalaxySED.weights[k]` multiplies template k normalised to f_lambda = 1 at
5500 A rest, so the observed f_lambda(lambda) = sum_k w_k T_k(lambda/(1+z)) / (1+z), in
1e-17 erg/s/cm^2/A. Line fluxes are observed, in 1e-17 erg/s/cm^2.

Band fluxes integrate f_lambda through the real speclite filter curves of the band
registry (photon-counting AB: maggies = int f_lambda R lambda dlambda /
int f_AB,lambda R lambda dlambda). Spectra: the continuum is convolved with a Gaussian
line spread on a fine log-wavelength rest-frame grid (constant resolving power R is a
constant kernel in ln lambda, so the convolution is done once per R knot and the
instrument's R(lambda) interpolates between knots); lines are Gaussians whose width is
the quadrature sum of the gas velocity dispersion and the line spread, integrated over
each pixel analytically. Both are "the fine model convolved at the instrument's
resolution, then sampled on its grid".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import erf

from . import bands as band_registry
from .attenuation import calzetti_k, dust_transmission, igm_transmission  # noqa: F401  (re-exported)

TEMPLATE_NAMES = ("E", "Sbc", "Scd", "Im")
C_KMS = 299792.458
C_ANGSTROM_S = 2.99792458e18
AB_FNU = 3631e-23                # erg/s/cm^2/Hz of an AB magnitude 0 source
F17 = 1e-17                      # spectra and SED amplitudes are in 1e-17 erg/s/cm^2/A
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

# Vacuum rest wavelengths (Angstrom) of the lines we model; doublets carry fixed ratios.
LINES = {
    "OII_3727": 3727.09, "OII_3730": 3729.88, "Hbeta": 4862.68, "OIII_4960": 4960.30,
    "OIII_5008": 5008.24, "NII_6550": 6549.86, "Halpha": 6564.61, "NII_6585": 6585.27,
}
LINE_NAMES = tuple(LINES)
LINE_WAVE = np.array([LINES[k] for k in LINE_NAMES])

# The fine rest-frame grid for convolved continua, uniform in ln(lambda).
_FINE_LN_MIN, _FINE_LN_MAX, _FINE_DLN = np.log(1000.0), np.log(11500.0), 2e-5
# Resolving powers at which the continuum is pre-convolved; R(lambda) interpolates.
R_KNOTS = np.array([1200.0, 1600.0, 2000.0, 2600.0, 3200.0, 4100.0, 5000.0, 6500.0])
# Observed-frame grid for photometry (covers SDSS u to HSC y) and the redshift table.
PHOT_WAVE = np.arange(2900.0, 11600.0, 3.0)
_Z_TABLE = np.linspace(0.0, 1.6, 801)
# Continuum colour excesses at which the photometry is tabulated; log-flux is interpolated.
DUST_GRID = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8])


def shared_data_dir() -> Path:
    """The shared real-data folder: $OMNISKY_SHARED_DATA if set, else ../shared/data beside
    the project checkout (editable install), else ../shared/data or shared/data from the
    working directory (a non-editable install run from a checkout). Raises
    FileNotFoundError naming every place looked in."""
    env = os.environ.get("OMNISKY_SHARED_DATA")
    root = Path(__file__).resolve().parents[1]
    cwd = Path.cwd()
    candidates = ([Path(env)] if env else []) + [root.parent / "shared" / "data",
                                                 cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    for c in candidates:
        if (c / "templates").is_dir():
            return c
    raise FileNotFoundError(
        "omnisky: the shared data folder with templates/CWW_*_ext.sed was not found; looked in "
        f"{[str(c) for c in candidates]}. Set OMNISKY_SHARED_DATA to the folder holding templates/.")


def read_sed_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a two-column SED table -> (wavelength in Angstrom, f_lambda), sorted, finite.

    The unit of the first column is taken from a header comment naming 'Angstrom' or
    'nm'; with neither, a table whose wavelengths all lie below 3000 is read as nm.
    """
    path = Path(path)
    header = " ".join(l.lower() for l in path.read_text().splitlines() if l.lstrip().startswith("#"))
    data = np.loadtxt(path, comments="#", ndmin=2)
    if data.shape[1] < 2 or len(data) < 10:
        raise ValueError(f"{path}: expected >= 10 rows of (wavelength, flux), got shape {data.shape}")
    wave, flux = data[:, 0].astype(np.float64), data[:, 1].astype(np.float64)
    if "angstrom" in header:
        scale = 1.0
    elif " nm" in header or "nanomet" in header:
        scale = 10.0
    else:
        scale = 10.0 if wave.max() < 3000 else 1.0
    wave = wave * scale
    good = np.isfinite(wave) & np.isfinite(flux)
    order = np.argsort(wave[good], kind="stable")
    wave, flux = wave[good][order], np.clip(flux[good][order], 0.0, None)
    wave, idx = np.unique(wave, return_index=True)
    return wave, flux[idx]


@lru_cache(maxsize=None)
def templates() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The four CWW templates as (wavelength A, f_lambda normalised to 1 at 5500 A)."""
    tdir = shared_data_dir() / "templates"
    out = []
    for name in TEMPLATE_NAMES:
        path = tdir / f"CWW_{name}_ext.sed"
        if not path.exists():
            raise FileNotFoundError(f"omnisky: template {path} is missing")
        wave, flux = read_sed_file(path)
        norm = np.interp(5500.0, wave, flux)
        if not norm > 0:
            raise ValueError(f"{path}: f_lambda at 5500 A is {norm}; cannot normalise")
        out.append((wave, flux / norm))
    return tuple(out)


def template_mix(t: float) -> np.ndarray:
    """Weights (4,) of the CWW templates for a continuous type t in [0, 3]
    (0 = E, 1 = Sbc, 2 = Scd, 3 = Im), linear between neighbours; they sum to 1."""
    t = float(np.clip(t, 0.0, 3.0))
    w = np.zeros(len(TEMPLATE_NAMES))
    i = min(int(np.floor(t)), 2)
    w[i], w[i + 1] = 1.0 - (t - i), t - i
    return w


# ---------------------------------------------------------------- photometry tables

@dataclass(frozen=True)
class _PhotTables:
    names: tuple[str, ...]          # band registry names, order of the tables' band axis
    density: np.ndarray             # (B, P): R(lambda) lambda / norm, maggies per (erg/s/cm^2/A) per A
    table: np.ndarray               # (D, Z, K, B): log maggies of template k at colour excess
                                    # DUST_GRID[d] and redshift z, per unit weight


@lru_cache(maxsize=None)
def _phot_tables() -> _PhotTables:
    """Tables for every band in the registry (computed once per process)."""
    names = tuple(band_registry.REGISTRY)
    lam = PHOT_WAVE
    dlam = np.gradient(lam)
    density = np.zeros((len(names), len(lam)))
    for j, name in enumerate(names):
        resp = band_registry.get(name).response
        r = np.interp(lam, np.asarray(resp.wavelength, float), np.asarray(resp.response, float),
                      left=0.0, right=0.0)
        norm = np.sum(AB_FNU * C_ANGSTROM_S / lam ** 2 * r * lam * dlam)
        density[j] = r * lam / norm
    weights = density * dlam * F17                               # (B, P) maggies per f17 sample
    table = np.zeros((len(DUST_GRID), len(_Z_TABLE), len(TEMPLATE_NAMES), len(names)))
    one_plus_z = 1.0 + _Z_TABLE[:, None]                            # (Z, 1)
    rest = lam[None, :] / one_plus_z                                # (Z, P)
    f_obs = [np.interp(rest, tw, tf, left=0.0, right=0.0) / one_plus_z for tw, tf in templates()]  # K x (Z, P)
    k_rest = calzetti_k(rest)
    for d, ebv in enumerate(DUST_GRID):
        screen = 10 ** (-0.4 * k_rest * ebv)                        # (Z, P)
        for k, f in enumerate(f_obs):
            table[d, :, k] = (f * screen) @ weights.T               # (Z, B)
    return _PhotTables(names, density, np.log(np.maximum(table, 1e-300)))


def _band_index(names: tuple[str, ...]) -> np.ndarray:
    tab = _phot_tables()
    try:
        return np.array([tab.names.index(n) for n in names])
    except ValueError:
        unknown = [n for n in names if n not in tab.names]
        raise KeyError(f"unknown band(s) {unknown}; known bands: {sorted(tab.names)}") from None


def template_maggies(z: float, names: tuple[str, ...], ebv: float = 0.0) -> np.ndarray:
    """(K, B) AB maggies of each unit-weight template at redshift z (0 = rest frame),
    behind a Calzetti screen of colour excess ebv (0 .. DUST_GRID[-1])."""
    tab = _phot_tables()
    if not (_Z_TABLE[0] <= z <= _Z_TABLE[-1]):
        raise ValueError(f"redshift {z} outside the photometry table [0, {_Z_TABLE[-1]}]")
    if not (DUST_GRID[0] <= ebv <= DUST_GRID[-1]):
        raise ValueError(f"colour excess ebv={ebv} outside the photometry table [0, {DUST_GRID[-1]}]")
    x = z / (_Z_TABLE[1] - _Z_TABLE[0])
    i = min(int(x), len(_Z_TABLE) - 2)
    f = x - i
    d = min(int(np.searchsorted(DUST_GRID, ebv, side="right")) - 1, len(DUST_GRID) - 2)
    g = (ebv - DUST_GRID[d]) / (DUST_GRID[d + 1] - DUST_GRID[d])
    cols = _band_index(tuple(names))
    t = tab.table[d:d + 2, i:i + 2][..., cols]                      # (2, 2, K, B) log maggies
    t = (1 - g) * t[0] + g * t[1]                                   # log-linear in ebv
    return np.exp((1 - f) * t[0] + f * t[1])


def smooth_maggies(f_obs: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(B,) AB maggies of an observed f_lambda (1e-17 erg/s/cm^2/A) sampled on PHOT_WAVE."""
    tab = _phot_tables()
    return (tab.density[_band_index(tuple(names))] * np.gradient(PHOT_WAVE) * F17) @ f_obs


def line_maggies(line_wave_obs: np.ndarray, line_flux: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(B,) maggies of narrow lines at observed wavelengths (A) with fluxes in 1e-17 erg/s/cm^2
    (negative for absorption lines)."""
    tab = _phot_tables()
    dens = np.stack([np.interp(line_wave_obs, PHOT_WAVE, tab.density[j], left=0.0, right=0.0)
                     for j in _band_index(tuple(names))])          # (B, J)
    return dens @ (np.asarray(line_flux) * F17)



# ---------------------------------------------------------------- convolved continua

@lru_cache(maxsize=None)
def _fine_continua() -> np.ndarray:
    """(R_KNOTS, K, G) templates on the fine ln-lambda rest grid, each convolved with a
    Gaussian line spread of constant resolving power R (sigma_ln = 1 / (2.355 R))."""
    ln_grid = np.arange(_FINE_LN_MIN, _FINE_LN_MAX, _FINE_DLN)
    lam = np.exp(ln_grid)
    base = np.stack([np.interp(lam, tw, tf) for tw, tf in templates()])   # (K, G)
    out = np.zeros((len(R_KNOTS), *base.shape), dtype=np.float32)
    for j, R in enumerate(R_KNOTS):
        sigma_px = 1.0 / (FWHM_PER_SIGMA * R) / _FINE_DLN
        half = int(np.ceil(5 * sigma_px))
        x = np.arange(-half, half + 1)
        kernel = np.exp(-0.5 * (x / sigma_px) ** 2)
        kernel /= kernel.sum()
        for k in range(len(base)):
            # pad with edge values so the ends of the grid are not darkened
            padded = np.pad(base[k], half, mode="edge")
            out[j, k] = fftconvolve(padded, kernel, mode="same")[half:-half]
    return out


def _r_knot_weights(resolution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel's R: the lower knot index and the weight of the upper knot,
    interpolating linearly in 1/R^2 (the kernel variance)."""
    R = np.clip(resolution, R_KNOTS[0], R_KNOTS[-1])
    j = np.clip(np.searchsorted(R_KNOTS, R, side="right") - 1, 0, len(R_KNOTS) - 2)
    v, v0, v1 = 1 / R ** 2, 1 / R_KNOTS[j] ** 2, 1 / R_KNOTS[j + 1] ** 2
    return j, (v0 - v) / (v0 - v1)


def pixel_edges(wavelength: np.ndarray) -> np.ndarray:
    """(L+1,) pixel edges halfway between centres, extrapolated at the ends."""
    mid = 0.5 * (wavelength[1:] + wavelength[:-1])
    return np.concatenate([[2 * wavelength[0] - mid[0]], mid, [2 * wavelength[-1] - mid[-1]]])


@dataclass
class _LineSED:
    """The Gaussian lines shared by every SED: at rest wavelengths `line_wave` (J,), A;
    observed fluxes `line_flux` (J,), 1e-17 erg/s/cm^2, negative for absorption; velocity
    dispersion `sigma_v`, km/s, one for all lines or one per line (J,)."""

    def _line_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wave = LINE_WAVE if self.line_wave is None else np.asarray(self.line_wave, float)
        flux = np.asarray(self.line_flux, float)
        if flux.shape != wave.shape:
            raise ValueError(f"{type(self).__name__}: line_flux has shape {flux.shape}, "
                             f"line_wave {wave.shape}")
        return wave, flux, np.broadcast_to(np.asarray(self.sigma_v, float), wave.shape)

    def line_maggies(self, names: tuple[str, ...]) -> np.ndarray:
        wave, flux, _ = self._line_arrays()
        return line_maggies(wave * (1 + self.z), flux, names)

    def _lines(self, wavelength: np.ndarray, resolution: np.ndarray) -> np.ndarray:
        wave, flux, sigma_v = self._line_arrays()
        on = flux != 0
        if not on.any():
            return np.zeros_like(wavelength)
        centre = wave[on] * (1 + self.z)                                   # (J,)
        R_at = np.interp(centre, wavelength, resolution)
        sigma = np.hypot(centre * sigma_v[on] / C_KMS, centre / (FWHM_PER_SIGMA * R_at))
        edges = pixel_edges(wavelength)                                   # (L+1,)
        out = np.zeros(len(wavelength))
        lo = np.searchsorted(edges, centre - 8 * sigma)                   # only +-8 sigma around each line
        hi = np.searchsorted(edges, centre + 8 * sigma)
        for c, s, f, a, b in zip(centre, sigma, flux[on], lo, hi):
            a, b = max(a - 1, 0), min(b + 1, len(edges))
            if b - a < 2:
                continue
            frac = 0.5 * np.diff(erf((edges[a:b] - c) / (np.sqrt(2) * s)))   # flux fraction per pixel
            out[a:b - 1] += f * frac
        return out / np.diff(edges)


@dataclass
class GalaxySED(_LineSED):
    """An observed-frame galaxy SED.

    z:         redshift.
    weights:   (4,) template amplitudes: f_lambda in 1e-17 erg/s/cm^2/A at 5500 A rest,
               before the 1/(1+z) of redshifting and before the dust screen.
    line_flux: (J,) observed line fluxes, 1e-17 erg/s/cm^2, for LINE_NAMES (rest LINE_WAVE).
    sigma_v:   gas velocity dispersion of the lines, km/s.
    ebv:       E(B-V) of a Calzetti screen over the continuum (the lines carry their own).
    line_wave: (J,) rest wavelengths of the lines, A; None: LINE_WAVE.
    """
    z: float
    weights: np.ndarray
    line_flux: np.ndarray = field(default_factory=lambda: np.zeros(len(LINE_NAMES)))
    sigma_v: float = 80.0
    ebv: float = 0.0
    line_wave: np.ndarray | None = None

    def __add__(self, other: "GalaxySED") -> "GalaxySED":
        if other.z != self.z or other.ebv != self.ebv or other.line_wave is not self.line_wave:
            raise ValueError("cannot add SEDs at different redshifts, dust or line lists")
        has = np.any(self.line_flux)
        return GalaxySED(self.z, self.weights + other.weights, self.line_flux + other.line_flux,
                         self.sigma_v if has else other.sigma_v, self.ebv, self.line_wave)

    def scaled(self, a: float) -> "GalaxySED":
        return replace(self, weights=self.weights * a, line_flux=self.line_flux * a)

    def continuum(self, wavelength: np.ndarray) -> np.ndarray:
        """Unconvolved observed continuum f_lambda (1e-17 erg/s/cm^2/A) at `wavelength` (A)."""
        rest = np.asarray(wavelength, float) / (1 + self.z)
        f = np.zeros_like(rest)
        for w, (tw, tf) in zip(self.weights, templates()):
            if w != 0:
                f += w * np.interp(rest, tw, tf, left=0.0, right=0.0)
        return f * dust_transmission(rest, self.ebv) / (1 + self.z)

    def maggies(self, names: tuple[str, ...]) -> np.ndarray:
        """(B,) AB maggies through the registry bands `names` (continuum + lines)."""
        return self.weights @ template_maggies(self.z, names, self.ebv) + self.line_maggies(names)

    def spectrum(self, wavelength: np.ndarray, resolution: np.ndarray) -> np.ndarray:
        """Observed f_lambda (1e-17 erg/s/cm^2/A) on the pixel centres `wavelength` (A),
        convolved with a Gaussian line spread of resolving power `resolution` (per pixel).
        The dust screen, smooth on the scale of the line spread, multiplies afterwards."""
        wavelength = np.asarray(wavelength, float)
        fine = _fine_continua()                                         # (R, K, G)
        x = (np.log(wavelength / (1 + self.z)) - _FINE_LN_MIN) / _FINE_DLN
        if x.min() < 0 or x.max() > fine.shape[-1] - 2:
            raise ValueError(f"spectrum at z={self.z} needs rest wavelengths outside the templates' grid")
        i = x.astype(np.int64)
        f = x - i
        active = np.flatnonzero(self.weights)
        w = self.weights[active]
        j, u = _r_knot_weights(np.asarray(resolution, float))
        flux = np.zeros(len(wavelength))
        for r_idx, r_w in ((j, 1 - u), (j + 1, u)):          # the two bracketing R knots
            for ii, i_w in ((i, 1 - f), (i + 1, f)):          # linear interpolation on the grid
                vals = fine[r_idx[None, :], active[:, None], ii[None, :]]   # (K', L)
                flux += r_w * i_w * (w @ vals)
        flux = flux * dust_transmission(wavelength / (1 + self.z), self.ebv) / (1 + self.z)
        return flux + self._lines(wavelength, resolution)


@dataclass
class SmoothSED(_LineSED):
    """A point source's observed-frame SED: a smooth rest-frame continuum plus lines.

    z:         redshift (a star's is its radial velocity / c).
    rest_wave: (P,) rest wavelengths, A, increasing; rest_flux: (P,) f_lambda there, in
               1e-17 erg/s/cm^2/A as observed (the 1/(1+z) of redshifting included).
    line_flux, line_wave, sigma_v: the lines (see _LineSED); sigma_v may be per line.
    """
    z: float
    rest_wave: np.ndarray
    rest_flux: np.ndarray
    line_flux: np.ndarray
    line_wave: np.ndarray
    sigma_v: float | np.ndarray = 80.0

    def scaled(self, a: float) -> "SmoothSED":
        return replace(self, rest_flux=self.rest_flux * a, line_flux=self.line_flux * a)

    def continuum(self, wavelength: np.ndarray) -> np.ndarray:
        """Observed continuum f_lambda (1e-17 erg/s/cm^2/A) at `wavelength` (A), after the
        intergalactic medium."""
        wavelength = np.asarray(wavelength, float)
        f = np.interp(wavelength / (1 + self.z), self.rest_wave, self.rest_flux, left=0.0, right=0.0)
        return f * igm_transmission(wavelength, self.z) if self.z > 0 else f

    def maggies(self, names: tuple[str, ...]) -> np.ndarray:
        """(B,) AB maggies through the registry bands `names` (continuum + lines)."""
        return smooth_maggies(self.continuum(PHOT_WAVE), names) + self.line_maggies(names)

    def spectrum(self, wavelength: np.ndarray, resolution: np.ndarray) -> np.ndarray:
        """Observed f_lambda (1e-17 erg/s/cm^2/A) on the pixel centres `wavelength` (A):
        the continuum sampled (it is smooth on the line-spread scale), lines convolved."""
        return self.continuum(wavelength) + self._lines(np.asarray(wavelength, float), resolution)


@dataclass
class CompositeSED:
    """The sum of SEDs at one redshift (a galaxy's bulge and its dusty disk)."""
    parts: tuple

    @property
    def z(self) -> float:
        return self.parts[0].z

    def continuum(self, wavelength: np.ndarray) -> np.ndarray:
        return sum(p.continuum(wavelength) for p in self.parts)

    def maggies(self, names: tuple[str, ...]) -> np.ndarray:
        return sum(p.maggies(names) for p in self.parts)

    def spectrum(self, wavelength: np.ndarray, resolution: np.ndarray) -> np.ndarray:
        return sum(p.spectrum(wavelength, resolution) for p in self.parts)
