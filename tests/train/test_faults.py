import subprocess
import sys
import textwrap

import pytest

from tests.train.conftest import run_env

POISON = textwrap.dedent('''
    import sys, torch
    from npp.train.config import TrainConfig
    from npp.train.trainer import Trainer
    cfg = TrainConfig(shards=sys.argv[1], out=sys.argv[2], model="GPT-Nano", global_batch=16, total_steps=20,
                      ckpt_every=3, workers=0, max_bad_steps=3, tracking=False, warmup_epochs=0,
                      ds_config="ds_configs/zero2.json")
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def poisoned_step(batches, patch_side):
        if trainer.step == 5:  # weights blow up: every later loss is NaN
            with torch.no_grad():
                trainer.engine.module.norm.weight.fill_(float("nan"))
        return real_step(batches, patch_side)

    trainer.train_step = poisoned_step
    trainer.train()
''')


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_with_the_last_good_checkpoint(shard_set, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", POISON, str(shard_set), str(run)], env=run_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("non-finite loss at step 5") == 3
    assert "3 consecutive non-finite losses at step 5" in out
    assert "The last good checkpoint is step_000000003" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_000000003"
