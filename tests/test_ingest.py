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
