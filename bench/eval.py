"""Evaluate a trained omnisky model on held-out simulated objects with truth, and a
catalog-only model on the real SDSS galaxies; print ONE JSON line of figures.

    python bench/eval.py --fm demo_out/fm/model --tokenizers demo_out/tokenizers \
        --data demo_out/raw/test --train-data demo_out/raw/train [--n 64] [--figures out/eval]

Figures (`omnisky.generate.evaluate` says how each is measured): survey translation
(reduced chi2 against the noiseless truth vs resample + PSF matching + colour terms),
super-resolution (chi2 vs linear interpolation, emission-line flux errors), photometric
redshift (sigma_NMAD, outliers, bias vs gradient boosting; 1% labels: linear probe on
embeddings), calibration (68% interval coverage), conditional generation (fluxes and
sizes measured on generated images vs the inputs, in units of their noise), the real
SDSS catalog (ugriz -> z: scalar tokenizer + small FM trained here vs gradient
boosting), and the training budget of the models evaluated.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from omnisky.generate.cli import load_samples
from omnisky.generate.catalog_consistency import fit_catalog_consistency
from omnisky.generate.evaluate import (CALIBRATION_OBJECTS, CONSISTENCY_OBJECTS, FLUXES, REDSHIFT_OBJECTS, SPECTRA,
                                       TRANSLATION_OBJECTS, evaluate_conditional, evaluate_redshift,
                                       evaluate_sdss_catalog, evaluate_superres, evaluate_translation, heldout_split)
from omnisky.generate.pipeline import Pipeline


def _last_step(log: Path) -> int | None:
    if not log.exists():
        return None
    with open(log) as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
    return max(steps) if steps else None


def training_budget(fm_dir: Path, tok_dir: Path, pipe: Pipeline) -> dict:
    """Parameters, steps and batch sizes of the FM and tokenizers, from their run folders
    (the FM's is the parent of its exported model) where present."""
    out = dict(fm=dict(params=int(pipe.model.num_params()), config=json.loads((fm_dir / "config.json").read_text())["fm"]))
    run = fm_dir.parent
    if (run / "config.yaml").exists():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        out["fm"].update(steps_configured=cfg.get("steps"), batch_size_per_rank=cfg.get("batch_size"),
                         grad_accum=cfg.get("grad_accum"))
    out["fm"]["steps_logged"] = _last_step(run / "log.csv")
    for kind in ("image", "spectrum", "scalar"):
        d = tok_dir / kind
        if not d.exists():
            continue
        row = dict(params=int(sum(p.numel() for p in pipe.tokenizers[kind].parameters())) if kind in pipe.tokenizers else None)
        if (d / "train_config.json").exists():
            cfg = json.loads((d / "train_config.json").read_text())
            row.update(steps_configured=cfg.get("steps"), batch_size=cfg.get("batch_size"))
        row["steps_logged"] = _last_step(d / "log.csv")
        out[f"tokenizer_{kind}"] = row
    manifest = tok_dir.parent / "raw" / "train" / "manifest.json"
    if manifest.exists():
        out["train_objects"] = json.loads(manifest.read_text()).get("n_samples")
    return out


def default_sdss_catalog() -> Path | None:
    try:
        from omnisky.shards.sed import shared_data_dir
        path = Path(shared_data_dir()) / "sdss_photoz" / "sdss_galaxies_dev.fits"
    except FileNotFoundError:
        return None
    return path if path.exists() else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fm", required=True, help="exported FM folder (config.json + model.safetensors)")
    p.add_argument("--tokenizers", required=True, help="folder holding image/, spectrum/, scalar/")
    p.add_argument("--data", required=True, help="held-out raw shards (simulated, with truth)")
    p.add_argument("--train-data", required=True, help="training raw shards (baselines' labels and calibration)")
    p.add_argument("--n", type=int, default=64, help="held-out objects per task but translation")
    p.add_argument("--n-translate", type=int, default=TRANSLATION_OBJECTS,
                   help="held-out objects each translation direction is scored on (noisier medians)")
    p.add_argument("--n-redshift", type=int, default=REDSHIFT_OBJECTS,
                   help="held-out objects the redshift posterior is scored on (cheap: one forward pass)")
    p.add_argument("--n-calibration", type=int, default=CALIBRATION_OBJECTS,
                   help="held-out objects after those, to calibrate the redshift posterior on")
    p.add_argument("--n-train", type=int, default=600, help="training objects for the image baselines")
    p.add_argument("--n-train-catalog", type=int, default=2000,
                   help="training objects for the catalog consistency's maps (generate.catalog_consistency)")
    p.add_argument("--catalog-share-snr", type=float, default=100.0,
                   help="catalog S/N above which objects set the stamp-flux shares")
    p.add_argument("--n-catalog-model", type=int, default=48,
                   help="of those, objects whose generated images set the model's error (the prior's width)")
    p.add_argument("--n-train-redshift", type=int, default=0,
                   help="training objects whose labels gradient boosting and the probe get (0 = all, as the FM)")
    p.add_argument("--sdss", default="auto", help="SDSS catalog FITS ('auto': the shared data; 'none': skip)")
    p.add_argument("--sdss-steps", type=int, default=16000,
                   help="FM steps of 128 objects on the SDSS catalog's training split (after any pretraining; "
                        "sigma_NMAD 0.0164 / 0.0152 / 0.0143 at 2,000 / 6,000 / 16,000 on split 0, ~5-9 min on one core)")
    p.add_argument("--sdss-simulated", type=int, default=0,
                   help="SDSS-like simulated galaxies drawn for a pretraining of the catalog FM (~70%% kept; 0 = none; "
                        "60000 with --sdss-pretrain-steps 12000 --sdss-steps 12000: five-split mean 0.0152, as without)")
    p.add_argument("--sdss-pretrain-steps", type=int, default=0,
                   help="FM steps of 128 simulated objects before the real ones")
    p.add_argument("--sdss-rows", type=int, default=0, help="use only this many catalog rows (0 = all)")
    p.add_argument("--steps", type=int, default=8, help="sampler steps per target")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--figures", default=None, help="folder for figures (none by default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    fm_dir, tok_dir = Path(args.fm), Path(args.tokenizers)
    pipe = Pipeline.from_pretrained(fm_dir, tok_dir)
    figdir = Path(args.figures) if args.figures else None
    if figdir is not None:
        figdir.mkdir(parents=True, exist_ok=True)
    sched = dict(steps=args.steps, temperature=args.temperature)
    n, seed = args.n, args.seed
    train = load_samples(args.train_data, args.n_train, ["image.des", "image.hsc", "scalar.redshift"] + FLUXES)
    res = dict(bench="eval", fm=str(fm_dir), tokenizers=str(tok_dir), n_test=n, n_translate=args.n_translate, n_train=len(train), sampler=sched)
    pairs = load_samples(args.data, args.n_translate, ["image.des", "image.hsc"])
    res["translation"] = evaluate_translation(pipe, pairs, train, figdir, seed, **sched)
    res["translation_back"] = evaluate_translation(pipe, pairs, train, None, seed, source="image.hsc",
                                                   target="image.des", **sched)
    res["superres"] = evaluate_superres(pipe, load_samples(args.data, n, SPECTRA), figdir, seed,
                                        train=load_samples(args.train_data, CONSISTENCY_OBJECTS, SPECTRA), **sched)
    cond_need = ["scalar.redshift", "scalar.r_half", "image.des"] + FLUXES
    catalog = fit_catalog_consistency(pipe, load_samples(args.train_data, args.n_train_catalog, cond_need), "image.des",
                                      n_model=args.n_catalog_model, seed=seed,
                                      share_min_snr=args.catalog_share_snr, **sched)
    res["conditional"] = evaluate_conditional(pipe, load_samples(args.data, n, cond_need), figdir, seed,
                                              catalog=catalog, **sched)
    zs = load_samples(args.data, args.n_redshift + args.n_calibration, ["image.des", "scalar.redshift"] + FLUXES)
    z_train = load_samples(args.train_data, args.n_train_redshift or 10 ** 9, ["scalar.redshift"] + FLUXES)
    res["redshift"] = evaluate_redshift(pipe, *heldout_split(zs, args.n_redshift), z_train, seed)
    res["calibration_coverage68"] = res["redshift"]["coverage68"]
    sdss = default_sdss_catalog() if args.sdss == "auto" else (None if args.sdss == "none" else Path(args.sdss))
    if sdss is not None:
        res["sdss_photoz"] = evaluate_sdss_catalog(sdss, steps=args.sdss_steps, seed=seed, n_rows=args.sdss_rows or None,
                                                   n_simulated=args.sdss_simulated, pretrain_steps=args.sdss_pretrain_steps)
    res["budget"] = training_budget(fm_dir, tok_dir, pipe)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))
    return res


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
