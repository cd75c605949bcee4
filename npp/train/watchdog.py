"""A stalled job ends in bounded time, with a name: a progress watchdog on every rank.

A rank that stops (a GPU off the bus, a filesystem read that never returns; SIGSTOP in the
tests) leaves every other rank waiting in a collective until the process group's timeout,
and that alone ends the job without saying who stalled. So each rank runs a thread that
(1) publishes this rank's progress (step, host, time) in the process group's store every few
seconds, and (2) when no optimizer step or checkpoint save has completed for
`--collective-timeout` seconds, prints one line naming this rank, its host, its step and where
its main thread waits (its Python stack), and the ranks whose published progress stopped
(a stopped process publishes nothing), then exits with STALLED. The launcher (torchrun, srun
`--kill-on-bad-exit`) then ends the other processes, and the sbatch script requeues the job,
which resumes from the last complete checkpoint (a save in progress never becomes `latest`).

Evaluations pause it (they may be long, and their collectives have the process group's own
timeout); the process group waits a little longer than it (npp.train.distributed.init), so this
line comes before NCCL's own watchdog aborts the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

STALLED = 3  # the exit status of a rank whose job made no progress for --collective-timeout seconds
KEY = "npp/progress/"


def default_store():
    """The process group's key-value store (torchrun's or the env:// TCP store), or None."""
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - no peer report is better than no watchdog
        return None


class ProgressWatchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, store=None,
                 log: Callable[[str], None] | None = None, exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.time, poll_s: float | None = None):
        self.timeout_s, self.rank, self.world_size = float(timeout_s), rank, world_size
        self.store, self.exit, self.clock = store, exit, clock
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(10.0, self.timeout_s / 10))
        self.host = socket.gethostname()
        self.step, self.last = 0, clock()
        self.paused = 0
        self.main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of_job(cls, timeout_s: float, rank: int, world_size: int) -> ProgressWatchdog:
        """The trainer's: started once every rank is past its start-up (rank 0 alone creates the MLflow run: a new
        store's migrations, a server slow to answer, which the ranks already waiting in the first step would
        otherwise count as a stall), reporting peers through the process group's store."""
        return cls(timeout_s, rank, world_size, default_store())

    def start(self, step: int) -> None:
        self.beat(step)
        self._thread = threading.Thread(target=self._run, name="npp-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """An optimizer step (or a save) completed."""
        self.step, self.last = step, self.clock()

    @contextlib.contextmanager
    def pause(self):
        """A long phase with collectives of its own (an evaluation): not a stall; the clock restarts after it."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.last = self.clock()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._publish(self.clock())  # at once: a rank that stalls early is named too
        while not self._stop.wait(self.poll_s):
            self._publish(self.clock())
            now = self.clock()  # after publishing: a store whose host stopped may have held the call
            if not self.paused and now - self.last > self.timeout_s:
                self.log(self.report(now))
                self.exit(STALLED)
                return

    def _publish(self, now: float) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(f"{KEY}{self.rank}", json.dumps({"step": self.step, "host": self.host, "t": now}))

    def peers(self, now: float) -> list[str]:
        """The other ranks whose published progress is older than two polls (stopped), or missing."""
        if self.store is None:
            return []
        silent = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:  # check first: a get of a key never set waits for the store's whole timeout
                seen = json.loads(self.store.get(f"{KEY}{r}")) if self.store.check([f"{KEY}{r}"]) else None
            except Exception:  # noqa: BLE001 - the store is gone with its host
                seen = None
            if seen is None:
                silent.append(f"rank {r} (no progress published)")
                continue
            if now - seen["t"] > 3 * self.poll_s:
                silent.append(f"rank {r} on {seen['host']} (silent for {now - seen['t']:.0f} s, at step "
                              f"{seen['step']})")
        return silent

    def where(self) -> str:
        """Where the main thread waits: its innermost frames and npp's innermost one, innermost first."""
        frame = sys._current_frames().get(self.main)
        if frame is None:
            return "(no stack)"
        frames = traceback.extract_stack(frame)
        own = [f for f in frames if f"{os.sep}npp{os.sep}" in f.filename]
        shown = list(reversed(frames[-3:])) + ([own[-1]] if own and own[-1] not in frames[-3:] else [])
        return " <- ".join(f"{f.name} ({f.filename.split('site-packages' + os.sep)[-1]}:{f.lineno})" for f in shown)

    def report(self, now: float) -> str:
        silent = self.peers(now)
        blame = f"; stopped: {', '.join(silent)}" if silent else ""
        return (f"[npp train] rank {self.rank} on {self.host}: no optimizer step or save completed for "
                f"{now - self.last:.0f} s (--collective-timeout {self.timeout_s:g}) at step {self.step}{blame}; "
                f"exiting {STALLED} so the job ends and is requeued. Waiting in: {self.where()}")
