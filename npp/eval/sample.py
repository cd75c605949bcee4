"""Class-balanced (or random-label) guided sampling to ADM-layout `.npz` files.

Samples are made in pieces of `--batch`; sample j (its index in the label list) always
has the same label and the seed `seed·1000003 + j` (npp.models.generate), so the result
depends neither on the batch size nor on how many processes made it. Ranks
(torchrun's RANK/WORLD_SIZE) take the pieces p with p % world == rank; a piece is
written atomically, so an interrupted run resumes from the pieces it has; the process
that finds every piece present merges them into `samples_cfg<scale>.npz` (`arr_0`
uint8 N×H×W×3, `labels`), a PNG grid (a row per class) and a JSON record of every
setting that changes a FID, with the seconds spent generating, decoding and writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from npp.errors import ConfigError
from npp.eval.config import SampleConfig
from npp.eval.pieces import balanced_labels, count_pieces, pieces_of_rank
from npp.models.checkpoint import load_gpt, load_vq
from npp.models.generate import Sampler, guides, kv_cache_bytes
from npp.models.vq import decode_bytes_per_image
from npp.pipeline.images import to_uint8_images
from npp.runtime import settings
from npp.runtime.devices import fast_matmul, pick_device
from npp.runtime.files import atomic_path, atomic_write_text, file_sha256, npp_version
from npp.runtime.ranks import rank_and_world


def sample_labels(cfg: SampleConfig, num_classes: int) -> np.ndarray:
    if cfg.labels == "balanced":
        return balanced_labels(num_classes, cfg.per_class)
    if cfg.labels == "random":
        n = cfg.num_samples or cfg.per_class * num_classes
        return np.random.default_rng(cfg.seed).integers(0, num_classes, n)
    raise ConfigError(f"--labels must be balanced or random, got {cfg.labels!r}")


def scale_dir(out: Path, scale: float) -> Path:
    return out / f"cfg{scale:g}"


def samples_path(out: str | Path, scale: float) -> Path:
    return Path(out) / f"samples_cfg{scale:g}.npz"


MAX_AUTO_BATCH = 256
# Images the VQ decoder turns into pixels at once: its activations (~200 MB per 256-px image in fp32) exist for
# this many images beside the sampler's KV cache, whatever the sampling batch.
DECODE_CHUNK = 16


def auto_batch(config, dtype: torch.dtype, guidance: bool, device: torch.device, total: int,
               free_bytes: int | None = None, decode_bytes: int = 0) -> int:
    """The largest batch (a multiple of 8, at most 256 and the sample count) whose KV cache and per-token
    buffers fit in 80% of the free GPU memory, after `decode_bytes` (the decoder's activations for a chunk of
    DECODE_CHUNK images) are set aside; 64 on the CPU.

    Per sample: the KV cache (`kv_cache_bytes`: every layer's keys and values for the whole
    sequence, twice with guidance) plus the fp32 logits of a token step and what the draw
    makes of them (softmax, cumulative sum, comparison: 4 vocabulary-sized rows per row).
    The decode does not grow with the batch: `VQModel.decode_in_chunks`.
    """
    if device.type != "cuda" and free_bytes is None:
        return max(1, min(64, total))
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    rows = 2 if guidance else 1
    per_sample = kv_cache_bytes(config, 1, dtype, guidance) + rows * 4 * config.vocab_size * 4
    fit = int((0.8 * free_bytes - decode_bytes) // per_sample)
    if fit < 1:
        raise ConfigError(f"not even one sample's KV cache ({per_sample / 2**30:.2f} GiB) fits beside the decoder "
                          f"({decode_bytes / 2**30:.1f} GiB) in the {free_bytes / 2**30:.1f} GiB free on {device}: "
                          "use --precision bf16 or a larger GPU")
    batch = min(fit, MAX_AUTO_BATCH, total)
    return batch if batch < 8 else batch - batch % 8


def sample(cfg: SampleConfig) -> list[str]:
    """Generate (or finish) the samples of every cfg scale; returns the merged .npz paths made here."""
    device = pick_device(cfg.device)  # this rank's GPU under torchrun/srun
    # the record says what ran
    cfg = replace(cfg, precision=settings.precision(cfg.precision, device.type == "cuda", training=False))
    fast_matmul(device)
    switch = settings.switch(cfg.compile)
    compile_step = None if switch == "auto" else switch == "on"  # None: the sampler decides by the device
    model, ckpt = load_gpt(cfg.ckpt, use_ema=cfg.ema)
    vq, _ = load_vq(cfg.vq)
    mc = model.config
    if vq.config.codebook_size != mc.vocab_size:
        raise ConfigError(f"{cfg.vq} has {vq.config.codebook_size} codes but {cfg.ckpt} expects vocab {mc.vocab_size}: "
                          "use the tokenizer the model was trained with")
    model, vq = model.to(device).eval(), vq.to(device).eval()
    if cfg.precision == "bf16":  # weights and the KV cache in bf16: half the cache (GPT-XXL, batch 64, CFG: 9.7 GB)
        model = model.to(torch.bfloat16)
    labels = sample_labels(cfg, mc.num_classes)
    scales = list(cfg.cfg_scale)  # the guidance scales, typed once at the flag
    dtype = next(model.parameters()).dtype
    rank, world = rank_and_world()
    out = Path(cfg.out)
    decode_bytes = DECODE_CHUNK * decode_bytes_per_image(vq.config, mc.grid, next(vq.parameters()).dtype)
    batch = cfg.batch or agree_batch(out, auto_batch(mc, dtype, any(map(guides, scales)), device, len(labels),
                                                     decode_bytes=decode_bytes))
    pieces = count_pieces(len(labels), batch)
    made = []
    samplers: dict[bool, Sampler] = {}  # one per guided/unguided: caches and the captured step are reused
    for scale in scales:
        pdir = scale_dir(out, scale)
        pdir.mkdir(parents=True, exist_ok=True)
        check_piece_layout(pdir, batch, cfg)
        guided = guides(scale)
        todo = [(p, ids) for p, ids in pieces_of_rank(len(labels), batch, rank, world)
                if not (pdir / f"piece_{p:06d}.npz").exists()]
        if todo and guided not in samplers:
            samplers[guided] = Sampler(model, batch, guided, cfg.temperature, cfg.top_k, cfg.top_p, cfg.cfg_interval,
                                       compile=compile_step)
        seconds = {"generate": 0.0, "decode": 0.0, "write": 0.0}
        bar = tqdm(todo, desc=f"sample cfg={scale:g} rank {rank} batch {batch}", unit="batch")
        decoder = OverlappedDecode(vq, device, bf16=cfg.precision == "bf16")
        for p, ids in bar:
            lab = torch.from_numpy(labels[ids]).to(device)
            with phase(seconds, "generate", device):
                codes = samplers[guided].generate(lab, cfg_scale=scale, seed=cfg.seed, sample_ids=ids)
            with phase(seconds, "decode", device):  # the previous piece's decode ran beside this generation
                done = decoder.submit(p, codes, lab)
            if done is not None:
                with phase(seconds, "write", device):
                    write_piece(pdir, *done)
            bar.set_postfix({k: f"{v:.0f}s" for k, v in seconds.items()})
        done = decoder.finish()
        if done is not None:
            write_piece(pdir, *done)
        if todo:
            print(f"cfg={scale:g} rank {rank}: {len(todo)} pieces of {batch}: " +
                  ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
            (pdir / f"seconds_rank{rank}.json").write_text(json.dumps(seconds))
        if all((pdir / f"piece_{p:06d}.npz").exists() for p in range(pieces)):
            made.append(str(merge(cfg, scale, pieces, ckpt, labels, batch, device)))
        else:
            print(f"cfg={scale:g}: other ranks' pieces are still missing; the last rank to finish merges")
    return made


class OverlappedDecode:
    """The VQ decode of piece p beside the generation of piece p+1 on a GPU: `submit` queues p's decode on a side
    stream and returns the piece before it, decoded; the host then goes on to queue p+1's token steps, so the GPU
    has both to run. On the CPU (or with one stream) the same order, each decode done at once: the pieces and the
    bytes written do not depend on it (tested).

    `bf16`: the decode under bf16 autocast (`npp sample --precision bf16`, the CUDA default); on the demo's model
    the FID moves by less than the sampling noise (docs/reference.md)."""

    def __init__(self, vq, device: torch.device, bf16: bool = False):
        self.vq, self.device, self.bf16 = vq, device, bf16
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: tuple | None = None  # (piece, images on the device, labels, event)

    def submit(self, piece: int, codes: torch.Tensor, labels: torch.Tensor):
        """Queue this piece's decode; return (piece, uint8 images, labels) of the one queued before, or None."""
        done = self._collect()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the codes are made on the main stream
            with torch.cuda.stream(self.stream):
                images = self.vq.decode_in_chunks(codes, DECODE_CHUNK, bf16=self.bf16)
                codes.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        else:
            images, event = self.vq.decode_in_chunks(codes, DECODE_CHUNK, bf16=self.bf16), None
        self.pending = (piece, images, labels, event)
        return done

    def finish(self):
        return self._collect()

    def _collect(self):
        if self.pending is None:
            return None
        piece, images, labels, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return piece, to_uint8_images(images), labels.cpu().numpy()


def write_piece(pdir: Path, piece: int, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(pdir / f"piece_{piece:06d}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=images, labels=labels)


@contextlib.contextmanager
def phase(seconds: dict, name: str, device: torch.device):
    """Wall seconds of a phase (the compute stream is waited for at its end, so each phase is charged its own work;
    the decode's side stream is not: what it overlaps with the next generation is not charged, only the wait)."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    seconds[name] += time.perf_counter() - start


def agree_batch(out: Path, mine: int, timeout: float = 900.0) -> int:
    """The auto batch every rank uses: the smallest of the ranks' own (ranks on GPUs with different free memory
    would otherwise cut the samples into different pieces, and the largest might not fit everywhere).

    Each rank writes its value to `out/.batch_rank<r>.json` and waits for the others' (the samples' directory is
    shared: the merge needs that already); the agreed value is kept in `out/batch.json`, which a resumed start
    adopts as it is.
    """
    out.mkdir(parents=True, exist_ok=True)
    target = out / "batch.json"
    if not target.exists():
        rank, world = rank_and_world()
        atomic_write_text(out / f".batch_rank{rank}.json", json.dumps({"batch": int(mine)}))
        deadline = time.monotonic() + timeout
        while True:
            got = [json.loads(p.read_text())["batch"] for p in out.glob(".batch_rank*.json")]
            if len(got) >= world or target.exists():
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"{out}: {len(got)} of {world} ranks said their batch within {timeout:.0f} s; "
                                  "start every rank, or pass --batch N")
            time.sleep(0.2)
        if not target.exists():
            atomic_write_text(target, json.dumps({"batch": int(min(got))}))
    agreed = int(json.loads(target.read_text())["batch"])
    if agreed != mine:
        print(f"rank {rank_and_world()[0]}: batch {agreed}, as {target} says (this GPU's free memory gave {mine})",
              flush=True)
    return agreed


# What a piece's images depend on besides its labels and ids: a resumed run must make the rest the same way.
PIECE_SETTINGS = ("ckpt", "ema", "precision", "temperature", "top_k", "top_p", "cfg_interval", "seed", "labels",
                  "per_class", "num_samples")


def check_piece_layout(pdir: Path, batch: int, cfg: SampleConfig) -> None:
    """Pieces already on disk must have this run's batch size (a resumed run with another --batch, or an auto
    batch on a GPU with other free memory, would cut the samples differently) and its settings (a resumed run
    with another --temperature, --precision (whose default changed to bf16 on CUDA), checkpoint, ... would mix
    two kinds of samples in one set)."""
    layout = pdir / "pieces.json"
    now = {"batch": batch, **{k: getattr(cfg, k) for k in PIECE_SETTINGS}}
    now["ckpt"] = os.path.abspath(str(now["ckpt"]))
    if layout.exists() and any(pdir.glob("piece_*.npz")):
        old = json.loads(layout.read_text())
        if old["batch"] != batch:
            raise ConfigError(f"{pdir} holds pieces of {old['batch']} samples, this run makes pieces of {batch}: "
                              f"pass --batch {old['batch']} to finish them (the samples do not depend on it)")
        changed = [f"--{k.replace('_', '-')} {old[k]} -> {now[k]}" for k in PIECE_SETTINGS
                   if k in old and old[k] != now[k]]
        if changed:
            raise ConfigError(f"{pdir} holds pieces made with other settings ({'; '.join(changed)}): pass the "
                              "earlier values to finish them, or sample into another --out")
        if not all(k in old for k in PIECE_SETTINGS):
            print(f"{pdir}: its pieces were made by an older npp that did not record their settings: they are "
                  "taken to match this run's", flush=True)
            now = {**old, "batch": batch}  # keep the record as it was: the settings stay unknown
    atomic_write_text(layout, json.dumps(now))  # ranks write it at once: never a half-written file


def merge(cfg: SampleConfig, scale: float, pieces: int, ckpt: dict, labels: np.ndarray, batch: int,
          device: torch.device) -> Path:
    pdir = scale_dir(Path(cfg.out), scale)
    parts = [np.load(pdir / f"piece_{p:06d}.npz") for p in range(pieces)]
    images = np.concatenate([z["arr_0"] for z in parts])
    got_labels = np.concatenate([z["labels"] for z in parts])
    if not np.array_equal(got_labels, labels):
        raise ConfigError(f"pieces in {pdir} were made with other labels: delete {pdir} and sample again")
    target = samples_path(cfg.out, scale)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=images, labels=got_labels)
    save_grid(images, got_labels, target.with_suffix(".png"), cfg.grid_classes, cfg.grid_per_class)
    seconds: dict = {}
    for path in pdir.glob("seconds_rank*.json"):  # what each rank spent, summed (a resumed run: its last start)
        for k, v in json.loads(path.read_text()).items():
            seconds[k] = seconds.get(k, 0.0) + v
    record = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("out", "device")},
        "batch": batch, "seconds": seconds,
        "cfg_scale": scale, "count": int(len(images)), "image_size": int(images.shape[1]),
        "ckpt_steps": ckpt.get("steps"), "ckpt_train": ckpt.get("train"),
        "ckpt_sha256": file_sha256(cfg.ckpt), "vq_sha256": file_sha256(cfg.vq),
        # where and by what the samples were made: on a CPU they are bit-exact for any ranks and batch (tested);
        # on a GPU, bf16 kernels may change the last bits of a logit, and so a token, with another batch
        "ranks": rank_and_world()[1], "device": device_name(device), "npp": npp_version(),
        "determinism": ("bit-exact for any number of ranks and any batch" if device.type == "cpu" else
                        "the same up to the last bits of GPU kernels (batch- and kernel-dependent)"),
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    print(
        f"samples {target}: {len(images)} images {images.shape[1]}px, cfg={scale:g}, grid {target.with_suffix('.png')}"
    )
    return target


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, classes: int = 16, per_class: int = 8) -> None:
    """A row per class (the first `classes` classes), `per_class` samples each."""
    rows = []
    h, w = images.shape[1:3]
    for c in sorted(set(labels.tolist()))[:classes]:
        idx = np.flatnonzero(labels == c)[:per_class]
        row = np.full((h, w * per_class, 3), 255, np.uint8)
        for j, i in enumerate(idx):
            row[:, j * w : (j + 1) * w] = images[i]
        rows.append(row)
    grid = np.concatenate(rows)
    scale = max(1, 256 // w)  # small images are hard to see: enlarge without smoothing
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
