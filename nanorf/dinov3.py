"""Official DINOv3 encoders into nanorf's ViT (docs/method.md, "Encoder and connector").

The paper initialises its image encoder from DINOv3 ViT-H+/16. `load_dinov3(path)` reads the
ViT backbones Meta releases (facebookresearch/dinov3, dinov3/hub/backbones.py: ViT-S/16, S+/16,
B/16, L/16, H+/16 and 7B/16) and returns a `nanorf.vit.ViT` with their weights, in either format:

  * the official `.pth` state dicts, e.g. `dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth`,
    read with `torch.load(weights_only=True)`;
  * the Hugging Face format of the same models (transformers' `DINOv3ViTModel`, e.g. the
    `facebook/dinov3-vith16plus-pretrain-lvd1689m` repository): a `model.safetensors` file, or a
    folder with it (or sharded `model-*.safetensors` with `model.safetensors.index.json`) and
    `config.json`. Split q/k/v projections, `layer_scale*.lambda1`, `embeddings.*`; the mapping
    is `hf_to_dinov3` / `dinov3_to_hf`. Needs the optional `safetensors` package
    (`pip install -e ".[pretrained]"`).

Both are gated downloads under the DINOv3 License: nanorf reads local paths only, never fetches.

The architecture is inferred from the tensors (`dinov3_config`): width, depth, patch size,
storage ("register") tokens, GELU MLP or SwiGLU and its hidden width, LayerScale, qkv bias and
the masked key bias, an untied CLS norm, and the RoPE periods (the official `rope_embed.periods`
buffer; its length is D_head / 4, so it also gives the number of heads). Without periods (the
Hugging Face files do not store them) heads and the RoPE base come from `config.json`, else
heads = width / 64, DINOv3's head dim for every released ViT but the 7B (4096 / 32 = 128).
What the tensors cannot say keeps the released models' value and can be overridden by keyword
(any `ViTConfig` field): LayerNorm eps 1e-5 (`norm_eps`), RoPE "separate" coordinates
(`rope_normalize_coords`).

Loading also:
  * multiplies the qkv bias by the stored `bias_mask` (the key bias becomes exactly zero; the ViT
    keeps applying the mask, so it stays zero in training, as in DINOv3);
  * drops `local_cls_norm.*` (ViT-7B, ViT-L SAT-493M): DINOv3 uses it only for local crops in
    training, and nanorf's forward never would;
  * folds DINOv3's ImageNet input normalisation into `patch_embed.proj` (`normalize=False` skips
    it). nanorf feeds pixels in [-1, 1]; DINOv3 expects ((x + 1) / 2 - mean) / std per channel.
    The patch embedding is a conv with stride = kernel and no padding, i.e. a linear map of each
    patch, so the fold is exact.
  * checks the file's SHA-256 against the hex suffix of its name, as torch.hub does, when the name
    has one (`-08c60483.pth`): the official files are named by a prefix of their hash.

A file that cannot be read (truncated), of another model (missing or unexpected keys, shapes), or
whose hash does not match its name raises `nanorf.checkpoint.CheckpointError` with a one-line
message. Weights are returned in float32 whatever the file's dtype.

Not covered: DINOv3's ConvNeXt backbones, dino.txt and the task heads (classifiers, depth,
detection, segmentation), DINOv3 training checkpoints (teacher/student dicts), RMSNorm ViTs.
"""

from __future__ import annotations

import re
from dataclasses import fields

import torch
from torch import Tensor, nn

from nanorf.checkpoint import CheckpointError
from nanorf.config import ViTConfig
from nanorf.vit import ViT
from nanorf.weight_files import one_line, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv3's make_normalize_transform
IMAGENET_STD = (0.229, 0.224, 0.225)
DROPPED_PREFIXES = ("local_cls_norm.",)  # see the module docstring


# ---------------------------------------------------------------------------------------------
# Hugging Face <-> official key names (transformers' convert_dinov3_vit_to_hf.py, inverted)
# ---------------------------------------------------------------------------------------------

_HF_BLOCK = [  # (official name inside blocks.{i}, HF name inside layer.{i})
    ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attn.proj.", "attention.o_proj."),
    ("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.fc1.", "mlp.up_proj."), ("mlp.fc2.", "mlp.down_proj."),  # GELU MLP
    ("mlp.w1.", "mlp.gate_proj."), ("mlp.w2.", "mlp.up_proj."), ("mlp.w3.", "mlp.down_proj."),  # SwiGLU
]
_HF_TOP = [("cls_token", "embeddings.cls_token"), ("patch_embed.proj.weight", "embeddings.patch_embeddings.weight"),
           ("patch_embed.proj.bias", "embeddings.patch_embeddings.bias"), ("norm.weight", "norm.weight"),
           ("norm.bias", "norm.bias")]


def is_hf_state_dict(sd: dict) -> bool:
    return "embeddings.cls_token" in sd or "embeddings.patch_embeddings.weight" in sd


def hf_to_dinov3(sd: dict) -> dict:
    """Hugging Face `DINOv3ViTModel` keys -> the official DINOv3 keys (the inverse of `dinov3_to_hf`).

    q/k/v are concatenated into qkv. A missing k_proj bias (transformers' key_bias=False, every
    released model) becomes a zero key bias with DINOv3's `bias_mask`. Keys it does not know are
    kept as they are, so they surface as unexpected keys.
    """
    sd = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in sd.items()}  # transformers 5 names it model.layer
    out, used = {}, set()
    for ours, hf in _HF_TOP:
        if hf in sd:
            out[ours] = sd[hf]
            used.add(hf)
    if "embeddings.mask_token" in sd:
        out["mask_token"] = sd["embeddings.mask_token"].reshape(1, -1)  # HF (1, 1, D) -> DINOv3 (1, D)
        used.add("embeddings.mask_token")
    if "embeddings.register_tokens" in sd:
        used.add("embeddings.register_tokens")
        if sd["embeddings.register_tokens"].shape[1] > 0:  # HF keeps an empty (1, 0, D); DINOv3 has no key
            out["storage_tokens"] = sd["embeddings.register_tokens"]
    if "rope_embeddings.inv_freq" in sd:  # non-persistent in transformers; present only if someone saved it
        out["rope_embed.periods"] = 1.0 / sd["rope_embeddings.inv_freq"].float()
        used.add("rope_embeddings.inv_freq")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))), default=-1)
    gated = any(re.match(r"layer\.\d+\.mlp\.gate_proj\.", k) for k in sd)
    for i in range(depth):
        pre, dst = f"layer.{i}.", f"blocks.{i}."
        for ours, hf in _HF_BLOCK:
            if ours.startswith("mlp.fc") and gated or ours.startswith("mlp.w") and not gated:
                continue
            for k in [k for k in sd if k.startswith(pre + hf)]:
                out[dst + ours + k[len(pre + hf):]] = sd[k]
                used.add(k)
        a = pre + "attention."
        qkv = [a + f"{n}_proj.weight" for n in "qkv"]
        if all(k in sd for k in qkv):
            out[dst + "attn.qkv.weight"] = torch.cat([sd[k] for k in qkv], 0)
            used.update(qkv)
        qb, kb, vb = (a + f"{n}_proj.bias" for n in "qkv")
        if qb in sd and vb in sd:
            k_bias = sd.get(kb, torch.zeros_like(sd[qb]))
            out[dst + "attn.qkv.bias"] = torch.cat([sd[qb], k_bias, sd[vb]], 0)
            if kb not in sd:
                mask = torch.ones(3 * sd[qb].shape[0], dtype=sd[qb].dtype)
                mask[sd[qb].shape[0]:2 * sd[qb].shape[0]] = 0
                out[dst + "attn.qkv.bias_mask"] = mask
            used.update(k for k in (qb, kb, vb) if k in sd)
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


def dinov3_to_hf(sd: dict) -> dict:
    """Official DINOv3 keys -> Hugging Face `DINOv3ViTModel` keys, as on the Hub (`layer.{i}`, not
    transformers 5's in-memory `model.layer.{i}`).

    As transformers' conversion: qkv is split, the masked key bias, `bias_mask`, the RoPE periods
    (recomputed from config.json's rope_theta) and `local_cls_norm` are dropped, mask_token becomes
    (1, 1, D), and a model without storage tokens gets an empty register_tokens. A missing
    LayerScale becomes ones (HF always has one). HF has no untied CLS norm: `cls_norm` raises.
    """
    if any(k.startswith("cls_norm.") for k in sd):
        raise ValueError("transformers' DINOv3ViTModel has no untied cls_norm; this model has no HF form")
    out = {}
    for ours, hf in _HF_TOP:
        out[hf] = sd[ours]
    D = sd["cls_token"].shape[-1]
    out["embeddings.mask_token"] = sd["mask_token"].reshape(1, 1, D)
    out["embeddings.register_tokens"] = sd.get("storage_tokens", sd["cls_token"].new_zeros(1, 0, D))
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        pre, dst = f"blocks.{i}.", f"layer.{i}."
        for ours, hf in _HF_BLOCK:
            for k in [k for k in sd if k.startswith(pre + ours)]:
                out[dst + hf + k[len(pre + ours):]] = sd[k]
        for n in (1, 2):
            if pre + f"ls{n}.gamma" not in sd:
                out[dst + f"layer_scale{n}.lambda1"] = sd["cls_token"].new_ones(D)
        q, k, v = sd[pre + "attn.qkv.weight"].chunk(3, 0)
        out.update({dst + "attention.q_proj.weight": q, dst + "attention.k_proj.weight": k,
                    dst + "attention.v_proj.weight": v})
        if pre + "attn.qkv.bias" in sd:
            qb, kb, vb = sd[pre + "attn.qkv.bias"].chunk(3, 0)
            out.update({dst + "attention.q_proj.bias": qb, dst + "attention.v_proj.bias": vb})
            if pre + "attn.qkv.bias_mask" not in sd:
                out[dst + "attention.k_proj.bias"] = kb
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Architecture inference
# ---------------------------------------------------------------------------------------------

def _rope_from_periods(periods: Tensor, head_dim: int) -> dict:
    """ViTConfig RoPE fields that regenerate these periods: base form if periods[0] = 1, else min/max."""
    p = periods.double()
    n = p.numel()
    if n > 1 and abs(p[0].item() - 1.0) < 1e-6:
        base = p[-1].item() ** (head_dim / (4 * (n - 1)))  # periods[i] = base ** (4 i / D_head)
        return dict(rope_base=float(f"{base:.6g}"), rope_min_period=0.0, rope_max_period=0.0)
    if n > 1:
        return dict(rope_min_period=p[0].item(), rope_max_period=p[-1].item())
    return {}


def dinov3_config(sd: dict, hf_config: dict | None = None, **overrides) -> ViTConfig:
    """The ViTConfig of an official-key DINOv3 ViT state dict (see the module docstring)."""
    bad = set(overrides) - {f.name for f in fields(ViTConfig)}
    if bad:
        raise TypeError(f"unknown ViT override(s) {', '.join(sorted(bad))}; overrides are ViTConfig fields")
    need = ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    if not all(k in sd for k in need):
        what = " (a DINOv3 ConvNeXt? only the ViTs load)" if any(k.startswith(("downsample_layers.", "stages."))
                                                                  for k in sd) else ""
        missing = ", ".join(k for k in need if k not in sd)
        raise CheckpointError(f"not a DINOv3 ViT state dict{what}: no {missing}")
    w = sd["patch_embed.proj.weight"]  # (D, 3, p, p)
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"not a DINOv3 ViT state dict: patch_embed.proj.weight has shape {tuple(w.shape)}")
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    c = dict(patch_size=patch, dim=dim, depth=depth,
             n_storage_tokens=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
             qkv_bias="blocks.0.attn.qkv.bias" in sd, mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
             untie_cls_and_patch_norms="cls_norm.weight" in sd, norm_eps=1e-5, rope_normalize_coords="separate",
             layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else 0.0)
    if "blocks.0.mlp.w1.weight" in sd:
        hidden = sd["blocks.0.mlp.w1.weight"].shape[0]
        c.update(ffn_layer="swiglu", ffn_hidden=hidden, mlp_ratio=round(hidden * 1.5 / dim, 4))  # S+/H+: 6, 7B: 3
    elif "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        c.update(ffn_layer="mlp", ffn_hidden=hidden, mlp_ratio=round(hidden / dim, 4))
    else:
        raise CheckpointError("not a DINOv3 ViT state dict: blocks.0 has neither mlp.fc1 (MLP) nor mlp.w1 (SwiGLU)")
    heads = dim // 64
    if hf_config is not None:
        if hf_config.get("model_type", "dinov3_vit") != "dinov3_vit":
            raise CheckpointError(f"config.json is for a {hf_config.get('model_type')!r} model, not dinov3_vit")
        heads = hf_config.get("num_attention_heads", heads)
        c["norm_eps"] = hf_config.get("layer_norm_eps", c["norm_eps"])
        c["rope_base"] = float(hf_config.get("rope_theta", 100.0))
        act = hf_config.get("hidden_act", "silu" if c["ffn_layer"] != "mlp" else "gelu")
        if act != ("gelu" if c["ffn_layer"] == "mlp" else "silu"):
            raise CheckpointError(f"config.json has hidden_act {act!r} with a {c['ffn_layer']} FFN; "
                                  "DINOv3 uses gelu (MLP) or silu (SwiGLU)")
        for key, val in (("hidden_size", dim), ("num_hidden_layers", depth)):
            if key in hf_config and hf_config[key] != val:
                raise CheckpointError(f"config.json has {key} {hf_config[key]} but the tensors say {val}")
    if "rope_embed.periods" in sd:
        n = sd["rope_embed.periods"].numel()  # D_head / 4
        heads = dim // (4 * n) if n > 0 and dim % (4 * n) == 0 else heads
    c["heads"] = overrides.get("heads", heads)
    if "rope_embed.periods" in sd and dim % c["heads"] == 0:
        c.update(_rope_from_periods(sd["rope_embed.periods"], dim // c["heads"]))
    c.update(overrides)
    return ViTConfig(**c)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_imagenet_normalization(proj: nn.Conv2d) -> None:
    """Make `proj` take [-1, 1] pixels where it took ImageNet-normalised ones, in place.

    z_c = ((x_c + 1) / 2 - mean_c) / std_c = a_c x_c + b_c with a_c = 1 / (2 std_c),
    b_c = (0.5 - mean_c) / std_c, so W * z + bias = (W a) * x + (bias + sum W b): exact for a
    conv without padding (every input pixel the kernel sees is a real pixel). In float64.
    """
    a = torch.tensor([0.5 / s for s in IMAGENET_STD], dtype=torch.float64)  # (3,)
    b = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=torch.float64)  # (3,)
    w = proj.weight.double()  # (D, 3, p, p)
    proj.bias.copy_(proj.bias.double() + (w * b[None, :, None, None]).sum((1, 2, 3)))
    proj.weight.copy_(w * a[None, :, None, None])


def load_dinov3(path, *, normalize: bool = True, check_hash: bool = True, **overrides) -> ViT:
    """A nanorf ViT with the weights of an official DINOv3 ViT checkpoint (see the module docstring).

    path       an official .pth state dict, a Hugging Face model.safetensors (its folder's
               config.json is read if there), or a folder with model.safetensors (or its sharded
               form) and config.json
    normalize  fold DINOv3's ImageNet input normalisation into the patch embedding, so the ViT
               takes nanorf's [-1, 1] pixels (False: it takes ImageNet-normalised input, exactly as
               the official model, for parity checks)
    check_hash verify the SHA-256 prefix that official file names carry (a full read of the file)
    overrides  ViTConfig fields that win over the inferred ones, e.g. heads=, norm_eps=
    """
    sd, hf_config = read_state_dict(path, check_hash=check_hash)
    if is_hf_state_dict(sd):
        sd = hf_to_dinov3(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
    cfg = dinov3_config(sd, hf_config, **overrides)
    try:
        vit = ViT(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build its ViT ({one_line(e)})") from None
    want = vit.state_dict()
    if "rope_embed.periods" not in sd:  # Hugging Face files: recomputed from config.json's rope_theta
        sd = dict(sd, **{"rope_embed.periods": want["rope_embed.periods"]})
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                 for label, ks in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if ks]
        raise CheckpointError(f"{path} is not a DINOv3 ViT of the inferred shape ({cfg.dim} wide, {cfg.depth} "
                              f"blocks, {cfg.heads} heads): " + "; ".join(parts))
    sd = dict(sd)
    for i in range(cfg.depth):
        key = f"blocks.{i}.attn.qkv.bias_mask"
        if key in sd:
            if not torch.equal(sd[key].float(), want[key]):
                raise CheckpointError(f"{path}: {key} is not DINOv3's key mask (ones, zeros on the key third)")
            bias = sd[f"blocks.{i}.attn.qkv.bias"]
            sd[f"blocks.{i}.attn.qkv.bias"] = bias * sd[key].to(bias.dtype)
    vit.load_state_dict(sd, strict=True)  # copies into the float32 parameters
    if normalize:
        fold_imagenet_normalization(vit.patch_embed.proj)
    return vit
