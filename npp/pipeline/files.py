"""File helpers shared by the stages: content hashes for provenance records."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
