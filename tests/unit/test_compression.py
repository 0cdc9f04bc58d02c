"""Compression (issue 24), the pure parts: widening copy runs to whole clusters, the chain's
setting, the records, and the qemu-img argument lists."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from virtbackup import backup as backup_mod
from virtbackup.backup import _check_compression, chain_compression
from virtbackup.errors import ChainCorrupt, UsageError
from virtbackup.qemu import qemu_img
from virtbackup.qemu.nbdcopy import align_runs
from virtbackup.store.chain import BackupDir, Chain, DiskImage, Point, data_ratio
from virtbackup.store.digest import Digest

Run = Tuple[int, int, bool]


def check_aligned(runs: List[Run], cluster: int, size: int) -> List[Run]:
    """align_runs' promises, byte by byte: whole clusters only; every byte of a run is covered;
    a byte is zeroed only where a zero run covers its whole cluster."""
    out = align_runs(runs, cluster, size)
    want: List[Optional[bool]] = [None] * size
    for s, n, z in runs:
        for x in range(s, s + n):
            want[x] = z
    got: List[Optional[bool]] = [None] * size
    for s, n, z in out:
        assert s % cluster == 0 and ((s + n) % cluster == 0 or s + n == size), (runs, out)
        for x in range(s, s + n):
            assert got[x] is None, f"byte {x} twice: {runs} -> {out}"
            got[x] = z
    for x in range(size):
        if want[x] is not None:
            assert got[x] is not None, f"byte {x} of a run dropped: {runs} -> {out}"
        if got[x] is True:
            assert want[x] is True, f"byte {x} zeroed but not in a zero run: {runs} -> {out}"
    assert out == sorted(out)
    return out


def test_align_runs_examples():
    assert align_runs([(0, 100, False), (100, 50, True), (150, 10, False)], 16, 200) == \
        [(0, 112, False), (112, 32, True), (144, 16, False)]
    # already aligned: unchanged; a zero run inside one cluster becomes data
    assert align_runs([(0, 64, False), (64, 64, True)], 64, 256) == [(0, 64, False), (64, 64, True)]
    assert align_runs([(10, 4, True)], 64, 256) == [(0, 64, False)]
    # the last cluster may be short (the disk's end)
    assert align_runs([(250, 6, True)], 64, 256) == [(192, 64, False)]
    assert align_runs([(192, 58, True)], 64, 250) == [(192, 58, True)]
    assert align_runs([], 64, 256) == []


def test_align_runs_random():
    rnd = random.Random(24)
    for _ in range(2000):
        cluster = rnd.choice([4, 8, 16])
        size = rnd.randint(1, 200)
        runs: List[Run] = []
        pos = rnd.randint(0, 10)
        while pos < size:
            n = rnd.randint(1, min(30, size - pos))
            runs.append((pos, n, rnd.random() < 0.5))
            pos += n + rnd.randint(0, 20)
        check_aligned(runs, cluster, size)


def point(pid: str, compression: Optional[str], encryption: Optional[str] = None) -> Point:
    img = DiskImage(image=f"points/{pid}/vda.qcow2", backing=None, virtual_size=1 << 20, size=1000,
                    digest=Digest("blake3", "0" * 64), data_size=4000)
    return Point(id=pid, level="full", created="2026-12-06T10:00:00+00:00", checkpoint=f"c{pid}",
                 base_checkpoint=None, parent=None, chain=pid, disks={"vda": img},
                 domain_xml=f"points/{pid}/domain.xml", checkpoint_xml=f"points/{pid}/checkpoint.xml",
                 compression=compression, encryption=encryption)


def chain_of(*compressions: Optional[str]) -> Chain:
    c = Chain(domain_name="d", domain_uuid="u")
    c.points = [point(f"{i + 1:04d}", z) for i, z in enumerate(compressions)]
    c.next_seq = len(c.points) + 1
    return c


def test_a_point_follows_its_chain_and_a_change_starts_a_new_one(tmp_path, monkeypatch):
    bdir = BackupDir(tmp_path)
    # a new directory: the default (options.DEFAULT_COMPRESSION: none), also when encrypted
    assert chain_compression(bdir, chain_of(), None, "auto", None) == (None, "auto", None)
    with monkeypatch.context() as m:
        m.setattr(backup_mod, "DEFAULT_COMPRESSION", "zstd")
        assert chain_compression(bdir, chain_of(), None, "auto", None) == ("zstd", "auto", None)
        enc = chain_of()
        enc.encryption = object()  # type: ignore[assignment]
        assert chain_compression(bdir, enc, None, "auto", None) == (None, "auto", None)
    assert chain_compression(bdir, chain_of(), "none", "full", None) == (None, "full", None)
    # an existing chain: its latest point's setting, whatever the default
    assert chain_compression(bdir, chain_of("zstd", None), None, "inc", None) == (None, "inc", None)
    assert chain_compression(bdir, chain_of(None, "zlib"), None, "auto", "r") == ("zlib", "auto", "r")
    assert chain_compression(bdir, chain_of("zstd"), "zstd", "inc", None) == ("zstd", "inc", None)
    # another setting: auto becomes a full with the reason; full keeps the caller's reason
    z, level, why = chain_compression(bdir, chain_of(None), "zstd", "auto", None)
    assert (z, level) == ("zstd", "full") and "uncompressed -> zstd" in str(why)
    assert chain_compression(bdir, chain_of("zstd"), "none", "full", "job") == (None, "full", "job")
    for level in ("inc", "diff"):
        with pytest.raises(UsageError, match="starts a new chain"):
            chain_compression(bdir, chain_of("zstd"), "none", level, None)


def test_compression_values_and_encryption_are_checked(tmp_path):
    bdir = BackupDir(tmp_path)
    for bad in ("lz4", "", "ZSTD"):
        with pytest.raises(UsageError, match="unknown compression"):
            _check_compression(bdir, None, bad, False)
    with pytest.raises(UsageError, match="cannot go with encryption"):
        _check_compression(bdir, None, "zstd", True)
    _check_compression(bdir, None, "none", True)
    _check_compression(bdir, None, None, True)
    _check_compression(bdir, None, "zlib", False)


def test_records_of_compression(tmp_path):
    c = chain_of("zstd", None)
    data = json.loads(json.dumps(c.to_json()))
    assert Chain.from_json(data).points == c.points
    for value in ("lz4", 3, ["zstd"], "none"):
        bad = json.loads(json.dumps(data))
        bad["points"][0]["compression"] = value
        (tmp_path / "virtbackup.json").write_text(json.dumps(bad))
        with pytest.raises(ChainCorrupt, match="compression"):
            BackupDir(tmp_path).load()
    for value in ("1", True, 1.5, -1):
        bad = json.loads(json.dumps(data))
        bad["points"][0]["disks"]["vda"]["data_size"] = value
        with pytest.raises(ValueError):
            Chain.from_json(bad)
    both = chain_of("zstd")
    both.points[0].encryption = "luks"
    with pytest.raises(ValueError, match="both encrypted and compressed"):
        both.validate()
    assert data_ratio([p.disks["vda"] for p in c.points]) == 4.0
    assert data_ratio([]) is None


def test_qemu_img_arguments(tmp_path):
    args = qemu_img.create_args(Path("/b/x.qcow2"), 1 << 20, "../0001/vda.qcow2", compression="zstd")
    assert "compat=1.1,compression_type=zstd" in args
    with pytest.raises(ValueError):
        qemu_img.create_args(Path("/b/x.qcow2"), 1 << 20, compression="lz4")
    assert qemu_img.compress_args(Path("/p/a"), Path("/p/a.z"), Path("/q/base")) == \
        ["convert", "-q", "-n", "-c", "-W", "-m", "16", "-t", "writeback", "-O", "qcow2", "-B", "/q/base",
         "/p/a", "/p/a.z"]
    assert "--target-is-zero" in qemu_img.compress_args(Path("/p/a"), Path("/p/a.z"), None)
    assert qemu_img.convert_args(["/s"], Path("/d"), compression="zlib")[-4:] == \
        ["-o", "compression_type=zlib", "/s", "/d"]
    with pytest.raises(ValueError):
        qemu_img.convert_args(["/s"], Path("/d"), encrypt_iter_time=10, compression="zstd")
