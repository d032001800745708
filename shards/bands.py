"""The band registry: one entry per (survey, filter), with its real filter curve.

A tokenizer learns a band from this metadata (effective wavelength and width), so a
new survey is a registry entry, not a code fork:

    register(Band("lsst.r", survey="lsst", filter="r", curve="lsst2023-r", zero_point=31.4))

Filter curves come from `speclite` (no network needed). Effective wavelengths are
photon-weighted, in Angstrom, computed from the curve on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Band:
    """name: registry key 'survey.filter'; curve: a speclite filter name;
    zero_point: AB magnitude of one flux unit of this survey's images."""
    name: str
    survey: str
    filter: str
    curve: str
    zero_point: float

    @property
    def response(self):
        """speclite FilterResponse of this band."""
        return _load_curve(self.curve)

    @property
    def effective_wavelength(self) -> float:
        """Photon-weighted mean wavelength, Angstrom."""
        return float(self.response.effective_wavelength.value)

    @property
    def width(self) -> float:
        """RMS width of the photon-weighted response, Angstrom."""
        return _curve_width(self.curve)


@lru_cache(maxsize=None)
def _load_curve(name: str):
    import speclite.filters
    return speclite.filters.load_filter(name)


@lru_cache(maxsize=None)
def _curve_width(name: str) -> float:
    r = _load_curve(name)
    lam = np.asarray(r.wavelength, dtype=np.float64)
    w = np.asarray(r.response, dtype=np.float64) * lam  # photon weighting
    mean = np.sum(w * lam) / np.sum(w)
    return float(np.sqrt(np.sum(w * (lam - mean) ** 2) / np.sum(w)))


REGISTRY: dict[str, Band] = {}


def register(band: Band) -> Band:
    if band.name != f"{band.survey}.{band.filter}":
        raise ValueError(f"band name {band.name!r} must be '<survey>.<filter>'")
    REGISTRY[band.name] = band
    return band


def get(name: str) -> Band:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown band {name!r}; known bands: {sorted(REGISTRY)}") from None


def survey_bands(survey: str) -> tuple[str, ...]:
    """Registry names of a survey's bands, in registration (wavelength) order."""
    return tuple(b.name for b in REGISTRY.values() if b.survey == survey)


# DES/Legacy-like imaging: DECam g, r, i, z; nanomaggies (zero point 22.5).
for _f in "griz":
    register(Band(f"des.{_f}", "des", _f, f"decamDR1-{_f}", 22.5))
# HSC-SSP-like imaging: g, r, i, z, y; HSC coadd counts (zero point 27.0).
for _f in "grizy":
    register(Band(f"hsc.{_f}", "hsc", _f, f"hsc2017-{_f}", 27.0))
# SDSS imaging u, g, r, i, z; nanomaggies (zero point 22.5); catalog photometry.
for _f in "ugriz":
    register(Band(f"sdss.{_f}", "sdss", _f, f"sdss2010-{_f}", 22.5))
# Legacy Surveys DR9 (DECaLS) cut-outs g, r, z; nanomaggies (zero point 22.5).
for _f in "grz":
    register(Band(f"legacy.{_f}", "legacy", _f, f"decamDR1-{_f}", 22.5))
