"""Data consistency for survey translation (generate.consistency): the source-survey view of
a target image, its adjoint, the conjugate-gradient solve and what the refinement does to
a prior that is wrong in flux."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from omnisky.generate.baselines import aperture_fluxes, fit_colour_terms
from omnisky.generate.consistency import Consistency, SourceView, conjugate_gradients, refine_translation
from omnisky.shards.reader import stream
from omnisky.shards.writer import shard_urls


def _pairs(sky_shards):
    return [s for s in stream(shard_urls(sky_shards)) if "image.des" in s.records and "image.hsc" in s.records]


def _truth(s, key):
    return dataclasses.replace(s.records[key], flux=s.truth[key], mask=np.zeros_like(s.records[key].mask))


def _chi2(model, truth, rec):
    good = ~rec.mask & (rec.ivar > 0)
    return float(np.mean((model[good] - truth[good]) ** 2 * rec.ivar[good]))


def _view_of(view, flux, observed=None):
    """The view of flux (Ct, h, w); with `observed` (the source Image) its shift fitted first."""
    x = torch.zeros((1, *view.shape), dtype=torch.float64)
    x[0, :, view.inner[0], view.inner[1]] = torch.as_tensor(flux, dtype=torch.float64)
    if observed is not None:
        view.fit_shift(x, torch.as_tensor(np.where(observed.mask, 0.0, observed.flux))[None],
                       torch.as_tensor(np.where(observed.mask, 0.0, observed.ivar))[None])
    return view(x)[0].numpy()


def _terms(objs):
    """Colour equations HSC -> DES from the objects' observed total fluxes."""
    hsc, des = objs[0].records["image.hsc"], objs[0].records["image.des"]
    return fit_colour_terms([(s.records["image.hsc"], s.records["image.des"]) for s in objs], hsc.bands, des.bands)


def test_source_view_of_the_hsc_truth_is_the_des_truth(sky_shards):
    """The noiseless HSC-like galaxy seen through the DES-like PSF, pixels and colour terms,
    its sub-pixel shift fitted on the DES-like observation, lands on the noiseless DES-like
    galaxy well within the DES noise; closer than without the shift (the stamps' centres
    differ by up to a pixel) and far closer than without the PSF kernel."""
    objs = _pairs(sky_shards)
    terms = _terms(objs)
    full, unshifted, no_psf = [], [], []
    for s in objs[:8]:
        hsc, des = _truth(s, "image.hsc"), s.records["image.des"]
        ratios = terms.flux_ratios(aperture_fluxes(hsc))
        view = SourceView(des, hsc, ratios)
        unshifted.append(_chi2(_view_of(view, hsc.flux), s.truth["image.des"], des))
        full.append(_chi2(_view_of(view, hsc.flux, des), s.truth["image.des"], des))
        assert max(abs(v) for v in view.shift) <= 1.0
        view.kernel = torch.ones_like(view.kernel)                   # no PSF: resampling alone
        no_psf.append(_chi2(_view_of(view, hsc.flux, des), s.truth["image.des"], des))
    assert np.median(full) < 0.2, full
    assert np.median(full) < 0.7 * np.median(unshifted), (full, unshifted)
    assert np.median(full) < 0.2 * np.median(no_psf), (full, no_psf)


def test_adjoint_is_the_transpose(sky_shards):
    s = _pairs(sky_shards)[0]
    view = SourceView(s.records["image.des"], s.records["image.hsc"], np.ones(4))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *view.shape), generator=g, dtype=torch.float64)
    y = torch.randn(view(x).shape, generator=g, dtype=torch.float64)
    lhs, rhs = (view(x) * y).sum(), (x * view.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-9 * float(abs(lhs) + abs(rhs)), (lhs, rhs)


def test_view_pads_its_ffts_by_the_kernel_reach_only(sky_shards):
    """The FFTs pad the domain by the PSF kernel's reach, not by the whole domain: both ways
    the view of the noiseless galaxy is the one with no wrap-around at all (FFTs of twice the
    domain) to 1e-3 of its peak, with smaller FFTs (the Moffat wings of the DES-like PSF
    reach far: ~7 FWHM hold all but 1e-4 of the kernel)."""
    from omnisky.generate.consistency import _psf_kernel
    s = _pairs(sky_shards)[0]
    for src, tgt in (("image.des", "image.hsc"), ("image.hsc", "image.des")):
        target = _truth(s, tgt)
        view = SourceView(s.records[src], target, np.ones(len(s.records[src].bands)))
        full = SourceView(s.records[src], target, np.ones(len(s.records[src].bands)))
        full.fft_shape, full.kernel = _psf_kernel(s.records[src], target, full.nearest, full.shape[1:], lost=0.0)
        assert full.fft_shape[0] >= 2 * view.shape[1]
        a, b = _view_of(view, target.flux), _view_of(full, target.flux)
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max(), (src, np.abs(a - b).max(), np.abs(b).max())
        assert view.fft_shape[0] < full.fft_shape[0] and view.fft_shape[1] < full.fft_shape[1], view.fft_shape


def test_conjugate_gradients_solve_each_system():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(3, 30, generator=g, dtype=torch.float64)
    u = conjugate_gradients(lambda v: v @ a, b, iterations=100, tol=1e-20)
    assert torch.allclose(u, torch.linalg.solve(a, b.T).T, atol=1e-8)


def test_refinement_pulls_a_wrong_flux_back_to_the_data(sky_shards):
    """Priors 35-45% too bright (two samples of the truth x 1.35, 1.45): the refined HSC-like
    images move toward the truth in chi2 and total flux, the more so the wider the prior
    (the floor, in units of the HSC noise: 2 and 20); the refined
    mean equals the mean of the refined samples (the map is linear); a source without
    data (ivar 0) leaves the prior as it was."""
    objs = _pairs(sky_shards)
    cons = Consistency("image.des", "image.hsc", _terms(objs), floor=2.0)
    before, after, flux_before, flux_after, flux_loose = [], [], [], [], []
    for s in objs[:6]:
        hsc, truth = s.records["image.hsc"], s.truth["image.hsc"]
        samples = [dataclasses.replace(hsc, flux=(truth * f).astype(np.float32)) for f in (1.35, 1.45)]
        refined = refine_translation(s.records["image.des"], samples, cons)
        mean = np.mean([r.flux for r in refined], 0)
        (direct,) = refine_translation(s.records["image.des"], samples, cons,
                                       priors=[np.mean([x.flux for x in samples], 0)])
        np.testing.assert_allclose(direct.flux, mean, atol=1e-4 * float(np.abs(mean).max()))
        before.append(_chi2(1.4 * truth, truth, hsc))
        after.append(_chi2(mean, truth, hsc))
        bright = truth.sum() > 0
        if bright:
            flux_before.append(abs(1.4 * truth.sum() / truth.sum() - 1))
            flux_after.append(abs(mean.sum() / truth.sum() - 1))
        blind = dataclasses.replace(s.records["image.des"], ivar=np.zeros_like(s.records["image.des"].ivar))
        (same,) = refine_translation(blind, samples[:1], cons)
        np.testing.assert_allclose(same.flux, samples[0].flux, atol=1e-6 * float(np.abs(truth).max()))
        wide = Consistency("image.des", "image.hsc", cons.terms, floor=20.0)   # a prior 10x wider
        (loose,) = refine_translation(s.records["image.des"], samples, wide, priors=[samples[0].flux])
        if bright:
            flux_loose.append(abs(loose.flux.sum() / truth.sum() - 1))
    print("flux error", np.median(flux_before), np.median(flux_after), np.median(flux_loose))
    assert np.median(after) < 0.5 * np.median(before), (before, after)
    assert np.median(flux_after) < 0.8 * np.median(flux_before), (flux_before, flux_after)
    assert np.median(flux_loose) < 0.3 * np.median(flux_before), (flux_before, flux_loose)


def test_consistency_json_round_trip_and_unknown_keys(sky_shards):
    cons = Consistency("image.des", "image.hsc", _terms(_pairs(sky_shards)), 1.5, fit={"n_objects": 3})
    back = Consistency.from_json(cons.to_json())
    assert back.floor == 1.5 and back.terms.nearest == cons.terms.nearest
    np.testing.assert_allclose(back.terms.slope, cons.terms.slope)
    with pytest.raises(ValueError, match="unknown key"):
        Consistency.from_json({**cons.to_json(), "flor": 1.0})
