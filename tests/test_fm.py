"""The masked multimodal transformer: modality table, masking, attention backends, model."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from omnisky.fm.attention import get_attention
from omnisky.fm.data import MaskedTokenStream, collate, fixed_batches, make_loader
from omnisky.fm.masking import MaskingConfig, sample_masks
from omnisky.fm.modality import ModalitySpec, ModalityTable
from omnisky.config import from_dict
from omnisky.fm.model import FMConfig, FourM
from omnisky.shards.codec import encode_tokens
from omnisky.shards.writer import ShardWriter, read_manifest, shard_urls

# A tiny structured token set: an object is a latent integer z in [0, 16) that every token
# reveals (id // 2 for the images), and image.b is a fixed relabelling of image.a, so
# each modality predicts the others exactly while the marginals alone do not.
TINY = {"image.a": (32, 16), "image.b": (32, 16), "spectrum.s": (24, 12), "scalar.z": (16, 1)}


def structured_tokens(z: int, modalities=TINY) -> dict[str, np.ndarray]:
    out = {}
    for key, (vocab, n) in modalities.items():
        pos = np.arange(n)
        if key.startswith("image"):
            ids = (2 * z + pos % 2) % vocab
        else:
            ids = (z + 5 * (pos % 3) + len(key)) % vocab
        if key == "image.b":
            ids = (ids * 7 + 1) % vocab
        out[key] = ids.astype(np.int32)
    return out


def write_token_shards(directory, n_objects: int = 200, modalities=TINY, seed: int = 0,
                       max_count: int = 64, p_have: float = 0.75) -> Path:
    """Token shards + manifest as omnisky-tokenize writes them; objects hold random subsets."""
    rng = np.random.default_rng(seed)
    keys = list(modalities)
    with ShardWriter(directory, prefix="tokens", max_count=max_count, kind="tokens") as w:
        for i in range(n_objects):
            tokens = structured_tokens(int(rng.integers(16)), modalities)
            have = [k for k in keys if rng.random() < p_have] or keys[:2]
            w.write(f"obj{i:05d}", encode_tokens(f"obj{i:05d}", {k: tokens[k] for k in have}))
    manifest = read_manifest(directory)
    manifest["modalities"] = {k: {"kind": k.split(".")[0], "vocab_size": v, "n_tokens": n, "tokenizer": "test"}
                              for k, (v, n) in modalities.items()}
    (Path(directory) / "manifest.json").write_text(__import__("json").dumps(manifest, indent=1, sort_keys=True))
    return Path(directory)


def tiny_table() -> ModalityTable:
    return ModalityTable.from_dict({k: {"vocab_size": v, "n_tokens": n} for k, (v, n) in TINY.items()})


# -- modality table ---------------------------------------------------------------------
def test_modality_table_offsets_and_round_trips(tmp_path):
    table = ModalityTable.from_manifest(write_token_shards(tmp_path / "tok", n_objects=4))
    assert table.keys == sorted(TINY)
    assert table.total_vocab == sum(v for v, _ in TINY.values())
    assert table.total_positions == sum(n for _, n in TINY.values())
    offsets = [table.vocab_offset(k) for k in table.keys]
    assert offsets == [0] + list(np.cumsum([table[k].vocab_size for k in table.keys])[:-1])
    assert ModalityTable.from_json(table.to_json()) == table
    tokenizers = {k: SimpleNamespace(vocab_size=v, n_tokens=n) for k, (v, n) in TINY.items()}
    assert ModalityTable.from_tokenizers(tokenizers) == table
    with pytest.raises(KeyError, match="image.zzz"):
        table.index("image.zzz")
    with pytest.raises(ValueError, match="n_tokens"):
        ModalitySpec("image.x", 10, 0)


def test_token_spaces_share_rows_and_check_their_shapes():
    """Modalities of one shared-vocabulary tokenizer share token and position rows; others
    (the scalars' per-name bins) do not; a space with two shapes is an error; a saved
    table without spaces loads as before."""
    image, spectrum, scalar = (SimpleNamespace(vocab_size=v, n_tokens=n, kind=k, shared_vocabulary=s)
                               for v, n, k, s in ((1000, 64, "image", True), (500, 65, "spectrum", True),
                                                  (32, 1, "scalar", False)))
    table = ModalityTable.from_tokenizers({"image.des": image, "image.hsc": image, "spectrum.sdss": spectrum,
                                           "scalar.redshift": scalar, "scalar.flux_r": scalar})
    assert table.vocab_offset("image.des") == table.vocab_offset("image.hsc")
    assert table.position_offset("image.des") == table.position_offset("image.hsc")
    assert table.vocab_offset("scalar.flux_r") != table.vocab_offset("scalar.redshift")
    assert table.total_vocab == 1000 + 500 + 2 * 32 and table.total_positions == 64 + 65 + 2
    assert ModalityTable.from_json(table.to_json()) == table
    plain = {k: {"vocab_size": d["vocab_size"], "n_tokens": d["n_tokens"]} for k, d in table.to_dict().items()}
    assert ModalityTable.from_dict(plain).total_vocab == 2 * 1000 + 500 + 2 * 32
    with pytest.raises(ValueError, match="share token space 'image'"):
        ModalityTable.from_dict({"image.des": {"vocab_size": 1000, "n_tokens": 64, "token_space": "image"},
                                 "image.hsc": {"vocab_size": 1000, "n_tokens": 16, "token_space": "image"}})
    with torch.device("meta"):
        model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table)
    assert model.tok_emb.num_embeddings == table.total_vocab
    assert [h.out_features for h in model.heads] == [spec.vocab_size for spec in table]


def test_sky_positions_place_image_tokens_by_their_offset_on_the_sky():
    """3x3 cells of 1" (centres at -1, 0, 1") and 9x9 cells of 0.25" (-1, -0.75, ..., 1"):
    coarse cell (r, c) and fine cell (4r, 4c) have one sky offset, so one sky part of
    their position vectors (added to each modality's learned row);
    neighbouring cells differ; a scalar (no cell_arcsec) keeps its learned row, and with
    sky_positions off every modality does. The table round-trips cell_arcsec."""
    table = ModalityTable.from_dict({"image.a": {"vocab_size": 16, "n_tokens": 9, "cell_arcsec": 1.0},
                                     "image.b": {"vocab_size": 16, "n_tokens": 81, "cell_arcsec": 0.25},
                                     "scalar.z": {"vocab_size": 8, "n_tokens": 1}})
    assert ModalityTable.from_dict(table.to_dict()) == table and table["image.b"].grid_side == 9
    torch.manual_seed(0)
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table)
    a, b, z = (table.index(k) for k in ("image.a", "image.b", "scalar.z"))
    coarse = torch.arange(9)
    fine = (coarse // 3) * 4 * 9 + (coarse % 3) * 4
    learned = lambda m, pos: model.pos_emb(pos + table.position_offset(m))            # noqa: E731
    pa = model._positions(torch.full((9,), a), coarse) - learned("image.a", coarse)     # the sky part
    pb = model._positions(torch.full((9,), b), fine) - learned("image.b", fine)
    assert torch.allclose(pa, pb, atol=1e-6) and not torch.allclose(pa[0], pa[1])
    pz = model._positions(torch.tensor([z]), torch.tensor([0]))
    assert torch.equal(pz, model.pos_emb(torch.tensor([table.position_offset("scalar.z")])))
    off = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2, sky_positions=False), table)
    assert not off.sky and not hasattr(off, "sky_pos")
    with pytest.raises(ValueError, match="needs a square token grid"):
        ModalityTable.from_dict({"image.a": {"vocab_size": 4, "n_tokens": 12, "cell_arcsec": 1.0}})
    # a token before the grid (the image tokenizer's brightness scale) is off the sky: learned row
    # only; the grid after it is placed as without it
    scaled = ModalityTable.from_dict({"image.a": {"vocab_size": 16, "n_tokens": 10, "cell_arcsec": 1.0,
                                                  "grid_start": 1}})
    assert ModalityTable.from_dict(scaled.to_dict()) == scaled and scaled["image.a"].grid_side == 3
    torch.manual_seed(0)
    ms = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), scaled)
    xy, on_sky = ms._sky_xy(torch.zeros(10, dtype=torch.long), torch.arange(10))
    assert not on_sky[0] and on_sky[1:].all()
    torch.testing.assert_close(xy[1:], model._sky_xy(torch.full((9,), a), coarse)[0])
    p0 = ms._positions(torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(p0, ms.pos_emb(torch.tensor([0])))
    with pytest.raises(ValueError, match="grid_start"):
        ModalityTable.from_dict({"image.a": {"vocab_size": 4, "n_tokens": 10, "grid_start": 1}})


def test_sky_attention_biases_pairs_of_sky_tokens_by_their_distance(tmp_path):
    """The bias between two sky tokens is -w_h * (their sky distance)^2, whatever their
    grids; pairs with a scalar get none. In fp32 it rides in extra head channels whose
    product is that term (scores and attention equal the explicit bias's), in bf16 it is
    the bias itself; the widths start at 0.5" .. 8" over the heads, learn, and save."""
    table = ModalityTable.from_dict({"image.a": {"vocab_size": 16, "n_tokens": 9, "cell_arcsec": 1.0},
                                     "image.b": {"vocab_size": 16, "n_tokens": 81, "cell_arcsec": 0.25},
                                     "scalar.z": {"vocab_size": 8, "n_tokens": 1}})
    torch.manual_seed(0)
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2, sky_attention=True), table)
    a, b, z = (table.index(k) for k in ("image.a", "image.b", "scalar.z"))
    q_mod, q_pos = torch.tensor([[b, b, z]]), torch.tensor([[0, 40, 0]])     # b cells at (-1, -1)" and (0, 0)"
    k_mod, k_pos = torch.tensor([[a, a, z]]), torch.tensor([[0, 4, 0]])      # a cells at (-1, -1)" and (0, 0)"
    want_d2 = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    attn = model.decoder[0].cross
    w = attn.sky_log_w.exp()                                              # (H,)
    sky_q, sky_k = model._sky_tokens(q_mod, q_pos), model._sky_tokens(k_mod, k_pos)
    q, k, v = torch.randn(3, 1, 2, 3, 16).unbind(0)                      # (B, H, N, d)
    want = q @ k.transpose(-2, -1) / 4.0 - w[:, None, None] * want_d2    # (1, H, Nq, Nk)
    q2, k2, v2, bias = attn._sky_locality(q, k, v, sky_q, sky_k)         # fp32: extra head channels
    assert bias is None and q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 24
    torch.testing.assert_close(q2 @ k2.transpose(-2, -1) / 24 ** 0.5, want)
    torch.testing.assert_close(v2[..., :16], v)
    torch.testing.assert_close(v2[..., 16:], torch.zeros(1, 2, 3, 8))
    *_, bias16 = attn._sky_locality(q.bfloat16(), k.bfloat16(), v.bfloat16(), sky_q, sky_k)   # low precision: a bias
    torch.testing.assert_close(bias16.float(), (-w[:, None, None] * want_d2)[None], rtol=1e-2, atol=1e-2)
    from omnisky.fm.attention import ReferenceAttention
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, True]])[None, None]
    torch.testing.assert_close(ReferenceAttention()(q2, k2, v2, mask)[..., :16],
                               ReferenceAttention()(q, k, v, mask, -w[:, None, None] * want_d2))
    sigma = (0.5 * torch.exp(-model.decoder[0].cross.sky_log_w)) ** 0.5
    torch.testing.assert_close(sigma, torch.tensor([0.5, 8.0]))
    inputs = {"image.a": torch.randint(0, 16, (2, 9)), "scalar.z": torch.tensor([[1], [-1]])}
    out = model.logits(inputs, {"image.b": torch.arange(81)[None].expand(2, -1)})["image.b"]
    out.square().sum().backward()
    assert model.decoder[0].cross.sky_log_w.grad.abs().sum() > 0 and model.encoder[0].attn.sky_log_w.grad.abs().sum() > 0
    model.save(tmp_path / "fm")
    loaded = FourM.from_pretrained(tmp_path / "fm")
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(inputs, {"image.b": torch.arange(81)[None].expand(2, -1)})["image.b"], out)
    off = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table)
    assert off._sky_tokens(q_mod, q_pos) is None and not hasattr(off.encoder[0].attn, "sky_log_w")


# -- masking ----------------------------------------------------------------------------
@pytest.mark.parametrize("whole", [0.0, 0.5])
def test_masking_invariants(whole):
    table, rng = tiny_table(), np.random.default_rng(0)
    cfg = MaskingConfig(input_budget=20, target_budget=14, max_input_tokens={"image.a": 5}, whole_modality_prob=whole)
    for trial in range(300):
        tokens = structured_tokens(trial % 16)
        have = [k for k in TINY if rng.random() < 0.6]
        have = have if have not in ([], ["scalar.z"]) else ["scalar.z", "image.b"]
        obj = {k: tokens[k] for k in have}
        m = sample_masks(obj, table, cfg, rng)
        assert m["enc_ids"].shape == (20,) and m["dec_targets"].shape == (14,)
        enc = set(zip(m["enc_mod"][~m["enc_pad"]], m["enc_pos"][~m["enc_pad"]]))
        dec = set(zip(m["dec_mod"][~m["dec_pad"]], m["dec_pos"][~m["dec_pad"]]))
        assert len(enc) == (~m["enc_pad"]).sum() and len(dec) == (~m["dec_pad"]).sum()  # no repeats
        assert not enc & dec and enc and dec                                           # disjoint, non-empty
        present = {table.index(k) for k in have}
        assert {mod for mod, _ in enc | dec} <= present                                # only what it has
        a = table.index("image.a")
        assert sum(1 for mod, _ in enc if mod == a) <= 5                               # per-modality cap
        for prefix, ids in (("enc", m["enc_ids"]), ("dec", m["dec_targets"])):
            pad = m[f"{prefix}_pad"]
            assert not pad[:(~pad).sum()].any()                                         # padding at the end
            assert (ids[pad] == 0).all() and (m[f"{prefix}_mod"][pad] == 0).all()
            for i in np.flatnonzero(~pad):
                key = table.keys[m[f"{prefix}_mod"][i]]
                assert ids[i] == obj[key][m[f"{prefix}_pos"][i]]                        # the right token
        n_have = sum(TINY[k][1] for k in have)
        # targets fill their budget from what the inputs left
        assert (~m["dec_pad"]).sum() == min(14, n_have - len(enc))
    # same seed, same masks
    obj = structured_tokens(3)
    a, b = (sample_masks(obj, table, cfg, np.random.default_rng(7)) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_masking_min_tokens_and_dirichlet_alphas():
    table, rng = tiny_table(), np.random.default_rng(1)
    mins_in, mins_tgt, max_in = {"scalar.z": 1, "spectrum.s": 4}, {"image.b": 3, "scalar.z": 1}, {"image.a": 5}
    cfg = MaskingConfig(input_budget=20, target_budget=14, input_alphas=(0.05,), target_alphas=(0.05,),
                        min_input_tokens=mins_in, min_target_tokens=mins_tgt, max_input_tokens=max_in)
    for trial in range(300):
        have = [k for k in TINY if rng.random() < 0.6] or ["image.a", "scalar.z"]
        have = have if have != ["scalar.z"] else ["scalar.z", "image.b"]
        m = sample_masks({k: structured_tokens(trial % 16)[k] for k in have}, table, cfg, rng)
        n_enc = {k: int(((m["enc_mod"] == table.index(k)) & ~m["enc_pad"]).sum()) for k in TINY}
        n_dec = {k: int(((m["dec_mod"] == table.index(k)) & ~m["dec_pad"]).sum()) for k in TINY}
        for k in TINY:
            if k not in have:
                assert n_enc[k] == n_dec[k] == 0                          # only what the object has
                continue
            assert n_enc[k] <= max_in.get(k, TINY[k][1])
            if (~m["dec_pad"]).sum() > 1:      # (a lone target may have been given back by an input)
                assert n_enc[k] >= min(mins_in.get(k, 0), TINY[k][1])
            assert n_dec[k] >= min(mins_tgt.get(k, 0), TINY[k][1] - n_enc[k])   # as far as tokens are left
    # a small alpha puts most of the input budget on one modality, a large one spreads it
    shares = {}
    for alpha in (0.05, 50.0):
        c = MaskingConfig(input_budget=8, target_budget=8, input_alphas=(alpha,))
        top = []
        for z in range(200):
            enc = sample_masks({k: structured_tokens(z % 16)[k] for k in ("image.a", "image.b", "spectrum.s")},
                               table, c, rng)
            counts = np.bincount(enc["enc_mod"][~enc["enc_pad"]], minlength=len(table))
            top.append(counts.max() / counts.sum())
        shares[alpha] = float(np.mean(top))
    assert shares[0.05] > 0.9 and shares[50.0] < 0.6, shares
    with pytest.raises(ValueError, match="min_input_tokens sum to 30, more than the input_budget 20"):
        MaskingConfig(20, 14, min_input_tokens={"image.a": 15, "image.b": 15})
    with pytest.raises(ValueError, match="min_target_tokens exceed max_target_tokens"):
        MaskingConfig(20, 14, min_target_tokens={"image.a": 6}, max_target_tokens={"image.a": 5})
    with pytest.raises(ValueError, match=r"min_input_tokens: unknown modalities \['image.zzz'\]"):
        sample_masks(structured_tokens(0), table, MaskingConfig(20, 14, min_input_tokens={"image.zzz": 1}), rng)


def test_whole_modality_masking_gives_whole_modalities_as_inputs():
    """whole_modality_prob=1: each modality is an input whole (up to its cap) or not at all,
    at least one and never all of the object's modalities; the inputs get no targets; over
    many objects every number of input modalities from 1 to M - 1 occurs."""
    table, rng = tiny_table(), np.random.default_rng(3)
    cfg = MaskingConfig(input_budget=20, target_budget=14, max_input_tokens={"image.a": 5}, whole_modality_prob=1.0)
    n_inputs = set()
    for trial in range(300):
        have = [k for k in TINY if rng.random() < 0.7]
        have = have if len(have) >= 2 else ["image.a", "scalar.z"]
        m = sample_masks({k: structured_tokens(trial % 16)[k] for k in have}, table, cfg, rng)
        n_enc = {k: int(((m["enc_mod"] == table.index(k)) & ~m["enc_pad"]).sum()) for k in have}
        n_dec = {k: int(((m["dec_mod"] == table.index(k)) & ~m["dec_pad"]).sum()) for k in have}
        whole = {k: cfg.max_input_tokens.get(k, TINY[k][1]) for k in have}
        assert all(n_enc[k] in (0, whole[k]) for k in have), (n_enc, whole)
        used = [k for k in have if n_enc[k]]
        assert 1 <= len(used) < len(have) and sum(n_enc.values()) <= 20
        assert all(n_dec[k] == 0 for k in used if whole[k] == TINY[k][1])      # a whole input has no targets left
        n_inputs.add(len(used))
    assert n_inputs == {1, 2, 3}, n_inputs
    with pytest.raises(ValueError, match="whole_modality_prob must be in"):
        MaskingConfig(20, 14, whole_modality_prob=1.5)


def test_task_masks_give_the_task_and_fall_back_to_dirichlet():
    """A task mask gives its inputs whole (in order, as the budget holds them) and targets
    only its targets; objects that lack a task's modality, and the remaining probability,
    get the Dirichlet masks. Over many objects each task's share is its probability."""
    from omnisky.config import ConfigError
    table, rng = tiny_table(), np.random.default_rng(5)
    cfg = from_dict(MaskingConfig, dict(input_budget=20, target_budget=14, tasks=[
        dict(inputs=["image.a"], targets=["image.b"], prob=0.5),
        dict(inputs=["image.b", "scalar.z"], targets=["image.a", "spectrum.s"], prob=0.25)]))
    counts = {"a->b": 0, "b,z->a,s": 0, "other": 0}
    for trial in range(800):
        have = list(TINY) if trial % 4 else ["image.a", "scalar.z", "spectrum.s"]   # 1 in 4 lacks image.b
        m = sample_masks({k: structured_tokens(trial % 16)[k] for k in have}, table, cfg, rng)
        n_enc = {k: int(((m["enc_mod"] == table.index(k)) & ~m["enc_pad"]).sum()) for k in TINY}
        n_dec = {k: int(((m["dec_mod"] == table.index(k)) & ~m["dec_pad"]).sum()) for k in TINY}
        enc_keys = {k for k, v in n_enc.items() if v}
        dec_keys = {k for k, v in n_dec.items() if v}
        if enc_keys == {"image.a"} and dec_keys == {"image.b"} and n_enc["image.a"] == TINY["image.a"][1]:
            assert n_dec["image.b"] == min(14, TINY["image.b"][1])
            counts["a->b"] += 1
        elif enc_keys == {"image.b", "scalar.z"} and dec_keys <= {"image.a", "spectrum.s"} \
                and n_enc["image.b"] == TINY["image.b"][1]:
            assert sum(n_dec.values()) == 14            # the targets fill the budget
            counts["b,z->a,s"] += 1
        elif "image.b" in have:
            counts["other"] += 1
        if "image.b" not in have:                         # no task fits: a Dirichlet mask over what it has
            assert enc_keys and dec_keys and (enc_keys | dec_keys) <= set(have)
    with_b = 600
    assert abs(counts["a->b"] / with_b - 0.5) < 0.07 and abs(counts["b,z->a,s"] / with_b - 0.25) < 0.06, counts
    assert abs(counts["other"] / with_b - 0.25) < 0.06, counts
    with pytest.raises(ConfigError, match=r"tasks\[0\]: unknown key"):
        from_dict(MaskingConfig, dict(tasks=[dict(inputs=["image.a"], target=["image.b"], prob=0.1)]))
    with pytest.raises(ValueError, match="sum to"):
        MaskingConfig(tasks=[dict(inputs=["image.a"], targets=["image.b"], prob=0.7)] * 2)
    with pytest.raises(ValueError, match="disjoint"):
        MaskingConfig(tasks=[dict(inputs=["image.a"], targets=["image.a"], prob=0.1)])
    with pytest.raises(ValueError, match="unknown modalities"):
        sample_masks(structured_tokens(0), table, MaskingConfig(tasks=[dict(inputs=["image.zzz"], targets=["image.a"],
                                                                             prob=0.1)]), rng)


def test_masking_rejects_bad_objects():
    table, rng, cfg = tiny_table(), np.random.default_rng(0), MaskingConfig(8, 8)
    with pytest.raises(ValueError, match=r"obj42: needs at least 2 tokens.*scalar.z"):
        sample_masks({"scalar.z": np.array([3])}, table, cfg, rng, where="obj42")
    with pytest.raises(ValueError, match="obj7: image.a: token ids must be in"):
        sample_masks({"image.a": np.full(16, 32)}, table, cfg, rng, where="obj7")
    with pytest.raises(ValueError, match="image.a: expected 16 tokens"):
        sample_masks({"image.a": np.zeros(15, int)}, table, cfg, rng)


def test_stream_skips_tiny_objects_and_collates(tmp_path):
    d = tmp_path / "tok"
    with ShardWriter(d, prefix="tokens", kind="tokens") as w:
        w.write("solo", encode_tokens("solo", {"scalar.z": np.array([1])}))
        for i in range(5):
            w.write(f"o{i}", encode_tokens(f"o{i}", structured_tokens(i)))
    table, cfg = tiny_table(), MaskingConfig(16, 16)
    with pytest.warns(UserWarning, match="skipping object 'solo'"):
        batches = fixed_batches(shard_urls(d), table, cfg, batch_size=2, n_batches=10)
    assert [b["enc_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    ds = MaskedTokenStream(shard_urls(d), table, cfg, seed=0)
    with pytest.warns(UserWarning, match="skipping object 'solo'"):
        it = iter(make_loader(ds, batch_size=4, num_workers=0))
        batches = [next(it) for _ in range(3)]
    assert batches[0]["dec_targets"].shape == (4, 16) and batches[0]["enc_pad"].dtype == torch.bool
    assert ds.counter["skipped"] >= 1


# -- attention backends -----------------------------------------------------------------
def attention_cases(device="cpu"):
    """(name, q, k, v, mask) with the masks the model makes: random with a query row and a
    whole object that may attend to nothing; key padding with an object of no inputs; the
    decoder's within-modality mask with padding queries."""
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Nk, D = 3, 2, 7, 9, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
    rand = torch.rand(B, 1, Nq, Nk, generator=g) > 0.4
    rand[0, :, 2] = False            # one query row that may attend to nothing
    rand[1] = False                  # an object with no keys at all
    pad = torch.zeros(B, Nk, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2] = True                    # an object with no input tokens
    keys = ~pad[:, None, None, :]                                           # (B, 1, 1, Nk)
    mod = torch.tensor([[0, 0, 1, 1, 1, 2, 0], [1, 1, 1, 1, 2, 2, 2], [0, 2, 2, 2, 2, 2, 2]])
    dpad = torch.zeros(B, Nq, dtype=torch.bool)
    dpad[0, 5:] = True               # padding queries
    within = ((mod[:, :, None] == mod[:, None, :]) & ~dpad[:, None, :])[:, None]   # (B, 1, Nq, Nq)
    qd = torch.randn(B, H, Nq, D, generator=g)
    cases = [("random", q, k, v, rand), ("key_padding", q, k, v, keys), ("within_modality", qd, qd, qd, within),
             ("no_mask", q, k, v, None)]
    return [(name, *(t.to(device) for t in (a, b, c)), None if m is None else m.to(device))
            for name, a, b, c, m in cases]


def attend_with_grads(name, q, k, v, mask, bias=None):
    """Output and gradients of q, k, v (and the bias, if given) of backend `name` (grads of
    a loss that weights every output element differently)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    wrt = (q, k, v)
    if bias is not None:
        bias = bias.clone().requires_grad_()
        wrt = wrt + (bias,)
    out = get_attention(name)(q, k, v, mask, bias)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    grads = torch.autograd.grad((out * w).sum() + out.square().sum(), wrt)
    return out.detach(), grads


def score_bias(q, k):
    """A float bias (B, H, Nq, Nk) like the sky attention's: -w_h * distance^2."""
    g = torch.Generator().manual_seed(1)
    d2 = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=g) * 4
    return (-torch.tensor([0.5, 2.0])[:, None, None] * d2).to(q.device)


def test_attention_backends_agree_with_padding_and_fully_masked_rows():
    for case, q, k, v, mask in attention_cases():
        ref_out, ref_grads = attend_with_grads("reference", q, k, v, mask)
        out, grads = attend_with_grads("sdpa", q, k, v, mask)
        assert out.shape == q.shape and torch.isfinite(out).all(), case
        assert all(torch.isfinite(g).all() for g in grads), case
        if mask is not None:         # rows that may attend to nothing give zeros, in every backend
            dead = ~mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).any(-1)   # (B, H, Nq)
            assert (out[dead] == 0).all() and (ref_out[dead] == 0).all() and (grads[0][dead] == 0).all(), case
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=case)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=case)


def test_attention_backends_agree_with_a_score_bias():
    for case, q, k, v, mask in attention_cases():
        bias = score_bias(q, k)
        ref_out, ref_grads = attend_with_grads("reference", q, k, v, mask, bias)
        out, grads = attend_with_grads("sdpa", q, k, v, mask, bias)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), case
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=case)
        for g, rg in zip(grads, ref_grads):      # q, k, v and the bias
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=case)
        plain, _ = attend_with_grads("reference", q, k, v, mask)
        assert not torch.allclose(plain, ref_out), case


def test_sdpa_attends_bf16_in_fp32_on_cpu():
    """bf16 inputs on a CPU: attended in fp32 (the CPU flash kernel's bf16 backward is the slow
    part), so the output is the fp32 reference's rounded to bf16, gradients flow in bf16, and
    dead rows stay zero."""
    for case, q, k, v, mask in attention_cases():
        ref_out, _ = attend_with_grads("reference", q, k, v, mask)
        qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        out = get_attention("sdpa")(qb, kb, vb, mask)
        assert out.dtype == torch.bfloat16, case
        exact, _ = attend_with_grads("reference", *(t.detach().float() for t in (qb, kb, vb)), mask)
        torch.testing.assert_close(out.float(), exact, atol=2e-3, rtol=8e-3, msg=case)   # one bf16 rounding
        torch.testing.assert_close(out.float(), ref_out, atol=0.05, rtol=0.05, msg=case)
        out.float().square().sum().backward()
        assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all(), case
    with torch.autocast("cpu", dtype=torch.bfloat16):     # inside autocast too
        case, q, k, v, mask = attention_cases()[0]
        assert get_attention("sdpa")(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).dtype == torch.bfloat16


def test_xformers_backend():
    if not torch.cuda.is_available():
        try:
            attend = get_attention("xformers")
        except ImportError:
            pytest.skip("xformers not importable")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            attend(*(torch.randn(1, 1, 4, 8) for _ in range(3)), None)
        pytest.skip("xformers numerics need a GPU")
    for case, q, k, v, mask in attention_cases("cuda"):
        ref_out, ref_grads = attend_with_grads("reference", q, k, v, mask)
        out, grads = attend_with_grads("xformers", q, k, v, mask)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), case
        torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3, msg=case)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=2e-3, rtol=2e-3, msg=case)
        bias = score_bias(q, k)
        ref_out, ref_grads = attend_with_grads("reference", q, k, v, mask, bias)
        out, grads = attend_with_grads("xformers", q, k, v, mask, bias)
        torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3, msg=case)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=2e-3, rtol=2e-3, msg=case)


# -- the model --------------------------------------------------------------------------
def small_model(table, **kw) -> FourM:
    torch.manual_seed(0)
    return FourM(FMConfig(**{"dim": 64, "enc_depth": 2, "dec_depth": 2, "heads": 4, **kw}), table)


def train_structured(directory, steps: int = 200):
    """A small FM trained on structured token shards written to `directory`:
    AdamW 3e-3 with a 20-step warmup (warmup matters: 2 of 4 seeds fail without it).
    Returns (model, table, per-step losses)."""
    torch.set_num_threads(1)
    d = write_token_shards(directory, n_objects=200)
    table = ModalityTable.from_manifest(d)
    model = small_model(table)
    cfg = MaskingConfig(input_budget=24, target_budget=24, seed=1)
    loader = make_loader(MaskedTokenStream(shard_urls(d), table, cfg, seed=0), batch_size=32, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    losses = []
    for step, batch in zip(range(steps), loader):
        loss, parts = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
        losses.append(loss.item())
    return model, table, losses


def test_model_overfits_structured_tokens(tmp_path):
    model, table, losses = train_structured(tmp_path / "tok")
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    mean_log_vocab = np.mean([math.log(v) for v, _ in TINY.values()])
    assert first > 0.8 * mean_log_vocab          # starts near chance
    assert last < 0.25 * mean_log_vocab, (first, last)   # 0.08-0.23 over 4 seeds
    # the learned model predicts image.b from image.a (a relabelling of it) almost exactly
    model.eval()
    a = torch.stack([torch.from_numpy(structured_tokens(z)["image.a"]).long() for z in range(16)])
    b = torch.stack([torch.from_numpy(structured_tokens(z)["image.b"]).long() for z in range(16)])
    with torch.no_grad():
        pred = model.logits({"image.a": a}, {"image.b": torch.arange(16).expand(16, 16)})["image.b"].argmax(-1)
    assert (pred == b).float().mean() > 0.9, (pred == b).float().mean()


def test_loss_ignores_padding_and_averages_modalities():
    table = tiny_table()
    model = small_model(table).eval()
    rng = np.random.default_rng(0)
    batch = collate([sample_masks(structured_tokens(z), table, MaskingConfig(20, 20), rng) for z in range(4)])
    loss, parts = model(batch)
    torch.testing.assert_close(loss, torch.stack(list(parts.values())).mean())
    noisy = {k: v.clone() for k, v in batch.items()}
    for name, pad in (("enc_ids", "enc_pad"), ("dec_targets", "dec_pad"), ("enc_pos", "enc_pad")):
        noisy[name][noisy[pad]] = 1      # garbage in the padding slots
    assert batch["enc_pad"].any() or batch["dec_pad"].any()
    torch.testing.assert_close(model(noisy)[0], loss)


def masked_batch(table, n_objects=4, budgets=(20, 20), seed=0):
    rng = np.random.default_rng(seed)
    return collate([sample_masks(structured_tokens(z), table, MaskingConfig(*budgets), rng) for z in range(n_objects)])


def test_model_backends_agree_with_padding_and_an_object_without_inputs():
    table = tiny_table()
    batch = masked_batch(table, n_objects=5)
    batch["enc_pad"][3] = True            # object 3 has no input tokens: its targets see nothing
    assert batch["enc_pad"][[0, 1, 2, 4]].any()                       # and the others some padding
    results = {}
    for backend in ("reference", "sdpa"):
        model = small_model(table, attention=backend, qk_norm=True, swiglu=True).train()
        loss, parts = model(batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values()), backend
        results[backend] = (loss.detach(), grads)
    torch.testing.assert_close(results["sdpa"][0], results["reference"][0], atol=1e-5, rtol=1e-5)
    for name, g in results["sdpa"][1].items():
        torch.testing.assert_close(g, results["reference"][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_only_the_selected_tokens_are_embedded_and_computed():
    """An AION-shaped object has 854 tokens; a step embeds and runs the position-wise
    layers on the budgeted real tokens only (no padding, nothing per modality token)."""
    big = {"image.x": (4375, 576), "spectrum.y": (1024, 273), "scalar.z": (1024, 1)}
    table = ModalityTable.from_dict({k: {"vocab_size": v, "n_tokens": n} for k, (v, n) in big.items()})
    rng = np.random.default_rng(0)
    objs = [{k: rng.integers(0, v, n) for k, (v, n) in big.items()} for _ in range(3)]
    batch = collate([sample_masks(o, table, MaskingConfig(64, 32), rng) for o in objs])
    n_in, n_tgt = int((~batch["enc_pad"]).sum()), int((~batch["dec_pad"]).sum())
    assert n_in < 3 * 64 and batch["enc_pad"].any()          # the scalar's unused share is padding
    model = FourM(FMConfig(dim=32, enc_depth=1, dec_depth=1, heads=2), table)
    rows = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: rows.setdefault(name, []).append(
        args[0].shape)) for name, m in (("tok_emb", model.tok_emb), ("enc_mlp", model.encoder[0].mlp),
                                        ("dec_mlp", model.decoder[0].mlp), ("cross_kv", model.decoder[0].cross.kv))]
    model(batch)[0].backward()
    assert rows["tok_emb"] == [(n_in,)]
    assert rows["enc_mlp"] == [(n_in, 32)] and rows["cross_kv"] == [(n_in, 32)]
    assert rows["dec_mlp"] == [(n_tgt, 32)]
    # inference: a partly known image is embedded as its known tokens only
    rows.clear()
    image = torch.from_numpy(np.stack([o["image.x"] for o in objs]))
    image[:, 10:] = -1
    image[2, 3:] = -1
    with torch.no_grad():
        model.logits({"image.x": image, "spectrum.y": torch.full((3, 273), -1)}, {"scalar.z": torch.zeros(3, 1).long()})
    assert rows["tok_emb"] == [(23,)] and rows["enc_mlp"] == [(23, 32)] and rows["dec_mlp"] == [(3, 32)]
    for h in hooks:
        h.remove()


def test_logits_contract_with_partial_inputs():
    table = tiny_table()
    model = small_model(table).eval()
    B = 3
    img = torch.from_numpy(np.stack([structured_tokens(z)["image.a"] for z in range(B)])).long()
    partial = img.clone()
    partial[:, 5:] = -1                  # only the first 5 tokens of image.a are known
    partial[2] = -1                      # object 2 knows nothing of image.a
    spec = torch.full((B, 12), -1)
    targets = {"image.b": torch.tensor([[0, 3, 15]] * B), "scalar.z": torch.zeros(B, 1, dtype=torch.long),
               "image.a": torch.arange(5, 16).expand(B, 11)}
    with torch.no_grad():
        out = model.logits({"image.a": partial, "spectrum.s": spec}, targets)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "image.b": (B, 3, 32), "scalar.z": (B, 1, 16), "image.a": (B, 11, 32)}
        assert all(torch.isfinite(v).all() for v in out.values())
        # a modality given entirely as -1 is the same as a modality not given
        alone = model.logits({"image.a": partial}, targets)
        for k in out:
            torch.testing.assert_close(out[k], alone[k], atol=1e-5, rtol=1e-5)
        # nothing given at all (unconditional): still finite
        none = model.logits({}, {"scalar.z": torch.zeros(B, 1, dtype=torch.long)})["scalar.z"]
        assert torch.isfinite(none).all()
        emb, pad = model.encode({"image.a": partial})
        assert emb.shape == (B, 5, 64) and pad.tolist() == [[False] * 5, [False] * 5, [True] * 5]
        vec = model.embed({"image.a": partial})
        assert vec.shape == (B, 64) and (vec[2] == 0).all() and torch.isfinite(vec).all()
    with pytest.raises(KeyError, match="image.nope"):
        model.logits({"image.nope": img}, targets)
    with pytest.raises(ValueError, match="expected shape"):
        model.logits({"image.a": img[:, :4]}, targets)
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 32\)"):
        model.logits({"image.a": img + 40}, targets)


def test_save_from_pretrained_identical_logits(tmp_path):
    table = tiny_table()
    model = small_model(table, swiglu=True, qk_norm=True, bias=True).eval()
    inputs = {"image.a": torch.from_numpy(structured_tokens(1)["image.a"]).long()[None]}
    targets = {"spectrum.s": torch.arange(12)[None]}
    model.save(tmp_path / "fm")
    loaded = FourM.from_pretrained(tmp_path / "fm")
    assert loaded.table == table and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(inputs, targets)["spectrum.s"],
                                   model.logits(inputs, targets)["spectrum.s"], atol=0, rtol=0)
    ref = FourM.from_pretrained(tmp_path / "fm", attention="reference")
    with torch.no_grad():
        torch.testing.assert_close(ref.logits(inputs, targets)["spectrum.s"],
                                   model.logits(inputs, targets)["spectrum.s"], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_same_gradients():
    table = tiny_table()
    rng = np.random.default_rng(0)
    batch = collate([sample_masks(structured_tokens(z), table, MaskingConfig(20, 20), rng) for z in range(4)])
    grads = []
    for ckpt in (False, True):
        model = small_model(table, checkpointing=ckpt).train()
        model(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# -- sizes ------------------------------------------------------------------------------
AION_SHAPED = {"image.hsc": (4375, 576), "spectrum.desi": (1024, 273),
               **{f"scalar.{n}": (1024, 1) for n in ("flux_g", "flux_r", "flux_i", "flux_z", "redshift")}}
SIZES = {"tiny": (128, 2, 2), "small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 24),
         "xl": (2048, 24, 24)}
LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "fm"


def expected_params(cfg: FMConfig, table: ModalityTable) -> int:
    """Parameter count from the shapes alone (weights; biases and norm shifts if cfg.bias)."""
    D, b = cfg.dim, int(cfg.bias)
    hidden = int(cfg.mlp_ratio * D)
    if cfg.swiglu:
        hidden = (int(2 * hidden / 3) + 7) // 8 * 8
    norm = D * (1 + b)
    attention = 4 * D * D + 4 * D * b + (2 * (D // cfg.heads) if cfg.qk_norm else 0) \
        + cfg.heads * cfg.sky_attention                            # sky attention: a width per head
    mlp = D * hidden * (2 if cfg.swiglu else 1) + hidden * D + b * (hidden * (2 if cfg.swiglu else 1) + D)
    encoder_block = 2 * norm + attention + mlp
    decoder_block = encoder_block + norm + attention
    embeddings = (table.total_vocab + len(table) + table.total_positions) * D
    heads = sum(spec.vocab_size for spec in table) * (D + b)      # one head per modality, shared spaces too
    return (embeddings + cfg.enc_depth * encoder_block + cfg.dec_depth * decoder_block
            + 2 * norm + heads)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_size_configs_build(size):
    """Each launch/fm size builds (on the meta device: no memory) with the sizes the issue
    names, and its parameter count is what the shapes say."""
    raw = yaml.safe_load((LAUNCH / f"{size}.yaml").read_text())
    cfg = from_dict(FMConfig, raw["model"], where=f"{size}.yaml model")
    masking = from_dict(MaskingConfig, raw["masking"], where=f"{size}.yaml masking")
    assert (cfg.dim, cfg.enc_depth, cfg.dec_depth) == SIZES[size]
    assert masking.input_budget >= 128 and masking.target_budget >= 128
    table = ModalityTable.from_dict({k: {"vocab_size": v, "n_tokens": n} for k, (v, n) in AION_SHAPED.items()})
    with torch.device("meta"):
        model = FourM(cfg, table)
    assert model.num_params() == expected_params(cfg, table)
