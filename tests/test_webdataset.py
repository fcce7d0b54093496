"""Webdataset input: img2dataset-style tar shards listed by their headers, split across parts by whole
shards with stable ids, side files as metadata, and corrupt members skipped and noted (never a crash)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from shards import add_member, jpeg, member, write_shards

from uniret.data import open_items
from uniret.data.webdataset import TarShards, list_shard
from uniret.errors import UniretError


def test_samples_ids_and_metadata(tmp_path):
    write_shards(tmp_path / "shards")
    items = open_items(str(tmp_path / "shards" / "{00000..00002}.tar"))
    assert isinstance(items, TarShards) and len(items) == 12
    whole = items.part(0, 1)
    assert [it.position for it in whole] == list(range(12)) and whole.start == 0 and whole.notes == []
    first = whole[5]
    assert first.path == "00001.tar/000010001.jpg"
    # the json fields (its "id" kept as meta_id, never hiding the store id) and the caption
    assert first.extra == {"url": "https://example.org/000010001", "key": "000010001", "width": 16, "meta_id": 1,
                           "txt": "a photo of thing 000010001"}
    assert Image.open(io.BytesIO(whole.get_image_bytes(5))).size == (16, 16)


@pytest.mark.parametrize("stats", [False, True])
def test_parts_take_whole_shards_and_agree_on_ids(tmp_path, stats):
    write_shards(tmp_path / "shards", shards=5, per_shard=3, stats=stats)
    spec = str(tmp_path / "shards" / "{00000..00004}.tar")
    whole = TarShards(spec).part(0, 1)
    seen = []
    for k in range(3):
        part = TarShards(spec).part(k, 3)  # a fresh input each time, as on another machine
        first, stop, of = part.span["shards"]
        assert of == 5 and {it.path.split("/")[0] for it in part} == {f"{s:05d}.tar" for s in range(first, stop)}
        assert [it.position for it in part] == list(range(part.start, part.start + len(part)))
        seen.extend(part.items)
    assert seen == list(whole.items)  # every sample once, in order, with the same ids


def test_corrupt_members_are_skipped_and_noted(tmp_path):
    paths = write_shards(tmp_path / "shards", shards=3, per_shard=4)
    # shard 1: the header of sample 1's image is overwritten (its json and txt survive: no image, skipped)
    data = bytearray(paths[1].read_bytes())
    head = member(paths[1], "000010001.jpg").offset
    data[head:head + 100] = b"X" * 100
    paths[1].write_bytes(bytes(data))
    # shard 2: sample 0's image bytes are garbage (a failed row later), the file ends inside sample 3's json
    data = bytearray(paths[2].read_bytes())
    jpg = member(paths[2], "000020000.jpg")
    data[jpg.offset_data:jpg.offset_data + jpg.size] = b"\0garbage" * (jpg.size // 8) + b"\0" * (jpg.size % 8)
    cut = member(paths[2], "000020003.json").offset_data + 10
    paths[2].write_bytes(bytes(data[:cut]))
    # shard 0: a json side file that is not JSON
    with tarfile.open(tmp_path / "shards" / "00003.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_member(tar, "k1.jpg", jpeg(1))
        add_member(tar, "k1.json", b"{not json")
    items = TarShards(str(tmp_path / "shards" / "{00000..00003}.tar")).part(0, 1)
    paths_seen = [it.path for it in items]
    assert "00001.tar/000010001.jpg" not in paths_seen and "00001.tar/000010002.jpg" in paths_seen
    assert len(items) == 4 + 3 + 4 + 1
    notes = "\n".join(items.notes)
    assert "00001.tar: bytes" in notes and "corrupt tar header" in notes
    assert "00001.tar/000010001: no image member" in notes
    assert "00002.tar/000020003.json: truncated" in notes
    assert "00003.tar/k1.json: not valid JSON" in notes
    assert items[paths_seen.index("00003.tar/k1.jpg")].extra == {}
    assert items[paths_seen.index("00002.tar/000020003.jpg")].extra == {}  # its json was cut off


def test_listing_counts_match_the_full_listing_and_stats_gaps_keep_ids(tmp_path):
    paths = write_shards(tmp_path / "shards", shards=2, per_shard=4, stats=True)
    assert len(list_shard(paths[0], "00000.tar", read_side=False).keys) == 4
    # the stats file of shard 0 says 5: the fifth id is a failed row, shard 1 still starts at id 5
    (tmp_path / "shards" / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    items = TarShards(str(tmp_path / "shards" / "{00000..00001}.tar")).part(0, 1)
    assert len(items) == 9 and items[5].path == "00001.tar/000010000.jpg"
    with pytest.raises(UniretError, match="missing from the tar"):
        items.get_image_bytes(4)


@pytest.mark.parametrize("spec,message", [
    ("{00000..00009}.tar", "no such shard"),
    ("x.tar.gz", "compressed shards"),
    ("{00000..00001.tar", "unbalanced braces"),
])
def test_bad_shard_patterns(tmp_path, spec, message):
    write_shards(tmp_path, shards=2)
    with pytest.raises(UniretError, match=message):
        open_items(str(tmp_path / spec))
    with pytest.raises(UniretError, match="--domain/--split"):
        open_items(str(tmp_path / "00000.tar"), domains=["x"])
