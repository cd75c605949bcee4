"""Every environment variable npp reads, with its default and meaning, read here and nowhere else.

A knob read in two places drifts (NPP_MLFLOW_DRAIN_S once had 30 s in one and 120 s in the other), so the
stages ask these functions. The test variables of tests/slurm/instrument (NPP_TEST_*) belong to the tests.
"""

from __future__ import annotations

import os

KNOBS = {
    "NPP_DEBUG": ("", "set: a user error shows its traceback instead of one line"),
    "NPP_ASSETS_URL": ("", "a mirror's base URL for `npp assets` (each file at BASE/<name>)"),
    "NPP_INCEPTION_WEIGHTS": ("", "the FID Inception weights, when --inception is not given"),
    "NPP_PEAK_FLOPS": ("", "the accelerator's peak FLOP/s for MFU, when npp does not know the device"),
    "NPP_MLFLOW_DRAIN_S": ("120", "seconds the end of a run waits for MLflow to take the queued points"),
}


def _get(name: str) -> str:
    return os.environ.get(name, KNOBS[name][0])


def debug() -> bool:
    return bool(_get("NPP_DEBUG"))


def assets_url() -> str:
    return _get("NPP_ASSETS_URL")


def inception_weights() -> str:
    return _get("NPP_INCEPTION_WEIGHTS")


def peak_flops() -> float | None:
    value = _get("NPP_PEAK_FLOPS")
    return float(value) if value else None


def mlflow_drain_s() -> float:
    return float(_get("NPP_MLFLOW_DRAIN_S"))
