"""slurm/train.sbatch --nodes=2 on a real two-node SLURM cluster (network namespaces on this machine; CPU, gloo,
GPT-Nano, 2 processes per node): the multi-node path users take on day one.

Each job runs from a fresh checkout with a bare `sbatch` typed on the cluster's login node (the
controller's namespace). tests/slurm/instrument records, in every process of the job, the run positions of
every micro-batch each rank's loader builds, every file torch.save writes and when each save returns; the job log and
the run folder say the rest. SLURM's default KillWait (30 s) is kept.
"""

import collections
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import cpu_hogs, read_metrics
from tests.slurm.jobs import (
    INSTRUMENT,
    assert_each_step_once,
    job_log,
    mlflow_runs_and_loss_steps,
    release_requeued,
    submit_train,
    wait_for,
)

pytestmark = pytest.mark.slow

TWO_NODES = "--gres=none --cpus-per-task=2 --nodes=2"


def events(record_dir: Path) -> list[dict]:
    out = []
    for f in sorted(record_dir.glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def submit(checkout, cluster, tmp_path, shard_set, run, record, more_flags="", **env):
    record.mkdir(exist_ok=True)
    return submit_train(checkout, cluster, tmp_path, shard_set, run, sbatch_flags=TWO_NODES, more_flags=more_flags,
                        PYTHONPATH=str(INSTRUMENT), NPP_TEST_RECORD=str(record), **env)


def lose_node(cluster, node: str) -> None:
    """SIGKILL every npp process of `node` (torchrun, its ranks, their loader workers), frozen first so none
    slips between listing and killing: the node is lost to the job, its slurmd stays up."""
    procs = cluster.npp_processes(node)
    assert len(procs) >= 3, procs  # torchrun and its 2 ranks at least
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def resume_node(cluster, node: str) -> None:
    """Bring a node marked DOWN back: SLURM refuses RESUME while the failed job's steps are still completing
    there, so ask until the node is idle."""
    def back() -> bool:
        cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
        return cluster.run("sinfo", "-h", "-n", node, "-o", "%t").stdout.strip() == "idle"

    wait_for(back, 120, f"{node} to come back after DOWN")


def stall_a_rank(cluster, node: str) -> str:
    """SIGSTOP one rank's main process on `node` (a GPU off the bus, a read that never returns); its RANK."""
    procs = cluster.npp_processes(node)
    ranks = {pid: p for pid, p in procs.items() if "torchrun" in procs.get(p["ppid"], {}).get("cmd", "")}
    assert ranks, procs
    pid = max(ranks, key=lambda q: int(ranks[q]["rank"]))
    os.kill(pid, signal.SIGSTOP)
    return ranks[pid]["rank"]


def check_data_and_files(run: Path, record: Path, log: str) -> None:
    """World 4 over both nodes; each micro-batch built by the rank that data order 2 gives it, every sample of
    the run's steps read, on both nodes; every file of every checkpoint written once."""
    assert "world 4, micro-batch 4" in log, log[-3000:]
    for start in log.split("npp train: ok:")[1:]:  # each start: 2 ranks on each node (c10d picks which)
        nodes = re.findall(r"node (node\d): ranks (\d)-(\d) of 4", start)
        assert sorted(h for h, _, _ in nodes) == ["node1", "node2"], nodes
        assert sorted((a, b) for _, a, b in nodes) == [("0", "1"), ("2", "3")], nodes
    ev = events(record)
    built = [e for e in ev if e["kind"] == "batch"]
    assert built, "no micro-batch recorded"
    for e in built:  # rank r of 4 builds micro-batches at run positions (m·4 + r)·4
        assert e["world"] == 4 and e["size"] == 4 and (e["start"] // 4) % 4 == e["data_rank"], e
    steps = max(r["step"] for r in read_metrics(run))
    assert set(range(0, steps * 16, 4)) <= {e["start"] for e in built}  # every sample of every step was read
    # each start's loader begins where its checkpoint left off: rank r's first micro-batch at step x 16 + r x 4
    starts = [0] + [int(x) for x in re.findall(r"resuming at step (\d+)/40", log)]
    first = {}
    for e in built:  # one loader worker per rank and start (WORKERS=1), a process of its own
        key = (e["host"], e["pid"])
        first[key] = min(first.get(key, (e["start"], e["data_rank"])), (e["start"], e["data_rank"]))
    assert sorted(first.values()) == sorted((s * 16 + r * 4, r) for s in starts for r in range(4)), (starts, first)
    assert {e["host"] for e in built} == {"node1", "node2"}
    saves = [e for e in ev if e["kind"] == "torch.save" and "/checkpoints/" in e["path"]]
    assert saves, "no checkpoint file recorded"
    counts = collections.Counter(e["path"] for e in saves)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1]
    by_rank = collections.defaultdict(set)
    for e in saves:
        by_rank[e["rank"]].add(Path(e["path"]).name)
    assert set(by_rank) == {"0", "1", "2", "3"}, by_rank  # every rank writes its own part
    for rank, names in by_rank.items():
        assert any(f"rng_rank{rank}.pt" == n for n in names), (rank, names)


def stop_seconds(record: Path, log: str, step: int) -> float:
    """From the last rank's return from the save at `step` to the batch script's closing line."""
    saved = [e["t"] for e in events(record) if e["kind"] == "saved" and e["step"] == step]
    assert len(saved) == 4, saved
    closing = re.search(r"trainer exited \(\d+\) at ([\d.]+)", log)
    assert closing, log[-3000:]
    return float(closing.group(1)) - max(saved)


# --collective-timeout of the job whose rank is stopped (its process group waits 105 s); the watchdog also counts
# while the test holds every rank after a checkpoint, so each hold stays well under it
STALL_TIMEOUT = 45


def last_start(log: str) -> str:
    return log.split("resuming at step")[-1]


def checkpoint_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])


def test_two_nodes_usr1_a_lost_node_a_down_node_a_hung_rank_and_a_quiet_end(checkout, two_node_cluster, tmp_path,
                                                                            shard_set):
    """A 40-step job over two nodes, each fault landing at an exact step whatever the machine's speed (every rank
    held after a checkpoint while the test acts, then let go): after step 8 the time-limit warning (USR1 to the
    batch script) -> every rank saves at the agreed step -> every process of both nodes exits promptly after the
    save -> requeue -> the restart resumes there; held after step 16's checkpoint, node2 is lost (SIGKILL of every
    npp process on it) -> the job fails and requeues itself (failure 1 of 3) -> the next restart resumes from 16;
    held after 24, SLURM marks node2 DOWN -> SLURM requeues the job itself (--requeue) -> node2 back -> the restart
    resumes from 24; held after 32, one rank of node2 stops (SIGSTOP, --collective-timeout 45) and the others go on:
    their watchdogs name it and node2 and end the job (their line comes before the failure: the watchdog ended
    it, not the process group's own timeout 60 s later, which would name nobody; no wall-clock bound a loaded
    machine could miss) -> it requeues itself -> the last restart resumes from 32 and finishes with a busy loop
    on every core; that normal end prints no C++ trace or rendezvous error."""
    run, record, hold = tmp_path / "run", tmp_path / "record", tmp_path / "hold"
    hold.write_text("")
    job = submit(checkout, two_node_cluster, tmp_path, shard_set, run, record,
                 more_flags=f"--collective-timeout {STALL_TIMEOUT}", NPP_TEST_HOLD_AFTER_SAVE="any",
                 NPP_TEST_HOLD_FILE=str(hold))

    def held_after(step: int) -> None:
        wait_for(lambda: sum(e["kind"] == "saved" and e["step"] == step for e in events(record)) == 4, 300,
                 f"every rank to save step {step}")

    def requeue_held(restarts: int) -> None:  # the restart holds after its first checkpoint
        wait_for(lambda: two_node_cluster.job_state(job).get("JobState") == "PENDING", 180, "the job to requeue")
        hold.write_text("")
        release_requeued(two_node_cluster, job, restarts)

    held_after(8)
    two_node_cluster.run("scancel", "--signal=USR1", "--batch", job, check=True)
    wait_for(lambda: (run / "STOP").exists(), 20, "the batch script to ask for the stop")  # before the next sync
    hold.unlink()
    requeue_held(1)
    wait_for(lambda: "resuming at step" in job_log(checkout, job), 300, "the restart to resume")
    saved = int(re.search(r"checkpoint saved: step_0*(\d+); requeueing", job_log(checkout, job)).group(1))
    assert 8 < saved < 16, saved  # the next sync point after the warning
    held_after(16)
    lose_node(two_node_cluster, "node2")
    hold.unlink()
    wait_for(lambda: "training failed (exit" in job_log(checkout, job), 180, "the job to fail without node2")
    at_failure = checkpoint_step(run)
    assert at_failure == 16
    requeue_held(2)
    wait_for(lambda: job_log(checkout, job).count("resuming at step") == 2, 300, "the restart after the lost node")
    held_after(24)
    # SLURM's own node failure: node2 marked DOWN -> SLURM ends and requeues the job (--requeue) -> node2 back
    two_node_cluster.run("scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=npp-test", check=True)
    wait_for(lambda: two_node_cluster.job_state(job).get("JobState") == "PENDING", 180, "SLURM to requeue the job")
    at_down = checkpoint_step(run)
    assert at_down == 24
    resume_node(two_node_cluster, "node2")
    requeue_held(3)
    wait_for(lambda: job_log(checkout, job).count("resuming at step") == 3, 300, "the restart after node2 DOWN")
    held_after(32)
    # a hung rank: one rank of node2 stops; the other ranks' watchdogs name it and end the job
    rank = stall_a_rank(two_node_cluster, "node2")
    hold.unlink()
    wait_for(lambda: job_log(checkout, job).count("training failed (exit") == 2, STALL_TIMEOUT + 180,
             "the stall to end the job")
    log = job_log(checkout, job)
    named = re.search(rf"\[npp train\] rank \d on node\d: no optimizer step or save completed for \d+ s "
                      rf"\(--collective-timeout {STALL_TIMEOUT}\) at step 32; stopped: [^\n]*rank {rank} on node2 "
                      rf"\(silent", log)
    assert named, log[-4000:]
    assert named.start() < log.rindex("training failed (exit"), log[-4000:]  # the watchdog ended it
    at_stall = checkpoint_step(run)  # complete: a save cut short never becomes `latest`
    release_requeued(two_node_cluster, job, 4)
    with cpu_hogs():  # the last restart trains and ends with every core busy: the end must still be quiet
        info = two_node_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), 400)
    log = job_log(checkout, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "4", f"{log[-4000:]}\n{info}"
    assert re.findall(r"resuming at step (\d+)/40", log) == [str(x) for x in (saved, at_failure, at_down, at_stall)], \
        log[-3000:]
    assert f"resuming at step {saved}/40" in log, log[-3000:]
    assert "failure 1 of at most 3 in a row: requeueing" in log, log[-3000:]
    assert f"resuming at step {at_failure}/40" in log.split("training failed")[1], log[-3000:]
    first_part = log.split("requeueing job")[0]
    assert stop_seconds(record, first_part, saved) <= 20.0, first_part[-3000:]  # not SLURM's KillWait (30 s)
    assert "training finished; checkpoint saved: step_000000040" in log
    assert not (run / "failures.log").exists()  # a finished run forgets its failures
    assert_each_step_once(run)
    n_runs, steps = mlflow_runs_and_loss_steps(tmp_path, run)
    assert n_runs == 1 and steps == list(range(4, 41, 4))
    check_data_and_files(run, record, log)
    for noise in ("Traceback", "TCPStore", "RendezvousConnectionError", "recvVector", "Exception raised from"):
        assert noise not in last_start(log), last_start(log)[-4000:]


def test_two_nodes_preempted_resumes_and_a_cancel_stays_cancelled(checkout, two_node_cluster, tmp_path, shard_set):
    """With a busy loop on every core: `scontrol requeue` (TERM to every process on both nodes) -> save ->
    resume at the saved step; then `scancel` of the resumed job -> it stays cancelled. Both closing lines are
    written, well before SLURM's KillWait (30 s) would end the job."""
    run, record = tmp_path / "run", tmp_path / "record"
    job = submit(checkout, two_node_cluster, tmp_path, shard_set, run, record)
    with cpu_hogs():
        wait_for(lambda: len(read_metrics(run)) >= 10, 300, "training to reach step 10")
        two_node_cluster.run("scontrol", "requeue", job, check=True)
        release_requeued(two_node_cluster, job, 1)
        wait_for(lambda: "resuming at step" in job_log(checkout, job), 300, "the restart to resume")
        log = job_log(checkout, job)
        resumed = int(re.search(r"resuming at step (\d+)/40", log).group(1))
        assert resumed >= 10 and f"checkpoint saved: step_{resumed:09d}" in log, log[-3000:]
        assert "after TERM" in log and "not requeueing" in log, log[-3000:]
        assert stop_seconds(record, log.split("after TERM")[0] + "after TERM", resumed) <= 20.0, log[-3000:]
        wait_for(lambda: len(read_metrics(run)) >= resumed + 3, 300, "the resumed job to train")
        two_node_cluster.run("scancel", job, check=True)
        two_node_cluster.wait_state(job, ("CANCELLED",), 120)
        wait_for(lambda: job_log(checkout, job).count("not requeueing") == 2, 30, "the cancelled job's closing line")
    time.sleep(5)
    info = two_node_cluster.job_state(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info
    log = job_log(checkout, job)
    last = last_start(log)  # the cancelled restart claims only what `latest` shows
    latest = (run / "checkpoints" / "latest").read_text().strip()
    claims = (f"checkpoint saved: {latest}", f"no new checkpoint (latest is still {latest})")
    assert any(c in last for c in claims), last[-2000:]
    check_data_and_files(run, record, log)
