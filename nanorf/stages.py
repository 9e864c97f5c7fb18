"""Where a run's weights come from and what it trains: the paper's stages (docs/method.md,
"Training recipe and stages").

The paper starts from pretrained parts and trains in three stages:
  1. alignment: the encoder and the LLM frozen, only the connector trains, on understanding data;
  2. joint training of everything at <= 256 px;
  3. continuation at <= 1024 px, from stage 2's weights.

In train.py terms:
    --init-llm QWEN3_DIR      decoder, token embedding, LM head and tokenizer from a Qwen3 folder
    --init-vit DINOV3.pth     encoder from an official DINOv3 checkpoint
    --init-from CKPT          every weight of another run (model, EMA encoder, codebook), with a fresh
                              optimiser and schedule, into this run's config: stage 1 -> 2 -> 3
    --freeze vit,llm,gen      requires_grad off for these groups (FREEZE_GROUPS)
    --stage 1                 stage 1 as one flag: --freeze vit,llm,gen and no generation examples

Across image sizes only one learned table depends on the grid: the rep tokens' spatial embedding
`rep_pos` (N, D). `--init-from` resizes it bilinearly, as a 2-D grid, the way ViT position tables
are interpolated (our choice; the paper does not say how stage 3 inherits it); every other
position is a fixed function of normalised image coordinates (patches.sincos_2d, the ViT's RoPE).
All three flags apply when a run starts; a resumed run reloads its own checkpoint instead.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, load_checkpoint, load_vit_weights
from .config import Config, TrainConfig
from .model import RFModel
from .patches import resize_grid_table
from .variants import build_model

# module groups by what they are, never by parameter-name substrings
FREEZE_GROUPS = {
    "vit": lambda m: [m.vit],                                     # the image encoder
    "connector": lambda m: [m.connector],                         # ViT features -> decoder width
    "llm": lambda m: [m.tok_emb, m.lm_head, m.mot],               # the decoder trunk and text ends
    "gen": lambda m: m.pixel_modules() + ([m.rep] if m.rep is not None else []),
}


def parse_freeze(spec: str) -> list[str]:
    groups = [g.strip() for g in spec.split(",") if g.strip()]
    bad = [g for g in groups if g not in FREEZE_GROUPS]
    if bad:
        raise ValueError(f"--freeze: unknown group(s) {', '.join(bad)}; choose from {', '.join(FREEZE_GROUPS)}")
    return groups


def freeze(model: RFModel, spec: str) -> None:
    """requires_grad off for the named groups; rep_pos belongs to "gen"."""
    for g in parse_freeze(spec):
        for mod in FREEZE_GROUPS[g](model):
            mod.requires_grad_(False)
        if g == "gen" and model.rep is not None:
            model.rep_pos.requires_grad_(False)


def apply_stage(t: TrainConfig) -> None:
    """--stage 1 as config fields: only the connector trains, on understanding data."""
    if t.stage == 1:
        t.freeze = "vit,llm,gen"
        t.batch_size, t.micro_batch_size = 0, 0
    elif t.stage not in (0, 2, 3):
        raise ValueError(f"--stage must be 1, 2 or 3, got {t.stage}")


def load_weights_from(model: RFModel, targets, path: str) -> None:
    """--init-from: another run's model weights (and target maker) into this run's model."""
    ck = load_checkpoint(path)
    sd = dict(ck["model"])
    if "rep_pos" in sd and model.rep is not None:
        sd["rep_pos"] = resize_grid_table(sd["rep_pos"], (model.cfg.rep_grid, model.cfg.rep_grid))
    try:
        model.load_state_dict(sd)
        if targets is not None and ck.get("targets") is not None:
            targets.load_state_dict(ck["targets"])
    except RuntimeError as e:
        raise CheckpointError(f"--init-from {path}: its weights do not fit this run's model: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def initial_model(cfg: Config) -> RFModel:
    """The model a fresh run starts from: random, or filled from --init-llm / --init-vit / --vit-init.
    With --init-llm / --init-vit the decoder's / encoder's shape comes from the checkpoint: cfg.model
    is updated to match, so the run's checkpoints carry the config they were built with."""
    from dataclasses import replace
    t = cfg.train
    vit = None
    if t.init_vit:  # the encoder's shape is the checkpoint's
        from .pretrained import load_dinov3
        vit = load_dinov3(t.init_vit)
        cfg.model = replace(cfg.model, vit=vit.cfg)
    if t.init_llm:  # and so is the decoder's
        from .pretrained import load_qwen3
        model = load_qwen3(t.init_llm, cfg.model)
        cfg.model = model.cfg
    else:
        model = build_model(cfg.model)
    if vit is not None:
        model.vit.load_state_dict(vit.state_dict())
        model.record_loaded("vit." + n for n, _ in model.vit.named_parameters())
    if t.vit_init:  # the toy's stand-in for a pretrained encoder (experiments.pretrain_vit)
        model.vit.load_state_dict(load_vit_weights(t.vit_init, cfg.model.vit))
    return model
