"""The key of an encrypted backup as an ephemeral, private libvirt secret, for one job.

libvirt takes LUKS keys for backup targets only as secrets (`<encryption><secret uuid=.../>`).
The secret is `ephemeral` (libvirtd keeps it in memory only) and `private` (its value can't be
read back through the API), and lives exactly as long as the job: undefined on the way out,
also on failure, Ctrl-C, SIGTERM and SIGHUP. Only SIGKILL can leave one behind; its description
names the process that made it (pid and start time), so the next run removes it, and nothing
else is ever touched.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid as uuidlib
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import libvirt
from lxml import etree

from virtbackup import env
from virtbackup.errors import HostError, Interrupted
from virtbackup.qemu.keys import Key
from virtbackup.virt import host, xmlbuild

SECRET_DESCRIPTION = "virtbackup ephemeral key"


def secret_description(purpose: str) -> str:
    pid = os.getpid()
    return f"{SECRET_DESCRIPTION} pid={pid} start={env.process_start(pid)}: {purpose}"


_DESC_RE = re.compile(rf"^{re.escape(SECRET_DESCRIPTION)} pid=(\d+) start=(\d+):")


def is_ours(description: Optional[str]) -> bool:
    return bool(description and _DESC_RE.match(description))


def owner_alive(description: str) -> bool:
    m = _DESC_RE.match(description)
    if not m:
        return True                      # not ours: treat as alive, never touch it
    return env.process_start(int(m.group(1))) == m.group(2)


def secret_xml(secret_uuid: str, description: str) -> str:
    root = xmlbuild.fresh("secret.xml")
    uuid_el = root.find("uuid")
    desc_el = root.find("description")
    assert uuid_el is not None and desc_el is not None
    uuid_el.text = secret_uuid
    desc_el.text = description
    return xmlbuild.to_string(root)


def remove_stale_secrets(conn: Any) -> List[str]:
    """Undefine virtbackup's secrets whose process is gone (a run killed with SIGKILL leaves
    its secret in libvirtd's memory). Secrets of live runs and of anyone else are not touched."""
    removed: List[str] = []
    try:
        secrets_ = conn.listAllSecrets(0)
    except libvirt.libvirtError:
        return removed
    for s in secrets_:
        try:
            desc = _description(s)
            if is_ours(desc) and not owner_alive(desc or ""):
                uuid = s.UUIDString()
                s.undefine()
                removed.append(uuid)
        except libvirt.libvirtError:
            continue
    return removed


def live_owner(conn: Any, secret_uuid: str) -> Optional[int]:
    """The pid of the running process that defined virtbackup's secret `secret_uuid`; None when
    libvirtd has no such secret, it is not virtbackup's, or its process is gone (a live restore
    resumed while the run that started it still works on the domain must not take its secret)."""
    try:
        desc = _description(conn.secretLookupByUUIDString(secret_uuid))
    except libvirt.libvirtError:
        return None
    m = _DESC_RE.match(desc or "")
    if not m or not owner_alive(desc or ""):
        return None
    return int(m.group(1))


def _description(sec: Any) -> Optional[str]:
    root = etree.fromstring(sec.XMLDesc(0).encode())
    return root.findtext("description")


class _TerminateAsInterrupt:
    """While active (main thread only), SIGTERM and SIGHUP raise Interrupted where Python would
    otherwise die on the spot, so `finally` blocks run (the secret is undefined). Handlers that
    someone else installed are left alone; nested `host.signals_noted` windows take precedence."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.old: Dict[int, Any] = {}

    def __enter__(self) -> "_TerminateAsInterrupt":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                self.old[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {name}; nothing was recorded")

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)
        self.old.clear()


@contextmanager
def libvirt_secret(conn: Any, key: Key, purpose: str, secret_uuid: Optional[str] = None) -> Iterator[str]:
    """An ephemeral, private libvirt secret holding the key; yields its UUID.

    `ephemeral`: libvirtd keeps it in memory only; `private`: its value can't be read back
    through the API. Undefined on the way out whatever happens (a failed job, Ctrl-C, SIGTERM,
    SIGHUP; a dead connection is replaced to do it). Only SIGKILL can leave it behind: the next
    run removes it (`remove_stale_secrets`).
    """
    remove_stale_secrets(conn)
    secret_uuid = secret_uuid or str(uuidlib.uuid4())
    uri = conn.getURI()
    with _TerminateAsInterrupt():
        try:
            sec = host.call(conn.secretDefineXML, secret_xml(secret_uuid, secret_description(purpose)), 0)
        except libvirt.libvirtError as e:
            raise HostError(f"cannot define a libvirt secret for the key: {host.libvirt_message(e)}") from None
        try:
            try:
                host.call(sec.setValue, key.data, 0)
            except libvirt.libvirtError as e:
                raise HostError(f"cannot give libvirt the key: {host.libvirt_message(e)}") from None
            yield secret_uuid
        finally:
            _undefine(conn, uri, secret_uuid)


def _undefine(conn: Any, uri: str, secret_uuid: str) -> None:
    """Undefine the secret; after a libvirtd restart on a new connection. Never raises: the
    job's outcome is what the caller reports (a secret left behind is removed by the next run)."""
    for attempt in range(2):
        fresh = None
        try:
            if attempt:
                conn = fresh = host.connect(uri)      # the old connection died with libvirtd
            host.call(conn.secretLookupByUUIDString, secret_uuid).undefine()
            return
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return
        except HostError:
            return                                     # libvirtd unreachable: nothing to do now
        finally:
            if fresh is not None:
                try:
                    fresh.close()
                except libvirt.libvirtError:
                    pass
