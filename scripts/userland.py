#!/usr/bin/env python3
"""A real Debian 12 userland on a qcow2 disk, built once and cached (compression benchmark data).

`debootstrap --variant=minbase --include=sqlite3,qemu-guest-agent,e2fsprogs bookworm` from the
mirror apt itself uses, turned into an ext4 filesystem (`mkfs.ext4 -d ROOT`, no mounting and no
loop devices) on a 2 GiB raw file, then `qemu-img convert -O qcow2` (about 222 MiB allocated).
The .debs debootstrap downloaded stay in /var/cache/apt/archives, as F6 measured it. The whole
disk is the filesystem (no partition table), as a data disk or a root=/dev/vda guest.

Cached under /var/cache/virtbackup-bench/ ($VIRTBACKUP_BENCH_CACHE or --cache-dir):
    rootfs-<treekey>/                  the debootstrap tree (reused when only the image changes)
    image-<key>/debian12-minbase.qcow2 the disk image (treat it as read-only: copy it to use it)
    image-<key>/info.json              what it was built from, how long it took, its sizes
<treekey> hashes VERSION, the suite, variant, architecture and package list; <key> adds the disk
size and the mkfs options. Bump VERSION to force a rebuild everywhere (or pass --rebuild).
Builds take a lock (<cache>/.lock), so concurrent callers wait for one build.

The mirror: --mirror, else $VIRTBACKUP_BENCH_MIRROR, else the first `deb` URI apt uses for the
suite (/etc/apt/sources.list.d/*.sources, *.list, /etc/apt/sources.list), else deb.debian.org.
On a fresh Debian 12 machine it installs debootstrap with apt-get when it is missing. Run as root.

    scripts/userland.py [--cache-dir DIR] [--mirror URI] [--rebuild]   # prints the image path
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

VERSION = "1"
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("sqlite3", "qemu-guest-agent", "e2fsprogs")
DISK_BYTES = 2 << 30
# Fixed UUID and directory-hash seed: the same tree gives the same filesystem layout's metadata.
FS_UUID = "6b1d4a4e-2c55-4d0b-9a55-5f0c1d2e3f40"
MKFS_OPTS = ("-q", "-F", "-t", "ext4", "-L", "vbbench", "-U", FS_UUID,
             "-E", f"hash_seed={FS_UUID},root_owner=0:0")
IMAGE_NAME = "debian12-minbase.qcow2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_ROOT = Path(os.environ.get("VIRTBACKUP_BENCH_CACHE", "/var/cache/virtbackup-bench"))


def say(msg: str) -> None:
    print(f"userland: {msg}", file=sys.stderr, flush=True)


def _key(parts: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def tree_key() -> str:
    return _key({"version": VERSION, "suite": SUITE, "variant": VARIANT, "include": list(INCLUDE),
                 "arch": _arch()})


def image_key() -> str:
    return _key({"tree": tree_key(), "disk": DISK_BYTES, "mkfs": list(MKFS_OPTS), "name": IMAGE_NAME})


# -- the mirror --------------------------------------------------------------------------------
def _deb822_uris(text: str, suite: str) -> List[str]:
    uris: List[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: Dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            uris += fields.get("uris", "").split()
    return uris


def _one_line_uris(text: str, suite: str) -> List[str]:
    uris = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()   # drop [arch=... signed-by=...]
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            uris.append(words[1])
    return uris


def apt_mirror(suite: str = SUITE) -> str:
    """The first plain-`deb` URI apt uses for `suite` (not -updates/-security), as debootstrap wants it."""
    etc = Path("/etc/apt")
    files = sorted((etc / "sources.list.d").glob("*.sources")) if (etc / "sources.list.d").is_dir() else []
    for f in files:
        for uri in _deb822_uris(f.read_text(errors="replace"), suite):
            return uri.rstrip("/")
    lists = [etc / "sources.list"] + (sorted((etc / "sources.list.d").glob("*.list"))
                                      if (etc / "sources.list.d").is_dir() else [])
    for f in lists:
        if f.is_file():
            for uri in _one_line_uris(f.read_text(errors="replace"), suite):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


# -- building ----------------------------------------------------------------------------------
def _run(*cmd: object) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"userland: {' '.join(map(str, cmd[:3]))}... failed ({proc.returncode}):\n{tail}")


def ensure_tools() -> None:
    if not shutil.which("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
        say("installing debootstrap (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"], check=True, env=env,
                       stdout=sys.stderr)
    for tool in ("mkfs.ext4", "qemu-img"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            raise SystemExit(f"userland: {tool} not found (apt-get install e2fsprogs qemu-utils)")


def _tree_ok(tree: Path) -> bool:
    return (tree / ".virtbackup-bench-ok").is_file()


def build_tree(cache: Path, mirror: str) -> Path:
    tree = cache / f"rootfs-{tree_key()}"
    if _tree_ok(tree):
        return tree
    tmp = cache / f"rootfs-{tree_key()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    say(f"debootstrap --variant={VARIANT} {SUITE} from {mirror} (about a minute)")
    t = time.monotonic()
    _run(debootstrap, f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}", f"--arch={_arch()}",
         SUITE, tmp, mirror)
    # debootstrap's downloaded .debs stay in /var/cache/apt/archives (~33 MB, already compressed):
    # as reference F6 measured it (217 MB tree, 222 MiB allocated), as a fresh install has them
    (tmp / ".virtbackup-bench-ok").write_text(json.dumps({
        "mirror": mirror, "seconds": round(time.monotonic() - t, 1),
        "built": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n")
    tmp.rename(tree)
    say(f"debootstrap done in {time.monotonic() - t:.0f} s")
    return tree


def _allocated(path: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(json.loads(out)["actual-size"])


def build_image(cache: Path, tree: Path) -> Path:
    d = cache / f"image-{image_key()}"
    img = d / IMAGE_NAME
    if (d / "info.json").is_file() and img.is_file():
        return img
    tmp = cache / f"image-{image_key()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    raw = tmp / "disk.raw"
    t = time.monotonic()
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
    # .virtbackup-bench-ok stays in the tree: 1 small file, harmless in the filesystem
    _run("mkfs.ext4", *MKFS_OPTS, "-d", tree, raw)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp / IMAGE_NAME)
    raw.unlink()
    info = {"version": VERSION, "suite": SUITE, "variant": VARIANT, "include": list(INCLUDE), "arch": _arch(),
            "tree": tree.name, "tree_build": json.loads((tree / ".virtbackup-bench-ok").read_text()),
            "disk_bytes": DISK_BYTES, "mkfs": list(MKFS_OPTS),
            "image_seconds": round(time.monotonic() - t, 1),
            "qcow2_actual_size": _allocated(tmp / IMAGE_NAME),
            "qcow2_file_size": (tmp / IMAGE_NAME).stat().st_size}
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    (tmp / IMAGE_NAME).chmod(0o444)
    tmp.rename(d)
    say(f"image {img}: {info['qcow2_actual_size'] / (1 << 20):.0f} MiB allocated of {DISK_BYTES >> 20} MiB")
    return img


def image(cache: Optional[Path] = None, mirror: Optional[str] = None, rebuild: bool = False) -> Path:
    """The cached image's path, building whatever is missing (under a lock)."""
    cache = Path(cache or CACHE_ROOT)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild:
            shutil.rmtree(cache / f"image-{image_key()}", ignore_errors=True)
            shutil.rmtree(cache / f"rootfs-{tree_key()}", ignore_errors=True)
        d = cache / f"image-{image_key()}"
        if (d / "info.json").is_file() and (d / IMAGE_NAME).is_file():
            return d / IMAGE_NAME
        ensure_tools()
        tree = build_tree(cache, mirror or os.environ.get("VIRTBACKUP_BENCH_MIRROR") or apt_mirror())
        return build_image(cache, tree)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=CACHE_ROOT, help=f"default {CACHE_ROOT}")
    ap.add_argument("--mirror", help="the Debian mirror URI (default: the one apt uses)")
    ap.add_argument("--rebuild", action="store_true", help="build the tree and the image again")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("userland: run as root (debootstrap, and mkfs.ext4 -d reading every file)", file=sys.stderr)
        return 2
    print(image(args.cache_dir, args.mirror, args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
