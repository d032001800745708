"""Generation: schedules, the MaskGIT/ROAR sampler on a real trained FM, the baselines,
and the whole `omnisky-generate` CLI on tiny real tokenizers, FM and shards."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from astropy.io import fits

from omnisky.fm.modality import ModalityTable
from omnisky.generate.baselines import interpolate_spectrum, resample_image, stamp_centre
from omnisky.generate.sampler import filter_logits, generate, guided_logits, token_probabilities
from omnisky.generate.schedule import TargetSchedule, schedule_from_json, schedule_to_json
from omnisky.generate.templates import template_for
from omnisky.shards.writer import read_manifest, shard_urls

from test_fm import TINY, structured_tokens, train_structured


# -- schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("token_schedule", ["cosine", "linear"])
def test_token_schedule_reveals_everything_monotonically(token_schedule):
    s = TargetSchedule("image.hsc", steps=6, token_schedule=token_schedule)
    left = [s.n_masked_after(t, 64) for t in range(1, 7)]
    assert left[-1] == 0 and all(a >= b for a, b in zip(left, left[1:])) and left[0] < 64


def test_temperature_schedules_and_json_round_trip():
    lin = TargetSchedule("x.y", steps=5, temperature=2.0, temperature_end=0.5, temperature_schedule="linear")
    ann = TargetSchedule("x.y", steps=5, temperature=2.0, temperature_end=0.5, temperature_schedule="annealed")
    assert lin.temperature_at(1) == pytest.approx(2.0) and lin.temperature_at(5) == pytest.approx(0.5)
    assert ann.temperature_at(1) == pytest.approx(2.0) and ann.temperature_at(5) == pytest.approx(0.5)
    assert ann.temperature_at(2) > lin.temperature_at(2)  # cosine stays hot longer
    assert schedule_from_json(json.loads(json.dumps(schedule_to_json([lin, ann])))) == [lin, ann]
    with pytest.raises(ValueError, match="scheme"):
        TargetSchedule("x.y", scheme="beam")


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.8


# -- the sampler on a trained model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The structured-token FM of test_fm, trained until it predicts image.b from image.a."""
    model, table, _ = train_structured(tmp_path_factory.mktemp("tok"))
    return model.eval(), table


def _tokens(key, zs):
    return torch.stack([torch.from_numpy(structured_tokens(z)[key]).long() for z in zs])


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_sampler_translates_and_is_seeded(trained, scheme):
    model, table = trained
    zs = list(range(16))
    inputs = {"image.a": _tokens("image.a", zs)}
    sched = [TargetSchedule("image.b", scheme=scheme, steps=4, temperature=0.5)]
    out = generate(model, inputs, sched, table.n_tokens, seed=3)
    b = out["image.b"]
    assert b.shape == (16, TINY["image.b"][1]) and (b >= 0).all() and (b < TINY["image.b"][0]).all()
    assert (b == _tokens("image.b", zs)).float().mean() > 0.9       # the model's knowledge, used
    again = generate(model, inputs, sched, table.n_tokens, seed=3)["image.b"]
    assert torch.equal(b, again)                                     # same seed, same tokens
    assert torch.equal(out["image.a"], inputs["image.a"])            # the given stays given


def test_sampler_chains_targets_keeps_known_tokens_and_runs_guidance(trained):
    model, table = trained
    zs = [5]                                                         # a batch of one
    partial = _tokens("image.b", zs).clone()
    partial[:, 4:] = -1                                              # first 4 tokens known
    sched = [TargetSchedule("image.b", steps=3, guidance=1.5, top_k=8),
             TargetSchedule("scalar.z", steps=1, temperature=0.1)]
    out = generate(model, {"image.b": partial}, sched, table.n_tokens, seed=0)
    assert torch.equal(out["image.b"][:, :4], partial[:, :4]) and (out["image.b"] >= 0).all()
    assert out["scalar.z"].shape == (1, 1)
    assert int(out["scalar.z"]) == int(structured_tokens(5)["scalar.z"][0])  # chained: z from image.b
    with pytest.raises(KeyError, match="not a modality"):
        generate(model, {"image.a": _tokens("image.a", zs)}, [TargetSchedule("image.q")], table.n_tokens)


def test_sampler_keeps_to_the_allowed_ids(trained):
    model, table = trained
    n, vocab = TINY["image.b"][1], TINY["image.b"][0]
    allowed = torch.ones(n, vocab, dtype=torch.bool)
    allowed[0, 2:] = False                                           # position 0: ids 0 and 1 only
    allowed[1, :] = False
    allowed[1, vocab - 1] = True                                     # position 1: the last id only
    sched = [TargetSchedule("image.b", steps=3, temperature=5.0)]
    out = generate(model, {"image.a": _tokens("image.a", range(8))}, sched, table.n_tokens, seed=0,
                   allowed={"image.b": allowed})["image.b"]
    assert (out[:, 0] < 2).all() and (out[:, 1] == vocab - 1).all()


def test_token_probabilities_are_a_posterior(trained):
    model, table = trained
    probs = token_probabilities(model, {"image.a": _tokens("image.a", [2, 9])}, "scalar.z", 1)
    assert probs.shape == (2, 1, TINY["scalar.z"][0])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1))
    truth = [int(structured_tokens(z)["scalar.z"][0]) for z in (2, 9)]
    assert probs[:, 0].argmax(-1).tolist() == truth


def test_guidance_is_conditional_minus_unconditional_scaled(trained):
    model, table = trained
    inputs = {"image.a": _tokens("image.a", [1, 4])}
    pos = torch.arange(3).expand(2, 3)
    cond = model.logits(inputs, {"image.b": pos})["image.b"]
    empty = {"image.b": torch.full((2, TINY["image.b"][1]), -1)}
    uncond = model.logits(empty, {"image.b": pos})["image.b"]
    got = guided_logits(model, {**inputs, **empty}, "image.b", pos, guidance=2.0)
    torch.testing.assert_close(got, cond + 2.0 * (cond - uncond))
    torch.testing.assert_close(guided_logits(model, {**inputs, **empty}, "image.b", pos, guidance=0.0), cond)


@pytest.mark.parametrize("settings", [dict(token_schedule="linear", temperature_schedule="linear"),
                                      dict(temperature_schedule="annealed", top_p=0.9),
                                      dict(scheme="roar", top_k=4, guidance=1.0)])
def test_every_schedule_setting_samples_seeded_batches_of_one_and_many(trained, settings):
    model, table = trained
    sched = [TargetSchedule("image.b", steps=4, temperature=1.5, **settings)]
    for zs in ([3], [0, 1, 2, 3, 4, 5]):
        inputs = {"image.a": _tokens("image.a", zs)}
        a = generate(model, inputs, sched, table.n_tokens, seed=11)["image.b"]
        assert a.shape == (len(zs), TINY["image.b"][1]) and (a >= 0).all()
        assert torch.equal(a, generate(model, inputs, sched, table.n_tokens, seed=11)["image.b"])
    hot = [TargetSchedule("image.b", steps=4, temperature=5.0, **settings)]
    draws = {tuple(generate(model, inputs, hot, table.n_tokens, seed=s)["image.b"].flatten().tolist()) for s in range(3)}
    assert len(draws) > 1                                                # other seeds, other samples


# -- baselines -------------------------------------------------------------------------------
def _gaussian_image(key, sigma_arcsec=0.8, mag=19.0):
    img = template_for(key, image_size=32)
    c, h, w = img.flux.shape
    y, x = (np.mgrid[:h, :w] - stamp_centre(h)) * img.pixel_scale     # the object on pixel n // 2, as the sky has it
    prof = np.exp(-0.5 * (x ** 2 + y ** 2) / sigma_arcsec ** 2)
    total = 10 ** (-0.4 * (mag - img.zero_point))
    img.flux = (np.repeat(prof[None], c, 0) / prof.sum() * total).astype(np.float32)
    return img


def test_resampling_baseline_conserves_flux_in_ab_units():
    des, hsc = _gaussian_image("image.des"), _gaussian_image("image.hsc")
    out = resample_image(des, template_for("image.hsc", image_size=32), psf_regulariser=None)  # no PSF here
    assert out.flux.shape == hsc.flux.shape and out.bands == hsc.bands
    np.testing.assert_allclose(out.flux.sum((1, 2)), hsc.flux.sum((1, 2)), rtol=0.03)  # same AB magnitude
    np.testing.assert_allclose(out.flux, hsc.flux, atol=0.03 * hsc.flux.max())


def test_interpolation_baseline_masks_outside_the_source_range():
    sdss, desi = template_for("spectrum.sdss"), template_for("spectrum.desi")
    sdss.flux = (1 + sdss.wavelength / 1e4).astype(np.float32)
    out = interpolate_spectrum(sdss, desi)
    inside = (desi.wavelength >= sdss.wavelength[0]) & (desi.wavelength <= sdss.wavelength[-1])
    assert np.all(out.mask == ~inside)
    np.testing.assert_allclose(out.flux[inside], 1 + desi.wavelength[inside] / 1e4, rtol=1e-5)


# -- the whole CLI on tiny real parts --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(sky_shards, tmp_path_factory):
    """Tokenizers (briefly trained / fitted) + token shards + a 2-step FM from the tiny sky."""
    from omnisky.fm.model import FMConfig, FourM
    from omnisky.shards.reader import stream
    from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
    from omnisky.tokenizers.scalar import ScalarConfig, ScalarTokenizer
    from omnisky.tokenizers.spectrum import SpectrumConfig, SpectrumTokenizer
    from omnisky.tokenizers.tokenize_shards import tokenize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gen")
    samples = list(stream(shard_urls(sky_shards)))
    scalar = ScalarTokenizer(ScalarConfig(n_bins=8, colours=(("flux_g", "flux_r"), ("flux_r", "flux_i"))))
    scalar.fit(s.records for s in samples)
    scalar.save(root / "tok" / "scalar")
    for kind, tok in (("image", ImageTokenizer(ImageConfig(size=32))), ("spectrum", SpectrumTokenizer(SpectrumConfig()))):
        recs = [r for s in samples for k, r in s.records.items() if k.startswith(kind)][:8]
        opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
        for _ in range(2):
            loss, _ = tok.training_loss(recs)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tok.save(root / "tok" / kind)
    tokenize(sky_shards, root / "tok", root / "tokens", workers=1, batch_size=16)
    table = ModalityTable.from_manifest(root / "tokens")
    FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table).save(root / "fm")
    return root


from omnisky.generate.cli import load_samples  # noqa: E402


def _run(*argv):
    from omnisky.generate.cli import main
    assert main(list(argv)) == 0


def test_cli_translate_writes_fits_figures_and_schedule(tiny_models, sky_shards):
    out = tiny_models / "translate"
    _run("translate", "--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"),
         "--data", str(sky_shards), "--n", "2", "--samples", "2", "--steps", "3", "--out", str(out),
         "--estimate", "--estimate-runs", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_objects"] == 2 and math.isfinite(summary["median_chi2_vs_truth.image.hsc"])
    assert math.isfinite(summary["median_chi2_vs_truth_estimate.image.hsc"])
    oid = summary["objects"][0]["object_id"]
    with fits.open(out / f"{oid}.image.hsc.estimate.fits") as hdul:
        assert hdul[0].data.shape == (5, 32, 32) and hdul[0].header["BANDS"] == "hsc.g,hsc.r,hsc.i,hsc.z,hsc.y"
    with fits.open(out / f"{oid}.image.hsc.1.fits") as hdul:
        assert hdul[0].data.shape == (5, 32, 32) and hdul[0].header["BANDS"] == "hsc.g,hsc.r,hsc.i,hsc.z,hsc.y"
        assert hdul[0].header["PIXSCALE"] == pytest.approx(0.168) and hdul[0].header["CTYPE1"] == "RA---TAN"
    assert (out / f"{oid}.image.hsc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "schedule.json").read_text())[0]["steps"] == 3
    from matplotlib.image import imread
    from omnisky.generate.outputs import image_figure
    obj = load_samples(str(sky_shards), 1, ["image.des", "image.hsc"])[0]
    des, hsc = obj.records["image.des"], obj.records["image.hsc"]
    image_figure(out / "plain.png", des, [hsc], hsc)
    image_figure(out / "with_estimate.png", des, [hsc], hsc, estimate=hsc)   # one panel more
    assert imread(out / "with_estimate.png").shape[1] > imread(out / "plain.png").shape[1]


def fit_then_reuse(tiny_models, task: str, common: list, fit_args: list, flag: str, json_name: str,
                   name: str, target: str) -> dict:
    """Run `task` plain, with `fit_args` (fits and writes OUT/json_name), then with that file:
    the file reproduces the fitted run's records exactly, which differ from the plain ones.
    -> the written JSON."""
    _run(task, *common, "--out", str(tiny_models / f"{name}_plain"))
    _run(task, *common, *fit_args, "--out", str(tiny_models / name))
    _run(task, *common, flag, str(tiny_models / name / json_name), "--out", str(tiny_models / f"{name}2"))
    oid = json.loads((tiny_models / name / "summary.json").read_text())["objects"][0]["object_id"]
    load = lambda d: np.load(tiny_models / d / f"{oid}.{target}.0.npz")[f"{target}/flux"]   # noqa: E731
    np.testing.assert_array_equal(load(name), load(f"{name}2"))
    assert not np.allclose(load(name), load(f"{name}_plain"))
    return json.loads((tiny_models / name / json_name).read_text())


def test_cli_translate_with_data_consistency_fits_then_reuses_it(tiny_models, sky_shards):
    """--consistency RAW fits colour equations and floor on paired objects and writes them;
    --consistency FILE reuses them; the refined samples differ from the model's own."""
    common = ["--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"), "--data", str(sky_shards),
              "--n", "2", "--samples", "2", "--steps", "2", "--format", "npz"]
    cons = fit_then_reuse(tiny_models, "translate", common, ["--consistency", str(sky_shards), "--consistency-n", "6"],
                          "--consistency", "consistency.json", "tr", "image.hsc")
    assert cons["source"] == "image.des" and cons["fit"]["n_objects"] == 6 and cons["floor"] > 0
    assert len(cons["terms"]["offset"]) == 4                                  # one equation per DES band
    with pytest.raises(SystemExit, match="no such file"):
        _run("translate", *common, "--consistency", str(tiny_models / "nowhere.json"), "--out", str(tiny_models / "tr_x"))
    with pytest.raises(SystemExit, match="fitted for image.des -> image.hsc"):
        _run("translate", *common, "--given", "image.hsc", "--target", "image.des",
             "--consistency", str(tiny_models / "tr" / "consistency.json"), "--out", str(tiny_models / "tr_x"))


def test_cli_superres_with_data_consistency_fits_then_reuses_it(tiny_models, sky_shards):
    """superres --consistency RAW fits the prior width and aperture ratio on paired spectra
    and writes them; --consistency FILE reuses them; Pipeline.superres(consistency=) gives
    the refinement with the object's catalog redshift (emission lines fitted)."""
    from omnisky.generate.consistency import Consistency, known_redshift, refine_translation
    from omnisky.generate.pipeline import Pipeline
    common = ["--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"), "--data", str(sky_shards),
              "--n", "2", "--steps", "2", "--format", "npz"]
    cons = fit_then_reuse(tiny_models, "superres", common, ["--consistency", str(sky_shards), "--consistency-n", "6"],
                          "--consistency", "consistency.json", "sr_dc", "spectrum.desi")
    assert cons["source"] == "spectrum.sdss" and cons["terms"] is None and "line_ew" in cons
    assert cons["fit"]["n_objects"] == 6 and cons["fit"]["aperture_ratio"] > 0   # the untrained model: 1 (fallback)
    # the summary keeps the model's own draws' chi2 (the plain run's, same seed) beside the pulled ones'
    plain_sum, dc_sum = (json.loads((tiny_models / d / "summary.json").read_text()) for d in ("sr_dc_plain", "sr_dc"))
    assert dc_sum["median_chi2_vs_truth_model.spectrum.desi"] == pytest.approx(
        plain_sum["median_chi2_vs_truth.spectrum.desi"], rel=1e-6)
    assert "median_chi2_vs_truth_model.spectrum.desi" not in plain_sum
    sky = Pipeline.from_pretrained(tiny_models / "fm", tiny_models / "tok")
    objs = load_samples(str(sky_shards), 2, need=["spectrum.sdss", "spectrum.desi", "scalar.redshift"])
    c = Consistency.from_json(cons)
    plain = sky.superres(objs, steps=2, seed=4)
    pulled = sky.superres(objs, steps=2, seed=4, consistency=c)
    expect = refine_translation(objs[1].records["spectrum.sdss"], plain[1], c, redshift=known_redshift(objs[1]))
    np.testing.assert_allclose(pulled[1][0].flux, expect[0].flux, rtol=1e-6)
    assert pulled[1][0].flux.shape == (7781,) and not np.allclose(pulled[1][0].flux, plain[1][0].flux)


def test_cli_sample_with_catalog_consistency_fits_then_reuses_it(tiny_models, sky_shards):
    """--catalog-consistency RAW fits the maps (and the model's error) on training objects and
    writes them; the FILE reproduces the images; they differ from the model's own; the pipeline's
    `catalog=` gives the same; a consistency for another target is refused."""
    from omnisky.generate.catalog_consistency import CatalogConsistency, refine_to_catalog
    from omnisky.generate.pipeline import Pipeline
    given = ["scalar.redshift", "scalar.flux_g", "scalar.flux_r", "scalar.flux_i", "scalar.flux_z", "scalar.r_half"]
    common = ["--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"), "--data", str(sky_shards),
              "--n", "2", "--steps", "2", "--format", "npz", "--given", *given, "--target", "image.des"]
    cons = fit_then_reuse(tiny_models, "sample", common,
                          ["--catalog-consistency", str(sky_shards), "--catalog-share-snr", "10"],
                          "--catalog-consistency", "catalog_consistency.json", "cc", "image.des")
    assert cons["target"] == "image.des" and cons["fit"]["n_objects"] >= 10 and cons["tau_flux"] >= 0.02
    with pytest.raises(SystemExit, match="one target image"):
        _run("sample", *common[:-1], "scalar.redshift", "--catalog-consistency", str(sky_shards),
             "--catalog-share-snr", "10", "--out", str(tiny_models / "cc_x"))
    sky = Pipeline.from_pretrained(tiny_models / "fm", tiny_models / "tok")
    objs = load_samples(str(sky_shards), 2, need=["image.des", "scalar.r_half"])
    cc = CatalogConsistency.from_json(cons)
    plain = sky.sample(objs, given, "image.des", steps=2, seed=3)
    pulled = sky.sample(objs, given, "image.des", steps=2, seed=3, catalog=cc)
    np.testing.assert_allclose(pulled[1][0].flux, refine_to_catalog(objs[1], plain[1], cc, given)[0].flux, rtol=1e-6)
    with pytest.raises(ValueError, match="fitted for image.des, not image.hsc"):
        sky.sample(objs, given, "image.hsc", steps=2, catalog=cc)


def test_cli_superres_sample_predict_embed(tiny_models, sky_shards):
    common = ["--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"), "--data", str(sky_shards), "--n", "2"]
    _run("superres", *common, "--steps", "2", "--estimate", "--estimate-runs", "2", "--out", str(tiny_models / "sr"))
    summary = json.loads((tiny_models / "sr" / "summary.json").read_text())
    oid = summary["objects"][0]["object_id"]
    assert math.isfinite(summary["median_chi2_vs_truth_estimate.spectrum.desi"])
    with pytest.raises(SystemExit, match="--estimate: one target image or spectrum"):   # a scalar has none
        _run("sample", *common, "--steps", "2", "--given", "image.des", "--target", "scalar.redshift",
             "--estimate", "--out", str(tiny_models / "sr_x"))
    for k in ("0", "estimate"):
        with fits.open(tiny_models / "sr" / f"{oid}.spectrum.desi.{k}.fits") as hdul:
            assert len(hdul["SPECTRUM"].data["WAVELENGTH"]) == 7781 and hdul["SPECTRUM"].header["INSTRUME"] == "desi"
    _run("sample", *common, "--steps", "2", "--given", "scalar.redshift", "scalar.flux_r",
         "--target", "spectrum.desi", "image.des", "--format", "npz", "--out", str(tiny_models / "sample"))
    summary = json.loads((tiny_models / "sample" / "summary.json").read_text())
    oid = summary["objects"][0]["object_id"]
    with np.load(tiny_models / "sample" / f"{oid}.image.des.0.npz") as f:     # chained: spectrum, then image
        assert f["image.des/flux"].shape == (4, 32, 32) and str(f["image.des/survey"]) == "des"
    assert (tiny_models / "sample" / f"{oid}.spectrum.desi.0.npz").exists()
    assert [s["target"] for s in json.loads((tiny_models / "sample" / "schedule.json").read_text())] == \
        ["spectrum.desi", "image.des"]
    _run("predict", *common, "--given", "image.des", "--target", "scalar.redshift", "--out", str(tiny_models / "z"))
    rows = json.loads((tiny_models / "z" / "posteriors.json").read_text())
    assert all(r["lo68"] <= r["median"] <= r["hi68"] for r in rows)
    _run("calibrate", *common, "--n", "12", "--given", "image.des", "--target", "scalar.redshift",
         "--out", str(tiny_models / "cal"))
    cal = json.loads((tiny_models / "cal" / "calibration.json").read_text())
    assert cal["n"] == 12 and cal["temperature"] > 0 and len(cal["pit_quantiles"]) == len(cal["levels"])
    _run("predict", *common, "--given", "image.des", "--target", "scalar.redshift",
         "--calibration", str(tiny_models / "cal" / "calibration.json"), "--out", str(tiny_models / "zc"))
    assert all(r["lo68"] <= r["median"] <= r["hi68"] for r in json.loads((tiny_models / "zc" / "posteriors.json").read_text()))
    with pytest.raises(SystemExit, match="fitted for scalar.redshift given"):
        _run("predict", *common, "--given", "image.des", "scalar.flux_r", "--target", "scalar.redshift",
             "--calibration", str(tiny_models / "cal" / "calibration.json"), "--out", str(tiny_models / "zc"))
    _run("embed", *common, "--n", "5", "--given", "image.des", "--neighbours", "2", "--out", str(tiny_models / "emb"))
    emb = np.load(tiny_models / "emb" / "embeddings.npz")["embeddings"]
    assert emb.shape == (5, 32) and np.isfinite(emb).all()
    near = json.loads((tiny_models / "emb" / "neighbours.json").read_text())
    assert len(near) == 5 and all(len(r["neighbours"]) == 2 and r["object_id"] not in r["neighbours"] for r in near)


def test_pipeline_translates_back_and_chains_with_several_samples(tiny_models, sky_shards):
    from omnisky.generate.pipeline import Pipeline
    from omnisky.shards.reader import stream
    sky = Pipeline.from_pretrained(tiny_models / "fm", tiny_models / "tok")
    objs = [s for s in stream(shard_urls(sky_shards)) if "image.hsc" in s.records][:2]
    back = sky.translate(objs, source="image.hsc", target="image.des", n_samples=2, seed=1, steps=2)
    assert len(back) == 2 and len(back[0]) == 2 and back[0][0].bands == ("des.g", "des.r", "des.i", "des.z")
    again = sky.translate(objs, source="image.hsc", target="image.des", n_samples=2, seed=1, steps=2)
    np.testing.assert_array_equal(back[1][1].flux, again[1][1].flux)            # seeded
    from omnisky.generate.consistency import Consistency, refine_translation
    cons = Consistency("image.hsc", "image.des", None, floor=1.0)
    pulled = sky.translate(objs, source="image.hsc", target="image.des", n_samples=2, seed=1, steps=2, consistency=cons)
    expect = refine_translation(objs[1].records["image.hsc"], back[1], cons)
    np.testing.assert_allclose(pulled[1][1].flux, expect[1].flux, rtol=1e-5, atol=1e-6)
    assert len(pulled[0]) == 2 and not np.allclose(pulled[1][1].flux, back[1][1].flux)
    with pytest.raises(ValueError, match="consistency fitted for image.hsc -> image.des"):
        sky.translate(objs, source="image.des", target="image.hsc", steps=2, consistency=cons)
    chain = sky.sample_chain(objs[:1], ["image.hsc"], sky.schedule(["scalar.redshift", "spectrum.sdss"], steps=2))
    assert set(chain[0][0]) == {"scalar.redshift", "spectrum.sdss"} and len(chain[0][0]["spectrum.sdss"].flux) > 1000


def test_pipeline_estimate_between_marginals_and_samples(tiny_models, sky_shards):
    """Pipeline.estimate: reveal_steps = steps is the mean of that many samples; 0 is one
    deterministic decode of the marginals' mean codes; seeded in between."""
    from omnisky.generate.pipeline import Pipeline
    from omnisky.generate.sampler import target_distribution
    from omnisky.shards.reader import stream
    sky = Pipeline.from_pretrained(tiny_models / "fm", tiny_models / "tok")
    objs = [s for s in stream(shard_urls(sky_shards)) if "image.des" in s.records and "image.hsc" in s.records][:2]
    samples = sky.translate(objs, n_samples=3, seed=4, steps=2)
    full = sky.estimate(objs, ["image.des"], "image.hsc", n_samples=3, seed=4, steps=2, reveal_steps=2)
    for f, g in zip(full, samples):
        np.testing.assert_allclose(f.flux, np.mean([x.flux for x in g], 0), rtol=1e-5, atol=1e-6)
    marg = sky.estimate(objs, ["image.des"], "image.hsc", reveal_steps=0)
    tok = sky.tokenizer("image.hsc")
    inputs = sky.tokenize(objs, ["image.des"])
    probs = target_distribution(sky.model, {**inputs, "image.hsc": torch.full((2, tok.n_tokens), -1)}, "image.hsc",
                                tok.vocab_size, sky.allowed_ids("image.hsc"))
    assert torch.allclose(probs.sum(-1), torch.ones(2, tok.n_tokens))
    want = tok.decode_expected(probs, like=[o.records["image.hsc"] for o in objs])
    np.testing.assert_allclose(marg[1].flux, want[1].flux, rtol=1e-5, atol=1e-6)
    assert marg[0].bands == objs[0].records["image.hsc"].bands
    one = sky.estimate(objs[:1], ["image.des"], "image.hsc", n_samples=2, seed=1, steps=4, reveal_steps=1)
    np.testing.assert_array_equal(one[0].flux, sky.estimate(objs[:1], ["image.des"], "image.hsc", n_samples=2,
                                                            seed=1, steps=4, reveal_steps=1)[0].flux)
    with pytest.raises(ValueError, match="reveal_steps"):
        sky.estimate(objs, ["image.des"], "image.hsc", steps=2, reveal_steps=3)
    with pytest.raises(NotImplementedError, match="posterior median of `predict`"):
        sky.estimate(objs, ["image.des"], "scalar.redshift", steps=2)
    with pytest.raises(ValueError, match="combine"):
        sky.estimate(objs, ["image.des"], "image.hsc", steps=2, combine="mode")
    spec = [s for s in stream(shard_urls(sky_shards)) if "spectrum.sdss" in s.records
            and "spectrum.desi" in s.records][:2]
    drawn = sky.superres(spec, n_samples=3, seed=3, steps=2)
    median = sky.estimate(spec, ["spectrum.sdss"], "spectrum.desi", n_samples=3, seed=3, steps=2)   # the default:
    mean = sky.estimate(spec, ["spectrum.sdss"], "spectrum.desi", n_samples=3, seed=3, steps=2,     # samples
                        combine="mean")
    for m, a, g in zip(median, mean, drawn):
        np.testing.assert_allclose(m.flux, np.median([x.flux for x in g], 0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.flux, np.mean([x.flux for x in g], 0), rtol=1e-4, atol=1e-5)
        assert np.array_equal(m.wavelength, g[0].wavelength)
    codes = sky.estimate(spec, ["spectrum.sdss"], "spectrum.desi", steps=2, reveal_steps=0)   # spectra decode
    assert np.isfinite(codes[0].flux).all() and not np.allclose(codes[0].flux, median[0].flux)   # mean codes too


def test_cli_report_writes_markdown_with_figures(tiny_models, sky_shards):
    _run("report", "--fm", str(tiny_models / "fm"), "--tokenizers", str(tiny_models / "tok"), "--data", str(sky_shards),
         "--train-data", str(sky_shards), "--n-eval", "4", "--n-translate", "4", "--catalog-share-snr", "10", "--out", str(tiny_models / "report"))
    report = (tiny_models / "report" / "report.md").read_text()
    assert "Survey translation" in report and "figures/translate_0.png" in report
    figures = json.loads((tiny_models / "report" / "report.json").read_text())
    assert math.isfinite(figures["translation"]["chi2_baseline"]) and figures["superres"]["n"] >= 1
    assert (tiny_models / "report" / "figures" / "translate_0.png").exists()
    assert (tiny_models / "report" / "figures" / "translate_consistent_0.png").exists()
    assert "data consistency" in report and math.isfinite(figures["translation"]["chi2_fm_mean_consistent"])
    assert set(figures["translation"]["shape"]) >= {"fm", "estimate", "baseline"}
    est = figures["translation"]["estimate"]
    assert "point estimate" in report and math.isfinite(est["chi2"]) and math.isfinite(est["chi2_consistent"])
    sr = figures["superres"]["estimate"]
    assert math.isfinite(sr["chi2"]) and sr["combine"] == "median" and "pixel-wise median of 8 samples" in report
    cond = figures["conditional"]
    assert math.isfinite(cond["estimate_chi2_vs_truth"]) and math.isfinite(cond["catalog_estimate_chi2_vs_truth"])
    assert "The point estimate (`Pipeline.estimate`): reduced chi2" in report
    assert "flux r against the noiseless truth's stamp" in report
    assert "the same ridge probe on the fluxes' features" in report
    z = figures["redshift"]
    assert 0 < z["coverage68_sd"] < 0.5 and f"coverage: {z['coverage68']:.2f} +- {z['coverage68_sd']:.2f}" in report


def test_colours_are_tokenized_into_shards_and_given_with_their_fluxes(tiny_models, sky_shards):
    """The scalar tokenizer's colours become modalities of the token shards and the FM; the
    pipeline gives a colour wherever both its fluxes are given, and only then."""
    from omnisky.generate.pipeline import Pipeline
    modalities = read_manifest(tiny_models / "tokens")["modalities"]
    assert {"scalar.colour_g_r", "scalar.colour_r_i"} <= set(modalities)
    sky = Pipeline.from_pretrained(tiny_models / "fm", tiny_models / "tok")
    objs = load_samples(str(sky_shards), 3, need=["scalar.flux_g", "scalar.flux_r", "scalar.flux_i"])
    ids = sky.tokenize(objs, ["scalar.flux_g", "scalar.flux_r"])
    assert sorted(ids) == ["scalar.colour_g_r", "scalar.flux_g", "scalar.flux_r"]
    colour = sky.tokenizer("scalar.flux_g").derive(objs[0].records)["scalar.colour_g_r"]
    assert ids["scalar.colour_g_r"][0, 0] == sky.tokenizer("scalar.flux_g").encode(colour)[0, 0]
    assert sorted(sky.tokenize(objs, ["scalar.flux_g", "scalar.redshift"])) == ["scalar.flux_g", "scalar.redshift"]
