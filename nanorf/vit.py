"""DINOv3-style ViT image encoder and the MLP connector (docs/method.md, "Encoder and connector").

The paper's image encoder is a DINOv3 ViT-H+/16, trained jointly with the decoder (frozen only in
stage 1), with NaViT-style variable resolution. It serves two purposes:

  * understanding: its final-normed patch tokens go through `Connector` (an MLP, BAGEL-style)
    into the MoT as the `und` tokens of an image block;
  * representation targets: an EMA copy of it (`nanorf/vq.py`) reads the last-layer patch
    tokens *before* the final norm (`x_prenorm`), pools and quantises them.

Architecture, following DINOv3's `DinoVisionTransformer` (dinov3/models/vision_transformer.py and
dinov3/layers/*), with its parameter names, so an official DINOv3 ViT state dict loads key for key
(nanorf/pretrained.py reads them):

    x (B, 3, H, W) in [-1, 1]
      patch_embed.proj: Conv2d p x p, stride p          -> (B, h*w, D), h = H/p, w = W/p
      prepend [cls_token (1), storage_tokens (S)]       -> (B, 1+S+h*w, D)
      blocks[i]: x = x + ls1(attn(norm1(x)))            pre-norm, 2D RoPE on patch q/k only
                 x = x + ls2(mlp(norm2(x)))             GELU MLP (fc1/fc2) or SwiGLU (w1/w2/w3)
      norm (final LayerNorm; with untie_cls_and_patch_norms, cls_norm for CLS + storage tokens)

Position is carried only by 2D axial RoPE (`RopePositionEmbedding`, DINOv3's parametrisations):
no learned position table, so any H x W that is a multiple of the patch size works with the same
weights. Patch-centre coordinates are normalised to [-1, 1], per axis by default ("separate"), so
a 16x16 grid and a 32x32 grid span the same coordinate range.

Choices (DINOv3 defaults unless said); the ViTConfig fields that select what the released
checkpoints need default to the architecture the presets always had:
  * qkv, proj and FFN linears have biases (`qkv_bias=False` for ViT-7B). LayerNorm eps is
    `norm_eps` = 1e-5: DINOv3's code default "layernorm" is 1e-6, but every released DINOv3 ViT
    is built with "layernormbf16" (eps 1e-5).
  * FFN: "mlp" is Linear-GELU-Linear with hidden int(D * mlp_ratio). "swiglu*" is DINOv3's
    SwiGLUFFN, w3(silu(w1 x) * w2 x), hidden int(int(D * mlp_ratio) * 2/3) rounded up to a
    multiple of 8 ("swiglu"), 32, 64 or 128 ("swiglu32/64/128"; ViT-7B is "swiglu64" with
    ratio 3). The "+" models (ViT-S+, L+, H+) use "swiglu" with ratio 6. `ffn_hidden` > 0 sets
    the hidden width directly (a loaded checkpoint's).
  * Masked key bias (`mask_k_bias`, every released DINOv3 ViT): the qkv bias is multiplied by
    a persistent `bias_mask` buffer that zeroes its key third, as DINOv3's `LinearKMaskedBias`.
    We keep the buffer, rather than dropping the key bias parameter, so the state dict is the
    official one key for key; applied in forward, the key bias gets a zero gradient and the
    loader zeroes it, so it stays exactly zero in training as in DINOv3. The mask is not a
    no-op: without RoPE a key bias b adds q.b to every score of a query, a constant a softmax
    over keys ignores, but RoPE rotates the bias with each key's position (q . R_j b varies with
    key j), and CLS/storage keys are not rotated at all, so a nonzero key bias would change the
    attention.
  * No training-time RoPE augmentation (DINOv3 releases use rescale_coords=2, which only acts in
    training), no drop path, RoPE in fp32 (the released models' "fp32" rope dtype).
  * `mask_token` exists (zeros, DINOv3's shape (1, D)) only for state-dict compatibility. We never
    mask; like DINOv3 we add `0 * mask_token` to the CLS token so the parameter is part of the
    graph (DDP without find_unused_parameters requires every parameter to get a gradient).
    `cls_norm` (untie_cls_and_patch_norms, no released model uses it) only gets a gradient from
    the CLS/storage outputs.
  * Init as DINOv3's `init_weights`: linears trunc_normal(std 0.02) with zero biases; cls and
    storage tokens normal(std 0.02); mask_token zeros; patch_embed.proj uniform(+-1/sqrt(fan_in))
    (weight and bias); LayerNorms ones/zeros; LayerScale gammas = cfg.layerscale_init
    (`layerscale_init` = 0: no LayerScale modules, DINOv3's `init_values=None`).
  * Input is in [-1, 1] (the pixel range of the whole project). A pretrained DINOv3 checkpoint
    expects ImageNet-normalised input instead; `nanorf.pretrained.load_dinov3` folds that
    normalisation into patch_embed.proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorf.config import ViTConfig

SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}  # DINOv3's ffn_layer_dict


def ffn_hidden_size(cfg: ViTConfig) -> int:
    """FFN hidden width: `ffn_hidden` if set, else DINOv3's rule for `ffn_layer` and `mlp_ratio`."""
    if cfg.ffn_layer != "mlp" and cfg.ffn_layer not in SWIGLU_ALIGN:
        raise ValueError(f"unknown vit.ffn_layer {cfg.ffn_layer!r}; choose mlp, {', '.join(SWIGLU_ALIGN)}")
    if cfg.ffn_hidden > 0:
        return cfg.ffn_hidden
    hidden = int(cfg.dim * cfg.mlp_ratio)  # DINOv3's SelfAttentionBlock: mlp_hidden_dim
    if cfg.ffn_layer == "mlp":
        return hidden
    d = int(hidden * 2 / 3)  # SwiGLUFFN: 2/3 keeps the parameter count of a 2-matrix MLP
    return d + (-d % SWIGLU_ALIGN[cfg.ffn_layer])


class RopePositionEmbedding(nn.Module):
    """Axial 2D RoPE with no learned weights (DINOv3's `RopePositionEmbedding`).

    `periods` (D_head/4,) = base ** (2 * arange(D_head/4) / (D_head/2)), or with min_period and
    max_period both > 0, geometric from min_period to max_period (DINOv3's second form). For an
    h x w grid the patch centres are coords_y = (arange(h) + 0.5) / h * 2 - 1 and likewise for x
    ("separate"; "min"/"max" divide both axes by min(h, w)/max(h, w) instead). Per token:
        angles = [2*pi*y/periods, 2*pi*x/periods]   (D_head/2,)   y half first, then x
        angles = tile(angles, 2)                     (D_head,)     pairs (i, i + D_head/2) rotate
    """

    def __init__(self, dim: int, heads: int, base: float, min_period: float = 0.0, max_period: float = 0.0,
                 normalize_coords: str = "separate"):
        super().__init__()
        if dim % (4 * heads) != 0:
            # D_head/4 frequencies per axis, two axes, each as a (cos, sin) pair.
            raise ValueError(f"ViT dim {dim} must be divisible by 4 * heads = {4 * heads} for 2D RoPE")
        if normalize_coords not in ("separate", "min", "max"):
            raise ValueError(f"unknown rope normalize_coords {normalize_coords!r}; choose separate, min or max")
        self.head_dim = dim // heads
        self.base = base
        self.min_period, self.max_period = min_period, max_period
        self.normalize_coords = normalize_coords
        # Persistent like DINOv3's, so it appears in the state dict (and the EMA copy copies it).
        self.register_buffer("periods", torch.empty(self.head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self):
        n = self.head_dim // 4
        if self.min_period > 0 and self.max_period > 0:
            # DINOv3's exact sequence of ops, so the fp32 periods match bit for bit.
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, dtype=torch.float32) / ratio * self.max_period
        else:
            periods = self.base ** (2 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2))
        self.periods.copy_(periods)

    def angles(self, h: int, w: int) -> Tensor:
        """Rotation angles (h*w, D_head) for the patch tokens of an h x w grid, raster order."""
        dev = self.periods.device
        sy, sx = {"separate": (h, w), "min": (min(h, w),) * 2, "max": (max(h, w),) * 2}[self.normalize_coords]
        coords_y = torch.arange(0.5, h, device=dev, dtype=torch.float32) / sy  # (h,) in (0, 1) when separate
        coords_x = torch.arange(0.5, w, device=dev, dtype=torch.float32) / sx  # (w,)
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


class LinearKMaskedBias(nn.Linear):
    """The qkv projection with its key bias masked to zero (DINOv3's `LinearKMaskedBias`).

    `bias_mask` (3D,) is 1 on the q and v thirds, 0 on the k third; persistent because the
    official checkpoints store it (see the module docstring for why the mask matters under RoPE).
    """

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, mask_k_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = LinearKMaskedBias(dim) if (qkv_bias and mask_k_bias) else nn.Linear(dim, 3 * dim, bias=qkv_bias)
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


class SwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU FFN: w3(silu(w1 x) * w2 x), all with biases; hidden from `ffn_hidden_size`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches (unless layerscale_init = 0)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        ls = (lambda: LayerScale(cfg.dim, cfg.layerscale_init)) if cfg.layerscale_init else nn.Identity
        hidden = ffn_hidden_size(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.mask_k_bias)
        self.ls1 = ls()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, hidden) if cfg.ffn_layer == "mlp" else SwiGLUFFN(cfg.dim, hidden)
        self.ls2 = ls()

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
        x_norm_clstoken     (B, D)       (by cls_norm with untie_cls_and_patch_norms)
        x_storage_tokens    (B, S, D)    normed storage ("register") tokens (likewise)
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
        self.rope_embed = RopePositionEmbedding(cfg.dim, cfg.heads, cfg.rope_base, cfg.rope_min_period,
                                                cfg.rope_max_period, cfg.rope_normalize_coords)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        # DINOv3 creates cls_norm only when untying, so the default state dict has no such key.
        self.cls_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.untie_cls_and_patch_norms else None
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
        if self.cls_norm is None:
            t_norm = self.norm(t)  # (B, 1+S+h*w, D); DINOv3 normalises all tokens with one norm
            prefix_norm, patch_norm = t_norm[:, :n_prefix], t_norm[:, n_prefix:]
        else:
            prefix_norm, patch_norm = self.cls_norm(t[:, :n_prefix]), self.norm(t[:, n_prefix:])
        return {
            "x_prenorm": t[:, n_prefix:],  # (B, h*w, D)
            "x_norm_patchtokens": patch_norm,  # (B, h*w, D)
            "x_norm_clstoken": prefix_norm[:, 0],  # (B, D)
            "x_storage_tokens": prefix_norm[:, 1:],  # (B, S, D)
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
