"""Streams at scale: equal shares for every rank and worker, per-epoch shuffling, weighted
mixing, and corrupt shards skipped, named and counted without hanging a worker."""
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from omnisky.shards.cli import main
from omnisky.shards.reader import stream
from omnisky.shards.writer import read_manifest, shard_urls


# ----------------------------------------------------------------- streams under many ranks

def _token_shards(directory, counts=(5, 3, 8, 1, 6, 4, 7), prefix="tok"):
    """Token shards with the given sample counts (object ids o0000, o0001, ...)."""
    from omnisky.shards.codec import encode_tokens
    from omnisky.shards.writer import ShardWriter
    writer = ShardWriter(directory, prefix=prefix, max_count=max(counts), kind="tokens")
    i = 0
    for c in counts:
        for _ in range(c):
            writer.write(f"{prefix}{i:04d}", encode_tokens(f"{prefix}{i:04d}", {"image.des": np.arange(4) + i}))
            i += 1
        writer._close_shard()
    writer.close()
    return directory


def _ids(ds):
    return [o for o, _, _ in ds]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 9])
def test_every_rank_gets_the_same_count_and_the_union_covers_the_data(tmp_path, world):
    from omnisky.shards.ranks import EpochStream
    d = _token_shards(tmp_path)                                # 34 samples in 7 shards of 1..8
    everything = {f"tok{i:04d}" for i in range(34)}
    pad = [_ids(EpochStream(d, "tokens", rank=r, world_size=world, seed=3, shuffle=4)) for r in range(world)]
    assert {len(p) for p in pad} == {-(-34 // world)}          # ceil: padded by repeating
    assert set().union(*pad) == everything
    assert sum(map(len, pad)) - 34 == (-34) % world            # repeats only to fill the last rank
    drop = [_ids(EpochStream(d, "tokens", rank=r, world_size=world, seed=3, remainder="drop"))
            for r in range(world)]
    assert {len(p) for p in drop} == {34 // world}             # floor: the remainder dropped
    assert len(set().union(*drop)) == sum(map(len, drop)) == world * (34 // world)


def test_epochs_reshuffle_with_a_seed_and_ranks_come_from_the_environment(tmp_path, monkeypatch):
    from omnisky.shards.ranks import EpochStream
    d = _token_shards(tmp_path)
    e0 = _ids(EpochStream(d, "tokens", rank=0, world_size=1, seed=1, epoch=0))
    e1 = _ids(EpochStream(d, "tokens", rank=0, world_size=1, seed=1, epoch=1))
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 == _ids(EpochStream(d, "tokens", rank=0, world_size=1, seed=1, epoch=0))
    both = EpochStream(d, "tokens", rank=0, world_size=1, seed=1, epochs=2)
    assert len(both) == 68 and _ids(both) == e0 + e1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = EpochStream(d, "tokens", seed=1)
    assert (from_env.rank, from_env.world_size) == (1, 2)
    assert _ids(from_env) == _ids(EpochStream(d, "tokens", rank=1, world_size=2, seed=1))
    with pytest.raises(ValueError, match="rank 2"):
        EpochStream(d, "tokens", rank=2, world_size=2)


def test_dataloader_workers_give_every_rank_the_same_batches(tmp_path):
    """Two ranks x two DataLoader worker processes: equal batch counts, all data covered."""
    from torch.utils.data import DataLoader
    from omnisky.shards.ranks import EpochStream
    d = _token_shards(tmp_path)
    batches = []
    for rank in range(2):
        ds = EpochStream(d, "tokens", rank=rank, world_size=2, seed=0, num_workers=2)
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: [o for o, _, _ in b])
        batches.append(list(loader))
        assert len(ds) == ds.samples_per_rank(num_workers=2) == 18   # 4 slots of ceil(34 / 4) = 9
    with pytest.raises(ValueError, match="num_workers=2"):
        list(EpochStream(d, "tokens", rank=0, world_size=2, num_workers=2))
    assert len(batches[0]) == len(batches[1]) == 6              # 2 workers x ceil(9 / 3)
    seen = [o for b in batches for batch in b for o in batch]
    assert len(seen) == 36 and set(seen) == {f"tok{i:04d}" for i in range(34)}


def test_mix_draws_with_weights_reproducibly(tmp_path):
    from omnisky.shards.mix import mix, shard_weights, training_stream
    from omnisky.shards.ranks import EpochStream
    a = _token_shards(tmp_path / "a", prefix="a")
    b = _token_shards(tmp_path / "b", counts=(6, 6), prefix="b")

    def draw(seed, rank=0):
        sa = EpochStream(a, "tokens", rank=rank, world_size=2, epochs=None, seed=seed)
        sb = EpochStream(b, "tokens", rank=rank, world_size=2, epochs=None, seed=seed)
        return _ids(mix([sa, sb], weights=[0.7, 0.3], seed=seed, length=1000, rank=rank))

    got = draw(0)
    assert len(got) == 1000 and abs(np.mean([o.startswith("a") for o in got]) - 0.7) < 0.05
    assert got == draw(0) and got != draw(1) and got != draw(0, rank=1)
    assert {o for o in got if o.startswith("b")} == {f"b{i:04d}" for i in range(12)}  # b cycled, reshuffled
    ts = training_stream({a: 3.0, b: 1.0}, seed=2, rank=1, world_size=2, shuffle=4)
    first = [o for (o, _, _), _ in zip(ts, range(300))]
    assert 0.65 < np.mean([o.startswith("a") for o in first]) < 0.85
    urls, p = shard_weights({a: 3.0, b: 1.0})
    assert len(urls) == 9 and p.sum() == pytest.approx(1.0)
    assert p[:7].sum() == pytest.approx(0.75) and p[0] == pytest.approx(0.75 * 5 / 34)
    with pytest.raises(ValueError, match="weights"):
        mix([[1], [2]], weights=[1.0, -1.0])
    with pytest.raises(RuntimeError, match="yields no samples"):
        list(mix([[1], []], weights=[0.5, 0.5], length=50))


# ----------------------------------------------------------------- corrupt shards

def _break_shards(src, dst):
    """A copy of `src` with sky-000001.tar truncated to a third and sky-000002.tar garbage."""
    shutil.copytree(src, dst)
    cut = dst / "sky-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    (dst / "sky-000002.tar").write_bytes(b"this is not a tar file\n" * 50)
    return dst


def _within(seconds, fn):
    """Run fn in a thread; fail if it has not returned after `seconds` (a hung worker)."""
    result = {}

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result["value"] = fn()
            except Exception as e:                  # re-raised in the test's thread
                result["error"] = e
            result["warnings"] = [str(w.message) for w in caught]
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), f"{fn} hung on a corrupt shard"
    if "error" in result:
        raise result["error"]
    return result["value"], result["warnings"]


def test_corrupt_shards_are_skipped_named_and_counted(sky_shards, tmp_path):
    from omnisky.shards.reader import StreamStats
    from omnisky.shards.ranks import EpochStream
    bad = _break_shards(sky_shards, tmp_path / "bad")
    stats = StreamStats()
    ids, warned = _within(60, lambda: [s.object_id for s in stream(shard_urls(bad), split=False, stats=stats)])
    assert 8 <= len(ids) < 16 and ids[:8] == [f"sky7-{i:07d}" for i in range(8)]
    assert set(stats.corrupt_shards) == {str(bad / "sky-000001.tar"), str(bad / "sky-000002.tar")}
    assert any("sky-000001.tar" in w for w in warned) and any("sky-000002.tar" in w for w in warned)
    assert "2 corrupt shard(s) skipped (sky-000001.tar, sky-000002.tar)" in str(stats)
    # Rank-balanced epochs top up from the readable shards: still 12 samples on each of 2 ranks.
    stats = StreamStats()
    per_rank, _ = _within(60, lambda: [len([s for s in EpochStream(bad, "raw", rank=r, world_size=2, stats=stats)])
                                       for r in range(2)])
    assert per_rank == [12, 12] and len(stats.corrupt_shards) == 2
    for name in ("sky-000000.tar", "sky-000001.tar"):        # now no shard has a readable sample
        (bad / name).write_bytes((bad / name).read_bytes()[:700])
    with pytest.raises(RuntimeError, match="no readable sample"):
        _within(60, lambda: list(EpochStream(bad, "raw", rank=0, world_size=1)))


def test_an_endless_stream_of_corrupt_shards_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="gave no sample"):
        _within(60, lambda: next(iter(stream([str(tmp_path / "a.tar")], resampled=True))))


def test_a_sample_that_does_not_decode_is_skipped_and_counted(tmp_path):
    from omnisky.shards.reader import StreamStats
    from omnisky.shards.writer import ShardWriter
    from omnisky.shards.codec import encode_tokens
    with ShardWriter(tmp_path, prefix="t", kind="tokens") as w:
        w.write("a", encode_tokens("a", {"image.des": np.arange(3)}))
        w.write("b", {"tokens.npz": b"not an npz", "meta.json": b'{"object_id": "b"}'})
        w.write("c", encode_tokens("c", {"image.des": np.arange(3)}))
    stats = StreamStats()
    with pytest.warns(UserWarning, match="corrupt sample 'b' in .*t-000000.tar"):
        got = [o for o, _, _ in stream(shard_urls(tmp_path), decode="tokens", split=False, stats=stats)]
    assert got == ["a", "c"] and stats.n_corrupt_samples == 1 and "b @ " in next(iter(stats.corrupt_samples))


def test_verify_and_inspect_report_corrupt_shards(sky_shards, tmp_path, capsys):
    bad = _break_shards(sky_shards, tmp_path / "bad")
    (bad / "stray-000009.tar").write_bytes(b"")
    capsys.readouterr()
    assert _within(60, lambda: main(["verify", str(bad), "--deep"]))[0] == 1
    out = capsys.readouterr().out
    assert "1 of 3 shard(s) match" in out and "sky-000001.tar, sky-000002.tar" in out
    assert "stray-000009.tar" in out and "of 24 sample(s); 2 corrupt shard(s)" in out
    assert "sky-000001.tar: ReadError" in out and "sky-000002.tar: ReadError" in out
    assert main(["verify", str(sky_shards), "--deep"]) == 0
    assert "read 24 of 24 sample(s); 0 corrupt shard(s)" in capsys.readouterr().out
    assert _within(60, lambda: main(["inspect", str(bad)]))[0] == 0
    assert "2 corrupt shard(s) skipped (sky-000001.tar, sky-000002.tar)" in capsys.readouterr().out


def test_tokenize_skips_and_counts_corrupt_raw_shards(sky_shards, tmp_path, capsys):
    from omnisky.shards.ranks import EpochStream
    from omnisky.tokenizers.scalar import ScalarConfig, ScalarTokenizer
    from omnisky.tokenizers.tokenize_shards import main as tokenize_main
    tok = ScalarTokenizer(ScalarConfig(names=("redshift",), n_bins=4, log_names=()))
    tok.fit([s.records["scalar.redshift"] for s in stream(shard_urls(sky_shards), split=False)
             if "scalar.redshift" in s.records])
    tok.save(tmp_path / "tok" / "scalar")
    bad = _break_shards(sky_shards, tmp_path / "bad")
    _within(120, lambda: tokenize_main(["--raw", str(bad), "--tokenizers", str(tmp_path / "tok"),
                                        "--out", str(tmp_path / "tokens")]))
    m = read_manifest(tmp_path / "tokens")
    assert sorted(Path(u).name for u in m["summary"]["corrupt_shards"]) == ["sky-000001.tar", "sky-000002.tar"]
    assert "corrupt raw shards skipped 2 ['sky-000001.tar', 'sky-000002.tar']" in capsys.readouterr().err
    assert 8 <= m["total"] < 16 and len(list(EpochStream(tmp_path / "tokens", "tokens"))) == m["total"]


def test_shards_stay_readable_by_webdataset(sky_shards):
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(shard_urls(sky_shards), shardshuffle=False, empty_check=False)]
    assert keys == [s.object_id for s in stream(shard_urls(sky_shards), split=False)]


def test_the_fm_loader_stops_with_an_error_when_no_shard_can_be_read(tmp_path):
    from omnisky.fm.data import slot_objects
    (tmp_path / "a.tar").write_bytes(b"garbage")
    (tmp_path / "b.tar").write_bytes(b"")
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no shard could be read"):
            _within(60, lambda: next(slot_objects(urls, table=None, shuffle=0, seed=(0,))))
