"""What a shard directory holds, and whether it is intact: `omnisky-shards inspect` / `verify`.

    report = check("data/raw/train", deep=True)     # {'bad': [...], 'missing': [...], ...}
    counts = summarize("data/raw/train", n_keep=8)  # modality and pair counts, the first samples

`check` compares every shard with the manifest (size and sha256), lists shards that are
missing and tar files the manifest does not list; with `deep=True` it also reads every
sample of every shard, counting the shards and samples that do not read or decode.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .reader import StreamStats, stream
from .writer import read_manifest, sha256_file

PAIRS = (("image.des", "image.hsc"), ("spectrum.sdss", "spectrum.desi"))


def check(directory: str | Path, deep: bool = False) -> dict:
    """{'shards': n listed, 'ok': [...], 'bad': [size/sha256 differ], 'missing': [...],
    'unlisted': [tar files not in the manifest], 'stream': StreamStats.summary() if deep}."""
    directory = Path(directory)
    m = read_manifest(directory)
    ok, bad, missing = [], [], []
    for s in m["shards"]:
        p = directory / s["name"]
        if not p.exists():
            missing.append(s["name"])
        elif p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            bad.append(s["name"])
        else:
            ok.append(s["name"])
    listed = {s["name"] for s in m["shards"]}
    report = dict(shards=len(m["shards"]), ok=ok, bad=bad, missing=missing,
                  unlisted=sorted(p.name for p in directory.glob("*.tar") if p.name not in listed))
    if deep:
        stats = StreamStats()
        urls = [str(directory / s["name"]) for s in m["shards"] if s["name"] not in missing]
        if urls:
            for _ in stream(urls, decode=m.get("kind", "raw"), split=False, stats=stats):
                pass
        report["stream"] = stats.summary()
        expected = sum(s["count"] for s in m["shards"] if s["name"] not in missing)
        report["samples_expected"] = expected
    return report


def report_ok(report: dict) -> bool:
    s = report.get("stream", {})
    return not (report["bad"] or report["missing"] or s.get("n_corrupt_shards") or s.get("n_corrupt_samples")
                or ("samples_expected" in report and s.get("samples_read") != report["samples_expected"]))


def summarize(directory: str | Path, n_keep: int = 8, stats: StreamStats | None = None) -> dict:
    """Read every sample: {'kind', 'objects', 'modalities': {key: n}, 'pairs': {pair: n},
    'first': the first n_keep samples (raw: Sample; tokens: (id, tokens, meta)),
    'tokens_per_modality': {key: n tokens} (token shards)}."""
    m = read_manifest(directory)
    kind = m.get("kind", "raw")
    urls = [str(Path(directory) / s["name"]) for s in m["shards"]]
    counts, pairs, lengths, first, total = Counter(), Counter(), {}, [], 0
    for item in stream(urls, decode=kind, split=False, stats=stats):
        total += 1
        keys = list(item.records) if kind == "raw" else list(item[1])
        counts.update(keys)
        pairs.update("+".join(p) for p in PAIRS if all(k in keys for k in p))
        if kind == "tokens":
            lengths.update({k: int(v.shape[0]) for k, v in item[1].items()})
        if len(first) < n_keep:
            first.append(item)
    return dict(kind=kind, objects=total, modalities=dict(sorted(counts.items())),
                pairs=dict(sorted(pairs.items())), tokens_per_modality=dict(sorted(lengths.items())),
                first=first)
