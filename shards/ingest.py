"""Ingest real survey files into raw shards: detect each file's kind, read it, cross-match
sources by RA/Dec so an object's modalities from several files become one Sample.

    manifest = ingest(["decals/cutout_59.1067_-30.4848.fits", "sdss_spectra/spec-...fits",
                       "sdss_photoz/sdss_galaxies_dev.fits", "hsc/001-of-001.hdf5"],
                      out="out/real", shard_size=500, size=32, match_radius=1.0,
                      catalog=load_catalog_config("launch/ingest/sdss_photoz.yaml"))
    omnisky-shards ingest FILE [FILE ...] --out DIR [--size 32] [--shard-size K] [--match-radius 1.0]
                          [--catalog-map MAP.yaml] [--mmu-instrument NAME]

Kinds (`detect_kind`, from HDU names and headers): 'desi' (FIBERMAP and B_FLUX HDUs),
'sdss' (COADD table with loglam), 'legacy' (HDUs with BAND and IMAGETYP image/invvar),
'legacy_psf' (HDUs with BAND, no IMAGETYP), 'hsc' (a primary (5, H, W) cube with a
celestial WCS), 'hsc_psf' (a primary (5, H, W) cube without one), 'catalog' (any other
FITS file with a table: scalars by the `catalog` column mapping, shards.ingest_catalog),
'mmu' (an HDF5 file in the Multimodal Universe layout, shards.ingest_mmu; its catalog
columns become scalars by the same mapping where it names them). A PSF file is used by
the image whose name it shares (cutout_T.fits <-> copsf_T.fits, Cut_T.fits <->
PSF_T.fits), whether it is listed or lies next to the image. Anything else is an
`IngestError` naming the file.

Cross-matching joins a source to an object within the radius when they share no image
or spectrum key; a scalar both carry (a catalog redshift and a spectrum's) keeps the
first file's value and is counted in `summary['scalar_conflicts']`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .codec import encode_sample
from .ingest_catalog import CatalogConfig, read_catalog
from .ingest_images import read_hsc, read_legacy
from .ingest_mmu import MMUError, is_hdf5, read_mmu
from .ingest_spectra import read_desi, read_sdss
from .schema import Sample, modality_kind
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
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    if is_hdf5(path):
        return "mmu"
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
        if any(isinstance(h, fits.BinTableHDU) and h.data is not None and len(h.data) for h in hdul):
            return "catalog"
        layout = ", ".join(f"{h.name or '(unnamed)'} {getattr(h.data, 'shape', None)}" for h in hdul)
    raise IngestError(f"{path}: unknown file kind (HDUs: {layout}); expected a Legacy Surveys or "
                      "HSC cut-out, an SDSS spec-*.fits, a DESI coadd-*.fits, a FITS catalog table "
                      "or a Multimodal Universe HDF5 file")


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
              size: int | None = None, catalog: CatalogConfig | None = None,
              instrument: str | None = None) -> tuple[list[Sample], dict]:
    """One file of a known kind -> (Samples, counts of what was dropped or masked)."""
    path = Path(path)
    try:
        if kind in ("legacy", "hsc"):
            reader = read_legacy if kind == "legacy" else read_hsc
            return [reader(path, _psf_for(path, kind, psf_files or {}), size)], {}
        if kind == "sdss":
            return [read_sdss(path)], {}
        if kind == "desi":
            samples, dropped = read_desi(path)
            return samples, dict(dropped_fibres=dropped)
        if kind == "catalog":
            samples, counts = read_catalog(path, catalog or CatalogConfig())
            return samples, dict(masked_scalars=counts["masked"], dropped_rows=counts["dropped_rows"])
        if kind == "mmu":
            samples, counts = read_mmu(path, instrument, catalog, size)
            return samples, dict(masked_scalars=counts["masked_scalars"], dropped_records=counts["dropped_records"],
                                 dropped_rows={"nothing valid": counts["dropped_objects"]})
    except MMUError as e:
        raise IngestError(str(e)) from None
    except ValueError as e:
        raise IngestError(e if str(path) in str(e) else f"{path}: {e}") from None
    raise IngestError(f"{path}: kind {kind!r} holds no objects")


def crossmatch(groups: list[list[Sample]], radius_arcsec: float = 1.0) -> list[Sample]:
    """Merge per-file Samples (one list per file) into objects: each file's sources are
    matched (astropy `match_coordinates_sky`) to the objects so far; a source within
    `radius_arcsec` of an object lacking all its images and spectra joins it (first come, one
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
                if d <= radius_arcsec and int(i) not in joined and not (_observed(s) & _observed(target)):
                    joined[int(i)] = s
        merged_ids = {id(s) for s in joined.values()}
        for i, s in joined.items():
            conflicts = sorted(k for k in s.records if k in objects[i].records)
            objects[i].records.update({k: r for k, r in s.records.items() if k not in objects[i].records})
            objects[i].meta["sources"].append(dict(_source(s), **({"conflicts": conflicts} if conflicts else {})))
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


def _observed(s: Sample) -> set[str]:
    """The image and spectrum keys of a sample (scalars may repeat across sources)."""
    return {k for k in s.records if modality_kind(k) != "scalar"}


def _source(s: Sample) -> dict:
    return dict(file=s.meta["source"], kind=s.meta["kind"], id=s.object_id,
                ra=s.meta["ra"], dec=s.meta["dec"], n_invalid=s.meta.get("n_invalid", 0))


def ingest(paths, out: str | Path, shard_size: int = 500, size: int | None = None,
           match_radius: float = 1.0, catalog: CatalogConfig | None = None,
           instrument: str | None = None) -> dict:
    """Read `paths`, cross-match within `match_radius` arcsec, write raw shards
    `real-NNNNNN.tar` + manifest.json under `out`; returns the manifest, whose summary
    counts objects, sources, matches, masked pixels and scalars, dropped fibres, rows and
    records, and scalar conflicts. `catalog` maps catalog columns to scalars (FITS tables
    and MMU files); `instrument` names MMU spectra whose file does not."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = [Path(p) for p in paths]
    kinds = {p: detect_kind(p) for p in paths}
    psf_files = {p.name: p for p, k in kinds.items() if k.endswith("_psf")}
    groups, psf_used = [], set()
    dropped, masked_scalars, dropped_rows, dropped_records = Counter(), Counter(), Counter(), Counter()
    for p, kind in kinds.items():
        if kind.endswith("_psf"):
            continue
        samples, why = read_file(p, kind, psf_files, size, catalog, instrument)
        groups.append(samples)
        dropped.update(why.get("dropped_fibres", {}))
        masked_scalars.update(why.get("masked_scalars", {}))
        dropped_rows.update({f"{p.name}: {k}": n for k, n in why.get("dropped_rows", {}).items() if n})
        dropped_records.update(why.get("dropped_records", {}))
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
    conflicts = Counter(k for o in objects for src in o.meta["sources"] for k in src.get("conflicts", ()))
    writer.summary = dict(
        objects=len(objects), sources=n_sources, matched=n_sources - len(objects),
        unmatched=sum(len(o.meta["sources"]) == 1 for o in objects),
        masked_pixels=dict(sorted(masked.items())),
        invalid_pixels=sum(src["n_invalid"] for o in objects for src in o.meta["sources"]),
        dropped_sky_fibres=sum(n for k, n in dropped.items() if not k.startswith("TGT")),
        dropped_fibres=dict(sorted(dropped.items())),
        masked_scalars={k: n for k, n in sorted(masked_scalars.items()) if n},
        dropped_rows=dict(sorted(dropped_rows.items())),
        dropped_records=dict(sorted(dropped_records.items())),
        scalar_conflicts=dict(sorted(conflicts.items())),
        unused_psf_files=sorted(str(p) for p in psf_files.values() if str(p) not in psf_used))
    return writer.close(extra=dict(source="omnisky.shards.ingest", files={str(p): k for p, k in kinds.items()},
                                   match_radius_arcsec=match_radius, stamp_size=size,
                                   modality_counts=dict(sorted(counts.items()))))
