"""The image tokenizer's point-source tokens (tokenizers.point_source): fit, tokens, drawing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from omnisky.shards.render import IMAGING, Profile, add_noise, render
from omnisky.shards.schema import Image
from omnisky.tokenizers.image import ImageConfig, ImageTokenizer
from omnisky.tokenizers.point_source import PointSource, anchor_matrix, moffat_stamps

ANCHORS = (4800.0, 6300.0, 7800.0, 9000.0, 9800.0)


def _observe(survey: str, flux_mag: np.ndarray, r_e: float, offset=(0.05, -0.08), seed: int = 0,
             depth: float = 1.0) -> tuple[Image, np.ndarray]:
    """A 32x32 Image of one object: a point source (r_e = 0) or an exponential disk, through
    a single Moffat of the survey's beta and median FWHM (the tokenizer's own PSF model
    when beta matches), with noise; and its noiseless truth."""
    sv = IMAGING[survey]
    flux = 10 ** (-0.4 * (np.asarray(flux_mag) - sv_zero(survey)))
    profile = Profile(r_bulge=0.0, r_disk=r_e, q=1.0, pa=0.0, dx=offset[0], dy=offset[1])
    fwhm = np.asarray(sv.psf_fwhm, np.float64)
    truth = render(profile, np.zeros_like(flux), flux, fwhm, sv, 32, oversample=4) if r_e > 0 else \
        render(profile, flux, np.zeros_like(flux), fwhm, sv, 32, oversample=4)
    f, ivar, mask = add_noise(truth, sv, np.random.default_rng(seed), np.zeros(truth.shape, bool), depth)
    img = Image(flux=f, ivar=ivar, mask=mask, bands=tuple(sv.bands), pixel_scale=sv.pixel_scale, survey=survey,
                zero_point=sv_zero(survey), psf_fwhm=fwhm.astype(np.float32), object_id=f"{survey}-test")
    return img, truth


def sv_zero(survey: str) -> float:
    return 27.0 if survey == "hsc" else 22.5


def test_moffat_stamps_sum_to_one_and_their_gradient():
    dx, dy = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)
    fw = torch.tensor([[3.0, 4.5]], dtype=torch.float64)
    P, Px, Py = moffat_stamps(dx, dy, fw, 3.0, 96, gradient=True)
    np.testing.assert_allclose(P.sum((2, 3)).numpy(), 1.0, atol=2e-3)         # the wings beyond 48 px: < 0.2%
    h = 1e-4
    num = (moffat_stamps(dx + h, dy, fw, 3.0, 96) - moffat_stamps(dx - h, dy, fw, 3.0, 96)) / (2 * h)
    assert float((num - Px).abs().max()) < 1e-6 * float(Px.abs().max())
    win = moffat_stamps(dx, dy, fw, 3.0, 96, window=15)
    assert torch.allclose(win, P[..., 48 - 7:48 + 8, 48 - 7:48 + 8])


def test_anchor_fluxes_read_back_every_band_to_the_bin():
    """The anchors hold each band's flux at its own wavelength to half a bin (0.005 in
    arcsinh(F / 1 nmgy): 0.5% brighter than magnitude 22.5) for
    HSC-like (5 bands), DES-like (4) and Legacy-like (3) band sets and colours within 2.5
    mag from band to band (steeper ones can push an anchor out of its range); beyond the
    bands an anchor takes the nearest band's value."""
    ps = PointSource(ANCHORS)
    g = torch.Generator().manual_seed(0)
    for lam in ([4844.0, 6259, 7730, 8912, 9787], [4862.0, 6461, 7851, 9199], [4862.0, 6461, 9199]):
        B, C = 32, len(lam)
        steps = 10 ** (2 * torch.rand(B, C - 1, generator=g, dtype=torch.float64) - 1)   # colours within 2.5 mag
        F = (torch.rand(B, 1, generator=g, dtype=torch.float64) * 3.5 + 0.5) * torch.cat(   # up to 4000 nmgy (mag 13.5)
            [torch.ones(B, 1, dtype=torch.float64), steps.cumprod(1)], 1)
        w = torch.tensor(lam, dtype=torch.float64).expand(B, C)
        fit = dict(flux=F, dx=torch.zeros(B, dtype=torch.float64), dy=torch.zeros(B, dtype=torch.float64),
                   is_point=torch.ones(B, dtype=torch.bool))
        ids = ps.tokens(fit, w, torch.ones(B, C, dtype=torch.bool), torch.full((B,), 0.2, dtype=torch.float64))
        assert ids.shape == (B, 7) and int(ids.min()) >= 1 and int(ids.max()) < 1000
        _, off, u = ps.values(ids)
        back = torch.sinh((anchor_matrix(w, ps.anchors) @ u[..., None])[..., 0])
        assert float((torch.asinh(back) - torch.asinh(F)).abs().max()) < 0.0051   # 0.5% of F for F >> 1 nmgy
        assert float(off.abs().max()) < 2e-3                      # offset 0 to the bin (0.0012 arcsec)
    y = torch.sinh((anchor_matrix(torch.tensor([[9787.0]], dtype=torch.float64), ps.anchors) @ u[-1:, :, None])[..., 0])
    assert abs(float(torch.asinh(y) - torch.asinh(F[-1, -1]))) < 0.0051   # Legacy z's flux carried to HSC y


def test_fit_finds_a_star_and_leaves_a_galaxy():
    """Gauss-Newton recovers a bright star's sub-pixel offset and band fluxes and calls it a
    point source; an extended disk and a faint star are not."""
    ps = PointSource(ANCHORS, beta=3.0)
    tok = ImageTokenizer(ImageConfig(ps_anchors=ANCHORS))
    mags = np.array([18.5, 17.9, 17.6, 17.5, 17.4])
    for rec, point in [(_observe("hsc", mags, 0.0)[0], True), (_observe("hsc", mags, 0.8)[0], False),
                       (_observe("hsc", mags + 7.5, 0.0)[0], False)]:
        fwhm_px, lam, pix = tok._band_geometry([rec])
        nmgy = 10 ** (-0.4 * (rec.zero_point - 22.5))
        flux = torch.from_numpy(rec.flux[None]).double() * nmgy
        fit = ps.fit(flux, torch.from_numpy(rec.ivar[None]).double() / nmgy ** 2, torch.ones_like(flux, dtype=torch.bool),
                     fwhm_px)
        assert bool(fit["is_point"][0]) == point, (rec.object_id, float(fit["unexplained"][0]), float(fit["snr2"][0]))
        if point:
            true = 10 ** (-0.4 * (mags - 22.5))
            np.testing.assert_allclose(fit["flux"][0].numpy(), true, rtol=0.02)
            np.testing.assert_allclose([float(fit["dx"][0]) * 0.168, float(fit["dy"][0]) * 0.168], [0.05, -0.08],
                                       atol=0.005)


def test_image_tokenizer_draws_the_point_source_it_tokenised():
    """With ps_anchors the tokens are scale, 7 point-source tokens, then the grid: the FM
    sees them as their own segment, off the sky grid, with ids below ps_bins. A bright
    star's tokens draw it back (decoded with and without its point-source tokens differ by
    the star, to a few percent of its peak, in every band) and the grid is left only what
    the point source did not take; a galaxy gets no point source. Decoding onto HSC-like y
    from a DES-like star draws a star there too. Out-of-range ids are refused."""
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageConfig(channels=8, hidden=16, band_dim=8, scale_bins=100, ps_anchors=ANCHORS)).eval()
    assert tok.n_tokens == 1 + 7 + 64 and tok.grid_start == 8 and tok.n_point == 7
    assert tok.code_segments == ((1, (100,)), (7, (1000,)), (64, (8, 5, 5, 5)))
    mags = np.array([18.0, 17.4, 17.1, 17.0, 16.9])
    star, truth = _observe("hsc", mags, 0.0)
    galaxy, _ = _observe("hsc", mags, 0.8)
    ids = tok.encode([star, galaxy])
    assert ids.shape == (2, 72) and int(ids[0, 1]) > 0 and torch.equal(ids[1, 1:8], torch.zeros(7, dtype=ids.dtype))
    allowed = tok.allowed_ids()
    assert not allowed[1:8, 1000:].any() and allowed[1:8, :1000].all()
    # what the grid is left with: the star's light less the drawn point source
    left = tok._prepare([star])["flux"][0].numpy()
    assert np.abs(left).max() < 0.05 * truth.max()
    no_point = ids.clone()
    no_point[:, 1:8] = 0
    with_ps, without = tok.decode(ids[:1], like=star)[0], tok.decode(no_point[:1], like=star)[0]
    drawn = with_ps.flux - without.flux
    for c in range(5):
        assert np.abs(drawn[c] - truth[c]).max() < 0.05 * truth[c].max(), c
    des_star, des_truth = _observe("des", mags[:4], 0.0)
    y_like = Image(flux=np.zeros((1, 32, 32), np.float32), ivar=np.ones((1, 32, 32), np.float32),
                   mask=np.zeros((1, 32, 32), bool), bands=("hsc.y",), pixel_scale=0.168, survey="hsc", zero_point=27.0,
                   psf_fwhm=np.array([0.69], np.float32), object_id="y")
    d_ids = tok.encode(des_star)
    d_none = d_ids.clone()
    d_none[:, 1:8] = 0
    y = tok.decode(d_ids, like=y_like)[0].flux - tok.decode(d_none, like=y_like)[0].flux
    y_flux = y.sum() * 10 ** (-0.4 * (27.0 - 22.5))
    # DES z's flux, drawn in HSC y (the DES-like star has Moffat beta 3.5, the tokenizer's PSF 3: its core fit
    # gives a flux ~3% high)
    np.testing.assert_allclose(y_flux, 10 ** (-0.4 * (mags[3] - 22.5)), rtol=0.05)
    with pytest.raises(ValueError, match="ps_anchors"):
        ImageTokenizer(ImageConfig(ps_anchors=(9000.0, 4800.0)))
    with pytest.raises(ValueError, match="ps_bins"):
        ImageTokenizer(ImageConfig(ps_anchors=ANCHORS, ps_bins=2000))
    bad = ids.clone()
    bad[0, 3] = 1000
    with pytest.raises(ValueError, match="point-source"):
        tok.decode(bad, like=[star, galaxy])
    loss, _ = tok.training_loss([star, galaxy])
    assert torch.isfinite(loss)


def test_point_source_config_saves_and_loads(tmp_path):
    from omnisky.tokenizers.base import load_tokenizer
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageConfig(channels=8, hidden=16, band_dim=8, ps_anchors=ANCHORS, ps_beta=3.5)).eval()
    tok.save(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert back.config.ps_anchors == ANCHORS and back.point_source.beta == 3.5 and back.n_tokens == 71
    star, _ = _observe("des", np.array([18.0, 17.4, 17.1, 17.0]), 0.0)
    assert torch.equal(tok.encode(star), back.encode(star))
