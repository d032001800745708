"""Samples <-> webdataset tar members, byte-for-byte deterministic.

One object is one webdataset sample. Its members (key `sky-0000042`, say):

    sky-0000042.meta.json        object_id, meta, params, and each record's non-array fields
    sky-0000042.image.des.npz    flux, ivar, mask, psf_fwhm [, truth]
    sky-0000042.spectrum.sdss.npz  flux, ivar, mask, wavelength, resolution [, truth]
    (scalars live in meta.json)

Token shards hold `<key>.tokens.npz` ({modality_key: int32 (n,)}) and `<key>.meta.json`.
npz members are deflated with a fixed timestamp, so the same sample gives the same bytes.
"""
from __future__ import annotations

import io
import json
import zipfile
from typing import Mapping

import numpy as np

from .schema import Image, Sample, Scalar, Spectrum

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Deterministic .npz: sorted members, fixed timestamps, fast deflate (level 1;
    fixed grids, masks and resolution arrays compress well, float noise does not)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.save(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE), member.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return buf.getvalue()


def npz_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Sample -> {extension: bytes} (extension without the key, e.g. 'image.des.npz')."""
    if "." in sample.object_id or "/" in sample.object_id:
        raise ValueError(f"object id {sample.object_id!r} must not contain '.' or '/'")
    members: dict[str, bytes] = {}
    records_meta = {}
    for key, rec in sample.records.items():
        truth = sample.truth.get(key)
        if isinstance(rec, Image):
            arrays = dict(flux=rec.flux.astype(np.float32), ivar=rec.ivar.astype(np.float32),
                          mask=rec.mask.astype(bool), psf_fwhm=np.asarray(rec.psf_fwhm, np.float32))
            records_meta[key] = dict(bands=list(rec.bands), pixel_scale=float(rec.pixel_scale),
                                     survey=rec.survey, zero_point=float(rec.zero_point))
        elif isinstance(rec, Spectrum):
            arrays = dict(flux=rec.flux.astype(np.float32), ivar=rec.ivar.astype(np.float32),
                          mask=rec.mask.astype(bool), wavelength=rec.wavelength.astype(np.float64),
                          resolution=np.asarray(rec.resolution, np.float32))
            records_meta[key] = dict(instrument=rec.instrument)
        elif isinstance(rec, Scalar):
            records_meta[key] = dict(name=rec.name, value=float(rec.value),
                                     uncertainty=float(rec.uncertainty))
            if truth is not None:
                records_meta[key]["truth"] = float(np.asarray(truth))
            continue
        else:
            raise TypeError(f"object {sample.object_id!r}: {key}: not a record: {type(rec)}")
        if truth is not None:
            arrays["truth"] = np.asarray(truth, np.float32)
        members[f"{key}.npz"] = npz_bytes(arrays)
    members["meta.json"] = json_bytes(dict(object_id=sample.object_id, meta=sample.meta,
                                           params=sample.params, records=records_meta))
    return members


def decode_sample(members: Mapping[str, bytes]) -> Sample:
    """{extension: bytes} (a webdataset sample, '__key__' etc. ignored) -> Sample."""
    if "meta.json" not in members:
        raise ValueError(f"sample {members.get('__key__')!r} has no meta.json")
    meta = json.loads(members["meta.json"])
    oid = meta["object_id"]
    sample = Sample(object_id=oid, meta=meta.get("meta", {}), params=meta.get("params", {}))
    for key, rm in meta["records"].items():
        kind = key.split(".", 1)[0]
        if kind == "scalar":
            sample.records[key] = Scalar(rm["name"], rm["value"], rm["uncertainty"], object_id=oid)
            if "truth" in rm:
                sample.truth[key] = np.float32(rm["truth"])
            continue
        raw = members.get(f"{key}.npz")
        if raw is None:
            raise ValueError(f"object {oid!r}: meta lists {key!r} but {key}.npz is missing")
        a = npz_load(raw)
        if kind == "image":
            sample.records[key] = Image(a["flux"], a["ivar"], a["mask"], tuple(rm["bands"]),
                                        rm["pixel_scale"], rm["survey"], rm["zero_point"],
                                        a["psf_fwhm"], object_id=oid)
        elif kind == "spectrum":
            sample.records[key] = Spectrum(a["flux"], a["ivar"], a["mask"], a["wavelength"],
                                           rm["instrument"], a["resolution"], object_id=oid)
        else:
            raise ValueError(f"object {oid!r}: unknown modality kind in key {key!r}")
        if "truth" in a:
            sample.truth[key] = a["truth"]
    return sample


def encode_tokens(object_id: str, tokens: Mapping[str, np.ndarray], meta: dict | None = None) -> dict[str, bytes]:
    """Token sample: {modality_key: int (n,)} -> members."""
    return {"tokens.npz": npz_bytes({k: np.asarray(v, np.int32) for k, v in tokens.items()}),
            "meta.json": json_bytes(dict(object_id=object_id, meta=meta or {}))}


def decode_tokens(members: Mapping[str, bytes]) -> tuple[str, dict[str, np.ndarray], dict]:
    meta = json.loads(members["meta.json"])
    return meta["object_id"], npz_load(members["tokens.npz"]), meta.get("meta", {})
