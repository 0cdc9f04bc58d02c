"""A private sshd on a spare loopback port, for `qemu+ssh://root@127.0.0.1:PORT/system`.

Throwaway host and client keys, its own config, known_hosts and pid file in a temp dir; only
key authentication, only root, only 127.0.0.1. The system's sshd and ~/.ssh are never used:
libvirt runs `ssh` through a wrapper (`command=` in the URI) that passes `-F` our client config.
Stopped (and its files removed) by `stop()`, also when the test failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateSshd:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return (f"qemu+ssh://root@127.0.0.1:{self.port}/system?command={self.dir / 'ssh'}"
                f"&keyfile={self.dir / 'client_key'}&no_tty=1")

    def start(self) -> "PrivateSshd":
        if not os.access(SSHD, os.X_OK):
            raise RuntimeError(f"{SSHD} missing: run scripts/setup-host.sh (installs openssh-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        self.port = _free_port()
        host_pub = (self.dir / "host_key.pub").read_text().split()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (self.dir / "sshd_config").write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.dir / 'host_key'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            "PermitRootLogin prohibit-password", "AllowUsers root", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "X11Forwarding no", "AllowTcpForwarding no", "PermitTunnel no",
            "MaxStartups 50", "LogLevel ERROR", ""]))
        (self.dir / "ssh_config").write_text("\n".join([
            "Host *", f"  UserKnownHostsFile {self.dir / 'known_hosts'}", "  StrictHostKeyChecking yes",
            f"  IdentityFile {self.dir / 'client_key'}", "  IdentitiesOnly yes", "  BatchMode yes",
            "  LogLevel ERROR", ""]))
        wrapper = self.dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{self.dir / "ssh_config"}" "$@"\n')
        os.chmod(wrapper, 0o700)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation dir
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:       # bounded wait for the listener
            if self.proc.poll() is not None:
                raise RuntimeError(f"private sshd exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("private sshd did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
