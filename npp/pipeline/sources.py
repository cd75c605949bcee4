"""Image sources: an ImageFolder tree or parquet files of encoded images.

A source is a sorted list of `SourceItem`s (a stable key, a label, where the
bytes are), so every run and every rank sees the same list; tokenize deals it
into shards in a seeded permutation. Keys come from the input's identity (its
relative path, or parquet file and row), never its position, and are unique for
any input tree. Bytes are read lazily: parquet in row groups, never whole files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from npp.errors import NppError


class SourceError(NppError, ValueError):
    """The input cannot be used at all (checked before any work)."""


@dataclass(frozen=True)
class SourceItem:
    key: str  # stable, dot-free id (WebDataset keys end at the first dot)
    label: int
    path: str  # file path (ImageFolder) or parquet file
    row: int = -1  # row in the parquet file, -1 for files

    @property
    def source(self) -> str:
        return self.path if self.row < 0 else f"{self.path}#row={self.row}"


def sanitize_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/-]", "_", text)


def unique_key(rel: str) -> str:
    """A WebDataset key for a relative path: readable, dot-free, and unique.

    Sanitizing alone maps `x y.jpg`, `x.y.jpg` and `x_y.jpg` to one key, so a short
    hash of the exact path is appended; the key depends on that path alone.
    """
    return f"{sanitize_key(rel)}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def check_unique_keys(items: list[SourceItem], root: str) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise SourceError(f"{root}: inputs {seen[it.key]} and {it.source} map to the same key {it.key}; rename one")
        seen[it.key] = it.source


def listing_sha256(items: list[SourceItem]) -> str:
    """The identity of a source's content listing (keys and labels), independent of where it lives."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.label}\n".encode())
    return h.hexdigest()


@dataclass
class ImageSource:
    kind: str  # "folder" | "parquet"
    root: str
    items: list[SourceItem]
    class_names: list[str]
    image_column: str = "image"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def scan_image_folder(root: str) -> ImageSource:
    """ImageNet's train layout: one folder per class, class index = position of the sorted folder names."""
    rootp = Path(root)
    classes = sorted(d.name for d in rootp.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{root} has no class folders: expected ImageFolder layout root/<class>/<image>")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(rootp / name):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                path = Path(dirpath) / fn
                # Files with other extensions are kept: a broken or mislabelled file is
                # recorded as a failure instead of vanishing silently.
                rel = path.relative_to(rootp).as_posix()
                items.append(SourceItem(unique_key(rel), label, str(path)))
    if not items:
        raise SourceError(f"{root} has class folders but no files in them")
    check_unique_keys(items, root)
    return ImageSource("folder", str(rootp), items, classes)


def _image_bytes_column(schema, image_column: str):
    import pyarrow as pa

    if image_column not in schema.names:
        return None
    t = schema.field(image_column).type
    if pa.types.is_struct(t):
        return "struct" if any(t.field(i).name == "bytes" for i in range(t.num_fields)) else None
    return "binary" if (pa.types.is_binary(t) or pa.types.is_large_binary(t)) else None


def scan_parquet(
    root: str, image_column: str = "image", label_column: str = "label", num_classes: int | None = None
) -> ImageSource:
    """Parquet files (a file or a directory of *.parquet) with image bytes and an integer label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rootp = Path(root)
    files = [rootp] if rootp.is_file() else sorted(rootp.rglob("*.parquet"))
    if not files:
        raise SourceError(f"{root} holds no .parquet files")
    items, labels_seen = [], set()
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise SourceError(f"{f} is not a readable parquet file ({type(e).__name__}: {e}): "
                              "re-download it or move it out of the data directory") from None
        kind = _image_bytes_column(pf.schema_arrow, image_column)
        if kind is None:
            raise SourceError(
                f"{f} has no image column '{image_column}' (a struct with 'bytes' or a binary column); "
                f"its columns are {pf.schema_arrow.names}: pass --image-column"
            )
        if label_column not in pf.schema_arrow.names:
            raise SourceError(
                f"{f} has no label column '{label_column}'; its columns are {pf.schema_arrow.names}: "
                "pass --label-column"
            )
        label_type = pf.schema_arrow.field(label_column).type
        if not pa.types.is_integer(label_type):
            raise SourceError(
                f"{f}: label column '{label_column}' holds {label_type}, not integer class indices: convert the labels "
                "to 0..N-1 integers (e.g. by sorted class name) or pass --label-column naming an integer column"
            )
        rel = f.relative_to(rootp).with_suffix("").as_posix() if rootp.is_dir() else f.stem
        stem = unique_key(rel)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=65536, columns=[label_column]):
                for value in batch.column(0).to_pylist():
                    label = -1 if value is None else int(value)
                    labels_seen.add(label)
                    items.append(SourceItem(f"{stem}/{row:09d}", label, str(f), row))
                    row += 1
        except OSError as e:
            raise SourceError(
                f"{f} cannot be read ({e}): re-download it or move it out of the data directory"
            ) from None
    if not items:
        raise SourceError(f"{root}: the parquet files hold no rows")
    valid = sorted(v for v in labels_seen if v >= 0)
    if num_classes is None:
        # One stray label (999 among 0..9) would silently add 990 classes: the labels
        # must be exactly 0..N-1 unless the user says how many classes there are.
        n = valid[-1] + 1 if valid else 0
        if len(valid) != n:
            missing = n - len(valid)
            raise SourceError(
                f"{root}: column '{label_column}' has {len(valid)} distinct labels but the largest is {n - 1} "
                f"({missing} of 0..{n - 1} never occur): pass --num-classes N (labels >= N are recorded as failures)"
            )
    else:
        n = int(num_classes)
    check_unique_keys(items, root)
    return ImageSource("parquet", str(rootp), items, [str(i) for i in range(n)], image_column)


def open_source(
    data: str,
    image_column: str = "image",
    label_column: str = "label",
    num_classes: int | None = None,
) -> ImageSource:
    if not data or not os.path.exists(data):
        raise SourceError(f"data path {data!r} does not exist: pass --data DIR (ImageFolder) or parquet files")
    p = Path(data)
    if p.is_file() and p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return scan_parquet(data, image_column, label_column, num_classes)
    if p.is_dir():
        src = scan_image_folder(data)
        if num_classes is not None and num_classes != src.num_classes:
            raise SourceError(f"{data} has {src.num_classes} class folders but --num-classes={num_classes}")
        return src
    raise SourceError(f"{data} is neither an ImageFolder directory nor a parquet file")


@lru_cache(maxsize=4)
def _parquet_file(path: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    starts, n = [], 0
    for i in range(pf.metadata.num_row_groups):
        starts.append(n)
        n += pf.metadata.row_group(i).num_rows
    return pf, starts


@lru_cache(maxsize=2)
def _row_group(path: str, index: int, column: str):
    pf, _ = _parquet_file(path)
    col = pf.read_row_group(index, columns=[column]).column(0)
    return col.combine_chunks() if hasattr(col, "combine_chunks") else col


def read_bytes(item: SourceItem, image_column: str = "image") -> bytes:
    """The encoded image of an item; parquet rows come from a cached row group (sequential reads hit it)."""
    if item.row < 0:
        with open(item.path, "rb") as fh:
            return fh.read()
    import bisect

    pf, starts = _parquet_file(item.path)
    g = bisect.bisect_right(starts, item.row) - 1
    value = _row_group(item.path, g, image_column)[item.row - starts[g]].as_py()
    if isinstance(value, dict):
        value = value.get("bytes")
    return value or b""
