"""When a run should save and stop: a signal from the cluster, or a STOP file from the user.

SLURM (preemption, `scancel`, the time limit) and torchrun (relaying its own SIGTERM)
signal every process of the job; `#SBATCH --signal=B:USR1@N` warns the batch script,
which writes `RUN/STOP`. Either way the ranks finish the current step, agree through
one all-reduce that someone asked to stop, save, and exit 0 so the job can requeue.
The ranks look at sync points only (every --sync-every steps, see Trainer): the
all-reduce makes the host wait for the device, which per step would cost NPP's
short k=4 steps much of their speed; a stop is therefore honoured within that many steps.
The loader workers ignore these signals (npp.runtime.workers) so they cannot take
the DataLoader down before the save. Only rank 0 looks for the file (a `stat` per
step from every rank is real load on a shared filesystem); the agreement spreads it.
A stop is consumed: the file is removed once the checkpoint is written, so the
requeued run trains on.
"""

from __future__ import annotations

import signal
from pathlib import Path

from npp.train.distributed import all_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


class StopRequest:
    def __init__(self, stop_file: Path, is_main: bool):
        self.file = Path(stop_file)  # RUN/STOP (npp.pipeline.runs.RunFolder.stop_file)
        self.is_main = is_main
        self.signalled = 0  # the signal number received, 0 if none

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.signalled = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def local(self) -> bool:
        """This rank's view: a signal arrived, or (rank 0) the STOP file exists."""
        return bool(self.signalled) or (self.is_main and self.file.exists())

    def agreed(self, device) -> bool:
        """Did any rank ask to stop? One all-reduce: every rank calls it at the same step."""
        return all_sum([float(self.local())], device)[0] > 0

    def reason(self) -> str:
        if self.signalled:
            return f"signal {signal.Signals(self.signalled).name}"
        return f"{self.file}" if self.file.exists() else "another rank"

    def consume(self) -> None:
        """After the stop-save: remove the STOP file so the next start trains on."""
        if self.is_main:
            self.file.unlink(missing_ok=True)
