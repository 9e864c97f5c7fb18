"""The unified RF model: embeddings, heads and the three losses (docs/method.md, "Overview").

One MoT trunk (mot.py) reads the two sequences of layout.py:

    generation      [BOS] prompt [BOR] r_1 .. r_N [BOP] p_1 .. p_M
    understanding   [BOS] [BOI] v_1 .. v_V [EOI] question answer [EOS]

Embeddings (docs/method.md, "Sequences and the attention mask"):
  text / specials   a byte embedding table
  ViT tokens        MLP connector on the encoder's normed patch features + 2-D sin-cos position
  rep token r_i     identity embedding (own K-entry table) + learned 2-D spatial embedding
  pixel patch       linear patch embedding + timestep embedding + 2-D sin-cos position
The rep spatial embedding starts from the same sin-cos function as the pixel positions,
evaluated at the centre of the patch group it covers, so at step 0 a pixel patch and the
rep token above it already have matching position codes (our choice; the paper only says
"learnable").

Any image size (docs/method.md, "Sequences and the attention mask"): every position is a
function of normalised image coordinates, not of a grid index. The sin-cos positions are
evaluated at the cell centres of whatever grid an H x W image has (`pix_positions`,
`vit_positions`); the learned rep table is defined at the config's square grid and read at
another grid by bilinear interpolation between its cell centres (`rep_positions`). So a
checkpoint trained at one size samples at another (`size=(H, W)` on the forward passes and the
sampler), and a 256-px stage continues at 1024 px with the same parameters (our choice; the
paper trains on mixed resolutions and aspect ratios but does not say how positions are encoded).

Heads: LM head over bytes (L_LM), K-way rep head (L_Rep), pixel head predicting the clean
patch x (x-prediction, L_FM). The pixel head is linear, as JiT's final layer is; with
`pix_head_hidden` > 0 it is a two-layer GELU MLP (our choice, for narrow models): a linear head
from width D draws a patch of p*p*3 values from at most D directions, which is a limit for the
toy's 128-wide trunk and 768-value patches but not for the paper's trunk, wider than its
patches. With `pix_head_tanh` its output goes through tanh (`predict_x`; our choice, for the
toy): a bounded x-prediction saturates at the flat colours and the black background, where a
linear output leaves soft object edges (README, "Results on the toy").
L = L_LM + L_Rep + L_FM with unit weights; a Qwen3-MoE decoder adds its load-balancing loss,
aux_loss_coef * L_aux (nanorf/moe.py).

With a Qwen3 decoder (nanorf/pretrained.py, `load_qwen3`) the text is Qwen's BPE vocabulary
(`ModelConfig.tokenizer`), the LM head may be tied to the token embedding (`tie_lm_head`), and
`lm_logits` is the text-only causal forward that the paper's text-only LM data needs.

Which parameters are "new" (docs/method.md, "Training recipe and stages"): a model filled from
checkpoints records the names of the parameters that were loaded (`loaded`, saved in its state
dict), and `new_parameters` is everything else. Without a record (trained from scratch), it is
the generation side, by module.

What the rep tokens are is one small module, `DiscreteRep` (rep_tokens.py): VQ code ids in,
K-way logits out, cross-entropy. The paper's ablations (Table 3) plug in from the side, in
variants.py, and `variants.build_model` picks the class a config asks for.

Loss normalisation (the paper is silent): L_FM and L_Rep are means over elements and
tokens, which every example has equally many of; L_LM is the mean over examples of each
answer's mean token CE, so every example weighs the same whatever its length. All three are
then exact means over the global batch, which is what makes a DDP step equal a
single-process step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Grids, ModelConfig
from .flow import add_noise, fm_loss, timestep_embedding
from .layout import NO_BLOCK, Layout, generation_layout, understanding_layout
from .moe import MoEFFN
from .mot import MoT, PAD, PIX, REP, UND, attention_mask
from .patches import patchify, resize_grid_table, sincos_2d
from .pixel_field import PixelField
from .rep_tokens import DiscreteRep
from .tokenizer import make_tokenizer
from .vit import ViT, Connector


def validate(cfg: ModelConfig):
    """Raise ValueError, in one line, for shapes the model cannot be built with."""
    m, v = cfg.mot, cfg.vit
    checks = [
        (cfg.image_size % cfg.patch_size == 0, f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"),
        (cfg.image_size % v.patch_size == 0, f"image_size {cfg.image_size} is not a multiple of vit.patch_size {v.patch_size}"),
        ((m.head_dim > 0 or m.dim % m.heads == 0) and m.head_size % 2 == 0,
         f"mot.dim {m.dim} must split into {m.heads} heads of even size" if not m.head_dim else
         f"mot.head_dim {m.head_dim} must be even (RoPE rotates pairs)"),
        (m.heads % m.kv_heads == 0, f"mot.heads {m.heads} is not a multiple of mot.n_kv_heads {m.kv_heads}"),
        (not m.n_routed_experts or 0 < m.top_k <= m.n_routed_experts,
         f"mot.top_k {m.top_k} must be in 1..n_routed_experts ({m.n_routed_experts})"),
        (m.dim % 4 == 0, f"mot.dim {m.dim} must be a multiple of 4 (2-D sin-cos positions)"),
        (v.dim % (4 * v.heads) == 0, f"vit.dim {v.dim} must be a multiple of 4 * vit.heads ({4 * v.heads}) for 2-D RoPE"),
        (not cfg.rf or (cfg.image_size // v.patch_size) % cfg.vq.pool == 0,
         f"the ViT grid {cfg.image_size // v.patch_size} is not a multiple of vq.pool {cfg.vq.pool}"),
        (cfg.rep_target in ("discrete", "continuous"),
         f"rep_target {cfg.rep_target!r} must be 'discrete' or 'continuous'"),
        (not cfg.repa_weight or cfg.patch_size % v.patch_size == 0 or v.patch_size % cfg.patch_size == 0,
         f"REPA needs patch_size {cfg.patch_size} and vit.patch_size {v.patch_size} to divide one another"),
        (0 <= cfg.repa_depth <= m.depth, f"repa_depth {cfg.repa_depth} is outside 0..{m.depth}"),
        (0 <= cfg.flow.p_uniform <= 1, f"flow.p_uniform {cfg.flow.p_uniform} is outside 0..1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


@dataclass
class GenBatch:
    """One micro-batch of generation examples with every random draw made (train.Stream)."""
    prompts: list[list[int]]       # byte ids of each prompt
    images: torch.Tensor           # (B, 3, H, W) in [-1, 1]
    targets: torch.Tensor | None   # rep targets from RepresentationTargets: (B, N) ids; None without rf
    t: torch.Tensor                # (B,) flow times
    eps: torch.Tensor              # (B, M, p*p*3) noise
    drop_text: torch.Tensor        # (B,) bool: CFG drop of the prompt
    drop_rep: torch.Tensor         # (B,) bool: CFG drop of the rep sequence, as the pixels see it
    target_draws: object = None    # extra noise a rep-target kind's loss needs (variants.ContinuousRep)
    align: torch.Tensor | None = None  # REPA's feature targets (variants.REPAModel)


@dataclass
class UndBatch:
    """One micro-batch of understanding examples."""
    images: torch.Tensor           # (B, 3, H, W) in [-1, 1]
    questions: list[list[int]]     # byte ids, RFModel.question_ids
    answers: list[list[int]]
    follow_ups: list | None = None  # per example, more (question, answer) turns (TrainConfig.und_turns)


@dataclass
class GenOutput:
    """What a teacher-forced generation pass reads out."""
    rep: torch.Tensor | None       # rep readout at [BOR], r_1..r_n: (B, n+1, K); None without rf
    x_pred: torch.Tensor | None    # (B, M, p*p*3) predicted clean patches; None without pixels
    tapped: torch.Tensor | None = None  # pixel tokens' residual stream after `tap` blocks (B, M, D)


@dataclass
class LossParts:
    """The losses of a step, detached, for logging."""
    lm: torch.Tensor
    rep: torch.Tensor
    fm: torch.Tensor
    aux: torch.Tensor | None = None  # routed-MoE decoders only: aux_loss_coef * L_aux, part of the total


LOADED_KEY = "loaded_names"  # the state-dict entry that carries RFModel.loaded


class RFModel(nn.Module):
    """Text + ViT understanding, AR representation tokens, flow-matching pixels, one MoT."""

    tap_depth: int | None = None   # a trunk depth whose pixel hidden states a variant's loss reads
    _router_log = None             # while `forward` runs with a routed-MoE decoder: the router logits record

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = make_tokenizer(cfg.tokenizer)
        self.loaded: frozenset[str] | None = None  # names of the parameters filled from checkpoints, if any
        D, p = cfg.mot.dim, cfg.patch_size
        validate(cfg)
        self.n_pix = cfg.grid ** 2
        self.n_rep = cfg.rep_grid ** 2 if cfg.rf else 0
        self.n_vit = (cfg.image_size // cfg.vit.patch_size) ** 2
        # understanding
        self.vit = ViT(cfg.vit)
        self.connector = Connector(cfg.vit.dim, D)
        g = cfg.grids()
        self.register_buffer("vit_pos", sincos_2d(*g.vit, D), persistent=False)   # at the config's size
        self.tok_emb = nn.Embedding(self.tok.vocab_size, D)
        self.lm_head = nn.Linear(D, self.tok.vocab_size, bias=False)
        if cfg.tie_lm_head:
            self.lm_head.weight = self.tok_emb.weight
        # representation tokens (none in the pixel-only baseline, Table 3a)
        self.rep = None
        if cfg.rf:
            rg = cfg.rep_grid
            self.rep_pos = nn.Parameter(sincos_2d(rg, rg, D))
            self.rep = self.make_rep()
        # pixels
        self.pix_emb = nn.Linear(p * p * 3, D)
        self.t_emb = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.register_buffer("pix_pos", sincos_2d(*g.pix, D), persistent=False)
        h = cfg.pix_head_hidden
        # the head gives logits; predict_x adds the per-pixel refinement and the tanh, if any
        self.pix_head = nn.Sequential(nn.Linear(D, h), nn.GELU(), nn.Linear(h, p * p * 3)) if h else nn.Linear(D, p * p * 3)
        self.pix_field = PixelField(D, p, cfg.pix_field) if cfg.pix_field else None
        self.mot = MoT(cfg.mot)
        self._init_weights()

    def make_rep(self) -> nn.Module:
        """The rep-target kind: discrete VQ codes (RF). variants.ContinuousRepModel overrides it."""
        return DiscreteRep(self.cfg.mot.dim, self.cfg.vq.codebook_size)

    def _init_weights(self):
        depth = self.cfg.mot.depth
        for name, m in self.mot.named_modules():
            if isinstance(m, nn.Linear):
                # residual-branch outputs start small so the trunk starts near identity (GPT-2)
                std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("down", "attn_out.0", "attn_out.1", "attn_out.2")) else 0.02
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, MoEFFN):
                m.init_weights(0.02, 0.02 / (2 * depth) ** 0.5)
        nn.init.normal_(self.lm_head.weight, std=0.02)  # tied: the embedding too
        if self.rep is not None:
            self.rep.init_weights()
        # x-prediction head starts at x = 0 (JiT zero-inits its final layer)
        nn.init.zeros_(self.pix_out.weight)
        nn.init.zeros_(self.pix_out.bias)

    @property
    def pix_out(self) -> nn.Linear:
        """The pixel head's last (output) layer: the head itself, or its MLP's last Linear."""
        return self.pix_head[-1] if isinstance(self.pix_head, nn.Sequential) else self.pix_head

    def pixel_modules(self) -> list[nn.Module]:
        """The modules only pixel tokens pass through outside the trunk: patch and t embeddings,
        the head and its per-pixel refinement (when there is one)."""
        return [self.pix_emb, self.t_emb, self.pix_head] + ([self.pix_field] if self.pix_field is not None else [])

    def predict_x(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x-prediction for pixel tokens: final hidden states h (.., D) of noisy patches z
        (.., p*p*3) -> (.., p*p*3). The head's logits, refined pixel by pixel from z with
        `pix_field` (pixel_field.py), then bounded to (-1, 1) with `pix_head_tanh`."""
        logits = self.pix_head(h)
        if self.pix_field is not None:
            logits = self.pix_field(h, logits, z)
        return torch.tanh(logits) if self.cfg.pix_head_tanh else logits

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters the paper trains at x4 learning rate, "newly initialised generation
        parameters" (docs/method.md, "Training recipe and stages"). For a model filled from
        checkpoints (`loaded` is set): every parameter that was not loaded, whatever its name.
        Otherwise `new_by_module`."""
        if self.loaded is None:
            return self.new_by_module()
        return [p for n, p in self.named_parameters() if n not in self.loaded]

    def new_by_module(self) -> list[nn.Parameter]:
        """Everything only rep and pixel tokens pass through (their experts and final norms,
        embeddings, heads, the t-embedding): the new set of a model trained from scratch."""
        mods = self.pixel_modules() + self.mot.expert_modules(PIX)
        if self.rep is not None:
            mods += [self.rep] + self.mot.expert_modules(REP)
        params = [p for m in mods for p in m.parameters()]
        return params + ([self.rep_pos] if self.rep is not None else [])

    def record_loaded(self, names) -> None:
        """Add parameter names (e.g. every "vit." one after copying DINOv3 weights in) to the
        record of what was loaded from checkpoints; `new_parameters` is then the rest."""
        names = set(names)
        known = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        if names - known:
            raise ValueError(f"not parameters of this model: {', '.join(sorted(names - known)[:3])}")
        self.loaded = frozenset(names | (self.loaded or set()))

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The usual state dict, plus the `loaded` record (as UTF-8 bytes in a uint8 tensor, so the
        state dict stays all tensors) when there is one."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.loaded is not None:
            sd[prefix + LOADED_KEY] = torch.tensor(list("\n".join(sorted(self.loaded)).encode()), dtype=torch.uint8)
        return sd

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict without the record (from scratch, or older than it) clears it
        rec = state_dict.pop(prefix + LOADED_KEY, None)
        self.loaded = None if rec is None else frozenset(n for n in bytes(rec.tolist()).decode().split("\n") if n)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def configure_optimizer(self, t) -> torch.optim.AdamW:
        """AdamW (t: TrainConfig); weight decay on matrices only; new_parameters() at
        t.new_param_lr_mult x the base rate (each group's `lr_mult`, applied by the schedule)."""
        new = {id(p) for p in self.new_parameters()}
        groups = {}
        for p in self.parameters():
            if not p.requires_grad:  # frozen (--freeze, --stage 1): no optimiser state at all
                continue
            groups.setdefault((p.dim() >= 2, id(p) in new), []).append(p)
        param_groups = [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                         "lr_mult": t.new_param_lr_mult if is_new else 1.0} for (decay, is_new), ps in groups.items()]
        fused = {"fused": True} if next(self.parameters()).is_cuda else {}
        return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, **fused)

    # ---- sequence assembly (layout.py) --------------------------------------------------
    def gen_layout(self, prompts: list[list[int]], n_rep: int, n_pix: int) -> Layout:
        return generation_layout(self.tok, prompts, n_rep, n_pix, rf=self.cfg.rf)

    def und_layout(self, questions: list[list[int]], answers: list[list[int]], eos: bool = True,
                   n_vit: int | None = None, follow_ups=None) -> Layout:
        return understanding_layout(self.tok, self.n_vit if n_vit is None else n_vit, questions, answers, eos,
                                    follow_ups)

    def question_ids(self, question: str) -> list[int]:
        """A question as sequences hold it: its bytes and one space, then the answer."""
        return self.tok.encode(question + " ", self.cfg.max_text_len)

    # ---- positions: functions of normalised image coordinates, at any grid ---------------
    def pix_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w, D) sin-cos positions of an h x w pixel-patch grid."""
        return self._sincos(grid, self.cfg.grids().pix, self.pix_pos)

    def vit_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w, D) sin-cos positions of an h x w encoder-patch grid."""
        return self._sincos(grid, self.cfg.grids().vit, self.vit_pos)

    def _sincos(self, grid, config_grid, table: torch.Tensor) -> torch.Tensor:
        """The buffer computed at the config's grid, or the same function at another grid."""
        return table if tuple(grid) == config_grid else sincos_2d(*grid, self.cfg.mot.dim).to(table.device)

    def rep_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w, D) learned rep-token positions: the table itself at the config's grid, its
        bilinear interpolation between cell centres at any other."""
        return resize_grid_table(self.rep_pos, grid)

    # ---- embeddings --------------------------------------------------------------------
    def embed(self, lay: Layout, vit_tokens=None, codes=None, z=None, t=None, grids: Grids | None = None) -> torch.Tensor:
        """(B, L, D): byte embeddings, with the image blocks spliced in by column. grids: the
        image size's grids (ModelConfig.grids; default the config's square size)."""
        g = grids or self.cfg.grids()
        x = self.tok_emb(lay.tokens.to(self.tok_emb.weight.device))
        parts = []
        if vit_tokens is not None:
            parts.append((lay.vit_cols, self.connector(vit_tokens) + self.vit_positions(g.vit)))
        if lay.rep_cols is not None and codes is not None and codes.shape[1]:
            parts.append((lay.rep_cols, self.embed_rep(codes, 0, g.rep)))
        if z is not None:
            parts.append((lay.pix_cols, self.embed_pix(z, t, g.pix)))
        for cols, val in sorted(parts, key=lambda cv: cv[0].start):
            x = torch.cat([x[:, :cols.start], val.to(x.dtype), x[:, cols.stop:]], dim=1)
        return x

    def embed_rep(self, codes: torch.Tensor, start: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """codes (B, n) for raster positions start..start+n of the rep grid -> (B, n, D):
        identity + 2-D spatial."""
        pos = self.rep_positions(grid or self.cfg.grids().rep)
        return self.rep.embed(codes) + pos[start:start + codes.shape[1]]

    def embed_pix(self, z: torch.Tensor, t: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """z (B, M, p*p*3) noisy patches of an h x w grid at times t (B,) -> (B, M, D)."""
        te = self.t_emb(timestep_embedding(t, 256))                                # (B, D)
        return self.pix_emb(z) + te[:, None] + self.pix_positions(grid or self.cfg.grids().pix)

    def vit_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, V, D_vit) normed patch features of the online encoder."""
        return self.vit(images)["x_norm_patchtokens"]

    # ---- forward passes ----------------------------------------------------------------
    def trunk(self, lay: Layout, x: torch.Tensor, drop_rep=None, tap=None):
        dev = x.device
        mask = lay.mask(None if drop_rep is None else drop_rep.cpu()).to(dev)
        return self.mot(x, lay.modality.to(dev), lay.pos.to(dev), mask, tap=tap, router_log=self._router_log)

    def lm_logits(self, ids: torch.Tensor, valid: torch.Tensor | None = None, router_log=None) -> torch.Tensor:
        """Text-only causal forward: token ids (B, L) -> next-token logits (B, L, vocab).

        No image blocks, every token UND, RoPE positions 0..L-1, causal attention: exactly a
        Qwen3 causal LM on a Qwen3-loaded model. valid (B, L) bool marks real tokens of
        right-padded rows (padding routes to no expert and no real token sees it).
        router_log (MoT.router_log()): collects a routed-MoE decoder's router logits, for
        self.mot.aux_loss."""
        B, L = ids.shape
        dev = ids.device
        valid = torch.ones(B, L, dtype=torch.bool, device=dev) if valid is None else valid.to(dev)
        modality = torch.where(valid, UND, PAD)
        block = torch.full((B, L), NO_BLOCK, device=dev)
        mask = attention_mask(block, torch.zeros_like(valid), valid, modality)
        pos = torch.arange(L, device=dev).expand(B, L)
        h = self.mot(self.tok_emb(ids), modality, pos, mask,
                     router_log=router_log if router_log is not None else self._router_log)
        return self.lm_head(h)

    def gen_forward(self, prompts, codes, z, t, drop_rep=None, tap: int | None = None,
                    size: tuple[int, int] | None = None) -> GenOutput:
        """Teacher-forced generation pass. prompts: B lists of byte ids; codes (B, n) rep
        tokens, n <= N (None or n = 0 without rf); z (B, M, p*p*3) noisy patches at times
        t (B,), or None for a rep-only prefix; drop_rep (B,) bool hides the rep sequence from
        the pixels; tap: also return the pixel tokens' residual stream after `tap` blocks;
        size: the image's (H, W), default the config's square canvas."""
        g = self.cfg.grids(size)
        n = 0 if codes is None else codes.shape[1]
        lay = self.gen_layout(prompts, n, 0 if z is None else g.n_pix)
        h = self.trunk(lay, self.embed(lay, codes=codes, z=z, t=t, grids=g), drop_rep, tap)
        tapped = None
        if tap is not None:
            h, tapped = h
            tapped = tapped[:, lay.pix_cols]
        out = GenOutput(rep=None, x_pred=None, tapped=tapped)
        if self.rep is not None:
            c = lay.rep_cols
            out.rep = self.rep.readout(h[:, c.start - 1:c.stop])                   # (B, n+1, K)
        if z is not None:
            out.x_pred = self.predict_x(h[:, lay.pix_cols], z)                     # (B, M, p*p*3)
        return out

    def und_forward(self, images, questions, answers, eos: bool = True, follow_ups=None):
        """Returns text logits (B, L, vocab) and the layout (for its targets)."""
        g = self.cfg.grids(images.shape[-2:])
        lay = self.und_layout(questions, answers, eos, g.n_vit, follow_ups)
        h = self.trunk(lay, self.embed(lay, vit_tokens=self.vit_tokens(images), grids=g))
        return self.lm_head(h), lay

    # ---- losses ------------------------------------------------------------------------
    def gen_loss(self, b: GenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_Rep, L_FM) on a generation batch (docs/method.md, "Losses and flow matching")."""
        prompts = [[] if d else p for p, d in zip(b.prompts, b.drop_text.tolist())]
        x = patchify(b.images, self.cfg.patch_size)                                # (B, M, P)
        z = add_noise(x, b.t, b.eps)
        out = self.gen_forward(prompts, b.targets, z, b.t, b.drop_rep, self.tap_depth, size=b.images.shape[-2:])
        l_fm = fm_loss(out.x_pred, x, b.eps, z, b.t, self.cfg.flow.t_eps)
        return self.rep_loss(out, b), l_fm

    def rep_loss(self, out: GenOutput, b: GenBatch) -> torch.Tensor:
        """L_Rep: the readout at [BOR], r_1..r_{N-1} predicts r_1..r_N; 0 without rep tokens."""
        if self.rep is None:
            return out.x_pred.new_zeros(())
        return self.rep.loss(out.rep[:, :-1], b.targets, b.target_draws)

    def und_loss(self, b: UndBatch) -> torch.Tensor:
        """L_LM: per-example mean next-token CE on the answer and [EOS] (over all of an example's
        turns), averaged over examples."""
        logits, lay = self.und_forward(b.images, b.questions, b.answers, follow_ups=b.follow_ups)
        tgt = lay.targets.to(logits.device)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten().clamp_min(0), reduction="none")
        ce = ce.view_as(tgt) * (tgt >= 0)
        per_example = ce.sum(1) / (tgt >= 0).sum(1).clamp_min(1)
        return per_example.mean()

    def forward(self, gen: GenBatch | None, und: UndBatch | None = None, packed=None) -> tuple[torch.Tensor, LossParts]:
        """One training micro-batch -> (L = L_LM + L_Rep + L_FM, the parts detached); either batch
        may be None (stage 1 trains on understanding alone). With a routed-MoE decoder L also holds
        aux_loss_coef * L_aux over both passes' tokens (parts.aux).
        packed: instead of the two batches, (a packing.Pack, n_gen, n_und): one packed row's loss
        (packing.packed_loss), through forward so DDP and FSDP see the call."""
        if packed is not None:
            from .packing import packed_loss  # packing builds on this module
            return packed_loss(self, *packed)
        self._router_log = self.mot.router_log()
        try:
            zero = self.pix_emb.weight.new_zeros(())
            l_rep, l_fm = self.gen_loss(gen) if gen is not None else (zero, zero)
            l_lm = self.und_loss(und) if und is not None else zero
            aux = self.mot.aux_loss(self._router_log)
        finally:
            self._router_log = None
        total = l_lm + l_rep + l_fm
        if self.cfg.mot.n_routed_experts:
            aux = self.cfg.mot.aux_loss_coef * (aux if aux is not None else total.new_zeros(()))
            return total + aux, LossParts(l_lm.detach(), l_rep.detach(), l_fm.detach(), aux.detach())
        return total, LossParts(l_lm.detach(), l_rep.detach(), l_fm.detach())
