"""In-process restart (`inprocess_restart`): on a fault, every rank re-enters training in the same processes.

`run_with_restarts(cfg, attempt)` calls `attempt()` (one whole run: process group, setup, training,
shutdown) and calls it again after a fault, up to `max_iterations` restarts. A fault is any of:

- an exception on some rank (that rank logs it and asks for the restart);
- no progress on some rank's main thread for `soft_timeout` seconds (a hang);
- a rank whose heartbeat stopped for `heartbeat_timeout` seconds (a dead or frozen process).

The ranks meet in the launcher's TCP store (torchrun's env:// rendezvous store). A monitor thread
per rank writes its heartbeat, watches the others' and its own main thread, and polls the shared
"restart requested" key. When it is set, each rank's monitor aborts its process group (which closes
its connections, so a peer blocked in a collective with it gets an error) and raises `RestartInterrupt`
in the main thread (delivered when the main thread next runs Python code). Every rank then unwinds
its run (which releases the model, optimizer and data loaders and destroys the process group), meets
the others at a barrier, and starts the next attempt, whose process group lives under a store prefix
of its own and which resumes from the latest checkpoint in `checkpoint.save`. A rank whose main
thread makes no progress for `hard_timeout` seconds is ended (SIGTERM, then `os._exit` after
`termination_grace_time`): the launcher then ends the job.

"Progress" is watched automatically: every `progress_watchdog_interval` seconds the monitor asks the
main thread to record the time the next time it runs Python code (`Py_AddPendingCall`); a main thread
stuck in one call (a collective whose peer is gone, a deadlock) never does.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from viaduct.config import ConfigError, Problem
from viaduct.distributed import init as dist_init
from viaduct.training.config.resilience import InProcessRestartConfig

log = logging.getLogger("viaduct")

T = TypeVar("T")


class RestartInterrupt(Exception):
    """Raised in the main thread by the monitor: some rank (or this one's watchdog) asked for a restart."""


_main_ran_python_at = time.monotonic()
"""When the main thread last ran Python code (set by `_mark_main_progress`, which only it runs)."""
_progress_call_queued = False
"""Whether `_mark_main_progress` waits to run in the main thread."""


def _mark_main_progress(_arg: int | None) -> int:
    global _main_ran_python_at, _progress_call_queued
    _main_ran_python_at = time.monotonic()
    # Last, and nothing after it checks for asynchronous exceptions: the monitor raises
    # RestartInterrupt only while no call is queued, so the interrupt never lands in here (an
    # exception in this callback would be swallowed).
    _progress_call_queued = False
    return 0


# Py_AddPendingCall runs its function in the main thread the next time that thread executes Python
# code: it never runs while the main thread is stuck in one call (a collective whose peer is gone, a
# deadlock). Kept at module level: the interpreter may call it after the monitor that asked is gone.
_PENDING_PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(_mark_main_progress)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Make `thread_id` raise `exc_type` at its next Python instruction (None cancels a pending one)."""
    # None must reach C as NULL (which cancels), not as Python's None object.
    exc = None if exc_type is None else ctypes.py_object(exc_type)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)


class Monitor:
    """One rank's monitor thread for one attempt: heartbeats, progress watchdog, restart key.

    Keys (under the run's store prefix): `hb/{rank}` counts heartbeats; `restart/{attempt}` holds why
    the attempt must restart. Heartbeats are counters, not timestamps, so clocks of different
    nodes never get compared: a rank is lost when its counter has not moved for `heartbeat_timeout`
    seconds of this rank's clock.
    """

    def __init__(
        self,
        cfg: InProcessRestartConfig,
        store: dist.Store,
        *,
        rank: int,
        world_size: int,
        attempt: int,
        main_thread_id: int | None = None,
    ) -> None:
        self.cfg, self.store, self.rank, self.world_size, self.attempt = cfg, store, rank, world_size, attempt
        # The main thread is always started, so it always has an ident.
        self.main_thread_id: int = (
            main_thread_id if main_thread_id is not None else threading.main_thread().ident or 0
        )
        self.restart_key = f"restart/{attempt}"
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_attempt = False
        self._aborted = False
        self._interrupt_sent = False
        self._restart_seen = False
        self._thread = threading.Thread(
            target=self._loop, name=f"viaduct-inprocess-monitor-{rank}", daemon=True
        )

    # ------------------------------------------------------------------ used by the main thread
    def start(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def run(self, attempt: Callable[[], T]) -> T:
        """Call `attempt()`, interruptible by a restart request while it runs."""
        with self._lock:
            self._in_attempt = True
        try:
            return attempt()
        finally:
            with self._lock:
                self._in_attempt = False
                # An interrupt sent just as the attempt ended must not fire in the restart code.
                _raise_in_thread(self.main_thread_id, None)
                self._interrupt_sent = False

    def request_restart(self, reason: str) -> None:
        """Ask every rank to restart this attempt; the first reason given is the one kept."""
        try:
            self.store.compare_set(self.restart_key, "", reason)
        except Exception:  # a store without compare_set: the last writer wins, which is also fine
            self.store.set(self.restart_key, reason)

    def restart_reason(self) -> str | None:
        """Why this attempt must restart, or None while nobody asked."""
        if not self.store.check([self.restart_key]):
            return None
        return self.store.get(self.restart_key).decode(errors="replace")

    # ------------------------------------------------------------------ the monitor thread
    def _loop(self) -> None:
        cfg = self.cfg
        tick = min(cfg.monitor_thread_interval, cfg.progress_watchdog_interval, cfg.heartbeat_interval)
        now = time.monotonic()
        next_heartbeat = next_poll = next_sample = now
        seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when it last changed)
        requested_at: float | None = None
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                if now >= next_sample:
                    next_sample = now + cfg.progress_watchdog_interval
                    self._sample_progress(now)
                if now >= next_heartbeat:
                    next_heartbeat = now + cfg.heartbeat_interval
                    self.store.add(f"hb/{self.rank}", 1)
                if now < next_poll:
                    continue
                next_poll = now + cfg.monitor_thread_interval
                self._check_timeouts(now, seen)
                if requested_at is None and self.restart_reason() is not None:
                    requested_at, self._restart_seen = now, True
                # last_call_wait: ranks that fail at about the same time report their own errors
                # before the interrupt turns them into secondary ones.
                if requested_at is not None and now - requested_at >= cfg.last_call_wait:
                    self._interrupt()
            except Exception as exc:  # the store went away (the launcher is ending the job)
                log.warning("rank %d: in-process restart monitor stopped: %s", self.rank, exc)
                return

    def _sample_progress(self, now: float) -> None:
        """Ask the main thread to stamp the time the next time it runs Python code; read the last stamp."""
        global _progress_call_queued
        self.last_progress = max(self.last_progress, _main_ran_python_at)
        if _progress_call_queued or (self._in_attempt and self._restart_seen):
            return  # one at a time; none while the attempt waits for its interrupt
        _progress_call_queued = True
        if ctypes.pythonapi.Py_AddPendingCall(_PENDING_PROGRESS, None) != 0:
            _progress_call_queued = False  # the queue is full: try again at the next sample

    def _check_timeouts(self, now: float, seen: dict[int, tuple[int, float]]) -> None:
        cfg = self.cfg
        stalled = now - self.last_progress
        if stalled > cfg.hard_timeout:
            self._terminate(stalled)
        if stalled > cfg.soft_timeout:
            self.request_restart(
                f"rank {self.rank}: no progress for {stalled:.1f} s (soft_timeout {cfg.soft_timeout} s)"
            )
        for other in range(self.world_size):
            if other == self.rank:
                continue
            count = self.store.add(f"hb/{other}", 0)
            last = seen.get(other)
            if last is None or last[0] != count:
                seen[other] = (count, now)
            elif now - last[1] > cfg.heartbeat_timeout:
                self.request_restart(
                    f"rank {other}: no heartbeat for {now - last[1]:.1f} s "
                    f"(heartbeat_timeout {cfg.heartbeat_timeout} s), seen by rank {self.rank}"
                )

    def _interrupt(self) -> None:
        with self._lock:
            if not self._in_attempt:
                return
            if not self._aborted:
                self._aborted = True
                # Closing this rank's connections ends a peer's collective that waits on it; this
                # rank's own pending collective ends the same way when the peers do this too.
                if dist.is_available() and dist.is_initialized():
                    try:
                        dist.distributed_c10d._abort_process_group()
                    except Exception as exc:
                        log.warning("rank %d: aborting the process group failed: %s", self.rank, exc)
            if self._interrupt_sent or _progress_call_queued:
                return  # sent already, or not yet safe (see _mark_main_progress): next poll
            self._interrupt_sent = True
            _raise_in_thread(self.main_thread_id, RestartInterrupt)

    def _terminate(self, stalled: float) -> None:
        cfg = self.cfg
        log.error(
            "rank %d: no progress for %.1f s (hard_timeout %s s): ending this process",
            self.rank,
            stalled,
            cfg.hard_timeout,
        )
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(cfg.termination_grace_time)
        os._exit(1)


def coordination_store(rank: int, world_size: int, run: int, timeout: timedelta) -> dist.Store:
    """The launcher's store under a prefix for this run's restart keys; a private store for one process."""
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return dist.HashStore()
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"viaduct/attempt{attempt}/run{run}/inprocess-restart", store)


def _barrier(store: dist.Store, key: str, world_size: int, timeout: float, what: str) -> None:
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while store.add(key, 0) < world_size:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"in-process restart: {what}: only {store.add(key, 0)} of {world_size} ranks arrived "
                f"within {timeout} s; ending the job"
            )
        time.sleep(0.05)


def _release(cfg: InProcessRestartConfig) -> None:
    """Free what the failed attempt held (its frames are gone; cycles and cached device memory remain)."""
    gc.collect()
    if cfg.empty_cuda_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_restarts(cfg: InProcessRestartConfig, attempt: Callable[[], T]) -> T:
    """Call `attempt()`; after a fault on any rank, call it again on every rank (see the module doc)."""
    if dist.is_available() and dist.is_initialized():
        raise ConfigError(
            Problem(
                "inprocess_restart.enabled",
                "in-process restart must create (and re-create) the process group itself, and one exists",
                True,
                fix="do not call torch.distributed.init_process_group before pretrain(), "
                "or set inprocess_restart.enabled=false",
            )
        )
    if threading.current_thread() is not threading.main_thread():
        # The progress stamps and the interrupt are delivered to the main thread only.
        raise RuntimeError("in-process restart: call pretrain() from the main thread")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    run = dist_init.begin_restartable_run()
    store = coordination_store(rank, world_size, run, timedelta(seconds=cfg.barrier_timeout))
    restarts = 0
    config_error: ConfigError | None = None
    try:
        while True:
            dist_init.set_inprocess_attempt(restarts)
            monitor = Monitor(cfg, store, rank=rank, world_size=world_size, attempt=restarts)
            monitor.start()
            try:
                try:
                    result = monitor.run(attempt)
                except Exception as exc:
                    if isinstance(exc, RestartInterrupt):
                        log.warning("rank %d: attempt %d interrupted for a restart", rank, restarts)
                    else:
                        log.error("rank %d: attempt %d failed", rank, restarts, exc_info=exc)
                        fault = f"rank {rank}: {type(exc).__name__}: {exc}"
                        store.set(f"fault/{restarts}/{rank}", fault)
                        if isinstance(exc, ConfigError):
                            # A setting or input file that is wrong fails every attempt the same way.
                            store.set(f"fatal/{restarts}", fault)
                            config_error = exc
                        monitor.request_restart(fault)
                    if config_error is None:
                        # The traceback's frames hold the attempt's model, optimizer and data loaders.
                        traceback.clear_frames(exc.__traceback__)
                    del exc
                else:
                    # Every rank finishes, or some rank failed after this one's last collective.
                    if _completed(monitor, world_size, cfg.completion_timeout):
                        return result
                    del result
                _release(cfg)
                _barrier(store, f"joined/{restarts}", world_size, cfg.barrier_timeout, "restart barrier")
                reason = _describe(monitor.restart_reason(), _faults(store, restarts, world_size))
            finally:
                monitor.stop()
            if store.check([f"fatal/{restarts}"]):
                if config_error is not None:
                    raise config_error
                raise RuntimeError(
                    f"in-process restart: not restarting after a configuration error: {reason}"
                )
            if cfg.max_iterations is not None and restarts >= cfg.max_iterations:
                raise RuntimeError(
                    f"in-process restart: giving up after {restarts} restart(s) "
                    f"(inprocess_restart.max_iterations={cfg.max_iterations}); last fault: {reason}"
                )
            restarts += 1
            log.warning(
                "rank %d: in-process restart %d%s after: %s",
                rank,
                restarts,
                f" of {cfg.max_iterations}" if cfg.max_iterations is not None else "",
                reason,
            )
    finally:
        dist_init.set_inprocess_attempt(None)


def _faults(store: dist.Store, attempt: int, world_size: int) -> list[str]:
    """The exceptions the ranks reported for `attempt` (every rank has reported once past the barrier)."""
    keys = [f"fault/{attempt}/{r}" for r in range(world_size)]
    return [store.get(k).decode(errors="replace") for k in keys if store.check([k])]


def _describe(cause: str | None, faults: list[str]) -> str:
    """The first reported cause, then every rank's exception (some only follow from the cause)."""
    others = [f for f in faults if f != cause]
    text = cause or "unknown"
    return f"{text} (exceptions: {'; '.join(others)})" if others else text


def _completed(monitor: Monitor, world_size: int, timeout: float) -> bool:
    """True when every rank finished this attempt; False when a restart was asked for meanwhile."""
    key = f"done/{monitor.attempt}"
    monitor.store.add(key, 1)
    deadline = time.monotonic() + timeout
    while monitor.store.add(key, 0) < world_size:
        if monitor.restart_reason() is not None:
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"in-process restart: only {monitor.store.add(key, 0)} of {world_size} ranks finished "
                f"within completion_timeout ({timeout} s); ending the job"
            )
        time.sleep(0.05)
    return True
