"""Non-finite gradients: DeepSpeed skips the update on every rank, the trainer counts it and stops on a streak.

The poison is a NaN in the logits of one micro-batch (the second of two, so the
gradients of a good micro-batch are already accumulated), on one rank only; later
the weights themselves are made NaN so that every loss is. Each run checks, on every
rank, that the skipped step left the weights, the optimizer's master weights and Adam
state and the LR schedule exactly as they were, that the step is redone on new data,
and that the streak stops the run naming the last good checkpoint.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from npp.runtime.ranks import free_port
from tests.helpers import read_metrics, run_env

POISON = textwrap.dedent('''
    import json, os, sys, torch, deepspeed
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan
    from npp.train.trainer import Trainer

    shards, out, ds_config, precision, poison_rank = sys.argv[1:6]
    cfg = TrainConfig(shards=shards, out=out, model="GPT-Nano", global_batch=16, grad_accum=2, total_steps=20,
                      ckpt_every=3, log_every=4, workers=1, max_bad_steps=3, tracking=False, warmup_epochs=0,
                      ds_config=ds_config, precision=precision)
    trainer = Trainer(make_plan(cfg))
    real_step = trainer.train_step
    state = {"forwards": 0, "poison_forward": None}

    def nan_logits(module, inputs, output):
        state["forwards"] += 1
        return output * float("nan") if state["forwards"] == state["poison_forward"] else output

    def snapshot():
        engine = trainer.engine
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
            weights = [p.detach().float().clone() for p in params]
        base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        master = [p.detach().clone() for g in base.param_groups for p in g["params"]]
        adam = [v.detach().clone() for s in base.state.values() for v in s.values() if torch.is_tensor(v)]
        return weights, master, adam, engine.lr_scheduler.last_epoch

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    def poisoned_step(batches, patch_side):
        if not state.get("hooked"):
            trainer.engine.module.output.register_forward_hook(nan_logits)
            state["hooked"] = True
        step = trainer.step
        if step == 4 and "transient" not in state:  # the 5th step
            state["transient"] = True
            if trainer.env.rank == int(poison_rank):
                state["poison_forward"] = state["forwards"] + 2  # the second micro-batch of this step
            before = snapshot()
            loss = real_step(batches, patch_side)
            after = snapshot()
            line = "RESULT " + json.dumps({
                "rank": trainer.env.rank, "skipped": loss is None, "weights": same(before[0], after[0]),
                "master": same(before[1], after[1]), "adam": same(before[2], after[2]) and len(before[2]) > 0,
                "lr_epoch": [before[3], after[3]]}) + "\\n"
            os.write(1, line.encode())  # one write: the ranks share stdout, and print() writes the newline apart
            return loss
        if step == 10:  # weights blow up at the 11th step: every later loss is NaN
            with torch.no_grad():
                trainer.engine.module.norm.weight.fill_(float("nan"))
        return real_step(batches, patch_side)

    trainer.train_step = poisoned_step
    trainer.train()
''')


def run_poisoned(shard_set, tmp_path, ds_config, precision, nproc=1, poison_rank=0):
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    run = tmp_path / "run"
    args = [str(script), str(shard_set), str(run), f"ds_configs/{ds_config}", precision, str(poison_rank)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]
           if nproc > 1 else [sys.executable])
    proc = subprocess.run(cmd + args, env=run_env(tmp_path), capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    decoder = json.JSONDecoder()
    results = [decoder.raw_decode(part)[0] for part in out.split("RESULT ")[1:]]
    return proc, out, results, run


def check_skip_then_stop(proc, out, results, run, nproc):
    assert proc.returncode != 0, out[-3000:]
    assert sorted(r["rank"] for r in results) == list(range(nproc)), out[-3000:]
    for r in results:  # every rank skipped, nothing it holds moved
        assert r["skipped"] and r["weights"] and r["master"] and r["adam"], r
        assert r["lr_epoch"][0] == r["lr_epoch"][1], r
    assert "non-finite gradient at step 5: DeepSpeed skipped the optimizer step" in out
    assert out.count("non-finite gradient at step 11") == 3
    assert "3 consecutive non-finite steps at step 11" in out
    assert "The last good checkpoint is step_000000009" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_000000009"
    steps = [r["step"] for r in read_metrics(run)]
    # step 5 once (redone on new data), every record up to the checkpoint, none twice
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 9, steps
    assert all(r["loss"] == r["loss"] for r in read_metrics(run))  # no NaN recorded


@pytest.mark.slow
@pytest.mark.parametrize("ds_config,precision", [("zero2.json", "fp32"), ("zero1.json", "bf16"),
                                                 ("zero3.json", "bf16-mixed")])
def test_a_non_finite_step_is_skipped_then_a_streak_stops_the_run(shard_set, tmp_path, ds_config, precision):
    proc, out, results, run = run_poisoned(shard_set, tmp_path, ds_config, precision)
    check_skip_then_stop(proc, out, results, run, 1)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(shard_set, tmp_path):
    proc, out, results, run = run_poisoned(shard_set, tmp_path, "zero2.json", "fp32", nproc=2, poison_rank=1)
    check_skip_then_stop(proc, out, results, run, 2)


CRASH = textwrap.dedent('''
    import sys
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan
    from npp.train.trainer import Trainer

    cfg = TrainConfig(shards=sys.argv[1], out=sys.argv[2], model="GPT-Nano", global_batch=16, total_steps=40,
                      ckpt_every=100, log_every=4, workers=1, tracking=False, warmup_epochs=0,
                      ds_config="ds_configs/zero2.json")
    trainer = Trainer(make_plan(cfg))
    real_step = trainer.train_step

    def crashing_step(batches, patch_side):
        if trainer.step == 6 and trainer.env.rank == 1:
            raise RuntimeError("CUDA out of memory (simulated) on rank 1")
        return real_step(batches, patch_side)

    trainer.train_step = crashing_step
    trainer.train()
''')


@pytest.mark.slow
def test_a_rank_that_crashes_ends_the_job(shard_set, tmp_path):
    """An uncaught error on one rank, loader workers alive: the job fails at once instead of hanging to its time
    limit (the workers ignore SIGTERM, which multiprocessing's exit hook relied on; see npp.runtime.workers)."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(shard_set), str(tmp_path / "run")]
    try:
        proc = subprocess.run(cmd, env=run_env(tmp_path), capture_output=True, text=True, timeout=120,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["pkill", "-KILL", "-f", str(script)])
        raise AssertionError("the job hung after a rank crashed") from e
    assert proc.returncode != 0
    assert "CUDA out of memory (simulated) on rank 1" in proc.stdout + proc.stderr
