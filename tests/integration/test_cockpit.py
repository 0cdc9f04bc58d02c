"""The Cockpit "Backups" page (cockpit/) in a real browser: headless Chromium through Selenium,
against a private cockpit-ws on 127.0.0.1, logged in with a password as a throwaway user whose
administrative access goes through sudo, on real scratch domains and real backups.

Screenshots of every screen are kept in $VIRTBACKUP_COCKPIT_SHOTS (default
/tmp/virtbackup-cockpit-shots); each path is printed (pytest -s, or the captured output of a
failing test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import libvirt
import pytest

from tests.support import cockpit, scratch
from tests.support.helpers import MiB, cli, take_backup

MISSING = cockpit.missing()
# skipped on a host without Cockpit or Chromium, but never in CI (CI=true): there a missing
# package is a missing install step and fails
pytestmark = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))

SHOTS = Path(os.environ.get("VIRTBACKUP_COCKPIT_SHOTS", "/tmp/virtbackup-cockpit-shots"))
CONFIG = Path("/etc/virtbackup/cockpit.json")
VIRTBACKUP = str(Path(sys.executable).parent / "virtbackup")


@pytest.fixture(scope="module")
def page_config() -> Iterator[None]:
    """The page's settings file is the host's: keep what was there and put it back afterwards."""
    if MISSING is not None:
        pytest.fail(f"CI: {MISSING}")
    created_dir = not CONFIG.parent.exists()
    saved: Optional[bytes] = CONFIG.read_bytes() if CONFIG.exists() else None
    yield
    if saved is not None:
        CONFIG.write_bytes(saved)
    else:
        CONFIG.unlink(missing_ok=True)
    if created_dir:
        shutil.rmtree(CONFIG.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, page_config: None) -> Iterator[cockpit.Browser]:
    shutil.rmtree(SHOTS, ignore_errors=True)
    print(f"screenshots in {SHOTS}")
    with cockpit.session(tmp_path_factory.mktemp("cockpit"), SHOTS) as b:
        yield b


def write_config(**kw: Any) -> None:
    CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
    CONFIG.write_text(json.dumps({"virtbackup": VIRTBACKUP, "environ": [], "job_files": [], "backup_dirs": [], **kw}))


def rows(b: cockpit.Browser) -> List[Any]:
    return b.all("#overview tbody tr")


def row_of(b: cockpit.Browser, bdir: Path) -> Any:
    return b.css(f"#overview tr[data-dir='{bdir}']")


def points_of(bdir: Path) -> List[dict]:
    r = cli("list", bdir, "--json")
    assert r.rc == 0, r
    pts: List[dict] = r.json()["points"]
    return pts


def open_domain(b: cockpit.Browser, bdir: Path) -> None:
    b.wait(lambda: row_of(b, bdir), what=f"the overview row of {bdir}")
    row_of(b, bdir).click()
    b.wait(lambda: b.all("#domain-name") and b.all("#actions"), what="the domain page")


def show_dir(b: cockpit.Browser, bdir: Path, **config: Any) -> None:
    """The page configured with this one backup directory, on its domain page."""
    write_config(backup_dirs=[str(bdir)], **config)
    b.open_page()
    open_domain(b, bdir)


def dialog(b: cockpit.Browser, action: str, field: str) -> None:
    """Click an action's button and wait for its dialog (one of its fields)."""
    b.click(f"#action-{action}")
    b.wait(lambda: b.all(field), what=f"the {action} dialog")


def fill(b: cockpit.Browser, selector: str, value: str) -> None:
    b.css(selector).clear()
    b.css(selector).send_keys(value)


def run_action(b: cockpit.Browser, action: str, timeout: float = 180) -> str:
    """Confirm the open dialog and wait for the action's outcome: 'done' or 'failed'."""
    b.click("#modal-confirm")
    b.wait(lambda: b.css("#task").get_attribute("data-state") in ("done", "failed"), timeout,
           what=f"{action} to end")
    b.wait_idle()
    state: str = b.css("#task").get_attribute("data-state")
    return state


def test_overview_domain_page_backup_now_verify_drill(browser: cockpit.Browser, make_domain: Any,
                                                      tmp_path: Path) -> None:
    """Overview with a failed job domain first and an OK one; the domain page's timeline and
    details; "back up now" records a point `list` then shows; verify; a drill shows its result."""
    b = browser
    ok = make_domain()
    bad = make_domain()
    ok_dir = tmp_path / "ok"
    take_backup(ok.name, ok_dir, "full")
    ok.write("vda", 0x5A, 0, 2 * MiB)
    take_backup(ok.name, ok_dir, "inc")
    # a nightly job whose run failed for its domain (level inc with no chain yet): exit 1
    root = tmp_path / "root"
    root.mkdir()
    metrics = tmp_path / "metrics.prom"
    job = tmp_path / "nightly.toml"
    job.write_text(f'backup_root = "{root}"\ndomains = ["{bad.name}"]\nlevel = "inc"\n'
                   f'metrics_file = "{metrics}"\n')
    r = cli("run", job, "--json")
    assert r.rc == 1 and r.json()["domains"][0]["status"] == "failed", r

    # the settings dialog writes the page's config on the host
    write_config()
    b.open_page()
    assert "Backups" in b.shell_menu()     # installed as a Cockpit package: a menu entry of its own
    b.click("#settings")
    b.wait(lambda: b.all("#settings-jobs"))
    b.css("#settings-jobs").send_keys(str(job))
    b.css("#settings-dirs").send_keys(str(ok_dir))
    b.click("#modal-confirm")
    b.wait(lambda: CONFIG.exists() and json.loads(CONFIG.read_text())["job_files"] == [str(job)],
           what="the settings to be saved")
    b.wait_loaded()
    b.wait(lambda: len(rows(b)) == 2, what="two overview rows")

    # problems first: the failed job domain, with the CLI's own words, then the good one
    first, second = rows(b)
    assert first.get_attribute("data-domain") == bad.name
    assert first.find_element("css selector", ".vb-badge").get_attribute("data-status") == "error"
    assert first.find_element("css selector", ".vb-lastrun").text.startswith("failed")
    assert "cannot take an incremental backup" in first.find_element("css selector", ".vb-problems").text
    assert second.get_attribute("data-domain") == ok.name
    assert second.find_element("css selector", ".vb-badge").get_attribute("data-status") == "ok"
    assert "2 in chain, 2 points" in second.find_element("css selector", ".vb-chain").text
    assert second.find_element("css selector", ".vb-consistency").text == "crash"
    stored = sum(p["size"] for p in points_of(ok_dir))
    assert second.find_element("css selector", ".vb-stored").text.strip().startswith(
        f"{stored / 1024 / 1024:.1f} MiB" if stored >= MiB else f"{stored / 1024:.1f} KiB")
    b.shot("01-overview")

    # the domain page: a bar per point, the newest selected, details of another on a click
    open_domain(b, ok_dir)
    assert [g.get_attribute("data-point") for g in b.all("#timeline .vb-point")] == ["0001", "0002"]
    assert b.css("#point-details").get_attribute("data-point") == "0002"
    b.css("#timeline .vb-point[data-point='0001']").click()
    b.wait(lambda: b.css("#point-details").get_attribute("data-point") == "0001")
    assert "Level full" in b.text("#point-details") and "Parent -" in b.text("#point-details")
    b.shot("02-domain")

    # back up now (inc): live progress, then the point `list` shows
    dialog(b, "backup-now", "#backup-level")
    b.css("#backup-level option[value='inc']").click()
    b.shot("03-backup-confirm")
    assert run_action(b, "backup") == "done", b.text("#task")
    assert "Point 0003 recorded: inc" in b.text("#task-summary")
    assert int(b.css("#task").get_attribute("data-progress-events") or 0) >= 1     # backup --progress-fd
    assert [(p["id"], p["level"]) for p in points_of(ok_dir)] == [("0001", "full"), ("0002", "inc"), ("0003", "inc")]
    b.wait(lambda: len(b.all("#timeline .vb-point")) == 3, what="the new point in the timeline")
    b.shot("04-backup-done")

    # verify (deep)
    dialog(b, "verify", "#verify-deep")
    b.css("#verify-deep").click()
    assert run_action(b, "verify") == "done", b.text("#task")
    assert "ok: 3 point(s), 3 image(s) verified, 3 chain(s) read" in b.text("#task-summary")
    b.shot("05-verify")

    # a restore drill: this scratch domain has no guest OS and no agent channel, and the drill
    # says so in the CLI's words (exit 2: nothing was started)
    dialog(b, "drill", "#drill-timeout")
    fill(b, "#drill-timeout", "20")
    assert run_action(b, "drill") == "failed"
    assert "no guest agent channel" in b.text("#task-error")
    assert "exit 2" in b.text("#task-state")
    b.shot("06-drill")

    # back on the overview the new point is there
    b.css(".vb-back").click()
    b.wait(lambda: rows(b) and "3 points" in row_of(b, ok_dir).find_element("css selector", ".vb-chain").text,
           what="the overview to show 3 points")


def test_prune_preview_then_prune_and_restore_as_new_domain(browser: cockpit.Browser, make_domain: Any,
                                                            tmp_path: Path) -> None:
    """Prune shows what --dry-run says before anything changes; then the chain is consolidated;
    a point restores as a new domain that libvirt then has."""
    b = browser
    dom = make_domain()
    bdir = tmp_path / "b"
    take_backup(dom.name, bdir, "full")
    for pattern in (0x11, 0x22):
        dom.write("vda", pattern, 0, MiB)
        take_backup(dom.name, bdir, "inc")
    show_dir(b, bdir)

    dialog(b, "prune", "#prune-keep")
    fill(b, "#prune-keep", "1")
    b.click("#modal-confirm")               # refused until the rules were previewed
    b.wait(lambda: "Preview these rules first" in b.text("#modal-error"))
    assert len(points_of(bdir)) == 3
    b.click("#prune-preview-btn")
    b.wait(lambda: b.all("#prune-summary"), what="the dry-run preview")
    assert "Would drop 2 point(s): 0001, 0002; keep 0003" in b.text("#prune-summary")
    assert len(points_of(bdir)) == 3        # the preview changed nothing
    b.shot("07-prune-preview")
    assert run_action(b, "prune") == "done", b.text("#task")
    assert "Dropped 0001, 0002; kept 0003" in b.text("#task-summary")
    pts = points_of(bdir)
    assert [(p["id"], p["level"]) for p in pts] == [("0003", "full")]
    b.wait(lambda: [g.get_attribute("data-point") for g in b.all("#timeline .vb-point")] == ["0003"])
    assert b.all("#timeline .vb-point[data-point='0003'] rect.vb-merged")
    b.shot("08-pruned")

    name = f"{dom.name}-restored"
    out = tmp_path / "restored"
    try:
        dialog(b, "restore", "#restore-name")
        fill(b, "#restore-name", name)
        fill(b, "#restore-output", str(out))
        assert run_action(b, "restore") == "done", b.text("#task")
        assert f"Restored point 0003 as domain {name}" in b.text("#task-summary")
        assert (out / "vda.qcow2").is_file()
        listed = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True)
        assert listed.returncode == 0 and "shut off" in listed.stdout, listed
        b.shot("09-restored")
    finally:
        scratch.remove_domain(dom.conn, name)


def test_page_model_reads_what_virtbackup_writes(browser: cockpit.Browser, page_config: None) -> None:
    """cockpit/model.js, the page's judgement, run in the page itself on edge cases of the job
    file, the metrics file and run logs (the end-to-end tests above give it the common cases)."""
    b = browser
    write_config()
    b.open_page()

    def js(expr: str, *args: Any) -> Any:
        return b.driver.execute_script(f"return {expr};", *args)

    toml = 'backup_root = "/b"\n# metrics_file = "/no"\nmetrics_file = "/m/x \\"q\\".prom"  # c\n'
    assert js("VBModel.jobMetricsFile(arguments[0])", toml) == '/m/x "q".prom'
    assert js("VBModel.jobMetricsFile(arguments[0])", "backup_root = '/b'\nmetrics_file = '/lit.prom'\n") == "/lit.prom"
    assert js("VBModel.jobMetricsFile(arguments[0])", '[retention]\nmetrics_file = "/in-a-table"\n') is None
    samples = ('virtbackup_job_end_time_seconds{job="n"} 1700000000.5\n'
               'virtbackup_domain_status{job="n",domain="a \\"b\\"",status="ok"} 0\n'
               'virtbackup_domain_status{job="n",domain="a \\"b\\"",status="failed"} 1\n')
    assert js("VBModel.metricsByDomain(VBModel.parseMetrics(arguments[0]))", samples) == {
        'a "b"': {"status": "failed", "time": 1700000000.5, "job": "n"}}
    log = ("2026-12-06T15:22:18 INFO virtbackup.backup: backup of domain d\n"
           "2026-12-06T15:22:18 ERROR virtbackup: backup failed: LevelNotPossible: cannot take it; take a full\n")
    assert js("VBModel.runLogOutcome(arguments[0])", log) == {"ok": False, "message": "cannot take it; take a full"}
    assert js("VBModel.newestBackupLog(arguments[0])", ["prune-20261207T000000Z-1.log", "backup-20261205T000000Z-9.log",
                                                        "backup-20261206T000000Z-2.log", "backup-x.log"]) \
        == "backup-20261206T000000Z-2.log"
    now = 1796600000
    point = {"id": "0001", "level": "full", "chain": "0001", "created": "2026-12-04T00:00:00+00:00", "size": 5,
             "disks": {"vda": {"image": "points/0001/vda.qcow2"}}}
    # a job's failure and its run log within two minutes are one run: the log says why
    row = js("VBModel.summarize(arguments[0], arguments[1])",
             {"dir": "/b", "list": {"domain": "d", "points": [point]},
              "metrics": {"status": "failed", "time": now - 100, "job": "n"},
              "log": {"time": now - 160, "ok": False, "message": "disk full", "name": "backup-x.log"}}, now)
    assert (row["severity"], row["lastRun"]["message"]) == (0, "disk full")
    # a later good run wins over an older failure; a point older than 36 h is a warning
    row = js("VBModel.summarize(arguments[0], arguments[1])",
             {"dir": "/b", "list": {"domain": "d", "points": [point]},
              "metrics": {"status": "ok", "time": now - 10, "job": "n"},
              "log": {"time": now - 3600, "ok": False, "message": "disk full", "name": "backup-x.log"}}, now)
    assert row["lastRun"]["ok"] and row["severity"] == 1
    assert [p["text"] for p in row["problems"]] == ["The newest point is 3.0 days old"]


def agent_channel_added(conn: Any, d: Any) -> None:
    """The scratch domain (shut off) redefined with a guest agent channel, then started: a drill
    then really boots it and waits for an agent that never answers (no guest OS)."""
    from lxml import etree
    xml = etree.fromstring(d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    channel = etree.SubElement(xml.find("devices"), "channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    d.dom = conn.defineXML(etree.tostring(xml, encoding="unicode"))
    d.dom.create()


def test_drill_boots_a_throwaway_domain_and_shows_where_it_failed(browser: cockpit.Browser, make_domain: Any,
                                                                  conn: Any, tmp_path: Path) -> None:
    b = browser
    d = make_domain({"vda": 16 * MiB}, start=False)
    agent_channel_added(conn, d)
    bdir = tmp_path / "b"
    assert cli("backup", d.name, bdir, "--quiesce=off").rc == 0
    show_dir(b, bdir)
    dialog(b, "drill", "#drill-timeout")
    fill(b, "#drill-timeout", "5")
    assert run_action(b, "drill", timeout=120) == "failed"
    assert "Drill failed at agent." in b.text("#task-result")
    assert "drill failed at agent: the guest agent did not answer within 5s" in b.text("#task-error")
    assert "drill: starting point 0001 as throwaway domain" in b.text("#task-log")
    assert not [x.name() for x in conn.listAllDomains(0) if x.name().startswith("virtbackup-drill-")]
    assert "The last restore drill (point 0001" in b.text("#problems")     # remembered, shown as a problem
    b.shot("10-drill-agent")


def test_files_of_a_point_browse_and_download(browser: cockpit.Browser, make_domain: Any,
                                              tmp_path: Path) -> None:
    """A point's filesystems, a directory listing and a file downloaded, all through `files`
    (three libguestfs appliance starts: about 45 s under TCG on an idle machine)."""
    b = browser
    d = make_domain({"vda": 64 * MiB}, start=False)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello from the guest\n")
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "vbdata", "-d", str(tree), str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(d.disk_path("vda"))], check=True)
    bdir = tmp_path / "b"
    assert cli("backup", d.name, bdir).rc == 0          # shut off: an offline backup
    gtmp = tmp_path / "gtmp"
    gtmp.mkdir()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    b.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    show_dir(b, bdir, environ=["LIBGUESTFS_BACKEND=direct", "LIBGUESTFS_BACKEND_SETTINGS=force_tcg",
                               f"LIBGUESTFS_TMPDIR={gtmp}"])
    b.click("#action-files")
    b.wait(lambda: b.all("#fs-list button[data-fs='vda']") or b.all("#files-error"), timeout=240,
           what="the point's filesystems")
    assert "ext4" in b.text("#fs-list") and "vbdata" in b.text("#fs-list")
    b.css("#fs-list button[data-fs='vda']").click()
    b.wait(lambda: b.all("#files-table tr[data-name='hello.txt']") or b.all("#files-error"), timeout=240,
           what="the listing of vda:/")
    assert b.text("#files-path") == "vda:/"
    assert b.text("#files-table tr[data-name='etc'] td") == "etc/"             # a directory to open
    assert "21 B" in b.text("#files-table tr[data-name='hello.txt']")
    b.shot("11-files")
    b.css("#files-table tr[data-name='hello.txt'] button").click()
    got = downloads / "hello.txt"
    b.wait(lambda: got.exists() and got.read_text() == "hello from the guest\n", timeout=240,
           what="the download")


def test_damage_and_chain_health_are_problems_shown_first(browser: cockpit.Browser, make_domain: Any,
                                                          tmp_path: Path) -> None:
    """Damage that the page's verify found is an error, a disk copied whole because its bitmap was
    lost a chain-health warning; both come before the domains without problems."""
    from virtbackup.virt import host, monitor
    b = browser
    fine, lossy, damaged = make_domain(), make_domain({"vda": 16 * MiB, "vdb": 16 * MiB}), make_domain()
    fine_dir, lossy_dir, damaged_dir = tmp_path / "fine", tmp_path / "lossy", tmp_path / "damaged"
    take_backup(fine.name, fine_dir)
    p1 = take_backup(lossy.name, lossy_dir)["point"]
    vdb = next(x.node_name for x in host.domain_disks(lossy.dom.XMLDesc(0)) if x.target == "vdb")
    monitor.qmp(lossy.dom, "block-dirty-bitmap-remove", {"node": vdb, "name": p1["checkpoint"]})
    p2 = take_backup(lossy.name, lossy_dir)["point"]
    assert p2["level"] == "inc" and p2["disks"]["vdb"]["full_reason"], p2
    damaged.write("vda", 0x33, 0, MiB)
    take_backup(damaged.name, damaged_dir)
    image = damaged_dir / "points/0001/vda.qcow2"
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF                               # a flipped byte: the content hash no longer matches
    image.write_bytes(bytes(data))

    write_config(backup_dirs=[str(fine_dir), str(lossy_dir), str(damaged_dir)])
    b.open_page()
    open_domain(b, damaged_dir)
    dialog(b, "verify", "#verify-deep")
    assert run_action(b, "verify") == "failed"
    assert "content hash (blake3) differs" in b.text("#task-result")
    assert "points/0001/vda.qcow2" in b.text("#task-result")
    b.shot("12-verify-damage")

    b.css(".vb-back").click()
    b.wait(lambda: len(rows(b)) == 3, what="three overview rows")
    order = [r.get_attribute("data-dir") for r in rows(b)]
    assert order == [str(damaged_dir), str(lossy_dir), str(fine_dir)], order
    statuses = [r.find_element("css selector", ".vb-badge").get_attribute("data-status") for r in rows(b)]
    assert statuses == ["error", "warning", "ok"], statuses
    assert "Damage found by verify" in row_of(b, damaged_dir).text
    assert "Chain health: disk vdb copied whole in point 0002" in row_of(b, lossy_dir).text
    b.shot("13-overview-problems")


def test_limited_access_says_so_then_loads_when_access_is_turned_on(page_config: None, make_domain: Any,
                                                                   tmp_path: Path) -> None:
    """Without administrative access the page shows nothing of the host but how to get it; turned
    on in Cockpit's top bar (sudo with the user's password), the page loads by itself."""
    dom = make_domain()
    bdir = tmp_path / "b"
    take_backup(dom.name, bdir)
    write_config(backup_dirs=[str(bdir)])
    with cockpit.session(tmp_path, SHOTS, admin=False) as b:
        b.open_page()
        b.wait(lambda: b.all("#no-access"), what="the administrative access notice")
        assert "Limited access" in b.text("#banner")
        assert not b.all("#overview")
        b.shot("00-limited-access")
        b.turn_on_admin()
        b.wait(lambda: b.all(f"#overview tr[data-dir='{bdir}']"), timeout=60, what="the overview after sudo")
        assert not b.css("#banner").is_displayed()
