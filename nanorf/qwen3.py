"""Official Qwen3 decoders into nanorf's MoT (docs/method.md, "MoT routing" and "Training recipe
and stages").

The paper initialises its decoder from Qwen3-30B-A3B. `load_qwen3(dir)` reads a Hugging Face
Qwen3 (`model_type` qwen3) or Qwen3-MoE (qwen3_moe) checkpoint folder: `config.json`, the
weights as `model.safetensors` or sharded with `model.safetensors.index.json`, and
`tokenizer.json`. It returns an `RFModel` whose decoder is the checkpoint's (MoTConfig from
config.json, head size from the q-norm tensor) and whose text is Qwen's vocabulary
(tokenizer.QwenTokenizer). Where each tensor goes:

  embed_tokens, lm_head                  tok_emb, lm_head (tied when tie_word_embeddings), with rows
                                         appended for nanorf's special tokens Qwen lacks, set to the
                                         mean of the text tokens' rows
  input_layernorm, q/k/v_proj, q/k_norm  the shared attention (attn_in: q/k/v stacked into qkv);
  o_proj                                 attn_out; with per-modality attention, copied into each group
  post_attention_layernorm, mlp          each of the three expert groups' FFN, copied (BAGEL initialises
                                         its generation expert by copying the understanding one): a dense
                                         SwiGLU, or for Qwen3-MoE the router (mlp.gate) and the experts
                                         stacked (mlp.experts.{j}.*_proj)
  norm                                   the three final norms, copied

`copy_experts=False` fills only the understanding group and leaves the rep/pix groups' FFNs,
final norms (and per-modality attention) at their random initialisation. The rest of RFModel (ViT,
connector, rep and pixel embeddings and heads) comes from the given ModelConfig and stays random;
the ViT can come from `load_dinov3`. The model records the names of the parameters it filled
(`RFModel.loaded`), which makes `new_parameters` (the paper's x4 learning rate) exactly the rest.

Not covered: sliding-window attention, RoPE scaling (YaRN etc.), attention biases, MoE checkpoints
with dense layers (mlp_only_layers, decoder_sparse_step > 1), other architectures of the family
(Qwen2, Qwen3-Next, Qwen3-VL), loading straight into bf16 or onto a device (the model is built in
float32 on the CPU first).
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from nanorf.checkpoint import CheckpointError
from nanorf.config import ModelConfig, MoTConfig
from nanorf.model import RFModel
from nanorf.weight_files import one_line, read_safetensors_dir

QWEN3_TYPES = ("qwen3", "qwen3_moe")


def qwen3_config(hf: dict, sd: dict) -> dict:
    """MoTConfig fields and tie_lm_head of a Qwen3 / Qwen3-MoE config.json (and its tensors)."""
    mt = hf.get("model_type")
    if mt not in QWEN3_TYPES:
        raise CheckpointError(f"config.json is for a {mt!r} model, not Qwen3 ({' or '.join(QWEN3_TYPES)})")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = [
        (hf.get("attention_bias", False), "attention biases"),
        (hf.get("use_sliding_window", False), "sliding-window attention"),
        (hf.get("rope_scaling") or rope_type != "default", f"RoPE scaling ({hf.get('rope_scaling') or rope_type})"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (mt == "qwen3_moe" and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1),
         "dense layers among the MoE ones (mlp_only_layers / decoder_sparse_step)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"this Qwen3 checkpoint uses {what}, which nanorf's MoT does not implement")
    try:
        dim, depth, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
        c = dict(dim=dim, depth=depth, heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                 ffn_hidden=hf["intermediate_size"], rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                 rope_base=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))))
        q_norm = sd.get("model.layers.0.self_attn.q_norm.weight")
        c["head_dim"] = q_norm.shape[0] if q_norm is not None else hf.get("head_dim") or dim // heads
        c.update(n_routed_experts=0, moe_hidden=0)  # dense, whatever the base config's decoder was
        if mt == "qwen3_moe":
            c.update(n_routed_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the latter
                     top_k=hf["num_experts_per_tok"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                     moe_hidden=hf["moe_intermediate_size"],
                     aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    except KeyError as e:
        raise CheckpointError(f"config.json has no {e.args[0]!r}") from None
    # transformers 5 defaults tie_word_embeddings to False; a file without lm_head can only be tied
    c["tie_lm_head"] = bool(hf.get("tie_word_embeddings", "lm_head.weight" not in sd))
    return c


def qwen3_to_nanorf(sd: dict, mot: MoTConfig, tied: bool, copy_experts: bool = True) -> tuple[dict, list, list]:
    """({nanorf parameter name: tensor}, checkpoint keys it needs and lacks, keys it does not use)
    for a Qwen3 state dict; copies share one tensor. The module docstring says where each goes."""
    out, missing, used = {}, [], set()

    def take(k):
        if k not in sd:
            missing.append(k)
        used.add(k)
        return sd.get(k)

    groups = range(3) if copy_experts else range(1)
    attn_groups = range(1) if mot.shared_attention else groups
    for i in range(mot.depth):
        p, q = f"model.layers.{i}.", f"mot.blocks.{i}."
        a = p + "self_attn."
        qkv = [take(a + f"{n}_proj.weight") for n in "qkv"]
        attn = {"attn_in.{g}.norm.weight": take(p + "input_layernorm.weight"),
                "attn_in.{g}.qkv.weight": torch.cat(qkv) if all(t is not None for t in qkv) else None,
                "attn_in.{g}.q_norm.weight": take(a + "q_norm.weight"),
                "attn_in.{g}.k_norm.weight": take(a + "k_norm.weight"),
                "attn_out.{g}.weight": take(a + "o_proj.weight")}
        ffn = {"ffn.{g}.norm.weight": take(p + "post_attention_layernorm.weight")}
        if mot.n_routed_experts:
            ffn["ffn.{g}.router.weight"] = take(p + "mlp.gate.weight")
            for n in ("gate", "up", "down"):
                ts = [take(p + f"mlp.experts.{j}.{n}_proj.weight") for j in range(mot.n_routed_experts)]
                ffn["ffn.{g}." + n] = torch.stack(ts) if all(t is not None for t in ts) else None   # (E, ...)
        else:
            ffn.update({f"ffn.{{g}}.{n}.weight": take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down")})
        for table, gs in ((attn, attn_groups), (ffn, groups)):
            for name, t in table.items():
                for g in gs:
                    out[q + name.format(g=g)] = t
    norm = take("model.norm.weight")
    out.update({f"mot.norm.{g}.weight": norm for g in groups})
    out["tok_emb.weight"] = take("model.embed_tokens.weight")
    if not tied:
        out["lm_head.weight"] = take("lm_head.weight")
    used.add("lm_head.weight")  # tied: some files store the head anyway (load_qwen3 checks it is the embedding)
    return {k: v for k, v in out.items() if v is not None}, missing, sorted(set(sd) - used)


def _override(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """ModelConfig / MoTConfig fields by name (the two share none) onto cfg."""
    model_f, mot_f = {f.name for f in fields(ModelConfig)}, {f.name for f in fields(MoTConfig)}
    bad = set(overrides) - model_f - mot_f
    if bad:
        raise TypeError(f"unknown override(s) {', '.join(sorted(bad))}; overrides are ModelConfig or MoTConfig fields")
    mot = replace(cfg.mot, **{k: v for k, v in overrides.items() if k in mot_f})
    return replace(cfg, mot=mot, **{k: v for k, v in overrides.items() if k in model_f})


def load_qwen3(path, cfg: ModelConfig | None = None, *, copy_experts: bool = True, tokenizer=None,
               **overrides) -> RFModel:
    """An RFModel whose decoder, token embedding, LM head and tokenizer are a Qwen3 or Qwen3-MoE
    checkpoint's (see the module docstring).

    path          a Hugging Face checkpoint folder: config.json, model.safetensors (or sharded with
                  model.safetensors.index.json), tokenizer.json
    cfg           the rest of the model (image size, ViT, VQ, ...; default ModelConfig()); its `mot`,
                  `tie_lm_head` and `tokenizer` are replaced by the checkpoint's
    copy_experts  copy the FFN (and per-modality attention, final norm) into the rep and pixel groups
                  too (BAGEL); False leaves them random, hence new
    tokenizer     a folder or tokenizer.json to use instead of the checkpoint folder's
    overrides     ModelConfig or MoTConfig fields, e.g. shared_attention=False, image_size=256
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no Qwen3 checkpoint folder at {path}")
    cfg_file = path / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {one_line(e)}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file} is not a config dict")
    qwen3_config(hf, {})  # the architecture and its features, before reading gigabytes of weights
    tok_path = Path(tokenizer) if tokenizer is not None else path
    if not (tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path).is_file():
        raise CheckpointError(f"no tokenizer.json in {tok_path} (pass tokenizer= a folder or file with Qwen's)")
    sd = read_safetensors_dir(path, "Qwen3")
    c = qwen3_config(hf, sd)
    tied = c.pop("tie_lm_head")
    base = cfg or ModelConfig()
    cfg = _override(replace(base, mot=replace(base.mot, **c), tie_lm_head=tied, tokenizer=str(tok_path.resolve())),
                    overrides)
    from nanorf.variants import build_model  # variants imports model; the loader needs the variant classes
    try:
        model = build_model(cfg)
    except ValueError as e:  # validate()'s shapes, TokenizerError: one line each
        raise CheckpointError(f"{path}: cannot build its model ({e})") from None
    src, missing, unexpected = qwen3_to_nanorf(sd, cfg.mot, cfg.tie_lm_head, copy_experts)
    want = dict(model.named_parameters(remove_duplicate=False))
    shapes = []
    for name, t in src.items():
        w = want.get(name)
        if w is None:
            shapes.append(f"{name} (no such parameter)")
        elif name in ("tok_emb.weight", "lm_head.weight"):
            if t.ndim != 2 or t.shape[1] != w.shape[1] or t.shape[0] != model.tok.text_vocab:
                shapes.append(f"{name} {tuple(t.shape)} vs ({model.tok.text_vocab}, {w.shape[1]})")
        elif t.shape != w.shape:
            shapes.append(f"{name} {tuple(t.shape)} vs {tuple(w.shape)}")
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                 for label, ks in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if ks]
        m = cfg.mot
        raise CheckpointError(f"{path} is not a Qwen3 of its config's shape ({m.dim} wide, {m.depth} layers, "
                              f"{m.heads}/{m.kv_heads} heads of {m.head_size}): " + "; ".join(parts))
    if cfg.tie_lm_head and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise CheckpointError(f"{path}: tie_word_embeddings is set but lm_head.weight differs from embed_tokens")
    with torch.no_grad():
        for name, t in src.items():
            w = want[name]
            if name in ("tok_emb.weight", "lm_head.weight"):
                # the appended rows (nanorf's specials, rounding): the mean of the text tokens' rows
                w[:t.shape[0]].copy_(t)
                w[t.shape[0]:].copy_(t[:model.tok.n_text].float().mean(0))
            else:
                w.copy_(t)
    model.record_loaded(set(src) | ({"lm_head.weight"} if cfg.tie_lm_head else set()))
    return model
