"""Write samples into webdataset tar shards, deterministically, with a manifest.

    with ShardWriter("out/raw", prefix="sky", max_count=1000) as w:
        for sample in samples:
            w.write(sample.object_id, encode_sample(sample))
    # out/raw/sky-000000.tar ... and out/raw/manifest.json

Tar headers carry a fixed mtime, uid and owner, so the same samples give byte-identical
shards. manifest.json lists each shard's sample count, size and sha256, plus totals
and any `summary` the job adds (objects masked or skipped, and why).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Mapping


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes `<dir>/<prefix>-NNNNNN.tar` shards of at most `max_count` samples."""

    def __init__(self, directory: str | Path, prefix: str = "shard", max_count: int = 1000,
                 kind: str = "raw", start_index: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.kind = prefix, max_count, kind
        self.index = start_index
        self.shards: list[dict] = []
        self.summary: dict = {}
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:06d}.tar"
        self._path = self.dir / name
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.shards.append(dict(name=self._path.name, count=self._count,
                                bytes=self._path.stat().st_size, sha256=sha256_file(self._path)))
        self._tar = None
        self.index += 1

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: members maps extension ('meta.json') -> bytes."""
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.dir}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "omnisky"
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.max_count:
            self._close_shard()

    def close(self, extra: dict | None = None) -> dict:
        """Finish the last shard and write manifest.json; returns the manifest."""
        self._close_shard()
        manifest = dict(kind=self.kind, prefix=self.prefix, shards=self.shards,
                        total=sum(s["count"] for s in self.shards), summary=self.summary)
        manifest.update(extra or {})
        (self.dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no manifest.json (not a shard directory?)")
    return json.loads(path.read_text())


def shard_urls(directory: str | Path) -> list[str]:
    """Paths of the shards a manifest lists, in order."""
    m = read_manifest(directory)
    return [str(Path(directory) / s["name"]) for s in m["shards"]]


def verify(directory: str | Path) -> list[str]:
    """Names of shards whose size or sha256 differ from the manifest (empty = all good)."""
    m = read_manifest(directory)
    bad = []
    for s in m["shards"]:
        p = Path(directory) / s["name"]
        if not p.exists() or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            bad.append(s["name"])
    return bad
