"""Reading `npp tokenize`'s shards without a tar library: the members' headers parsed in place, each
sample's codes a view of the shard's (memory-mapped) bytes.

Why not `tarfile` or `webdataset(...).decode()`: ~2,500 samples/s per process, while a node of 8 GPUs
training GPT-B eats ~16,000; our samples are tiny fixed-shape uint16 arrays. `parse_shard` gives every
sample as (key, codes, label); `index_shard` keeps only where each sample's codes start and its label
(a few bytes per sample), so a loader worker can hold the index of every shard of ImageNet and read any
sample of any shard (the layout-independent order of npp.pipeline.global_order).
"""

from __future__ import annotations

import ast
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BLOCK = 512


class CorruptShardError(ValueError):
    pass


_NPY_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _npy_layout(data: memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, where the array starts) of a .npy payload (headers are cached: every sample has the same)."""
    if bytes(data[:6]) != b"\x93NUMPY":
        raise CorruptShardError("not an .npy payload")
    hlen_size = 2 if data[6] == 1 else 4
    start = 8 + hlen_size + int.from_bytes(bytes(data[8 : 8 + hlen_size]), "little")
    key = bytes(data[:start])
    layout = _NPY_CACHE.get(key)
    if layout is None:
        header = ast.literal_eval(key[8 + hlen_size :].decode("latin1"))
        if header.get("fortran_order"):
            raise CorruptShardError("fortran-ordered arrays are not supported")
        layout = _NPY_CACHE[key] = (np.dtype(header["descr"]), tuple(header["shape"]), start)
    return layout


def _npy_array(data: memoryview) -> np.ndarray:
    """A .npy payload as an array viewing `data`."""
    dtype, shape, offset = _npy_layout(data)
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\x00 ").strip()
    return int(field, 8) if field else 0


def _pax_path(records: bytes) -> str:
    """The `path` of a pax extended header ("<len> path=<name>\\n" records), or ''."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return ""


def _members(data) -> Iterator[tuple[str, int, int]]:
    """(name, body start, body end) of every regular member of a tar, checking each header's checksum and
    that the archive is complete (GNU long names and pax `path` records name the member after them)."""
    view = memoryview(data)
    pos, n = 0, len(data)
    long_name: str | None = None
    while pos + BLOCK <= n:
        header = view[pos : pos + BLOCK]
        if not any(header):  # end-of-archive marker
            return
        hb = bytes(header)
        stored = _octal(hb[148:156])
        computed = sum(hb[:148]) + 8 * 32 + sum(hb[156:])
        if stored != computed:
            raise CorruptShardError(f"bad tar header checksum at byte {pos}")
        size = _octal(hb[124:136])
        kind = hb[156:157]
        name = long_name or hb[:100].split(b"\x00", 1)[0].decode("utf-8")
        prefix = hb[345:500].split(b"\x00", 1)[0]
        if prefix and not long_name and hb[257:262] == b"ustar":
            name = prefix.decode("utf-8") + "/" + name
        long_name = None
        body_start = pos + BLOCK
        body_end = body_start + size
        if body_end > n:
            raise CorruptShardError(f"member {name!r} runs past the end of the file (truncated shard)")
        if kind == b"L":  # GNU long name for the next member
            long_name = bytes(view[body_start:body_end]).split(b"\x00", 1)[0].decode("utf-8")
        elif kind == b"x":  # POSIX (pax) extended header: its `path` record names the next member
            long_name = _pax_path(bytes(view[body_start:body_end])) or None
        elif kind in (b"0", b"\x00"):
            yield name, body_start, body_end
        pos = body_start + (size + BLOCK - 1) // BLOCK * BLOCK
    raise CorruptShardError("no end-of-archive marker (truncated shard)")


def _samples(data) -> Iterator[tuple[str, int, int, int]]:
    """(key, codes start, codes end, label) of every complete sample (`<key>.codes.npy` + `<key>.cls`), in the
    order of their first member."""
    view = memoryview(data)
    samples: dict[str, list] = {}
    for name, start, end in _members(data):
        key, _, ext = name.partition(".")
        entry = samples.setdefault(key, [None, None])
        if ext == "codes.npy":
            entry[0] = (start, end)
        elif ext == "cls":
            entry[1] = int(bytes(view[start:end]))
    for key, (codes, label) in samples.items():
        if codes is not None and label is not None:
            yield key, codes[0], codes[1], label


def parse_shard(data: bytes) -> list[tuple[str, np.ndarray, int]]:
    """(key, codes, label) of every complete sample in a tar of `<key>.codes.npy` + `<key>.cls` members."""
    view = memoryview(data)
    return [(key, _npy_array(view[start:end]), label) for key, start, end, label in _samples(data)]


@dataclass
class ShardIndex:
    """Where each sample of one shard lies: `codes(i)` is a view of the mapped bytes, `labels[i]` its class.
    Every sample of a shard has one dtype and shape (npp tokenize writes them so; refused otherwise)."""

    data: memoryview | None  # the shard's bytes (None when the reader maps them itself: see `codes`)
    starts: np.ndarray  # int64: the byte where sample i's codes begin
    labels: np.ndarray  # int64
    dtype: np.dtype
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.starts)

    def codes(self, i: int, data: memoryview | None = None) -> np.ndarray:
        """Sample i's codes, a view of `data` (the shard's bytes), else of the bytes it was indexed from."""
        return np.frombuffer(self.data if data is None else data, dtype=self.dtype, count=self.count,
                             offset=int(self.starts[i])).reshape(self.shape)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))


def index_shard(data) -> ShardIndex:
    """The ShardIndex of a shard's bytes (checked as parse_shard checks them)."""
    view = memoryview(data)
    starts, labels, layout = [], [], None
    for _key, start, end, label in _samples(data):
        dtype, shape, offset = _npy_layout(view[start:end])
        if layout is None:
            layout, nbytes = (dtype, shape), dtype.itemsize * int(np.prod(shape))
        elif (dtype, shape) != layout:
            raise CorruptShardError(f"samples of different shapes or dtypes ({layout} and {(dtype, shape)}) in one "
                                    "shard")
        if end - start - offset != nbytes:
            raise CorruptShardError(f"a .npy payload of {end - start - offset} bytes for {shape} {dtype}")
        starts.append(start + offset)
        labels.append(label)
    dtype, shape = layout or (np.dtype(np.uint16), (0,))
    return ShardIndex(view, np.asarray(starts, np.int64), np.asarray(labels, np.int64), dtype, shape)


def map_shard(path: str) -> memoryview:
    """A shard's bytes, memory-mapped read-only (an empty file is reported as corrupt)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise CorruptShardError("empty file")
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


