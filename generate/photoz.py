"""Photometric redshifts: the standard figures, the gradient-boosting baseline, and a
catalog-only FM (scalar tokenizer + small FM trained in-process) for real catalogs.

    redshift_metrics(z_pred, z_true)   # sigma_NMAD, outlier fraction, bias
    gb = gradient_boosting(x_train, z_train); gb.predict(x_test)
    cat = read_sdss_catalog(path)      # ugriz MODELFLUX (dereddened, nanomaggies) + Z
    sky = train_catalog_fm(train_rows, names, steps=1500)   # a Pipeline over scalars only
    post = sky.predict(catalog_samples(test_rows), given=[...], target="scalar.redshift")

The gradient-boosting baseline is scikit-learn's HistGradientBoostingRegressor
(scikit-learn is a dependency of omnisky), on asinh magnitudes of the fluxes and,
where given, their colours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..fm.model import FMConfig, FourM
from ..fm.modality import ModalityTable
from ..shards.schema import Sample, Scalar
from ..tokenizers.colours import asinh_magnitude
from ..tokenizers.scalar import ScalarConfig, ScalarTokenizer

OUTLIER_DZ = 0.15
SDSS_BANDS = ("u", "g", "r", "i", "z")
SDSS_CURVES = tuple(f"sdss.{b}" for b in SDSS_BANDS)      # the sdss2010 filter curves (shards.sed)
SDSS_SKY = Path(__file__).resolve().parents[1] / "launch" / "sky" / "sdss.yaml"   # an SDSS-main-like sky
SDSS_R_LIMITS = (14.0, 17.77)      # the main galaxy sample's r range (Strauss et al. 2002, AJ 124, 1810)
# SDSS photometric calibration errors, fractional, ugriz (Padmanabhan et al. 2008: ~1% in
# g, r, i, 2% in u and z), which the catalog's formal MODELFLUX_IVAR leaves out
SDSS_CALIBRATION = (0.02, 0.01, 0.01, 0.01, 0.02)


def redshift_metrics(z_pred, z_true) -> dict:
    """sigma_NMAD = 1.4826 median|dz - median dz|, outliers |dz| > 0.15, bias = median dz,
    with dz = (z_pred - z_true) / (1 + z_true)."""
    z_pred, z_true = np.asarray(z_pred, np.float64), np.asarray(z_true, np.float64)
    dz = (z_pred - z_true) / (1 + z_true)
    return dict(sigma_nmad=float(1.4826 * np.median(np.abs(dz - np.median(dz)))),
                outlier_frac=float(np.mean(np.abs(dz) > OUTLIER_DZ)), bias=float(np.median(dz)),
                n=int(len(dz)))


def bootstrap_win_rate(z_a, z_b, z_true, n: int = 1000, seed: int = 0) -> float:
    """Fraction of `n` paired bootstrap resamplings of the objects on which predictions `z_a`
    have the smaller sigma_NMAD than `z_b` (about 0.5: no difference; > 0.95: a clear win)."""
    z_a, z_b, z_true = (np.asarray(v, np.float64) for v in (z_a, z_b, z_true))
    da, db = (z_a - z_true) / (1 + z_true), (z_b - z_true) / (1 + z_true)
    idx = np.random.default_rng(seed).integers(0, len(z_true), (n, len(z_true)))              # (n, N)
    nmad = lambda d: np.median(np.abs(d - np.median(d, 1, keepdims=True)), 1)                 # noqa: E731
    return float(np.mean(nmad(da[idx]) < nmad(db[idx])))


def coverage(lo, hi, truth) -> float:
    """Fraction of true values inside [lo, hi]."""
    truth = np.asarray(truth)
    return float(np.mean((truth >= np.asarray(lo)) & (truth <= np.asarray(hi))))


def flux_features(fluxes: np.ndarray, softening: float | np.ndarray = 0.1) -> np.ndarray:
    """(N, B) fluxes (nanomaggies) -> (N, 2B - 1) asinh magnitudes and adjacent colours."""
    mags = asinh_magnitude(fluxes, softening)                                     # (N, B)
    return np.concatenate([mags, mags[:, :-1] - mags[:, 1:]], axis=1)


def gradient_boosting(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """A fitted HistGradientBoostingRegressor (early stopping off for tiny label sets)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    small = len(x) < 200
    gb = HistGradientBoostingRegressor(max_iter=100 if small else 300, learning_rate=0.1 if small else 0.05,
                                       min_samples_leaf=max(2, min(20, len(x) // 10)), random_state=seed)
    return gb.fit(x, y)


# -- real catalogs ---------------------------------------------------------------------------
def read_sdss_catalog(path: str | Path) -> dict[str, np.ndarray]:
    """{'flux_u'..'flux_z': dereddened MODELFLUX (nanomaggies), 'sigma_u'..: their 1-sigma,
    'redshift': Z} for galaxies with positive ivar in every band."""
    from astropy.io import fits
    with fits.open(path) as hdul:
        d = hdul[1].data
        flux = np.asarray(d["MODELFLUX"], np.float64)          # (N, 5)
        ivar = np.asarray(d["MODELFLUX_IVAR"], np.float64)
        ext = np.asarray(d["EXTINCTION"], np.float64)
        z = np.asarray(d["Z"], np.float64)
    ok = (ivar > 0).all(1) & np.isfinite(flux).all(1) & np.isfinite(z)
    corr = 10 ** (0.4 * ext)
    out = {f"flux_{b}": (flux * corr)[ok, j] for j, b in enumerate(SDSS_BANDS)}
    out.update({f"sigma_{b}": (corr / np.sqrt(np.maximum(ivar, 1e-30)))[ok, j] for j, b in enumerate(SDSS_BANDS)})
    out["redshift"] = z[ok]
    return out


def real_like_errors(flux: np.ndarray, real_flux: np.ndarray, real_frac_err: np.ndarray, rng: np.random.Generator,
                     calibration: Sequence[float] = SDSS_CALIBRATION) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of noiseless fluxes (N, B) and their 1-sigma (N, B): per band, the real
    catalog's median fractional error at the same flux (in 20 quantile bins of its log flux;
    `real_flux`, `real_frac_err` (M, B), positive fluxes) and the calibration error in quadrature."""
    out, sigma = np.empty_like(flux), np.empty_like(flux)
    for b in range(flux.shape[1]):
        lf = np.log10(real_flux[:, b])
        edges = np.quantile(lf, np.linspace(0, 1, 21))
        centre = 0.5 * (edges[1:] + edges[:-1])
        med = [np.median(real_frac_err[(lf >= lo) & (lf <= hi), b]) for lo, hi in zip(edges[:-1], edges[1:])]
        frac = np.hypot(np.interp(np.log10(np.clip(flux[:, b], 1e-3, None)), centre, med), calibration[b])
        out[:, b] = flux[:, b] * (1 + frac * rng.standard_normal(len(flux)))
        sigma[:, b] = frac * np.abs(flux[:, b])
    return out, sigma


def simulated_sdss_catalog(n: int, real: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """An SDSS-main-sample-like catalog, photometry only (no rendering): `n` galaxies of
    launch/sky/sdss.yaml through the sdss2010 ugriz curves (`shards.sky.simulate_catalog`),
    the real catalog's errors added (`real_like_errors`; `real`: `read_sdss_catalog`'s
    table), cut to 14 < r < 17.77 (about 70% kept). Returns read_sdss_catalog's keys:
    'flux_u'.. (nanomaggies), 'sigma_u'.., 'redshift'. About 2 s per 1,000 on one core."""
    from ..config import load_config
    from ..shards.sky import SkyConfig, simulate_catalog
    cat = simulate_catalog(load_config(SkyConfig, SDSS_SKY, {"n": n, "seed": seed}), SDSS_CURVES)
    real_flux = np.stack([real[f"flux_{b}"] for b in SDSS_BANDS], 1)              # (M, 5)
    real_sigma = np.stack([real[f"sigma_{b}"] for b in SDSS_BANDS], 1)
    pos = (real_flux > 0).all(1)
    flux, sigma = real_like_errors(np.stack([cat[f"flux_{c}"] for c in SDSS_CURVES], 1), real_flux[pos],
                                   real_sigma[pos] / real_flux[pos], np.random.default_rng(seed))
    r = 22.5 - 2.5 * np.log10(np.clip(flux[:, 2], 1e-3, None))
    keep = (r > SDSS_R_LIMITS[0]) & (r < SDSS_R_LIMITS[1]) & np.isfinite(flux).all(1)
    out = {f"flux_{b}": flux[keep, j] for j, b in enumerate(SDSS_BANDS)}
    out.update({f"sigma_{b}": sigma[keep, j] for j, b in enumerate(SDSS_BANDS)})
    out["redshift"] = cat["z"][keep]
    return out


def sdss_scalars(fluxes: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 5) ugriz fluxes (nanomaggies) -> the catalog FM's inputs: 'mag_r' (asinh
    magnitude) and the four adjacent colours 'colour_ug' .. 'colour_iz', each (N,)."""
    feats = flux_features(fluxes)                                                  # (N, 9)
    out = {"mag_r": feats[:, 2]}
    out.update({f"colour_{a}{b}": feats[:, 5 + j] for j, (a, b) in enumerate(zip(SDSS_BANDS[:-1], SDSS_BANDS[1:]))})
    return out


def catalog_samples(table: Mapping[str, np.ndarray], names: Sequence[str], rows=None) -> list[Sample]:
    """One Sample per catalog row holding `scalar.<name>` for each name (uncertainty from
    `sigma_<band>` where the table has it)."""
    n = len(next(iter(table.values())))
    rows = range(n) if rows is None else rows
    out = []
    for i in rows:
        recs = {}
        for name in names:
            sig = table.get("sigma_" + name.split("_", 1)[-1]) if name.startswith("flux_") else None
            recs[f"scalar.{name}"] = Scalar(name, float(table[name][i]), float(sig[i]) if sig is not None else 0.0)
        out.append(Sample(object_id=f"row{i}", records=recs))
    return out


def scalar_masked_batch(ids: np.ndarray, modality: np.ndarray, batch_size: int,
                        rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A 4M training batch from one-token scalars, vectorised: ids (N, K) local token ids of
    K one-token modalities (table indices `modality` (K,)). Each of `batch_size` random
    objects gets a random order of its K tokens and a number of inputs uniform in
    [1, K - 1]: the first are inputs, all the others targets (BATCH_KEYS of fm.data)."""
    n, k = ids.shape
    rows = rng.integers(0, n, batch_size)
    order = np.argsort(rng.random((batch_size, k)), axis=1)                       # (B, K)
    n_in = rng.integers(1, k, batch_size)                                         # (B,)
    j = np.arange(k)[None, :]
    enc_pad = j >= n_in[:, None]
    dec_order = np.take_along_axis(order, (j + n_in[:, None]) % k, axis=1)
    dec_pad = j >= (k - n_in)[:, None]
    tok = ids[rows]                                                               # (B, K)
    enc_ids = np.where(enc_pad, 0, np.take_along_axis(tok, order, 1))
    dec_tgt = np.where(dec_pad, 0, np.take_along_axis(tok, dec_order, 1))
    zeros = np.zeros((batch_size, k), np.int64)
    out = dict(enc_ids=enc_ids, enc_mod=np.where(enc_pad, 0, modality[order]), enc_pos=zeros, enc_pad=enc_pad,
               dec_mod=np.where(dec_pad, 0, modality[dec_order]), dec_pos=zeros, dec_targets=dec_tgt, dec_pad=dec_pad)
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in out.items()}


def train_catalog_fm(samples: Sequence[Sample], names: Sequence[str], log_names: Sequence[str] = (),
                     n_bins: int = 32, steps: int = 2000, batch_size: int = 128, lr: float = 5e-3,
                     fm: FMConfig | None = None, seed: int = 0, pretrain: Sequence[Sample] = (),
                     pretrain_steps: int = 0, pretrain_lr: float = 5e-3):
    """Fit a scalar tokenizer on `samples` (each holding every name) and train a small FM on
    their tokens with 4M-style masking (`scalar_masked_batch`: every conditional among the
    scalars). With `pretrain` (e.g. a simulated catalog, `simulated_sdss_catalog`), the FM
    first trains `pretrain_steps` on those objects' tokens (in the bins fitted on `samples`;
    values beyond them fall in the end bins) at `pretrain_lr`, then `steps` on `samples` at
    `lr` with a fresh optimiser and schedule (fine-tuning). On the real SDSS catalog, ~42,000
    simulated galaxies (12,000 steps, then 12,000 at lr 2e-3) left the five-split mean where
    it was without them (0.0152; bench/RESULTS.md). Returns (Pipeline, budget dict)."""
    from .pipeline import Pipeline
    torch.manual_seed(seed)
    tok = ScalarTokenizer(ScalarConfig(names=tuple(names), n_bins=n_bins, log_names=tuple(log_names), seed=seed))
    tok.fit(r for s in samples for r in s.records.values())
    keys = [f"scalar.{n}" for n in names]
    table = ModalityTable.from_tokenizers({k: tok for k in keys})
    def token_ids(rows: Sequence[Sample]) -> np.ndarray:                          # (N, K)
        for s in rows:
            missing = [k for k in keys if k not in s.records]
            if missing:
                raise KeyError(f"train_catalog_fm: object {s.object_id!r} lacks {missing}; every object (and "
                               f"every pretraining object) must hold all of {keys}")
        return np.concatenate([tok.encode([s.records[k] for s in rows]).numpy() for k in keys], 1)
    ids = token_ids(samples)                                                      # (N, K)
    modality = np.array([table.index(k) for k in keys])
    model = FourM(fm or FMConfig(dim=64, enc_depth=2, dec_depth=2, heads=4), table)
    rng = np.random.default_rng(seed)

    def fit(ids: np.ndarray, steps: int, lr: float) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(t, steps) / steps)))
        model.train()
        losses = []
        for _ in range(steps):
            loss, _ = model(scalar_masked_batch(ids, modality, batch_size, rng))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        return losses

    budget = dict(tokenizer=f"scalar quantile bins, {n_bins} per name, fitted on {len(samples)} objects")
    if pretrain_steps:
        if not pretrain:
            raise ValueError("train_catalog_fm: pretrain_steps > 0 needs `pretrain` objects")
        pre = fit(token_ids(pretrain), pretrain_steps, pretrain_lr)
        budget.update(pretrain_objects=len(pretrain), pretrain_steps=pretrain_steps,
                      pretrain_final_loss=float(np.mean(pre[-50:])))
    losses = fit(ids, steps, lr)
    budget.update(fm_params=int(model.num_params()), fm_steps=steps, fm_batch=batch_size,
                  fm_objects_seen=(steps + pretrain_steps) * batch_size, final_loss=float(np.mean(losses[-50:])))
    return Pipeline(model.eval(), {"scalar": tok}), budget
