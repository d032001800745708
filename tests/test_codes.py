"""Code geometry (fm.codes): ids placed on their tokenizer's code grid, in the table and the FM."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vector_quantize_pytorch import FSQ

from omnisky.fm.codes import code_coordinates, code_features, n_features
from omnisky.fm.modality import ModalityTable
from omnisky.fm.model import FMConfig, FourM


def test_coordinates_follow_fsq_id_order():
    levels = (8, 5, 5, 5)
    ours = code_coordinates(levels).numpy()                                      # (1000, 4)
    fsq = FSQ(levels=list(levels))._indices_to_codes(torch.arange(1000)).float().numpy()
    assert ours.shape == fsq.shape == (1000, 4) and ours.min() == -1 and ours.max() == 1
    for axis in range(4):   # the same grid up to an increasing affine map per axis
        slope, icpt = np.polyfit(fsq[:, axis], ours[:, axis], 1)
        assert slope > 0 and np.allclose(slope * fsq[:, axis] + icpt, ours[:, axis], atol=1e-6)
    assert code_coordinates((64,))[:, 0].tolist() == pytest.approx(np.linspace(-1, 1, 64).tolist(), abs=1e-6)
    assert code_features(levels).shape == (1000, n_features(levels)) and n_features(()) == 0
    with pytest.raises(ValueError, match="levels >= 2"):
        code_coordinates((1, 4))


def test_table_states_and_checks_code_levels():
    d = {"image.a": {"vocab_size": 40, "n_tokens": 4, "token_space": "image", "code_levels": [8, 5]},
         "image.b": {"vocab_size": 40, "n_tokens": 4, "token_space": "image", "code_levels": [8, 5]},
         "scalar.z": {"vocab_size": 16, "n_tokens": 1, "code_levels": [16]},
         "scalar.w": {"vocab_size": 16, "n_tokens": 1}}
    table = ModalityTable.from_dict(d)
    assert table["image.b"].code_levels == (8, 5) and table["scalar.w"].code_levels == ()
    assert ModalityTable.from_dict(table.to_dict()) == table
    assert [(s.key, off) for s, off in table.spaces] == [("image.a", 0), ("scalar.w", 40), ("scalar.z", 56)]
    with pytest.raises(ValueError, match="product vocab_size"):
        ModalityTable.from_dict({"scalar.z": {"vocab_size": 16, "n_tokens": 1, "code_levels": [8]}})
    with pytest.raises(ValueError, match="code geometry"):
        ModalityTable.from_dict(dict(d, **{"image.b": dict(d["image.b"], code_levels=[5, 8])}))


SEGMENTED = {"spectrum.s": {"vocab_size": 40, "n_tokens": 5, "token_space": "spectrum", "code_levels": [8, 5],
                            "code_segments": [[1, [16]], [3, [8, 5]], [1, [4, 2]]]},
             "spectrum.t": {"vocab_size": 40, "n_tokens": 5, "token_space": "spectrum", "code_levels": [8, 5],
                            "code_segments": [[1, [16]], [3, [8, 5]], [1, [4, 2]]]}}


def test_code_segments_put_each_position_on_its_own_grid():
    table = ModalityTable.from_dict(SEGMENTED)
    assert table["spectrum.t"].code_segments == ((1, (16,)), (3, (8, 5)), (1, (4, 2)))
    assert ModalityTable.from_dict(table.to_dict()) == table
    plain = ModalityTable.from_dict({"image.a": {"vocab_size": 40, "n_tokens": 4, "code_levels": [8, 5]}})
    assert plain["image.a"].code_segments == ((4, (8, 5)),) and "code_segments" not in plain.to_dict()["image.a"]
    seg = lambda segs: {"spectrum.s": dict(SEGMENTED["spectrum.s"], code_segments=segs)}
    for bad in ([[1, [16]], [3, [8, 5]]], [[1, [64]], [3, [8, 5]], [1, [4, 2]]], [[1, [1, 4]], [4, [8, 5]]]):
        with pytest.raises(ValueError, match="code_segments"):
            ModalityTable.from_dict(seg(bad))
    with pytest.raises(ValueError, match="code geometry"):
        ModalityTable.from_dict(dict(SEGMENTED, **seg([[2, [16]], [2, [8, 5]], [1, [4, 2]]])))
    torch.manual_seed(0)
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table).eval()
    f16, f85, f42 = code_features((16,)), code_features((8, 5)), code_features((4, 2))
    assert model.code_in.in_features == f16.shape[1] + f85.shape[1] + f42.shape[1]
    # position 0 on the 16-bin grid, 1-3 on FSQ's, 4 on the (4, 2) grid; id 10 at 4 lies beyond it
    ids, pos = torch.tensor([3, 3, 10, 7]), torch.tensor([0, 1, 4, 4])
    mod = torch.zeros(4, dtype=torch.long)
    W, c = model.code_in.weight, [0, f16.shape[1], f16.shape[1] + f85.shape[1], model.code_in.in_features]
    code = torch.stack([W[:, c[0]:c[1]] @ f16[3], W[:, c[1]:c[2]] @ f85[3], torch.zeros(32), W[:, c[2]:c[3]] @ f42[7]])
    expect = model.tok_emb(ids) + code + model.mod_emb(mod) + model._positions(mod, pos)
    torch.testing.assert_close(model._embed_tokens(ids, mod, pos), expect)
    # logits: at position 0 the ids past the 16 bins get the head's logit alone, at 4 those past 8
    with torch.no_grad():
        model.code_out.weight.normal_()
        x = {"spectrum.s": torch.tensor([[1, 2, 3, 4, 5]])}
        out = model.logits(x, {"spectrum.t": torch.tensor([[0, 1, 4]])})["spectrum.t"][0]     # (3, 40)
        model_heads_only = model.code_out.weight.clone()
        model.code_out.weight.zero_()
        bare = model.logits(x, {"spectrum.t": torch.tensor([[0, 1, 4]])})["spectrum.t"][0]
        model.code_out.weight.copy_(model_heads_only)
    assert torch.equal(out[0, 16:], bare[0, 16:]) and not torch.allclose(out[0, :16], bare[0, :16])
    assert not torch.allclose(out[1], bare[1])
    assert torch.equal(out[2, 8:], bare[2, 8:]) and not torch.allclose(out[2, :8], bare[2, :8])


def _pair_table(levels=True):
    lv = {"code_levels": [64]} if levels else {}
    return ModalityTable.from_dict({"scalar.x": {"vocab_size": 64, "n_tokens": 1, **lv},
                                    "scalar.y": {"vocab_size": 64, "n_tokens": 1, **lv}})


def test_model_embeds_and_scores_ids_by_their_code(tmp_path):
    torch.manual_seed(0)
    table = _pair_table()
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table).eval()
    assert model.code and model.code_in.in_features == 2 * n_features((64,))
    ids = torch.tensor([3, 40])
    mod = torch.tensor([0, 0])
    expect = model.tok_emb(ids) + model.code_in(model.code_feats[ids]) + model.mod_emb(mod) + model._positions(mod, mod)
    torch.testing.assert_close(model._embed_tokens(ids, mod, mod), expect)
    # the code term of a logit: code_out(h) . features of the id, in y's own column block
    x = {"scalar.x": torch.tensor([[5]])}
    with torch.no_grad():
        logits = model.logits(x, {"scalar.y": torch.tensor([[0]])})["scalar.y"][0, 0]
        model.code_out.weight.zero_()
        assert not torch.allclose(model.logits(x, {"scalar.y": torch.tensor([[0]])})["scalar.y"][0, 0], logits)
    model.save(tmp_path / "fm")
    cfg = json.loads((tmp_path / "fm" / "config.json").read_text())
    assert cfg["modalities"]["scalar.x"]["code_levels"] == [64] and cfg["fm"]["code_geometry"] is True
    loaded = FourM.from_pretrained(tmp_path / "fm")
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x, {"scalar.y": torch.tensor([[0]])})["scalar.y"],
                                   model.logits(x, {"scalar.y": torch.tensor([[0]])})["scalar.y"], atol=0, rtol=0)
    # a model saved before code geometry (no key in its config, no code_in/out) still loads
    old = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2, code_geometry=False), table)
    old.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["fm"]["code_geometry"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert not FourM.from_pretrained(tmp_path / "old").code


def _fit_identity(model, train_ids, steps=300):
    """Train scalar.x -> scalar.y = x on `train_ids` only."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = train_ids[:, None]
    for _ in range(steps):
        logits = model.logits({"scalar.x": x}, {"scalar.y": torch.zeros_like(x)})["scalar.y"][:, 0]
        loss = F.cross_entropy(logits, train_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_code_geometry_carries_what_is_learned_to_unseen_neighbouring_codes():
    """y = x on 64 ordered bins, trained on the even bins only: with code geometry the odd
    (never seen) inputs land within a bin or two of the truth; without, they are guesses."""
    even, odd = torch.arange(0, 64, 2), torch.arange(1, 64, 2)
    errors = {}
    for geometry in (True, False):
        torch.manual_seed(0)
        model = _fit_identity(FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2, code_geometry=geometry),
                                    _pair_table()), even)
        with torch.no_grad():
            pred = model.logits({"scalar.x": odd[:, None]}, {"scalar.y": torch.zeros_like(odd)[:, None]})["scalar.y"]
        errors[geometry] = (pred[:, 0].argmax(-1) - odd).abs().float().median().item()
    assert errors[True] <= 2 and errors[False] >= 8, errors
