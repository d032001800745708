"""`omnisky-generate`: survey translation, super-resolution, conditional generation,
posteriors and embeddings from the command line.

    omnisky-generate translate --fm FM_DIR --tokenizers TOK_DIR --data RAW_SHARDS --out OUT
    omnisky-generate superres  --fm ... --data ... --out ...
    omnisky-generate sample    --fm ... --given scalar.redshift scalar.flux_g --target image.hsc
    omnisky-generate predict   --fm ... --given image.des --target scalar.redshift
    omnisky-generate embed     --fm ... --given image.des
    omnisky-generate report    --fm ... --data TEST_RAW --train-data TRAIN_RAW --out demo_out

Every task writes, per object, FITS files of what it generated, a PNG figure (given /
generated / truth / residual), and OUT/schedule.json (the schedule, as data) and
OUT/summary.json (per-object figures against the truth where the data have it).
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
from .outputs import image_figure, spectrum_figure, write_image_fits, write_spectrum_fits
from .schedule import TargetSchedule, schedule_to_json

TASKS = {  # task -> (given, target) defaults
    "translate": (["image.des"], "image.hsc"),
    "superres": (["spectrum.sdss"], "spectrum.desi"),
    "sample": (["scalar.redshift", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z"], "image.hsc"),
    "predict": (["image.des", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z"], "scalar.redshift"),
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


def reduced_chi2(model: np.ndarray, truth: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> float:
    good = ~mask & (ivar > 0)
    return float(np.mean((model[good] - truth[good]) ** 2 * ivar[good]))


def _write_image(path, image, sample):
    write_image_fits(path, image, sample.meta.get("ra", 0.0), sample.meta.get("dec", 0.0))


def _write_spectrum(path, spectrum, sample):
    write_spectrum_fits(path, spectrum)


def run_generation(pipe, args, given: list[str], target: str) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = dict(scheme=args.scheme, steps=args.steps, temperature=args.temperature,
                    temperature_schedule=args.temperature_schedule, top_k=args.top_k,
                    top_p=args.top_p, guidance=args.guidance)
    samples = load_samples(args.data, args.n, need=given[:1] + [target] if args.need_target else given[:1])
    draws = pipe.sample(samples, given, target, n_samples=args.samples, seed=args.seed, **schedule)
    (out / "schedule.json").write_text(json.dumps(schedule_to_json([TargetSchedule(target, **schedule)]), indent=1))
    rows = []
    for s, gen in zip(samples, draws):
        oid = s.object_id
        truth_rec = s.records.get(target)
        truth_flux = s.truth.get(target)
        row = dict(object_id=oid)
        src = s.records.get(given[0])
        kind = modality_kind(target)
        if kind in ("image", "spectrum"):
            write, figure = (_write_image, image_figure) if kind == "image" else (_write_spectrum, spectrum_figure)
            for k, g in enumerate(gen):
                write(out / f"{oid}.{target}.{k}.fits", g, s)
            truth_obs = None
            if truth_rec is not None and truth_flux is not None:
                truth_obs = dataclasses.replace(truth_rec, flux=truth_flux, mask=np.zeros_like(truth_rec.mask))
                row["chi2_vs_truth"] = reduced_chi2(gen[0].flux, truth_flux, truth_rec.ivar, truth_rec.mask)
            figure(out / f"{oid}.png", src if modality_kind(given[0]) == kind else None, gen, truth_obs,
                   title=f"{oid}: {', '.join(given)} -> {target}")
        else:
            row["values"] = [float(g.value) for g in gen]
            if truth_rec is not None:
                row["truth"] = float(truth_rec.value)
        rows.append(row)
    summary = dict(task=args.task, given=given, target=target, n_objects=len(rows), objects=rows)
    chi = [r["chi2_vs_truth"] for r in rows if "chi2_vs_truth" in r]
    if chi:
        summary["median_chi2_vs_truth"] = float(np.median(chi))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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
            q.add_argument("--n-eval", type=int, default=64, help="held-out objects per evaluation")
            continue
        given, target = TASKS[task]
        q.add_argument("--given", nargs="+", default=given)
        if task != "embed":
            q.add_argument("--target", default=target)
        if task in ("translate", "superres", "sample"):
            q.add_argument("--samples", type=int, default=1, help="samples per object")
            q.add_argument("--scheme", default="maskgit", choices=["maskgit", "roar"])
            q.add_argument("--steps", type=int, default=8)
            q.add_argument("--temperature", type=float, default=1.0)
            q.add_argument("--temperature-schedule", default="constant", choices=["constant", "linear", "annealed"])
            q.add_argument("--top-k", type=int, default=0)
            q.add_argument("--top-p", type=float, default=1.0)
            q.add_argument("--guidance", type=float, default=0.0)
            q.add_argument("--need-target", action=argparse.BooleanOptionalAction, default=True,
                           help="only objects that also have the target (to compare with the truth)")
    return p


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
    samples = load_samples(args.data, args.n, need=args.given[:1])
    if args.task == "predict":
        post = pipe.predict(samples, args.given, args.target)
        rows = [dict(object_id=s.object_id, median=float(post["median"][i]), lo68=float(post["lo68"][i]),
                     hi68=float(post["hi68"][i]),
                     truth=(float(s.records[args.target].value) if args.target in s.records else None))
                for i, s in enumerate(samples)]
        (out / "posteriors.json").write_text(json.dumps(rows, indent=1))
        np.savez(out / "posteriors.npz", probs=post["probs"], centres=post["centres"],
                 object_id=np.array([s.object_id for s in samples]))
        print(json.dumps(rows[:3]))
    else:  # embed
        emb = pipe.embed(samples, args.given)
        np.savez(out / "embeddings.npz", embeddings=emb, object_id=np.array([s.object_id for s in samples]))
        print(json.dumps(dict(n=len(samples), dim=int(emb.shape[1]), file=str(out / "embeddings.npz"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
