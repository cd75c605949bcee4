"""DeepSpeed checkpoints with everything needed to resume exactly, kept to the last K.

The layout under `RUN/checkpoints/` is the run folder's (npp.pipeline.runs, docs/run-folder.md):
one directory per step with DeepSpeed's model and ZeRO optimizer states (every rank writes
its part), each rank's RNG states, the EMA (rank 0) and the trainer's counters; `latest`
names the newest complete one.

Every rank calls save (guarding it with rank 0 hangs ZeRO). `latest` is written by
rank 0 only after a barrier that follows every rank's files, atomically (temp +
rename), so a crash during a save leaves the previous checkpoint as latest. Old
checkpoints are pruned (`--keep`) only after that, so the last complete checkpoint is
never deleted before a newer one is complete.

A full disk stops the job with one line: before writing, rank 0 compares the free
space with the size of the last checkpoint and every rank learns the answer; a write
that fails anyway (any OSError, or torch's "file write failed") is agreed on by every
rank after the save, the partial checkpoint is removed, and every rank raises
`CheckpointSaveError` (the CLI prints it once, from rank 0, and exits 2), naming the
directory, the free space and the last complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from npp.pipeline.runs import RunFolder, tag_for
from npp.train.distributed import DistEnv, all_sum, barrier
from npp.train.errors import TrainingError
from npp.train.plan import resume_tag


class CheckpointLoadError(TrainingError):
    """DeepSpeed found no loadable checkpoint where `latest` points."""


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers, so the file loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def restore_rng(state: dict | None, seed: int, rank: int, step: int) -> None:
    """This rank's generators as the checkpoint left them; resumed on new ranks (a universal checkpoint has no
    per-rank state): fresh, deterministic per-rank streams."""
    if state is not None:
        set_rng_state(state)
    elif step:
        fresh = (seed * 1000 + rank + 1_000_003 * step) % 2**32
        torch.manual_seed(fresh)
        np.random.seed(fresh)


def load_rng_state(path: Path) -> dict:
    """A rank's RNG file, loaded with weights_only=True.

    Files written before this format pickled numpy's state tuple (an ndarray inside):
    they load with only numpy's array reconstruction allowed, and are converted.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        arrays = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(arrays):
            old = torch.load(path, map_location="cpu", weights_only=True)
    _, keys, pos, has_gauss, gauss = old["numpy"]
    version, py_state, py_gauss = old["python"]
    return {**old, "numpy": {"keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                             "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written; raised on every rank, printed once (by rank 0)."""

    all_ranks = True


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _save_error(run: RunFolder, tag: str, cause: str) -> CheckpointSaveError:
    try:
        free = f"{_gb(shutil.disk_usage(run.checkpoints).free)} free"
    except OSError:
        free = "free space unknown"
    last = run.latest_tag()
    resume = (f"the last complete checkpoint is {run.tag_dir(last)}: free space and rerun the same command to resume "
              "from it" if last else "no complete checkpoint exists yet: free space and rerun the same command")
    return CheckpointSaveError(f"checkpoint {tag} not saved in {run.checkpoints} ({free}): {cause}; {resume}")


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when any rank says so (one collective)."""
    return all_sum([1.0 if flag else 0.0], device)[0] > 0


def save(engine, run: RunFolder, step: int, client_state: dict, env: DistEnv, ema=None, keep: int = 3,
         kept: frozenset = frozenset()) -> str:
    """Save a checkpoint at `step` on every rank (see the module's docstring); `kept`: tags never pruned (the
    branch points of --branch-epochs), beyond the newest `keep`."""
    tag = tag_for(step)
    if run.latest_tag() == tag:  # saved already at this step (a stop right after a checkpoint): nothing changed
        return tag
    device = getattr(engine, "device", torch.device("cpu"))
    short = None
    if env.is_main:  # room for one more checkpoint of the size of the last one?
        try:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            last = run.latest_tag()
            need = dir_bytes(run.tag_dir(last)) if last else 0
            free = shutil.disk_usage(run.checkpoints).free
            if need > free:
                short = f"it needs about {_gb(need)} (the size of {last})"
        except OSError as e:
            short = f"{type(e).__name__}: {e}"
    if _any_rank(short is not None, device):
        raise _save_error(run, tag, short or "rank 0 found no room for it")
    # the whole EMA before any write: a partitioned one is gathered by every rank (a collective no failed write
    # may leave some ranks out of); the one rank that keeps a whole one just reads it
    ema_state = ema.state_dict() if ema is not None else None
    error = None
    try:
        engine.save_checkpoint(str(run.checkpoints), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # a write failed; the other ranks wait in DeepSpeed's closing barrier
        error = e
        barrier()
    if error is None:
        try:
            # Our own files are trusted (written by this code), saved with plain torch.save.
            torch.save(rng_state(), run.rng_file(tag, env.rank))
            if ema_state is not None and env.is_main:
                torch.save(ema_state, run.ema_file(tag))
            if env.is_main:  # the counters in a small readable file, for tools that should not load GBs (eval watch)
                run.client_file(tag).write_text(json.dumps(
                    {k: v for k, v in client_state.items() if isinstance(v, (int, float, str)) or v is None}))
        except (OSError, RuntimeError) as e:
            error = e
    if _any_rank(error is not None, device):  # every rank has stopped writing here
        if env.is_main:
            shutil.rmtree(run.tag_dir(tag), ignore_errors=True)  # nothing partial stays behind
        cause = (f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error
                 else "another rank's write failed")
        raise _save_error(run, tag, f"a write failed ({cause})")
    if env.is_main:
        run.set_latest(tag)
        prune(run, keep, kept)
    barrier()
    return tag


def prune(run: RunFolder, keep: int, kept: frozenset = frozenset()) -> None:
    """Keep the newest `keep` complete checkpoints (up to `latest`) and those in `kept`; a directory newer than
    `latest` is what a failed or killed save left behind, and goes too."""
    current = run.latest_tag()
    if current is None:
        return
    complete = [t for t in run.complete_tags() if t not in kept]
    for old in complete[: max(0, len(complete) - keep)] + [t for t in run.tags() if t > current]:
        if old != current and old not in kept:
            shutil.rmtree(run.tag_dir(old), ignore_errors=True)


def load(engine, run: RunFolder, env: DistEnv, ema=None, planned: str | None = None
         ) -> tuple[dict | None, dict | None]:
    """Resume from `latest` (or the `planned` tag, the plan's: every rank loads the same one, whatever its view of
    the filesystem): engine state and EMA. Returns (client state, this rank's RNG state), or (None, None) for a
    fresh run.

    The RNG state is returned, not applied: the caller applies it after everything that
    draws from the global generators at start-up (creating the DataLoader iterator
    does), or dropout would run one draw behind the uninterrupted run.
    """
    tag = planned or resume_tag(run, env.world_size)  # refuses another world size's ZeRO checkpoint
    if tag is None:
        return None, None
    path, client_state = engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointLoadError(f"DeepSpeed could not load {run.tag_dir(tag)}: delete it (or point "
                                  f"{run.checkpoints / 'latest'} at an older checkpoint) and rerun")
    reapply_lr_schedule(engine.lr_scheduler)
    # a universal checkpoint has no per-rank RNG (the ranks are new)
    rng = None if run.is_universal(tag) else load_rng_state(run.rng_file(tag, env.rank))
    if ema is not None and ema.loads and run.ema_file(tag).exists():
        ema.load_state_dict(torch.load(run.ema_file(tag), map_location="cpu", weights_only=True))
    return client_state, rng


def reapply_lr_schedule(scheduler) -> None:
    """Set the optimizer's rate to this start's schedule at the loaded step. A resume changes nothing (the same
    schedule gave the saved rate); a branch (npp.train.branching) loads its parent's rate for a step where its own
    shorter schedule already decays, and would take its first step at the parent's rate."""
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
