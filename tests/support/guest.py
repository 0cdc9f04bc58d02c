"""A tiny real Linux guest for tests, the demo and the benchmark (reference F1).

Built from Debian packages only (no image download here): the host's Debian kernel, busybox-static
as the whole userland, and qemu-guest-agent with the libraries it links. The initramfs (plain cpio)
loads the virtio and ext4 modules, mounts the ext4 data disk `vda` on /data and runs the agent;
libvirt boots it by direct kernel boot, with the kernel's uncompressed vmlinux through its PVH entry
(the kernel's xz decompressor under TCG took about half of a boot on loaded cores). Both are cached
under /var/cache/virtbackup-test-guest/<key>/, the key hashing the package versions and this
builder's init script, so they are built once per host and package set (~10 s).

The guest keeps written data in its page cache (periodic writeback off, ext4 commit=300): a file
written without `sync` is not on the disk until something flushes it. That is what makes a
freeze (`backup --quiesce`) observable in tests.

TCG (`<domain type='qemu'>`) is the default: KVM hangs this kernel on the project's machines.
`VIRTBACKUP_TEST_GUEST_VIRT=kvm` boots with KVM where it works.

Scripts use it after putting the repository root on sys.path:
    sys.path.insert(0, str(ROOT)); from tests.support import guest
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import libvirt
import libvirt_qemu
from lxml import etree

CACHE_ROOT = Path(os.environ.get("VIRTBACKUP_TEST_GUEST_CACHE", "/var/cache/virtbackup-test-guest"))
# The guest boots its kernel and initramfs from this cache: a restored or drilled copy keeps a
# direct-boot kernel only from a boot directory the user names (virt/restoredom.py).
os.environ["VIRTBACKUP_BOOT_DIRS"] = ":".join(
    d for d in (os.environ.get("VIRTBACKUP_BOOT_DIRS", ""), str(CACHE_ROOT)) if d)
AGENT_CHANNEL = "org.qemu.guest_agent.0"
# A second port the host writes to and the guest reads from (/dev/virtio-ports/<name>): lets a
# test hold something in the guest until the host says go, without the agent (e.g. the agent
# itself stopped) and without the guest's clock.
CONTROL_CHANNEL = "org.virtbackup.test.0"
DATA_MOUNT = "/data"
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "ext4")
PACKAGES = ("busybox-static", "qemu-guest-agent")
MiB = 1 << 20

# PID 1 of the guest. Bumping anything here changes the cache key.
INIT_SCRIPT = r"""#!/bin/sh
# virtbackup test guest: load virtio + ext4, mount the data disk, run the guest agent.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /data /dev/virtio-ports
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
# Unsynced writes stay in the page cache (tests show what a freeze flushes).
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
for m in $(cat /modules.order); do insmod "$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 -o commit=300 /dev/vda /data; then
    echo "virtbackup-guest: /dev/vda mounted on /data"
else
    echo "virtbackup-guest: no ext4 data disk on /dev/vda"
fi
i=0
while [ ! -e /dev/virtio-ports/__AGENT__ ] && [ $i -lt 200 ]; do
    for p in /sys/class/virtio-ports/vport*; do
        [ -e "$p/name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
    done
    sleep 0.1; i=$((i+1))
done
echo "virtbackup-guest: starting qemu-ga"
while true; do
    qemu-ga -m virtio-serial -p /dev/virtio-ports/__AGENT__ -t /run
    echo "virtbackup-guest: qemu-ga exited ($?), restarting"
    sleep 1
done
""".replace("__AGENT__", AGENT_CHANNEL)


def _say(msg: str) -> None:
    print(f"test-guest: {msg}", file=sys.stderr, flush=True)


# -- the boot files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    kver: str


def _extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """The uncompressed ELF kernel inside a bzImage, for PVH direct boot; False when there is none.

    Under TCG the kernel's own xz decompressor is the slowest part of the boot (about a minute
    on two loaded cores); QEMU boots an uncompressed vmlinux through its PVH entry point
    (CONFIG_PVH, the XEN_ELFNOTE_PHYS32_ENTRY note), so the host decompresses it once.
    """
    import lzma
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return False
    try:
        vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return False
    # the PVH entry note: namesz 4, descsz 4 or 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\\0"
    if vmlinux[:4] != b"\x7fELF" or not any(
            struct.pack("<III", 4, size, 18) + b"Xen\x00" in vmlinux for size in (4, 8)):
        return False
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(vmlinux)
    os.replace(tmp, out)
    return True


def _kernel_version() -> str:
    """The newest installed Debian kernel that has its modules."""
    kvers = [p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*")]
    kvers = [k for k in kvers if Path("/lib/modules", k, "modules.dep").exists()]
    if not kvers:
        raise RuntimeError("no kernel with modules in /boot (apt-get install linux-image-amd64; "
                           "scripts/setup-host.sh does)")

    def key(k: str) -> List[int]:
        return [int(x) for x in re.findall(r"\d+", k)]
    return sorted(kvers, key=key)[-1]


def _package_version(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(f"package {pkg} is not installed (scripts/setup-host.sh installs it)")
    return r.stdout


def _kernel_package(kver: str) -> str:
    r = subprocess.run(["dpkg-query", "-S", f"/boot/vmlinuz-{kver}"], capture_output=True, text=True)
    return r.stdout.split(":")[0].strip() if r.returncode == 0 else f"linux-image-{kver}"


def cache_key(kver: str) -> str:
    versions = {p: _package_version(p) for p in PACKAGES}
    kpkg = _kernel_package(kver)
    versions[kpkg] = _package_version(kpkg) if kpkg.startswith("linux-image") else kver
    blob = json.dumps({"kver": kver, "versions": versions, "init": INIT_SCRIPT, "modules": MODULES,
                       "layout": 2},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _module_files(kver: str) -> List[str]:
    """Absolute .ko paths in load order (dependencies first, each once)."""
    order: List[str] = []
    for m in MODULES:
        r = subprocess.run(["modprobe", "-S", kver, "--show-depends", m], capture_output=True, text=True,
                           check=True)
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod" and parts[1] not in order:
                order.append(parts[1])
    return order


def _libraries(binary: str) -> List[str]:
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _copy_into(root: Path, src: str) -> None:
    dst = root / src.lstrip("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), dst)


def _build_initramfs(kver: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vb-guest-root-") as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "data", "etc", "var/run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        busybox = shutil.which("busybox") or "/bin/busybox"
        shutil.copy2(busybox, root / "bin/busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            if a != "busybox" and not (root / "bin" / a).exists():
                (root / "bin" / a).symlink_to("busybox")
        _copy_into(root, "/usr/sbin/qemu-ga")
        (root / "bin/qemu-ga").symlink_to("../usr/sbin/qemu-ga")
        for lib in _libraries("/usr/sbin/qemu-ga"):
            _copy_into(root, lib)
        mods = _module_files(kver)
        for ko in mods:
            _copy_into(root, ko)
        (root / "modules.order").write_text("\n".join(mods) + "\n")
        (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, text=True,
                               check=True).stdout
        tmp_out = out.with_suffix(".tmp")
        # not compressed: the kernel's gunzip under TCG costs seconds, QEMU loads 15 MB at once
        with open(tmp_out, "wb") as f:
            r = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=files.encode(), stdout=f)
            if r.returncode != 0:
                raise RuntimeError("building the test guest's initramfs failed (cpio)")
        os.replace(tmp_out, out)


def boot_files() -> BootFiles:
    """Kernel and initramfs for the test guest; built and cached on first use.

    The kernel is the uncompressed vmlinux (PVH boot) when the Debian kernel has a PVH entry,
    else the bzImage from /boot. Safe to call from parallel test runs: the build is under an
    flock and each file is renamed into place.
    """
    kver = _kernel_version()
    bzimage = Path(f"/boot/vmlinuz-{kver}")
    d = CACHE_ROOT / cache_key(kver)
    initrd, vmlinux, no_pvh = d / "initramfs.cpio", d / "vmlinux", d / "no-pvh"
    if not initrd.exists() or not (vmlinux.exists() or no_pvh.exists()):
        d.mkdir(parents=True, exist_ok=True)
        with open(CACHE_ROOT / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            t0 = time.monotonic()
            if not initrd.exists():
                _build_initramfs(kver, initrd)
            if not (vmlinux.exists() or no_pvh.exists()) and not _extract_vmlinux(bzimage, vmlinux):
                no_pvh.touch()
            _say(f"built {d} in {time.monotonic() - t0:.1f}s (kernel: "
                 f"{'vmlinux, PVH boot' if vmlinux.exists() else bzimage})")
    return BootFiles(vmlinux if vmlinux.exists() else bzimage, initrd, kver)


# -- the data disk --------------------------------------------------------------------------------
def make_data_disk(path: Path, files: Optional[Dict[str, bytes]] = None, size_mib: int = 64) -> Path:
    """A qcow2 holding an ext4 filesystem pre-filled with `files` (guest paths under /data).

    `mkfs.ext4 -d` fills it without mounting anything on the host; `qemu-img convert` makes the
    qcow2 (checkpoints need qcow2).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vb-guest-data-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for rel, content in (files or {}).items():
            f = tree / rel.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(content)
        raw = Path(tmp) / "data.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(tree), str(raw), f"{size_mib}M"],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True, capture_output=True)
    return path


def read_file(image: Path, guest_path: str) -> Optional[bytes]:
    """A file's content from an ext4 image (qcow2 or any qemu-img format), without mounting it.

    None when the file does not exist. The image is converted to raw in a temp file (debugfs
    reads only raw images) and read with `debugfs -R cat`; the journal is not replayed, so this
    shows what is on the disk, not what a mount after recovery would show.
    """
    rel = guest_path[len(DATA_MOUNT):] if guest_path.startswith(DATA_MOUNT + "/") else guest_path
    with tempfile.TemporaryDirectory(prefix="vb-guest-read-") as tmp:
        raw = Path(tmp) / "img.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
                       check=True, capture_output=True)
        st = subprocess.run(["debugfs", "-R", f"stat {rel}", str(raw)], capture_output=True)
        if st.returncode != 0 or b"File not found" in st.stderr or b"Inode:" not in st.stdout:
            return None
        r = subprocess.run(["debugfs", "-R", f"cat {rel}", str(raw)], capture_output=True, check=True)
        return r.stdout


# -- the domain -----------------------------------------------------------------------------------
def virt_type() -> str:
    return os.environ.get("VIRTBACKUP_TEST_GUEST_VIRT", "qemu")


def domain_xml(name: str, boot: BootFiles, disk: Path, console_log: Path, agent: bool = True,
               memory_mib: int = 256, control_socket: Optional[Path] = None) -> str:
    dom = etree.Element("domain", type=virt_type())
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "uuid").text = str(uuidlib.uuid4())
    etree.SubElement(dom, "description").text = "virtbackup test guest (tests/support/guest.py)"
    etree.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    etree.SubElement(dom, "vcpu").text = "1"
    os_el = etree.SubElement(dom, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    etree.SubElement(os_el, "kernel").text = str(boot.kernel)
    etree.SubElement(os_el, "initrd").text = str(boot.initrd)
    # quiet: the emulated UART is slow under TCG; panic=-1 + on_reboot destroy: a broken boot stops;
    # tsc=unstable: under TCG on loaded cores the kernel's TSC calibration made the guest clock run
    # ~12x fast (sleep 25 took 2 s); it then keeps time with jiffies, within ~10% of the host's
    etree.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1 quiet loglevel=3 tsc=unstable"
    etree.SubElement(dom, "on_reboot").text = "destroy"
    etree.SubElement(dom, "on_crash").text = "destroy"
    devices = etree.SubElement(dom, "devices")
    etree.SubElement(devices, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    d = etree.SubElement(devices, "disk", type="file", device="disk")
    etree.SubElement(d, "driver", name="qemu", type="qcow2")
    etree.SubElement(d, "source", file=str(disk))
    etree.SubElement(d, "target", dev="vda", bus="virtio")
    serial = etree.SubElement(devices, "serial", type="file")
    etree.SubElement(serial, "source", path=str(console_log))
    etree.SubElement(serial, "target", port="0")
    if agent:
        ch = etree.SubElement(devices, "channel", type="unix")
        etree.SubElement(ch, "target", type="virtio", name=AGENT_CHANNEL)
    if control_socket is not None:
        ch = etree.SubElement(devices, "channel", type="unix")
        etree.SubElement(ch, "source", mode="bind", path=str(control_socket))
        etree.SubElement(ch, "target", type="virtio", name=CONTROL_CHANNEL)
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(dom, encoding="unicode")


def agent_command(dom: libvirt.virDomain, execute: str, arguments: Optional[dict] = None,
                  timeout: int = 10) -> Any:
    cmd: dict = {"execute": execute}
    if arguments is not None:
        cmd["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0)
    return json.loads(reply).get("return")


def guest_exec(dom: libvirt.virDomain, command: str, timeout: float = 60,
               stdin: Optional[bytes] = None) -> Tuple[int, str, str]:
    """Run `command` with /bin/sh -c in the guest through the agent's guest-exec.

    Returns (exit code, stdout, stderr). Raises TimeoutError when it has not exited in time.
    """
    args: dict = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    pid = agent_command(dom, "guest-exec", args)["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        st = agent_command(dom, "guest-exec-status", {"pid": pid})
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            code = st.get("exitcode", 128 + st.get("signal", 0))
            return int(code), out, err
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest command {command!r} still running after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def wait_agent(dom: libvirt.virDomain, timeout: float) -> float:
    """Seconds until the agent answered guest-ping; TimeoutError (with the reason) after `timeout`."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        if not dom.isActive():
            raise TimeoutError("the guest stopped before its agent answered")
        try:
            agent_command(dom, "guest-ping", timeout=5)
            return time.monotonic() - t0
        except libvirt.libvirtError as e:
            last = e.get_error_message() or str(e)
        time.sleep(0.25)
    raise TimeoutError(f"guest agent did not answer within {timeout:.0f}s ({last})")


BOOT_TIMES: List[Tuple[str, float]] = []   # (domain, seconds to agent): shown in the pytest summary


@dataclass
class Guest:
    """One test guest: data disk + domain in `workdir`. Use as a context manager or call remove()."""

    conn: libvirt.virConnect
    workdir: Path
    name: str = field(default_factory=lambda: f"vbguest-{secrets.token_hex(3)}")
    files: Dict[str, bytes] = field(default_factory=dict)
    disk_mib: int = 64
    agent: bool = True
    dom: Optional[libvirt.virDomain] = None
    agent_seconds: Optional[float] = None

    @property
    def disk(self) -> Path:
        return self.workdir / f"{self.name}-vda.qcow2"

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}-console.log"

    @property
    def control_socket(self) -> Path:
        """QEMU listens here; bytes written arrive at /dev/virtio-ports/org.virtbackup.test.0."""
        return self.workdir / f"{self.name}-control.sock"

    def hold(self) -> socket.socket:
        """Connect to the guest's control port; a guest command reading it blocks until the
        host sends (`release`). Without a host connection the guest's read ends at once (EOF)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.control_socket))
        return sock

    @staticmethod
    def release(sock: socket.socket, data: bytes = b"go\n") -> None:
        """Send to the guest's control port and disconnect."""
        try:
            sock.sendall(data)
        finally:
            sock.close()

    def create(self, start: bool = True, agent_timeout: float = 300) -> "Guest":
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = boot_files()
        make_data_disk(self.disk, self.files, self.disk_mib)
        self.dom = self.conn.defineXML(domain_xml(self.name, boot, self.disk, self.console_log, self.agent,
                                                  control_socket=self.control_socket))
        if start:
            self.start(agent_timeout)
        return self

    def start(self, agent_timeout: float = 300) -> float:
        """Start the domain and wait for its agent; prints and returns boot-to-agent seconds."""
        assert self.dom is not None
        self.dom.create()
        if not self.agent:
            return 0.0
        try:
            self.agent_seconds = wait_agent(self.dom, agent_timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; console: {self.console_tail()!r}") from None
        BOOT_TIMES.append((self.name, self.agent_seconds))
        _say(f"{self.name} ({virt_type()}): agent answered {self.agent_seconds:.1f}s after start")
        return self.agent_seconds

    def console_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.console_log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def exec(self, command: str, timeout: float = 120) -> Tuple[int, str, str]:
        assert self.dom is not None
        return guest_exec(self.dom, command, timeout)

    def fsfreeze_status(self) -> str:
        assert self.dom is not None
        return str(agent_command(self.dom, "guest-fsfreeze-status"))

    def remove(self) -> None:
        """Destroy, undefine (with checkpoint metadata), delete disk and log. Never raises."""
        from tests.support.scratch import remove_domain
        remove_domain(self.conn, self.name)
        for p in (self.disk, self.console_log, self.control_socket):
            try:
                p.unlink()
            except OSError:
                pass

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _BootTimesReport:
    """A pytest plugin: every guest's boot-to-agent time in the terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        for name, secs in BOOT_TIMES:
            write(f"test guest {name} ({virt_type()}): agent answered {secs:.1f}s after start")


def report_boot_times(config: Any) -> None:
    """Show boot-to-agent times at the end of the pytest run (call from a fixture with request.config),
    so a slow machine is visible without -s."""
    pm = config.pluginmanager
    if not pm.has_plugin("virtbackup-guest-boot-times"):
        pm.register(_BootTimesReport(), "virtbackup-guest-boot-times")


def main() -> int:
    """`python -m tests.support.guest`: build (or find) the boot files, boot one guest, time it."""
    from virtbackup.virt import host
    boot = boot_files()
    print(f"kernel {boot.kernel}\ninitrd {boot.initrd} ({boot.initrd.stat().st_size / MiB:.1f} MiB)")
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="vb-guest-"))
    g = Guest(conn, work, files={"hello.txt": b"hello from the host\n"})
    try:
        g.create(agent_timeout=600)
        rc, out, _err = g.exec("cat /data/hello.txt; grep ' /data ' /proc/mounts")
        print(f"guest-exec rc={rc}\n{out}", end="")
        print(f"fsfreeze status: {g.fsfreeze_status()}")
        return 0
    finally:
        g.remove()
        shutil.rmtree(work, ignore_errors=True)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
