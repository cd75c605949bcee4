"""Loader worker processes that never outlive, or outrun, the process that owns them.

Two faults seen in production:
- `kill -9` of a run left its DataLoader workers alive (minutes, hundreds of MB each):
  a worker asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG).
- SLURM and torchrun send SIGTERM to every process of a job. A worker that dies of it
  makes the DataLoader raise in the rank before the rank can save its checkpoint, so
  workers ignore the stop signals and leave the stopping to their rank (which exits,
  and takes them with it through the parent-death signal).
- Ignoring SIGTERM has a cost: a rank that ends with an uncaught exception (the
  traceback keeps its DataLoader iterator alive) reaches multiprocessing's exit hook,
  which `terminate()`s (SIGTERM) its daemonic children and then joins them: forever.
  So the parent registers its own exit hook, run before multiprocessing's, that
  SIGKILLs the loader workers still alive; the rank exits and the job fails instead of
  hanging to its time limit.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook now, so ours (registered later) runs first
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def slurm_workers(processes_per_node: int = 1) -> int | None:
    """Loader or decoder processes for each of `processes_per_node` processes: the CPUs SLURM gives them, less one
    for the process itself (at least 1); None outside SLURM (the caller's default applies)."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
    return max(1, cpus // max(1, processes_per_node) - 1) if cpus else None


@functools.cache
def kill_workers_at_exit() -> None:
    """In the parent: at interpreter exit, SIGKILL the daemonic children (loader workers) still alive.

    Registered once (cached), after multiprocessing's own hook (imported above), so it runs first (atexit is LIFO).
    """
    atexit.register(_kill_daemon_children)


def _kill_daemon_children() -> None:
    # torch's SIGCHLD handler would raise "DataLoader worker ... killed" mid-way through the joins
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [c for c in multiprocessing.active_children() if c.daemon]
    for child in children:  # all of them first: a join must not stand between a worker and its kill
        child.kill()
    for child in children:
        child.join(timeout=5)


def exit_now(code: int = 0) -> None:
    """End this process at once, once its work is saved: loader workers killed, output flushed, then os._exit.

    A rank that has saved and finished its MLflow run still spends 3-5 s in interpreter teardown (module
    and C++ destructors of torch, DeepSpeed, gloo, MLflow; measured on 2 busy cores), during which torchrun,
    srun and SLURM's KillWait wait for it. Nothing left to do needs that teardown: every file is closed
    and every thread joined by then.
    """
    import logging

    _kill_daemon_children()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class WorkerInit:
    """DataLoader `worker_init_fn`: die with the parent; optionally leave stop signals to the parent.

    A class (not a closure) so it pickles under every multiprocessing start method.
    """

    def __init__(self, ignore_stop_signals: bool = False):
        self.parent_pid = os.getpid()
        self.ignore_stop_signals = ignore_stop_signals
        if ignore_stop_signals:  # built in the parent, before the workers start
            kill_workers_at_exit()

    def __call__(self, worker_id: int) -> None:  # noqa: ARG002
        die_with_parent(self.parent_pid)
        if self.ignore_stop_signals:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
