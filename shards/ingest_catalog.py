"""Catalog tables -> `Scalar` records, one Sample per row, by a column -> scalar mapping.

    cfg = load_catalog_config("launch/ingest/sdss_photoz.yaml")
    samples, counts = read_catalog("sdss_photoz/sdss_galaxies_dev.fits", cfg)
    samples[0].records["scalar.sdss_flux_r"]       # Scalar, nanomaggies, uncertainty from ivar

A mapping (YAML, typed; an unknown key is an error):

    ra: RA                       # position columns, degrees
    dec: DEC
    prefix: sdssphot             # object ids: '<prefix>-<ra><dec>' (or id_column's value)
    columns:
      - {name: sdss_flux_r, column: MODELFLUX, index: 2, ivar: MODELFLUX_IVAR, unit: nanomaggy}
      - {name: redshift, column: Z}
      - {name: nuv_flux, column: NUV_FLUX_AUTO, error: NUV_FLUXERR_AUTO, invalid: [-99.0]}

Units. A column's unit is the file's (FITS TUNIT, an HDF5 'unit' attribute), else the
mapping's `unit`; `to_unit` converts it. Fluxes convert through astropy with the AB
zero point (1 maggy = 3631 Jy; 'nanomaggy', 'uJy', 'nJy', 'erg/(s cm2 Hz)' ...), and an AB
magnitude column (unit 'mag' or 'ABmag') converts to a flux: f = 10^(-0.4 (m - 22.5))
nanomaggies, sigma_f = 0.4 ln(10) f sigma_m. A scalar without to_unit keeps the
column's unit. Uncertainties come from `ivar` (sigma = ivar^-1/2) or `error`, in the
column's unit, converted alike; neither: 0 (exact).

Invalid values are masked and counted, never turned into numbers: a value that is not
finite or equals one of `invalid`, or a non-positive / non-finite ivar, or a negative /
non-finite error, drops that scalar of that row (`counts['masked'][name]`); a row with no
valid scalar left, or without a finite position, is dropped (`counts['dropped_rows']`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import ConfigError, from_dict, load_config
from .ingest_images import coord_id
from .schema import Sample, Scalar

AB_ZERO_POINT_JY = 3631.0
MAG_UNITS = ("mag", "ABmag", "mag(AB)")


@dataclass
class ScalarColumn:
    """One scalar from one table column (element `index` of a vector column)."""
    name: str
    column: str
    index: int | None = None
    ivar: str | None = None
    error: str | None = None
    unit: str | None = None
    to_unit: str | None = None
    invalid: tuple = ()


@dataclass
class CatalogConfig:
    ra: str = "RA"
    dec: str = "DEC"
    id_column: str | None = None
    prefix: str = "cat"
    columns: tuple = ()              # ScalarColumn mappings

    def __post_init__(self):
        cols = tuple(c if isinstance(c, ScalarColumn) else from_dict(ScalarColumn, c, "CatalogConfig.columns")
                     for c in self.columns)
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise ConfigError(f"CatalogConfig.columns: scalar names repeat: {names}")
        self.columns = cols


def load_catalog_config(path: str | Path | None = None, overrides: Mapping | None = None) -> CatalogConfig:
    return load_config(CatalogConfig, path, overrides)


def _unit_factor(unit: str, to_unit: str, where: str) -> float:
    import astropy.units as u
    try:
        return float(u.Unit(unit).to(u.Unit(to_unit), equivalencies=u.zero_point_flux(AB_ZERO_POINT_JY * u.Jy)))
    except (ValueError, u.UnitsError) as e:
        raise ValueError(f"{where}: cannot convert unit {unit!r} to {to_unit!r} ({e})") from None


def convert(value: np.ndarray, sigma: np.ndarray, unit: str | None, to_unit: str | None,
            where: str) -> tuple[np.ndarray, np.ndarray]:
    """(value, sigma) in `unit` -> in `to_unit` (see the module docstring)."""
    if to_unit is None or unit == to_unit:
        return value, sigma
    if unit is None:
        raise ValueError(f"{where}: to_unit {to_unit!r} given but the column's unit is unknown; set `unit`")
    if unit in MAG_UNITS:
        flux = 10.0 ** (-0.4 * (value - 22.5))                     # nanomaggies
        flux_sigma = 0.4 * np.log(10.0) * flux * sigma
        k = _unit_factor("nanomaggy", to_unit, where)
        return flux * k, flux_sigma * k
    k = _unit_factor(unit, to_unit, where)
    return value * k, sigma * abs(k)


def table_columns(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array (N,) or (N, k)}, {name: unit}) of the first FITS table HDU with rows."""
    from astropy.io import fits
    with fits.open(path) as hdul:
        hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU) and h.data is not None and len(h.data)), None)
        if hdu is None:
            raise ValueError(f"{path}: no FITS table with rows")
        cols = {c.name: np.asarray(hdu.data[c.name]) for c in hdu.columns}
        units = {c.name: c.unit for c in hdu.columns if c.unit}
    return cols, units


def scalars_from_columns(cols: Mapping[str, np.ndarray], units: Mapping[str, str], cfg: CatalogConfig,
                         source: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict]:
    """{scalar name: (value (N,), sigma (N,), valid (N,) bool)} and {name: n masked}."""
    def column(name, index, what):
        if name not in cols:
            raise ValueError(f"{source}: {what}: no column {name!r}; columns: {sorted(cols)}")
        a = np.asarray(cols[name])
        if index is not None:
            if a.ndim != 2 or not (0 <= index < a.shape[1]):
                raise ValueError(f"{source}: {what}: column {name!r} of shape {a.shape} has no element {index}")
            a = a[:, index]
        elif a.ndim != 1:
            raise ValueError(f"{source}: {what}: column {name!r} has shape {a.shape}; give `index`")
        return a.astype(np.float64)

    out, masked = {}, {}
    for c in cfg.columns:
        what = f"scalar {c.name!r}"
        value = column(c.column, c.index, what)
        valid = np.isfinite(value)
        for bad in c.invalid:
            valid &= value != float(bad)
        if c.ivar is not None:
            ivar = column(c.ivar, c.index, what)
            valid &= np.isfinite(ivar) & (ivar > 0)
            sigma = np.where(valid, 1.0 / np.sqrt(np.where(valid, ivar, 1.0)), 0.0)
        elif c.error is not None:
            sigma = column(c.error, c.index, what)
            valid &= np.isfinite(sigma) & (sigma >= 0)
            for bad in c.invalid:
                valid &= sigma != float(bad)
        else:
            sigma = np.zeros_like(value)
        unit = units.get(c.column) or c.unit
        value, sigma = convert(np.where(valid, value, 0.0), np.where(valid, sigma, 0.0), unit, c.to_unit,
                               f"{source}: {what}")
        valid &= np.isfinite(value) & np.isfinite(sigma)
        out[c.name] = (value, sigma, valid)
        masked[c.name] = int((~valid).sum())
    return out, masked


def samples_from_columns(cols: Mapping[str, np.ndarray], units: Mapping[str, str], cfg: CatalogConfig,
                         source: str, kind: str = "catalog") -> tuple[list[Sample], dict]:
    """One Sample per row with a position and at least one valid scalar; counts of what was masked."""
    ra = np.asarray(cols[cfg.ra], np.float64) if cfg.ra in cols else None
    dec = np.asarray(cols[cfg.dec], np.float64) if cfg.dec in cols else None
    if ra is None or dec is None:
        raise ValueError(f"{source}: no position columns {cfg.ra!r}/{cfg.dec!r}; columns: {sorted(cols)}")
    scalars, masked = scalars_from_columns(cols, units, cfg, source)
    has_pos = np.isfinite(ra) & np.isfinite(dec)
    ids = cols.get(cfg.id_column) if cfg.id_column else None
    samples, no_scalar = [], 0
    for i in np.flatnonzero(has_pos):
        records = {f"scalar.{name}": Scalar(name, float(v[i]), float(s[i]))
                   for name, (v, s, ok) in scalars.items() if ok[i]}
        if not records:
            no_scalar += 1
            continue
        oid = (f"{cfg.prefix}-{_id_text(ids[i])}" if ids is not None else coord_id(cfg.prefix, ra[i], dec[i]))
        samples.append(Sample(object_id=oid, records=records,
                              meta=dict(ra=float(ra[i]), dec=float(dec[i]), source=str(source), kind=kind,
                                        row=int(i))).validate())
    counts = dict(rows=len(ra), masked=masked, dropped_rows={"no position": int((~has_pos).sum()),
                                                          "no valid scalar": no_scalar})
    return samples, counts


def _id_text(value) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.strip().replace(".", "p").replace("/", "_").replace(" ", "_")


def read_catalog(path: str | Path, cfg: CatalogConfig) -> tuple[list[Sample], dict]:
    """A FITS catalog -> (Samples of scalars, counts: rows, masked per scalar, dropped rows)."""
    if not cfg.columns:
        cols, _ = table_columns(path)
        raise ValueError(f"{path}: a catalog needs a column mapping (--catalog-map, e.g. "
                         f"launch/ingest/sdss_photoz.yaml); its columns: {sorted(cols)}")
    cols, units = table_columns(path)
    return samples_from_columns(cols, units, cfg, str(path))

