"""Grouping a raster token grid into k×k patches (Next Patch Prediction).

A grid of rows×cols tokens in raster order becomes (rows/k)·(cols/k) patches,
themselves in raster order of the patch grid; inside a patch the k² tokens are in
raster order too. The order inside a patch does not change the model (embeddings
are averaged, the loss is a mean), the order of patches does.
"""

from __future__ import annotations

import torch

from .configs import check_patch_side  # noqa: F401 (pure arithmetic, kept beside the grid it checks)


def group_patches(x: torch.Tensor, grid: tuple[int, int], patch_side: int) -> torch.Tensor:
    """(B, rows·cols, *rest) in raster order → (B, patches, k², *rest)."""
    prow, pcol = check_patch_side(grid, patch_side)
    k = patch_side
    b, n = x.shape[:2]
    if n != grid[0] * grid[1]:
        raise ValueError(f"expected {grid[0] * grid[1]} tokens for a {grid[0]}x{grid[1]} grid, got {n}")
    rest = x.shape[2:]
    x = x.reshape(b, prow, k, pcol, k, *rest)
    x = x.transpose(2, 3)  # (B, prow, pcol, k, k, *rest)
    return x.reshape(b, prow * pcol, k * k, *rest)


def patch_embeddings(token_emb: torch.Tensor, grid: tuple[int, int], patch_side: int) -> torch.Tensor:
    """Mean of the k×k token embeddings of each patch: (B, N, D) → (B, N/k², D)."""
    if patch_side == 1:
        return token_emb
    return group_patches(token_emb, grid, patch_side).mean(dim=2)


def patch_targets(tokens: torch.Tensor, grid: tuple[int, int], patch_side: int) -> torch.Tensor:
    """Targets of each patch position: (B, N) → (B, N/k², k²)."""
    return group_patches(tokens, grid, patch_side)
