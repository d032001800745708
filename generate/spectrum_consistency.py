"""Data consistency for spectrum super-resolution: the generated spectrum, seen through the
source spectrograph, made to agree with the source observation.

A super-resolved spectrum (say DESI-like, from an SDSS-like observation) is a draw from the
model's posterior; the model never checks it against the pixels it was given, and the tiny
models put no emission lines in it at all. `SpectrumRefinement` combines the two sources
of information as Gaussians, as `generate.consistency` does for images:

    prior       H ~ N(M, V)                M: the samples' mean on the target grid, V: their
                                           variance plus (floor x target noise)^2 plus
                                           (fraction x M)^2
    likelihood  D ~ N(s A H, 1 / ivar_src) D: the source spectrum, A: the source
                                           spectrograph seen from the target's pixels, s: the
                                           object's aperture ratio (below)

and returns the posterior mean (s^2 A^T W A + V^-1)^-1 (s A^T W D + V^-1 M), a banded
system solved exactly (sparse LU; a few thousand unknowns). Where the source is silent
(beyond its wavelength range, masked pixels, detail finer than its line spread) the
model's prior stays.

Emission lines: with the object's redshift known (its `scalar.redshift` record: SDSS
spectra come with one), the prior also holds each nebular line of `shards.sed.LINES` that
falls on the target grid ([OII], H-beta, [OIII], [NII], H-alpha) as a Gaussian profile at
the target's resolution, and under each group of lines a broad Gaussian bump (15 A) for
the local continuum: H = M + G a + e, e ~ N(0, V). A line's flux ~ N(0, (line_ew x the
local continuum of M)^2), an equivalent-width prior; a bump's amplitude ~ N(0, target
noise^2), so that a line's flux is its excess over the local continuum and not the
model's continuum error summed over the line's window (without bumps the lines soaked that
error up; with free bumps they fitted the source's noise). The line fluxes are fitted to
the source data through A (the source's resolution and aperture) and come back at the
target's resolution. Without the line terms a line lives only in the pixel term, whose
width is set for the continuum: on the simulated sky the pixel term alone left H-alpha,
H-beta, [OIII], [OII] at a median 0.97 of their true flux missing (a prior with the
continuum right and no lines, 24 objects), with the line terms 0.38 (line_ew 30).

`fit_spectrum_width` picks line_ew (or no line terms) by the line fluxes at every line
position of the fitting pairs, against their observed target spectra: on the simulated
sky the SDSS-like spectrum holds the lines the DESI-like one shows at >= 3 sigma at a
median S/N of only ~1-1.7, so a free line flux adds more noise at the positions without a
line than it recovers where there is one, and the fit chooses a strongly shrunk prior
(0.3 A on the demo's model): the lines come back in part (README, Results; bench/RESULTS.md).

The forward operator A (target pixels -> source pixels): each target pixel's flux density,
a box of its width, broadened by the Gaussian line spread taking the target's resolution to
the source's (sigma^2 = sigma_src^2 - sigma_tgt^2, none where the target's is the broader),
averaged over each source pixel (flux density conserved; rows sum to one). Source pixels
whose support reaches beyond the target grid are not used.

The aperture ratio s: the two spectrographs' fibres (SDSS 3", DESI 1.5") hold different
shares of a galaxy's light, a ratio of 1.2-2.2 on the simulated sky that depends on the
galaxy's size and the seeing. Per object it is the least-squares ratio of the source data
to the view of the prior mean (A M), so that the refinement moves the spectrum's shape,
not its level; a ratio that cannot be fitted (no usable pixel, a non-positive fit) falls
back to `Consistency.fit['aperture_ratio']`, the fitting pairs' median, or 1.

    cons = fit_consistency(pipe, pairs, "spectrum.sdss", "spectrum.desi")  # prior width, from pairs
    refined = refine_translation(sdss_record, samples, cons)               # Spectra, same calls as images
    pipe.superres(objects, consistency=cons)
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from scipy.special import erf

from ..shards.schema import Spectrum
from ..shards.sed import C_KMS, LINES
from ..tokenizers.resample import pixel_edges
from .measure import instrument_sigma, line_fluxes, noise_variance

KERNEL_HALF_WIDTH_SIGMA = 5.0        # the broadening kernel is cut here
FULL_ROW = 0.999                     # a source pixel is used if its row of A sums to at least this
LINE_SIGMA_V = 100.0                 # km/s, the emission lines' velocity dispersion in their profiles
LINE_HALF_WIDTH_SIGMA = 6.0          # a line's profile is cut here
SPECTRUM_FLOORS = (0.1, 0.25, 0.5, 1.0, 2.0)   # the grid `fit_spectrum_width` picks the pixel term from:
SPECTRUM_FRACTIONS = (0.0, 0.05, 0.1)          # floors (x the target noise) x fractions (of the prior mean)
LINE_EWS = (None, 0.3, 1.0, 3.0, 10.0, 30.0)  # and the lines' prior width, Angstrom of equivalent width
                                               # (None: no line terms)
CONTINUUM_PRIOR = 1.0                # the local continua's prior width, x the target's noise (0: free)
LINE_SCORE_CLIP = 5.0                # line errors beyond this many sigma count as this many (broad
                                     # quasar lines, sky residuals) when line_ew is fitted
CONTINUUM_SIGMA_A = 15.0             # Angstrom, the free local continuum under each group of lines
LINE_RIDGE = 1e-9                    # the line fluxes' flat prior, relative to their data term


@lru_cache(maxsize=8)
def _view_matrix(src_wave: bytes, src_res: bytes, tgt_wave: bytes, tgt_res: bytes) -> scipy.sparse.csr_matrix:
    ws, wt = np.frombuffer(src_wave), np.frombuffer(tgt_wave)                  # (Ls,), (Lt,) Angstrom
    sig_s = instrument_sigma(ws, np.frombuffer(src_res, np.float32))
    sig_t = np.interp(ws, wt, instrument_sigma(wt, np.frombuffer(tgt_res, np.float32)))
    extra = np.sqrt(np.clip(sig_s ** 2 - sig_t ** 2, 0.0, None))               # (Ls,) broadening, A
    es, et = pixel_edges(ws), pixel_edges(wt)                                   # (Ls+1,), (Lt+1,)
    width_t = np.diff(et)                                                       # (Lt,)
    rows, cols, vals = [], [], []
    for i in range(len(ws)):
        a, b = es[i], es[i + 1]
        reach = KERNEL_HALF_WIDTH_SIGMA * extra[i] + width_t.max()
        j = np.arange(np.searchsorted(wt, a - reach), np.searchsorted(wt, b + reach))
        if not len(j):
            continue
        # the target pixel j's box (width d) broadened by N(0, extra): approximated by a Gaussian
        # of variance extra^2 + d^2 / 12, its share inside [a, b], per Angstrom of source pixel
        s = np.sqrt(extra[i] ** 2 + width_t[j] ** 2 / 12.0)
        share = 0.5 * (erf((b - wt[j]) / (np.sqrt(2) * s)) - erf((a - wt[j]) / (np.sqrt(2) * s)))
        w = share * width_t[j] / (b - a)
        keep = w > 1e-8
        rows.append(np.full(keep.sum(), i)); cols.append(j[keep]); vals.append(w[keep])
    rows, cols, vals = (np.concatenate(v) if v else np.zeros(0) for v in (rows, cols, vals))
    return scipy.sparse.csr_matrix((vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=(len(ws), len(wt)))


def spectrum_view(source: Spectrum, target: Spectrum) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """A (Ls, Lt) sparse: target-grid flux density -> the source spectrograph's pixels, and
    `full` (Ls,) bool: the source pixels whose whole support lies on the target grid."""
    a = _view_matrix(np.asarray(source.wavelength, np.float64).tobytes(),
                     np.asarray(source.resolution, np.float32).tobytes(),
                     np.asarray(target.wavelength, np.float64).tobytes(),
                     np.asarray(target.resolution, np.float32).tobytes())
    total = np.asarray(a.sum(1)).ravel()
    full = total >= FULL_ROW
    # rows normalised where nearly full: the erf approximation's sums are ~1 up to rounding
    return scipy.sparse.diags(np.where(full, 1.0 / np.maximum(total, 1e-12), 0.0)) @ a, full


def line_profiles(like: Spectrum, redshift: float, sigma_v: float = LINE_SIGMA_V) -> tuple[list[str], np.ndarray]:
    """The emission lines of `shards.sed.LINES` at `redshift` that fall on the grid of `like`:
    their names and profiles G (Lt, K), unit line flux (1e-17 erg/s/cm^2) as flux density on
    the pixels of `like`, a Gaussian of the instrument's line spread and `sigma_v` km/s in
    quadrature, integrated over each pixel."""
    wave = np.asarray(like.wavelength, np.float64)
    edges = pixel_edges(wave)
    inst = instrument_sigma(wave, like.resolution)
    names, cols = [], []
    for name, rest in LINES.items():
        centre = rest * (1.0 + redshift)
        sig = float(np.hypot(np.interp(centre, wave, inst), centre * sigma_v / C_KMS))
        if centre - 3 * sig < edges[0] or centre + 3 * sig > edges[-1]:
            continue
        g = 0.5 * (erf((edges[1:] - centre) / (np.sqrt(2) * sig)) - erf((edges[:-1] - centre) / (np.sqrt(2) * sig)))
        g = np.where(np.abs(wave - centre) <= LINE_HALF_WIDTH_SIGMA * sig, g / np.diff(edges), 0.0)
        names.append(name); cols.append(g)
    return names, (np.stack(cols, 1) if cols else np.zeros((len(wave), 0)))


def local_continua(like: Spectrum, names: Sequence[str], redshift: float,
                   sigma_a: float = CONTINUUM_SIGMA_A) -> np.ndarray:
    """(Lt, J) Gaussian bumps of unit peak and `sigma_a` Angstrom, one per group of the lines
    `names` (lines closer than 2 sigma_a share one): the continuum under the lines, free
    beside them, so that a line's flux is its excess over the local continuum rather than
    the model's continuum error summed over the line's window."""
    wave = np.asarray(like.wavelength, np.float64)
    centres = sorted(LINES[n] * (1.0 + redshift) for n in names)
    groups: list[list[float]] = []
    for c in centres:
        if groups and c - groups[-1][-1] < 2 * sigma_a:
            groups[-1].append(c)
        else:
            groups.append([c])
    cols = [np.exp(-0.5 * ((wave - np.mean(g)) / sigma_a) ** 2) for g in groups]
    return np.stack(cols, 1) if cols else np.zeros((len(wave), 0))


class SpectrumRefinement:
    """One object's refinement problem (the interface of `generate.consistency.Refinement`):
    the source view, its weights and the fitted aperture ratio, the samples' mean and spread,
    and with a redshift the emission-line profiles whose fluxes are free."""

    def __init__(self, source: Spectrum, samples: Sequence[Spectrum], aperture_ratio: float | None = None,
                 redshift: float | None = None):
        if not samples:
            raise ValueError("refine_translation: needs at least one sample of the target spectrum")
        self.like = like = samples[0]
        self.stack = np.stack([s.flux for s in samples]).astype(np.float64)      # (S, Lt)
        self.mean = self.stack.mean(0)
        self.spread = self.stack.var(0) if len(samples) > 1 else np.zeros_like(self.mean)
        self.noise_var = noise_variance(like.ivar, (like.ivar > 0) & ~like.mask)   # (Lt,)
        self.view, full = spectrum_view(source, like)
        good = full & ~source.mask & (source.ivar > 0) & np.isfinite(source.flux)
        self.w = np.where(good, source.ivar, 0.0).astype(np.float64)            # (Ls,)
        self.data = np.where(good, source.flux, 0.0).astype(np.float64)
        seen = self.view @ self.mean
        den = float((self.w * seen ** 2).sum())
        ratio = float((self.w * seen * self.data).sum()) / den if den > 0 else float("nan")
        self.fitted_ratio = ratio
        self.ratio = ratio if np.isfinite(ratio) and ratio > 0 else (aperture_ratio or 1.0)
        self.lines, self.line_profiles = [], np.zeros((len(self.mean), 0))     # names, (Lt, K)
        self.continua = np.zeros((len(self.mean), 0))                            # (Lt, J)
        self.redshift = redshift
        if redshift is not None and np.isfinite(redshift):
            self.lines, self.line_profiles = line_profiles(like, redshift)
            self.continua = local_continua(like, self.lines, redshift)

    def line_scale(self, centre: np.ndarray) -> np.ndarray:
        """(K,) each line's local continuum level (flux density) in the prior mean `centre`,
        at least the target's noise there: the line-flux prior is line_ew times it."""
        out = []
        for name in self.lines:
            near = np.abs(self.like.wavelength - LINES[name] * (1 + self.redshift)) <= CONTINUUM_SIGMA_A
            out.append(max(abs(float(np.median(centre[near]))), float(np.sqrt(np.median(self.noise_var[near])))))
        return np.array(out)

    def continuum_precision(self) -> np.ndarray:
        """(J,) prior precision of the local continua's amplitudes: 1 / (CONTINUUM_PRIOR x the
        target's noise at their centres)^2 (0: free)."""
        if not CONTINUUM_PRIOR:
            return np.zeros(self.continua.shape[1])
        at = np.argmax(self.continua, 0)
        return 1.0 / (CONTINUUM_PRIOR ** 2 * self.noise_var[at])

    def solve(self, centres: np.ndarray, widths: Sequence[tuple[float, float]],
              line_ew: float | None = None) -> np.ndarray:
        """Posterior means (P, Lt) for prior means `centres` (P, Lt) and prior widths
        [(floor, fraction)] * P: variance spread + (floor noise)^2 + (fraction mean)^2, and
        with `line_ew` (Angstrom) each line's flux ~ N(0, (line_ew x its local continuum)^2)
        beside the free local continua (None: no line terms)."""
        a = self.ratio * self.view                                              # (Ls, Lt)
        normal = (a.T @ scipy.sparse.diags(self.w) @ a).tocsc()                 # (Lt, Lt) banded
        rhs_data = a.T @ (self.w * self.data)                                   # (Lt,)
        use_lines = line_ew is not None and len(self.lines) > 0
        g = scipy.sparse.csc_matrix(np.hstack([self.line_profiles, self.continua]) if use_lines
                                    else np.zeros((len(self.mean), 0)))         # (Lt, K + J)
        out = []
        for centre, (floor, frac) in zip(np.asarray(centres, np.float64), widths):
            var = self.noise_var * floor ** 2 + self.spread + (frac * self.mean) ** 2
            inv = 1.0 / np.maximum(var, 1e-12 * max(float(var.max()), 1e-30))     # (Lt,) D^-1
            if not use_lines:
                lhs = normal + scipy.sparse.diags(inv, format="csc")
                out.append(scipy.sparse.linalg.spsolve(lhs, rhs_data + centre * inv))
                continue
            # x = centre + G a + e, e ~ N(0, D): the joint normal equations in (x, a); the
            # lines' fluxes have the prior above, the continua a flat one (a negligible ridge)
            dg = scipy.sparse.diags(inv) @ g                                     # (Lt, K + J)
            gdg = (g.T @ dg).toarray()
            ridge = LINE_RIDGE * max(float(np.diag(gdg).max()), 1e-30)
            prior = np.concatenate([1.0 / (line_ew * self.line_scale(centre)) ** 2,
                                    self.continuum_precision()]) + ridge
            lhs = scipy.sparse.bmat([[normal + scipy.sparse.diags(inv), -dg],
                                     [-dg.T, scipy.sparse.csc_matrix(gdg + np.diag(prior))]], format="csc")
            rhs = np.concatenate([rhs_data + centre * inv, -(dg.T @ centre)])
            out.append(scipy.sparse.linalg.spsolve(lhs, rhs)[:len(centre)])
        return np.stack(out)


def fit_spectrum_width(pairs: Sequence, priors: Sequence[Sequence[Spectrum]], source: str, target: str,
                       floors: Sequence[float] | None = None, fractions: Sequence[float] | None = None,
                       line_ews: Sequence[float] = LINE_EWS):
    """The spectra's `fit_prior_width` (no truth needed): the pixel term's (floor, fraction)
    of the grid whose refined spectra (without line terms) lie closest to the pairs' observed
    target spectra (median chi2), then the line prior `line_ew` of `line_ews` (None: no line
    terms) whose refined line fluxes, at every line position on the grid, lie closest to
    those the observed target spectra show (mean squared error in units of their noise,
    clipped at LINE_SCORE_CLIP; the target's noise is independent of the source's, so this
    ranks the priors as the truth's line fluxes would), over the pairs with a catalog
    redshift; with none, line_ew stays None. Also the pairs' median aperture ratio."""
    from .consistency import Consistency, chi2_vs_observed, known_redshift
    floors, fractions = floors or SPECTRUM_FLOORS, fractions or SPECTRUM_FRACTIONS
    widths = [(float(f), float(r)) for f in floors for r in fractions]
    problems = [SpectrumRefinement(s.records[source], g, None, known_redshift(s)) for s, g in zip(pairs, priors)]
    chi = [[chi2_vs_observed(m, s.records[target]) for m in p.solve(np.repeat(p.mean[None], len(widths), 0), widths)]
           for s, p in zip(pairs, problems)]                                  # (objects, widths)
    scores = np.median(np.array(chi), 0)
    floor, fraction = widths[int(np.argmin(scores))]
    line_err = {ew: [] for ew in line_ews}                                    # ew -> [(f - f_obs) / sigma]
    for s, p in zip(pairs, problems):
        if not p.lines:
            continue
        observed = s.records[target]
        seen = line_fluxes(observed, p.redshift)
        for ew in line_ews:
            (model,) = p.solve(p.mean[None], [(floor, fraction)], ew)
            got = line_fluxes(dataclasses.replace(observed, flux=model.astype(np.float32)), p.redshift)
            line_err[ew] += [(got[k][0] - f) / sig for k, (f, sig) in seen.items()
                             if k in got and np.isfinite(f) and np.isfinite(got[k][0]) and sig > 0]
    mse = {ew: float(np.mean(np.minimum(np.square(v), LINE_SCORE_CLIP ** 2))) for ew, v in line_err.items() if v}
    line_ew = min(mse, key=mse.get) if mse else None
    ratios = np.array([p.fitted_ratio for p in problems])
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    return Consistency(source, target, None, floor, fraction=fraction, line_ew=line_ew, fit=dict(
        n_objects=len(pairs), n_samples=len(priors[0]), aperture_ratio=float(np.median(ratios)) if len(ratios) else 1.0,
        median_chi2_vs_observed={f"{f:g},{r:g}": float(c) for (f, r), c in zip(widths, scores)},
        line_mse_vs_observed={("none" if ew is None else f"{ew:g}"): v for ew, v in mse.items()},
        n_lines=len(next(iter(line_err.values()), []))))
