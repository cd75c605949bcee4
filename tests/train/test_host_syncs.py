"""The training loop does not make the host wait for the device between sync points.

On a GPU every read of a device value (`.item()`, `.tolist()`, `bool(t)`, `float(t)`,
`.cpu()`) blocks the host until the GPU has caught up, so the CPU cannot queue the next
micro-step while this one runs (at k=4 GPT-B's micro-step is about 1 ms of GPU work).
On CPU nothing is asynchronous, so the test counts those calls instead: every call
made from npp's own code is recorded with the step it happened at. Between sync points
(--sync-every, log, checkpoint and eval steps) there must be none, and inside
`train_step` none at all. DeepSpeed's own reads (its invalid-gradient-norm check in the
optimizer step) are DeepSpeed's and not counted here.

Device syncs are counted too, on the GPU's branch: DeepSpeed decides whether to call the accelerator's
`synchronize` by `resolves_data_dependency()`, which is True on the CPU accelerator (its `synchronize` a no-op)
and False on CUDA's, so the script answers as CUDA does and counts every `synchronize` (and a patched-in
`torch.cuda.synchronize`), from DeepSpeed's code too: its ThroughputTimer (on by default) waits at every forward
and step, ZeRO-2's `overlap_comm` at every gradient bucket. With npp's DeepSpeed config there is none at all over
20 steps (the trainer's own, at its log points, is CUDA-only). With the timers turned back on in the JSON there
are two per step (checked by hand: 36 in 20 steps).
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import run_env

COUNT = textwrap.dedent('''
    import json, os, sys, torch
    from npp.train.config import TrainConfig
    from npp.train.stopping import StopRequest
    from npp.train.plan import make_plan
    from npp.train.trainer import Trainer

    from deepspeed.accelerator import get_accelerator

    NPP = os.path.dirname(os.path.abspath(__import__("npp").__file__))
    shards, out, grad_accum, ds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = TrainConfig(shards=shards, out=out, model="GPT-Nano", global_batch=16, grad_accum=grad_accum, total_steps=20,
                      sync_every=5, log_every=10, ckpt_every=100, workers=1, tracking=False, warmup_epochs=0,
                      ds_config=ds, ema=True)
    trainer = Trainer(make_plan(cfg))
    where = {"phase": "setup"}
    reads, syncs = [], []

    accelerator = type(get_accelerator())
    accelerator.resolves_data_dependency = lambda self: False  # CUDA's answer: DeepSpeed takes the GPU's branch

    def synced(name, real):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            syncs.append({"phase": where["phase"], "op": name, "at": caller.co_filename.split("site-packages/")[-1]
                          + ":" + str(sys._getframe(1).f_lineno)})
            return real(*args, **kwargs)
        return wrapper

    accelerator.synchronize = synced("accelerator.synchronize", accelerator.synchronize)
    torch.cuda.synchronize = synced("torch.cuda.synchronize", torch.cuda.synchronize)

    def counted(name, real):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(NPP):
                reads.append({"phase": where["phase"], "step": getattr(trainer, "step", None), "op": name,
                              "at": caller[len(NPP) + 1:] + ":" + str(sys._getframe(1).f_lineno)})
            return real(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    real_step, real_local = trainer.train_step, StopRequest.local
    looks = []

    def train_step(batches, patch_side):
        where["phase"] = "train_step"
        try:
            return real_step(batches, patch_side)
        finally:
            where["phase"] = "loop"

    def local(self):
        looks.append(trainer.step)
        return real_local(self)

    trainer.train_step = train_step
    StopRequest.local = local
    trainer.train()
    print("RESULT " + json.dumps({"reads": reads, "stop_looks": looks,
                                  "syncs": [x for x in syncs if x["phase"] != "setup"]}))
''')


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum, ds", [(1, "zero2"), (2, "zero2"), (1, "zero1")])
def test_no_host_reads_between_sync_points_and_no_device_sync(shard_set, tmp_path, grad_accum, ds):
    script = tmp_path / "count.py"
    script.write_text(COUNT)
    proc = subprocess.run([sys.executable, str(script), str(shard_set), str(tmp_path / "run"), str(grad_accum),
                           f"ds_configs/{ds}.json"], env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    reads = result["reads"]
    in_step = [r for r in reads if r["phase"] == "train_step"]
    assert not in_step, in_step
    sync_steps = {5, 10, 15, 20}
    between = [r for r in reads if r["phase"] == "loop" and r["step"] not in sync_steps]
    assert not between, between
    assert {r["step"] for r in reads if r["phase"] == "loop"} == sync_steps  # the losses are read there
    assert result["stop_looks"] == [5, 10, 15, 20]  # the stop request: only at sync points
    assert result["syncs"] == []  # no device sync in 20 steps (EMA on), DeepSpeed's included
