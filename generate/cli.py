"""`omnisky-generate`: survey translation, super-resolution, conditional generation,
posteriors and embeddings from the command line.

    omnisky-generate translate --fm FM_DIR --tokenizers TOK_DIR --data RAW_SHARDS --out OUT
    omnisky-generate superres  --fm ... --data ... --out ...
    omnisky-generate sample    --fm ... --given scalar.redshift scalar.flux_g --target image.hsc
    omnisky-generate calibrate --fm ... --data HELDOUT --n 400 --target scalar.redshift --out cal
    omnisky-generate predict   --fm ... --given image.des --target scalar.redshift --calibration cal/calibration.json
    omnisky-generate embed     --fm ... --given image.des --neighbours 5 --probe scalar.redshift
    omnisky-generate sample    --fm ... --given image.des --target spectrum.desi image.hsc   (chained)
    omnisky-generate report    --fm ... --data TEST_RAW --train-data TRAIN_RAW --out demo_out

Generation tasks write, per object and target, FITS (or --format npz) files of each sample,
a PNG figure (given / generated samples / truth / residual; spectra overplotted), and
OUT/schedule.json (the schedule, as data) and OUT/summary.json (per-object figures against
the truth where the data have it). `translate --given image.hsc --target image.des` goes
the other way; any band set the image tokenizer decodes can be a target. `translate
--consistency PAIRED_RAW --samples 8` pulls each sample to the source observation
(`generate.consistency`, fitted on the paired objects and written to OUT/consistency.json;
pass that file on later runs); `superres --consistency PAIRED_RAW` does the same for spectra
(`generate.spectrum_consistency`: the SDSS-like line spread, pixels and fibre aperture, and
the emission lines' fluxes where the object's redshift is known). `sample --target image.des --catalog-consistency TRAIN_RAW`
pulls each image to the object's catalog fluxes and half-light radius
(`generate.catalog_consistency`, fitted on the training objects' observations and written to
OUT/catalog_consistency.json; pass that file on later runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..shards.reader import stream
from ..shards.schema import modality_kind
from ..shards.writer import shard_urls
from .evaluate import CONSISTENCY_OBJECTS, REDSHIFT_OBJECTS, TRANSLATION_OBJECTS, reduced_chi2
from .outputs import image_figure, spectrum_figure, write_image_fits, write_npz, write_spectrum_fits
from .probe import LinearProbe, similarity_search
from .schedule import schedule_to_json

TASKS = {  # task -> (given, target) defaults
    "translate": (["image.des"], "image.hsc"),
    "superres": (["spectrum.sdss"], "spectrum.desi"),
    "sample": (["scalar.redshift", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z"], "image.hsc"),
    "predict": (["image.des", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z"], "scalar.redshift"),
    "calibrate": (["image.des", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z"], "scalar.redshift"),
    "embed": (["image.des"], None),
}


def load_samples(data: str, n: int, need: list[str]) -> list:
    """The first `n` objects of the raw shards in `data` holding every modality in `need`."""
    out = []
    for s in stream(shard_urls(data), decode="raw"):
        if all(k in s.records for k in need):
            out.append(s)
            if len(out) >= n:
                break
    if not out:
        raise SystemExit(f"{data}: no object has all of {need}")
    return out


def _write(out: Path, oid: str, k: int, target: str, record, sample, fmt: str) -> None:
    ra, dec = sample.meta.get("ra", 0.0), sample.meta.get("dec", 0.0)
    if fmt == "npz":
        write_npz(out / f"{oid}.{target}.{k}.npz", {target: record}, ra, dec)
    elif modality_kind(target) == "image":
        write_image_fits(out / f"{oid}.{target}.{k}.fits", record, ra, dec)
    elif modality_kind(target) == "spectrum":
        write_spectrum_fits(out / f"{oid}.{target}.{k}.fits", record)


def schedule_args(args) -> dict:
    return dict(scheme=args.scheme, steps=args.steps, token_schedule=args.token_schedule,
                temperature=args.temperature, temperature_end=args.temperature_end,
                temperature_schedule=args.temperature_schedule, top_k=args.top_k,
                top_p=args.top_p, guidance=args.guidance)


def run_generation(pipe, args, given: list[str], targets: list[str]) -> dict:
    """Generate every target (chained, in order) for args.n objects; write records, figures,
    schedule.json and summary.json (with reduced chi-square against the truth where known)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = pipe.schedule(targets, **schedule_args(args))
    need = given[:1] + (targets[-1:] if args.need_target else [])
    samples = load_samples(args.data, args.n, need=need)
    chain = pipe.sample_chain(samples, given, schedule, n_samples=args.samples, seed=args.seed)
    model_draws: dict[str, list] = {}   # object id -> the model's draws of the target before --consistency
    if getattr(args, "consistency", None):
        if len(given) != 1 or len(targets) != 1:
            raise SystemExit("--consistency: from one given image (spectrum) to one target image (spectrum)")
        from .consistency import known_redshift, refine_translation
        cons = load_consistency(pipe, args, given[0], targets[0])
        for s, draws in zip(samples, chain):
            model_draws[s.object_id] = [d[targets[0]] for d in draws]       # before: shown beside the pulled
            refined = refine_translation(s.records[given[0]], model_draws[s.object_id], cons,
                                         redshift=known_redshift(s))
            for d, r in zip(draws, refined):
                d[targets[0]] = r
    if getattr(args, "catalog_consistency", None):
        if len(targets) != 1 or modality_kind(targets[0]) != "image":
            raise SystemExit("--catalog-consistency: one target image, generated from catalog values")
        from .catalog_consistency import refine_to_catalog
        cons = load_catalog_consistency(pipe, args, targets[0])
        for s, draws in zip(samples, chain):
            refined = refine_to_catalog(s, [d[targets[0]] for d in draws], cons, given)
            for d, r in zip(draws, refined):
                d[targets[0]] = r
    estimates = {}   # object id -> the point estimate of the (one) target (Pipeline.estimate)
    if getattr(args, "estimate", False):
        if len(targets) != 1 or modality_kind(targets[0]) not in ("image", "spectrum"):
            raise SystemExit(f"--estimate: one target image or spectrum, got {targets}")
        est = pipe.estimate(samples, given, targets[0], n_samples=args.estimate_runs, seed=args.seed,
                            **schedule_args(args))
        estimates = {s.object_id: e for s, e in zip(samples, est)}
    (out / "schedule.json").write_text(json.dumps(schedule_to_json(schedule), indent=1))
    rows = []
    for s, draws in zip(samples, chain):
        oid = s.object_id
        row = dict(object_id=oid)
        for target in targets:
            gen = [d[target] for d in draws]
            truth_rec, truth_flux = s.records.get(target), s.truth.get(target)
            for k, g in enumerate(gen):
                _write(out, oid, k, target, g, s, args.format)
            if oid in estimates:
                _write(out, oid, "estimate", target, estimates[oid], s, args.format)
            kind = modality_kind(target)
            if kind in ("image", "spectrum"):
                truth_obs = None
                if truth_rec is not None and truth_flux is not None:
                    truth_obs = dataclasses.replace(truth_rec, flux=truth_flux, mask=np.zeros_like(truth_rec.mask))
                    row[f"chi2_vs_truth.{target}"] = reduced_chi2(gen[0].flux, truth_flux, truth_rec.ivar, truth_rec.mask)
                    if oid in estimates:
                        row[f"chi2_vs_truth_estimate.{target}"] = reduced_chi2(
                            estimates[oid].flux, truth_flux, truth_rec.ivar, truth_rec.mask)
                    if oid in model_draws and target == targets[0]:
                        row[f"chi2_vs_truth_model.{target}"] = reduced_chi2(
                            model_draws[oid][0].flux, truth_flux, truth_rec.ivar, truth_rec.mask)
                src = next((s.records[g] for g in given if g in s.records and modality_kind(g) == kind), None)
                title = f"{oid}: {', '.join(given)} -> {target}"
                est = estimates.get(oid)                     # only with --estimate (one target)
                if kind == "spectrum" and oid in model_draws and target == targets[0]:   # the model's and the pulled
                    spectrum_figure(out / f"{oid}.{target}.png", src, model_draws[oid], truth_obs, title=title,
                                    refined=gen, estimate=est)
                else:
                    figure = image_figure if kind == "image" else spectrum_figure
                    figure(out / f"{oid}.{target}.png", src, gen, truth_obs, title=title, estimate=est)
            else:
                row[f"values.{target}"] = [float(g.value) for g in gen]
                if truth_rec is not None:
                    row[f"truth.{target}"] = float(truth_rec.value)
        rows.append(row)
    summary = dict(task=args.task, given=given, targets=targets, n_objects=len(rows), n_samples=args.samples,
                   objects=rows)
    for target in targets:
        chi = [r[f"chi2_vs_truth.{target}"] for r in rows if f"chi2_vs_truth.{target}" in r]
        if chi:
            summary[f"median_chi2_vs_truth.{target}"] = float(np.median(chi))
        chi = [r[f"chi2_vs_truth_estimate.{target}"] for r in rows if f"chi2_vs_truth_estimate.{target}" in r]
        if chi:
            summary[f"median_chi2_vs_truth_estimate.{target}"] = float(np.median(chi))
        chi = [r[f"chi2_vs_truth_model.{target}"] for r in rows if f"chi2_vs_truth_model.{target}" in r]
        if chi:   # the model's own draws, before --consistency pulled them to the given data
            summary[f"median_chi2_vs_truth_model.{target}"] = float(np.median(chi))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_embed(pipe, args, out: Path) -> dict:
    """Embeddings (npz), optionally a linear probe of a scalar and nearest neighbours."""
    samples = load_samples(args.data, args.n, need=args.given[:1])
    emb = pipe.embed(samples, args.given)
    ids = np.array([s.object_id for s in samples])
    np.savez(out / "embeddings.npz", embeddings=emb, object_id=ids)
    result = dict(n=len(samples), dim=int(emb.shape[1]), file=str(out / "embeddings.npz"))
    if args.neighbours:
        idx, sim = similarity_search(emb, emb, k=args.neighbours, exclude_self=True)
        rows = [dict(object_id=str(ids[i]), neighbours=[str(ids[j]) for j in idx[i]],
                     similarity=[round(float(x), 4) for x in sim[i]]) for i in range(len(ids))]
        (out / "neighbours.json").write_text(json.dumps(rows, indent=1))
        result["neighbours"] = str(out / "neighbours.json")
    if args.probe:
        key = args.probe
        have = np.array([key in s.records for s in samples])
        if have.sum() < 3:
            raise SystemExit(f"embed --probe {key}: only {int(have.sum())} of the objects have it (need >= 3)")
        y = np.array([s.records[key].value for s in samples if key in s.records])
        probe = LinearProbe.fit(emb[have], y)
        pred = probe.predict(emb)
        np.savez(out / "probe.npz", object_id=ids, prediction=pred,
                 truth=np.array([s.records[key].value if key in s.records else np.nan for s in samples]))
        result["probe"] = dict(target=key, n_labelled=int(have.sum()), alpha=probe.alpha, loo_rmse=probe.loo_rmse)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnisky-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    for task in list(TASKS) + ["report"]:
        q = sub.add_parser(task)
        q.add_argument("--fm", required=True, help="exported FM model folder (config.json + model.safetensors)")
        q.add_argument("--tokenizers", required=True, help="folder holding image/, spectrum/, scalar/ tokenizers")
        q.add_argument("--data", required=True, help="raw shards folder (with manifest.json)")
        q.add_argument("--out", required=True)
        q.add_argument("--n", type=int, default=8, help="number of objects")
        q.add_argument("--seed", type=int, default=0)
        if task == "report":
            q.add_argument("--train-data", default=None, help="raw training shards, for baselines fitted on training data")
            q.add_argument("--n-eval", type=int, default=64, help="held-out objects per generation task but translation")
            q.add_argument("--n-translate", type=int, default=TRANSLATION_OBJECTS,
                           help="held-out objects translation is scored on (its medians are noisier than the others')")
            q.add_argument("--catalog-share-snr", type=float, default=100.0,
                           help="catalog S/N above which training objects set the catalog consistency's "
                                "stamp-flux shares (generate.catalog_consistency)")
            q.add_argument("--n-redshift", type=int, default=REDSHIFT_OBJECTS,
                           help="held-out objects the redshift posterior is scored on; up to as many after them "
                                "calibrate it")
            continue
        given, target = TASKS[task]
        q.add_argument("--given", nargs="+", default=given)
        if task == "embed":
            q.add_argument("--neighbours", type=int, default=0, help="write the K most similar objects of each")
            q.add_argument("--probe", default=None, help="fit a linear probe of this scalar (e.g. scalar.redshift)")
            continue
        if task == "calibrate":
            q.add_argument("--target", default=target)
            continue
        if task == "predict":
            q.add_argument("--target", default=target)
            q.add_argument("--calibration", default=None,
                           help="calibration.json written by `omnisky-generate calibrate` on held-out objects")
            q.add_argument("--temperature", type=float, default=1.0,
                           help="divides the logits (ignored with --calibration, which carries its own)")
            continue
        q.add_argument("--target", nargs="+", default=[target],
                       help="target modality; several are generated in order, each joining the conditioning")
        q.add_argument("--samples", type=int, default=1, help="samples per object")
        q.add_argument("--format", default="fits", choices=["fits", "npz"])
        q.add_argument("--scheme", default="maskgit", choices=["maskgit", "roar"])
        q.add_argument("--steps", type=int, default=8)
        q.add_argument("--token-schedule", default="cosine", choices=["cosine", "linear"])
        q.add_argument("--temperature", type=float, default=1.0)
        q.add_argument("--temperature-end", type=float, default=0.1)
        q.add_argument("--temperature-schedule", default="constant", choices=["constant", "linear", "annealed"])
        q.add_argument("--top-k", type=int, default=0)
        q.add_argument("--top-p", type=float, default=1.0)
        q.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
        q.add_argument("--estimate", action="store_true",
                       help="also write each object's point estimate of the target image or spectrum, "
                            "OBJ.TARGET.estimate.fits, and its chi2 in summary.json (Pipeline.estimate: an image "
                            "from 2 MaskGIT steps, then each token's mean code, averaged over the runs; a spectrum "
                            "as the pixel-wise median of that many samples)")
        q.add_argument("--estimate-runs", type=int, default=8, help="runs (samples) combined into the --estimate")
        q.add_argument("--need-target", action=argparse.BooleanOptionalAction, default=True,
                       help="only objects that also have the (last) target (to compare with the truth)")
        if task in ("translate", "superres"):
            q.add_argument("--consistency", default=None,
                           help="pull each sample to the source observation (generate.consistency; spectra: "
                                "generate.spectrum_consistency, emission lines fitted where the object's "
                                "scalar.redshift is known): a consistency.json written by an earlier run, or a raw "
                                "shards folder of objects observed by both surveys (spectrographs) to fit it on "
                                "(written to OUT/consistency.json). Images: use --samples 8 or so, their spread "
                                "is part of the prior's width")
            q.add_argument("--consistency-n", type=int, default=CONSISTENCY_OBJECTS,
                           help="paired objects to fit the consistency on")
        if task == "sample":
            q.add_argument("--catalog-consistency", default=None,
                           help="pull each image to the object's catalog fluxes and r_half "
                                "(generate.catalog_consistency): a catalog_consistency.json written by an earlier "
                                "run, or a raw shards folder of training objects to fit it on (written to "
                                "OUT/catalog_consistency.json)")
            q.add_argument("--catalog-n", type=int, default=2000, help="training objects to fit the maps on")
            q.add_argument("--catalog-share-snr", type=float, default=100.0,
                           help="catalog S/N above which training objects set the stamp-flux shares")
    return p


def load_or_fit(flag: str, value: str, name: str, from_json, fit, out: str):
    """A consistency (translation's or catalog's) from `value`: a JSON file `name` written by an
    earlier run, or a raw shards folder `fit(path)` fits it on; written to OUT/`name`."""
    path = Path(value)
    if not path.exists():
        raise SystemExit(f"{flag} {path}: no such file ({name}) or folder (raw shards)")
    cons = from_json(json.loads(path.read_text())) if path.is_file() else fit(path)
    (Path(out) / name).write_text(json.dumps(cons.to_json(), indent=1))
    return cons


def load_catalog_consistency(pipe, args, target: str):
    """The CatalogConsistency from args.catalog_consistency (JSON file or training raw shards)."""
    from .catalog_consistency import SIZE_KEY, CatalogConsistency, fit_catalog_consistency
    fit = lambda path: fit_catalog_consistency(                                  # noqa: E731
        pipe, load_samples(str(path), args.catalog_n, need=[target, SIZE_KEY]), target, given=args.given,
        seed=args.seed, share_min_snr=args.catalog_share_snr, **schedule_args(args))
    cons = load_or_fit("--catalog-consistency", args.catalog_consistency, "catalog_consistency.json",
                       CatalogConsistency.from_json, fit, args.out)
    if cons.target != target:
        raise SystemExit(f"{args.catalog_consistency}: catalog consistency fitted for {cons.target}, not {target}")
    return cons


def load_consistency(pipe, args, source: str, target: str):
    """The translation's Consistency from args.consistency (JSON file or paired raw shards)."""
    from .consistency import Consistency, fit_consistency
    fit = lambda path: fit_consistency(                                          # noqa: E731
        pipe, load_samples(str(path), args.consistency_n, need=[source, target]), source, target,
        n_samples=max(args.samples, 2), seed=args.seed, **schedule_args(args))
    cons = load_or_fit("--consistency", args.consistency, "consistency.json", Consistency.from_json, fit, args.out)
    if (cons.source, cons.target) != (source, target):
        raise SystemExit(f"{args.consistency}: consistency fitted for {cons.source} -> {cons.target}, "
                         f"not {source} -> {target}")
    return cons


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    from .pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.fm, args.tokenizers)
    if args.task == "report":
        from .report import write_report
        write_report(pipe, args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task in ("translate", "superres", "sample"):
        summary = run_generation(pipe, args, args.given, args.target)
        print(json.dumps({k: v for k, v in summary.items() if k != "objects"}))
        return 0
    if args.task == "embed":
        print(json.dumps(run_embed(pipe, args, out)))
        return 0
    if args.task == "calibrate":
        from .calibration import fit_calibration
        cal = fit_calibration(pipe, load_samples(args.data, args.n, need=[*args.given[:1], args.target]),
                              args.given, args.target)
        (out / "calibration.json").write_text(json.dumps(cal, indent=1))
        print(json.dumps({k: v for k, v in cal.items() if k not in ("levels", "pit_quantiles")}))
        return 0
    samples = load_samples(args.data, args.n, need=args.given[:1])
    cal = json.loads(Path(args.calibration).read_text()) if args.calibration else None
    if cal and (cal.get("target") != args.target or cal.get("given") != list(args.given)):
        raise SystemExit(f"{args.calibration}: fitted for {cal.get('target')} given {cal.get('given')}, "
                         f"not {args.target} given {list(args.given)}")
    post = pipe.predict(samples, args.given, args.target, temperature=args.temperature, calibration=cal)
    rows = [dict(object_id=s.object_id, median=float(post["median"][i]), lo68=float(post["lo68"][i]),
                 hi68=float(post["hi68"][i]),
                 truth=(float(s.records[args.target].value) if args.target in s.records else None))
            for i, s in enumerate(samples)]
    (out / "posteriors.json").write_text(json.dumps(rows, indent=1))
    np.savez(out / "posteriors.npz", probs=post["probs"], centres=post["centres"],
             object_id=np.array([s.object_id for s in samples]))
    print(json.dumps(rows[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
