"""Emission-line tokens (tokenizers/lines.py): the matching pursuit finds lines where they
are and not where they are not, and the tokens round trip. Synthetic residuals, CPU,
seconds. The spectrum tokenizer with line slots: test_tokenizer_models.py."""
from __future__ import annotations

import math

import pytest
import torch

from omnisky.tokenizers.lines import C_KMS, FINE, SUB, LineCodec, Lines

N = 2048
DLN = math.log(3.0) / N                                      # the tiny grid's d ln lambda


def gaussian(q: float, area: float, sigma: float, n: int = N) -> torch.Tensor:
    """(n,) a Gaussian line of `area` centred at q, integrated over pixels [k - 1/2, k + 1/2]."""
    x = torch.arange(n).double()
    cdf = lambda u: 0.5 * (1 + torch.erf(u / (math.sqrt(2) * sigma)))
    return (area * (cdf(x + 0.5 - q) - cdf(x - 0.5 - q))).float()


def test_fit_finds_lines_and_ignores_a_smooth_continuum_error():
    g = torch.Generator().manual_seed(0)
    codec = LineCodec(N, DLN, slots=6, vocab=1000, min_snr=5.0)
    lsf = torch.full((2, N), 0.4)                            # the instrument's line spread, internal px
    s_v = 300.0 / C_KMS / DLN                                # a 300 km/s line
    s_obs = math.hypot(s_v, 0.4)
    x = torch.arange(N).float()
    smooth = 0.3 * torch.sin(x / 90.0)                        # a continuum error of 3 sigma per pixel
    noise = 0.1 * torch.randn(2, N, generator=g)             # w = 100
    resid = smooth + noise
    resid[0] += gaussian(500.5, 20.0, s_obs) + gaussian(1200.0, 5.0, s_obs)   # S/N ~ 75 and ~ 20
    pos, amp, width = codec.fit(resid, torch.full((2, N), 100.0), lsf)
    found = pos[0][pos[0] >= 0].float() / SUB
    assert found.tolist() == pytest.approx([500.5, 1200.0], abs=0.25)            # blue to red
    assert amp[0][:2].tolist() == pytest.approx([20.0, 5.0], rel=0.1)
    assert codec.sigma_v[width[0, 0]].item() == pytest.approx(300.0, rel=0.2)   # its velocity dispersion
    assert bool((pos[0, 2:] == -1).all()) and bool((pos[1] == -1).all())        # nothing else, nothing in row 1
    assert float(amp[0, 2:].abs().sum()) == 0.0


def test_fit_rarely_reports_noise_and_weight_zero_is_no_data():
    codec = LineCodec(N, DLN, slots=4, vocab=1000, min_snr=5.0)
    noise = torch.randn(200, N, generator=torch.Generator().manual_seed(1))
    pos = codec.fit(noise, torch.ones(200, N), torch.zeros(200, N)).pos
    assert int((pos >= 0).sum()) <= 2                                           # ~1e-3 per spectrum expected
    line = gaussian(800.0, 50.0, 0.3)[None]
    w = torch.ones(1, N)
    w[:, 790:811] = 0                                                           # the line falls in a gap
    pos = codec.fit(line * (w > 0), w, torch.full((1, N), 0.3)).pos
    assert bool((pos == -1).all())


def test_tokens_round_trip_within_a_flux_bin_and_obey_allowed():
    codec = LineCodec(N, DLN, slots=3, vocab=1000, amp_bins=125, log_amp_min=-2.0, log_amp_max=3.0)
    pos = torch.tensor([[17, 4095, -1], [8000, -1, -1]])
    amp = torch.tensor([[0.5, 300.0, 0.0], [7.0, 0.0, 0.0]])
    width = torch.tensor([[3, 15, 0], [0, 0, 0]])
    ids = codec.to_tokens(Lines(pos, amp, width))
    assert ids.shape == (2, 9)
    assert ids[0, :3].tolist() == [17 // 16, (17 % 8) * 125 + int((math.log10(0.5) + 2) / 5 * 125), 3]   # 17 % 16 < 8
    assert ids[0, 5].tolist() == 16 + 15                                        # 4095 % 16 >= 8: + width_bins
    assert ids[0, 6:].tolist() == [codec.n_coarse, 0, 0]                        # an empty slot
    allowed = codec.allowed(1000)
    assert bool(allowed.gather(1, ids.T).all())
    assert [int(allowed[i].sum()) for i in range(3)] == [N * SUB // 16 + 1, FINE * 125, 32]
    back = codec.from_tokens(ids)
    back_pos, back_amp = back.pos, back.amp
    assert torch.equal(back_pos, pos) and torch.equal(back.width, width)
    ok = pos >= 0
    assert torch.allclose(torch.log10(back_amp[ok]), torch.log10(amp[ok]), atol=5 / 125)   # one 0.04-dex bin
    assert float(back_amp[~ok].abs().sum()) == 0.0
    edges = torch.arange(N + 1).float() - 0.5                                    # the internal pixels
    y = codec.render(back.row(1), edges, torch.full((3,), 0.3))
    assert y.shape == (N,) and float(y.sum()) == pytest.approx(float(back_amp[1, 0]), rel=1e-4)   # area kept
    assert int(y.argmax()) == 2000 and float(y[1990:2011].sum()) == pytest.approx(float(y.sum()), rel=1e-6)
    fine = torch.linspace(1999.0, 2001.0, 81)                                   # a finer grid, a wider line
    y2 = codec.render(back.row(1), fine, torch.full((3,), 0.2))
    assert float((y2 * fine.diff()).sum()) == pytest.approx(float(back_amp[1, 0]), rel=1e-3)
    with pytest.raises(ValueError, match="vocab is 300"):
        LineCodec(N, DLN, slots=2, vocab=300)


def test_fit_does_not_depend_on_the_batch():
    codec = LineCodec(N, DLN, slots=3, vocab=1000, min_snr=4.0)
    g = torch.Generator().manual_seed(2)
    resid = 0.1 * torch.randn(3, N, generator=g)
    resid[0] += gaussian(300.25, 4.0, 0.7)
    resid[2] += gaussian(1500.0, 9.0, 2.5)
    lsf = torch.tensor([0.2, 0.5, 3.0])[:, None].expand(3, N)              # very different line spreads
    together = codec.fit(resid, torch.full((3, N), 100.0), lsf)
    for b in range(3):
        alone = codec.fit(resid[b:b + 1], torch.full((1, N), 100.0), lsf[b:b + 1])
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(together, alone))
    assert int((together.pos >= 0).sum()) >= 2
