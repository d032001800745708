"""The galaxy population: redshift and colour from luminosity functions, bulge + disk
structure, sizes, dust and emission lines.

    g = draw_galaxy(mag_r=19.0, z_min=0.02, z_max=1.2, r_half_max=2.0, rng=rng)
    g["params"], g["bulge"], g["disk"], g["profile"]       # dict, GalaxySED x 2, render.Profile

Each choice with its source:
- red and blue galaxies have their own Schechter luminosity functions (rest r, h = 0.7):
  red M* = -21.6, alpha = -0.4, phi* = 2.4e-3 Mpc^-3; blue M* = -21.35, alpha = -1.1,
  phi* = 1.1e-3, near the SDSS/GAMA colour-split fits (Blanton et al. 2005, Loveday et
  al. 2012) and tuned within them so that an r < 17.77 catalog matches the redshifts and
  colours of real SDSS galaxies (bench/sky.py); evolution to z ~ 1 as measured by
  DEEP2/COMBO-17 and GAMA (Faber et al. 2007, Loveday et al. 2012): M* brightens by 1.0 (red) and 1.2 (blue) mag per
  unit z, the red phi* halves from z = 0 to 1. Given the apparent magnitude, (red/blue,
  z) is drawn from p(pop, z | m) (shards.population), so the redshift distribution and
  the red fraction follow the survey depth;
- colours as a CWW template type t (0 = E .. 3 = Im) with colour-magnitude relations:
  the red sequence t ~ N(0.25 + 0.04 (M_r + 21), 0.06) (the CWW E template alone is
  ~0.1 mag redder in g-r than SDSS red galaxies), the blue cloud t ~ N(0.95 + 0.2
  (M_r + 21), 0.35), later types at lower luminosity. Red galaxies: half pure bulges,
  the rest bulge-dominated with a disk; blue: a disk, 30% with a small bulge (as in
  SDSS fits); bulges have red-sequence colours;
- dust: a gas E(B-V) rising with stellar mass (Garn & Best 2010) and disk inclination;
  disks get a Calzetti screen of 0.44 x the gas excess beyond the 0.15 that the
  empirical templates already hold; bulges a half-normal E(B-V) of scale 0.05 (dusty
  early types), which gives the red sequence its spread in r-i;
- stellar mass from the rest-frame r luminosity and the Bell et al. (2003) g-r M/L
  (-0.093 dex to Chabrier); size from van der Wel et al. (2014) size-mass relations;
- H-alpha EW = 63 A x sSFR / Gyr^-1 (Fumagalli et al. 2012), sSFR ~ (1+z)^1.8.
  Line ratios: H-alpha/H-beta = 2.86 (case B, Osterbrock & Ferland 2006) reddened by
  the gas E(B-V) with Calzetti (2000) k values; [NII]6584/H-alpha falling from massive to
  dwarf types; [OIII]5007/H-beta 0.1 dex below the Kauffmann et al. (2003) star-forming
  line at that [NII]/H-alpha; [OII]3727/H-alpha = 0.56 (ratio of the Kennicutt 1998
  SFR calibrations), reddened; doublet ratios [OIII] 2.98, [NII] 3.05, [OII] 3729/3726 = 1.3.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import gammainc

from .population import RedshiftTable, distance_modulus, kpc_per_arcsec, schechter
from .render import Profile, sersic_b
from .sed import LINE_NAMES, LINES, GalaxySED, calzetti_k, template_maggies, template_mix

DES_R = "des.r"
# Schechter parameters (rest r, h = 0.7): M*(0), alpha, phi*(0) Mpc^-3, dM*/dz, dlog10 phi*/dz
LF_RED = (-21.6, -0.4, 2.4e-3, -1.0, -0.3)
LF_BLUE = (-21.35, -1.1, 1.1e-3, -1.2, 0.0)
T_RED, T_BLUE = 0.15, 1.2                       # template types of the K-corrections in the tables
# Colour-magnitude relations, as template type t ~ N(a + b (M_r + 21), c): the red sequence
# (brighter is redder) clipped to [0, 0.45], the blue cloud to [0.5, 3]
T_RED_CMR = (0.25, 0.04, 0.06)
T_BLUE_CMR = (0.95, 0.2, 0.35)
TEMPLATE_EBV = 0.15                             # gas E(B-V) the empirical templates already hold
BULGE_EBV = 0.05                                # bulges: E(B-V) half-normal of this scale


def _phi(params):
    m_star, alpha, phi_star, q, p = params
    return lambda M, z: schechter(M, m_star + q * np.minimum(z, 1.2), alpha,
                                  phi_star * 10 ** (p * np.minimum(z, 1.2)))


def kcorrection(t: float, z: float) -> float:
    """K-correction in DES r of the template mix of type t at redshift z: m = M_r + DM + K."""
    w = template_mix(t)
    return float(-2.5 * np.log10(w @ template_maggies(z, (DES_R,))[:, 0] / (w @ template_maggies(0.0, (DES_R,))[:, 0])))


def _kcorr(t: float):
    return lambda z: np.array([kcorrection(t, float(zi)) for zi in np.atleast_1d(z)])


@lru_cache(maxsize=8)
def redshift_table(z_min: float, z_max: float) -> RedshiftTable:
    """p(red/blue, z | DES r) on [z_min, z_max] (built once per process and range)."""
    z = np.arange(z_min, z_max + 1e-9, 0.005)
    return RedshiftTable(z, {"red": (_phi(LF_RED), _kcorr(T_RED)), "blue": (_phi(LF_BLUE), _kcorr(T_BLUE))})


def _size_kpc(log_mstar: float, z: float, red: bool, rng: np.random.Generator) -> float:
    """Major-axis half-light radius, kpc: van der Wel et al. (2014) Table 1,
    R = A (M / 5e10)^alpha, log A interpolated in z (0.25, 0.75, 1.25)."""
    zk = (0.25, 0.75, 1.25)
    if red:
        log_a, alpha, scatter = np.interp(z, zk, (0.60, 0.42, 0.22)), 0.75, 0.10
    else:
        log_a, alpha, scatter = np.interp(z, zk, (0.86, 0.78, 0.70)), 0.22, 0.16
    log_r = log_a + alpha * (log_mstar - np.log10(5e10)) + scatter * rng.standard_normal()
    return float(max(10 ** log_r, 0.4))      # the relation flattens at low mass; floor 0.4 kpc


def _composite_half_light(bulge_frac: float, ratio: float) -> float:
    """Half-light radius of bulge (n=4, radius `ratio`) + disk (n=1, radius 1), r-band."""
    r = np.geomspace(0.01, 10.0, 400)
    enclosed = (bulge_frac * gammainc(8.0, sersic_b(4.0) * (r / ratio) ** 0.25)
                + (1 - bulge_frac) * gammainc(2.0, sersic_b(1.0) * r))
    return float(np.interp(0.5, enclosed, r))


def _emission_lines(z: float, t: float, log_ssfr: float, ebv: float, continuum_ha: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Observed line fluxes (J,) in the units of the observed continuum at H-alpha,
    `continuum_ha`, x A, and their parameters."""
    ew_ha = 63.0 * 10 ** log_ssfr                                   # rest-frame A
    f_ha = ew_ha * (1 + z) * continuum_ha
    k_ha, k_hb, k_oii = calzetti_k(np.array([LINES["Halpha"], LINES["Hbeta"], 3728.0]))
    balmer = 2.86 * 10 ** (0.4 * ebv * (k_hb - k_ha))
    log_n2 = float(np.clip(-0.3 - 0.3 * (t - 1.0) + 0.1 * rng.standard_normal(), -1.4, -0.25))
    log_o3 = 0.61 / (log_n2 - 0.05) + 1.3 - 0.1 - abs(0.1 * rng.standard_normal())
    f_hb = f_ha / balmer
    f_oii = 0.56 * f_ha * 10 ** (-0.4 * ebv * (k_oii - k_ha))
    flux = dict(OII_3727=f_oii / 2.3, OII_3730=f_oii * 1.3 / 2.3, Hbeta=f_hb,
                OIII_5008=f_hb * 10 ** log_o3, Halpha=f_ha, NII_6585=f_ha * 10 ** log_n2)
    flux["OIII_4960"] = flux["OIII_5008"] / 2.98
    flux["NII_6550"] = flux["NII_6585"] / 3.05
    params = dict(ew_halpha=float(ew_ha), ebv_gas=float(ebv), log_nii_halpha=log_n2,
                  log_oiii_hbeta=float(log_o3))
    return np.array([flux[k] for k in LINE_NAMES]), params


def draw_galaxy(mag_r: float, z_min: float, z_max: float, r_half_max: float,
                rng: np.random.Generator) -> dict:
    """One galaxy of DES r magnitude mag_r: params, bulge and disk SEDs, profile."""
    pop, z = redshift_table(z_min, z_max).draw(mag_r, rng)
    red = pop == "red"
    dm = distance_modulus(z)
    if red:
        a, b, c = T_RED_CMR
        m_abs = mag_r - dm - kcorrection(T_RED, z)
        t = float(np.clip(a + b * (m_abs + 21.0) + c * rng.standard_normal(), 0.0, 0.45))
        bulge_frac = 1.0 if rng.random() < 0.5 else rng.uniform(0.5, 0.9)
        log_ssfr = -2.6 + 0.3 * rng.standard_normal()
    else:
        m_abs = mag_r - dm - kcorrection(T_BLUE, z)
        a, b, c = T_BLUE_CMR
        t = float(np.clip(a + b * (m_abs + 21.0) + c * rng.standard_normal(), 0.5, 3.0))
        bulge_frac = 0.0 if rng.random() < 0.7 else rng.uniform(0.05, 0.4)
        log_ssfr = -0.9 + 0.3 * (t - 1.5) - 0.8 * bulge_frac + 0.2 * rng.standard_normal()
    log_ssfr += 1.8 * np.log10(1 + z)                              # Fumagalli et al. 2012
    q = (float(np.clip(rng.normal(0.75, 0.15), 0.35, 1.0)) if bulge_frac >= 0.5 else
         float(np.sqrt(rng.random() ** 2 * (1 - 0.2 ** 2) + 0.2 ** 2)))   # random inclination, q0 = 0.2
    # continuum: unit total DES r maggies, bulge_frac of it in the bulge
    t_bulge = t if red else float(np.clip(T_RED_CMR[0] + T_RED_CMR[2] * rng.standard_normal(), 0.0, 0.45))
    w_bulge, w_disk = template_mix(t_bulge), template_mix(t)
    m_abs = mag_r - dm - kcorrection(t, z)                         # rough mass, for the dust only
    log_m0 = -0.4 * (m_abs - 4.65) - 0.306 + 1.097 * (0.75 if red else 0.45) - 0.093
    ebv_gas = float(np.clip(0.05 + 0.08 * (log_m0 - 9.5) + 0.25 * (1 - q) * (1 - bulge_frac)
                            + 0.06 * rng.standard_normal(), 0.0, 0.8))
    ebv_disk = 0.44 * max(ebv_gas - TEMPLATE_EBV, 0.0)
    ebv_bulge = float(min(abs(BULGE_EBV * rng.standard_normal()), 0.5))
    w_bulge = w_bulge * bulge_frac / (w_bulge @ template_maggies(z, (DES_R,), ebv_bulge)[:, 0])
    w_disk = w_disk * (1 - bulge_frac) / (w_disk @ template_maggies(z, (DES_R,), ebv_disk)[:, 0])
    bulge = GalaxySED(z, w_bulge, ebv=ebv_bulge)
    disk = GalaxySED(z, w_disk, ebv=ebv_disk)
    wave_ha = np.array([LINES["Halpha"] * (1 + z)])
    cont_ha = float(bulge.continuum(wave_ha)[0] + disk.continuum(wave_ha)[0])
    line_flux, line_params = _emission_lines(z, t, log_ssfr, ebv_gas, cont_ha, rng)
    disk = GalaxySED(z, w_disk, line_flux, sigma_v=rng.uniform(40.0, 150.0), ebv=ebv_disk)
    scale = 10 ** (-0.4 * mag_r) / (bulge.maggies((DES_R,)) + disk.maggies((DES_R,)))[0]
    bulge, disk = bulge.scaled(scale), disk.scaled(scale)
    # rest frame: absolute magnitude, colour, stellar mass of the whole galaxy
    rest_b = template_maggies(0.0, ("des.g", DES_R), ebv_bulge).T @ bulge.weights
    rest_d = template_maggies(0.0, ("des.g", DES_R), ebv_disk).T @ disk.weights
    rest = rest_b + rest_d
    abs_mag_r = float(-2.5 * np.log10(rest[1]) - dm)
    gr_rest = float(-2.5 * np.log10(rest[0] / rest[1]))
    log_mstar = -0.4 * (abs_mag_r - 4.65) - 0.306 + 1.097 * gr_rest - 0.093
    # size
    r_kpc = _size_kpc(log_mstar, z, red, rng) * np.sqrt(q)          # circularised
    r_half = float(np.clip(r_kpc / kpc_per_arcsec(z), 0.1, r_half_max))
    ratio = 0.35                                                    # bulge / disk radius
    if bulge_frac >= 1.0:
        r_bulge, r_disk = r_half, 0.0
    elif bulge_frac <= 0.0:
        r_bulge, r_disk = 0.0, r_half
    else:
        r_disk = r_half / _composite_half_light(bulge_frac, ratio)
        r_bulge = ratio * r_disk
    profile = Profile(r_bulge, r_disk, q, rng.uniform(0.0, np.pi))
    params = dict(z=z, mag_r=mag_r, abs_mag_r=abs_mag_r, gr_rest=gr_rest,
                  log_mstar=float(log_mstar), is_red=float(red), type=float(t),
                  bulge_frac=float(bulge_frac), log_ssfr=float(log_ssfr), ebv_disk=float(ebv_disk),
                  ebv_bulge=ebv_bulge,
                  r_half=r_half, r_half_kpc=float(r_half * kpc_per_arcsec(z)),
                  r_bulge=float(r_bulge), r_disk=float(r_disk),
                  sersic_n=float(4 * bulge_frac + 1 * (1 - bulge_frac)), axis_ratio=q,
                  ellipticity=1 - q, position_angle=float(profile.pa), sigma_v=float(disk.sigma_v),
                  flux_halpha=float(disk.line_flux[LINE_NAMES.index("Halpha")]), **line_params)
    return dict(params=params, bulge=bulge, disk=disk, profile=profile)
