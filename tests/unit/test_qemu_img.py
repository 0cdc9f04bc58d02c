"""qemu-img wrappers: the argv each one builds (pure), how a key reaches qemu-img (a pipe, never
the argv), the exit-status decisions, and QEMU's image locks. Where only qemu-img's own parser can
say whether an argv is right (QEMU option escaping, `json:` names, progress lines), the real
binary runs on tiny images in tmp_path."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import pytest

from virtbackup import observe
from virtbackup.errors import HostError
from virtbackup.qemu import keys, qemu_img
from virtbackup.qemu.keys import SECRET_ID, Key

MiB = 1 << 20
SECRET = b"correct horse,battery staple"       # a comma: it must not end up in any option string
KEY = Key(SECRET, "test")
ITER = 10                                      # LUKS key derivation ms: fast images for tests


def opts(text: str) -> List[Tuple[str, str]]:
    """QEMU's key=value,... syntax parsed as QEMU does (a doubled comma is a literal comma)."""
    out, key, cur, i = [], None, "", 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1:i + 2] == ",":
            cur += ","
            i += 2
            continue
        if ch == ",":
            out.append((key, cur) if key is not None else (cur, ""))
            key, cur = None, ""
        elif ch == "=" and key is None:
            key, cur = cur, ""
        else:
            cur += ch
        i += 1
    out.append((key, cur) if key is not None else (cur, ""))
    return out


# --- create --------------------------------------------------------------------------------------
def test_create_plain_standalone():
    assert qemu_img.create_args(Path("/b/points/0001.partial/vda.qcow2"), 64 * MiB) == [
        "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "/b/points/0001.partial/vda.qcow2", str(64 * MiB)]


def test_create_stores_a_relative_backing_as_given_with_its_format_and_does_not_open_it():
    args = qemu_img.create_args(Path("/b/points/0002.partial/vda.qcow2"), 64 * MiB, backing="../0001/vda.qcow2",
                                cluster_size=65536)
    assert args[:6] == ["create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536"]
    i = args.index("-b")
    assert args[i + 1] == "../0001/vda.qcow2"                   # not resolved, not made absolute
    assert args[args.index("-F") + 1] == "qcow2"                # never probed: a backing's format is given
    assert "-u" in args                                         # the backing is not opened
    assert args[-2:] == ["/b/points/0002.partial/vda.qcow2", str(64 * MiB)]


def test_create_encrypted_names_the_secret_object_never_the_key():
    args = qemu_img.create_args(Path("/b/x.qcow2"), MiB, encrypt_iter_time=250)
    o = dict(opts(args[args.index("-o") + 1]))
    assert o["encrypt.format"] == "luks" and o["encrypt.key-secret"] == SECRET_ID
    assert o["encrypt.iter-time"] == "250" and o["compat"] == "1.1"
    assert (o["encrypt.cipher-alg"], o["encrypt.cipher-mode"], o["encrypt.ivgen-alg"], o["encrypt.hash-alg"]) == (
        "aes-256", "xts", "plain64", "sha256")
    assert "encrypt.format=luks" not in ",".join(qemu_img.create_args(Path("/b/x.qcow2"), MiB))


class Recorder:
    """Stands in for qemu_img.execute: records each argv and what the passed fds held (the key
    pipe is read as qemu-img would read it), and answers with `returncode`/`stderr`."""

    def __init__(self, returncode: int = 0, stderr: str = "", stdout: str = "{}"):
        self.calls: List[Tuple[List[str], Tuple[int, ...], List[bytes]]] = []
        self.returncode, self.stderr, self.stdout = returncode, stderr, stdout

    def __call__(self, cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> "subprocess.CompletedProcess[str]":
        held = [os.read(fd, 65536) for fd in pass_fds]
        self.calls.append((list(cmd), tuple(pass_fds), held))
        return subprocess.CompletedProcess(list(cmd), self.returncode, self.stdout, self.stderr)


def test_create_with_a_key_hands_it_over_a_pipe_named_after_the_subcommand(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(qemu_img, "execute", rec)
    qemu_img.create(Path("/b/x.qcow2"), MiB, backing="../0001/x.qcow2", key=KEY)
    ((argv, fds, held),) = rec.calls
    assert argv[:2] == ["qemu-img", "create"]
    assert argv[2] == "--object" and len(fds) == 1
    assert dict(opts(argv[3])) == {"secret": "", "id": SECRET_ID, "file": f"/dev/fd/{fds[0]}", "format": "raw"}
    assert held == [SECRET]                                     # the key went through the pipe ...
    assert not any(SECRET.decode() in a or "horse" in a for a in argv)   # ... and nowhere else
    assert f"encrypt.iter-time={keys.DEFAULT_ITER_TIME_MS}" in argv[argv.index("-o") + 1]
    with pytest.raises(OSError):
        os.fstat(fds[0])                                        # both ends closed after the run


class ChainRecorder(Recorder):
    """A Recorder that answers `info` for an encrypted image of two layers."""

    def __call__(self, cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> "subprocess.CompletedProcess[str]":
        proc = super().__call__(cmd, pass_fds)
        if cmd[1] == "info":
            proc.stdout = '[{"encrypted": true}, {"encrypted": true}]' if "--backing-chain" in cmd else \
                '{"encrypted": true}'
        return proc


@pytest.mark.parametrize("call, runs", [
    (lambda: qemu_img.check(Path("/b/x.qcow2"), key=KEY), ["check"]),
    (lambda: qemu_img.compare(Path("/b/x.qcow2"), Path("/b/y.qcow2"), key=KEY), ["compare"]),
    (lambda: qemu_img.convert(Path("/b/x.qcow2"), Path("/r/x.qcow2"), key=KEY, encrypt_iter_time=ITER), ["convert"]),
    (lambda: qemu_img.read_all(Path("/b/x.qcow2"), MiB, key=KEY), ["convert"]),
    (lambda: qemu_img.rebase(Path("/b/p/2/x.qcow2"), "../1/x.qcow2", key=KEY), ["rebase", "rebase"]),
    (lambda: qemu_img.rebase(Path("/b/p/2/x.qcow2"), "../1/x.qcow2", safe=False, key=KEY), ["rebase"]),
])
def test_every_keyed_run_gets_the_key_through_its_own_pipe_only(monkeypatch, call, runs):
    rec = ChainRecorder()
    monkeypatch.setattr(qemu_img, "execute", rec)
    call()
    keyed = [(argv, fds, held) for argv, fds, held in rec.calls if argv[1] != "info"]
    assert [argv[1] for argv, _, _ in keyed] == runs
    for argv, fds, held in keyed:
        assert argv[2] == "--object" and dict(opts(argv[3]))["file"] == f"/dev/fd/{fds[0]}"
        assert held == [SECRET]
    for argv, fds, _ in rec.calls:
        assert not any("horse" in a for a in argv), argv
        if argv[1] == "info":
            assert fds == () and "--object" not in argv   # reading headers needs no key


def test_a_transient_luks_failure_is_retried_in_place(monkeypatch, tmp_path):
    target = tmp_path / "x.qcow2"
    outcomes = [(1, "qemu-img: x.qcow2: Unable to get accurate CPU usage"), (0, "")]
    seen: List[bool] = []

    def flaky(cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> "subprocess.CompletedProcess[str]":
        seen.append(target.exists())
        target.write_bytes(b"partial")
        rc, err = outcomes.pop(0)
        return subprocess.CompletedProcess(list(cmd), rc, "", err)

    monkeypatch.setattr(qemu_img, "execute", flaky)
    monkeypatch.setattr(qemu_img.time, "sleep", lambda _s: None)
    qemu_img.create(target, MiB, key=KEY, iter_time=ITER)
    assert seen == [False, True]      # the second attempt rewrites the same file (never unlinked)


@pytest.mark.parametrize("key, stderr", [
    (None, "qemu-img: Unable to get accurate CPU usage"),   # a plain image: nothing to retry
    (KEY, "qemu-img: x.qcow2: Permission denied"),          # not the transient
])
def test_other_failures_are_not_retried(monkeypatch, tmp_path, key, stderr):
    rec = Recorder(returncode=1, stderr=f"warning: something\n{stderr}\n\n")
    monkeypatch.setattr(qemu_img, "execute", rec)
    with pytest.raises(HostError, match=f"cannot create .*x.qcow2: {stderr}$"):
        qemu_img.create(tmp_path / "x.qcow2", MiB, key=key, iter_time=ITER)
    assert len(rec.calls) == 1


def test_the_transient_gives_up_after_forty_attempts_with_capped_pauses(monkeypatch, tmp_path):
    rec = Recorder(returncode=1, stderr="Unable to get accurate CPU usage")
    monkeypatch.setattr(qemu_img, "execute", rec)
    pauses: List[float] = []
    monkeypatch.setattr(qemu_img.time, "sleep", pauses.append)
    with pytest.raises(HostError, match="accurate CPU usage"):
        qemu_img.create(tmp_path / "x.qcow2", MiB, key=KEY, iter_time=ITER)
    assert len(rec.calls) == 40 and pauses == sorted(pauses) and len(pauses) == 39
    assert max(pauses) == 0.25 and sum(pauses) < 10


# --- naming images: plain, --image-opts, json: ----------------------------------------------------
def test_image_names_plain_and_with_every_encrypted_layer_keyed():
    assert qemu_img.image_names(Path("rel/x.qcow2")) == ["rel/x.qcow2"]
    flag, o = qemu_img.image_names(Path("/b/p/0003/vda.qcow2"), [True, False, True])
    assert flag == "--image-opts"
    assert opts(o) == [("driver", "qcow2"), ("file.filename", "/b/p/0003/vda.qcow2"),
                       ("encrypt.key-secret", SECRET_ID), ("backing.backing.encrypt.key-secret", SECRET_ID)]


def test_image_opts_are_absolute_and_escape_commas():
    _, o = qemu_img.image_names(Path("odd,dir/x,y.qcow2"), [True])
    assert dict(opts(o))["file.filename"] == os.path.abspath("odd,dir/x,y.qcow2")
    assert "odd,,dir/x,,y.qcow2" in o


@pytest.mark.parametrize("chain, share, tail", [
    (False, False, []), (True, False, ["--backing-chain"]), (False, True, ["-U"]),
    (True, True, ["--backing-chain", "-U"])])
def test_info_args(chain, share, tail):
    assert qemu_img.info_args(Path("/b/x.qcow2"), chain, share) == ["info", "--output=json", *tail, "/b/x.qcow2"]


def test_check_args_name_one_layer_only_when_encrypted():
    assert qemu_img.check_args(Path("/b/x.qcow2")) == ["check", "--output=json", "/b/x.qcow2"]
    args = qemu_img.check_args(Path("a,b/x.qcow2"), encrypted=True)
    assert args[:2] == ["check", "--output=json"] and args[2].startswith("json:")
    assert json.loads(args[2][5:]) == {"driver": "qcow2", "backing": None, "encrypt": {"key-secret": SECRET_ID},
                                       "file": {"driver": "file", "filename": os.path.abspath("a,b/x.qcow2")}}


@pytest.mark.parametrize("rc, stdout, stderr, result", [
    (0, '{"check-errors": 0}', "", {"check-errors": 0}),
    (3, '{"leaks": 4}', "Leaked cluster 9 refcount=1 reference=0\n", {"leaks": 4}),   # leaks only: harmless
    (0, "not json", "", {}),
    (2, '{"corruptions": 1}', "ERROR cluster 5 refcount=0 reference=1\n", "qcow2 corruption found"),
    (1, "", "qemu-img: Could not open 'x': Permission denied\n\n", "qemu-img: Could not open 'x': Permission denied"),
    (63, "", "", "exit status 63"),
])
def test_check_result_decides_by_exit_status(rc, stdout, stderr, result):
    if isinstance(result, dict):
        assert qemu_img.check_result(Path("/b/x.qcow2"), rc, stdout, stderr) == result
    else:
        with pytest.raises(HostError) as e:
            qemu_img.check_result(Path("/b/x.qcow2"), rc, stdout, stderr)
        assert str(e.value) == f"/b/x.qcow2: {result}"


# --- convert, compare, bitmap, rebase, read_all ---------------------------------------------------
def test_convert_args_plain_quiet_and_with_progress():
    src = qemu_img.image_names(Path("/b/p/0002/vda.qcow2"))
    assert qemu_img.convert_args(src, Path("/r/vda.qcow2")) == [
        "convert", "-q", "-W", "-O", "qcow2", "/b/p/0002/vda.qcow2", "/r/vda.qcow2"]
    prog = qemu_img.convert_args(src, Path("/r/vda.raw"), out_format="raw", progress=True)
    assert prog[:2] == ["convert", "-p"] and "-q" not in prog and prog[prog.index("-O") + 1] == "raw"
    assert "-o" not in prog and "-S" not in prog          # sparse: qemu-img's default zero detection


def test_convert_args_encrypting_the_target_reading_an_encrypted_chain():
    src = qemu_img.image_names(Path("/b/p/0002/vda.qcow2"), [True, True])
    args = qemu_img.convert_args(src, Path("/b/p/0002.new/vda.qcow2"), encrypt_iter_time=ITER)
    o = dict(opts(args[args.index("-o") + 1]))
    assert o["encrypt.key-secret"] == SECRET_ID and o["encrypt.iter-time"] == str(ITER)
    i = args.index("--image-opts")
    assert args[i + 1] == src[1] and args[-1] == "/b/p/0002.new/vda.qcow2"
    assert args.index("-o") < i                            # output options before the source


def test_compare_args():
    assert qemu_img.compare_args(Path("/a.qcow2"), Path("/b.qcow2")) == ["compare", "-q", "/a.qcow2", "/b.qcow2"]
    args = qemu_img.compare_args(Path("/a.qcow2"), Path("/b.qcow2"), [True], [True, True])
    assert args[:3] == ["compare", "-q", "--image-opts"] and len(args) == 5
    assert dict(opts(args[3]))["file.filename"] == "/a.qcow2"
    assert dict(opts(args[4]))["backing.encrypt.key-secret"] == SECRET_ID


def test_bitmap_remove_args():
    assert qemu_img.bitmap_remove_args(Path("/vm/a.qcow2"), "virtbackup-ab-0001") == [
        "bitmap", "--remove", "/vm/a.qcow2", "virtbackup-ab-0001"]


@pytest.mark.parametrize("backing, safe, args", [
    ("../0001/vda.qcow2", True, ["-F", "qcow2", "-b", "../0001/vda.qcow2"]),
    ("../0001/vda.qcow2", False, ["-u", "-F", "qcow2", "-b", "../0001/vda.qcow2"]),
    (None, True, ["-b", ""]),
    ("", True, ["-b", ""]),
])
def test_rebase_args(backing, safe, args):
    assert qemu_img.rebase_args(Path("/b/p/0003/vda.qcow2"), backing, safe) == [
        "rebase", "-q", "-f", "qcow2", *args, "/b/p/0003/vda.qcow2"]


def test_encrypted_safe_rebase_opens_the_new_backing_keyed_then_records_the_relative_name():
    path = Path("/b/points/0003/vda.qcow2")
    first, second = qemu_img.encrypted_rebase_args(path, "../0001/vda.qcow2", True, [True, True], [True])
    top = first[first.index("--image-opts") + 1]
    assert dict(opts(top))["backing.encrypt.key-secret"] == SECRET_ID          # reads the old chain
    new = first[first.index("-b") + 1]
    assert new.startswith("json:") and "-u" not in first
    assert json.loads(new[5:]) == {"driver": "qcow2", "file": {"driver": "file",
                                                               "filename": "/b/points/0001/vda.qcow2"},
                                   "encrypt": {"key-secret": SECRET_ID}}
    assert second[:3] == ["rebase", "-q", "-u"] and second[-2:] == ["-b", "../0001/vda.qcow2"]
    assert opts(second[second.index("--image-opts") + 1])[-1] == ("encrypt.key-secret", SECRET_ID)


def test_encrypted_rebase_to_standalone_and_header_only():
    path = Path("/b/points/0003/vda.qcow2")
    (only,) = qemu_img.encrypted_rebase_args(path, None, True, [True, True])
    assert only[-2:] == ["-b", ""] and "-F" not in only
    (unsafe,) = qemu_img.encrypted_rebase_args(path, "../0002/vda.qcow2", False)
    assert unsafe[:3] == ["rebase", "-q", "-u"] and unsafe[-1] == "../0002/vda.qcow2"
    with pytest.raises(ValueError, match="unsafe rebase needs a backing"):
        qemu_img.encrypted_rebase_args(path, None, False)
    with pytest.raises(ValueError, match="absolute"):
        qemu_img.encrypted_rebase_args(Path("rel/vda.qcow2"), None, True, [True])


def test_read_all_args_copy_into_the_null_driver():
    assert qemu_img.read_all_args(["/b/x.qcow2"], 64 * MiB) == [
        "convert", "-q", "-n", "/b/x.qcow2", "--target-image-opts", f"driver=null-co,size={64 * MiB}"]


@pytest.mark.parametrize("path, name", [
    ("vm:1/x.qcow2", "./vm:1/x.qcow2"), ("x:y.qcow2", "./x:y.qcow2"), ("json:{}", "./json:{}"),
    ("/b/vm:1/x.qcow2", "/b/vm:1/x.qcow2"), ("./vm:1/x.qcow2", "./vm:1/x.qcow2"), ("d/x:y.qcow2", "d/x:y.qcow2"),
    ("a,b.qcow2", "a,b.qcow2")])
def test_a_relative_name_that_qemu_would_take_for_a_protocol_gets_dot_slash(path, name):
    assert qemu_img.file_name(Path(path) if not path.startswith("./") else path) == name
    assert qemu_img.info_args(Path(path))[-1] == qemu_img.file_name(Path(path))


def test_relative_names_with_a_colon_work_with_the_real_binary(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path("vm:1").mkdir()
    qemu_img.create(Path("vm:1/base.qcow2"), MiB)
    qemu_img.create(Path("vm:1/top.qcow2"), MiB, backing="base.qcow2")
    assert qemu_img.info(Path("vm:1/top.qcow2"))["backing-filename"] == "base.qcow2"
    qemu_img.convert(Path("vm:1/top.qcow2"), Path("vm:2.qcow2"))
    assert qemu_img.compare(Path("vm:1/top.qcow2"), Path("vm:2.qcow2"))
    qemu_img.check(Path("vm:2.qcow2"))
    qemu_img.rebase(Path("vm:1/top.qcow2"), None)
    assert qemu_img.info(Path("vm:1/top.qcow2")).get("backing-filename") is None


# --- the real binary: escaping, json: names, progress, and no key in any argv ----------------------
def test_encrypted_chain_in_a_directory_with_commas_works_and_no_argv_holds_the_key(monkeypatch, tmp_path):
    calls: List[List[str]] = []
    real = qemu_img.execute

    def spy(cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> Any:
        calls.append(list(cmd))
        return real(cmd, pass_fds)

    monkeypatch.setattr(qemu_img, "execute", spy)
    d = tmp_path / "a,b=c"
    d.mkdir()
    base, top = d / "base,1.qcow2", d / "top,2.qcow2"
    qemu_img.create(base, MiB, key=KEY, iter_time=ITER)      # ~2 s: QEMU times PBKDF2 for every new header
    top.write_bytes(base.read_bytes())                         # a second layer without a second header
    qemu_img.rebase(top, "base,1.qcow2", safe=False, key=KEY)
    assert qemu_img.info(top)["backing-filename"] == "base,1.qcow2"
    assert qemu_img.layers(top) == [True, True]
    copy = d / "copy,3.qcow2"
    qemu_img.convert(top, copy, key=KEY)
    assert not qemu_img.info(copy).get("encrypted")
    assert qemu_img.compare(copy, top, key=KEY)
    qemu_img.check(top, key=KEY)
    qemu_img.read_all(top, MiB, key=KEY)
    qemu_img.rebase(top, None, key=KEY)
    assert qemu_img.info(top).get("backing-filename") is None
    subs = {c[1] for c in calls}
    assert {"create", "info", "convert", "compare", "check", "rebase"} <= subs
    for c in calls:
        assert not any("horse" in a for a in c), c
    with pytest.raises(HostError, match="cannot convert"):
        qemu_img.convert(top, d / "x.qcow2", key=Key(b"wrong", "test"))


def test_convert_reports_qemu_imgs_own_progress(tmp_path):
    src = tmp_path / "s.qcow2"
    qemu_img.create(src, 4 * MiB)
    seen: List[Tuple[str, float, float]] = []
    with observe.observing(lambda what, done, total: seen.append((what, done, total))):
        qemu_img.convert(src, tmp_path / "d.qcow2")
    assert seen and seen[-1] == ("s.qcow2", 100.0, 100.0)
    assert qemu_img.compare(src, tmp_path / "d.qcow2")


def test_run_reports_the_last_error_line(tmp_path):
    with pytest.raises(HostError, match=r"^cannot inspect .*missing.qcow2: qemu-img: Could not open"):
        qemu_img.info(tmp_path / "missing.qcow2")


# --- QEMU's image locks --------------------------------------------------------------------------
def ofd_lock(fd: int, start: int, kind: int = fcntl.F_RDLCK) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0))


@pytest.mark.parametrize("offset, in_use", [(100, True), (201, True), (299, True), (99, False), (300, False)])
def test_image_in_use_sees_locks_in_qemus_ranges_only(tmp_path, offset, in_use):
    img = tmp_path / "x.qcow2"
    img.write_bytes(b"\0" * 512)
    assert not qemu_img.image_in_use(str(img))
    fd = os.open(img, os.O_RDONLY)           # a second open file description: as another process
    try:
        ofd_lock(fd, offset)
        assert qemu_img.image_in_use(str(img)) is in_use
    finally:
        os.close(fd)
    assert not qemu_img.image_in_use(str(img))
    assert not qemu_img.image_in_use(str(tmp_path / "missing.qcow2"))


def test_wait_released_gives_up_naming_the_image(tmp_path):
    img = tmp_path / "x.qcow2"
    img.write_bytes(b"\0" * 512)
    fd = os.open(img, os.O_RDONLY)
    try:
        ofd_lock(fd, 200)
        with pytest.raises(HostError, match=f"QEMU still holds {img} open"):
            qemu_img.wait_released([str(img)], timeout=0.05)
    finally:
        os.close(fd)
    qemu_img.wait_released([str(img)], timeout=0.05)


def test_image_in_use_sees_a_real_qemu_process(tmp_path):
    img = tmp_path / "x.qcow2"
    qemu_img.create(img, MiB)
    proc = subprocess.Popen(["qemu-io", "-c", "sleep 300", str(img)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not qemu_img.image_in_use(str(img)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert qemu_img.image_in_use(str(img))
        qemu_img.wait_released([str(img)], timeout=10)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

