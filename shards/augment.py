"""Dihedral augmentation: the eight rotations and flips of a sample's image stamps.

    copies = [dihedral(sample, name) for name in DIHEDRAL[:k]]   # DIHEDRAL[0] is the identity
    omnisky-tokenize --augment 8 ...                              # what the training shards use

A galaxy's spectrum, redshift and catalog fluxes do not depend on how it lies on the sky,
and the PSFs here are round (`Image.psf_fwhm` is one FWHM per band), so turning every
image of an object by the same right angle, or mirroring them all, makes another equally
valid object: the survey-to-survey mapping the FM must learn (where a DES-like cell's
light lands on the HSC-like grid) is the same for all eight, and the FM sees eight
orientations of each galaxy instead of one.

Every image of the sample (all surveys, and its noiseless truth) gets the same transform,
about the stamp's centre pixel (H // 2, W // 2): the galaxy's centre by omnisky's
convention (`shards.render`) and astropy Cutout2D's for even sizes, so the surveys' stamps
stay concentric. A mirror about that pixel leaves one edge row (or column) with no
source; it is masked (ivar 0) and zero. Rotations by 90 degrees need square stamps.
Spectra and scalars are copied unchanged; `params['position_angle']` is dropped from the
copies (it names the untransformed orientation); `meta['augment']` names the transform.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .schema import Image, Sample

DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def _transform(a: np.ndarray, name: str) -> np.ndarray:
    """The dihedral transform `name` of the last two axes of `a` (about the array's centre)."""
    if name.startswith("flip"):
        a = a[..., ::-1]
    k = {"rot90": 1, "rot180": 2, "rot270": 3}.get(name.replace("flip_", "").replace("flip", ""), 0)
    return np.rot90(a, k, axes=(-2, -1)) if k else a


def transform_stamp(a: np.ndarray, name: str, fill) -> tuple[np.ndarray, np.ndarray]:
    """(a transformed about pixel (H // 2, W // 2), bool (H, W) True where no pixel mapped in).

    a: (..., H, W). The array-centred transform moves that pixel by at most one pixel per
    axis; rolling it back leaves one wrapped row or column, which is filled with `fill`."""
    h, w = a.shape[-2:]
    if name not in DIHEDRAL:
        raise ValueError(f"dihedral: unknown transform {name!r}; known: {DIHEDRAL}")
    if "rot90" in name or "rot270" in name:
        if h != w:
            raise ValueError(f"dihedral: {name} needs a square stamp, got {h}x{w}")
    marker = np.zeros((h, w), bool)
    marker[h // 2, w // 2] = True
    y, x = np.argwhere(_transform(marker, name))[0]
    dy, dx = h // 2 - y, w // 2 - x
    out = np.roll(_transform(a, name), (dy, dx), axis=(-2, -1)).copy()
    empty = np.zeros((h, w), bool)
    if dy > 0:
        empty[:dy] = True
    elif dy < 0:
        empty[dy:] = True
    if dx > 0:
        empty[:, :dx] = True
    elif dx < 0:
        empty[:, dx:] = True
    out[..., empty] = fill
    return out, empty


def dihedral(sample: Sample, name: str) -> Sample:
    """A copy of `sample` with every image (and image truth) transformed by `name`."""
    if name == "identity":
        return sample
    records, truth = dict(sample.records), dict(sample.truth)
    oid = f"{sample.object_id}~{name}"
    for key, rec in sample.records.items():
        if not isinstance(rec, Image):
            continue
        flux, _ = transform_stamp(rec.flux, name, 0.0)
        ivar, _ = transform_stamp(rec.ivar, name, 0.0)
        mask, _ = transform_stamp(rec.mask, name, True)
        records[key] = dataclasses.replace(rec, flux=np.ascontiguousarray(flux), ivar=np.ascontiguousarray(ivar),
                                           mask=np.ascontiguousarray(mask), object_id=oid)
        if key in sample.truth:
            truth[key] = np.ascontiguousarray(transform_stamp(sample.truth[key], name, 0.0)[0])
    params = {k: v for k, v in sample.params.items() if k != "position_angle"}
    return Sample(oid, records, truth, params, dict(sample.meta, augment=name))
