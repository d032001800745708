"""The simulated sky, the shard codec/writer/reader, and the omnisky-shards CLI."""
import dataclasses
import json
import shutil
import threading
import warnings

import numpy as np
import pytest

from omnisky.shards import bands
from omnisky.shards.cli import main
from omnisky.shards.codec import decode_sample, encode_sample
from omnisky.shards.reader import stream
from omnisky.shards.schema import RecordError
from omnisky.shards.writer import read_manifest, shard_urls


@pytest.fixture(scope="module")
def samples(sky_config):
    """80 objects of a fixed sky (seed 11)."""
    from omnisky.shards.sky import simulate
    return list(simulate(dataclasses.replace(sky_config, n=80, seed=11)))


def _tree_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ----------------------------------------------------------------- codec, writer, reader

def test_codec_round_trip(samples):
    for s in samples[:6]:
        back = decode_sample(encode_sample(s)).validate()
        assert back.object_id == s.object_id and set(back.records) == set(s.records)
        assert json.loads(json.dumps(back.params)) == back.params == s.params
        assert back.meta == s.meta
        for key, rec in s.records.items():
            got = back.records[key]
            if key.startswith("scalar."):
                assert (got.name, got.value, got.uncertainty) == (rec.name, rec.value, rec.uncertainty)
                assert np.float32(back.truth[key]) == np.float32(s.truth[key])
                continue
            for field in ("flux", "ivar", "mask", "resolution", "wavelength", "psf_fwhm"):
                if hasattr(rec, field):
                    np.testing.assert_array_equal(getattr(got, field), getattr(rec, field))
            np.testing.assert_array_equal(back.truth[key], s.truth[key])
            assert back.truth[key].shape == rec.flux.shape


def test_slices_are_independent_and_seeded(sky_config):
    from omnisky.shards.sky import simulate
    whole = [encode_sample(s) for s in simulate(sky_config, 0, 6)]
    part = [encode_sample(s) for s in simulate(sky_config, 4, 6)]
    assert part == whole[4:6]
    other = next(simulate(dataclasses.replace(sky_config, seed=sky_config.seed + 1), 4, 5))
    assert encode_sample(other)["meta.json"] != whole[4]["meta.json"]


def test_simulate_is_byte_identical_across_runs_and_workers(tmp_path, capsys, shared_data):
    args = ["simulate", "--n", "18", "--seed", "3", "--shard-size", "6", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "--workers", "2"]) == 0
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert sorted(a) == ["manifest.json", "sky-000000.tar", "sky-000001.tar", "sky-000002.tar"]
    assert a == b == c
    m = read_manifest(tmp_path / "a")
    assert m["total"] == 18 and m["sky"]["seed"] == 3 and m["sky"]["n"] == 18
    assert sum(m["modality_counts"].values()) > 18 and "image.des" in m["modality_counts"]
    assert "objects/s" in capsys.readouterr().out


def test_config_overrides_and_unknown_keys(tmp_path, shared_data):
    cfg = tmp_path / "sky.yaml"
    cfg.write_text("image_size: 20\np_image_hsc: 0.0\n")
    out = tmp_path / "o"
    assert main(["simulate", "--n", "4", "--out", str(out), "--config", str(cfg), "--quiet",
                 "--set", "p_spectrum_desi=0.0"]) == 0
    got = list(stream(shard_urls(out), split=False))
    assert len(got) == 4
    for s in got:
        assert "image.hsc" not in s.records and "spectrum.desi" not in s.records
        assert s.records["image.des"].flux.shape == (4, 20, 20)
    assert main(["simulate", "--n", "4", "--out", str(out), "--quiet", "--set", "image_sise=20"]) == 2


def test_verify_names_a_corrupted_shard(sky_shards, tmp_path, capsys):
    assert main(["verify", str(sky_shards)]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(sky_shards, bad)
    shard = bad / "sky-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "sky-000001.tar" in out and "sky-000000.tar" not in out


def test_stream_yields_all_and_skips_a_truncated_shard(sky_shards, sky_config, tmp_path):
    ids = [s.object_id for s in stream(shard_urls(sky_shards), split=False)]
    assert ids == [f"sky{sky_config.seed}-{i:07d}" for i in range(sky_config.n)]
    cut = tmp_path / "cut"
    shutil.copytree(sky_shards, cut)
    shard = cut / "sky-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    result = {}

    def consume():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["ids"] = [s.object_id for s in stream(shard_urls(cut), split=False)]
            result["warnings"] = [str(w.message) for w in caught]

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "stream hung on a truncated shard"
    got = result["ids"]
    assert got[:8] == ids[:8] and got[-8:] == ids[-8:] and len(got) < len(ids)
    assert any("skipping" in w for w in result["warnings"])


def test_inspect_prints_counts_and_draws_png(sky_shards, tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main(["inspect", str(sky_shards), "--png", str(png), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "image.des" in out and "3 shard(s)" in out and "24 object(s) read" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- bad input

def _with(samples, key):
    s = next(s for s in samples if key in s.records)
    return decode_sample(encode_sample(s))            # a private copy to break


@pytest.mark.parametrize("case, key, field", [
    ("nan_pixel", "image.des", "image.flux"),
    ("inf_pixel", "spectrum.sdss", "spectrum.flux"),
    ("zero_ivar", "image.hsc", "image.ivar"),
    ("negative_ivar", "spectrum.desi", "spectrum.ivar"),
    ("masked_negative_ivar", "image.des", "image.ivar"),
    ("unknown_band", "image.des", "image.bands"),
    ("wavelength_order", "spectrum.sdss", "spectrum.wavelength"),
    ("all_masked", "spectrum.desi", "spectrum.mask"),
])
def test_bad_input_names_object_and_field(samples, case, key, field):
    s = _with(samples, key)
    rec = s.records[key]
    good = np.argwhere(~rec.mask)[0]
    bad = np.argwhere(rec.mask)[0] if rec.mask.any() else good
    if case == "nan_pixel":
        rec.flux[tuple(good)] = np.nan
    elif case == "inf_pixel":
        rec.flux[tuple(good)] = np.inf
    elif case == "zero_ivar":
        rec.ivar[tuple(good)] = 0.0
    elif case == "negative_ivar":
        rec.ivar[tuple(good)] = -1.0
    elif case == "masked_negative_ivar":               # even on a masked pixel: ivar is never < 0
        rec.mask[tuple(bad)] = True
        rec.ivar[tuple(bad)] = -1.0
    elif case == "unknown_band":
        rec.bands = ("des.g", "des.r", "des.i", "des.w")
    elif case == "wavelength_order":
        rec.wavelength[10], rec.wavelength[11] = rec.wavelength[11], rec.wavelength[10]
    elif case == "all_masked":
        rec.mask[:] = True
        rec.ivar[:] = 0.0
    with pytest.raises(RecordError) as err:
        s.validate()
    assert s.object_id in str(err.value) and field in str(err.value)


def test_mask_invalid_masks_and_counts_what_readers_find():
    """Readers of real files mask (not reject) NaN/inf pixels and ivar <= 0, and count them."""
    from omnisky.shards.schema import mask_invalid
    flux = np.array([1.0, np.nan, np.inf, 2.0, 3.0, 4.0])
    ivar = np.array([1.0, 1.0, 1.0, 0.0, -2.0, np.nan])
    mask = np.array([False, False, False, False, False, True])
    f, iv, m, n = mask_invalid(flux, ivar, mask)
    assert n == 4 and m.tolist() == [False, True, True, True, True, True]
    assert np.all(np.isfinite(f)) and np.all(iv[m] == 0) and f[0] == 1.0


# ----------------------------------------------------------------- physics

def test_band_fluxes_match_speclite(shared_data):
    import astropy.units as u
    from omnisky.shards.sed import LINE_NAMES, GalaxySED
    lines = np.zeros(len(LINE_NAMES))
    lines[LINE_NAMES.index("Halpha")], lines[LINE_NAMES.index("OIII_5008")] = 40.0, 25.0
    sed = GalaxySED(0.4, np.array([0.2, 0.0, 0.7, 0.1]), lines, sigma_v=60.0)
    names = ("des.g", "des.r", "des.i", "des.z", "hsc.y")
    lam = np.arange(3000.0, 11500.0, 0.25)
    f = (sed.continuum(lam) + sed._lines(lam, np.full(lam.shape, 3000.0))) * 1e-17
    ref = [float(bands.get(n).response.get_ab_maggies(f * u.erg / u.s / u.cm ** 2 / u.AA, lam * u.AA))
           for n in names]
    np.testing.assert_allclose(sed.maggies(names), ref, rtol=3e-3)


def test_early_types_are_redder_than_late_types(samples):
    from omnisky.shards.sed import GalaxySED, template_mix
    for z in (0.05, 0.3, 0.6, 1.0):
        gr = {t: -2.5 * np.log10(np.divide(*GalaxySED(z, template_mix(t)).maggies(("des.g", "des.r"))))
              for t in (0.0, 1.0, 2.0, 3.0)}
        assert gr[0.0] > gr[1.0] > gr[2.0] and gr[0.0] > gr[3.0] + 0.3, (z, gr)
    # in the simulated population, at matched redshift, from the true catalog fluxes
    diffs = []
    for r in (s for s in samples if s.params.get("is_red") == 1):
        gr_red = -2.5 * np.log10(r.truth.get("scalar.flux_g", np.nan) / r.truth.get("scalar.flux_r", np.nan))
        blue = [b for b in samples if b.params.get("is_red") == 0 and abs(b.params["z"] - r.params["z"]) < 0.1
                and "scalar.flux_g" in b.truth]
        if blue and np.isfinite(gr_red):
            gr_blue = [-2.5 * np.log10(b.truth["scalar.flux_g"] / b.truth["scalar.flux_r"]) for b in blue]
            diffs.append(gr_red - np.median(gr_blue))
    assert len(diffs) >= 5 and np.median(diffs) > 0.2


def test_hsc_is_deeper_than_des(samples):
    """Per-pixel sky noise as surface brightness (nanomaggies per arcsec), r band."""
    def sb_noise(key, band):
        vals = []
        for s in samples:
            rec = s.records.get(key)
            if rec is not None:
                c = rec.bands.index(band)
                ivar = rec.ivar[c][~rec.mask[c]]
                sigma = 1 / np.sqrt(np.median(ivar))
                vals.append(sigma * 10 ** (-0.4 * (rec.zero_point - 22.5)) / rec.pixel_scale)
        return np.median(vals)
    assert sb_noise("image.hsc", "hsc.r") < 0.7 * sb_noise("image.des", "des.r")


def test_noise_is_what_ivar_says(samples):
    for key in ("image.des", "image.hsc", "spectrum.sdss", "spectrum.desi"):
        chi = np.concatenate([((s.records[key].flux - s.truth[key]) * np.sqrt(s.records[key].ivar))
                              [~s.records[key].mask].ravel() for s in samples if key in s.records])
        assert 0.95 < chi.std() < 1.05 and abs(chi.mean()) < 0.02, key


def test_desi_resolves_lines_better_than_sdss(shared_data):
    from omnisky.shards.sed import C_KMS, FWHM_PER_SIGMA, LINE_NAMES, LINE_WAVE, GalaxySED
    from omnisky.shards.spectrograph import desi, sdss
    w = np.linspace(3800, 9200, 200)
    assert np.all(np.interp(w, desi().wavelength, desi().resolution) >
                  np.interp(w, sdss().wavelength, sdss().resolution))
    lines = np.zeros(len(LINE_NAMES))
    j = LINE_NAMES.index("Halpha")
    lines[j] = 100.0
    z, sigma_v = 0.2, 20.0
    sed = GalaxySED(z, np.zeros(4), lines, sigma_v)
    width = {}
    for spec in (sdss(), desi()):
        f = sed.spectrum(spec.wavelength, spec.resolution)
        dlam = np.gradient(spec.wavelength)
        centre = LINE_WAVE[j] * (1 + z)
        near = np.abs(spec.wavelength - centre) < 30
        assert np.sum((f * dlam)[near]) == pytest.approx(100.0, rel=1e-3)      # line flux kept
        mean = np.sum((f * dlam * spec.wavelength)[near]) / 100.0
        width[spec.name] = np.sqrt(np.sum((f * dlam * (spec.wavelength - mean) ** 2)[near]) / 100.0)
        R = np.interp(centre, spec.wavelength, spec.resolution)
        expect = np.hypot(centre * sigma_v / C_KMS, centre / (FWHM_PER_SIGMA * R))
        pix = np.interp(centre, spec.wavelength, dlam)
        assert width[spec.name] == pytest.approx(np.sqrt(expect ** 2 + pix ** 2 / 12), rel=0.05)
    assert width["desi"] < 0.7 * width["sdss"]


def test_spectra_agree_with_photometry(samples):
    """The fibre spectrum divided by the fibre fraction, through DES r, gives mag_r."""
    import astropy.units as u
    r = bands.get("des.r").response
    n = 0
    for s in samples:
        for name in ("sdss", "desi"):
            key = f"spectrum.{name}"
            if key in s.records:
                rec = s.records[key]
                f = s.truth[key].astype(np.float64) * 1e-17 / s.params[f"fibre_frac_{name}"]
                maggies = float(r.get_ab_maggies(f * u.erg / u.s / u.cm ** 2 / u.AA, rec.wavelength * u.AA))
                assert -2.5 * np.log10(maggies) == pytest.approx(s.params["mag_r"], abs=0.02)
                n += 1
    assert n > 20


def test_rendering_conserves_flux_and_psf():
    from omnisky.shards.render import IMAGING, Profile, render
    hsc = IMAGING["hsc"]
    disk = render(Profile(0.0, 0.5, 0.6, 0.4), np.zeros(1), np.ones(1), np.array([0.7]), hsc, 96)
    assert disk.sum() == pytest.approx(1.0, abs=0.005)
    star = render(Profile(0.0, 0.01, 1.0, 0.0), np.zeros(1), np.ones(1), np.array([1.0]), IMAGING["des"], 65)[0]
    row = star[32]
    above = np.flatnonzero(row > row.max() / 2)
    # linear interpolation of the half-maximum crossings
    lo = above[0] - (row[above[0]] - row.max() / 2) / (row[above[0]] - row[above[0] - 1])
    hi = above[-1] + (row[above[-1]] - row.max() / 2) / (row[above[-1]] - row[above[-1] + 1])
    assert (hi - lo) * 0.262 == pytest.approx(1.0, rel=0.1)


def test_coverage_gives_enough_pairs(samples):
    keys = [set(s.records) for s in samples]
    assert all({"image.des", "image.hsc"} & k for k in keys)
    assert np.mean([{"image.des", "image.hsc"} <= k for k in keys]) >= 0.4
    assert np.mean([{"spectrum.sdss", "spectrum.desi"} <= k for k in keys]) >= 0.3
    assert np.mean(["scalar.redshift" in k for k in keys]) >= 0.75
    z = np.array([s.params["z"] for s in samples if s.meta["class"] == "galaxy"])
    assert 0.02 <= z.min() and z.max() <= 1.2 and 0.2 < np.median(z) < 0.8


def test_template_reader_handles_units(tmp_path):
    from omnisky.shards.sed import read_sed_file
    rows = "\n".join(f"{w} {1 + w / 1000}" for w in range(300, 1300, 10))
    (tmp_path / "nm.sed").write_text("# wavelength (nm)  flux\n" + rows)
    (tmp_path / "a.sed").write_text("#  Angstroms     Flux/A\n" + rows)
    wave_nm, _ = read_sed_file(tmp_path / "nm.sed")
    wave_a, flux = read_sed_file(tmp_path / "a.sed")
    assert wave_nm[0] == 3000 and wave_a[0] == 300 and np.all(np.diff(wave_a) > 0)
