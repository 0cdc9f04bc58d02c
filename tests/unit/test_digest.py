"""Image hashes: BLAKE3 for new images, SHA-256 still checked for images recorded with it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from virtbackup.store.chain import BackupDir, DiskImage
from virtbackup.store.digest import Digest, file_digest
from virtbackup.store.integrity import image_problem


def _image(tmp_path, size=3 << 20):
    """A file that starts like a standalone qcow2 (magic, no backing file): integrity.py goes on
    to compare its hash."""
    p = tmp_path / "img.qcow2"
    data = bytearray(bytes(range(256)) * (size // 256))
    data[:20] = b"QFI\xfb" + bytes(16)
    p.write_bytes(bytes(data))
    return p


def _flip(p, off):
    with open(p, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))


def _record(alg: str = "blake3", value: str = "") -> DiskImage:
    return DiskImage(image="img.qcow2", backing=None, virtual_size=1 << 30, size=0,
                     digest=Digest(alg, value) if value else None)


@pytest.mark.parametrize("alg", ["blake3", "sha256"])
def test_recorded_hash_detects_a_flipped_byte(tmp_path, alg):
    p = _image(tmp_path)
    img = _record()
    img.record_hash(p, alg)
    assert img.digest is not None and img.digest.algorithm == alg and img.digest.value == file_digest(p, alg)
    img.digest.check()
    img.size = p.stat().st_size
    # integrity.py is the one place that compares an image with its record (restore, prune, verify)
    assert image_problem(BackupDir(tmp_path), img) is None
    _flip(p, (2 << 20) + 12345)          # past the first chunk of BLAKE3's tree
    assert image_problem(BackupDir(tmp_path), img) == \
        f"content hash ({alg}) differs from the one recorded at backup time"


def test_old_images_recorded_with_sha256_still_verify(tmp_path):
    p = _image(tmp_path)
    old = {"image": "img.qcow2", "backing": None, "virtual_size": 1 << 30, "size": p.stat().st_size,
           "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "source": "/x", "copied_full": True}
    img = DiskImage.from_json(old, 1)    # a record written before BLAKE3: no "blake3" key
    assert img.digest == Digest("sha256", hashlib.sha256(p.read_bytes()).hexdigest())
    assert image_problem(BackupDir(tmp_path), img) is None
    _flip(p, 77)
    assert "content hash (sha256) differs" in (image_problem(BackupDir(tmp_path), img) or "")


def test_no_recorded_hash_never_matches(tmp_path):
    p = _image(tmp_path)
    img = _record()
    img.size = p.stat().st_size
    assert image_problem(BackupDir(tmp_path), img) == "no content hash recorded"


def test_empty_file_hashes(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    assert file_digest(p, "sha256") == hashlib.sha256(b"").hexdigest()
    assert file_digest(p, "blake3") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


@pytest.mark.skipif(not shutil.which("b3sum"), reason="b3sum (Debian package b3sum) not installed")
def test_b3sum_checks_the_recorded_hash_by_hand(tmp_path):
    p = _image(tmp_path)
    out = subprocess.run(["b3sum", "--no-names", str(p)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == file_digest(p, "blake3")
