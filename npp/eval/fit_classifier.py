"""`npp eval fit-classifier`: train the toy classifier whose features stand in for Inception's.

Trained on the dataset's real images (ADM center crop at the sample size), a
tenth held out; the held-out accuracy is printed and stored in the checkpoint, so
`class_accuracy_toynet` of samples can be read against it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from npp.errors import ConfigError
from npp.eval.config import FitClassifierConfig
from npp.eval.reference import real_images
from npp.models.toynet import ToyNet, ToyNetConfig


def fit_classifier(plan: FitClassifierConfig) -> dict:
    """Train the toy classifier of `npp eval fit-classifier` (its checked flags); returns its held-out accuracy."""
    data, out, image_size, epochs, batch, lr, seed = (plan.data, plan.out, plan.image_size, plan.epochs, plan.batch,
                                                      plan.lr, plan.seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from npp.pipeline.sources import open_source

    source = open_source(data)
    images, _ = real_images(data, None, image_size)
    labels = np.array([it.label for it in source.items])
    if len(labels) != len(images):
        raise ConfigError(
            f"{data} has unreadable images: run `npp tokenize run` first to list them in failures.parquet"
        )
    order = rng.permutation(len(images))
    n_val = max(len(images) // 10, 1)
    val, tr = order[:n_val], order[n_val:]
    net = ToyNet(ToyNetConfig(num_classes=len(source.class_names), image_size=image_size))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(tr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    start = time.time()
    net.train()
    with tqdm(total=steps, desc="fit-classifier", unit="step") as bar:
        for _ in range(epochs):
            perm = rng.permutation(tr)
            for i in range(0, len(perm) - batch + 1, batch):
                idx = perm[i : i + batch]
                x = torch.from_numpy(images[idx])
                if rng.random() < 0.5:  # mirror augmentation: every toy class is mirror-symmetric as a class
                    x = x.flip(2)
                loss = F.cross_entropy(net(x)["logits"], torch.from_numpy(labels[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.eval()
    with torch.no_grad():
        pred = torch.cat(
            [net(torch.from_numpy(images[val[i : i + 256]]))["logits"].argmax(1) for i in range(0, len(val), 256)]
        )
    accuracy = float((pred.numpy() == labels[val]).mean())
    ckpt = net.checkpoint()
    ckpt["fit"] = {"val_accuracy": accuracy, "train_images": int(len(tr)), "seconds": round(time.time() - start, 1),
                   "class_names": source.class_names}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    print(
        f"fit-classifier: held-out accuracy {accuracy:.3f} on {len(val)} images in {ckpt['fit']['seconds']} s; "
        f"wrote {out}"
    )
    return ckpt["fit"]
