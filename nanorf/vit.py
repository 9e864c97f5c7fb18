"""DINOv3-style ViT image encoder and the MLP connector (PAPER §2).

The paper's image encoder is a DINOv3 ViT-H+/16, trained jointly with the decoder (frozen only in
stage 1), with NaViT-style variable resolution. It serves two purposes:

  * understanding: its final-normed patch tokens go through `Connector` (an MLP, BAGEL-style)
    into the MoT as the `und` tokens of an image block;
  * representation targets: an EMA copy of it (`nanorf/vq.py`) reads the last-layer patch
    tokens *before* the final norm (`x_prenorm`), pools and quantises them.

Architecture, following DINOv3's `DinoVisionTransformer` (its parameter names, so a DINOv3 state
dict of the same width maps key for key; see "checkpoints" below):

    x (B, 3, H, W) in [-1, 1]
      patch_embed.proj: Conv2d p x p, stride p          -> (B, h*w, D), h = H/p, w = W/p
      prepend [cls_token (1), storage_tokens (S)]       -> (B, 1+S+h*w, D)
      blocks[i]: x = x + ls1(attn(norm1(x)))            pre-norm, 2D RoPE on patch q/k only
                 x = x + ls2(mlp(norm2(x)))             GELU MLP, LayerScale gammas
      norm (final LayerNorm)

Position is carried only by 2D axial RoPE (`RopePositionEmbedding`, DINOv3's default
parametrisation): no learned position table, so any H x W that is a multiple of the patch size
works with the same weights. Patch-centre coordinates are normalised per axis to [-1, 1]
("separate"), so a 16x16 grid and a 32x32 grid span the same coordinate range.

Choices (DINOv3 defaults unless said):
  * qkv, proj and MLP linears have biases. LayerNorm eps is 1e-5: DINOv3's code default
    "layernorm" is 1e-6, but every released DINOv3 ViT is built with "layernormbf16" (eps 1e-5),
    and matching the released checkpoints is why we copy their names.
  * No training-time RoPE augmentation (DINOv3 releases use rescale_coords=2), no drop path,
    RoPE in fp32 (the released models' "fp32" rope dtype).
  * `mask_token` exists (zeros, DINOv3's shape (1, D)) only for state-dict compatibility. We never
    mask; like DINOv3 we add `0 * mask_token` to the CLS token so the parameter is part of the
    graph (DDP without find_unused_parameters requires every parameter to get a gradient).
  * Init as DINOv3's `init_weights`: linears trunc_normal(std 0.02) with zero biases; cls and
    storage tokens normal(std 0.02); mask_token zeros; patch_embed.proj uniform(+-1/sqrt(fan_in))
    (weight and bias); LayerNorms ones/zeros; LayerScale gammas = cfg.layerscale_init.
  * Input is in [-1, 1] (the pixel range of the whole project). A pretrained DINOv3 checkpoint
    expects ImageNet-normalised input instead; renormalise before loading one.

Checkpoints: the released DINOv3 ViTs also store `blocks.{i}.attn.qkv.bias_mask` (they zero the
key bias, which cannot change a softmax over keys) and use SwiGLU in the "+" sizes; load the plain
"mlp" variants with strict=False, dropping `bias_mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorf.config import ViTConfig

LN_EPS = 1e-5  # released DINOv3 ViTs ("layernormbf16"); DINOv3's code default is 1e-6


class RopePositionEmbedding(nn.Module):
    """Axial 2D RoPE with no learned weights (DINOv3's `RopePositionEmbedding`, base form).

    `periods` (D_head/4,) = base ** (2 * arange(D_head/4) / (D_head/2)). For an h x w grid the
    patch centres are coords_y = (arange(h) + 0.5) / h * 2 - 1 and likewise for x. Per token:
        angles = [2*pi*y/periods, 2*pi*x/periods]   (D_head/2,)   y half first, then x
        angles = tile(angles, 2)                     (D_head,)     pairs (i, i + D_head/2) rotate
    """

    def __init__(self, dim: int, heads: int, base: float):
        super().__init__()
        if dim % (4 * heads) != 0:
            # D_head/4 frequencies per axis, two axes, each as a (cos, sin) pair.
            raise ValueError(f"ViT dim {dim} must be divisible by 4 * heads = {4 * heads} for 2D RoPE")
        self.head_dim = dim // heads
        self.base = base
        # Persistent like DINOv3's, so it appears in the state dict (and the EMA copy copies it).
        self.register_buffer("periods", torch.empty(self.head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self):
        n = self.head_dim // 4
        self.periods.copy_(self.base ** (2 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2)))

    def angles(self, h: int, w: int) -> Tensor:
        """Rotation angles (h*w, D_head) for the patch tokens of an h x w grid, raster order."""
        dev = self.periods.device
        coords_y = torch.arange(0.5, h, device=dev, dtype=torch.float32) / h  # (h,) in (0, 1)
        coords_x = torch.arange(0.5, w, device=dev, dtype=torch.float32) / w  # (w,)
        coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1)  # (h, w, 2)
        coords = coords.flatten(0, 1) * 2.0 - 1.0  # (h*w, 2) in [-1, 1], row-major = raster order
        ang = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # (h*w, 2, D_head/4)
        ang = ang.flatten(1, 2)  # (h*w, D_head/2): [y freqs..., x freqs...]
        return ang.tile(2)  # (h*w, D_head)

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        ang = self.angles(h, w)
        return torch.sin(ang), torch.cos(ang)  # 2 x (h*w, D_head)


def rope_rotate_half(x: Tensor) -> Tensor:
    # [x0 .. x_{n-1}, y0 .. y_{n-1}] -> [-y0 .. -y_{n-1}, x0 .. x_{n-1}]: pairs (i, i + D/2) rotate.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate (..., N, D_head) by per-token angles; sin/cos (N, D_head) broadcast over batch/heads."""
    return x * cos + rope_rotate_half(x) * sin


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels (a strided conv = a linear map per patch)."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.in_chans * self.patch_size ** 2)  # DINOv3: uniform +-1/sqrt(fan_in)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, D), raster order


class LayerScale(nn.Module):
    """Per-channel residual-branch scale; a small init makes each block start near identity."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        sin, cos = rope  # (n_patch, Dh) each; the first N - n_patch tokens (CLS, storage) get none
        prefix = N - sin.shape[0]
        # RoPE in fp32 (sin/cos precision matters at high frequency), cast back afterwards.
        q = torch.cat([q[:, :, :prefix], rope_apply(q[:, :, prefix:].float(), sin, cos).to(q.dtype)], dim=2)
        k = torch.cat([k[:, :, :prefix], rope_apply(k[:, :, prefix:].float(), sin, cos).to(k.dtype)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh), bidirectional
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.attn = SelfAttention(cfg.dim, cfg.heads)
        self.ls1 = LayerScale(cfg.dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(cfg.dim, cfg.layerscale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    """DINOv3-style ViT. forward(x (B, 3, H, W)) -> dict:

        x_prenorm           (B, h*w, D)  patch tokens after the last block, before `norm`
                                         (DINOv3's x_prenorm also holds CLS/storage; ours is
                                         patch tokens only: that is what the VQ targets read)
        x_norm_patchtokens  (B, h*w, D)  patch tokens after `norm` (the understanding input)
        x_norm_clstoken     (B, D)
        x_storage_tokens    (B, S, D)    normed storage ("register") tokens
        grid                (h, w)       h = H / p, w = W / p; tokens are in raster order
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        # DINOv3 creates storage_tokens only when n_storage_tokens > 0; a (1, 0, D) parameter
        # would be an odd empty key, so we do the same.
        if cfg.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # unused; see module docstring
        self.rope_embed = RopePositionEmbedding(cfg.dim, cfg.heads, cfg.rope_base)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale, PatchEmbed)):
                m.reset_parameters()

    def forward(self, x: Tensor) -> dict:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ViT expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the ViT patch size {p}")
        h, w = H // p, W // p

        patches = self.patch_embed(x)  # (B, h*w, D)
        cls = (self.cls_token + 0 * self.mask_token).expand(B, -1, -1)  # (B, 1, D); 0*mask: see docstring
        prefix = [cls]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))  # (B, S, D)
        t = torch.cat(prefix + [patches], dim=1)  # (B, 1+S+h*w, D)

        rope = self.rope_embed(h, w)  # sin, cos: (h*w, D_head); same for every block
        for blk in self.blocks:
            t = blk(t, rope)

        n_prefix = 1 + self.n_storage_tokens
        t_norm = self.norm(t)  # (B, 1+S+h*w, D); DINOv3 normalises all tokens with one norm
        return {
            "x_prenorm": t[:, n_prefix:],  # (B, h*w, D)
            "x_norm_patchtokens": t_norm[:, n_prefix:],  # (B, h*w, D)
            "x_norm_clstoken": t_norm[:, 0],  # (B, D)
            "x_storage_tokens": t_norm[:, 1:n_prefix],  # (B, S, D)
            "grid": (h, w),
        }


class Connector(nn.Module):
    """Linear -> GELU(tanh) -> Linear, (B, N, D_vit) -> (B, N, D_model).

    BAGEL's `MLPconnector` (fc1: in->out, fc2: out->out, "gelu_pytorch_tanh"). The paper's stage 1
    trains only this module, aligning the encoder's feature space to the decoder's.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D_model)
