"""Imported at every Python start when this folder is on PYTHONPATH (bench/gpu_session.sh --rehearse puts it
there): packages neither in the GPU image nor carried as wheels (bench/gpu_image.py) cannot be imported, so the
CPU rehearsal of the GPU check fails where the GPU session would."""

import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys


def _install() -> None:
    # bench/gpu_image.py, loaded from its file: bench/ is scripts, not a package on the path
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("gpu_image", os.path.join(os.path.dirname(here), "gpu_image.py"))
    gpu_image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_image)
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
