"""Private SLURM clusters for the test session (config, state, logs in a temporary directory): one node
(`Cluster`), or two nodes in network namespaces (`TwoNodeCluster`, ../shared/MULTINODE-LOCAL.md).

Debian's `slurmd slurmctld slurm-client munge` (Slurm 22.05) start in seconds on a
2-core machine without a GPU; see docs/slurm-local.md. Daemons run in the
foreground as children of the test process and are ended by pid. Clients find the
cluster through SLURM_CONF; `client(...)` is how a test types a command on its login node.
KillWait stays SLURM's default (30 s): the suite shows what a user's cluster does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from npp.runtime.ranks import free_port

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

    def client(self, *args: str) -> list[str]:
        """A command as typed on the cluster's login node."""
        return list(args)

    def _nodes(self) -> str:
        return f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN"

    first_job_id = 1

    def _write_config(self, ctl_host: str = "", ports: tuple = (), per_node: bool = False) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.munge_socket = r / "munge" / "munge.socket"
        ctl, slurmd = ports or (free_port(), free_port())
        node = ".%n" if per_node else ""  # two slurmds on one disk: their own spool, pid and log
        self.conf.write_text(f"""ClusterName=npptest
SlurmctldHost={ctl_host or self.host}
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
FirstJobId={self.first_job_id}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{node.replace('.', '/')}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{node}.log
{self._nodes()}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (r / "etc" / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        self._start_munge(timeout)
        self.env = {"SLURM_CONF": str(self.conf)}
        os.environ.update(self.env)
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs.append(
            subprocess.Popen([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], stdout=log, stderr=log)
        )
        time.sleep(1)
        self.procs.append(subprocess.Popen([_which("slurmd"), "-D", "-f", str(self.conf)], stdout=log, stderr=log))
        self._until(lambda: self.run("sinfo", "-h", "-o", "%t").stdout.strip() in ("idle", "idle*"), timeout,
                    "the node did not come up idle")

    def _start_munge(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(
            [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"], stdout=log, stderr=log))
        self._until(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")

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
        return subprocess.run(self.client(*args), capture_output=True, text=True, timeout=60, check=check,
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


class TwoNodeCluster(Cluster):
    """Two SLURM nodes (node1, node2) and a controller (ctl) on this machine, each in its own network namespace
    joined by a bridge; the /24 exists only inside the namespaces, and the host namespace gets no interface,
    address or route. The disk is shared, as a cluster's filesystem is. Root only (`ip netns`)."""

    NET = "10.77.0"
    NODES = ("node1", "node2")
    first_job_id = 100_000  # job ids (and so log names, logs/%x_%j.out) never meet the one-node cluster's

    def __init__(self, root: Path):
        super().__init__(root)
        tag = f"{os.getpid() % 100000}"
        self.ns = {"ctl": f"npp{tag}c", "node1": f"npp{tag}a", "node2": f"npp{tag}b"}
        self.addr = {"ctl": f"{self.NET}.10", "node1": f"{self.NET}.11", "node2": f"{self.NET}.12"}

    @staticmethod
    def available() -> str:
        """Why two nodes cannot be made here ('' when they can)."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return "network namespaces need root and iproute2 (`ip netns`)"
        probe = f"nppprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return "" if made.returncode == 0 else f"`ip netns add` is not permitted here: {made.stderr.strip()}"

    def client(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns["ctl"], *args]

    def _nodes(self) -> str:
        return "\n".join(f"NodeName={n} NodeAddr={self.addr[n]} CPUs=2 RealMemory=4000 State=UNKNOWN"
                         for n in self.NODES)

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _network(self) -> None:
        ctl = self.ns["ctl"]
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items())
        for ns in self.ns.values():
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
        self._ip("-n", ctl, "link", "add", "nppbr0", "type", "bridge")
        self._ip("-n", ctl, "addr", "add", f"{self.addr['ctl']}/24", "dev", "nppbr0")
        self._ip("-n", ctl, "link", "set", "nppbr0", "up")
        for i, node in enumerate(self.NODES, 1):
            inner, outer = f"nppv{i}", f"nppb{i}"
            self._ip("link", "add", inner, "netns", self.ns[node], "type", "veth", "peer", "name", outer, "netns", ctl)
            self._ip("-n", ctl, "link", "set", outer, "master", "nppbr0")
            self._ip("-n", ctl, "link", "set", outer, "up")
            self._ip("-n", self.ns[node], "addr", "add", f"{self.addr[node]}/24", "dev", inner)
            self._ip("-n", self.ns[node], "link", "set", inner, "up")

    def _daemon(self, name: str, *cmd: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        inner = " ".join(cmd)
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], "unshare", "--uts", "sh", "-c", f"hostname {name}; exec {inner}"],
            stdout=log, stderr=log, start_new_session=True))

    def start(self, timeout: float = 60) -> None:
        self._network()
        self._write_config(ctl_host=f"ctl({self.addr['ctl']})", ports=(6817, 6818), per_node=True)
        for node in self.NODES:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._start_munge(timeout)
        self.env = {"SLURM_CONF": str(self.conf)}
        self._daemon("ctl", _which("slurmctld"), "-D", "-i", "-f", str(self.conf))
        time.sleep(1)
        for node in self.NODES:
            self._daemon(node, _which("slurmd"), "-D", "-N", node, "-f", str(self.conf))
        self._until(lambda: self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split() == ["idle", "idle"], timeout,
                    "the two nodes did not come up idle")

    def npp_processes(self, node: str) -> dict[int, dict]:
        """npp's processes on `node` (torchrun, its ranks, their loader workers; not SLURM's daemons):
        {pid: {"ppid", "rank", "cmd"}}, `rank` from the process's environment (None for torchrun)."""
        out = {}
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in v)
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if " npp " in f" {cmd} " or "-m npp" in cmd:
                out[pid] = {"ppid": ppid, "rank": env.get("RANK"), "cmd": cmd}
        return out

    def stop(self) -> None:
        for ns in self.ns.values():  # job processes left in a node first, then the daemons
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        super().stop()
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
