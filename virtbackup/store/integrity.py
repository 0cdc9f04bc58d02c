"""Check images against what the metadata recorded before anything reads them for a restore, a
prune or a verify: size, backing link and hash of the file (with the algorithm each image
recorded). This is the one place that decides whether an image is what its record says, and
whether a point's saved domain and checkpoint XML are the files its backup wrote (a hand-edited
domain XML would otherwise be defined, or booted by a drill, with whatever host paths it names).

Damage must be refused, never restored and never laundered: a prune that rewrote kept points
from a damaged image would record fresh hashes of wrong data, and from then on nobody could see
the damage. Each image is read once (hash and header in the same pass), images in parallel
threads (hashlib, blake3 and file reads release the GIL), one per core.
"""

from __future__ import annotations

import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from virtbackup import observe
from virtbackup.store.chain import BackupDir, Chain, DiskImage, Point
from virtbackup.store.digest import Digest, hasher

CHUNK = 4 << 20
QCOW2_MAGIC = b"QFI\xfb"


@dataclass
class ImageDamage:
    image: str          # relative to BACKUP_DIR (an image, or a point's domain or checkpoint XML)
    point: str          # the point that recorded it
    disk: str           # "" for a point's XML file
    problem: str

    @property
    def where(self) -> str:
        """`image (point P, disk D)`, or `file (point P)` for an XML file: what messages name."""
        return f"{self.image} (point {self.point}" + (f", disk {self.disk})" if self.disk else ")")


def _header_backing(head: bytes) -> Tuple[bool, Optional[str]]:
    """(is qcow2, backing file name) from the first bytes of an image (qcow2 header fields)."""
    if len(head) < 20 or head[:4] != QCOW2_MAGIC:
        return False, None
    offset, size = struct.unpack(">QI", head[8:20])
    if offset == 0 or size == 0:
        return True, None
    if offset + size > len(head):
        return True, "<unreadable>"
    return True, head[offset:offset + size].decode(errors="replace")


def backing_name(path: Path) -> Optional[str]:
    """The backing link in a qcow2 image's header, read without QEMU (None: no backing, not
    qcow2, or unreadable). What prune asks of a domain's disk images: QEMU never opens them."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    is_qcow2, backing = _header_backing(head)
    return backing if is_qcow2 and backing != "<unreadable>" else None


def quick_problem(bdir: BackupDir, img: DiskImage) -> Optional[str]:
    """What can be seen without reading the image: missing, not a file, wrong size."""
    path = bdir.resolve(img.image)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "image is missing"
    except OSError as e:
        return f"cannot read the image: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if img.size and st.st_size != img.size:
        return f"size is {st.st_size} bytes, recorded {img.size}"
    return None


def image_problem(bdir: BackupDir, img: DiskImage) -> Optional[str]:
    """Why this recorded image can't be trusted (None = it is exactly what was recorded).

    A symlink on its path raises UnsafePath (exit 2) through bdir.resolve."""
    quick = quick_problem(bdir, img)
    if quick:
        return quick
    if img.digest is None:
        return "no content hash recorded"
    path = bdir.resolve(img.image)
    h = hasher(img.digest.algorithm)
    head = b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb", buffering=0) as f:
            while True:
                buf = f.read(CHUNK)
                if not buf:
                    break
                if not head:
                    head = buf[:65536]
                h.update(buf)
    except OSError as e:
        return f"cannot read the image: {e.strerror}"
    is_qcow2, backing = _header_backing(head)
    if not is_qcow2:
        return "not a qcow2 image"
    expected = bdir.backing_link(img.image, img.backing)
    if backing != expected:
        return f"backing link is {backing!r}, expected {expected!r}"
    if h.hexdigest() != img.digest.value:
        return f"content hash ({img.digest.algorithm}) differs from the one recorded at backup time"
    return None


def check_images(bdir: BackupDir, chain: Chain, rels: Iterable[str],
                 workers: Optional[int] = None, quick: bool = False,
                 then: Optional[Callable[[DiskImage], Optional[str]]] = None,
                 progress: Optional[str] = None) -> List[ImageDamage]:
    """Check the given recorded images (each once, in parallel); the damaged ones, in chain order.

    `quick`: only what needs no read (missing, wrong size), to refuse at once before copying.
    `then`: a further check of each image that matches its record (verify's qemu-img check:
    no QEMU tool opens an image before this check passed). `progress`: report every image
    done under that name (observe.report)."""
    owner: Dict[str, Tuple[Point, str, DiskImage]] = {
        d.image: (p, name, d) for p in chain.points for name, d in p.disks.items()}
    todo = list(dict.fromkeys(rels))
    for rel in todo:              # symlinks first, on the main thread: exit 2 before any read
        bdir.resolve(rel)

    def check(rel: str) -> Optional[str]:
        img = owner[rel][2]
        if quick:
            return quick_problem(bdir, img)
        problem = image_problem(bdir, img)
        return then(img) if problem is None and then is not None else problem

    problems: List[Optional[str]] = []
    n = 1 if quick else workers or max(1, min(len(todo), os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=n)
    try:
        # each task in the caller's context (observe.submit): its cancel and progress scope
        futures = [observe.submit(pool, check, rel) for rel in todo]
        for f in futures:
            problems.append(f.result())
            if progress:
                observe.report(progress, len(problems), len(todo))     # a cancellation point
    finally:
        pool.shutdown(wait=True, cancel_futures=True)   # cancelled or failed: start no other image
    order = {d.image: i for i, d in enumerate(d for p in chain.points for d in p.disks.values())}
    out = [ImageDamage(rel, owner[rel][0].id, owner[rel][1], prob)
           for rel, prob in zip(todo, problems, strict=True) if prob]
    return sorted(out, key=lambda d: order.get(d.image, 0))


def affected_points(chain: Chain, bad: Iterable[str], disks: Optional[Sequence[str]] = None) -> List[str]:
    """Points (oldest first) whose images read through any of `bad` (only `disks`, if given)."""
    bad_set = set(bad)
    out = []
    for p in chain.points:
        for disk in p.disks:
            if disks is not None and disk not in disks:
                continue
            if bad_set.intersection(chain.image_chain(p, disk)):
                out.append(p.id)
                break
    return out


def chain_images(chain: Chain, point: Point, disks: Sequence[str]) -> List[str]:
    """Every recorded image a restore of `disks` of `point` reads."""
    return list(dict.fromkeys(rel for d in disks for rel in chain.image_chain(point, d)))


# --- the XML files beside the images ---------------------------------------------------------------
def point_xml(point: Point) -> List[str]:
    """The point's two saved XML files (relative to BACKUP_DIR)."""
    return [point.domain_xml, point.checkpoint_xml]


def xml_problem(bdir: BackupDir, rel: str, digest: Optional[Digest]) -> Optional[str]:
    """Why a point's saved XML file can't be used (None: it is the file the backup wrote).

    A point recorded before the XML files were hashed has no digest: its file is taken as it
    is (it must still be a regular file). A symlink raises UnsafePath (exit 2), as for images."""
    path = bdir.resolve(rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "file is missing"
    except OSError as e:
        return f"cannot read the file: {e.strerror}"
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "not a regular file"
            if digest is None:
                return None
            h = hasher(digest.algorithm)
            while True:
                buf = f.read(CHUNK)
                if not buf:
                    break
                h.update(buf)
    except OSError as e:
        return f"cannot read the file: {e.strerror}"
    if h.hexdigest() != digest.value:
        return f"content hash ({digest.algorithm}) differs from the one recorded at backup time"
    return None


def check_xml(bdir: BackupDir, chain: Chain, rels: Iterable[str]) -> List[ImageDamage]:
    """Check the given recorded XML files (point_xml() of some points); the damaged ones.

    Small files, read on this thread. Damage here is refused like an image's: a changed domain
    XML is never defined or booted, a changed checkpoint XML never redefined or copied."""
    owner: Dict[str, Tuple[Point, Optional[Digest]]] = {}
    for p in chain.points:
        owner[p.domain_xml] = (p, p.domain_xml_digest)
        owner[p.checkpoint_xml] = (p, p.checkpoint_xml_digest)
    out: List[ImageDamage] = []
    for rel in dict.fromkeys(rels):
        p, digest = owner[rel]
        problem = xml_problem(bdir, rel, digest)
        if problem:
            out.append(ImageDamage(rel, p.id, "", problem))
    return out
