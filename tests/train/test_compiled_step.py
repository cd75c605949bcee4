"""The real trainer with compiled blocks: each patch side compiles once, nothing recompiles inside a stage.

Runs `Trainer.train()` (DeepSpeed ZeRO-2, one process, default dropout, a two-stage NPP schedule
4 -> 1: a switch of patch side is what recompiles; a third stage would only repeat it, at ~40 s of compiling)
with `--compile on` on CPU. From the second step of each stage on,
`torch._dynamo.config.error_on_recompile` is set: a recompilation (a shape, a guard on a
changing Python value) raises instead of silently costing a compile per step.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import run_env

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch._dynamo
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan
    from npp.train.trainer import Trainer

    cfg = TrainConfig(shards=sys.argv[1], out=sys.argv[2], model="GPT-Nano", global_batch=8, total_steps=6,
                      schedule="4:0.5,1:0.5", log_every=3, ckpt_every=100, workers=1, tracking=False,
                      warmup_epochs=0, compile="on", ds_config="ds_configs/zero2.json")
    trainer = Trainer(make_plan(cfg))
    real_step, seen = trainer.train_step, []

    def train_step(batches, patch_side):
        first = not seen or seen[-1] != patch_side
        torch._dynamo.config.error_on_recompile = not first  # a stage's first step may compile, no later one
        seen.append(patch_side)
        return real_step(batches, patch_side)

    trainer.train_step = train_step
    trainer.train()
    print("RESULT " + json.dumps({"sides": seen, "compiled": trainer.compiled,
                                  "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
''')


@pytest.mark.slow
def test_each_patch_side_compiles_once(shard_set, tmp_path):
    script = tmp_path / "compiled.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(shard_set), str(tmp_path / "run")],
                          env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "blocks compiled" in proc.stdout
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["compiled"] and result["sides"] == [4, 4, 4, 1, 1, 1]
    assert result["graphs"] >= 2  # one forward graph per patch side at least: the blocks did run compiled
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
