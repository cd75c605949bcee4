"""Imported at every Python start when this folder is on PYTHONPATH (bench/gpu_session.sh --rehearse puts it
there): packages neither in the GPU image nor carried as wheels (bench/gpu_image.py) cannot be imported, so the
CPU rehearsal of the GPU check fails where the GPU session would."""

import importlib.abc
import importlib.metadata
import os
import sys


def _install() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    import gpu_image  # bench/gpu_image.py

    sys.path.pop(0)
    allowed = gpu_image.allowed()
    owners = importlib.metadata.packages_distributions()

    class ImageGuard(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            dists = owners.get(top)
            if path is None and dists and not any(gpu_image.normalise(d) in allowed for d in dists):
                raise ModuleNotFoundError(f"{top} ({', '.join(dists)}) is neither in the GPU image nor carried as a "
                                          "wheel: add it to bench/gpu_image.py's CARRIED (make gpu-wheels)", name=name)
            return None

    sys.meta_path.insert(0, ImageGuard())


if os.environ.get("NPP_GPU_IMAGE_GUARD") == "1":
    _install()
