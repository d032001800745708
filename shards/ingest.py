"""Ingest real survey files into raw shards: detect each file's kind, read it, cross-match
sources by RA/Dec so an object's modalities from several files become one Sample.

    manifest = ingest(["decals/cutout_59.1067_-30.4848.fits", "sdss_spectra/spec-...fits"],
                      out="out/real", shard_size=500, size=32, match_radius=1.0)
    omnisky-shards ingest FILE [FILE ...] --out DIR [--size 32] [--shard-size K] [--match-radius 1.0]

Kinds (`detect_kind`, from HDU names and headers): 'desi' (FIBERMAP and B_FLUX HDUs),
'sdss' (COADD table with loglam), 'legacy' (HDUs with BAND and IMAGETYP image/invvar),
'legacy_psf' (HDUs with BAND, no IMAGETYP), 'hsc' (a primary (5, H, W) cube with a
celestial WCS), 'hsc_psf' (a primary (5, H, W) cube without one). A PSF file is used by
the image whose name it shares (cutout_T.fits <-> copsf_T.fits, Cut_T.fits <->
PSF_T.fits), whether it is listed or lies next to the image. Anything else is an
`IngestError` naming the file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .codec import encode_sample
from .ingest_images import read_hsc, read_legacy
from .ingest_spectra import read_desi, read_sdss
from .schema import Sample
from .writer import ShardWriter

PREFIX = "real"
PSF_NAMES = {"legacy": ("cutout_", "copsf_"), "hsc": ("Cut_", "PSF_")}


class IngestError(ValueError):
    """A file cannot be ingested; the message names the file."""


def detect_kind(path: str | Path) -> str:
    """'legacy' | 'legacy_psf' | 'hsc' | 'hsc_psf' | 'sdss' | 'desi' from the HDU layout."""
    from astropy.io import fits
    from astropy.wcs import WCS
    path = Path(path)
    try:
        hdul = fits.open(path)
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: not a readable FITS file ({e})") from None
    with hdul:
        names = {h.name.upper() for h in hdul}
        if {"FIBERMAP", "B_FLUX"} <= names:
            return "desi"
        if "COADD" in names and "LOGLAM" in {c.upper() for c in hdul["COADD"].columns.names}:
            return "sdss"
        band_hdus = [h for h in hdul if h.header.get("BAND") is not None and h.data is not None]
        if band_hdus and all(h.header.get("IMAGETYP") in ("image", "invvar") for h in band_hdus):
            return "legacy"
        if band_hdus and not any("IMAGETYP" in h.header for h in band_hdus):
            return "legacy_psf"
        h0 = hdul[0]
        if h0.header.get("NAXIS") == 3 and h0.header.get("NAXIS3") == 5:
            return "hsc" if WCS(h0.header).has_celestial else "hsc_psf"
        layout = ", ".join(f"{h.name or '(unnamed)'} {getattr(h.data, 'shape', None)}" for h in hdul)
    raise IngestError(f"{path}: unknown file kind (HDUs: {layout}); expected a Legacy Surveys or "
                      "HSC cut-out, an SDSS spec-*.fits or a DESI coadd-*.fits")


def _psf_for(image: Path, kind: str, psf_files: dict[str, Path]) -> Path | None:
    """The PSF file named like `image` (listed, else next to it), or None."""
    img_prefix, psf_prefix = PSF_NAMES[kind]
    if not image.name.startswith(img_prefix):
        return None
    name = psf_prefix + image.name[len(img_prefix):]
    if name in psf_files:
        return psf_files[name]
    sibling = image.with_name(name)
    return sibling if sibling.exists() else None


def read_file(path: str | Path, kind: str, psf_files: dict[str, Path] | None = None,
              size: int | None = None) -> tuple[list[Sample], dict[str, int]]:
    """One file of a known kind -> (Samples, {why: dropped rows})."""
    path = Path(path)
    if kind in ("legacy", "hsc"):
        reader = read_legacy if kind == "legacy" else read_hsc
        return [reader(path, _psf_for(path, kind, psf_files or {}), size)], {}
    if kind == "sdss":
        return [read_sdss(path)], {}
    if kind == "desi":
        return read_desi(path)
    raise IngestError(f"{path}: kind {kind!r} holds no objects")


def crossmatch(groups: list[list[Sample]], radius_arcsec: float = 1.0) -> list[Sample]:
    """Merge per-file Samples (one list per file) into objects: each file's sources are
    matched (astropy `match_coordinates_sky`) to the objects so far; a source within
    `radius_arcsec` of an object lacking all its modalities joins it (first come, one
    source per object per file), otherwise it starts a new object. meta['sources'] lists
    the files, kinds and ids merged; meta ra/dec stay those of the first source."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord, match_coordinates_sky
    objects: list[Sample] = []
    for group in groups:
        if not group:
            continue
        joined: dict[int, Sample] = {}
        if objects:
            cat = SkyCoord([o.meta["ra"] for o in objects] * u.deg, [o.meta["dec"] for o in objects] * u.deg)
            new = SkyCoord([s.meta["ra"] for s in group] * u.deg, [s.meta["dec"] for s in group] * u.deg)
            idx, sep, _ = match_coordinates_sky(new, cat)
            for s, i, d in zip(group, np.atleast_1d(idx), np.atleast_1d(sep.arcsec)):
                target = objects[int(i)]
                if d <= radius_arcsec and int(i) not in joined and not (set(s.records) & set(target.records)):
                    joined[int(i)] = s
        merged_ids = {id(s) for s in joined.values()}
        for i, s in joined.items():
            objects[i].records.update(s.records)
            objects[i].meta["sources"].append(_source(s))
        for s in group:
            if id(s) not in merged_ids:
                meta = {k: v for k, v in s.meta.items() if k not in ("source", "kind")}
                objects.append(Sample(s.object_id, dict(s.records), meta=dict(meta, sources=[_source(s)])))
    seen: Counter = Counter()
    for o in objects:                       # unique shard keys (the same target in two files)
        seen[o.object_id] += 1
        if seen[o.object_id] > 1:
            o.object_id = f"{o.object_id}-{seen[o.object_id]}"
    return [o.validate() for o in objects]


def _source(s: Sample) -> dict:
    return dict(file=s.meta["source"], kind=s.meta["kind"], id=s.object_id,
                ra=s.meta["ra"], dec=s.meta["dec"], n_invalid=s.meta.get("n_invalid", 0))


def ingest(paths, out: str | Path, shard_size: int = 500, size: int | None = None,
           match_radius: float = 1.0) -> dict:
    """Read `paths`, cross-match within `match_radius` arcsec, write raw shards
    `real-NNNNNN.tar` + manifest.json under `out`; returns the manifest, whose summary
    counts objects, modalities, masked pixels, dropped fibres and unmatched objects."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = [Path(p) for p in paths]
    kinds = {p: detect_kind(p) for p in paths}
    psf_files = {p.name: p for p, k in kinds.items() if k.endswith("_psf")}
    groups, dropped, psf_used = [], Counter(), set()
    for p, kind in kinds.items():
        if kind.endswith("_psf"):
            continue
        samples, why = read_file(p, kind, psf_files, size)
        groups.append(samples)
        dropped.update(why)
        psf_used.update(s.meta.get("psf_source") for s in samples)
    objects = crossmatch(groups, match_radius)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PREFIX}-*.tar"):            # a rerun must not leave stale shards
        old.unlink()
    counts, masked = Counter(), Counter()
    writer = ShardWriter(out, prefix=PREFIX, max_count=shard_size)
    for o in objects:
        writer.write(o.object_id, encode_sample(o))
        counts.update(list(o.records))
        masked.update({k: int(r.mask.sum()) for k, r in o.records.items() if hasattr(r, "mask")})
    n_sources = sum(len(g) for g in groups)
    writer.summary = dict(
        objects=len(objects), sources=n_sources, matched=n_sources - len(objects),
        unmatched=sum(len(o.meta["sources"]) == 1 for o in objects),
        masked_pixels=dict(sorted(masked.items())),
        invalid_pixels=sum(src["n_invalid"] for o in objects for src in o.meta["sources"]),
        dropped_sky_fibres=sum(n for k, n in dropped.items() if not k.startswith("TGT")),
        dropped_fibres=dict(sorted(dropped.items())),
        unused_psf_files=sorted(str(p) for p in psf_files.values() if str(p) not in psf_used))
    return writer.close(extra=dict(source="omnisky.shards.ingest", files={str(p): k for p, k in kinds.items()},
                                   match_radius_arcsec=match_radius, stamp_size=size,
                                   modality_counts=dict(sorted(counts.items()))))
