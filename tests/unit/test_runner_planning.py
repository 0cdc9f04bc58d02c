"""What a backup plan means for each runner, against the fake DomainView (pure logic; the jobs
themselves run against real libvirt and QEMU in tests/integration).

test_planning.py has the basic rules (first full, inc/diff bases, doubtful bitmaps, new/resized/
untracked disks, disk selection errors). Here: which base and backing each level takes deeper in
a chain, `--disk` subsets across points, the refusals' wording, encryption in the plan, and how
the push, pull and offline runners turn the same plan into their job (targets, scratch files, the
private QEMU's transaction, the re-check of base bitmaps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from tests.support.fakes import FakeDomain, bitmap, qcow2
from virtbackup.backup import Engine
from virtbackup.errors import BackupFailed, LevelNotPossible, UsageError
from virtbackup.qemu import keys
from virtbackup.runners.base import checkpoint_prefix
from virtbackup.runners.offline import JobDisk, OfflineRunner
from virtbackup.runners.plan import BackupPlan, plan_backup
from virtbackup.runners.pull import PullRunner, scratch_path
from virtbackup.store.chain import POINTS_DIR, BackupDir, Chain
from virtbackup.virt.host import Disk

MiB = 1 << 20
BDIR = BackupDir(Path("/backups/dom"))
KEY = keys.Key(b"plan-test-passphrase", "test")


def make_chain(points: Sequence[Tuple[str, Sequence[str]]], dir_id: str = "abcd1234", first: int = 1) -> Chain:
    """A chain of (level, disks) points, layered as backups layer them: a full standalone, an inc
    on the previous point, a diff on its chain's full; a disk the parent lacks is standalone.
    Read through Chain.from_json from schema-1 metadata (the oldest layout, which every version
    reads), so it is a chain the store accepts."""
    cp = f"virtbackup-{dir_id}-"
    recs: List[Dict[str, Any]] = []
    full: Optional[Dict[str, Any]] = None
    prev: Optional[Dict[str, Any]] = None
    for i, (level, disks) in enumerate(points, first):
        pid = f"{i:04d}"
        parent = None if level == "full" else (prev if level == "inc" else full)
        imgs = {}
        for d in disks:
            back = parent["disks"][d]["image"] if parent is not None and d in parent["disks"] else None
            imgs[d] = {"image": f"points/{pid}/{d}.qcow2", "backing": back, "virtual_size": 64 * MiB, "size": 1,
                       "sha256": "", "blake3": "0" * 64, "copied_full": back is None}
        rec = {"id": pid, "level": level, "created": f"2026-01-01T00:00:{i:02d}+00:00", "checkpoint": cp + pid,
               "base_checkpoint": parent["checkpoint"] if parent else None, "parent": parent["id"] if parent else None,
               "chain": full["id"] if full is not None and level != "full" else pid, "disks": imgs,
               "domain_xml": f"points/{pid}/domain.xml", "checkpoint_xml": f"points/{pid}/checkpoint.xml"}
        recs.append(rec)
        full = rec if level == "full" else full
        prev = rec
    return Chain.from_json({"schema": 1, "domain_name": "dom", "domain_uuid": "uuid", "dir_id": dir_id,
                            "points": recs, "next_seq": first + len(points), "path": ""})


def domain_for(c: Chain, disks: Sequence[str] = ("vda",), lost: Sequence[str] = ()) -> FakeDomain:
    """libvirt knows every checkpoint of the chain (but `lost`) with good bitmaps on `disks`."""
    names = [p.checkpoint for p in c.points]
    return FakeDomain([qcow2(d, i) for i, d in enumerate(disks, 1)], {d: 64 * MiB for d in disks},
                      {n: list(disks) for n in names if n not in lost},
                      {d: [bitmap(n) for n in names] for d in disks})


def by_disk(plan: BackupPlan) -> Dict[str, Any]:
    return {dp.disk.target: dp for dp in plan.disks}


# --- which base, which backing ------------------------------------------------------------------
def test_inc_layers_on_the_latest_point_and_diff_on_the_latest_chains_full():
    c = make_chain([("full", ["vda"]), ("inc", ["vda"]), ("full", ["vda"]), ("inc", ["vda"]), ("diff", ["vda"])])
    dom = domain_for(c)
    inc = plan_backup(dom, c, BDIR, "inc")
    (dp,) = inc.disks
    assert inc.base is not None and inc.base.id == "0005" and inc.base_checkpoint == c.checkpoint_name("0005")
    assert (dp.mode, dp.base_bitmap) == ("bitmap", c.checkpoint_name("0005"))
    assert (dp.target.backing, dp.target.backing_link) == ("points/0005/vda.qcow2", "../0005/vda.qcow2")
    diff = plan_backup(dom, c, BDIR, "diff")
    (dp,) = diff.disks
    assert diff.base is not None and diff.base.id == "0003"          # this chain's full, not 0001
    assert (dp.base_bitmap, dp.target.backing) == (c.checkpoint_name("0003"), "points/0003/vda.qcow2")
    assert dp.backing is not None and dp.backing.image == "points/0003/vda.qcow2"
    assert inc.point_id == diff.point_id == "0006" and "inc backup 0006" in inc.description


def test_point_ids_continue_after_pruned_points_and_targets_sit_in_that_partial_dir():
    c = make_chain([("full", ["vda"]), ("inc", ["vda"])], first=7)     # 0001..0006 pruned
    plan = plan_backup(domain_for(c), c, BDIR, "auto")
    assert plan.point_id == "0009" and plan.checkpoint == "virtbackup-abcd1234-0009"
    assert plan.work_dir == BDIR.path / POINTS_DIR / "0009.partial"
    assert plan.final_dir == BDIR.path / POINTS_DIR / "0009"
    assert plan.disks[0].target.path.parent == plan.work_dir
    assert plan.disks[0].target.image == "points/0009/vda.qcow2"


def test_diff_needs_the_fulls_checkpoint_inc_needs_the_latests():
    c = make_chain([("full", ["vda"]), ("inc", ["vda"])])
    no_full = domain_for(c, lost=[c.checkpoint_name("0001")])
    with pytest.raises(LevelNotPossible) as e:
        plan_backup(no_full, c, BDIR, "diff")
    assert str(e.value) == (f"cannot take a differential backup: checkpoint {c.checkpoint_name('0001')} of point "
                            "0001 is not known to libvirt; take a full backup (--level full or auto)")
    assert plan_backup(no_full, c, BDIR, "inc").level == "inc"
    assert plan_backup(no_full, c, BDIR, "auto").level == "inc"     # auto continues from the latest

    no_latest = domain_for(c, lost=[c.checkpoint_name("0002")])
    with pytest.raises(LevelNotPossible, match=r"^cannot take an incremental backup: checkpoint .*0002 of point 0002"):
        plan_backup(no_latest, c, BDIR, "inc")
    assert plan_backup(no_latest, c, BDIR, "diff").level == "diff"
    auto = plan_backup(no_latest, c, BDIR, "auto")                  # never falls back to a diff silently
    assert auto.level == "full" and auto.base is None and auto.reason is not None
    assert auto.reason.startswith("new chain: checkpoint") and all(dp.target.backing is None for dp in auto.disks)


def test_a_new_chain_copies_every_disk_whole_without_per_disk_reasons():
    c = make_chain([("full", ["vda", "vdb"]), ("inc", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    for d in ("vda", "vdb"):
        dom.disk_bitmaps[d] = [bitmap(b.name, inconsistent=True) for b in dom.disk_bitmaps[d]]
    plan = plan_backup(dom, c, BDIR, "auto", reason="asked by the job")
    assert plan.level == "full" and plan.base is None and plan.base_checkpoint is None
    assert plan.reason is not None and plan.reason.startswith("new chain: bitmap")
    assert [(dp.mode, dp.base_bitmap, dp.backing, dp.why_full, dp.target.backing_link) for dp in plan.disks] == [
        ("full", None, None, None, None)] * 2
    assert plan_backup(dom, c, BDIR, "full", reason="asked by the job").reason == "asked by the job"


# --- --disk subsets ---------------------------------------------------------------------------------
def test_a_subset_checks_only_its_own_bitmaps():
    c = make_chain([("full", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.disk_bitmaps["vda"] = []                                   # vda's bitmap is gone
    plan = plan_backup(dom, c, BDIR, "inc", only=["vdb"])
    assert [(dp.disk.target, dp.mode) for dp in plan.disks] == [("vdb", "bitmap")]
    assert plan.reason is None and plan.skipped == {}              # vda is not chosen, not "skipped"
    with pytest.raises(LevelNotPossible, match="missing on disk vda"):
        plan_backup(dom, c, BDIR, "inc", only=["vda"])             # alone, it can't continue the chain


def test_a_subset_whose_only_disk_has_a_bad_bitmap_is_a_new_chain_not_a_per_disk_fallback():
    c = make_chain([("full", ["vda", "vdb"]), ("inc", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.disk_bitmaps["vdb"] = [bitmap(c.checkpoint_name("0002"), recording=False)]
    both = plan_backup(dom, c, BDIR, "auto")
    assert both.level == "inc" and by_disk(both)["vdb"].mode == "full"
    assert by_disk(both)["vdb"].why_full == f"bitmap {c.checkpoint_name('0002')} on disk vdb is not recording"
    alone = plan_backup(dom, c, BDIR, "auto", only=["vdb"])
    assert alone.level == "full" and "vdb is not recording" in (alone.reason or "")
    with pytest.raises(LevelNotPossible, match="vdb is not recording"):
        plan_backup(dom, c, BDIR, "inc", only=["vdb"])


def test_after_a_subset_point_the_left_out_disk_is_copied_whole_by_inc_but_not_by_diff():
    # point 0002 took vdb only: its checkpoint has no bitmap on vda
    c = make_chain([("full", ["vda", "vdb"]), ("inc", ["vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.checkpoints[c.checkpoint_name("0002")] = ["vdb"]
    dom.disk_bitmaps["vda"] = [bitmap(c.checkpoint_name("0001"))]
    inc = by_disk(plan_backup(dom, c, BDIR, "auto"))
    assert inc["vdb"].mode == "bitmap" and inc["vdb"].target.backing == "points/0002/vdb.qcow2"
    assert inc["vda"].mode == "full" and inc["vda"].target.backing is None and inc["vda"].why_full
    diff = by_disk(plan_backup(dom, c, BDIR, "diff"))                 # the full has both disks
    assert [(d, diff[d].mode, diff[d].target.backing_link) for d in ("vda", "vdb")] == [
        ("vda", "bitmap", "../0001/vda.qcow2"), ("vdb", "bitmap", "../0001/vdb.qcow2")]


def test_a_subset_of_disks_the_previous_point_lacks_cannot_continue_the_chain():
    c = make_chain([("full", ["vda"])])
    dom = domain_for(c, ("vda", "vdb"))
    plan = plan_backup(dom, c, BDIR, "auto", only=["vdb"])
    assert plan.level == "full" and plan.reason == "new chain: no disk of the previous point takes part in this backup"
    with pytest.raises(LevelNotPossible, match="no disk of the previous point takes part"):
        plan_backup(dom, c, BDIR, "inc", only=["vdb"])


def test_a_disk_new_since_the_base_does_not_keep_a_chain_alive_whose_bitmaps_are_all_gone():
    c = make_chain([("full", ["vda"])])
    dom = domain_for(c, ("vda", "vdb"))                # vdb was added after point 0001
    dom.disk_bitmaps["vda"] = []
    plan = plan_backup(dom, c, BDIR, "auto")
    assert plan.level == "full"
    assert plan.reason == f"new chain: bitmap {c.checkpoint_name('0001')} is missing on disk vda"
    with pytest.raises(LevelNotPossible):
        plan_backup(dom, c, BDIR, "inc")


def test_per_disk_fallback_keeps_the_first_reason_that_applies():
    c = make_chain([("full", ["vda", "vdb", "vdc"])])
    dom = domain_for(c, ("vda", "vdb", "vdc"))
    cp = c.checkpoint_name("0001")
    dom.sizes["vdb"] = 128 * MiB                                   # resized and its bitmap gone
    dom.disk_bitmaps["vdb"] = []
    dom.disk_bitmaps["vdc"] = [bitmap(cp, busy=True)]
    plan = by_disk(plan_backup(dom, c, BDIR, "inc"))
    assert plan["vda"].mode == "bitmap"
    assert plan["vdb"].why_full == f"disk was resized ({64 * MiB} -> {128 * MiB} bytes)"
    assert plan["vdb"].virtual_size == 128 * MiB                    # the target has the disk's new size
    assert plan["vdc"].why_full == f"bitmap {cp} on disk vdc is busy (another job uses it)"


# --- encryption ---------------------------------------------------------------------------------------
def encrypted(plan: BackupPlan, key: Optional[keys.Key] = KEY, iter_time: int = 50) -> BackupPlan:
    """The plan as the backup engine hands it to the runner (Engine._encrypted needs no libvirt)."""
    engine = Engine(None, BDIR, None, key=key, iter_time=iter_time)  # type: ignore[arg-type]
    return engine._encrypted(plan)


def test_planning_leaves_targets_plain_the_engine_encrypts_every_one_alike():
    c = make_chain([("full", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.disk_bitmaps["vdb"] = []
    plan = plan_backup(dom, c, BDIR, "inc")
    assert all(dp.target.encryption is None for dp in plan.disks)
    assert encrypted(plan, key=None) is plan
    enc = encrypted(plan)
    (e,) = {dp.target.encryption for dp in enc.disks}               # one secret for the whole job
    assert e is not None and (e.format, e.iter_time_ms) == ("luks", 50) and len(e.secret_uuid) == 36
    assert "plan-test-passphrase" not in repr(enc)
    assert [(dp.mode, dp.target.path, dp.target.backing_link) for dp in enc.disks] == [
        (dp.mode, dp.target.path, dp.target.backing_link) for dp in plan.disks]
    assert encrypted(plan).disks[0].target.encryption != e          # a fresh secret per run


# --- pull ------------------------------------------------------------------------------------------
def test_pull_scratch_files_carry_the_chains_checkpoint_prefix():
    c = make_chain([("full", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.disk_list[1] = Disk("vdb", "disk", "file", "qcow2", "/srv/pool 2/vdb.qcow2", "virtio-disk2", 2)
    plan = plan_backup(dom, c, BDIR, "inc")
    files = {dp.disk.target: scratch_path(None, dp.disk.source or "", plan.checkpoint, dp.disk.target)
             for dp in plan.disks}
    assert files == {"vda": f"/vm/{plan.checkpoint}-vda.scratch",
                     "vdb": f"/srv/pool 2/{plan.checkpoint}-vdb.scratch"}
    assert scratch_path("/srv/scratch", "/vm/vda.qcow2", plan.checkpoint, "vda") == \
        f"/srv/scratch/{plan.checkpoint}-vda.scratch"
    assert scratch_path(None, "vda.qcow2", plan.checkpoint, "vda") == \
        f"/var/lib/libvirt/images/{plan.checkpoint}-vda.scratch"
    # a later run recognises the job as its own by the prefix in the scratch file's name
    prefix = checkpoint_prefix(plan.checkpoint)
    assert prefix == c.checkpoint_prefix() and all(prefix in Path(f).name for f in files.values())
    other = make_chain([("full", ["vda"])], dir_id="abcd12345")
    assert other.checkpoint_prefix() not in Path(files["vda"]).name


def test_pull_without_the_key_refuses_an_encrypted_plan_before_touching_the_domain():
    c = make_chain([("full", ["vda"])])
    plan = encrypted(plan_backup(domain_for(c), c, BDIR, "inc"))
    runner = PullRunner(None, BDIR.path / POINTS_DIR, lambda _m: None)  # type: ignore[arg-type]
    with pytest.raises(BackupFailed, match="the target is encrypted but the runner has no key"):
        runner.start(plan)


def test_stale_scratch_files_of_this_chain_only_are_removed(tmp_path):
    """A scratch file a failed run left (same point, same name each retry) blocked every later
    pull backup; now names carry a per-run tag and this chain's stale ones are removed. Nothing
    else in the directory is touched: other chains' files, look-alikes, symlinks, directories."""
    from virtbackup.runners.pull import remove_stale_scratch
    prefix = "virtbackup-0a1b2c3d-"
    ours = [f"{prefix}0007-vda.scratch", f"{prefix}0007-vdb-1f2e3d.scratch"]
    others = ["virtbackup-99999999-0007-vda.scratch", f"{prefix}0007-vda.qcow2", "vm.qcow2",
              f"{prefix}x-vda.scratch"]
    for n in ours + others:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / f"{prefix}0008-vda.scratch").symlink_to(tmp_path / "vm.qcow2")
    (tmp_path / f"{prefix}0009-vda.scratch").mkdir()
    said: List[str] = []
    remove_stale_scratch(str(tmp_path), prefix, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        others + [f"{prefix}0008-vda.scratch", f"{prefix}0009-vda.scratch"])
    assert len(said) == 2 and all("left by an earlier run" in m for m in said)
    assert scratch_path("/s", "/vm/a.qcow2", f"{prefix}0007", "vda", "abc123") == f"/s/{prefix}0007-vda-abc123.scratch"


# --- offline: the private QEMU's job -------------------------------------------------------------------
class FakeQmp:
    """Records the QMP commands the offline runner sends (in place of qmp.PrivateQemu)."""

    def __init__(self, nodes: Optional[List[Dict[str, Any]]] = None):
        self.commands: List[Tuple[str, Dict[str, Any]]] = []
        self.nodes = nodes or []
        self.key_file_held: List[bytes] = []

    def execute(self, command: str, arguments: Optional[Dict[str, Any]] = None) -> Any:
        self.commands.append((command, dict(arguments or {})))
        if command == "object-add":
            self.key_file_held.append(Path(arguments["file"]).read_bytes())  # type: ignore[index]
        if command == "query-named-block-nodes":
            return self.nodes
        return {}


def offline_runner(dom: FakeDomain, key: Optional[keys.Key] = None, max_speed: Optional[int] = None) -> OfflineRunner:
    """An OfflineRunner whose idea of the domain's inactive disks is the fake's."""
    runner = OfflineRunner(None, lambda _m: None, max_speed, key)  # type: ignore[arg-type]
    runner._inactive_disks = lambda: {d.target: d for d in dom.disks()}  # type: ignore[method-assign]
    return runner


def fallback_plan() -> Tuple[FakeDomain, Chain, BackupPlan]:
    """An inc where vda continues from its bitmap and vdb (block device) is copied whole."""
    c = make_chain([("full", ["vda", "vdb"]), ("inc", ["vda", "vdb"])])
    dom = domain_for(c, ("vda", "vdb"))
    dom.disk_list[1] = Disk("vdb", "disk", "block", "qcow2", "/dev/vg0/vdb", "virtio-disk2", 2)
    dom.disk_bitmaps["vdb"] = []
    return dom, c, plan_backup(dom, c, BDIR, "auto")


def test_offline_job_disks_follow_the_plan_and_the_current_definition():
    dom, c, plan = fallback_plan()
    disks = offline_runner(dom)._job_disks(plan)
    assert disks == [JobDisk("vda", "/vm/vda.qcow2", "file", BDIR.path / "points/0003.partial/vda.qcow2", full=False),
                     JobDisk("vdb", "/dev/vg0/vdb", "host_device", BDIR.path / "points/0003.partial/vdb.qcow2",
                             full=True)]
    with pytest.raises(BackupFailed, match="target is encrypted but the runner has no key"):
        offline_runner(dom)._job_disks(encrypted(plan))
    assert [d.encrypted for d in offline_runner(dom, KEY)._job_disks(encrypted(plan))] == [True, True]
    gone = FakeDomain(dom.disk_list[:1], dom.sizes)
    with pytest.raises(BackupFailed, match="disk vdb is no longer part of the domain"):
        offline_runner(gone)._job_disks(plan)
    # D16: a raw disk is read through QEMU's raw driver (it used to be refused); a network disk is
    # refused offline with what to do, never left out; a format QEMU's job can't open too
    raw = FakeDomain([dom.disk_list[0], Disk("vdb", "disk", "file", "raw", "/vm/vdb.raw", None, 2)], dom.sizes)
    vdb = offline_runner(raw)._job_disks(plan)[1]
    assert (vdb.format, vdb.tracks, vdb.driver) == ("raw", False, "file")
    net = FakeDomain([dom.disk_list[0], Disk("vdb", "disk", "network", "raw", "rbd/vdb", None, 2)], dom.sizes)
    with pytest.raises(BackupFailed, match="disk vdb is a 'network' disk: .*start the domain.*--disk"):
        offline_runner(net)._job_disks(plan)
    vmdk = FakeDomain([dom.disk_list[0], Disk("vdb", "disk", "file", "vmdk", "/vm/vdb.vmdk", None, 2)], dom.sizes)
    with pytest.raises(BackupFailed, match="format 'vmdk' cannot be read offline"):
        offline_runner(vmdk)._job_disks(plan)


def test_offline_transaction_adds_the_new_bitmap_everywhere_and_reads_the_base_only_where_planned(monkeypatch):
    monkeypatch.delenv("VIRTBACKUP_OFFLINE_SPEED", raising=False)
    dom, c, plan = fallback_plan()
    runner = offline_runner(dom, max_speed=8 * MiB)
    qmp = FakeQmp()
    runner._start_jobs(qmp, runner._job_disks(plan), plan.base_checkpoint, plan.checkpoint)  # type: ignore[arg-type]
    ((cmd, args),) = qmp.commands
    assert cmd == "transaction"
    assert args["actions"] == [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src-vda", "name": plan.checkpoint, "persistent": True}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "src-vdb", "name": plan.checkpoint, "persistent": True}},
        {"type": "blockdev-backup", "data": {"job-id": "backup-vda", "device": "src-vda", "target": "tgt-vda",
                                             "speed": 8 * MiB, "sync": "bitmap", "bitmap": c.checkpoint_name("0002"),
                                             "bitmap-mode": "never"}},
        {"type": "blockdev-backup", "data": {"job-id": "backup-vdb", "device": "src-vdb", "target": "tgt-vdb",
                                             "speed": 8 * MiB, "sync": "full"}},
    ]
    unlimited = FakeQmp()
    offline_runner(dom)._start_jobs(unlimited, runner._job_disks(plan), None, plan.checkpoint)  # type: ignore[arg-type]
    jobs = [a["data"] for a in unlimited.commands[0][1]["actions"] if a["type"] == "blockdev-backup"]
    assert all("speed" not in j for j in jobs)


def node(name: str, bitmaps: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"node-name": name, "dirty-bitmaps": bitmaps}


def qmp_bitmap(name: str, **flags: Any) -> Dict[str, Any]:
    return {"name": name, "recording": True, "busy": False, "persistent": True, "granularity": 65536, "count": 0,
            **flags}


def test_offline_recheck_of_base_bitmaps_ignores_disks_copied_whole():
    dom, c, plan = fallback_plan()
    runner = offline_runner(dom)
    disks = runner._job_disks(plan)
    base = plan.base_checkpoint
    assert base is not None
    # vdb (copied whole) lacks the bitmap as QEMU loaded it too: fine
    runner._check_base_bitmaps(FakeQmp([node("src-vda", [qmp_bitmap(base)]), node("src-vdb", [])]),  # type: ignore[arg-type]
                               disks, base)
    # vda's turned out inconsistent once QEMU opened the image: refused (auto then retries as a full)
    qmp = FakeQmp([node("src-vda", [qmp_bitmap(base, inconsistent=True)]), node("src-vdb", [])])
    with pytest.raises(LevelNotPossible, match=f"cannot continue the chain offline: bitmap {base} on disk vda is "
                                               "inconsistent"):
        runner._check_base_bitmaps(qmp, disks, base)  # type: ignore[arg-type]


def test_offline_encrypted_targets_get_the_secret_object_from_a_file_that_is_gone_afterwards():
    dom, c, plan = fallback_plan()
    runner = offline_runner(dom, KEY)
    qmp = FakeQmp()
    runner._open_images(qmp, runner._job_disks(encrypted(plan)))  # type: ignore[arg-type]
    names = [cmd for cmd, _ in qmp.commands]
    assert names == ["object-add", "blockdev-add", "blockdev-add", "blockdev-add", "blockdev-add"]
    obj = qmp.commands[0][1]
    assert qmp.key_file_held == [KEY.data] and not Path(obj["file"]).exists()
    assert obj == {"qom-type": "secret", "id": keys.SECRET_ID, "file": obj["file"], "format": "raw"}
    assert "plan-test-passphrase" not in repr(qmp.commands)
    adds = [a for cmd, a in qmp.commands if cmd == "blockdev-add"]
    src_vdb = next(a for a in adds if a["node-name"] == "src-vdb")
    assert src_vdb["file"] == {"driver": "host_device", "filename": "/dev/vg0/vdb"}
    for a in adds:
        if a["node-name"].startswith("tgt-"):
            assert a["encrypt"] == {"format": "luks", "key-secret": keys.SECRET_ID} and a["backing"] is None
        else:
            assert "encrypt" not in a                     # the domain's own images are read as they are
    plain = FakeQmp()
    offline_runner(dom)._open_images(plain, runner._job_disks(plan))  # type: ignore[arg-type]
    assert [cmd for cmd, _ in plain.commands] == ["blockdev-add"] * 4


def test_a_run_dir_too_long_for_the_nbd_socket_is_refused_before_the_job(monkeypatch, tmp_path):
    """The pull job's unix socket lives in $VIRTBACKUP_RUN_DIR; a path over 107 bytes made
    libvirt fail the job halfway ('... .sock is too long', found by the soak under pytest's
    deep tmp dirs). Refused up front now, nothing created."""
    from types import SimpleNamespace

    from virtbackup.runners.pull import MAX_SOCKET_PATH
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(deep))
    handle = SimpleNamespace(conn=SimpleNamespace(getURI=lambda: "qemu:///system"))
    runner = PullRunner(handle, BDIR.path / POINTS_DIR, lambda _m: None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=f"over the {MAX_SOCKET_PATH} a unix socket path can have"):
        runner._servers("virtbackup-0a1b2c3d-0003")
    assert not deep.exists()
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(tmp_path / "run"))
    sock = runner._servers("virtbackup-0a1b2c3d-0003")[0].socket
    assert sock == str(tmp_path / "run" / "nbd-virtbackup-0a1b2c3d-0003.sock")


def test_an_empty_nbd_tls_dir_is_refused_not_taken_as_the_default(tmp_path):
    """`--nbd-tls-dir ""` with a remote URI fell back to /etc/pki/virtbackup without a word;
    refused before any connection now (nothing touched)."""
    from virtbackup.backup import backup
    for empty in ("", "  "):
        with pytest.raises(UsageError, match="--nbd-tls-dir needs a directory, not an empty string"):
            backup("qemu+ssh://nowhere.invalid/system", "dom", tmp_path / "bk", mode="pull", nbd_tls_dir=empty)
    assert not (tmp_path / "bk").exists()
