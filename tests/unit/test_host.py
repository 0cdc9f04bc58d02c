"""Which libvirt errors are retried, and how the retry is bounded (pure logic, no daemon)."""

from __future__ import annotations

import threading
import time
from typing import List

import libvirt
import pytest
from tenacity import stop_after_delay, wait_none

from virtbackup.virt import host


def lverr(message: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> libvirt.libvirtError:
    """A libvirtError as the bindings raise it: (code, domain, message, level, ...) in `err`.

    The bindings take the message of the thread's last libvirt error when there is one: an
    earlier test in this process (an integration test's closed connection) must not become it."""
    libvirt.virResetLastError()
    e = libvirt.libvirtError(message)
    e.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, "", None, None, 0, 0)
    return e


@pytest.mark.parametrize("code,message", [
    (libvirt.VIR_ERR_OPERATION_TIMEOUT,
     "Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)"),
    (libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot recv data: Connection reset by peer"),
    (libvirt.VIR_ERR_SYSTEM_ERROR,
     "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory"),
    (libvirt.VIR_ERR_RPC, "End of file while reading data: Input/output error"),
])
def test_transient_errors(code, message):
    assert host.is_transient(lverr(message, code))


@pytest.mark.parametrize("code,message", [
    (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found: no domain with matching name 'x'"),
    (libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT, "checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda'"),
    (libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running"),
    # the connection object is closed for good after a daemon restart: retrying it cannot help
    (libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: client socket is closed"),
])
def test_permanent_errors(code, message):
    assert not host.is_transient(lverr(message, code))


def test_not_a_libvirt_error_is_never_transient():
    assert not host.is_transient(OSError("connection reset"))
    assert not host.is_transient(KeyboardInterrupt())


def call_fast(fn):
    """host.call(fn): its retry policy, without the waits between attempts."""
    return host._call.retry_with(wait=wait_none())(fn)


def failing(errors: List[BaseException], result: str = "ok"):
    calls: List[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return fn, calls


def test_transient_error_is_retried_until_success():
    fn, calls = failing([lverr("cannot acquire state change lock"), lverr("Connection reset by peer")])
    assert call_fast(fn) == "ok"
    assert len(calls) == 3


def test_permanent_error_is_raised_at_once():
    fn, calls = failing([lverr("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)])
    with pytest.raises(libvirt.libvirtError, match="Domain not found"):
        call_fast(fn)
    assert len(calls) == 1


def test_retries_are_bounded_and_reraise_the_last_error():
    fn, calls = failing([lverr(f"cannot acquire state change lock #{i}") for i in range(100)])
    with pytest.raises(libvirt.libvirtError, match="state change lock #4"):
        call_fast(fn)
    assert len(calls) == host.RETRY_ATTEMPTS == 5


def test_retries_are_also_bounded_in_time():
    """One "state change lock" attempt already waits libvirt's 30 s: the policy stops on time too."""
    delays = [s.max_delay for s in host._call.retry.stop.stops if isinstance(s, stop_after_delay)]
    assert delays == [host.RETRY_SECONDS] and 30 <= host.RETRY_SECONDS <= 60


def test_default_waits_are_short_and_capped():
    fn, calls = failing([lverr("cannot acquire state change lock")] * 2)
    t = time.monotonic()
    assert host.call(fn) == "ok"          # the real policy: exponential from 0.2 s
    assert len(calls) == 3 and 0.5 < time.monotonic() - t < 2.5


class FakeConn:
    def domainEventRegisterAny(self, *_a):
        return 1

    def registerCloseCallback(self, *_a):
        pass

    def domainEventDeregisterAny(self, *_a):
        pass

    def unregisterCloseCallback(self):
        pass


class FakeDom:
    def UUIDString(self) -> str:
        return "00000000-0000-0000-0000-000000000001"


def test_jobwatch_wait_returns_on_event_check_or_timeout():
    w = host.JobWatch(FakeConn(), FakeDom())  # type: ignore[arg-type]
    t = time.monotonic()
    assert w.wait(lambda: False, check_every=0.02, timeout=0.1) is False
    assert 0.09 < time.monotonic() - t < 1
    assert w.wait(lambda: True, check_every=0.02, timeout=5) is True
    threading.Timer(0.05, w.interrupt, ("SIGINT",)).start()
    assert w.wait(lambda: False, check_every=10) is True and w.interrupted == "SIGINT"
    w.close()


@pytest.mark.parametrize("uri,remote", [
    ("qemu:///system", False), ("qemu+unix:///system", False), ("qemu:///embed?root=/x", False),
    ("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k", True), ("qemu+tcp://hv1/system", True),
    ("qemu://hv1.example.org/system", True), ("qemu+ssh://hv1/system", True),
])
def test_remote_uris_are_those_naming_a_host(uri, remote):
    assert host.is_remote(uri) is remote
    assert (host.uri_host(uri) is not None) is remote


def test_no_uri_means_the_default_which_is_local(monkeypatch):
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert host.is_remote(None) is False
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu+ssh://hv1/system")
    assert host.is_remote(None) is True


def test_debug_log_never_shows_bytes_arguments(caplog):
    """Hostile pass D6: `-v backup --key-file K` printed the passphrase in the virSecret.setValue line."""
    import logging

    from virtbackup.virt import host

    seen = []

    def setValue(value: bytes, flags: int) -> int:  # noqa: N802 - libvirt's name
        seen.append(value)
        return 0

    with caplog.at_level(logging.DEBUG, logger="virtbackup"):
        host.call(setValue, b"correct horse battery staple\n", 0)
        host.call(setValue, "<secret><uuid>u</uuid></secret>", 0)
    text = caplog.text
    assert seen[0] == b"correct horse battery staple\n"
    assert "horse" not in text and "<29 bytes, not shown>" in text
    assert "\n<secret><uuid>u</uuid></secret>" in text          # XML is still shown, on its own lines
