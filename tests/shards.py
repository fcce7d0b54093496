"""Webdataset shards for tests: img2dataset's layout (key.jpg + key.json + key.txt per sample)."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image


def jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 255 - shade, 90)).save(buf, "JPEG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, shards: int = 3, per_shard: int = 4, stats: bool = False) -> list:
    """img2dataset's layout: key.jpg + key.json + key.txt per sample, one tar per shard."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                add_member(tar, f"{key}.jpg", jpeg(20 * j + s))
                add_member(tar, f"{key}.json", json.dumps({"url": f"https://example.org/{key}", "key": key,
                                                     "width": 16, "id": j}).encode())
                add_member(tar, f"{key}.txt", f"a photo of thing {key}\n".encode())
        if stats:
            (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard, "count": per_shard}))
        paths.append(path)
    return paths


def member(path, name) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)
