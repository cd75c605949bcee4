"""Checks of the files a command is given, without torch: the wrong file in the right place gets a line that
names the real problem and the fix, in a fraction of a second instead of after a 5-20 s torch import.

A `.pt` file is a zip archive whose `*/data.pkl` pickles the checkpoint; its strings (dict keys, parameter
names) are read with `pickletools` without unpickling anything, which is enough to tell a GPT from a VQ
tokenizer, a DeepSpeed run folder from an exported model, and either from something else.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from pathlib import Path

from npp.errors import UsageError

ASSETS_HINT = "e.g. LlamaGen's vq_ds16_c2i.pt, which `make assets` downloads into ckpts/"


def pickle_strings(path: str, limit: int = 200_000) -> set[str] | None:
    """The strings a torch checkpoint's pickle holds (None: not a zip-format torch file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            data = zf.read(name)
    except (zipfile.BadZipFile, OSError):
        return None
    found: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                found.add(arg)
                if len(found) >= limit:
                    break
    except Exception:  # a truncated pickle: what was read so far
        pass
    return found


def checkpoint_kind(path: str) -> str:
    """'gpt', 'vq', 'inception', 'unknown' (a torch file of something else, or in torch's legacy format, which
    is not sniffed) or 'not-torch'."""
    strings = pickle_strings(path)
    if strings is None:
        with open(path, "rb") as fh:
            return "unknown" if fh.read(1) == b"\x80" else "not-torch"  # a legacy (pickle) torch file
    if any(s.endswith("tok_embeddings.weight") or s.endswith("cls_embedding.embedding_table.weight") for s in strings):
        return "gpt"
    if any(s.endswith("quantize.embedding.weight") or s.startswith("encoder.conv_in") for s in strings):
        return "vq"
    if any(s.startswith("Mixed_") or s.startswith("Conv2d_1a_3x3") for s in strings):
        return "inception"
    return "unknown"


def check_file(path: str, flag: str, what: str, fix: str) -> None:
    """`path` is an existing file (not a directory)."""
    if not path:
        raise UsageError(f"{flag} is empty: pass {what}; {fix}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory, not {what}; {fix}")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist: pass {what}; {fix}")


def check_image_source(path: str, flag: str = "--data") -> None:
    """Images to read (tokenize, fit-vq, fit-classifier): an ImageFolder root or parquet files, named as such before
    any image is opened (the format itself is npp.pipeline.sources' to judge)."""
    if not (path and os.path.exists(path)):
        raise UsageError(f"data path {path!r} does not exist: pass {flag} DIR (ImageFolder) or parquet files")
    if os.path.isdir(path):
        entries = list(os.scandir(path))
        if not entries:
            raise UsageError(f"{flag} {path} is an empty directory: pass the ImageFolder root (DATA/<class>/<image>) "
                             "or a directory of parquet files")
        if not (any(e.is_dir() for e in entries) or any(e.name.endswith(".parquet") for e in entries)):
            raise UsageError(f"{flag} {path} has no class folders and no .parquet files: pass the ImageFolder root "
                             "(DATA/<class>/<image>, e.g. imagenet/train, not one class's folder) or a parquet "
                             "directory")


def check_gpt_checkpoint(path: str, flag: str = "--ckpt") -> None:
    """An exported GPT (RUN/model.pt, a LlamaGen or NPP checkpoint); a run folder or a tokenizer is refused."""
    p = Path(path) if path else None
    if p is not None and p.is_dir() and ((p / "config.json").exists() or (p / "checkpoints").is_dir()):
        hint = (f"pass {p / 'model.pt'}" if (p / "model.pt").exists()
                else f"export it first with `npp train export --run {p}`, then pass {p / 'model.pt'}")
        raise UsageError(f"{flag} {path} is a training run folder, not a model file: {hint}")
    check_file(path, flag, "a GPT checkpoint (.pt)", "`npp train export --run RUN` writes RUN/model.pt")
    kind = checkpoint_kind(path)
    if kind == "vq":
        raise UsageError(f"{flag} {path} is a VQ tokenizer, not a GPT: pass the model (RUN/model.pt) here and the "
                         "tokenizer as --vq")
    if kind in ("inception", "not-torch"):
        what = "the FID Inception weights" if kind == "inception" else "not a PyTorch checkpoint"
        raise UsageError(f"{flag} {path} is {what}: pass an exported GPT (RUN/model.pt from `npp train export`)")


def check_vq_checkpoint(path: str, flag: str = "--vq") -> None:
    """A VQ tokenizer (LlamaGen's vq_ds16_c2i.pt or `npp tokenize fit-vq`'s); a GPT is refused."""
    check_file(path, flag, "a VQ tokenizer checkpoint", f"{ASSETS_HINT} (or fit one: `npp tokenize fit-vq`)")
    kind = checkpoint_kind(path)
    if kind == "gpt":
        raise UsageError(f"{flag} {path} is a GPT checkpoint, not a VQ tokenizer: pass the tokenizer the shards were "
                         f"made with ({ASSETS_HINT})")
    if kind in ("inception", "not-torch"):
        what = "the FID Inception weights" if kind == "inception" else "not a PyTorch checkpoint"
        raise UsageError(f"{flag} {path} is {what}: pass a VQ tokenizer ({ASSETS_HINT})")


def check_run_checkpoint(run: str, tag: str = "") -> None:
    """A training run folder with a complete checkpoint (the given tag, or `latest`)."""
    from npp.pipeline.runs import RunFolder

    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise UsageError(f"--run {run} does not exist: pass a training run folder (npp train --out)")
    if not folder.config.exists():
        raise UsageError(f"--run {run} is not a training run folder (no config.json): pass npp train's --out")
    found = tag if tag and folder.tag_dir(tag).is_dir() else (folder.latest_tag() if not tag else None)
    if found is None:
        have = ", ".join(folder.complete_tags()) or "none yet"
        raise UsageError(f"{folder.checkpoints} has no complete checkpoint {tag or '(no `latest`)'} (complete: "
                         f"{have}): train first, or pass one of them as --tag")


def check_samples(spec: str, flag: str = "--samples") -> list[str]:
    """A samples file, a comma list or a glob (a guidance sweep): every part names existing files."""
    import glob

    files: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not found or not all(os.path.isfile(f) for f in found):
            raise UsageError(f"{flag} {part} matches no samples file: run `npp sample` first (it writes "
                             "OUT/samples_cfg<scale>.npz)")
        files += found
    if not files:
        raise UsageError(f"{flag} is empty: pass the .npz written by `npp sample`")
    return files
