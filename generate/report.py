"""The demo's report: every task on held-out objects, against the truth and a baseline.

    omnisky-generate report --fm demo_out/fm/model --tokenizers demo_out/tokenizers \
        --data demo_out/raw/test --train-data demo_out/raw/train --out demo_out

Writes OUT/report.md, OUT/report.json (the figures, one JSON object) and
OUT/figures/*.png. The figures and how they are measured: `generate.evaluate`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .catalog_consistency import fit_catalog_consistency
from .cli import load_samples
from .evaluate import (CALIBRATION_OBJECTS, CONSISTENCY_OBJECTS, FLUXES, SPECTRA, evaluate_conditional,
                       evaluate_redshift, evaluate_superres, evaluate_translation, heldout_split)


def write_report(pipe, args) -> dict:
    out = Path(args.out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    n, nz, t0 = args.n_eval, args.n_redshift, time.time()
    train_need = ["image.des", "image.hsc", "scalar.redshift"] + FLUXES
    train = load_samples(args.train_data, 300, train_need) if args.train_data else []
    cond_need = ["scalar.redshift", "scalar.r_half", "image.des"] + FLUXES
    z_need = ["image.des", "scalar.redshift"] + FLUXES
    catalog = (fit_catalog_consistency(pipe, load_samples(args.train_data, 2000, cond_need), "image.des",
                                       seed=args.seed, share_min_snr=args.catalog_share_snr)
               if args.train_data else None)
    results = dict(
        translation=evaluate_translation(pipe, load_samples(args.data, args.n_translate, ["image.des", "image.hsc"]),
                                         train, figdir, args.seed),
        superres=evaluate_superres(pipe, load_samples(args.data, n, SPECTRA), figdir, args.seed,
                                   train=load_samples(args.train_data, CONSISTENCY_OBJECTS, SPECTRA)
                                   if args.train_data else ()),
        conditional=evaluate_conditional(pipe, load_samples(args.data, n, cond_need), figdir, args.seed,
                                         catalog=catalog),
        redshift=evaluate_redshift(pipe, *heldout_split(load_samples(args.data, nz + CALIBRATION_OBJECTS, z_need), nz),
                                   load_samples(args.train_data, 10 ** 9, ["scalar.redshift"] + FLUXES)
                                   if args.train_data else []),
    )
    results["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render_markdown(results))
    print(json.dumps(results))
    return results


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _estimate_words(e: dict) -> str:
    if e["reveal_steps"] < e.get("steps", 8):
        return (f"{e['reveal_steps']} MaskGIT steps, then each token's mean code; "
                f"{e.get('combine', 'mean')} of {e['n_runs']} runs")
    return f"the pixel-wise {e.get('combine', 'mean')} of {e['n_runs']} samples"


def render_markdown(r: dict) -> str:
    t, s, c, z = r["translation"], r["superres"], r["conditional"], r["redshift"]
    lines = [
        "# omnisky demo report", "",
        "Held-out simulated objects (a sky seed the tokenizers and the model never saw). "
        "Reduced chi-square is against the noiseless truth in units of the target survey's noise "
        "(1 = as good as the noise allows); lower is better.", "",
        f"## Survey translation: DES-like image -> HSC-like image ({t['n']} objects)", "",
        "| method | median reduced chi2 |", "|---|---|",
        f"| omnisky (FM + image tokenizer), one sample | {_fmt(t['chi2_fm'])} |",
        f"| omnisky, mean of {t['n_samples']} samples | {_fmt(t['chi2_fm_mean'])} |",
        *([f"| omnisky, point estimate (`Pipeline.estimate`: {_estimate_words(t['estimate'])}) | "
           f"{_fmt(t['estimate']['chi2'])} |"]
          if t.get("estimate") else []),
        f"| omnisky + data consistency (samples pulled to the DES-like pixels), one sample | "
        f"{_fmt(t.get('chi2_fm_consistent'))} |",
        f"| omnisky + data consistency, mean of {t['n_samples']} samples | {_fmt(t.get('chi2_fm_mean_consistent'))} |",
        *([f"| omnisky + data consistency, the point estimate pulled alike | {_fmt(t['estimate']['chi2_consistent'])} |"]
          if t.get("estimate") and t["estimate"].get("chi2_consistent") is not None else []),
        f"| baseline: resample + PSF matching + colour terms | {_fmt(t['chi2_baseline'])} |",
        f"| baseline + the same data consistency (the baseline as the prior) | "
        f"{_fmt(t.get('chi2_baseline_consistent'))} |",
        f"| baseline without PSF matching | {_fmt(t['chi2_baseline_no_psf_matching'])} |",
        f"| image tokenizer round trip of the HSC image (ceiling) | {_fmt(t['chi2_tokenizer_roundtrip'])} |", "",
        "Galaxy shape (e1, e2 from Gaussian-weighted second moments) against the truth's: correlation over "
        f"the objects (1 = orientation and elongation carried over) and rms difference (truth's own rms "
        f"{_fmt(t['shape']['truth_rms'])}):", "",
        "| method | shape correlation | shape rms error |", "|---|---|---|",
        f"| omnisky, mean of {t['n_samples']} samples | {_fmt(t['shape']['fm']['corr'])} | {_fmt(t['shape']['fm']['rms'])} |",
        *([f"| omnisky + data consistency, mean | {_fmt(t['shape']['fm_consistent']['corr'])} | "
           f"{_fmt(t['shape']['fm_consistent']['rms'])} |"] if "fm_consistent" in t["shape"] else []),
        *([f"| omnisky, point estimate | {_fmt(t['shape']['estimate']['corr'])} | "
           f"{_fmt(t['shape']['estimate']['rms'])} |"] if "estimate" in t["shape"] else []),
        f"| baseline | {_fmt(t['shape']['baseline']['corr'])} | {_fmt(t['shape']['baseline']['rms'])} |", "",
        *([f"Data consistency (`generate.consistency`): each sample is the prior mean of a Gaussian posterior "
           f"whose width is the samples' spread plus {_fmt(t['consistency']['floor'])} x the HSC-like noise "
           f"plus {_fmt(t['consistency'].get('fraction', 0.0))} x the samples' mean (fitted on "
           f"{t['consistency']['fit']['n_objects']} training objects' observations), and "
           "whose likelihood is the DES-like observation seen through the DES-like PSF, pixels and colour "
           "equations.", ""] if t.get("consistency") else []),
        "input / generated / truth / residual:", "",
        *[f"![translation {i}](figures/translate_{i}.png)" for i in range(3)], "",
        *(["The same samples with data consistency:", "",
           *[f"![translation {i}, consistent](figures/translate_consistent_{i}.png)" for i in range(3)], ""]
          if t.get("consistency") else []),
        f"## Spectrum super-resolution: SDSS-like -> DESI-like ({s['n']} objects)", "",
        "| method | median reduced chi2 (SDSS range) |", "|---|---|",
        f"| omnisky, one sample | {_fmt(s['chi2_fm'])} |",
        *([f"| omnisky, point estimate (`Pipeline.estimate`: {_estimate_words(s['estimate'])}) | "
           f"{_fmt(s['estimate']['chi2'])} |"]
          if s.get("estimate") else []),
        f"| omnisky + data consistency (pulled to the SDSS-like spectrum; lines fitted at the catalog redshift) | "
        f"{_fmt(s.get('chi2_fm_consistent'))} |",
        *([f"| omnisky + data consistency, the point estimate pulled alike | {_fmt(s['estimate']['chi2_consistent'])} |"]
          if s.get("estimate") and s["estimate"].get("chi2_consistent") is not None else []),
        f"| baseline: linear interpolation | {_fmt(s['chi2_baseline'])} |", "",
        *([f"Data consistency (`generate.spectrum_consistency`): the prior is the model's spectrum with "
           f"{_fmt(s['consistency']['floor'])} x the DESI-like noise plus {_fmt(s['consistency']['fraction'])} x "
           f"the spectrum (fitted on {s['consistency']['n_pairs']} training objects' observations) and, where the "
           f"object's redshift is known ({s.get('n_with_redshift')} of {s['n']}), emission-line fluxes with a prior "
           f"equivalent-width width of {_fmt(s['consistency'].get('line_ew'))} A (fitted on the same objects' observed "
           "lines; None = no line terms); the likelihood is the SDSS-like spectrum seen through its line spread, "
           "pixels and fibre aperture.", ""]
          if s.get("consistency") else []),
        "Emission-line flux error against the noiseless truth (lines the truth holds at >= 3 sigma): "
        "median |error| in units of the DESI-like line-flux noise, and median |error| / true line flux "
        "(1.0 = no line at all); the spectrum tokenizer's own round trip of the DESI-like observation "
        "is what the tokens can carry:", "",
        "| line | omnisky | + data consistency | interpolation | tokenizer round trip | relative: omnisky "
        "| + data consistency | interpolation | round trip | lines |", "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {k} | " + " | ".join(_fmt(v.get(m, {}).get(q, float('nan'))) for q in ("median_abs_err_sigma",
                                                                                   "median_abs_rel_err")
                                    for m in ("fm", "fm_consistent", "baseline", "tokenizer_roundtrip"))
          + f" | {v['fm']['n']} |" for k, v in s["line_flux_error"].items()], "",
        *[f"![superres {i}](figures/superres_{i}.png)" for i in range(3)], "",
        f"## Conditional generation: {c['target']} given {', '.join(c['given'])} ({c['n']} objects)", "",
        "Median |measured - given| / noise of the given value (fluxes: the stamp's sum), and |r_half measured on "
        "the image - on the noiseless truth| / measurement noise (size); beside them the real observation, the "
        "image tokenizer's round trip of it (what the tokens can carry) and the noiseless truth (its stamp "
        "misses the light beyond it); reduced chi2 against the truth in units of the observation's noise:", "",
        "| quantity | generated image | generated + catalog consistency | baseline: round exponential disk from the "
        "catalog | real observation | tokenizer round trip | noiseless truth |", "|---|---|---|---|---|---|---|",
        *[f"| flux {b} | {_fmt(v)} | {_fmt(c.get('catalog_flux_abs_pull_median', {}).get(b, float('nan')))} | "
          f"{_fmt(c['baseline_flux_abs_pull_median'][b])} | {_fmt(c['observed_flux_abs_pull_median'][b])} | "
          f"{_fmt(c.get('roundtrip_flux_abs_pull_median', {}).get(b, float('nan')))} | "
          f"{_fmt(c.get('truth_flux_abs_pull_median', {}).get(b, float('nan')))} |"
          for b, v in c["flux_abs_pull_median"].items()],
        *[f"| flux {b} against the noiseless truth's stamp | "
          + " | ".join(_fmt(c.get(f"{pre}flux_abs_pull_truth_stamp_median", {}).get(b, float('nan')))
                       for pre in ("", "catalog_", "baseline_", "observed_", "roundtrip_")) + " | 0 |"
          for b in c["flux_abs_pull_median"]],
        f"| half-light radius | {_fmt(c['size_abs_pull_median'])} | {_fmt(c.get('catalog_size_abs_pull_median', float('nan')))} | "
        f"{_fmt(c['baseline_size_abs_pull_median'])} | {_fmt(c['observed_size_abs_pull_median'])} | {_fmt(c.get('roundtrip_size_abs_pull_median', float('nan')))} | 0 |",
        f"| half-light radius, in units of the given r_half's noise | {_fmt(c.get('size_abs_pull_given_median'))} | "
        f"{_fmt(c.get('catalog_size_abs_pull_given_median', float('nan')))} | "
        f"{_fmt(c.get('baseline_size_abs_pull_given_median'))} | {_fmt(c.get('observed_size_abs_pull_given_median'))} | "
        f"{_fmt(c.get('roundtrip_size_abs_pull_given_median'))} | 0 |",
        f"| reduced chi2 vs truth | {_fmt(c.get('chi2_vs_truth', float('nan')))} | "
        f"{_fmt(c.get('catalog_chi2_vs_truth', float('nan')))} | {_fmt(c['baseline_chi2_vs_truth'])} | | "
        f"{_fmt(c.get('roundtrip_chi2_vs_truth', float('nan')))} | |", "",
        *([f"The mean of {c['n_samples']} samples (the posterior-mean image): reduced chi2 vs truth "
           f"{_fmt(c['mean_chi2_vs_truth'])}, pulled to the catalog {_fmt(c.get('catalog_mean_chi2_vs_truth', float('nan')))}.",
           ""] if "mean_chi2_vs_truth" in c else []),
        *([f"The point estimate (`Pipeline.estimate`): reduced chi2 vs truth {_fmt(c['estimate_chi2_vs_truth'])}, "
           f"pulled to the catalog {_fmt(c.get('catalog_estimate_chi2_vs_truth', float('nan')))}; stamp flux "
           f"|pull| against the truth's stamp "
           + ", ".join(f"{b} {_fmt(v)}" for b, v in c["estimate_flux_abs_pull_truth_stamp_median"].items())
           + (", pulled " + ", ".join(f"{b} {_fmt(v)}" for b, v in
                                      c["catalog_estimate_flux_abs_pull_truth_stamp_median"].items())
              if "catalog_estimate_flux_abs_pull_truth_stamp_median" in c else "") + ".",
           ""] if "estimate_chi2_vs_truth" in c else []),
        *([f"Catalog consistency (`generate.catalog_consistency`): each image's half-light radius, then each band's "
           f"stamp flux, is the posterior mean of the image's own (prior width {_fmt(c['catalog_consistency']['tau_size'])} "
           f"and {_fmt(c['catalog_consistency']['tau_flux'])} of it: the model's errors on "
           f"{c['catalog_consistency']['fit'].get('model_n_size', 0)} training objects) and the catalog's value mapped to "
           f"what a stamp shows (maps fitted on {c['catalog_consistency']['fit']['n_objects']} training observations); "
           "the image is stretched and scaled to it.", ""] if c.get("catalog_consistency") else []),
        *[f"![sample {i}](figures/sample_{i}.png)" for i in range(3)], "",
        *([*[f"![sample {i}, catalog](figures/sample_catalog_{i}.png)" for i in range(3)], ""]
          if c.get("catalog_consistency") else []),
        f"## Redshift from {', '.join(z['given'])} ({z['n']} objects)", "",
        "| method | sigma_NMAD | outlier fraction | bias |", "|---|---|---|---|",
        f"| omnisky posterior median | {z['fm']['sigma_nmad']:.3f} | {z['fm']['outlier_frac']:.3f} | {z['fm']['bias']:.3f} |",
    ]
    if "baseline_gb_fluxes" in z:
        b = z["baseline_gb_fluxes"]
        lines.append(f"| baseline: gradient boosting on fluxes ({b['n_labels']} labels) | {b['sigma_nmad']:.3f} | "
                     f"{b['outlier_frac']:.3f} | {b['bias']:.3f} |")
        if "gb_fluxes_and_embeddings" in z:
            e = z["gb_fluxes_and_embeddings"]
            g = e["gb_fluxes_same_labels"]
            lines.append(f"| the same gradient boosting on fluxes + omnisky's image embedding (its first "
                         f"{e['n_components']} principal components, chosen on the calibration objects; {e['n_labels']} labels, "
                         f"the objects with the image; on their fluxes alone {g['sigma_nmad']:.3f} / "
                         f"{g['outlier_frac']:.3f}: better in {e['bootstrap_win_rate_vs_gb_fluxes']:.0%} of bootstrap "
                         f"resamplings) | {e['sigma_nmad']:.3f} | {e['outlier_frac']:.3f} | {e['bias']:.3f} |")
        f = z.get("few_labels")
        for name, key, won in (("linear probe on omnisky embeddings", "probe_on_embeddings", None),
                               ("gradient boosting on fluxes", "gb_fluxes", "probe_win_rate"),
                               ("the same ridge probe on the fluxes' features", "ridge_fluxes",
                                "probe_win_rate_vs_ridge_fluxes")) if f else ():
            m = f[key]
            vs = f"; the embeddings' probe better in {f[won]:.0%}" if won else ""
            lines.append(f"| {name} ({f['n_labels']} labels, median of {f['n_draws']} draws{vs}) | "
                         f"{m['sigma_nmad']:.3f} | {m['outlier_frac']:.3f} | {m['bias']:.3f} |")
    if "calibration" in z:
        c = z["calibration"]
        lo, mid, hi = c["levels68"]
        lines += ["", f"68% interval coverage: {z['coverage68']:.2f} +- {z['coverage68_sd']:.2f} (ideal 0.68; +- the spread "
                      f"that the draw of the scored and the calibration objects alone gives), calibrated on {c['n']} other held-out "
                      f"objects: temperature T = {c['temperature']:.2f}, then the interval read at the posterior's levels "
                      f"{lo:.2f} and {hi:.2f} where the calibration objects' truths fall 16% and "
                      f"84% of the time (the point estimate stays the tempered posterior's median). Tempered only: {z['coverage68_tempered']:.2f}; at T = 1: {z['coverage68_t1']:.2f} "
                      f"(posterior median at T = 1: sigma_NMAD {z['fm_t1']['sigma_nmad']:.3f}, outliers "
                      f"{z['fm_t1']['outlier_frac']:.3f})."]
    else:
        lines += ["", f"68% interval coverage: {z['coverage68']:.2f} +- {z['coverage68_sd']:.2f} (ideal 0.68)."]
    lines += ["",
              f"Evaluation took {r['seconds']} s."]
    return "\n".join(lines) + "\n"
