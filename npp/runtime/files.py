"""File helpers shared by the stages: content hashes for provenance records, atomic writes, step records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """A path to write `target`'s new content to, for writers that take a path (torch.save, np.savez, PIL,
    pyarrow): on a clean exit the file is fsynced and renamed over `target`, so readers see the old content or
    the new one, never a part, and a crash leaves the new content on disk or not at all; on an error the part is
    removed. The part is hidden beside the target (same filesystem: an atomic rename), its name matching no
    `*.tar`/`*.npz`/`*.png` scan; numpy writers take an open file (np.savez adds `.npz` to a bare path)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: Path | str) -> Iterator[Path]:
    """A folder to build `target`'s new content in (`TARGET.tmp`, emptied first: a killed build's leftovers go),
    put in `target`'s place on a clean exit, removed on an error: readers find the old folder or the whole new
    one. (A folder cannot replace another in one rename: between the two renames `target` is briefly absent;
    callers make it visible through a pointer written afterwards, such as `checkpoints/latest`.)"""
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # should this fail, the whole new folder stays at TARGET.tmp


def atomic_symlink(points_to: str, link: Path) -> None:
    """`link` -> `points_to`, replacing a previous link in one rename (readers never find it missing)."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(points_to, tmp)
    os.replace(tmp, link)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old content or the new one, never a part (atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    """JSON as the shard set's files have it: indented, keys sorted, a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the records ({"step": ..., ...} per line) of steps <= last_step, drop lines cut by a kill;
    returns how many were dropped. A resumed run redoes the steps after its checkpoint."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            dropped += 1
            continue
        if rec.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(k + "\n" for k in kept))
    return dropped


def git_commit() -> str:
    """The commit of the checkout npp runs from ("unknown" outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def npp_version() -> str:
    """npp's package version and the commit of its checkout, e.g. '0.1.0 (git 28f042d...)'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("npp")
    except PackageNotFoundError:
        number = "unknown"
    return f"{number} (git {git_commit()})"
