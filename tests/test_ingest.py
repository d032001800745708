"""Ingesting real survey files (../shared/data) into records and raw shards."""
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DECALS = DATA / "decals" / "cutout_59.1067_-30.4848.fits"
DECALS_PSF = DATA / "decals" / "copsf_59.1067_-30.4848.fits"
HSC = DATA / "hsc_cosmos" / "Cut_HSC.fits"
HSC_PSF = DATA / "hsc_cosmos" / "PSF_HSC.fits"
SDSS = DATA / "sdss_spectra" / "spec-0266-51602-0013.fits"
DESI = DATA / "desi" / "coadd-sv3-dark-26065.fits"


def need(*paths):
    for p in paths:
        if not p.exists():
            pytest.skip(f"real survey data absent: {p}")


def test_read_legacy():
    need(DECALS, DECALS_PSF)
    from omnisky.shards.ingest_images import LEGACY_PSF_FWHM, read_legacy
    s = read_legacy(DECALS, DECALS_PSF)
    im = s.records["image.legacy"]
    assert im.shape == (3, 256, 256) and im.bands == ("legacy.g", "legacy.r", "legacy.z")
    assert im.survey == "legacy" and im.zero_point == 22.5
    assert im.pixel_scale == pytest.approx(0.262, rel=1e-3)
    med_abs = np.median(np.abs(im.flux), axis=(1, 2))       # sky-dominated cut-out, nanomaggies
    sigma = np.median(1 / np.sqrt(im.ivar), axis=(1, 2))
    assert np.all((med_abs > 5e-4) & (med_abs < 0.02)), med_abs
    assert np.all((sigma > 1e-3) & (sigma < 0.02)), sigma
    assert np.all(sigma[2] > sigma[:2])                      # z is the noisiest band
    assert np.all((im.psf_fwhm > 0.8) & (im.psf_fwhm < 1.6)), im.psf_fwhm
    assert not np.allclose(im.psf_fwhm, [LEGACY_PSF_FWHM[f] for f in "grz"])   # measured, not default
    assert abs(s.meta["ra"] - 59.1067) * np.cos(np.radians(30.48)) * 3600 < 1.0
    assert abs(s.meta["dec"] + 30.4848) * 3600 < 1.0
    stamp = read_legacy(DECALS, size=32).records["image.legacy"]
    assert stamp.shape == (3, 32, 32)
    np.testing.assert_array_equal(stamp.flux, im.flux[:, 112:144, 112:144])
    np.testing.assert_allclose(stamp.psf_fwhm, [LEGACY_PSF_FWHM[f] for f in "grz"])


def test_psf_fwhm_recovers_a_gaussian():
    from omnisky.shards.ingest_images import psf_fwhm
    yy, xx = np.mgrid[:41, :41]
    sigma_pix = 2.1
    psf = np.exp(-((yy - 20.3) ** 2 + (xx - 19.8) ** 2) / (2 * sigma_pix ** 2))
    assert psf_fwhm(psf, 0.2) == pytest.approx(2.3548 * sigma_pix * 0.2, rel=1e-3)


def test_read_hsc():
    need(HSC, HSC_PSF)
    from omnisky.shards.ingest_images import read_hsc
    s = read_hsc(HSC, HSC_PSF)
    im = s.records["image.hsc"]
    assert im.shape == (5, 50, 50) and im.bands == tuple(f"hsc.{f}" for f in "grizy")
    assert im.pixel_scale == pytest.approx(0.168, rel=1e-3) and im.zero_point == 27.0
    assert np.all((im.psf_fwhm > 0.4) & (im.psf_fwhm < 1.2)), im.psf_fwhm
    assert s.meta["ivar_source"] == "sky_mad"
    sigma = 1 / np.sqrt(im.ivar[:, 0, 0])
    for c in range(5):          # the sky noise estimate fits the sky side (sources are all positive)
        resid = (im.flux[c] - np.median(im.flux[c])) / sigma[c]
        below1, below2 = np.mean(resid < -1), np.mean(resid < -2)
        assert 0.04 < below1 < 0.2 and below2 < 0.03, (c, below1, below2)


def test_read_sdss():
    need(SDSS)
    from omnisky.shards.ingest_spectra import read_sdss
    s = read_sdss(SDSS)
    sp = s.records["spectrum.sdss"]
    assert s.object_id == "sdss-0266-51602-0013" and sp.instrument == "sdss"
    assert s.records["scalar.redshift"].value == pytest.approx(0.1213, abs=2e-3)
    assert np.all(np.diff(sp.wavelength) > 0) and 3700 < sp.wavelength[0] < 3900 and 9100 < sp.wavelength[-1] < 9300
    assert 1000 < np.median(sp.resolution) < 3000 and np.all(sp.resolution > 1000)
    assert 0 < sp.mask.sum() < 0.1 * sp.mask.size
    assert np.all(sp.ivar[sp.mask] == 0) and np.all(np.isfinite(sp.flux))


def test_read_desi():
    need(DESI)
    from astropy.io import fits
    from omnisky.shards.ingest_spectra import read_desi
    samples, dropped = read_desi(DESI)
    assert dropped == {"(blank)": 2, "SKY": 1}
    assert [s.object_id for s in samples] == ["desi-39627866878511337", "desi-39627866878514741"]
    sp = samples[0].records["spectrum.desi"]
    assert sp.wavelength.shape == (7781,) and np.all(np.diff(sp.wavelength) > 0)
    assert sp.wavelength[0] == pytest.approx(3600.0) and sp.wavelength[-1] == pytest.approx(9824.0)
    assert 1500 < np.median(sp.resolution) < 7000
    assert samples[0].records["scalar.flux_g"].value == pytest.approx(0.2118, rel=1e-3)
    with fits.open(DESI) as h:                                # B/R overlap: ivar-weighted mean
        row, wl = 2, 5780.0
        ib = int(np.argmin(np.abs(h["B_WAVELENGTH"].data - wl)))
        ir = int(np.argmin(np.abs(h["R_WAVELENGTH"].data - wl)))
        fb, vb = h["B_FLUX"].data[row, ib], h["B_IVAR"].data[row, ib]
        fr, vr = h["R_FLUX"].data[row, ir], h["R_IVAR"].data[row, ir]
    j = int(np.argmin(np.abs(sp.wavelength - wl)))
    assert vb > 0 and vr > 0
    assert sp.flux[j] == pytest.approx((vb * fb + vr * fr) / (vb + vr), rel=1e-5)
    assert sp.ivar[j] == pytest.approx(vb + vr, rel=1e-5)


def test_cli_ingest_round_trip(tmp_path):
    need(DECALS, DECALS_PSF, HSC, HSC_PSF, SDSS, DESI)
    from omnisky.shards.cli import main
    from omnisky.shards.ingest import crossmatch, detect_kind, read_file
    from omnisky.shards.reader import stream
    from omnisky.shards.writer import read_manifest, shard_urls, verify
    files = [DECALS, DECALS_PSF, HSC, SDSS, DESI]             # HSC's PSF is found next to it
    out = tmp_path / "real"
    assert main(["ingest", *map(str, files), "--out", str(out), "--size", "32", "--shard-size", "2"]) == 0
    m = read_manifest(out)
    assert verify(out) == [] and len(m["shards"]) == 3 and m["total"] == 5
    s = m["summary"]
    assert s["objects"] == 5 and s["unmatched"] == 5 and s["dropped_sky_fibres"] == 3
    assert m["modality_counts"]["spectrum.desi"] == 2 and m["modality_counts"]["image.hsc"] == 1
    psf = {p.name: p for p in (DECALS_PSF,)}
    expected = crossmatch([read_file(p, detect_kind(p), psf, 32)[0] for p in (DECALS, HSC, SDSS, DESI)])
    got = {x.object_id: x for x in stream(shard_urls(out), decode="raw", split=False)}
    assert sorted(got) == sorted(e.object_id for e in expected)
    for e in expected:
        g = got[e.object_id]
        assert set(g.records) == set(e.records) and g.meta["ra"] == pytest.approx(e.meta["ra"])
        for key, rec in e.records.items():
            for name in ("flux", "ivar", "mask", "wavelength", "resolution", "psf_fwhm"):
                if hasattr(rec, name):
                    np.testing.assert_array_equal(getattr(g.records[key], name), getattr(rec, name), err_msg=key)
            if key.startswith("scalar"):
                assert g.records[key].value == pytest.approx(rec.value)
    hsc = next(v for v in got.values() if "image.hsc" in v.records)
    assert hsc.meta["sources"][0]["kind"] == "hsc"
    assert not np.allclose(hsc.records["image.hsc"].psf_fwhm, [0.77, 0.76, 0.58, 0.68, 0.68])
    # inspect: a column per band of every survey found, and the spectra
    from omnisky.shards.grid import image_columns
    assert [b for _, b in image_columns(list(got.values()))] == [
        "hsc.g", "hsc.r", "hsc.i", "hsc.z", "hsc.y", "legacy.g", "legacy.r", "legacy.z"]
    png = tmp_path / "real.png"
    assert main(["inspect", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crossmatch_merges_an_image_and_a_spectrum(tmp_path):
    need(DECALS, SDSS)
    from astropy.io import fits
    from omnisky.shards.ingest import ingest
    from omnisky.shards.reader import stream
    from omnisky.shards.writer import shard_urls
    moved = tmp_path / "spec-moved.fits"                      # the SDSS spectrum put 0.5" off the cut-out centre
    with fits.open(SDSS) as h:
        h["SPECOBJ"].data["PLUG_RA"][0] = 59.1067598 + 0.5 / 3600 / np.cos(np.radians(30.4848))
        h["SPECOBJ"].data["PLUG_DEC"][0] = -30.4848417
        h.writeto(moved)
    m = ingest([DECALS, moved], tmp_path / "a", shard_size=10, size=32, match_radius=1.0)
    assert m["summary"]["objects"] == 1 and m["summary"]["matched"] == 1 and m["summary"]["unmatched"] == 0
    (obj,) = stream(shard_urls(tmp_path / "a"), decode="raw", split=False)
    assert set(obj.records) == {"image.legacy", "spectrum.sdss", "scalar.redshift"}
    assert [src["kind"] for src in obj.meta["sources"]] == ["legacy", "sdss"]
    m = ingest([DECALS, moved], tmp_path / "b", shard_size=10, size=32, match_radius=0.3)
    assert m["summary"]["objects"] == 2 and m["summary"]["unmatched"] == 2


def test_bad_pixels_are_masked_and_counted(tmp_path):
    need(DECALS)
    from astropy.io import fits
    from omnisky.shards.ingest import ingest
    from omnisky.shards.ingest_images import read_legacy
    bad = tmp_path / "cutout_bad.fits"
    with fits.open(DECALS) as h:
        h[1].data[100, 120] = np.nan                          # g image: a NaN pixel
        h[4].data[130, 140] = 0.0                             # r invvar: no data
        h.writeto(bad)
    s = read_legacy(bad, size=64)
    im = s.records["image.legacy"]
    assert s.meta["n_invalid"] == 2 and im.mask.sum() == 2
    assert im.mask[0, 100 - 96, 120 - 96] and im.mask[1, 130 - 96, 140 - 96]
    assert np.all(np.isfinite(im.flux)) and im.ivar[0, 4, 24] == 0 and im.flux[0, 4, 24] == 0
    m = ingest([bad], tmp_path / "out", size=64)
    assert m["summary"]["invalid_pixels"] == 2 and m["summary"]["masked_pixels"]["image.legacy"] == 2


def test_unknown_file_kind_is_a_clear_error(tmp_path):
    from astropy.io import fits
    from omnisky.shards.cli import main
    from omnisky.shards.ingest import IngestError, ingest
    odd = tmp_path / "mystery.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(odd)
    with pytest.raises(IngestError, match="mystery.fits.*unknown file kind"):
        ingest([odd], tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("not a FITS file")
    with pytest.raises(IngestError, match="notes.txt"):
        ingest([text], tmp_path / "out")
    assert main(["ingest", str(odd), "--out", str(tmp_path / "out")]) == 2


def test_ingested_records_encode_with_the_tokenizers():
    need(DECALS, HSC, SDSS, DESI)
    import torch
    from omnisky.shards.ingest_images import read_hsc, read_legacy
    from omnisky.shards.ingest_spectra import read_desi, read_sdss
    from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
    from omnisky.tokenizers.spectrum import SpectrumConfig, SpectrumTokenizer
    torch.manual_seed(0)
    images = [read_legacy(DECALS, size=32).records["image.legacy"], read_hsc(HSC, size=32).records["image.hsc"]]
    tok = ImageTokenizer(ImageConfig(size=32)).eval()
    with torch.no_grad():
        ids = tok.encode(images)
    assert ids.shape == (2, tok.n_tokens) and int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    spectra = [read_sdss(SDSS).records["spectrum.sdss"], read_desi(DESI)[0][0].records["spectrum.desi"]]
    stok = SpectrumTokenizer(SpectrumConfig()).eval()
    with torch.no_grad():
        sids = stok.encode(spectra)
    assert sids.shape == (2, stok.n_tokens) and int(sids.min()) >= 0 and int(sids.max()) < stok.vocab_size


# ----------------------------------------------------------------- catalogs of scalars

SDSS_PHOTOZ = DATA / "sdss_photoz" / "sdss_galaxies_dev.fits"
CATALOG_MAP = Path(__file__).resolve().parents[1] / "launch" / "ingest" / "sdss_photoz.yaml"


def test_real_sdss_catalog_round_trips(tmp_path):
    need(SDSS_PHOTOZ)
    from astropy.io import fits
    from omnisky.shards.cli import main
    from omnisky.shards.reader import stream
    from omnisky.shards.writer import read_manifest, shard_urls, verify
    out = tmp_path / "cat"
    assert main(["ingest", str(SDSS_PHOTOZ), "--catalog-map", str(CATALOG_MAP), "--out", str(out),
                 "--shard-size", "3000"]) == 0
    m = read_manifest(out)
    assert verify(out) == [] and m["total"] == 7000 and len(m["shards"]) == 3
    assert m["modality_counts"]["scalar.sdss_flux_r"] == 7000 and m["modality_counts"]["scalar.redshift"] == 7000
    with fits.open(SDSS_PHOTOZ) as h:
        t = h[1].data
        nuv_missing = int(((t["NUV_FLUX_AUTO"] == -99) | (t["NUV_FLUX_AUTO"] == 0)).sum())
        flux, ivar, z, ra = (np.asarray(t[c], np.float64) for c in ("MODELFLUX", "MODELFLUX_IVAR", "Z", "RA"))
    assert m["summary"]["masked_scalars"] == {"galex_flux_nuv": nuv_missing}
    assert m["modality_counts"]["scalar.galex_flux_nuv"] == 7000 - nuv_missing
    for s in stream(shard_urls(out), split=False):
        i = s.meta["row"]                                    # the catalog row it came from
        assert s.meta["ra"] == ra[i]
        got = s.records["scalar.sdss_flux_g"]
        assert got.value == pytest.approx(flux[i, 1]) and got.uncertainty == pytest.approx(ivar[i, 1] ** -0.5)
        assert s.records["scalar.redshift"].value == pytest.approx(z[i])


def _write_table(path, **columns):
    from astropy.io import fits
    from astropy.table import Table
    Table(columns).write(path, format="fits")
    with fits.open(path, mode="update") as h:       # units as a survey would write them
        for i, name in enumerate(h[1].columns.names, start=1):
            if name.startswith("FLUX_UJY"):
                h[1].header[f"TUNIT{i}"] = "uJy"
    return path


def test_catalog_units_and_invalid_values(tmp_path):
    from omnisky.shards.ingest_catalog import CatalogConfig, read_catalog
    path = _write_table(tmp_path / "cat.fits", RA=np.array([10.0, 10.1, 10.2, np.nan, 10.4]),
                        DEC=np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
                        FLUX_UJY=np.array([3.631, np.nan, 1.0, 1.0, -99.0]),
                        FLUX_UJY_ERR=np.array([0.3631, 0.1, -1.0, 0.1, 0.1]),
                        MAG=np.array([22.5, 20.0, 99.0, 20.0, np.inf]), MAG_ERR=np.array([0.1, 0.2, 0.1, 0.1, 0.1]),
                        IVAR=np.array([4.0, 0.0, 1.0, 1.0, -1.0]), ZSPEC=np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    cfg = CatalogConfig(prefix="t", columns=[
        dict(name="flux_a", column="FLUX_UJY", error="FLUX_UJY_ERR", to_unit="nanomaggy", invalid=[-99.0]),
        dict(name="flux_b", column="MAG", error="MAG_ERR", unit="mag", to_unit="nanomaggy", invalid=[99.0]),
        dict(name="z", column="ZSPEC", ivar="IVAR")])
    samples, counts = read_catalog(path, cfg)
    assert counts["dropped_rows"] == {"no position": 1, "no valid scalar": 1}
    assert counts["masked"] == {"flux_a": 3, "flux_b": 2, "z": 2}
    a, b, c = samples
    assert set(c.records) == {"scalar.z"}
    assert a.records["scalar.flux_a"].value == pytest.approx(1.0)          # 3.631 uJy = 1 nanomaggy
    assert a.records["scalar.flux_a"].uncertainty == pytest.approx(0.1)
    assert a.records["scalar.flux_b"].value == pytest.approx(1.0)          # AB 22.5 = 1 nanomaggy
    assert a.records["scalar.flux_b"].uncertainty == pytest.approx(0.4 * np.log(10) * 0.1)
    assert a.records["scalar.z"].uncertainty == pytest.approx(0.5)
    assert set(b.records) == {"scalar.flux_b"} and b.records["scalar.flux_b"].value == pytest.approx(10.0)
    from omnisky.config import ConfigError
    with pytest.raises(ConfigError, match="colum"):
        CatalogConfig(columns=[dict(name="x", colum="Z")])
    with pytest.raises(ValueError, match="no column 'NOPE'"):
        read_catalog(path, CatalogConfig(columns=[dict(name="x", column="NOPE")]))
    with pytest.raises(ValueError, match="cannot convert unit"):
        read_catalog(path, CatalogConfig(columns=[dict(name="x", column="FLUX_UJY", to_unit="Angstrom")]))


def test_catalog_crossmatches_with_a_spectrum(tmp_path):
    need(SDSS)
    from astropy.io import fits
    from omnisky.shards.ingest import IngestError, ingest
    from omnisky.shards.ingest_catalog import CatalogConfig
    with fits.open(SDSS) as h:
        ra, dec = float(h["SPECOBJ"].data["PLUG_RA"][0]), float(h["SPECOBJ"].data["PLUG_DEC"][0])
    cat = _write_table(tmp_path / "mine.fits", RA=np.array([ra + 0.3 / 3600, ra + 1.0]), DEC=np.array([dec, dec]),
                       Z=np.array([0.5, 0.2]), R=np.array([100.0, 50.0]))
    cfg = CatalogConfig(columns=[dict(name="redshift", column="Z"), dict(name="flux_r", column="R")])
    m = ingest([SDSS, cat], tmp_path / "out", catalog=cfg)
    s = m["summary"]
    assert s["objects"] == 2 and s["matched"] == 1 and s["scalar_conflicts"] == {"scalar.redshift": 1}
    assert m["modality_counts"]["scalar.flux_r"] == 2 and m["modality_counts"]["spectrum.sdss"] == 1
    with pytest.raises(IngestError, match="mine.fits.*column mapping"):
        ingest([cat], tmp_path / "out2")


# ----------------------------------------------------------------- Multimodal Universe HDF5

def _write_mmu(path, images=None, spectra=None, n=3, ra0=150.0, dec0=2.0, **extra):
    """A file in the Multimodal Universe layout: one dataset per column over n objects."""
    import h5py
    with h5py.File(path, "w") as f:
        f["object_id"] = np.arange(1000, 1000 + n)
        f["ra"] = ra0 + np.arange(n) * 0.01
        f["dec"] = np.full(n, dec0)
        for group in (images, spectra):
            for name, value in (group or {}).items():
                f[name] = value
        for name, value in extra.items():
            f[name] = value
    return path


def _mmu_images(n=3, size=20, bands=(b"hsc-g", b"hsc-r", b"hsc-i")):
    rng = np.random.default_rng(0)
    c = len(bands)
    return dict(image_band=np.array([list(bands)] * n, dtype="S8"),
                image_array=rng.normal(0, 0.1, (n, c, size, size)).astype(np.float32),
                image_ivar=np.full((n, c, size, size), 100.0, np.float32),
                image_mask=np.zeros((n, c, size, size), bool),
                image_psf_fwhm=np.full((n, c), 0.7, np.float32), image_scale=np.full((n, c), 0.168, np.float32))


def _mmu_spectra(n=3, length=50, pad=5):
    lam = np.tile(np.linspace(4000.0, 5000.0, length), (n, 1))
    lam[:, length - pad:] = -1.0                             # MMU pads short spectra with lambda -1
    mask = np.zeros((n, length), bool)
    mask[:, length - pad:] = True
    return dict(spectrum_lambda=lam.astype(np.float32), spectrum_flux=np.ones((n, length), np.float32),
                spectrum_ivar=np.full((n, length), 4.0, np.float32), spectrum_mask=mask,
                spectrum_lsf_sigma=np.full((n, length), 1.5, np.float32))


def test_mmu_file_round_trips_through_shards(tmp_path):
    from omnisky.shards.ingest import detect_kind, ingest
    from omnisky.shards.ingest_catalog import CatalogConfig
    from omnisky.shards.reader import stream
    from omnisky.shards.writer import shard_urls
    imgs = _mmu_images()
    imgs["image_array"][1, 0, 3, 4] = np.nan                 # masked and counted
    imgs["image_ivar"][2, 1, 5, 5] = -1.0
    img_file = _write_mmu(tmp_path / "hsc_mmu.hdf5", images=imgs, z_spec=np.array([0.1, 0.2, np.nan]))
    spec_file = _write_mmu(tmp_path / "spectra.hdf5", spectra=_mmu_spectra(), n=3, ra0=150.0 + 0.2 / 3600)
    assert detect_kind(img_file) == "mmu"
    cfg = CatalogConfig(ra="ra", dec="dec", columns=[dict(name="redshift", column="z_spec")])
    m = ingest([img_file, spec_file], tmp_path / "out", size=16, catalog=cfg, instrument="desi")
    s = m["summary"]
    assert s["objects"] == 3 and s["matched"] == 3 and s["invalid_pixels"] == 2
    assert s["masked_scalars"] == {"redshift": 1}
    assert m["modality_counts"] == {"image.hsc": 3, "scalar.redshift": 2, "spectrum.desi": 3}
    got = {o.object_id: o for o in stream(shard_urls(tmp_path / "out"), split=False)}
    o = got["mmu-img-1001"]
    im = o.records["image.hsc"]
    assert im.bands == ("hsc.g", "hsc.r", "hsc.i") and im.flux.shape == (3, 16, 16) and im.zero_point == 27.0
    assert im.pixel_scale == pytest.approx(0.168) and im.mask[0, 1, 2] and im.ivar[0, 1, 2] == 0
    np.testing.assert_array_equal(im.flux[1], imgs["image_array"][1, 1, 2:18, 2:18])
    sp = o.records["spectrum.desi"]
    assert sp.wavelength.shape == (45,) and not sp.mask.any()           # the padding is cut
    dlam = 1000.0 / 49
    assert sp.resolution[10] == pytest.approx(sp.wavelength[10] / (2.3548 * 1.5 * dlam), rel=1e-4)
    assert o.records["scalar.redshift"].value == pytest.approx(0.2)


def test_mmu_sdss_spectrum_matches_the_fits_reader(tmp_path):
    """A real SDSS spectrum written in the MMU layout (as MMU's SDSS build does: lsf_sigma = wdisp,
    mask = and_mask != 0 or ivar <= 1e-6) reads back as the spec-*.fits reader reads it."""
    need(SDSS)
    from astropy.io import fits
    from omnisky.shards.ingest_mmu import read_mmu
    from omnisky.shards.ingest_spectra import read_sdss
    with fits.open(SDSS) as h:
        c = h["COADD"].data
        lam, flux, ivar, wdisp = (10 ** np.asarray(c["loglam"], np.float64), c["flux"], c["ivar"], c["wdisp"])
        sp = h["SPECOBJ"].data[0]
        ra, dec, z = sp["PLUG_RA"], sp["PLUG_DEC"], sp["Z"]
    (tmp_path / "sdss").mkdir()
    path = _write_mmu(tmp_path / "sdss" / "x.hdf5",
                      spectra=dict(spectrum_lambda=lam[None].astype(np.float32), spectrum_flux=flux[None],
                                   spectrum_ivar=ivar[None], spectrum_mask=(ivar <= 1e-6)[None],
                                   spectrum_lsf_sigma=wdisp[None]), n=1, ra0=ra, dec0=dec, Z=np.array([z]))
    (mmu,), counts = read_mmu(path)
    assert (mmu.meta["ra"], mmu.meta["dec"]) == (pytest.approx(ra), pytest.approx(dec)) and counts["rows"] == 1
    ref = read_sdss(SDSS).records["spectrum.sdss"]
    got = mmu.records["spectrum.sdss"]                       # instrument from the folder name
    np.testing.assert_allclose(got.wavelength, ref.wavelength, rtol=1e-6)
    np.testing.assert_allclose(got.resolution, ref.resolution, rtol=2e-3)
    good = ~got.mask & ~ref.mask
    assert good.mean() > 0.9
    np.testing.assert_allclose(got.flux[good], ref.flux[good], rtol=1e-6)


@pytest.mark.parametrize("case, field", [
    ("unknown_band", "image_band"),
    ("wavelength_order", "spectrum_lambda"),
    ("missing_lsf", "spectrum_lsf_sigma"),
])
def test_mmu_bad_input_names_file_object_and_field(tmp_path, case, field):
    from omnisky.shards.ingest import IngestError, ingest
    imgs, specs = _mmu_images(), _mmu_spectra()
    if case == "unknown_band":
        imgs["image_band"][1, 2] = b"hsc-w"
    elif case == "wavelength_order":
        specs["spectrum_lambda"][2, 10], specs["spectrum_lambda"][2, 11] = 4300.0, 4200.0
    else:
        del specs["spectrum_lsf_sigma"]
    path = _write_mmu(tmp_path / "bad.hdf5", images=imgs, spectra=specs)
    with pytest.raises(IngestError) as err:
        ingest([path], tmp_path / "out", instrument="desi")
    assert "bad.hdf5" in str(err.value) and field in str(err.value)
    if case != "missing_lsf":
        assert ("1001" if case == "unknown_band" else "1002") in str(err.value)


def test_mmu_fully_masked_records_are_dropped_and_counted(tmp_path):
    from omnisky.shards.ingest import ingest
    imgs, specs = _mmu_images(), _mmu_spectra()
    specs["spectrum_mask"][0] = True                        # object 1000: spectrum dropped, image kept
    specs["spectrum_ivar"][1] = 0.0                         # object 1001: every pixel masked via ivar 0
    imgs["image_ivar"][1] = np.nan                          # ... and its image: the object is dropped
    path = _write_mmu(tmp_path / "m.hdf5", images=imgs, spectra=specs)
    m = ingest([path], tmp_path / "out", instrument="desi")
    s = m["summary"]
    assert s["objects"] == 2 and m["modality_counts"] == {"image.hsc": 2, "spectrum.desi": 1}
    assert s["dropped_records"] == {"image.hsc: every pixel masked": 1, "spectrum.desi: every pixel masked": 2}
    assert s["dropped_rows"] == {"m.hdf5: nothing valid": 1}
