"""observe: the cancel handle, the per-operation progress scope, and the events' promises."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

import pytest

from virtbackup import api, observe
from virtbackup.errors import Interrupted
from virtbackup.observe import Cancel, ProgressEvent


# --- Cancel ---------------------------------------------------------------------------------------
def test_cancel_calls_what_is_registered_once_with_the_first_reason():
    c = Cancel()
    seen: List[str] = []
    assert not c.cancelled and c.reason is None
    with c.on_cancel(seen.append):
        c.cancel("SIGINT")
        c.cancel("SIGTERM")           # a second signal: noted, nothing called twice
    assert seen == ["SIGINT"] and c.cancelled and c.reason == "SIGINT"


def test_registering_after_the_cancel_calls_at_once_and_leaving_deregisters():
    c = Cancel()
    seen: List[str] = []
    with c.on_cancel(seen.append):
        pass
    c.cancel()
    assert seen == []                 # left before the cancel: not called
    with c.on_cancel(seen.append):
        assert seen == ["cancelled"]
    assert seen == ["cancelled"]


def test_cancel_from_another_thread_wakes_a_waiter_and_a_failing_callback_stops_nothing():
    c = Cancel()
    woke = threading.Event()

    def boom(_reason: str) -> None:
        raise RuntimeError("a broken callback")

    with c.on_cancel(boom), c.on_cancel(lambda _r: woke.set()):
        threading.Thread(target=c.cancel, args=("host agent stopping",)).start()
        assert woke.wait(5)
    assert c.reason == "host agent stopping"


def test_interruption_keeps_the_signal_wording():
    assert observe.interruption("SIGINT") == "interrupted by SIGINT"
    assert observe.interruption("cancelled") == "cancelled"
    assert observe.interruption("agent stop") == "cancelled (agent stop)"


# --- the scope: per operation, per thread ----------------------------------------------------------
def test_no_scope_no_events_and_no_cost():
    observe.emit("copy", "vda", 1, 2)          # nobody listens: nothing happens
    observe.report("images", 1, 2)
    observe.check()
    assert not observe.active() and not observe.listening()
    assert observe.cancelled() is None


def test_two_operations_in_two_threads_see_only_their_own_events_and_cancels():
    got = {"a": [], "b": []}                       # type: dict
    cancels = {"a": Cancel(), "b": Cancel()}
    start = threading.Barrier(2)
    errors: List[BaseException] = []

    def op(name: str, disk: str) -> None:
        try:
            with observe.scope("backup", got[name].append, cancels[name], domain=f"dom-{name}"):
                start.wait(5)
                # threads the operation starts carry its scope (observe.submit)
                with ThreadPoolExecutor(max_workers=2) as pool:
                    futures = [observe.submit(pool, observe.emit, "copy", f"{disk}{i}", 10, 10) for i in range(2)]
                    for f in futures:
                        f.result()
                for done in range(0, 11):
                    observe.emit("copy", disk, done, 10)
                    time.sleep(0.001)
                if name == "a":
                    cancels["a"].cancel()
                    with pytest.raises(observe.Cancelled):
                        observe.check()
                else:
                    observe.check()                # a's cancel is not b's
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=op, args=(n, d)) for n, d in (("a", "vda"), ("b", "vdb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert {e.disk for e in got["a"]} == {"vda", "vda0", "vda1"}
    assert {e.disk for e in got["b"]} == {"vdb", "vdb0", "vdb1"}
    assert {e.domain for e in got["a"]} == {"dom-a"} and {e.domain for e in got["b"]} == {"dom-b"}
    assert not cancels["b"].cancelled


def test_a_plain_pool_does_not_carry_the_scope_submit_does():
    seen: List[ProgressEvent] = []
    with observe.scope("restore", seen.append), ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(observe.emit, "copy", "plain", 1, 1).result()
        observe.submit(pool, observe.emit, "copy", "carried", 1, 1).result()
        t = observe.thread(lambda: observe.emit("copy", "thread", 1, 1), "t")
        t.start()
        t.join()
    assert [e.disk for e in seen] == ["carried", "thread"]


def test_events_are_monotonic_with_a_constant_total_thinned_and_end_at_the_total(monkeypatch):
    seen: List[ProgressEvent] = []
    with observe.scope("backup", seen.append):
        observe.emit("copy", "vda", 0, 100)
        observe.emit("copy", "vda", 50, 100)        # within MIN_INTERVAL of the first: dropped
        monkeypatch.setattr(observe, "MIN_INTERVAL", 0.0)
        observe.emit("copy", "vda", 40, 100)
        observe.emit("copy", "vda", 30, 100)        # going back: clamped to what was said (no event)
        observe.emit("copy", "vda", 35, 50)         # another total: rescaled to the first (70 of 100)
        observe.emit("copy", "vda", 500, 100)       # beyond the total: the total
        observe.emit("copy", "vda", 100, 100)       # after the last: nothing
        observe.finish("copy", "vda")
        observe.finish("copy", "vdb")               # never reported, no total given: nothing
        observe.finish("hash", "vdb", 7)            # never reported, total given: one final event
    assert [(e.phase, e.disk, e.done, e.total) for e in seen] == [
        ("copy", "vda", 0, 100), ("copy", "vda", 40, 100), ("copy", "vda", 70, 100), ("copy", "vda", 100, 100),
        ("hash", "vdb", 7, 7)]
    assert all(e.operation == "backup" and e.unit == "bytes" for e in seen)


def test_a_failing_callback_stops_the_events_not_the_operation():
    calls: List[ProgressEvent] = []

    def broken(ev: ProgressEvent) -> None:
        calls.append(ev)
        raise OSError("the display went away")

    with observe.scope("verify", broken):
        observe.emit("verify", None, 1, 3, "images")
        observe.emit("verify", None, 3, 3, "images")
        assert not observe.listening()
    assert len(calls) == 1


def test_report_feeds_observer_and_events_inside_a_task_and_is_a_cancellation_point():
    seen: List[ProgressEvent] = []
    old: List[Tuple[str, float, float]] = []
    cancel = Cancel()
    with observe.scope("restore", seen.append, cancel), observe.observing(lambda *a: old.append(a)):
        assert observe.active() and observe.listening()
        with observe.task("copy", "vda", 1000):
            observe.report("vda.qcow2", 0.0, 100.0)
            observe.report("vda.qcow2", 100.0, 100.0)
        observe.report("images", 1, 2)               # outside a task: verify's images
        cancel.cancel()
        with pytest.raises(observe.Cancelled) as ei:
            observe.report("images", 2, 2)
    assert str(ei.value) == "restore cancelled" and isinstance(ei.value, KeyboardInterrupt)
    assert old[0] == ("vda.qcow2", 0.0, 100.0) and len(old) == 4
    assert [(e.phase, e.disk, e.done, e.total, e.unit) for e in seen] == [
        ("copy", "vda", 0, 1000, "bytes"), ("copy", "vda", 1000, 1000, "bytes"),
        ("verify", None, 1, 2, "images"), ("verify", None, 2, 2, "images")]


def test_a_task_left_by_an_error_is_not_finished():
    seen: List[ProgressEvent] = []
    with observe.scope("restore", seen.append):
        with pytest.raises(ValueError), observe.task("copy", "vda", 100):
            observe.report("vda.qcow2", 10.0, 100.0)
            raise ValueError("qemu-img failed")
    assert [e.done for e in seen] == [10]


def test_an_inner_scope_keeps_the_outer_callback_and_handle():
    seen: List[ProgressEvent] = []
    outer = Cancel()
    with observe.scope("live-restore", seen.append, outer):
        with observe.scope("restore"):
            observe.emit("copy", "vda", 1, 1)
            assert observe.cancel_handle() is outer
        assert observe.cancel_handle() is outer
    assert [(e.operation, e.disk) for e in seen] == [("restore", "vda")]
    # no handle given: one is made on first use, so signals can still cancel through it
    with observe.scope("backup"):
        h = observe.cancel_handle()
        assert observe.cancel_handle() is h and not observe.active()


def test_events_round_trip_through_json_for_runs_child_processes():
    ev = ProgressEvent("backup", "copy", "vda", 5, 10, "bytes", "dom")
    assert ProgressEvent.from_json(ev.to_json()) == ev


# --- the API boundary --------------------------------------------------------------------------
def test_api_operations_take_cancel_and_progress_by_keyword():
    import inspect
    for name in ("backup", "restore", "verify", "prune", "run_job", "live_restore", "resume_live", "drill"):
        params = inspect.signature(getattr(api, name)).parameters
        for kw in ("cancel", "progress"):
            assert kw in params and params[kw].default is None, (name, kw)
        assert params["cancel"].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_a_handle_cancelled_before_the_call_stops_it_before_anything(tmp_path):
    cancel = Cancel()
    cancel.cancel()
    with pytest.raises(Interrupted) as ei:
        api.prune(tmp_path / "not-even-a-backup-dir", keep=1, cancel=cancel)
    assert str(ei.value) == "prune cancelled" and ei.value.exit_code == 1
    assert not (tmp_path / "not-even-a-backup-dir").exists()
