"""A private one-node SLURM cluster for the test session (config, state, logs in a temporary directory).

Debian's `slurmd slurmctld slurm-client munge` (Slurm 22.05) start in seconds on a
2-core machine without a GPU; see docs/slurm-local.md. Daemons run in the
foreground as children of the test process and are ended by pid. Clients find the
cluster through SLURM_CONF, which the fixture sets for the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from npp.pipeline.ranks import free_port

PACKAGES = "slurmd slurmctld slurm-client munge"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "etc" / "slurm.conf"
        self.env = {}

    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.munge_socket = r / "munge" / "munge.socket"
        ctl, slurmd = free_port(), free_port()
        self.conf.write_text(f"""ClusterName=npptest
SlurmctldHost={self.host}
SlurmctldPort={ctl}
SlurmdPort={slurmd}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=30
SchedulerParameters=sched_interval=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (r / "etc" / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(
            [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"], stdout=log, stderr=log))
        self._until(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self.env = {"SLURM_CONF": str(self.conf)}
        os.environ.update(self.env)
        self.procs.append(subprocess.Popen([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], stdout=log, stderr=log))
        time.sleep(1)
        self.procs.append(subprocess.Popen([_which("slurmd"), "-D", "-f", str(self.conf)], stdout=log, stderr=log))
        self._until(lambda: self.run("sinfo", "-h", "-o", "%t").stdout.strip() in ("idle", "idle*"), timeout,
                    "the node did not come up idle")

    def _until(self, cond, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if cond():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{message}; logs in {self.root / 'log'}:\n" + self.logs())

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=check,
                              env={**os.environ, **self.env})

    def job_state(self, job: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        fields = {}
        for tok in out.split():
            k, _, v = tok.partition("=")
            fields.setdefault(k, v)
        return fields

    def wait_state(self, job: str, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job_state(job)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} not in {states} after {timeout} s: {info}\n{self.logs()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        for k in self.env:
            os.environ.pop(k, None)
