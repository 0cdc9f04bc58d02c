"""Image hashes: BLAKE3 for new images, SHA-256 still checked for images recorded with it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from virtbackup.store.chain import DiskImage
from virtbackup.store.digest import file_digest


def _image(tmp_path, size=3 << 20):
    p = tmp_path / "img.qcow2"
    p.write_bytes(bytes(range(256)) * (size // 256))
    return p


def _flip(p, off):
    with open(p, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("alg", ["blake3", "sha256"])
def test_recorded_hash_detects_a_flipped_byte(tmp_path, alg):
    p = _image(tmp_path)
    img = DiskImage(image="points/0001/vda.qcow2", backing=None, virtual_size=1 << 30, size=0, sha256="")
    img.record_hash(p, alg)
    assert img.hash_alg == alg and img.hash_matches(p)
    assert (img.sha256 if alg == "sha256" else img.blake3) == img.digest != ""
    _flip(p, (2 << 20) + 12345)          # past the first chunk of BLAKE3's tree
    assert not img.hash_matches(p)


def test_old_images_recorded_with_sha256_still_verify(tmp_path):
    p = _image(tmp_path)
    old = {"image": "points/0001/vda.qcow2", "backing": None, "virtual_size": 1 << 30, "size": 1,
           "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "source": "/x", "copied_full": True}
    img = DiskImage(**old)               # a record written before BLAKE3: no "blake3" key
    assert img.hash_alg == "sha256" and img.hash_matches(p)
    _flip(p, 7)
    assert not img.hash_matches(p)


def test_no_recorded_hash_never_matches(tmp_path):
    p = _image(tmp_path)
    assert not DiskImage(image="a", backing=None, virtual_size=1, size=1, sha256="").hash_matches(p)


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
