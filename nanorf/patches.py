"""Images as sequences of patches (docs/method.md, "Sequences and the attention mask").

Pixels live in [-1, 1] (the model paints in pixel space, no VAE). An image becomes a raster
sequence of p x p patches (`patchify`), each flattened in (row, column, channel) order, and back
(`unpatchify`). Grids of patches (pixel patches, ViT patches, rep tokens) get fixed 2-D sin-cos
features of their cell centres in normalised image coordinates (`sincos_2d`), so grids of
different density over the same image agree where their centres coincide. A learned table
over one grid (the rep tokens' spatial embedding) becomes a function of the same coordinates by
bilinear interpolation between its cell centres (`resize_grid_table`), so it too holds at any grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, p*p*3), raster order of patches."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)      # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*3) -> (B, 3, h*p, w*p)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)                 # (B, 3, h, p, w, p)
    return x.reshape(B, 3, h * p, w * p)


def sincos_2d(h: int, w: int, dim: int, max_cells: int = 64) -> torch.Tensor:
    """(h*w, dim) sin-cos features of cell centres in [0, 1]^2 coordinates, raster order.

    Normalised coordinates with grid-independent frequencies make grids of different
    densities over the same image (pixel patches, rep tokens, ViT patches) agree where
    their centres coincide. The dim/4 frequencies per axis are geometric from pi/2 (a
    quarter turn across the image) to pi * max_cells (neighbours half a turn apart on
    a max_cells grid; 64 covers the paper's 1024 px pixel grid)."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    q = dim // 4
    freqs = (torch.pi / 2) * (2.0 * max_cells) ** (torch.arange(q, dtype=torch.float32) / max(1, q - 1))
    out = []
    for c in (yy.flatten(), xx.flatten()):
        a = c[:, None] * freqs[None]                                            # (h*w, q)
        out += [a.sin(), a.cos()]
    return torch.cat(out, dim=1)                                                # (h*w, 4q)


def resize_grid_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(g*g, D) embeddings of a square g x g grid -> (h*w, D) on an h x w grid, bilinear in
    normalised image coordinates: each new cell takes the value at its centre, interpolated
    between the centres of the old cells (clamped at the border). Differentiable, so a table
    learned at one grid keeps training through the interpolation at another."""
    g = int(round(table.shape[0] ** 0.5))
    h, w = grid
    if (h, w) == (g, g):
        return table
    x = table.T.reshape(1, -1, g, g)                                                # (1, D, g, g)
    x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
    return x.reshape(table.shape[1], h * w).T.to(table.dtype)                       # (h*w, D)


def images_to_tensor(images) -> torch.Tensor:
    """List of (H, W, 3) uint8 arrays -> (B, 3, H, W) float in [-1, 1] (pixel space, no VAE)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 arrays."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())
