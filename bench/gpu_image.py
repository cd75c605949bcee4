"""What the lent GPU machines' image holds and what a GPU session carries for npp, in one place.

The image ('cuda', /work/.library/device/KINDS.md, read 2026-11-17) has torch and most of npp's needs but no
deepspeed, fire, hjson, pydantic, webdataset, braceexpand or mlflow, and nothing can be installed there from an
index: `make gpu-wheels` downloads CARRIED (this file prints them, pinned to this venv's versions) into .whl/,
which bench/gpu_session.sh installs offline. The CPU rehearsal of the check (`bench/gpu_session.sh --rehearse`)
imports through `image_guard/sitecustomize.py`, which refuses any package that is neither in IMAGE nor in
CARRIED: a wheel missing from CARRIED fails the rehearsal here, not the GPU session.

    python bench/gpu_image.py --carried     # name==version of every carried wheel but deepspeed (built apart)
"""

from __future__ import annotations

import sys

# the image's distributions (KINDS.md's list of 2026-11-17, as it is)
IMAGE = ("absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio",
         "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake",
         "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit",
         "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet", "filelock",
         "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio", "h11",
         "h5py", "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna", "imageio",
         "iniconfig", "interface-meta", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping",
         "jinja2", "joblib", "kiwisolver", "lazy-loader", "lightning", "lightning-utilities", "linear-operator",
         "lineax", "llvmlite", "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson",
         "ml-dtypes", "mpi4py", "mpmath", "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind",
         "narwhals", "networkx", "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas",
         "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft",
         "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13",
         "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx",
         "onnx-ir", "onnxruntime", "onnxscript", "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx",
         "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip",
         "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf", "psutil", "pyarrow", "pybind11",
         "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks", "pyre-extensions", "pytest", "pytest-benchmark",
         "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "python-dateutil", "pytorch-lightning",
         "pyyaml", "regex", "requests", "rich", "sacrebleu", "safetensors", "scikit-build-core", "scikit-image",
         "scikit-learn", "scipy", "seaborn", "sentencepiece", "sentence-transformers", "setuptools", "shellingham",
         "simplejson", "six", "sortedcontainers", "statsmodels", "sympy", "tabulate", "tensorboard",
         "tensorboard-data-server", "tensorstore", "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers",
         "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm",
         "transformers", "treescope", "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop",
         "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp")
# carried as wheels (pydantic needs typing_extensions >= 4.16: carried too, whatever the image's is)
CARRIED = ("deepspeed", "hjson", "fire", "termcolor", "annotated-types", "typing-inspection", "pydantic",
           "pydantic-core", "typing-extensions", "webdataset", "braceexpand", "pyyaml")


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def allowed() -> set[str]:
    return {normalise(n) for n in IMAGE + CARRIED + ("npp",)}  # npp itself travels as the working tree


def carried_pins() -> list[str]:
    """name==version of the carried wheels as this environment has them (deepspeed is built by `pip wheel`)."""
    from importlib.metadata import version

    return [f"{n}=={version(n)}" for n in CARRIED if n != "deepspeed"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--carried"]:
        print(" ".join(carried_pins()))
    else:
        print(__doc__)
