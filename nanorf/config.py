"""Configuration dataclasses: every knob of the method, in one place.

The knobs are grouped the way the paper groups them: the image encoder (docs/method.md,
"Encoder and connector"), the online VQ that makes the representation targets
("Representation targets and online VQ", the paper's Algorithm 1), the MoT transformer ("MoT
routing"), flow matching ("Losses and flow matching"), sampling ("Sampling") and the training
recipe ("Training recipe and stages"). The named recipes built from them (toy, small, the
paper's shapes) are in nanorf/presets.py; `apply_overrides` is the command line's `--set`.

A checkpoint stores `asdict(config)`; `Config.from_dict` rebuilds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import NamedTuple


@dataclass
class ViTConfig:
    """DINOv3-style ViT encoder (docs/method.md, "Encoder and connector"; DINOv3 vision_transformer.py naming).

    The fields after `rope_base` exist so the official DINOv3 checkpoints load (nanorf/pretrained.py
    infers them from the tensors); their defaults keep the architecture the presets always had
    (GELU MLP, unmasked qkv bias, LayerNorm eps 1e-5, base-100 RoPE on separately normalised axes).
    """
    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0         # DINOv3's ffn_ratio (for SwiGLU: before its 2/3 and rounding)
    n_storage_tokens: int = 4      # DINOv3 "registers"
    layerscale_init: float = 1e-5  # DINOv3 default; the toy uses a larger value to learn fast from scratch;
                                   # 0 = no LayerScale at all (DINOv3's layerscale_init=None)
    rope_base: float = 100.0       # DINOv3's RoPE base period
    ffn_layer: str = "mlp"         # DINOv3's names: "mlp" (GELU), "swiglu" or "swiglu32/64/128" (hidden aligned
                                   # to 8 or 32/64/128)
    ffn_hidden: int = 0            # > 0: the FFN hidden width as is (a loaded checkpoint's); 0 = from mlp_ratio,
                                   # rounded as DINOv3 rounds it
    qkv_bias: bool = True          # False in DINOv3 ViT-7B
    mask_k_bias: bool = False      # the key third of the qkv bias is masked to zero (every released DINOv3 ViT)
    norm_eps: float = 1e-5         # released DINOv3 ViTs use "layernormbf16" (1e-5); DINOv3's "layernorm" is 1e-6
    rope_min_period: float = 0.0   # both > 0: DINOv3's min/max-period RoPE instead of rope_base
    rope_max_period: float = 0.0
    rope_normalize_coords: str = "separate"  # DINOv3's normalize_coords: "separate", "min" or "max"
    untie_cls_and_patch_norms: bool = False  # a separate final norm (cls_norm) for CLS and storage tokens


@dataclass
class VQConfig:
    """Online cosine VQ on EMA-encoder features (the paper's Algorithm 1; docs/method.md, "Representation targets and online VQ")."""
    codebook_size: int = 16384     # K
    tau: float = 0.5               # temperature of the code softmax
    momentum: float = 0.9999       # prototype momentum m
    pool: int = 2                  # p x p average pooling of encoder patch features
    encoder_ema: float = 0.9999    # decay of the target encoder's EMA (paper: not stated; 0.9999 inferred)
    init: str = "random"           # first-batch prototypes: "random" features or "farthest" points (k-centre greedy; nanorf/vq.py)


@dataclass
class MoTConfig:
    """Mixture-of-Transformers decoder (docs/method.md, "MoT routing"; BAGEL).

    The fields after `rope_base` exist so Qwen3 and Qwen3-MoE checkpoints load
    (nanorf/pretrained.py, `load_qwen3`); their defaults keep the architecture the presets
    always had (head size dim / heads, as many key/value heads as query heads, the FFN width
    from mlp_ratio, one dense SwiGLU per expert group).
    """
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    shared_attention: bool = True  # paper: attention shared by all tokens; False = BAGEL's per-modality q/k/v/o + norms
    rope_base: float = 10000.0     # Qwen3's rope_theta (the name predates the loader; checkpoints store it)
    head_dim: int = 0              # > 0: per-head width independent of dim (Qwen3: 128); 0 = dim // heads
    n_kv_heads: int = 0            # grouped-query attention: key/value heads, dividing heads; 0 = heads
    ffn_hidden: int = 0            # > 0: the SwiGLU hidden width as is (Qwen3's intermediate_size); 0 = from mlp_ratio
    rms_eps: float = 1e-6          # every RMSNorm's epsilon (Qwen3's rms_norm_eps)
    # Routed MoE FFN (Qwen3-MoE): with n_routed_experts > 0 each of the three expert groups is a
    # pool of routed SwiGLU experts instead of one dense SwiGLU (nanorf/moe.py)
    n_routed_experts: int = 0      # experts per group (Qwen3-30B-A3B: 128); 0 = dense
    top_k: int = 8                 # experts per token (Qwen3-30B-A3B: 8)
    norm_topk_prob: bool = True    # renormalise the top-k router probabilities to sum to 1
    moe_hidden: int = 0            # each routed expert's hidden width (moe_intermediate_size); 0 = the dense width
    aux_loss_coef: float = 0.001   # weight of the load-balancing loss in the total (router_aux_loss_coef)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.heads

    @property
    def ffn_size(self) -> int:
        """The dense SwiGLU hidden width: explicit, or at the FLOPs of a 4x GELU MLP."""
        return self.ffn_hidden or int(self.dim * self.mlp_ratio * 2 / 3) // 8 * 8

    @property
    def moe_size(self) -> int:
        return self.moe_hidden or self.ffn_size


@dataclass
class FlowConfig:
    """x-prediction flow matching, JiT convention, t = 1 clean (docs/method.md, "Losses and flow matching")."""
    p_mean: float = -0.8           # logit-normal time sampling (JiT default; paper silent)
    p_std: float = 0.8
    p_uniform: float = 0.0         # share of times drawn uniform on (0, 1) instead (0 = JiT; flow.sample_t)
    t_eps: float = 0.05            # clamp on (1 - t) in v = (x - z)/(1 - t)
    noise_scale: float = 1.0       # std of the Gaussian noise (JiT: 1 at 256 px, 2 at 512 px)


@dataclass
class SamplingSettings:
    """How to sample an image (docs/method.md, "Sampling" and "Classifier-free guidance").
    A model's defaults live in ModelConfig.sample; sampler.text_to_image takes overrides."""
    steps: int = 25                # ODE steps (paper: 25)
    solver: str = "euler"          # "euler" or "heun", for the ODE steps before renoise_from
    renoise_from: float = 1.0      # steps starting at t >= this re-noise the x-prediction afresh (flow.renoise_step); 1 = the ODE all the way
    shift: float = 0.0             # SD3 timestep shift; 0 = derive from the resolution (flow.resolution_shift)
    cfg_pix: float = 3.0           # pixel guidance w_pix (paper: 3.0; 1 = off)
    cfg_rep: float = 2.0           # rep-token logit guidance w_rep (paper: 2.0; 1 = off)
    cfg_interval: tuple = (0.0, 1.0)  # apply pixel CFG only for t in this interval
    cfg_mode: str = "joint"        # "joint": v(0,0) + w (v(c,r) - v(0,0)) (paper); "split", "norep": sampler.pixel_branches
    cfg_pix_rep: float = 1.0       # "split" only: guidance weight of the rep plan
    top_k: int = 0                 # rep-token top-k (0 = full distribution); paper: top-k, k not stated
    temperature: float = 1.0       # rep-token temperature (0 = greedy)


class Grids(NamedTuple):
    """The patch grids of one image size, each (rows, cols): what an H x W image becomes."""
    size: tuple[int, int]   # (H, W) in pixels
    pix: tuple[int, int]    # pixel patches
    vit: tuple[int, int]    # encoder patches
    rep: tuple[int, int]    # representation tokens (encoder patches / pool); (0, 0) without rf

    @property
    def n_pix(self) -> int:
        return self.pix[0] * self.pix[1]

    @property
    def n_vit(self) -> int:
        return self.vit[0] * self.vit[1]

    @property
    def n_rep(self) -> int:
        return self.rep[0] * self.rep[1]


@dataclass
class ModelConfig:
    """The unified model: sequence layout, embeddings and heads (docs/method.md, "Sequences and the attention mask")."""
    image_size: int = 256          # square canvas side in pixels
    patch_size: int = 16           # pixel patch side for generation (paper: 16)
    pix_head_hidden: int = 0       # > 0: the pixel head is a GELU MLP with this hidden width; 0 = linear (JiT)
    pix_head_tanh: bool = False    # True: x-prediction through tanh, bounded to the pixels' [-1, 1]; False = JiT's
    pix_field: int = 0             # > 0: a per-pixel MLP of this width refines the head from each pixel's noisy value (pixel_field.py); 0 = JiT's head
    max_text_len: int = 128        # tokens of prompt / question / answer the sequence can hold
    rf: bool = True                # False = pixel-only baseline (no representation tokens)
    rep_target: str = "discrete"   # "discrete": VQ codes, AR cross-entropy (RF); "continuous": Table 3c's
                                   # per-position diffusion head on the EMA encoder's features
    repa_weight: float = 0.0       # > 0: Table 3b's REPA loss, pixel hidden states aligned to encoder features
    repa_depth: int = 0            # REPA taps the pixel tokens after this many blocks; 0 = mot.depth // 2
    p_drop_text: float = 0.1       # CFG: drop the prompt
    p_drop_rep: float = 0.1        # CFG: hide the rep sequence from the pixel block
    tokenizer: str = ""            # "" = UTF-8 bytes (the toy); else a Qwen3 checkpoint folder (or its tokenizer.json)
                                   # whose BPE vocabulary the text uses (nanorf/tokenizer.py, QwenTokenizer)
    tie_lm_head: bool = False      # the LM head shares the token embedding matrix (Qwen3's tie_word_embeddings)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    mot: MoTConfig = field(default_factory=MoTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SamplingSettings = field(default_factory=SamplingSettings)

    @property
    def grid(self) -> int:
        """Pixel patches per side."""
        return self.image_size // self.patch_size

    @property
    def rep_grid(self) -> int:
        """Representation tokens per side: encoder patches per side / pool."""
        return self.image_size // self.vit.patch_size // self.vq.pool

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the pixel patch, and the encoder patch times
        the pooling that makes one rep token (docs/method.md, "Sequences and the attention mask")."""
        return math.lcm(self.patch_size, self.vit.patch_size * (self.vq.pool if self.rf else 1))

    def grids(self, size: tuple[int, int] | None = None) -> Grids:
        """The grids of an H x W image (default: the square image_size canvas). Any size whose
        sides are multiples of `size_multiple` works: positions are functions of normalised
        image coordinates (model.py), so nothing is tied to the training size."""
        H, W = (self.image_size, self.image_size) if size is None else (int(size[0]), int(size[1]))
        m = self.size_multiple
        if H <= 0 or W <= 0 or H % m or W % m:
            raise ValueError(f"image size {H}x{W} does not fit this model: both sides must be positive "
                             f"multiples of {m} (pixel patch {self.patch_size}, encoder patch "
                             f"{self.vit.patch_size} x pool {self.vq.pool if self.rf else 1})")
        v, r = self.vit.patch_size, self.vit.patch_size * self.vq.pool
        rep = (H // r, W // r) if self.rf else (0, 0)
        return Grids((H, W), (H // self.patch_size, W // self.patch_size), (H // v, W // v), rep)


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/method.md, "Training recipe and stages") scaled to the preset."""
    batch_size: int = 64           # global generation examples per step (all ranks, all micro-steps)
    und_batch_size: int = 32       # global understanding examples per step
    und_turns: int = 1             # questions per understanding example: the image once, then up to this many
                                   # (question, answer, [EOS]) turns (fewer where the image has fewer)
    micro_batch_size: int = 0      # per-rank per-micro-step generation examples; 0 = no accumulation
    tokens_per_rank: int = 0       # > 0: pack each rank's examples into rows of this many tokens, one row
                                   # per forward, instead of padded micro-batches (nanorf/packing.py; paper 32,768)
    lr: float = 5e-5
    new_param_lr_mult: float = 4.0  # paper: x4 LR on newly initialised generation parameters
    warmup_steps: int = 500
    max_steps: int = 50000
    decay_frac: float = 0.0        # LR falls linearly to 0 over this share of max_steps at the end
                                   # (nanoGPT/nanochat's warmdown; 0 = the paper's constant LR)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999      # model EMA used for sampling
    log_every: int = 10
    ckpt_every: int = 1000
    keep: int = 0                  # numbered checkpoints ckpt-<step>.pt kept beside ckpt.pt (0 = ckpt.pt only)
    max_bad_steps: int = 3         # this many skipped (non-finite) steps in a row end the run
    max_bad_fraction: float = 0.01  # more than this fraction of a folder's images failing to decode ends the run
    sample_every: int = 0          # 0 = only at the end
    eval_per_kind: int = 50        # held-out prompts per prompt kind scored at the end (0 = skip)
    seed: int = 0
    compile: bool = False
    fsdp: bool = False             # shard weights, gradients, optimiser state (FSDP2); checkpoints as ckpt.dcp/
    data: str = ""                 # "" = the shapes world; else an image-caption folder
    vit_init: str = ""             # "" = random ViT; else weights from experiments.pretrain_vit (the toy's stand-in)
    # where the weights start and what trains (nanorf/stages.py; the paper's stages)
    init_llm: str = ""             # a Qwen3 checkpoint folder: decoder, embeddings, LM head, tokenizer
    init_vit: str = ""             # an official DINOv3 checkpoint (.pth or Hugging Face): the encoder
    init_from: str = ""            # another run's checkpoint: every weight, fresh optimiser and schedule
    freeze: str = ""               # comma-separated groups with no gradient: vit, connector, llm, gen
    stage: int = 0                 # 1: the paper's stage 1 (freeze vit,llm,gen; understanding only); 0, 2, 3: as set
    # Shapes-world prompt kinds drawn in training, weights in the order single, two, counting,
    # position, located (nanorf.shapes.KINDS): single is rare (18 captions, and its objects appear
    # in every other kind); counting and position ask the most planning.
    kinds: tuple = (0.1, 0.2, 0.25, 0.25, 0.2)


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _from_dict(cls, d)


def _from_dict(cls, d):
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        ft = f.type if not isinstance(f.type, str) else eval(f.type, globals())
        if is_dataclass(ft) and isinstance(v, dict):
            v = _from_dict(ft, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply "section.field=value" strings in place, e.g. "model.mot.dim=256" or
    "train.lr=3e-4"; the value is parsed as the field's current type."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        obj, *path = [cfg] + key.strip().split(".")
        for name in path[:-1]:
            obj = getattr(obj, name, None)
        if not sep or obj is None or not path or not hasattr(obj, path[-1]) or is_dataclass(getattr(obj, path[-1])):
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE with KEY a config field like model.mot.dim")
        cur = getattr(obj, path[-1])
        if isinstance(cur, bool):
            val = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(cur, tuple):
            val = tuple(type(c)(v) for c, v in zip(cur, raw.split(",")))
        else:
            try:
                val = type(cur)(raw)
            except ValueError:
                raise ValueError(f"bad override {item!r}: {raw!r} is not a {type(cur).__name__}") from None
        setattr(obj, path[-1], val)
    return cfg
