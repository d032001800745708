"""Data consistency for spectrum super-resolution (generate.spectrum_consistency): the
SDSS-like view of a DESI-like spectrum, and what the refinement does to a prior that has
the continuum right and no emission lines, with and without the object's redshift."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import median_filter

from omnisky.generate.consistency import Consistency, fit_prior_width, known_redshift, refine_translation
from omnisky.generate.measure import line_fluxes
from omnisky.generate.spectrum_consistency import SpectrumRefinement, line_profiles, spectrum_view
from omnisky.shards.reader import stream
from omnisky.shards.writer import shard_urls

SDSS, DESI = "spectrum.sdss", "spectrum.desi"


@pytest.fixture(scope="module")
def pairs(sky_shards):
    objs = [s for s in stream(shard_urls(sky_shards)) if SDSS in s.records and DESI in s.records]
    assert len(objs) >= 6
    return objs


def _lineless(s) -> np.ndarray:
    """The DESI-like truth with its narrow features (emission lines) filtered out."""
    return median_filter(s.truth[DESI].astype(np.float64), 41, mode="nearest")


def _chi2(model, s) -> float:
    rec = s.records[DESI]
    good = ~rec.mask & (rec.ivar > 0)
    return float(np.mean((model[good] - s.truth[DESI][good]) ** 2 * rec.ivar[good]))


def test_view_of_the_desi_truth_is_the_sdss_truth(pairs):
    """The noiseless DESI-like spectrum seen through the SDSS-like line spread, pixels and the
    fitted aperture ratio lands on the noiseless SDSS-like one far within the SDSS noise; the
    ratio is the simulated fibres' ratio; rows of the view sum to one where they are used."""
    for s in pairs[:6]:
        src, tgt = s.records[SDSS], s.records[DESI]
        problem = SpectrumRefinement(src, [dataclasses.replace(tgt, flux=s.truth[DESI])])
        seen = problem.ratio * (problem.view @ problem.mean)
        good = problem.w > 0
        assert good.mean() > 0.9
        chi2 = np.mean((seen[good] - s.truth[SDSS][good]) ** 2 * problem.w[good])
        assert chi2 < 0.01, (s.object_id, chi2)
        fibres = s.params["fibre_frac_sdss"] / s.params["fibre_frac_desi"]
        assert problem.ratio == pytest.approx(fibres, rel=0.1)
    view, full = spectrum_view(src, tgt)
    np.testing.assert_allclose(np.asarray(view.sum(1)).ravel()[full], 1.0, atol=1e-9)
    assert not full[src.wavelength > tgt.wavelength[-1]].any()


def test_line_profiles_hold_unit_flux_at_the_redshifted_lines(pairs):
    tgt = pairs[0].records[DESI]
    names, g = line_profiles(tgt, 0.1)
    assert "Halpha" in names and "OII_3727" in names and g.shape == (len(tgt.wavelength), len(names))
    dlam = np.gradient(tgt.wavelength)
    np.testing.assert_allclose((g * dlam[:, None]).sum(0), 1.0, atol=0.01)
    peak = tgt.wavelength[np.argmax(g[:, names.index("Halpha")])]
    assert peak == pytest.approx(6564.61 * 1.1, abs=1.0)
    assert "Halpha" not in line_profiles(tgt, 0.6)[0]                          # redshifted off the grid


def test_refinement_recovers_emission_lines_at_a_known_redshift(pairs):
    """A prior with the continuum right and no lines: pulled to the SDSS-like spectrum with
    the redshift known, the lines' fluxes come back (median relative error well below the
    1.0 of no line, and below the pixel term's alone), while the continuum stays close to
    the truth; beyond the SDSS-like range, where no line falls, the prior is untouched."""
    cons = Consistency(SDSS, DESI, None, floor=1.0, line_ew=30.0)
    rel = {"prior": [], "pixels": [], "lines": []}
    chi2 = []
    for s in pairs:
        z, tgt = s.params["z"], s.records[DESI]
        prior = dataclasses.replace(tgt, flux=_lineless(s).astype(np.float32))
        (pixels,) = refine_translation(s.records[SDSS], [prior], cons)
        catalog_z = known_redshift(s)                    # the catalog's, where the object has one
        (lines,) = refine_translation(s.records[SDSS], [prior], cons, redshift=z if catalog_z is None else catalog_z)
        chi2.append(_chi2(lines.flux, s))
        truth = line_fluxes(dataclasses.replace(tgt, flux=s.truth[DESI], mask=np.zeros_like(tgt.mask)), z)
        for name, spec in (("prior", prior), ("pixels", pixels), ("lines", lines)):
            got = line_fluxes(dataclasses.replace(spec, mask=np.zeros_like(tgt.mask)), z)
            rel[name] += [abs(got[k][0] - f) / f for k, (f, sig) in truth.items()
                          if np.isfinite(f) and f >= 3 * sig and np.isfinite(got[k][0])]
        beyond = tgt.wavelength > s.records[SDSS].wavelength[-1] + 50
        if not line_profiles(tgt, z)[1][beyond].any():
            np.testing.assert_allclose(lines.flux[beyond], prior.flux[beyond], rtol=1e-3, atol=1e-3)
    assert len(rel["lines"]) >= 3
    med = {k: float(np.median(v)) for k, v in rel.items()}
    assert med["prior"] > 0.9 and med["lines"] < 0.7 and med["lines"] < med["pixels"] - 0.25, med   # 0.99 / 0.97 / 0.38
    assert np.median(chi2) < 0.2                                               # 0.03


def test_fit_prior_width_on_spectra_keeps_the_aperture_ratio_and_round_trips(pairs):
    priors = [[dataclasses.replace(s.records[DESI], flux=_lineless(s).astype(np.float32))] for s in pairs]
    cons = fit_prior_width(pairs, priors, SDSS, DESI, floors=(0.5, 2.0), fractions=(0.0, 0.2))
    assert cons.terms is None and cons.floor in (0.5, 2.0) and cons.line_ew in (None, 0.3, 1.0, 3.0, 10.0, 30.0)
    assert 1.0 < cons.fit["aperture_ratio"] < 2.5 and len(cons.fit["median_chi2_vs_observed"]) == 4
    back = Consistency.from_json(cons.to_json())
    assert (back.floor, back.fraction, back.line_ew, back.fit) == (cons.floor, cons.fraction, cons.line_ew, cons.fit)
    assert cons.fit["n_lines"] > 0 and len(cons.fit["line_mse_vs_observed"]) == 6
    with pytest.raises(ValueError, match="unknown key"):
        Consistency.from_json({**cons.to_json(), "lines": False})
