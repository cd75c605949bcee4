"""Loss curves of fp32, bf16-mixed and bf16 (DeepSpeed) side by side, on CPU, through the real trainer.

2 DeepSpeed processes (gloo), GPT-Nano on the toy set's codes (an untrained VQ, 8x8 grid),
schedule 2:0.5,1:0.5. Prints the loss every 25 steps and the largest gap to fp32.

    .venv/bin/python bench/precision_curves.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from npp.app.launch import torchrun_train_cmd
from npp.pipeline.toy import write_toy_dataset
from npp.tokenize.run import TokenizeConfig, tokenize

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_toy_dataset(str(root / "images"), per_class=20, size=32)
        import torch

        from npp.models.vq import VQModel, vq_config

        torch.manual_seed(0)
        vq = VQModel(vq_config("VQ-toy", codebook_size=64))
        torch.save({"model": vq.state_dict(), "config": vq.config.to_dict()}, root / "vq.pt")
        tokenize(TokenizeConfig(data=str(root / "images"), vq=str(root / "vq.pt"), out=str(root / "shards"),
                                image_size=32, samples_per_shard=10, workers=0).plan())
        curves = {}
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": "1"}
        for precision in ("fp32", "bf16-mixed", "bf16"):
            run = root / precision
            cmd = torchrun_train_cmd(2, {
                "shards": root / "shards", "out": run, "model": "GPT-Nano", "global_batch": 16,
                "total_steps": args.steps, "workers": 1, "log_every": 50, "ckpt_every": 100000, "warmup_epochs": 0.5,
                "lr": 3e-3, "end_lr": 1e-4, "schedule": "2:0.5,1:0.5", "precision": precision,
                "ds_config": REPO / "ds_configs" / "zero2.json"})
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            curves[precision] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            print(f"{precision}: done", flush=True)
    print("step " + " ".join(f"{p:>11}" for p in curves))
    for s in range(0, args.steps, 25):
        print(f"{s + 1:>4} " + " ".join(f"{curves[p][s]:>11.4f}" for p in curves))
    for p in ("bf16-mixed", "bf16"):
        gaps = [abs(a - b) for a, b in zip(curves[p], curves["fp32"], strict=False)]
        tail = sum(curves[p][-50:]) / 50 - sum(curves["fp32"][-50:]) / 50
        print(f"{p}: largest |loss - fp32| over {args.steps} steps {max(gaps):.4f}; mean of the last 50 steps "
              f"differs by {tail:+.4f}")


if __name__ == "__main__":
    main()
