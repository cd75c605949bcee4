"""A save that fails for space stops the job on every rank with one line; nothing partial is named or kept; the
rerun after freeing space resumes from the last complete checkpoint and finishes."""

import os
import shutil
import subprocess
import textwrap
import time

import pytest

from tests.helpers import launch, launch_cmd, run_env
from tests.slurm.jobs import INSTRUMENT

RUN = dict(total_steps=16, ckpt_every=4, log_every=4, keep=3)


def _check_stopped_at_step_8(out: str, ckpt_dir):
    errors = [line for line in out.splitlines() if line.startswith("npp: error:")]
    assert len(errors) == 1, out[-4000:]  # one line, from rank 0, for the whole job
    line = errors[0]
    assert f"checkpoint step_000000008 not saved in {ckpt_dir}" in line and "GB free" in line, line
    assert f"the last complete checkpoint is {ckpt_dir / 'step_000000004'}" in line, line
    assert (ckpt_dir / "latest").read_text() == "step_000000004"
    assert not (ckpt_dir / "step_000000008").exists()  # nothing partial stays


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the injected-failure test below still runs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_a_full_disk_stops_the_job_with_one_line_and_the_rerun_resumes(shard_set, tmp_path, small_tmpfs):
    run, ckpt_dir = small_tmpfs / "run", small_tmpfs / "run" / "checkpoints"
    hold, record = tmp_path / "hold", tmp_path / "record"
    hold.write_text("")
    record.mkdir()
    env = {**run_env(tmp_path), "PYTHONPATH": str(INSTRUMENT), "NPP_TEST_RECORD": str(record),
           "NPP_TEST_HOLD_AFTER_SAVE": "4", "NPP_TEST_HOLD_FILE": str(hold)}  # every rank waits after step 4's save
    proc = subprocess.Popen(launch_cmd(shard_set, run, **RUN), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not ((ckpt_dir / "latest").exists() and (ckpt_dir / "latest").read_text() == "step_000000004"):
        assert time.time() < deadline and proc.poll() is None, "no first checkpoint"
        time.sleep(0.01)
    size = sum(f.stat().st_size for f in (ckpt_dir / "step_000000004").iterdir())
    free = shutil.disk_usage(small_tmpfs).free
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as fh:  # leave room for half a checkpoint
        fh.write(b"\0" * max(0, free - size // 2))
    hold.unlink()  # the job goes on to step 8 on a full disk, however fast or slow this machine is
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, out[-3000:]
    _check_stopped_at_step_8(out, ckpt_dir)
    filler.unlink()
    log = launch(shard_set, run, tmp_path, **RUN)
    assert "resuming at step 4/16" in log and (run / "model.pt").exists()
    assert (ckpt_dir / "latest").read_text() == "step_000000016"


FAIL_ON_RANK_1 = textwrap.dedent('''
    import os
    if os.environ.get("RANK") == "1":
        import errno
        import torch

        _real_save = torch.save

        def _save(obj, f, *args, **kwargs):
            if "step_000000008" in str(f) and "optim_states" in str(f):
                with open(f, "wb") as fh:
                    fh.write(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 8: "
                                   "PytorchStreamWriter failed writing file data/0: file write failed")
            return _real_save(obj, f, *args, **kwargs)

        torch.save = _save
''')


@pytest.mark.slow
def test_a_write_that_fails_on_one_rank_mid_save_stops_every_rank(shard_set, tmp_path):
    """The disk fills up between the space check and the write, seen by rank 1 only (what torch.save raises)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    run, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {**run_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(launch_cmd(shard_set, run, **RUN), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    _check_stopped_at_step_8(proc.stdout + proc.stderr, ckpt_dir)
    log = launch(shard_set, run, tmp_path, **RUN)
    assert "resuming at step 4/16" in log and (run / "model.pt").exists()
