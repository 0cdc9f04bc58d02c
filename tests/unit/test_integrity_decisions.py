"""Integrity decisions (store/integrity.py): is a recorded image exactly what its record says,
and which points does a damaged image take with it. Images are real qcow2 files made with the
`qemu-img` and `qemu-io` binaries in tmp_path; damage is real (bytes flipped, files grown,
headers rewritten, symlinks and directories in their place). Records are read through
Chain.from_json from schema-1 metadata, the oldest layout, which every version reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from virtbackup.errors import UnsafePath
from virtbackup.store.chain import BackupDir, Chain
from virtbackup.store.digest import file_digest
from virtbackup.store.integrity import affected_points, chain_images, check_images, image_problem, quick_problem

MiB = 1 << 20
# (point id, level, parent, {disk: backing point or None})
Spec = Sequence[Tuple[str, str, Optional[str], Dict[str, Optional[str]]]]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def chain_of(spec: Spec, bdir: Optional[Path] = None, algs: Optional[Dict[str, str]] = None) -> Chain:
    """The chain metadata for `spec`. With `bdir`: each record's size and hash (BLAKE3, or the
    algorithm `algs` names for that image) are those of the file there now, as a backup records
    them; without: placeholders (for decisions that read no file)."""
    algs = algs or {}
    points: List[Dict[str, Any]] = []
    full = ""
    for pid, level, parent, disks in spec:
        full = pid if level == "full" else full
        imgs: Dict[str, Any] = {}
        for disk, back in disks.items():
            rel = f"points/{pid}/{disk}.qcow2"
            size, alg, value = 1, "blake3", "0" * 64
            if bdir is not None:
                size = (bdir / rel).stat().st_size
                alg = algs.get(rel, "blake3")
                value = file_digest(bdir / rel, alg)
            imgs[disk] = {"image": rel, "backing": f"points/{back}/{disk}.qcow2" if back else None,
                          "virtual_size": MiB, "size": size, "sha256": value if alg == "sha256" else "",
                          "blake3": value if alg == "blake3" else "", "copied_full": back is None}
        points.append({"id": pid, "level": level, "created": f"2026-01-01T00:00:{pid[-2:]}+00:00",
                       "checkpoint": f"virtbackup-ab-{pid}",
                       "base_checkpoint": f"virtbackup-ab-{parent}" if parent else None,
                       "parent": parent, "chain": full, "disks": imgs, "domain_xml": f"points/{pid}/domain.xml",
                       "checkpoint_xml": f"points/{pid}/checkpoint.xml"})
    return Chain.from_json({"schema": 1, "domain_name": "dom", "domain_uuid": "uuid", "dir_id": "ab",
                            "points": points, "next_seq": int(spec[-1][0]) + 1, "path": ""})


SPEC: Spec = [("0001", "full", None, {"vda": None}),
              ("0002", "inc", "0001", {"vda": "0001"}),
              ("0003", "diff", "0001", {"vda": "0001"})]


def make_images(root: Path, spec: Spec) -> None:
    """Real qcow2 images for `spec`, layered with relative backing names, each with some data."""
    for n, (pid, _, _, disks) in enumerate(spec):
        (root / "points" / pid).mkdir(parents=True)
        for disk, back in disks.items():
            path = root / "points" / pid / f"{disk}.qcow2"
            if back:
                qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"../{back}/{disk}.qcow2", "-F", "qcow2",
                         str(path), str(MiB))
            else:
                qemu_img("create", "-q", "-f", "qcow2", str(path), str(MiB))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x11 + n} {n * 65536} 65536", str(path)],
                           check=True, capture_output=True)


@pytest.fixture
def backup(tmp_path: Path) -> Tuple[BackupDir, Chain]:
    root = tmp_path / "dom,backup"
    make_images(root, SPEC)
    return BackupDir(root), chain_of(SPEC, root)


def problems(bdir: BackupDir, chain: Chain, quick: bool = False) -> Dict[str, str]:
    rels = [d.image for p in chain.points for d in p.disks.values()]
    return {d.image: d.problem for d in check_images(bdir, chain, rels, quick=quick)}


def test_intact_images_pass(backup):
    bdir, chain = backup
    assert problems(bdir, chain) == {} and problems(bdir, chain, quick=True) == {}


def test_a_grown_image_is_refused_by_size_before_any_read(backup):
    bdir, chain = backup
    with open(bdir.path / "points/0002/vda.qcow2", "ab") as f:
        f.write(b"\0" * 512)
    img = chain.point("0002").disks["vda"]
    want = f"size is {img.size + 512} bytes, recorded {img.size}"
    assert quick_problem(bdir, img) == want
    assert problems(bdir, chain, quick=True) == {"points/0002/vda.qcow2": want}
    assert problems(bdir, chain) == {"points/0002/vda.qcow2": want}


def test_one_flipped_byte_is_a_hash_mismatch_with_the_recorded_algorithm(tmp_path):
    root = tmp_path / "b"
    make_images(root, SPEC)
    chain = chain_of(SPEC, root, algs={"points/0001/vda.qcow2": "sha256"})
    bdir = BackupDir(root)
    assert problems(bdir, chain) == {}
    for rel in ("points/0001/vda.qcow2", "points/0003/vda.qcow2"):
        with open(root / rel, "r+b") as f:
            f.seek(-1, os.SEEK_END)                      # the last guest data cluster
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0x01]))
    assert problems(bdir, chain) == {
        "points/0001/vda.qcow2": "content hash (sha256) differs from the one recorded at backup time",
        "points/0003/vda.qcow2": "content hash (blake3) differs from the one recorded at backup time"}
    assert problems(bdir, chain, quick=True) == {}       # same size: only a read finds it


def test_a_backing_link_other_than_the_record_is_named_before_the_hash(backup):
    bdir, chain = backup
    path = bdir.path / "points/0002/vda.qcow2"
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "../0003/vda.qcow2", str(path))
    img = chain.point("0002").disks["vda"]
    assert path.stat().st_size == img.size               # the header changed in place
    assert image_problem(bdir, img) == "backing link is '../0003/vda.qcow2', expected '../0001/vda.qcow2'"
    # an absolute link to the very same file is damage too: the directory must stay movable
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(bdir.path / "points/0001/vda.qcow2"),
             str(path))
    assert (image_problem(bdir, img) or "").startswith(f"backing link is '{bdir.path}/points/0001/vda.qcow2'")


def test_a_recorded_standalone_image_with_a_backing_link_and_a_lost_one(tmp_path):
    root = tmp_path / "b"
    make_images(root, SPEC)
    # the records say the reverse of the headers: 0001 layered on nothing, 0002 on 0001
    for pid, back in (("0001", "../0003/vda.qcow2"), ("0002", "")):
        qemu_img("rebase", "-q", "-u", "-f", "qcow2", *(["-F", "qcow2"] if back else []), "-b", back,
                 str(root / f"points/{pid}/vda.qcow2"))
    chain = chain_of(SPEC, root)                          # sizes and hashes of the files as they are now
    assert problems(BackupDir(root), chain) == {
        "points/0001/vda.qcow2": "backing link is '../0003/vda.qcow2', expected None",
        "points/0002/vda.qcow2": "backing link is None, expected '../0001/vda.qcow2'"}


def test_something_else_than_qcow2_with_the_recorded_size_and_hash(tmp_path):
    root = tmp_path / "b"
    make_images(root, SPEC[:1])
    raw = root / "points/0001/vda.qcow2"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(raw), str(tmp_path / "raw"))
    shutil.move(tmp_path / "raw", raw)
    chain = chain_of(SPEC[:1], root)
    assert problems(BackupDir(root), chain) == {"points/0001/vda.qcow2": "not a qcow2 image"}


def test_missing_and_not_a_file(backup):
    bdir, chain = backup
    (bdir.path / "points/0002/vda.qcow2").unlink()
    (bdir.path / "points/0003/vda.qcow2").unlink()
    (bdir.path / "points/0003/vda.qcow2").mkdir()
    want = {"points/0002/vda.qcow2": "image is missing", "points/0003/vda.qcow2": "not a regular file"}
    assert problems(bdir, chain, quick=True) == want and problems(bdir, chain) == want


@pytest.mark.parametrize("link", ["points/0002/vda.qcow2", "points/0002"])
def test_a_symlink_where_an_image_is_expected_is_refused_even_with_the_right_content(backup, tmp_path, link):
    bdir, chain = backup
    elsewhere = tmp_path / "elsewhere"
    shutil.move(bdir.path / link, elsewhere)               # the same bytes, reached through a link
    os.symlink(elsewhere, bdir.path / link)
    img = chain.point("0002").disks["vda"]
    for quick in (False, True):
        with pytest.raises(UnsafePath, match="symlink"):
            problems(bdir, chain, quick=quick)
    with pytest.raises(UnsafePath):
        image_problem(bdir, img)


def test_damage_comes_back_in_chain_order_with_its_point_and_disk(backup):
    bdir, chain = backup
    for pid in ("0001", "0003"):
        (bdir.path / f"points/{pid}/vda.qcow2").unlink()
    rels = ["points/0003/vda.qcow2", "points/0002/vda.qcow2", "points/0001/vda.qcow2", "points/0003/vda.qcow2"]
    damage = check_images(bdir, chain, rels)
    assert [(d.image, d.point, d.disk, d.problem) for d in damage] == [
        ("points/0001/vda.qcow2", "0001", "vda", "image is missing"),
        ("points/0003/vda.qcow2", "0003", "vda", "image is missing")]


# --- which points a damaged image takes with it (no files needed) -----------------------------------
# two chains; in 0004 vdb was copied whole (its bitmap was unusable), in 0007 vdb is new
LONG: Spec = [("0001", "full", None, {"vda": None, "vdb": None}),
              ("0002", "inc", "0001", {"vda": "0001", "vdb": "0001"}),
              ("0003", "diff", "0001", {"vda": "0001", "vdb": "0001"}),
              ("0004", "inc", "0003", {"vda": "0003", "vdb": None}),
              ("0005", "inc", "0004", {"vda": "0004", "vdb": "0004"}),
              ("0006", "full", None, {"vda": None}),
              ("0007", "inc", "0006", {"vda": "0006", "vdb": None})]


@pytest.mark.parametrize("bad, disks, points", [
    (["points/0001/vda.qcow2"], None, ["0001", "0002", "0003", "0004", "0005"]),
    (["points/0001/vdb.qcow2"], None, ["0001", "0002", "0003"]),         # 0004 holds vdb whole
    (["points/0002/vda.qcow2"], None, ["0002"]),                         # an inc nobody layered on
    (["points/0003/vda.qcow2"], None, ["0003", "0004", "0005"]),         # the diff the incs build on
    (["points/0004/vdb.qcow2"], None, ["0004", "0005"]),
    (["points/0006/vda.qcow2"], None, ["0006", "0007"]),
    (["points/0001/vdb.qcow2"], ["vda"], []),                           # a restore of vda only is fine
    (["points/0001/vdb.qcow2"], ["vdb"], ["0001", "0002", "0003"]),
    (["points/0002/vda.qcow2", "points/0007/vdb.qcow2"], None, ["0002", "0007"]),
    ([], None, []),
    (["points/0009/vda.qcow2"], None, []),                               # not an image of the chain
])
def test_affected_points_follow_backing_chains_across_inc_and_diff(bad, disks, points):
    assert affected_points(chain_of(LONG), bad, disks) == points


def test_a_restore_reads_exactly_the_chain_below_each_disk():
    chain = chain_of(LONG)
    assert chain_images(chain, chain.point("0005"), ["vda", "vdb"]) == [
        "points/0005/vda.qcow2", "points/0004/vda.qcow2", "points/0003/vda.qcow2", "points/0001/vda.qcow2",
        "points/0005/vdb.qcow2", "points/0004/vdb.qcow2"]
    assert chain_images(chain, chain.point("0002"), ["vda"]) == ["points/0002/vda.qcow2", "points/0001/vda.qcow2"]


# --- the XML files beside the images (hostile pass D9) ----------------------------------------------
def test_point_xml_digests_round_trip_and_older_records_have_none(tmp_path):
    """Schema 3 records written before the XML files were hashed load with no digests; a save
    writes the digests in the image digests' shape, and loading reads them back."""
    from virtbackup.store.digest import Digest
    chain = chain_of(SPEC)
    assert all(p.domain_xml_digest is None and p.checkpoint_xml_digest is None for p in chain.points)
    data = chain.to_json()
    assert data["schema"] == 3 and data["points"][0]["domain_xml_digest"] is None
    for p in data["points"]:                        # a schema-3 record from earlier today: no members
        del p["domain_xml_digest"], p["checkpoint_xml_digest"]
    again = Chain.from_json(data)
    assert again.points[0].domain_xml_digest is None
    again.points[0].domain_xml_digest = Digest("blake3", "a" * 64)
    again.points[0].checkpoint_xml_digest = Digest("sha256", "b" * 64)
    data = again.to_json()
    assert data["points"][0]["domain_xml_digest"] == {"algorithm": "blake3", "value": "a" * 64}
    back = Chain.from_json(data)
    assert back.points[0].checkpoint_xml_digest == Digest("sha256", "b" * 64)
    data["points"][0]["domain_xml_digest"] = {"algorithm": "md5", "value": "0" * 32}
    with pytest.raises(ValueError, match="domain_xml_digest"):
        Chain.from_json(data)


def test_a_changed_point_xml_is_damage_one_without_a_digest_is_taken_as_it_is(backup):
    from virtbackup.store.digest import Digest
    from virtbackup.store.integrity import check_xml, point_xml
    bdir, chain = backup
    for p in chain.points:
        for rel in point_xml(p):
            (bdir.path / rel).write_text(f"<domain><name>{p.id}</name></domain>\n")
    p1, p2 = chain.points[0], chain.points[1]
    p1.domain_xml_digest = Digest.of_file(bdir.path / p1.domain_xml)
    p1.checkpoint_xml_digest = Digest.of_file(bdir.path / p1.checkpoint_xml, "sha256")
    rels = [x for p in chain.points for x in point_xml(p)]
    assert check_xml(bdir, chain, rels) == []
    (bdir.path / p1.domain_xml).write_text("<domain><devices><emulator>/tmp/evil.sh</emulator></devices></domain>")
    (bdir.path / p1.checkpoint_xml).write_text("<domaincheckpoint/>")
    (bdir.path / p2.domain_xml).write_text("<domain/>")      # no digest recorded: accepted as before
    damage = check_xml(bdir, chain, rels)
    assert [(d.image, d.point, d.disk) for d in damage] == [
        ("points/0001/domain.xml", "0001", ""), ("points/0001/checkpoint.xml", "0001", "")]
    assert damage[0].problem == "content hash (blake3) differs from the one recorded at backup time"
    assert damage[0].where == "points/0001/domain.xml (point 0001)"
    (bdir.path / p2.checkpoint_xml).unlink()
    assert [d.problem for d in check_xml(bdir, chain, point_xml(p2))] == ["file is missing"]
    os.symlink("/etc/passwd", bdir.path / p2.checkpoint_xml)
    with pytest.raises(UnsafePath):
        check_xml(bdir, chain, point_xml(p2))
