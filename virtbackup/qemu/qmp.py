"""QMP client for a private QEMU process that virtbackup starts itself (offline backups).

Running domains are reached through libvirt's monitor passthrough (monitor.py); this module owns
a QEMU child of our own: start, commands, events, clean quit. Every command is logged at debug.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from typing import IO, Any, Dict, List, Optional

from virtbackup.errors import HostError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0        # greeting + capabilities: QEMU -machine none starts in ~50 ms
COMMAND_TIMEOUT = 120.0     # one QMP command (opening images, the transaction)
QUIT_TIMEOUT = 120.0        # `quit` closes the images: flushes caches, writes the bitmaps


class QMPError(HostError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, desc: str):
        super().__init__(f"QMP {command} failed: {desc}")
        self.command = command
        self.desc = desc


class PrivateQemu:
    """A `qemu-system -machine none` child driven over QMP on its stdin/stdout.

    QMP on stdio (not a unix socket): nothing to wait for or clean up on disk, and no other
    process can connect to it. The child gets its own session so a terminal's Ctrl-C reaches
    only virtbackup (which then quits QEMU cleanly), and - through setpriv, when present -
    SIGTERM if virtbackup itself dies, which QEMU answers with a clean exit: images closed,
    bitmaps stored, locks released.
    """

    def __init__(self, binary: str):
        self.binary = binary
        self.proc: Optional[subprocess.Popen] = None
        self._buf = b""
        self._events: List[Dict[str, Any]] = []
        self._stderr: Optional[IO[bytes]] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        cmd = [self.binary, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
               "-qmp", "stdio"]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        self._stderr = tempfile.TemporaryFile()
        log.debug("exec %s", " ".join(cmd))
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, start_new_session=True)
        except OSError as e:
            raise HostError(f"cannot start {self.binary}: {e.strerror}") from None
        greeting = self._read_message(START_TIMEOUT)
        if "QMP" not in greeting:
            raise HostError(f"{self.binary} did not greet with QMP: {greeting}")
        self.execute("qmp_capabilities", timeout=START_TIMEOUT)

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> bool:
        """Quit cleanly (images closed, bitmaps stored); kill only if that fails. True = clean."""
        if self.proc is None:
            return True
        clean = False
        try:
            if self.alive():
                try:
                    self.execute("quit", timeout=QUIT_TIMEOUT)
                except HostError:
                    pass   # EOF before the reply: it may still have exited cleanly
                try:
                    clean = self.proc.wait(QUIT_TIMEOUT) == 0
                except subprocess.TimeoutExpired:
                    clean = False
            else:
                clean = False
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
        return clean

    # -- protocol ----------------------------------------------------------------------------
    def _read_message(self, timeout: Optional[float]) -> Dict[str, Any]:
        """Next JSON message; raises HostError on EOF or timeout. timeout=None: wait forever."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise HostError(f"private QEMU did not answer within {timeout:.0f}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                why = self.stderr_tail()
                raise HostError(f"private QEMU exited (status {self.proc.returncode})"
                                + (f": {why}" if why else ""))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg: Dict[str, Any] = json.loads(line)
            return msg
        except ValueError:
            raise HostError(f"private QEMU sent something that is not QMP: {line[:200]!r}") from None

    def execute(self, command: str, arguments: Optional[Dict[str, Any]] = None,
                timeout: float = COMMAND_TIMEOUT) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        msg: Dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        log.debug("private QMP -> %s", json.dumps(msg))
        started = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise HostError(f"private QEMU is gone ({self.stderr_tail() or 'no message'})") from None
        while True:
            reply = self._read_message(timeout)
            if "event" in reply:
                log.debug("private QMP event %s", json.dumps(reply))
                self._events.append(reply)
            elif "error" in reply:
                log.debug("private QMP <- error %s (%.3fs)", json.dumps(reply["error"]), time.monotonic() - started)
                raise QMPError(command, str(reply["error"].get("desc", reply["error"])))
            elif "return" in reply:
                log.debug("private QMP <- %s (%.3fs)", json.dumps(reply["return"])[:2000],
                          time.monotonic() - started)
                return reply["return"]

    def next_event(self, timeout: Optional[float]) -> Optional[Dict[str, Any]]:
        """The next asynchronous event, or None when `timeout` passes without one."""
        if self._events:
            return self._events.pop(0)
        assert self.proc is not None and self.proc.stdout is not None
        if b"\n" not in self._buf and timeout is not None:
            ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], timeout)
            if not ready:
                return None
        msg = self._read_message(None)
        if "event" in msg:
            log.debug("private QMP event %s", json.dumps(msg))
            return msg
        return None
