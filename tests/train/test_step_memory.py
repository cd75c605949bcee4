"""Activation checkpointing in the trainer's own step: DeepSpeed engine, bf16-mixed, dropout on.

What a step keeps for backward is counted at the end of its forward (the peak of saved
activations) through autograd's saved-tensor hooks, around `TrainStep` as the trainer
builds it (npp.train.step.standalone_step), with and without --activation-checkpointing.
A process of its own: DeepSpeed keeps its process groups for the life of a process.
"""

import textwrap

import pytest

from tests.helpers import script_result

SCRIPT = textwrap.dedent('''
    import json
    import torch
    from npp.models import gpt_config
    from npp.train.config import TrainConfig
    from npp.train.distributed import init, read_env
    from npp.train.step import standalone_step

    device = init(read_env())
    model_cfg = gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8), num_classes=10, attn_dropout_p=0.1)
    idx, labels = torch.randint(0, 64, (8, 64)), torch.randint(0, 10, (8,))
    saved = {}
    for ckpt in (False, True):
        cfg = TrainConfig(shards="-", out="-", model="GPT-Nano", global_batch=8, precision="bf16-mixed",
                          ds_config="ds_configs/zero2.json", activation_checkpointing=ckpt, ema=True, compile="off")
        step = standalone_step(model_cfg, cfg, device)
        assert step.engine.module.activation_checkpointing == ckpt
        live, at_backward = {}, []

        def pack(t):
            s = t.untyped_storage()
            live[s.data_ptr()] = s.nbytes()
            return t

        real_backward = step.engine.backward

        def backward(loss, *args, **kwargs):
            at_backward.append(sum(live.values()))  # everything the forward saved is still held here
            return real_backward(loss, *args, **kwargs)

        step.engine.backward = backward
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step([(idx, labels)], 1)
        assert loss is not None and torch.isfinite(loss)
        saved[str(ckpt)] = at_backward[0]
        step.engine.destroy()
    print("RESULT " + json.dumps(saved))
''')


@pytest.mark.slow
def test_activation_checkpointing_halves_what_the_trainer_step_keeps(tmp_path):
    saved = script_result(tmp_path, "memory.py", SCRIPT)
    assert saved["True"] <= 0.5 * saved["False"], saved
