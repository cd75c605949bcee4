"""Tokenize throughput: the whole stage vs the encoder alone, and reading the shards back.

Side by side in one run on the same images:
  1. encoder alone: the VQ encoder on pre-cropped tensors already in memory;
  2. the stage: `npp tokenize run` end to end (read files, decode, crop, encode, write shards);
  3. read back: samples/s of iterating the written shards with webdataset.
The ratio 2/1 is how busy the stage keeps the encoder (target ≥ 0.8).

    .venv/bin/python bench/tokenize_throughput.py [--images 600] [--image-size 32] [--vq-preset VQ-toy] [--workers 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from npp.models.vq import VQModel, vq_config
from npp.pipeline.images import decode_image, make_views
from npp.pipeline.sources import open_source, read_bytes
from npp.pipeline.toy import write_toy_dataset
from npp.tokenize.run import TokenizeConfig, encode_batch, tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--source-size", type=int, default=48, help="side of the rendered source images")
    ap.add_argument("--vq-preset", default="VQ-toy")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_toy_dataset(str(tmp / "images"), per_class=args.images // 10, size=args.source_size)
        torch.manual_seed(0)
        vq = VQModel(vq_config(args.vq_preset)).eval()
        torch.save({"model": vq.state_dict(), "config": vq.config.to_dict()}, tmp / "vq.pt")

        source = open_source(str(tmp / "images"))
        views = [make_views(decode_image(read_bytes(it)), args.image_size, 2) for it in source.items]
        n_images = 2 * len(views)
        per = max(1, args.batch // 2)
        encode_batch(vq, views[:per], torch.device("cpu"))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(views), per):
            encode_batch(vq, views[i : i + per], torch.device("cpu"))
        enc_rate = n_images / (time.perf_counter() - start)

        cfg = TokenizeConfig(data=str(tmp / "images"), vq=str(tmp / "vq.pt"), out=str(tmp / "shards"),
                             image_size=args.image_size, samples_per_shard=100, batch=args.batch,
                             workers=args.workers).plan()
        start = time.perf_counter()
        tokenize(cfg)
        stage_rate = n_images / (time.perf_counter() - start)

        import webdataset as wds

        urls = sorted(str(p) for p in (tmp / "shards").glob("train-*.tar"))
        for _ in wds.WebDataset(urls, shardshuffle=False).decode():  # warm the page cache
            pass
        start = time.perf_counter()
        n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).decode())
        read_rate = n / (time.perf_counter() - start)

    print(f"{args.vq_preset} at {args.image_size}px, {len(views)} inputs x 2 views, batch {args.batch}, "
          f"{args.workers} loader workers, {torch.get_num_threads()} torch threads")
    print(f"encoder alone:        {enc_rate:8.1f} images/s")
    print(f"whole stage:          {stage_rate:8.1f} images/s  (encoder kept {stage_rate / enc_rate:.0%} busy)")
    print(f"read shards back:     {read_rate:8.1f} samples/s (webdataset .decode())")


if __name__ == "__main__":
    main()
