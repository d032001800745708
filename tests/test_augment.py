"""Dihedral augmentation (shards.augment) and omnisky-tokenize --augment."""
from __future__ import annotations

import numpy as np
import pytest

from omnisky.shards.augment import DIHEDRAL, dihedral, transform_stamp


def _centroid_arcsec(img, pixel_scale):
    """Light-weighted offset (dy, dx) of a (H, W) stamp from its centre pixel, in arcsec."""
    h, w = img.shape
    y, x = np.mgrid[:h, :w]
    f = np.clip(img, 0, None)
    return np.array([((y - h // 2) * f).sum(), ((x - w // 2) * f).sum()]) / f.sum() * pixel_scale


def test_the_eight_transforms_are_distinct_and_keep_the_centre_pixel():
    a = np.arange(36, dtype=float).reshape(1, 6, 6)
    outs = {}
    for name in DIHEDRAL:
        out, empty = transform_stamp(a, name, -1.0)
        assert out.shape == a.shape and out[0, 3, 3] == a[0, 3, 3], name     # the pivot stays
        assert empty.sum() in (0, 6, 11) and np.all(out[0][empty] == -1.0)
        kept = ~empty
        assert sorted(out[0][kept]) == sorted(set(out[0][kept]))            # a permutation of pixels
        outs[name] = out[0][kept].tolist()
    assert len({tuple(v) for v in outs.values()}) == 8
    r1, _ = transform_stamp(a, "rot90", 0.0)
    r2, _ = transform_stamp(r1, "rot90", 0.0)
    r180, e180 = transform_stamp(a, "rot180", 0.0)
    assert np.array_equal(r2[0][~e180], r180[0][~e180])                    # rot90 twice = rot180
    with pytest.raises(ValueError, match="square"):
        transform_stamp(np.zeros((1, 4, 6)), "rot90", 0.0)
    with pytest.raises(ValueError, match="unknown transform"):
        transform_stamp(a, "rot45", 0.0)


def test_every_survey_turns_alike_so_stamps_stay_registered(sky_shards):
    from omnisky.shards.reader import stream
    from omnisky.shards.writer import shard_urls
    s = next(x for x in stream(shard_urls(sky_shards), decode="raw")
             if {"image.des", "image.hsc"} <= set(x.records) and x.params.get("r_half", 0) > 0.4)
    rot = np.array([[0, -1], [1, 0]])                        # np.rot90 on (dy, dx): (0, 1) -> (-1, 0)
    flip = np.diag([1, -1])                                  # a mirror of x
    before = {k: _centroid_arcsec(s.truth[k].sum(0), s.records[k].pixel_scale) for k in ("image.des", "image.hsc")}
    for name in DIHEDRAL:
        t = dihedral(s, name)
        assert t.object_id == (s.object_id if name == "identity" else f"{s.object_id}~{name}")
        k = {"rot90": 1, "rot180": 2, "rot270": 3}.get(name.replace("flip_", ""), 0)
        sky_map = np.linalg.matrix_power(rot, k) @ (flip if name.startswith("flip") else np.eye(2))
        for key in ("image.des", "image.hsc"):
            rec, truth = t.records[key], t.truth[key]
            assert rec.flux.shape == s.records[key].flux.shape and rec.object_id == t.object_id
            assert np.all(rec.ivar[rec.mask] == 0) or np.all(rec.mask[rec.ivar == 0])
            rec.validate()
            # the galaxy keeps (nearly) all its light, and both surveys' stamps turn by the same
            # map of the sky about the galaxy's centre, so they stay registered
            assert truth.sum() == pytest.approx(s.truth[key].sum(), rel=0.02)
            after = _centroid_arcsec(truth.sum(0), rec.pixel_scale)
            assert np.allclose(after, sky_map @ before[key], atol=0.02), (name, key, after, before[key])
        for key in s.records:                                   # spectra and scalars unchanged
            if not key.startswith("image."):
                assert t.records[key] is s.records[key]
        if name != "identity":
            assert "position_angle" not in t.params and t.meta["augment"] == name
    assert np.abs(before["image.hsc"]).max() > 0.03              # the test galaxy is off the centre
