"""The image and spectrum tokenizers: shapes, round trips, band/grid agnosticism, masking,
saving, learning, and refusing what they cannot take. Records come from the simulated sky
(`sky_config` fixture) or are built here; tiny default configs, CPU, well under a minute."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from omnisky.shards.schema import Image, RecordError, Spectrum
from omnisky.tokenizers.base import Tokenizer, load_tokenizer
from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
from omnisky.tokenizers.spectrum import SpectrumConfig, SpectrumTokenizer

ROOT = Path(__file__).resolve().parents[1]


def adam_steps(tok, recs, steps: int = 20) -> list[float]:
    """`steps` Adam steps (lr 3e-3) of `tok.training_loss` on `recs`; the losses. Leaves tok in eval mode."""
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, _ = tok.training_loss(recs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tok.eval()
    return losses


@pytest.fixture(scope="module")
def sky(sky_config):
    """{modality key: [records]} of the 24-object test sky."""
    from omnisky.shards.sky import simulate
    out: dict[str, list] = {}
    for s in simulate(sky_config):
        for k, r in s.records.items():
            out.setdefault(k, []).append(r)
    assert all(len(out.get(k, [])) >= 6 for k in ("image.des", "image.hsc", "spectrum.sdss", "spectrum.desi"))
    return out


def _image_tok(**kw) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageConfig(**kw)).eval()


def _spectrum_tok(**kw) -> SpectrumTokenizer:
    torch.manual_seed(0)
    return SpectrumTokenizer(SpectrumConfig(**kw)).eval()


def _copy(rec, **changes):
    """A deep copy of a record (numpy arrays copied) with some fields replaced."""
    fields = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    fields = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in fields.items()}
    return type(rec)(**{**fields, **changes})


def _subset_bands(img: Image, keep: list[int]) -> Image:
    return _copy(img, flux=img.flux[keep], ivar=img.ivar[keep], mask=img.mask[keep],
                 bands=tuple(img.bands[i] for i in keep), psf_fwhm=img.psf_fwhm[keep])


# -- image -------------------------------------------------------------------------------------
def test_image_shapes_vocab_and_batch_of_one(sky):
    tok = _image_tok()
    assert tok.kind == "image" and tok.vocab_size == 1000 and tok.n_tokens == 64
    mixed = sky["image.des"][:3] + sky["image.hsc"][:3]              # 4- and 5-band records together
    ids = tok.encode(mixed)
    assert ids.shape == (6, 64) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    one = tok.encode(mixed[4])                                         # a single record, not a list
    assert one.shape == (1, 64)
    assert torch.equal(one[0], ids[4])                                 # padding bands do not leak
    base = ImageTokenizer(ImageConfig(size=96, downsample=4))
    assert base.n_tokens == 576 and base.vocab_size == 1000


def test_image_decode_follows_the_template(sky):
    tok = _image_tok()
    des, hsc = sky["image.des"][:2], sky["image.hsc"][0]
    ids = tok.encode(des)
    out = tok.decode(ids, like=hsc)                                    # DES g,r,i,z -> HSC g..y
    assert len(out) == 2
    for d in out:
        assert d.bands == hsc.bands and d.survey == "hsc" and d.pixel_scale == hsc.pixel_scale
        assert d.zero_point == hsc.zero_point and np.array_equal(d.psf_fwhm, hsc.psf_fwhm)
        assert d.flux.shape == (5, 32, 32) and np.isfinite(d.flux).all()
        ok = hsc.ivar > 0
        assert np.array_equal(d.ivar[ok], hsc.ivar[ok]) and np.all(d.ivar > 0) and not d.mask.any()
        d.validate()
    y_only = _subset_bands(hsc, [4])                                   # decode a single band: HSC y
    [y] = tok.decode(ids[:1], like=y_only)
    assert y.bands == ("hsc.y",) and y.flux.shape == (1, 32, 32)
    odd = _copy(y_only, flux=np.zeros((1, 8, 8), np.float32), ivar=np.ones((1, 8, 8), np.float32) * 3,
                mask=np.zeros((1, 8, 8), bool))                        # template of another shape
    [z] = tok.decode(ids[:1], like=odd)
    assert z.flux.shape == (1, 32, 32) and np.all(z.ivar == 1)
    # a plane depends on its own band's embedding only: y decoded alone == y decoded among 5 bands
    [full] = tok.decode(ids[:1], like=hsc)
    assert np.allclose(full.flux[4], y.flux[0], rtol=1e-5, atol=1e-7)
    # the zero point sets the units: HSC counts = nanomaggies * 10^(0.4 (27 - 22.5))
    as_nmgy = _copy(hsc, zero_point=22.5)
    [n] = tok.decode(ids[:1], like=as_nmgy)
    assert np.allclose(full.flux, n.flux * 10 ** (0.4 * 4.5), rtol=1e-4, atol=1e-6)


def test_image_decode_expected_of_one_hot_ids_is_decode(sky):
    """decode_expected on one-hot distributions is decode of those ids; a mixture of two
    codes per token decodes between them (a point estimate, off the code grid)."""
    tok = _image_tok(size=32)
    recs = sky["image.hsc"][:2]
    ids = tok.encode(recs)                                                    # (2, n)
    one_hot = torch.nn.functional.one_hot(ids, tok.vocab_size).float()       # (2, n, V)
    for a, b in zip(tok.decode_expected(one_hot, like=recs), tok.decode(ids, like=recs)):
        np.testing.assert_allclose(a.flux, b.flux, rtol=1e-5, atol=1e-6)
        assert a.bands == b.bands and a.survey == b.survey
    half = 0.5 * one_hot + 0.5 * torch.nn.functional.one_hot((ids + 1) % tok.vocab_size, tok.vocab_size).float()
    mid = tok.decode_expected(half, like=recs)
    assert mid[0].flux.shape == recs[0].flux.shape and np.isfinite(mid[0].flux).all()
    with pytest.raises(ValueError, match="decode_expected: expected probs"):
        tok.decode_expected(one_hot[:, 1:], like=recs)
    from omnisky.tokenizers.scalar import ScalarConfig, ScalarTokenizer
    with pytest.raises(NotImplementedError, match="ScalarTokenizer has no decode_expected"):
        ScalarTokenizer(ScalarConfig()).decode_expected(one_hot, like=recs)


def test_spectrum_decode_expected_of_one_hot_ids_is_decode():
    """decode_expected on one-hot distributions is decode of those ids (line slots too); the
    flux scale's mean under token 0's distribution: an even mixture of two scale bins decodes
    to the mean of the two decodes (the flux is linear in the scale)."""
    torch.manual_seed(0)
    tok = SpectrumTokenizer(SpectrumConfig(line_slots=2, line_min_snr=3.0)).eval()
    wl = np.exp(np.arange(np.log(3800.0), np.log(9200.0), 1e-4))             # SDSS-like log grid
    rng = np.random.default_rng(0)
    recs = [Spectrum((a + np.sin(wl / 300.0) + 25 * np.exp(-0.5 * ((wl - 6563 * (1 + z)) / 2.0) ** 2)
                      + rng.normal(0, 0.1, wl.shape)).astype(np.float32), np.full(wl.shape, 100.0, np.float32),
                     np.zeros(wl.shape, bool), wl, "sdss", np.full(wl.shape, 2000.0, np.float32), object_id=f"o{k}")
            for k, (a, z) in enumerate([(3.0, 0.1), (8.0, 0.2)])]
    ids = tok.encode(recs)                                                    # (2, n)
    one_hot = torch.nn.functional.one_hot(ids, tok.vocab_size).float()       # (2, n, V)
    for a, b in zip(tok.decode_expected(one_hot, like=recs), tok.decode(ids, like=recs)):
        np.testing.assert_allclose(a.flux, b.flux, rtol=1e-5, atol=1e-5)
        assert a.instrument == b.instrument and np.array_equal(a.wavelength, b.wavelength)
    up = ids.clone()
    up[:, 0] += 1                                                             # the next flux-scale bin
    mixed = one_hot.clone()
    mixed[:, 0] = 0.5 * one_hot[:, 0] + 0.5 * torch.nn.functional.one_hot(up[:, 0], tok.vocab_size).float()
    for m, a, b in zip(tok.decode_expected(mixed, like=recs), tok.decode(ids, like=recs), tok.decode(up, like=recs)):
        np.testing.assert_allclose(m.flux, 0.5 * (a.flux + b.flux), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="decode_expected: expected probs"):
        tok.decode_expected(one_hot[:, 1:], like=recs)


def test_image_band_agnostic_and_refusals(sky):
    tok = _image_tok()
    des = sky["image.des"][0]
    ids = tok.encode([_subset_bands(des, [0, 1]), _subset_bands(des, [3]), des])
    assert ids.shape == (3, 64)
    assert not torch.equal(ids[0], ids[2])                             # the band set matters
    bad = _copy(des, bands=("des.g", "des.r", "des.i", "lsst.q"))
    with pytest.raises(RecordError, match="unknown band 'lsst.q'"):
        tok.encode(bad)
    with pytest.raises(RecordError, match="'image.bands'.*unknown band 'lsst.q'"):
        tok.decode(ids[:1], like=bad)
    big = _copy(des, flux=np.zeros((4, 48, 48), np.float32), ivar=np.ones((4, 48, 48), np.float32),
                mask=np.zeros((4, 48, 48), bool))
    with pytest.raises(RecordError, match=r"'image.flux'.*48x48.*32x32"):
        tok.encode(big)
    with pytest.raises(ValueError, match=r"expected tokens \(B, 64\)"):
        tok.decode(ids[:, :10], like=des)
    hiding = _image_tok(band_dropout=0.9).train()                      # hidden input bands still train
    with torch.no_grad():
        loss, _ = hiding.training_loss(sky["image.hsc"][:4])
    assert torch.isfinite(loss) and loss > 0


def test_image_masked_pixels_do_not_affect_the_loss(sky):
    tok = _image_tok()
    recs = sky["image.des"][:2] + sky["image.hsc"][:2]
    loss, metrics = tok.training_loss(recs)
    assert metrics["recon"] > 0 and 0 < metrics["codes_used"] <= 1
    rng = np.random.default_rng(0)
    changed = []
    for r in recs:
        mask = r.mask | (rng.random(r.mask.shape) < 0.1)
        flux = np.where(mask, 1e6, r.flux).astype(np.float32)          # garbage under the mask
        flux[mask & (rng.random(r.mask.shape) < 0.5)] = np.nan
        changed.append(_copy(r, mask=mask, flux=flux, ivar=np.where(mask, 0, r.ivar).astype(np.float32)))
    masked_more, _ = tok.training_loss(changed)
    assert torch.isfinite(masked_more)
    # the same extra mask with the true flux kept under it gives exactly the same loss
    kept = [_copy(c, flux=np.where(c.mask, r.flux, c.flux).astype(np.float32)) for c, r in zip(changed, recs)]
    kept_loss, _ = tok.training_loss(kept)
    assert float(masked_more.detach()) == pytest.approx(float(kept_loss.detach()), rel=1e-6)
    assert torch.equal(tok.encode(changed), tok.encode(kept))


@pytest.mark.parametrize("kw", [{}, {"mix_tokens": 1, "quantizer": "lfq", "codebook_bits": 10}],
                         ids=["fsq-local", "lfq-mixed"])
def test_image_save_load_and_learning(sky, tmp_path, kw):
    tok = _image_tok(**kw)
    assert tok.vocab_size == (1024 if kw else 1000)
    recs = sky["image.des"][:4] + sky["image.hsc"][:4]
    torch.manual_seed(1)
    losses = adam_steps(tok, recs)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    ids = tok.encode(recs)
    tok.save(tmp_path / "image")
    for again in (ImageTokenizer.from_pretrained(tmp_path / "image"), load_tokenizer(tmp_path / "image")):
        assert isinstance(again, ImageTokenizer) and again.config == tok.config
        assert torch.equal(again.encode(recs), ids)
        a, b = tok.decode(ids, like=recs), again.decode(ids, like=recs)
        assert all(np.array_equal(x.flux, y.flux) for x, y in zip(a, b))


def test_image_brightness_scale_token(sky):
    """With scale_bins > 0, token 0 is the object's brightness scale g and the grid codes
    describe the stamp compressed relative to it: a galaxy 10x brighter (flux x 10, noise
    x 10) gets a scale token 1 dex higher and the same grid codes, and decodes 10x
    brighter. Token 0 is a segment of its own for the FM, takes ids below scale_bins only,
    and an out-of-range one is refused."""
    tok = _image_tok(scale_bins=300, log_scale_max=3.0, scale_knee=2.0)   # 0.01 dex bins
    assert tok.n_tokens == 65 and tok.n_scale == 1 and _image_tok().n_scale == 0
    assert tok.code_segments == ((1, (300,)), (64, (8, 5, 5, 5)))
    allowed = tok.allowed_ids()
    assert not allowed[0, 300:].any() and allowed[0, :300].all() and allowed[1:].all()
    recs = sky["image.des"][:4] + sky["image.hsc"][:4]
    ids = tok.encode(recs)
    assert ids.shape == (8, 65) and int(ids[:, 0].max()) < 300
    bright = [_copy(r, flux=r.flux * 10, ivar=r.ivar / 100) for r in recs]
    ids10 = tok.encode(bright)
    lit = (ids[:, 0] > 0) & (ids[:, 0] < 200)                               # g > 1 before and after
    assert lit.sum() >= 4, ids[:, 0]
    assert torch.equal(ids10[lit, 0], ids[lit, 0] + 100)
    assert (ids10[lit, 1:] == ids[lit, 1:]).float().mean() > 0.99
    a, b = tok.decode(ids, like=recs), tok.decode(ids10, like=bright)
    for i in np.flatnonzero(lit.numpy()):
        np.testing.assert_allclose(b[i].flux, 10 * a[i].flux, rtol=1e-3, atol=1e-6 * np.abs(b[i].flux).max())
    bad = ids.clone()
    bad[0, 0] = 300
    with pytest.raises(ValueError, match="brightness scale"):
        tok.decode(bad, like=recs)
    loss, metrics = tok.training_loss(recs)
    assert np.isfinite(float(loss.detach())) and metrics["recon"] > 0


def test_image_decodes_a_band_it_was_not_shown(sky):
    """Band dropout trains cross-band decoding: encode HSC g,r,i,z, decode HSC y. After a
    few steps the y plane predicted from the other four bands must beat predicting
    nothing (zero flux), and be about as good as y decoded with y shown (40 steps, two
    versions of the test sky: unseen 41.8 / 56.5, seen 41.9 / 56.5, nothing 95.3 / 93.2)."""
    hsc = sky["image.hsc"][:6]
    tok = _image_tok(band_dropout=0.5, mix_tokens=1)
    torch.manual_seed(2)
    adam_steps(tok, hsc, steps=40)
    griz = [_subset_bands(r, [0, 1, 2, 3]) for r in hsc]
    y_only = [_subset_bands(r, [4]) for r in hsc]
    unseen = tok.decode(tok.encode(griz), like=y_only)               # y never shown to the encoder
    seen = tok.decode(tok.encode(hsc), like=y_only)

    def chi2(pred, recs):
        return sum(float((r.ivar * (p.flux - r.flux) ** 2)[~r.mask].mean()) for p, r in zip(pred, recs))
    nothing = chi2([_copy(r, flux=np.zeros_like(r.flux)) for r in y_only], y_only)
    assert chi2(unseen, y_only) < 0.8 * nothing, (chi2(unseen, y_only), chi2(seen, y_only), nothing)
    assert chi2(unseen, y_only) < 1.2 * chi2(seen, y_only)


def test_image_new_survey_is_a_registry_entry(sky):
    """A band no code knows (an LSST-like r from speclite's curve) encodes once registered;
    its embedding comes from the curve: close to DECam r, far from DECam z."""
    from omnisky.shards import bands
    from omnisky.tokenizers.image import band_features
    tok = _image_tok(mix_tokens=1)
    des = sky["image.des"][0]
    lsst = _copy(_subset_bands(des, [1]), bands=("lsst.r",), survey="lsst")
    with pytest.raises(RecordError, match="unknown band 'lsst.r'"):
        tok.encode(lsst)
    bands.register(bands.Band("lsst.r", "lsst", "r", "lsst2023-r", 22.5))
    try:
        ids = tok.encode(lsst)
        assert ids.shape == (1, 64)
        f = {n: band_features(n, 0.2, 0.8) for n in ("lsst.r", "des.r", "des.z")}
        assert np.abs(f["lsst.r"] - f["des.r"]).sum() < 0.5 * np.abs(f["lsst.r"] - f["des.z"]).sum()
        [back] = tok.decode(ids, like=lsst)
        assert back.bands == ("lsst.r",) and np.isfinite(back.flux).all()
    finally:
        bands.REGISTRY.pop("lsst.r")


# -- spectrum ----------------------------------------------------------------------------------
def test_spectrum_shapes_scale_token_and_batch_of_one(sky):
    tok = _spectrum_tok()
    assert tok.kind == "spectrum" and tok.vocab_size == 1000 and tok.n_tokens == 65
    recs = sky["spectrum.sdss"][:3] + sky["spectrum.desi"][:3]         # two native grids together
    ids = tok.encode(recs)
    assert ids.shape == (6, 65) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    assert torch.equal(tok.encode(recs[4]), ids[4:5])
    assert tok.wavelength_range == (3500.0, 10500.0)                   # SDSS, BOSS and DESI inside
    # token 0 is the flux scale: 128 bins of 7/128 dex; x 10^(70/128) moves it by 10, the shape stays
    assert int(ids[:, 0].max()) < tok.config.scale_bins == 128
    k = 10 ** (70 / 128)
    brighter = [_copy(r, flux=r.flux * k, ivar=r.ivar / k ** 2) for r in recs]
    ids2 = tok.encode(brighter)
    assert torch.equal(ids2[:, 0], ids[:, 0] + 10)
    assert (ids2[:, 1:] == ids[:, 1:]).float().mean() > 0.98
    # what a sampler may draw: only scale_bins ids at position 0, every id elsewhere; encodings obey it
    allowed = tok.allowed_ids()
    assert allowed.shape == (65, 1000) and int(allowed[0].sum()) == 128 and bool(allowed[1:].all())
    assert bool(allowed.gather(1, ids.T).all()) and bool(allowed.gather(1, ids2.T).all())


def test_spectrum_tokenizer_with_line_slots_gives_back_a_line(sky):
    torch.manual_seed(0)
    plain = SpectrumTokenizer(SpectrumConfig()).eval()
    tok = SpectrumTokenizer(SpectrumConfig(line_slots=4, line_min_snr=5.0)).eval()
    tok.load_state_dict(plain.state_dict())                  # the same conv weights; lines have none
    assert tok.n_tokens == 65 + 12 and tok.n_shape_tokens == 64
    from omnisky.fm.modality import ModalityTable   # each position's ids on their own grid (fm.modality)
    spec = ModalityTable.from_tokenizers({"spectrum.desi": tok})["spectrum.desi"]
    assert spec.code_segments[:3] == ((1, (128,)), (64, (8, 5, 5, 5)), (1, (tok.lines.n_coarse + 1,)))
    assert sum(n for n, _ in spec.code_segments) == 77
    allowed = tok.allowed_ids()
    p = 0
    for n, levels in spec.code_segments:          # every id a position may take lies on its grid
        assert int(allowed[p:p + n].sum(1).max()) <= int(np.prod(levels))
        p += n
    rec = sky["spectrum.desi"][0]
    wl = rec.wavelength
    centre, sigma_a = 6000.0, 1.0                            # a narrow line, ~40 sigma
    line = 30.0 * np.exp(-0.5 * ((wl - centre) / sigma_a) ** 2)
    sharp = dataclasses.replace(rec, flux=(rec.flux + line).astype(np.float32))
    window = np.abs(wl - centre) < 8
    dwl = np.gradient(wl)
    truth_flux = float((line * dwl)[window].sum())
    ids = tok.encode(sharp)                                  # (1, 77)
    no_lines = ids.clone()
    no_lines[0, 65::3], no_lines[0, 66::3], no_lines[0, 67::3] = tok.lines.n_coarse, 0, 0   # every slot empty
    [with_l], [without] = tok.decode(ids, like=sharp), tok.decode(no_lines, like=sharp)
    assert float(((with_l.flux - without.flux) * dwl)[window].sum()) == pytest.approx(truth_flux, rel=0.1)
    assert float(np.abs(with_l.flux - without.flux)[~window].max()) < 1e-3 * line.max()   # only there
    [back_plain] = plain.decode(plain.encode(sharp), like=sharp)
    assert torch.equal(plain.encode(sharp), ids[:, :65])         # the same conv tokens before the line slots
    assert np.allclose(back_plain.flux, without.flux, atol=1e-5)
    ids = tok.encode([sharp, rec])
    assert ids.shape == (2, 77)
    assert bool(tok.allowed_ids().gather(1, ids.T).all())
    bad = ids[:1].clone()
    bad[0, 65] = tok.lines.n_coarse + 1                      # past the position range
    with pytest.raises(ValueError, match="token 65"):
        tok.decode(bad, like=rec)


def test_spectrum_rebinning_propagates_ivar():
    tok = _spectrum_tok()
    wl = 3600.0 + 0.8 * np.arange(7781)                                # DESI-like linear grid
    ivar = np.full(wl.shape, 4.0, np.float32)
    rec = Spectrum(np.full(wl.shape, 2.5, np.float32), ivar, np.zeros(wl.shape, bool), wl, "desi",
                   np.full(wl.shape, 3000.0, np.float32), object_id="flat")
    flux, ivar_int = tok.rebin(rec)
    inside = (tok.wavelength > 3610) & (tok.wavelength < 9810)
    assert np.allclose(flux[inside], 2.5, rtol=1e-5)
    width = tok.wavelength * tok.dln                                   # internal pixel width, A
    assert np.allclose(ivar_int[inside], 4.0 * width[inside] / 0.8, rtol=0.02)   # ivar adds up
    assert np.all(ivar_int[tok.wavelength < 3590] == 0) and np.all(ivar_int[tok.wavelength > 9830] == 0)
    # a masked pixel gets weight 0: its flux cannot leak in
    rec2 = _copy(rec, mask=np.isin(np.arange(7781), [3000, 3001]))
    rec2.flux[3000:3002] = 1e9
    rec2.ivar[3000:3002] = 0
    flux2, _ = tok.rebin(rec2)
    assert np.allclose(flux2[inside], 2.5, rtol=1e-5)


def test_spectrum_decode_onto_another_grid(sky):
    tok = _spectrum_tok()
    sdss, desi = sky["spectrum.sdss"][:2], sky["spectrum.desi"][0]
    ids = tok.encode(sdss)
    out = tok.decode(ids, like=desi)                                   # SDSS tokens -> DESI grid
    for d in out:
        assert d.instrument == "desi" and np.array_equal(d.wavelength, desi.wavelength)
        assert d.flux.shape == desi.flux.shape and np.isfinite(d.flux).all()
        assert np.array_equal(d.resolution, desi.resolution) and not d.mask.any()
        d.validate()
    wide = np.linspace(3000.0, 11000.0, 500)                           # reaches outside 3500-10500
    tpl = Spectrum(np.zeros(500, np.float32), np.ones(500, np.float32), np.zeros(500, bool), wide,
                   "boss", np.full(500, 2000.0, np.float32), object_id="wide")
    [w] = tok.decode(ids[:1], like=tpl)
    outside = (wide < 3500) | (wide > 10500)
    assert np.array_equal(w.mask, outside) and np.all(w.ivar[outside] == 0) and np.all(w.flux[outside] == 0)
    strict = _spectrum_tok(out_of_range="error")
    with pytest.raises(RecordError, match="'wide'.*'spectrum.wavelength'"):
        strict.decode(ids[:1], like=tpl)


def test_spectrum_out_of_range_input(sky):
    rec = sky["spectrum.desi"][0]
    wl = np.concatenate([rec.wavelength, rec.wavelength[-1] + 0.8 * np.arange(1, 1001)])  # to 10624 A
    n = len(wl)
    pad = lambda a, v: np.concatenate([a, np.full(1000, v, a.dtype)])
    ext = _copy(rec, wavelength=wl, flux=pad(rec.flux, 1e4), ivar=pad(rec.ivar, 1.0),
                mask=pad(rec.mask, False), resolution=pad(rec.resolution, 5000.0))
    tok = _spectrum_tok()
    n_out = int(((wl > 10500) & ~ext.mask).sum())
    with pytest.warns(UserWarning, match=f"object '{rec.object_id}': masked {n_out} unmasked pixel.*10500"):
        ids = tok.encode(ext)
    assert tok.n_out_of_range == n_out > 0
    masked = _copy(ext, mask=ext.mask | (wl > 10500), ivar=np.where(wl > 10500, 0, ext.ivar).astype(np.float32))
    assert torch.equal(ids, tok.encode(masked))                        # out of range == masked
    strict = _spectrum_tok(out_of_range="error")
    with pytest.raises(RecordError, match=f"{rec.object_id}.*'spectrum.wavelength'.*outside"):
        strict.encode(ext)
    assert strict.encode(masked).shape == (1, 65)                     # masked pixels are fine
    in_nm = _copy(rec, wavelength=rec.wavelength / 10)                 # wrong units: nothing inside
    with pytest.raises(RecordError, match="no unmasked pixel inside"):
        tok.encode(in_nm)
    assert n == len(ext.flux)


def test_spectrum_masked_pixels_save_load_and_learning(sky, tmp_path):
    tok = _spectrum_tok()
    recs = sky["spectrum.sdss"][:4] + sky["spectrum.desi"][:4]
    rng = np.random.default_rng(0)
    extra = [r.mask | (rng.random(r.mask.shape) < 0.05) for r in recs]
    garbage = [_copy(r, mask=m, flux=np.where(m, -1e5, r.flux).astype(np.float32),
                     ivar=np.where(m, 0, r.ivar).astype(np.float32)) for r, m in zip(recs, extra)]
    kept = [_copy(g, flux=np.where(g.mask, r.flux, g.flux).astype(np.float32)) for g, r in zip(garbage, recs)]
    with torch.no_grad():
        assert float(tok.training_loss(garbage)[0]) == pytest.approx(float(tok.training_loss(kept)[0]), rel=1e-6)

    losses = adam_steps(tok, recs)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    ids = tok.encode(recs)
    tok.save(tmp_path / "spectrum")
    again = Tokenizer.from_pretrained(tmp_path / "spectrum")
    assert isinstance(again, SpectrumTokenizer) and torch.equal(again.encode(recs), ids)
    a, b = tok.decode(ids, like=recs), again.decode(ids, like=recs)
    assert all(np.array_equal(x.flux, y.flux) for x, y in zip(a, b))


def test_spectrum_resampling_conserves_flux_and_broadens_by_resolution():
    from omnisky.tokenizers.resample import gaussian_broaden, pixel_edges, resample_matrix
    tok = _spectrum_tok(n_pixels=8192, downsample=64, patch=16, channels=8, hidden=16)
    assert 3700 < tok.model_resolution < 3750                        # FWHM = 2 internal pixels
    n, rng = tok.config.n_pixels, np.random.default_rng(0)
    y = rng.normal(size=n)
    knots = np.arange(n)                                               # internal centres, pixel units
    fine = np.linspace(-0.5, n - 0.5, 40 * n + 1)
    for lo, hi, L in ((3600.0, 9824.0, 7781), (4000.0, 9000.0, 500)):    # finer and coarser than internal
        wl = np.linspace(lo, hi, L)
        A = resample_matrix(np.log(wl).tobytes(), tok.ln_min, tok.ln_max, n)
        assert np.allclose(A @ np.ones(n), 1.0)                         # a flat spectrum stays flat
        edges = (pixel_edges(np.log(wl)) - tok.ln_min) / tok.dln - 0.5  # ln-lambda mid-points, in pixels
        v = np.concatenate([[edges[0]], fine[(fine > edges[0]) & (fine < edges[-1])], [edges[-1]]])
        integral = np.trapezoid(np.interp(v, knots, y), v)              # the integral is conserved
        assert (A @ y) @ np.diff(edges) == pytest.approx(integral, rel=1e-4, abs=1e-3)
    line = np.zeros((1, 512)); line[0, 256] = 1.0                      # a line broadened by sigma = 3 px
    b = gaussian_broaden(torch.tensor(line), torch.full((1, 512), 3.0))[0].numpy()
    x = np.arange(512) - 256
    assert b.sum() == pytest.approx(1.0, rel=1e-6) and (b * x ** 2).sum() == pytest.approx(9.0, rel=1e-3)
    # the same tokens decoded at R = 1500 and DESI-like R = 5000: same flux, softer lines at 1500
    wl = 3600.0 + 0.8 * np.arange(7781)
    rec = Spectrum((1 + 0.3 * rng.normal(size=7781)).astype(np.float32), np.full(7781, 4.0, np.float32),
                   np.zeros(7781, bool), wl, "desi", np.full(7781, 5000.0, np.float32), object_id="x")
    ids = tok.encode(rec)
    [sharp] = tok.decode(ids, like=rec)
    [soft] = tok.decode(ids, like=_copy(rec, resolution=np.full(7781, 1500.0, np.float32)))
    assert tok.line_spread_px(np.array([1500.0]))[0] > 1.5 and tok.line_spread_px(np.array([9000.0]))[0] == 0
    assert soft.flux.sum() == pytest.approx(sharp.flux.sum(), rel=1e-3)
    assert np.diff(soft.flux).std() < 0.8 * np.diff(sharp.flux).std()


def test_spectrum_blind_spot_and_chi2_against_truth(sky):
    recs = sky["spectrum.sdss"][:2] + sky["spectrum.desi"][:2]
    plain, blind = _spectrum_tok(), _spectrum_tok(blind_spot=0.5)
    with torch.no_grad():                                              # evaluation scores every pixel
        assert float(blind.training_loss(recs)[0]) == pytest.approx(float(plain.training_loss(recs)[0]), rel=1e-6)
    blind.train()
    torch.manual_seed(0)
    loss, _ = blind.training_loss(recs)                                # training scores hidden patches
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) != pytest.approx(float(plain.training_loss(recs)[0].detach()))
    blind.eval()
    chi2 = plain.reduced_chi2(recs)
    assert chi2.shape == (4,) and np.allclose(plain.reduced_chi2(recs, truth=[r.flux for r in recs]), chi2)
    assert np.all(plain.reduced_chi2(recs, truth=[np.zeros_like(r.flux) for r in recs]) != chi2)
    with pytest.raises(ValueError, match="3 truths for 4 records"):
        plain.reduced_chi2(recs, truth=[r.flux for r in recs[:3]])


# -- real data ---------------------------------------------------------------------------------
SDSS_SPECTRA = sorted((ROOT.parent / "shared" / "data" / "sdss_spectra").glob("spec-*.fits"))


def _read_sdss(path) -> Spectrum:
    """A real SDSS spec-lite file -> Spectrum (vacuum log-lambda grid; R from wdisp)."""
    from astropy.io import fits
    from omnisky.shards.schema import mask_invalid
    with fits.open(path) as h:
        d = h["COADD"].data
        wl = (10.0 ** d["loglam"]).astype(np.float64)
        flux, ivar, mask, _ = mask_invalid(np.asarray(d["flux"], np.float64), np.asarray(d["ivar"], np.float64),
                                           np.asarray(d["and_mask"]) != 0)
        wdisp = np.clip(np.asarray(d["wdisp"], np.float64), 0.3, None)  # LSF sigma, in 1e-4 dex pixels
    R = 1.0 / (2.3548 * wdisp * np.log(10) * 1e-4)
    return Spectrum(flux, ivar, mask, wl, "sdss", R.astype(np.float32), object_id=path.stem).validate()


@pytest.mark.skipif(not SDSS_SPECTRA, reason="../shared/data/sdss_spectra is absent")
def test_spectrum_real_sdss_round_trip():
    tok = _spectrum_tok()
    recs = [_read_sdss(p) for p in SDSS_SPECTRA]
    ids = tok.encode(recs)
    assert ids.shape == (len(recs), 65) and int(ids.max()) < tok.vocab_size
    scale = tok.scale_value(ids[:, 0].numpy())
    for r, s in zip(recs, scale):                                      # the scale token is the flux level
        ok = ~r.mask
        assert 0.5 < s / np.median(np.abs(r.flux[ok])) < 2.0, (r.object_id, s)
    wl = 3600.0 + 0.8 * np.arange(7781)                                # decode onto a DESI grid
    tpl = Spectrum(np.zeros_like(wl, np.float32), np.ones_like(wl, np.float32), np.zeros(wl.shape, bool),
                   wl, "desi", np.full(wl.shape, 4000.0, np.float32), object_id="desi-grid")
    for d in tok.decode(ids, like=tpl):
        assert np.array_equal(d.wavelength, wl) and np.isfinite(d.flux).all()


def test_block_photometry_sees_a_faint_offset_the_pixel_chi2_misses():
    from omnisky.tokenizers.image import block_photometry_chi2
    g = torch.Generator().manual_seed(0)
    B, C, S = 64, 2, 32
    truth = torch.zeros(B, C, S, S)
    truth[..., 12:20, 12:20] = 50.0                                   # a bright core
    ivar = torch.full((B, C, S, S), 4.0)                              # sigma 0.5
    good = torch.ones(B, C, S, S, dtype=torch.bool)
    good[0, :, :4] = False                                            # some masked pixels
    obs = truth + torch.randn(B, C, S, S, generator=g) * 0.5
    # the truth as the reconstruction: each side's chi-square is the noise's, ~1
    noise = block_photometry_chi2(truth, obs, ivar, good, (4, 32), floor=0.0)
    assert 0.8 < float(noise) < 1.2
    assert float(block_photometry_chi2(obs, obs, ivar, good, (4, 32), floor=0.0)) == 0.0
    # an offset of 0.1 sigma everywhere: pixel chi2 up by 0.01, the stamp sums by ~1024 x 0.01
    offset = truth + 0.05
    pixel = float((ivar * (offset - obs) ** 2)[good].mean() - (ivar * (truth - obs) ** 2)[good].mean())
    whole = float(block_photometry_chi2(offset, obs, ivar, good, (32,), floor=0.0))
    assert pixel < 0.02 and whole > 8
    # masked pixels do not count: garbage under the mask changes nothing
    messy = offset.clone()
    messy[~good] = 1e6
    assert float(block_photometry_chi2(messy, obs, ivar, good, (4, 32), 0.0)) == pytest.approx(
        float(block_photometry_chi2(offset, obs, ivar, good, (4, 32), 0.0)))
    # the floor: a 5% error on the core's four blocks costs ~400 each without it, ~1 with
    # a 5% floor (the other 60 blocks hold noise, ~1)
    bright = truth * 1.05
    capped = float(block_photometry_chi2(bright, obs, ivar, good, (4,), floor=0.05))
    uncapped = float(block_photometry_chi2(bright, obs, ivar, good, (4,), floor=0.0))
    assert uncapped > 10 * capped and capped < 1.5


def test_image_loss_with_photometry_term(sky):
    recs = sky["image.des"][:2] + sky["image.hsc"][:2]
    torch.manual_seed(0)
    plain = _image_tok()
    torch.manual_seed(0)
    phot = _image_tok(photometry_weight=1.0)
    loss0, m0 = plain.training_loss(recs)
    loss1, m1 = phot.training_loss(recs)
    assert "photometry" not in m0 and m1["photometry"] > 0
    assert float(loss1.detach()) == pytest.approx(float(loss0.detach()) + m1["photometry"], rel=1e-5)
    loss1.backward()
    assert all(torch.isfinite(p.grad).all() for p in phot.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="photometry_blocks"):
        _image_tok(photometry_blocks=(5,))


def test_neighbour_weights_take_away_the_upward_pull_on_faint_light():
    """The x-space weight ivar_sb (s^2 + sb^2) taken from a pixel's own noisy sb favours its
    upward fluctuations: on a faint positive plane the weighted fit of x comes out high.
    From the mean of its 8 neighbours (independent noise) it does not."""
    from omnisky.tokenizers.image import neighbour_mean
    sb = torch.arange(16.0).reshape(1, 1, 4, 4)
    good = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    good[0, 0, 0, 1] = False
    nb = neighbour_mean(sb, good)
    assert float(nb[0, 0, 0, 0]) == pytest.approx((4 + 5) / 2)            # corner: pixel 1 masked
    assert float(nb[0, 0, 1, 1]) == pytest.approx((0 + 2 + 4 + 6 + 8 + 9 + 10) / 7)
    g = torch.Generator().manual_seed(0)
    s, truth = 1.0, 0.3                                                   # softening = sigma; 0.3 sigma of light
    obs = truth + torch.randn(64, 1, 32, 32, generator=g)
    x = torch.asinh(obs / s)
    good = torch.ones_like(obs, dtype=torch.bool)
    fit = lambda w: float((w * x).sum() / w.sum())                        # the weighted least-squares constant
    plain = float(x.mean())
    own, neighbours = fit(s ** 2 + obs ** 2), fit(s ** 2 + neighbour_mean(obs, good) ** 2)
    assert own - plain > 0.05                                             # pulled up
    assert abs(neighbours - plain) < 0.01


@pytest.mark.parametrize("weights_from", ["data", "neighbours"])
def test_flux_residual_fits_faint_light_without_bias(weights_from):
    """Faint light (S/N 2 per pixel, where arcsinh bends): the best constant reconstruction
    under the 'flux' residual is the true surface brightness; under the 'asinh' residual it
    is E[asinh(noisy)] (Jensen), plus the upward pull of the data weights. Fitted by
    gradient descent through the tokenizer's own pixel_chi2."""
    g = np.random.default_rng(0)
    s, sigma, truth = 0.05, 0.05, 0.1                                       # nmgy/arcsec^2; pixel_scale 1, zp 22.5
    flux = (truth + sigma * g.standard_normal((4, 32, 32))).astype(np.float32)
    rec = Image(flux=flux, ivar=np.full_like(flux, sigma ** -2), mask=np.zeros(flux.shape, bool),
                bands=("des.g", "des.r", "des.i", "des.z"), pixel_scale=1.0, survey="des", zero_point=22.5,
                psf_fwhm=np.ones(4, np.float32), object_id="faint")
    fitted = {}
    for residual in ("asinh", "flux"):
        tok = _image_tok(residual=residual, weights_from=weights_from, softening=s)
        batch = tok._prepare([rec])
        c = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([c], lr=0.05)
        for _ in range(400):
            opt.zero_grad()
            tok.pixel_chi2(c.expand_as(batch["x"]), batch).backward()
            opt.step()
        fitted[residual] = s * float(torch.sinh(c.detach()))                # the fitted surface brightness
    assert fitted["flux"] == pytest.approx(flux.mean(), rel=0.02)           # the data's mean: unbiased
    assert abs(fitted["asinh"] - truth) > 0.05 * truth                      # biased by > 5%
    with pytest.raises(ValueError, match="residual"):
        _image_tok(residual="log")
