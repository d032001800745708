"""Is the simulated sky like the real one? One JSON line of figures, a pass/fail per check.

    python bench/sky.py                    # ~1-2 minutes on one core
    python bench/sky.py --n 6000 --seed 1

1. Colours and redshifts against 7,000 real SDSS galaxies (../shared/data/sdss_photoz):
   an SDSS-like catalog (launch/sky/sdss.yaml: galaxies only; photometry only:
   `sky.simulate_catalog`, no rendering) through the real sdss2010 ugriz curves, with the real catalog's flux errors
   (its median fractional MODELFLUX error at each flux, per band) added; both cut at the
   main-sample limit 14 < r < 17.77 (dereddened model magnitudes). Checks: the median g-r
   and r-i per redshift bin over 0.02 < z < 0.4 within 0.1 mag; the redshift
   distribution (Kolmogorov-Smirnov distance < 0.1, and the 10/50/90% quantiles within
   15%); the scatter (0.7413 x IQR) of g-r and r-i per bin within a factor 1.5.
2. Noise against real data at matched depth, within a factor 2: the per-pixel sigma of
   simulated DES-like and HSC-like images (ivar of the records the sky writes) against
   the DECaLS DR9 cut-out's invvar (g, r, z; in the DES footprint, so at the DES-like
   depth; same pixel scale and zero point) and the HSC COSMOS coadd's variance plane
   (g..y, zero point 27; an UltraDeep coadd, so the HSC-like Wide sigma is scaled by the
   published depth difference before comparing); the per-pixel sigma of
   simulated DESI-like and SDSS-like spectra against the real DESI coadds' and SDSS
   spectra's ivar, in 1000 A windows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from omnisky.shards.sed import shared_data_dir  # noqa: E402
from omnisky.config import load_config  # noqa: E402
from omnisky.shards.render import IMAGING  # noqa: E402
from omnisky.shards.sky import SkyConfig, simulate, simulate_catalog  # noqa: E402
from omnisky.generate.photoz import SDSS_CURVES as SDSS, SDSS_R_LIMITS as R_LIMITS, SDSS_SKY, real_like_errors  # noqa: E402

Z_BINS = ((0.02, 0.06), (0.06, 0.10), (0.10, 0.15), (0.15, 0.20), (0.20, 0.30), (0.30, 0.40))
COLOUR_TOL, SCATTER_FACTOR, KS_MAX, QUANTILE_TOL, NOISE_FACTOR = 0.1, 1.5, 0.1, 0.15, 2.0
MIN_PER_BIN = 15
# HSC-SSP UltraDeep 5-sigma point-source depths g, r, i, z, y (Aihara et al. 2018, PASJ 70,
# S4, Table 2), the layer of the COSMOS coadd in ../shared/data/hsc_cosmos
HSC_ULTRADEEP = (28.1, 27.7, 27.4, 26.8, 26.2)
WINDOWS = ((4000.0, 5000.0), (5000.0, 6000.0), (6000.0, 7000.0), (7000.0, 8000.0), (8000.0, 9000.0))


def real_sdss(path) -> dict[str, np.ndarray]:
    """Dereddened MODELFLUX (nanomaggies, (N, 5)), fractional errors, Z."""
    from astropy.io import fits
    with fits.open(path) as hdul:
        d = hdul[1].data
        flux, ivar = np.asarray(d["MODELFLUX"], float), np.asarray(d["MODELFLUX_IVAR"], float)
        ext, z = np.asarray(d["EXTINCTION"], float), np.asarray(d["Z"], float)
    ok = (ivar > 0).all(1) & (flux > 0).all(1) & np.isfinite(z)
    corr = 10 ** (0.4 * ext[ok])
    return dict(flux=flux[ok] * corr, frac_err=1 / np.sqrt(ivar[ok]) / flux[ok], z=z[ok])


def add_real_errors(flux: np.ndarray, real: dict, rng: np.random.Generator) -> np.ndarray:
    """Noisy copies of simulated fluxes (N, 5) with the real catalog's median fractional
    error at the same flux, per band, and the calibration errors in quadrature."""
    return real_like_errors(flux, real["flux"], real["frac_err"], rng)[0]


def _mags(flux):
    return 22.5 - 2.5 * np.log10(np.clip(flux, 1e-3, None))


def _robust_sigma(x):
    q25, q75 = np.percentile(x, [25, 75])
    return float(0.7413 * (q75 - q25))


def _ks(a, b) -> float:
    from scipy.stats import ks_2samp
    return float(ks_2samp(a, b).statistic)


def sdss_checks(n: int, seed: int) -> tuple[dict, dict]:
    real = real_sdss(shared_data_dir() / "sdss_photoz" / "sdss_galaxies_dev.fits")
    cfg = load_config(SkyConfig, SDSS_SKY, {"n": n, "seed": seed})
    cat = simulate_catalog(cfg, SDSS)
    rng = np.random.default_rng(seed)
    sim_flux = add_real_errors(np.stack([cat[f"flux_{b}"] for b in SDSS], 1), real, rng)
    sets = {}
    for name, flux, z in (("real", real["flux"], real["z"]), ("sim", sim_flux, cat["z"])):
        m = _mags(flux)
        keep = (m[:, 2] > R_LIMITS[0]) & (m[:, 2] < R_LIMITS[1])
        sets[name] = dict(gr=(m[:, 1] - m[:, 2])[keep], ri=(m[:, 2] - m[:, 3])[keep], z=z[keep])
    figs, checks = {"n_real": int(len(sets["real"]["z"])), "n_sim": int(len(sets["sim"]["z"]))}, {}
    bins = []
    for lo, hi in Z_BINS:
        row = {"z": [lo, hi]}
        sel = {k: (v["z"] > lo) & (v["z"] <= hi) for k, v in sets.items()}
        row.update({f"n_{k}": int(s.sum()) for k, s in sel.items()})
        if min(row["n_real"], row["n_sim"]) >= MIN_PER_BIN:
            for c in ("gr", "ri"):
                for k in ("real", "sim"):
                    row[f"{c}_median_{k}"] = round(float(np.median(sets[k][c][sel[k]])), 3)
                    row[f"{c}_scatter_{k}"] = round(_robust_sigma(sets[k][c][sel[k]]), 3)
                row[f"{c}_median_diff"] = round(row[f"{c}_median_sim"] - row[f"{c}_median_real"], 3)
                row[f"{c}_scatter_ratio"] = round(row[f"{c}_scatter_sim"] / row[f"{c}_scatter_real"], 3)
        bins.append(row)
    figs["colour_bins"] = bins
    judged = [b for b in bins if "gr_median_diff" in b]
    checks["sdss_bins_compared"] = len(judged) >= 5
    checks["sdss_median_colours_within_0.1"] = all(abs(b[f"{c}_median_diff"]) <= COLOUR_TOL
                                                     for b in judged for c in ("gr", "ri"))
    checks["sdss_colour_scatter_within_1.5x"] = all(1 / SCATTER_FACTOR <= b[f"{c}_scatter_ratio"] <= SCATTER_FACTOR
                                                     for b in judged for c in ("gr", "ri"))
    zr, zs = sets["real"]["z"], sets["sim"]["z"]
    q = [10, 50, 90]
    figs["z_quantiles_real"] = [round(float(v), 4) for v in np.percentile(zr, q)]
    figs["z_quantiles_sim"] = [round(float(v), 4) for v in np.percentile(zs, q)]
    figs["z_ks"] = round(_ks(zr, zs), 4)
    checks["sdss_z_ks_below_0.1"] = figs["z_ks"] < KS_MAX
    checks["sdss_z_quantiles_within_15pct"] = all(abs(s / r - 1) <= QUANTILE_TOL for s, r in
                                                  zip(figs["z_quantiles_sim"], figs["z_quantiles_real"]))
    return figs, checks


# ----------------------------------------------------------------------------- noise

def _sigma_image(rec) -> np.ndarray:
    """(C,) median per-pixel sigma over unmasked pixels, in the record's units."""
    return np.array([np.median(1 / np.sqrt(rec.ivar[c][~rec.mask[c] & (rec.ivar[c] > 0)]))
                     for c in range(len(rec.bands))])


def _sigma_windows(recs) -> list:
    """Median per-pixel sigma of spectra in each WINDOWS range (None where not covered)."""
    out = []
    for lo, hi in WINDOWS:
        vals = []
        for rec in recs:
            sel = (rec.wavelength >= lo) & (rec.wavelength < hi) & ~rec.mask & (rec.ivar > 0)
            if sel.sum() > 50:
                vals.append(np.median(1 / np.sqrt(rec.ivar[sel])))
        out.append(float(np.median(vals)) if vals else None)
    return out


def _ratio_figs(sim, real, labels) -> tuple[dict, bool]:
    rows, ok = {}, True
    for lab, s, r in zip(labels, sim, real):
        if s is None or r is None:
            continue
        s, r = float(s), float(r)
        rows[lab] = dict(sim=float(f"{s:.4g}"), real=float(f"{r:.4g}"), ratio=round(s / r, 3))
        ok = ok and 1 / NOISE_FACTOR <= s / r <= NOISE_FACTOR
    return rows, ok and bool(rows)


def noise_checks(seed: int, n: int = 6) -> tuple[dict, dict]:
    from omnisky.shards.ingest_images import read_legacy
    from omnisky.shards.ingest_spectra import read_desi, read_sdss
    data = shared_data_dir()
    cfg = SkyConfig(n=n, seed=seed, mag_r_min=20.0, mag_r_max=21.0, p_image_des=1.0, p_image_hsc=1.0,
                    p_spectrum_sdss=1.0, p_spectrum_desi=1.0, star_fraction=0.0, qso_fraction=0.0)
    samples = list(simulate(cfg))
    sim = {key: [s.records[key] for s in samples] for key in ("image.des", "image.hsc", "spectrum.desi", "spectrum.sdss")}
    figs, checks = {}, {}
    # DES-like vs DECaLS DR9 (same 0.262"/px, nanomaggies)
    legacy = read_legacy(data / "decals" / "cutout_59.1067_-30.4848.fits").records["image.legacy"]
    des = np.median([_sigma_image(r) for r in sim["image.des"]], 0)
    des_bands = [b.split(".")[1] for b in sim["image.des"][0].bands]
    real_leg = dict(zip([b.split(".")[1] for b in legacy.bands], _sigma_image(legacy)))
    figs["des_vs_decals_sigma_pix"], checks["noise_des_vs_decals_within_2x"] = _ratio_figs(
        [des[des_bands.index(f)] for f in real_leg], list(real_leg.values()), list(real_leg))
    # HSC-like (Wide depth) vs the HSC COSMOS coadd's variance plane (UltraDeep depth, zero
    # point 27, 0.168"/px): the simulated sigma is scaled to the UltraDeep 5-sigma depths
    npz = np.load(data / "hsc_cosmos" / "hsc_cosmos_35.npz")
    real_hsc = [float(np.sqrt(np.median(v[v > 0]))) for v in npz["variance"]]
    hsc = np.median([_sigma_image(r) for r in sim["image.hsc"]], 0)
    figs["hsc_wide_vs_cosmos_sigma_pix"] = _ratio_figs(list(hsc), real_hsc, list("grizy"))[0]
    matched = hsc * 10 ** (-0.4 * (np.array(HSC_ULTRADEEP) - np.array(IMAGING["hsc"].depth_5sig)))
    figs["hsc_ultradeep_vs_cosmos_sigma_pix"], checks["noise_hsc_vs_cosmos_within_2x"] = _ratio_figs(
        list(matched), real_hsc, list("grizy"))
    # spectra, 1e-17 erg/s/cm^2/A per pixel
    desi_real = []
    for path in sorted((data / "desi").glob("coadd-*.fits")) + sorted((data / "desi_redshift").glob("coadd-*.fits")):
        desi_real += [s.records["spectrum.desi"] for s in read_desi(path)[0]]
    labels = [f"{lo:.0f}-{hi:.0f}" for lo, hi in WINDOWS]
    figs["desi_sigma_pix"], checks["noise_desi_within_2x"] = _ratio_figs(
        _sigma_windows(sim["spectrum.desi"]), _sigma_windows(desi_real), labels)
    sdss_real = [read_sdss(p).records["spectrum.sdss"] for p in sorted((data / "sdss_spectra").glob("spec-*.fits"))]
    figs["sdss_spec_sigma_pix"], checks["noise_sdss_spectra_within_2x"] = _ratio_figs(
        _sigma_windows(sim["spectrum.sdss"]), _sigma_windows(sdss_real), labels)
    return figs, checks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5000, help="simulated catalog rows (launch/sky/sdss.yaml)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    sdss_figs, sdss_ok = sdss_checks(args.n, args.seed)
    t1 = time.time()
    noise_figs, noise_ok = noise_checks(args.seed)
    checks = {**sdss_ok, **noise_ok}
    out = dict(bench="sky", n=args.n, seed=args.seed, sdss=sdss_figs, noise=noise_figs,
               checks=checks, all_pass=all(checks.values()),
               seconds=dict(catalog=round(t1 - t0, 1), noise=round(time.time() - t1, 1)))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["all_pass"] else 1)
