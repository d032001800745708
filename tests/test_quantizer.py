"""tokenizers.quantizer: the FSQ code-usage entropy term (off by default)."""
from __future__ import annotations

import pytest
import torch

from omnisky.tokenizers.quantizer import FSQuantizer, make_quantizer

LEVELS = (8, 5, 5, 5)


def test_soft_assignments_peak_on_fsqs_own_codes():
    """Each channel's softmax over its levels peaks where FSQ rounds it: the term scores the
    codes FSQ emits."""
    q = FSQuantizer(LEVELS, entropy_weight=1.0, temperature=0.05)
    z = torch.randn(3, 4, 6, 6) * 2
    _, ids, _ = q(z)                                                          # (3, 36)
    x = z.permute(0, 2, 3, 1).reshape(-1, 4)
    basis, code = 1, torch.zeros(len(x), dtype=torch.long)
    for c, l in enumerate(LEVELS):
        half_l = (l - 1) * (1 + 1e-3) / 2
        offset = 0.5 if l % 2 == 0 else 0.0
        b = torch.tanh(x[:, c] + torch.atanh(torch.tensor(offset / half_l))) * half_l - offset
        p = torch.softmax(-(b[:, None] - (torch.arange(l) - l // 2)) ** 2 / 0.05, -1)
        code += p.argmax(-1) * basis
        basis *= l
    assert torch.equal(code, ids.reshape(-1))


def test_usage_term_prefers_a_spread_batch_and_is_off_by_default():
    q = FSQuantizer(LEVELS, entropy_weight=0.1).train()
    collapsed = torch.zeros(2, 4, 8, 8) + 0.3                                # every token one code
    spread = torch.randn(2, 4, 8, 8) * 2
    assert q(collapsed)[2] > q(spread)[2] + 0.3
    z = collapsed.clone().requires_grad_(True)
    q(z)[2].backward()
    assert z.grad.abs().sum() > 0                                             # it pushes the latents
    assert q.eval()(spread)[2] == 0                                           # training only
    assert FSQuantizer(LEVELS).train()(spread)[2] == 0 and make_quantizer("fsq", LEVELS, 10)(spread)[2] == 0
    with pytest.raises(ValueError, match="entropy_weight"):
        FSQuantizer(LEVELS, entropy_weight=-1)


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_expected_codes_are_the_probability_weighted_mean_code(kind):
    """One-hot probabilities give back each id's own code; a mixture gives the mixture of codes."""
    q = make_quantizer(kind, LEVELS, bits=6)
    V, grid = q.vocab_size, (2, 3)
    ids = torch.randint(0, V, (2, 6))
    one_hot = torch.nn.functional.one_hot(ids, V).float()                    # (2, 6, V)
    torch.testing.assert_close(q.expected_codes(one_hot, grid), q.codes(ids, grid))
    other = torch.randint(0, V, (2, 6))
    mix = 0.25 * one_hot + 0.75 * torch.nn.functional.one_hot(other, V).float()
    torch.testing.assert_close(q.expected_codes(mix, grid), 0.25 * q.codes(ids, grid) + 0.75 * q.codes(other, grid))
    with pytest.raises(ValueError, match=r"expected probs \(B, 6"):
        q.expected_codes(one_hot[:, :5], grid)
