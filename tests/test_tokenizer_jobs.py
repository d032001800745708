"""The scalar tokenizer, the tokenizer training entry point and omnisky-tokenize, on tiny real shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnisky.shards.codec import encode_sample
from omnisky.shards.reader import stream
from omnisky.shards.schema import RecordError, Scalar
from omnisky.shards.writer import ShardWriter, read_manifest, shard_urls
from omnisky.tokenizers.base import load_tokenizer
from omnisky.tokenizers.scalar import ScalarConfig, ScalarTokenizer

ROOT = Path(__file__).resolve().parents[1]
SDSS = ROOT.parent / "shared" / "data" / "sdss_photoz" / "sdss_galaxies_dev.fits"


# -- the scalar tokenizer --------------------------------------------------------------------
def _scalars(n: int, seed: int = 0) -> list[Scalar]:
    rng = np.random.default_rng(seed)
    z = rng.gamma(2.0, 0.2, n)                                       # redshift-like, > 0
    flux = rng.lognormal(1.0, 1.5, n) + rng.normal(0.0, 0.5, n)     # fluxes scattered below 0
    return ([Scalar("redshift", float(v), 0.0, object_id=f"z{i}") for i, v in enumerate(z)] +
            [Scalar("flux_r", float(v), 0.5, object_id=f"f{i}") for i, v in enumerate(flux)])


def test_scalar_round_trip_and_quantile_uniformity(tmp_path):
    records = _scalars(4000)
    tok = ScalarTokenizer(ScalarConfig(names=("redshift", "flux_r"), n_bins=32, log_names=("flux_r",)))
    report = tok.fit(records)
    assert report["redshift"] == dict(n=4000, kept=4000, empty_bins=0)
    assert tok.vocab_size == 32 and tok.n_tokens == 1
    ids = tok.encode(records)
    assert ids.shape == (8000, 1) and ids.dtype == torch.long
    for part in (ids[:4000, 0], ids[4000:, 0]):  # exact quantiles: 4000 / 32 = 125 per bin
        counts = np.bincount(part.numpy(), minlength=32)
        assert counts.min() >= 124 and counts.max() <= 126, counts
    assert (tok.bin_edges("flux_r")[0] < 0) and np.all(np.diff(tok.bin_edges("flux_r")) > 0)

    decoded = tok.decode(ids, like=records)
    for name, rows in (("redshift", slice(0, 4000)), ("flux_r", slice(4000, 8000))):
        edges = tok.bin_edges(name)
        x = np.array([r.value for r in records[rows]])
        x_hat = np.array([r.value for r in decoded[rows]])
        b = ids[rows, 0].numpy()
        assert np.all((x_hat >= edges[b]) & (x_hat <= edges[b + 1]))  # centre inside its bin
        assert np.all((x >= edges[b]) & (x <= edges[b + 1]))
        spread = np.array([r.uncertainty for r in decoded[rows]])
        assert np.all(spread > 0) and np.all(spread <= edges[b + 1] - edges[b])
        assert np.allclose(tok.bin_centres(name)[b], x_hat)
    assert [d.object_id for d in decoded[:3]] == ["z0", "z1", "z2"]
    one = tok.decode(ids[:5], like="redshift")
    assert [r.name for r in one] == ["redshift"] * 5
    value, sigma = tok.value_and_sigma(ids[:5], "redshift")            # (5,), (5,) arrays
    assert np.array_equal(value, [r.value for r in one]) and np.array_equal(sigma, [r.uncertainty for r in one])
    with pytest.raises(ValueError, match="'redshift' token ids must lie in \\[0, 32\\)"):
        tok.value_and_sigma(torch.tensor([32]), "redshift")

    tok.save(tmp_path / "scalar")
    again = load_tokenizer(tmp_path / "scalar")
    assert isinstance(again, ScalarTokenizer)
    assert torch.equal(again.encode(records), ids)
    assert np.array_equal(again.bin_edges("flux_r"), tok.bin_edges("flux_r"))
    assert json.loads((tmp_path / "scalar" / "config.json").read_text())["vocab_size"] == 32


def test_scalar_colours_from_pairs_of_fluxes(tmp_path):
    """Colours are fitted from one mapping of records per object, derived as differences of
    asinh magnitudes with the fitted softenings, encoded like any scalar and saved."""
    rng = np.random.default_rng(1)
    n = 3000
    f_r = rng.lognormal(1.0, 1.0, n)
    f_g = f_r * 10 ** (-0.4 * rng.normal(0.8, 0.3, n)) + rng.normal(0, 0.1, n)       # g - r ~ 0.8 mag
    objects = [{"scalar.flux_g": Scalar("flux_g", float(g), 0.1, object_id=f"o{i}"),
                "scalar.flux_r": Scalar("flux_r", float(r), 0.2, object_id=f"o{i}")} for i, (g, r) in enumerate(zip(f_g, f_r))]
    objects.append({"scalar.flux_r": Scalar("flux_r", 1.0, 0.2, object_id="no_g")})   # no colour, still an r
    cfg = ScalarConfig(names=("flux_g", "flux_r"), n_bins=32, log_names=("flux_g", "flux_r"), colours=(("flux_g", "flux_r"),))
    tok = ScalarTokenizer(cfg)
    assert tok.names == ("flux_g", "flux_r", "colour_g_r")
    report = tok.fit(iter(objects))
    assert report["colour_g_r"]["n"] == n and report["flux_r"]["n"] == n + 1
    assert tok.softening[0] == pytest.approx(0.1) and tok.softening[1] == pytest.approx(0.2)
    derived = tok.derive(objects[0])
    assert list(derived) == ["scalar.colour_g_r"] and tok.derive(objects[-1]) == {}
    c = derived["scalar.colour_g_r"]
    m = lambda f, b: -2.5 / np.log(10) * (np.arcsinh(f / (2 * b)) + np.log(b))       # noqa: E731
    assert c.value == pytest.approx(m(f_g[0], 0.1) - m(f_r[0], 0.2)) and c.object_id == "o0"
    assert c.uncertainty == pytest.approx(2.5 / np.log(10) * np.hypot(0.1 / np.hypot(f_g[0], 0.2), 0.2 / np.hypot(f_r[0], 0.4)))
    colours = [tok.derive(o)["scalar.colour_g_r"] for o in objects[:-1]]
    bright = f_r > 5                                                                   # colour = g - r there
    assert np.median(np.array([x.value for x in colours])[bright]) == pytest.approx(0.8, abs=0.05)
    ids = tok.encode(colours)[:, 0].numpy()
    assert np.bincount(ids, minlength=32).min() >= 90                                 # ~94 per quantile bin
    assert tok.derive({**objects[0], "scalar.colour_g_r": c}) == {}                   # a given colour is kept
    assert tok.derive({**objects[0], "scalar.flux_g": Scalar("flux_g", float("nan"), 0.1)}) == {}   # bad flux: none
    tok.save(tmp_path / "s")
    again = load_tokenizer(tmp_path / "s")
    assert again.derive(objects[0]) == derived and torch.equal(again.encode(colours)[:, 0], torch.from_numpy(ids))
    with pytest.raises(ValueError, match="one mapping of records per object"):
        ScalarTokenizer(cfg).fit([r for o in objects for r in o.values()])
    with pytest.raises(ValueError, match="must be two different fluxes in log_names"):
        ScalarTokenizer(ScalarConfig(names=("redshift", "flux_r"), log_names=("flux_r",), colours=(("redshift", "flux_r"),)))


def test_scalar_refuses_bad_input():
    tok = ScalarTokenizer(ScalarConfig(names=("redshift", "r_half"), n_bins=16, log_names=()))
    few = [Scalar("redshift", float(v)) for v in np.linspace(0, 1, 200)] + \
          [Scalar("r_half", float(v % 10)) for v in range(200)]  # 10 distinct values < 16 bins
    with pytest.raises(ValueError, match=r"'r_half' has 200 value\(s\) with 10 distinct.*n_bins=16"):
        tok.fit(few)
    with pytest.raises(KeyError, match="'flux_q' is not served"):
        tok.fit([Scalar("flux_q", 1.0, object_id="g7")])
    tok = ScalarTokenizer(ScalarConfig(names=("redshift",), n_bins=16, log_names=()))
    tok.fit(few[:200])
    with pytest.raises(KeyError, match="object 'g9'.*'flux_q'"):
        tok.encode([Scalar("flux_q", 1.0, object_id="g9")])
    with pytest.raises(RecordError, match="object 'g8'.*scalar.redshift.value"):
        tok.encode([Scalar("redshift", float("nan"), object_id="g8")])
    with pytest.raises(RuntimeError, match="not been fitted"):
        ScalarTokenizer(ScalarConfig(names=("redshift",), n_bins=4, log_names=())).encode(Scalar("redshift", 0.1))


def test_scalar_reservoir_is_seeded_and_near_uniform():
    records = _scalars(20000, seed=1)[:20000]  # redshifts only
    cfg = ScalarConfig(names=("redshift",), n_bins=20, log_names=(), reservoir=2000, seed=3)
    a, b = ScalarTokenizer(cfg), ScalarTokenizer(cfg)
    assert a.fit(records)["redshift"]["kept"] == 2000
    b.fit(records)
    assert np.array_equal(a.bin_edges("redshift"), b.bin_edges("redshift"))
    # a name's reservoir depends on its own values only: other names in the stream change nothing
    c = ScalarTokenizer(ScalarConfig(names=("redshift", "flux_r"), n_bins=20, log_names=(), reservoir=2000, seed=3))
    c.fit([x for r in records for x in (r, Scalar("flux_r", r.value * 2, 0.1))])
    assert np.array_equal(a.bin_edges("redshift"), c.bin_edges("redshift"))
    counts = np.bincount(a.encode(records)[:, 0].numpy(), minlength=20)
    # 2000-value reservoir: each bin's share of all 20000 is 1/20 to within a few sigma (~0.5%)
    assert np.all(np.abs(counts / 20000 - 1 / 20) < 0.02), counts


@pytest.mark.skipif(not SDSS.exists(), reason="real SDSS sample ../shared/data absent")
def test_scalar_on_real_sdss_catalog():
    from astropy.io import fits
    d = fits.getdata(SDSS, 1)
    flux_u, ivar_u = d["MODELFLUX"][:, 0].astype(float), d["MODELFLUX_IVAR"][:, 0].astype(float)
    good = ivar_u > 0
    records = [Scalar("redshift", float(z), object_id=str(i)) for i, z in enumerate(d["Z"])] + \
              [Scalar("flux_u", float(f), float(1 / np.sqrt(v)), object_id=str(i))
               for i, (f, v) in enumerate(zip(flux_u[good], ivar_u[good]))]
    assert min(r.value for r in records if r.name == "flux_u") <= 0  # real u fluxes go negative
    tok = ScalarTokenizer(ScalarConfig(names=("redshift", "flux_u"), n_bins=64, log_names=("flux_u",)))
    tok.fit(records)
    ids = tok.encode(records)[:, 0].numpy()
    n_z = len(d)
    counts = np.bincount(ids[:n_z], minlength=64)
    assert counts.min() >= n_z // 64 - 2 and counts.max() <= n_z // 64 + 2
    z_hat = np.array([r.value for r in tok.decode(torch.from_numpy(ids[:n_z]), like="redshift")])
    assert np.median(np.abs(z_hat - d["Z"])) < 0.005  # 64 quantile bins over 0.01 < z < 0.58


# -- the training entry point and omnisky-tokenize, on simulated-sky shards -------------------
# A tiny image model, so a few steps take seconds on a shared 2-core machine.
TINY_IMAGE = ["steps=3", "lr=0.002", "batch_size=4", "warmup_steps=1", "eval_every=3", "ckpt_every=3",
              "num_workers=1", "eval_n=2", "model.channels=8", "model.hidden=16", "model.band_dim=8"]
TINY_SPECTRUM = ["steps=2", "batch_size=4", "warmup_steps=1", "eval_every=2", "ckpt_every=2",
                 "num_workers=0", "eval_n=2", "model.line_slots=8"]    # line tokens through training and tokenize
HAS_SPECTRUM = (ROOT / "tokenizers" / "spectrum.py").exists()


@pytest.fixture(scope="module")
def sky(tmp_path_factory, shared_data) -> Path:
    """48 simulated objects in 3 raw shards."""
    from omnisky.shards.cli import run_simulate
    from omnisky.shards.sky import SkyConfig
    out = tmp_path_factory.mktemp("raw")
    run_simulate(SkyConfig(n=48, seed=0), out, shard_size=16, workers=1, progress=False)
    return out


def _train(*args):
    from omnisky.train.tokenizer import main
    main([str(a) for a in args])


@pytest.fixture(scope="module")
def tokdir(sky, tmp_path_factory) -> Path:
    """Tokenizers trained by the entry point: image (3 steps), scalar, spectrum if present."""
    d = tmp_path_factory.mktemp("tokenizers")
    _train("--config", ROOT / "launch/tokenizers/image-tiny.yaml", "--data", sky, "--out", d / "image",
           "--set", *TINY_IMAGE)
    _train("--config", ROOT / "launch/tokenizers/scalar.yaml", "--data", sky, "--out", d / "scalar",
           "--set", "model.n_bins=8")
    if HAS_SPECTRUM:
        _train("--config", ROOT / "launch/tokenizers/spectrum-tiny.yaml", "--data", sky,
               "--out", d / "spectrum", "--set", *TINY_SPECTRUM)
    return d


def test_train_entry_point_writes_everything_and_resumes(tokdir, sky, capsys):
    from omnisky.train.loop import cosine_lr, read_csv_log
    out = tokdir / "image"
    rows = read_csv_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) and float(r["samples_per_s"]) > 0 for r in rows)
    assert rows[-1]["eval_loss"] != "" and rows[0]["eval_loss"] == ""
    assert (out / "checkpoints" / "step-3" / "trainer_state.json").exists()
    assert (out / "figures" / "recon-step-3.png").stat().st_size > 1000
    tok = load_tokenizer(out)
    raw = next(iter(stream(shard_urls(sky), decode="raw")))
    image = raw.records.get("image.des") or raw.records["image.hsc"]
    assert tok.encode([image]).shape == (1, tok.n_tokens)

    # --resume continues at step 4 from the checkpoint and lands at the new end
    w3 = {k: v.clone() for k, v in tok.state_dict().items()}
    capsys.readouterr()
    _train("--config", ROOT / "launch/tokenizers/image-tiny.yaml", "--data", sky, "--out", out,
           "--set", *TINY_IMAGE, "steps=5", "--resume")
    assert "resumed at step 3" in capsys.readouterr().out
    rows = read_csv_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    # the LR schedule picks up where it was: step 4 uses the schedule's value at index 3
    assert float(rows[3]["lr"]) == pytest.approx(cosine_lr(3, 0.002, 1, 5), rel=1e-4)
    assert (out / "checkpoints" / "step-5").exists()
    w5 = load_tokenizer(out).state_dict()
    assert any(not torch.equal(w3[k], w5[k]) for k in w3)


@pytest.mark.skipif(not HAS_SPECTRUM, reason="no spectrum tokenizer")
def test_train_spectrum_figures_and_resume_at_the_checkpoint(tokdir, sky, capsys):
    from omnisky.train.loop import read_csv_log
    out = tokdir / "spectrum"
    rows = read_csv_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and float(rows[-1]["eval_chi2"]) > 0
    assert (out / "figures" / "recon-step-2.png").stat().st_size > 1000
    tok = load_tokenizer(out)
    assert tok.wavelength_range == (3500.0, 10500.0) and tok.n_tokens == 1 + 64 + 3 * 8   # + 8 line slots
    w2 = {k: v.clone() for k, v in tok.state_dict().items()}
    capsys.readouterr()                          # resuming a finished run: same step, same weights
    _train("--config", ROOT / "launch/tokenizers/spectrum-tiny.yaml", "--data", sky, "--out", out,
           "--set", *TINY_SPECTRUM, "--resume")
    assert "resumed at step 2" in capsys.readouterr().out
    assert [int(r["step"]) for r in read_csv_log(out / "log.csv")] == [1, 2]
    again = load_tokenizer(out).state_dict()
    assert all(torch.equal(w2[k], again[k]) for k in w2)


def test_train_scalar_fits_bins_from_shards(tokdir, sky):
    tok = load_tokenizer(tokdir / "scalar")
    assert tok.vocab_size == 8 and set(tok.names) == {"redshift", "flux_g", "flux_r", "flux_i", "flux_z", "r_half",
                                                      "colour_g_r", "colour_r_i", "colour_i_z"}   # launch/ colours
    z = [s.records["scalar.redshift"] for s in stream(shard_urls(sky), decode="raw")
         if "scalar.redshift" in s.records]
    counts = np.bincount(tok.encode(z)[:, 0].numpy(), minlength=8)
    assert counts.max() - counts.min() <= 1, counts  # every shard object was seen: exact quantiles
    report = json.loads((tokdir / "scalar" / "fit_report.json").read_text())
    assert report["redshift"]["n"] == len(z)
    colours = [r for s in stream(shard_urls(sky), decode="raw") for r in tok.derive(s.records).values()]
    assert report["colour_r_i"]["n"] == len(colours) // 3 > 0


def test_tokenize_matches_encode_and_is_worker_independent(tokdir, sky, tmp_path):
    from omnisky.tokenizers.tokenize_shards import main as tokenize_main
    tokenize_main(["--raw", str(sky), "--tokenizers", str(tokdir), "--out", str(tmp_path / "t1"),
                   "--batch-size", "5"])
    tokenize_main(["--raw", str(sky), "--tokenizers", str(tokdir), "--out", str(tmp_path / "t2"),
                   "--batch-size", "5", "--workers", "2"])
    m1, m2 = read_manifest(tmp_path / "t1"), read_manifest(tmp_path / "t2")
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) == 3  # byte-identical (sha256)
    toks = {kind: load_tokenizer(tokdir / kind) for kind in ("image", "scalar", "spectrum")
            if (tokdir / kind / "config.json").exists()}
    raw = list(stream(shard_urls(sky), decode="raw"))
    for s in raw:                                      # + the colours the scalar tokenizer derives
        s.records.update(toks["scalar"].derive(s.records))
    keys = sorted({k for s in raw for k in s.records})
    assert {"scalar.colour_g_r", "scalar.colour_r_i", "scalar.colour_i_z"} <= set(keys)
    tokenized = [k for k in keys if HAS_SPECTRUM or not k.startswith("spectrum.")]
    assert sorted(m1["modalities"]) == tokenized
    assert m1["modalities"]["image.hsc"] == dict(kind="image", vocab_size=1000, n_tokens=64, tokenizer="image",
                                                token_space="image", cell_arcsec=pytest.approx(0.168 * 4),
                                                code_levels=[8, 5, 5, 5])
    assert m1["modalities"]["image.des"]["cell_arcsec"] == pytest.approx(0.262 * 4)      # 8x8 cells of 4 pixels
    assert m1["modalities"]["scalar.redshift"] == dict(kind="scalar", vocab_size=8, n_tokens=1, tokenizer="scalar",
                                                      token_space="scalar.redshift", code_levels=[8])
    assert m1["summary"]["failed"] == 0 and m1["total"] == len(raw)
    if not HAS_SPECTRUM:
        assert m1["summary"]["skipped_no_tokenizer"]["spectrum.sdss"] == sum("spectrum.sdss" in s.records for s in raw)
    out = list(stream(shard_urls(tmp_path / "t1"), decode="tokens"))
    assert [o[0] for o in out] == [s.object_id for s in raw]  # same objects, same order
    for key in tokenized:
        have = [i for i, s in enumerate(raw) if key in s.records]
        assert m1["counts"][key] == len(have)
        expect = toks[key.split(".")[0]].encode([raw[i].records[key] for i in have]).numpy()
        got = np.stack([out[i][1][key] for i in have])
        assert got.dtype == np.int32 and np.array_equal(got, expect), key
    assert out[0][2]["params"] == raw[0].params and out[0][2]["present"] == sorted(out[0][1])


@pytest.mark.parametrize("point", [False, True])
def test_tokenize_places_an_image_brightness_scale_off_the_sky_grid(sky, tmp_path, point):
    """An image tokenizer with a brightness-scale token (and, with `point`, 7 point-source
    tokens after it): omnisky-tokenize writes 65 (72) tokens, grid_start 1 (8) and the code
    segments; the FM built from that manifest puts those tokens off the sky and the 8x8
    grid after them, and predicts every position."""
    from omnisky.fm.model import FMConfig, FourM
    from omnisky.fm.modality import ModalityTable
    from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
    from omnisky.tokenizers.tokenize_shards import tokenize
    torch.manual_seed(0)
    extra = dict(ps_anchors=(4800.0, 6300.0, 7800.0, 9000.0, 9800.0)) if point else {}
    tok = ImageTokenizer(ImageConfig(channels=8, hidden=16, band_dim=8, scale_bins=100, **extra)).eval()
    tok.save(tmp_path / "tok" / "image")
    m = tokenize(sky, tmp_path / "tok", tmp_path / "out", batch_size=8)
    spec = m["modalities"]["image.hsc"]
    start = 8 if point else 1
    n = start + 64
    assert spec["n_tokens"] == n and spec["grid_start"] == start
    assert spec["code_segments"] == [[1, [100]]] + ([[7, [1000]]] if point else []) + [[64, [8, 5, 5, 5]]]
    table = ModalityTable.from_manifest(m)
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table).eval()
    h = table.index("image.hsc")
    _, on_sky = model._sky_xy(torch.full((n,), h), torch.arange(n))
    assert not on_sky[:start].any() and on_sky[start:].all()
    out = next(iter(stream(shard_urls(tmp_path / "out"), decode="tokens")))
    ids = {k: torch.as_tensor(v, dtype=torch.long)[None] for k, v in out[1].items()}
    assert int(ids["image.hsc"][0, 0]) < 100
    logits = model.logits(ids, {"image.hsc": torch.arange(n)[None]})["image.hsc"]
    assert logits.shape == (1, n, 1000) and torch.isfinite(logits).all()


def test_tokenize_augment_writes_turned_copies(tokdir, sky, tmp_path):
    from omnisky.shards.augment import dihedral
    from omnisky.tokenizers.tokenize_shards import tokenize
    m = tokenize(sky, tokdir, tmp_path / "aug", batch_size=8, augment=2)
    raw = list(stream(shard_urls(sky), decode="raw"))
    out = list(stream(shard_urls(tmp_path / "aug"), decode="tokens"))
    assert m["total"] == 2 * len(raw) and m["augment"] == ["identity", "rot90"]
    assert m["summary"]["objects_in"] == len(raw)
    first = raw[:16]                                                  # the first raw shard
    assert [o[0] for o in out[:32]] == [s.object_id for s in first] + [f"{s.object_id}~rot90" for s in first]
    image = load_tokenizer(tokdir / "image")
    s = next(x for x in first if "image.hsc" in x.records)
    i = [s_.object_id for s_ in first].index(s.object_id)
    plain, turned = out[i][1], out[16 + i][1]
    assert np.array_equal(turned["image.hsc"], image.encode([dihedral(s, "rot90").records["image.hsc"]])[0].numpy())
    assert not np.array_equal(turned["image.hsc"], plain["image.hsc"])
    assert np.array_equal(turned["scalar.redshift"], plain["scalar.redshift"])
    with pytest.raises(ValueError, match="--augment must be 1..8"):
        tokenize(sky, tokdir, tmp_path / "bad", augment=9)


def test_tokenize_skips_and_counts_a_bad_object(tokdir, sky, tmp_path):
    from omnisky.tokenizers.tokenize_shards import tokenize
    raw = list(stream(shard_urls(sky), decode="raw"))[:6]
    bad = next(s for s in raw if "image.des" in s.records)
    img = bad.records["image.des"]  # a valid record the 32x32 image tokenizer cannot take
    img.flux, img.ivar, img.mask = img.flux[:, :16, :16], img.ivar[:, :16, :16], img.mask[:, :16, :16]
    with ShardWriter(tmp_path / "raw", prefix="sky") as w:
        for s in raw:
            w.write(s.object_id, encode_sample(s))
    with pytest.warns(UserWarning, match=f"skipping object '{bad.object_id}'"):
        m = tokenize(tmp_path / "raw", tokdir, tmp_path / "tok")
    assert m["summary"]["failed"] == 1 and bad.object_id in m["summary"]["failed_objects"]
    assert "16x16" in m["summary"]["failed_objects"][bad.object_id]
    assert m["total"] == 5 and bad.object_id not in [o[0] for o in stream(shard_urls(tmp_path / "tok"), decode="tokens")]


@pytest.mark.slow
def test_train_entry_point_under_two_processes(sky, tmp_path):
    out = tmp_path / "image2"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "omnisky.train.tokenizer", "--config", str(ROOT / "launch/tokenizers/image-tiny.yaml"),
           "--data", str(sky), "--out", str(out), "--set", *TINY_IMAGE, "steps=2", "ckpt_every=2",
           "num_workers=0"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd[0] = str(accelerate) if accelerate.exists() else cmd[0]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    from omnisky.train.loop import read_csv_log
    assert [int(row["step"]) for row in read_csv_log(out / "log.csv")] == [1, 2]
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert load_tokenizer(out).n_tokens == 64
