"""Test instrumentation for the SLURM jobs of tests/slurm (on PYTHONPATH only when NPP_TEST_RECORD is set).

Loaded into every Python process of a job, it records, one JSON line per event into NPP_TEST_RECORD/<host>-<pid>:
the run positions of every micro-batch a loader worker builds (npp.pipeline.global_stream.GlobalStream.batch_at),
every file torch.save writes, and when each rank's checkpoint save returns. It changes nothing the job computes;
it only lets a test see, across nodes, what the job did, and (NPP_TEST_PIECE_DELAY,
NPP_TEST_SHARD_DELAY) makes a job's pieces or shards take longer, so that a test interrupts it midway on any
machine instead of racing it; NPP_TEST_HOLD_AFTER_SAVE=STEP (or `any`: every save) holds every rank after that
step's checkpoint while the file NPP_TEST_HOLD_FILE exists (a test changes the world around a job at an exact step).
"""

import importlib.abc
import importlib.util
import json
import os
import socket
import sys
import time

LOG = os.environ.get("NPP_TEST_RECORD")


def record(kind: str, **fields) -> None:
    line = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK"),
            "t": time.time(), **fields}
    with open(os.path.join(LOG, f"{socket.gethostname()}-{os.getpid()}.jsonl"), "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _patch_global_stream(module) -> None:
    original = module.GlobalStream.batch_at

    def batch_at(self, start):
        batch = original(self, start)
        record("batch", start=int(start), size=int(self.batch_size), data_rank=int(self.rank), world=int(self.world))
        return batch

    module.GlobalStream.batch_at = batch_at


def _patch_torch(module) -> None:
    original = module.save

    def save(obj, f, *args, **kwargs):
        out = original(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            record("torch.save", path=os.path.abspath(os.fspath(f)))
        return out

    module.save = save


def _patch_checkpointing(module) -> None:
    original = module.save

    hold_step, hold_file = os.environ.get("NPP_TEST_HOLD_AFTER_SAVE"), os.environ.get("NPP_TEST_HOLD_FILE", "")

    def save(engine, run, step, *args, **kwargs):
        out = original(engine, run, step, *args, **kwargs)
        record("saved", step=int(step))
        while hold_step in (str(step), "any") and os.path.exists(hold_file):  # held there until the test lets go
            time.sleep(0.01)
        return out

    module.save = save


def _slowed(function, delay: float, applies=lambda *args: True):
    """`function`, each call (for which `applies`) followed by `delay` seconds: a job a test can interrupt midway."""
    def slowed(*args, **kwargs):
        out = function(*args, **kwargs)
        if applies(*args):
            time.sleep(delay)
        return out

    return slowed


def _patch_numpy(module) -> None:
    """NPP_TEST_PIECE_DELAY: each sample piece takes that much longer."""
    delay = float(os.environ.get("NPP_TEST_PIECE_DELAY", 0) or 0)
    if delay:
        # npp writes through an open file (npp.runtime.files.atomic_path): its name says which piece
        module.savez = _slowed(module.savez, delay,
                               lambda file, *a: ".piece_" in os.fspath(getattr(file, "name", file)))


def _patch_shards(module) -> None:
    """NPP_TEST_SHARD_DELAY: each shard written takes that much longer (a tokenize task cancelled midway)."""
    delay = float(os.environ.get("NPP_TEST_SHARD_DELAY", 0) or 0)
    if delay:
        module.write_shard = _slowed(module.write_shard, delay)


PATCHES = {"npp.pipeline.shards": _patch_shards, "numpy": _patch_numpy,
           "npp.pipeline.global_stream": _patch_global_stream, "torch": _patch_torch,
           "npp.train.checkpointing": _patch_checkpointing}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after its module is executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


def _exiting() -> None:  # registered first, so it runs after every other exit hook of the process
    import threading

    children = [c.pid for c in __import__("multiprocessing").active_children()] if "multiprocessing" in sys.modules \
        else []
    record("exit", argv=" ".join(sys.argv[:3]), threads=[t.name for t in threading.enumerate()], children=children)


if LOG:
    import atexit

    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_exiting)
