"""The unified RF model: sequence assembly, embeddings, heads and the three losses.

PAPER §1 and DESIGN.md §1. One MoT trunk reads two kinds of sequence:

    generation      [PAD..] [BOS] prompt [BOR] r_1 .. r_N [BOP] p_1 .. p_M      (left-padded)
    understanding   [BOS] [BOI] v_1 .. v_V [EOI] question answer [EOS] [PAD..]  (right-padded)

Left-padding generation and right-padding understanding puts every image block
(r, p, v) in the same columns for the whole batch, so blocks are embedded with a
plain concatenation instead of scatters, and the sampler can append tokens at a
common column.

Embeddings (PAPER §1.3):
  text / specials   a byte embedding table
  ViT tokens        MLP connector on the encoder's normed patch features + 2-D sin-cos position
  rep token r_i     identity embedding (own K-entry table) + learned 2-D spatial embedding
  pixel patch       linear patch embedding + timestep embedding + 2-D sin-cos position
The rep spatial embedding starts from the same sin-cos function as the pixel
positions, evaluated at the centre of the 2x2 patch group it covers, so at step 0 a
pixel patch and the rep token above it already have matching position codes (our
choice; the paper only says "learnable").

Heads: LM head over bytes (L_LM), K-way rep head (L_Rep), pixel head predicting the
clean patch x (x-prediction, L_FM). L = L_LM + L_Rep + L_FM with unit weights.

The paper's ablations switch by config (variants.py holds their parts): `rf=False` drops
the rep tokens (Table 3a), `rep_target="continuous"` makes them encoder features with a
per-position diffusion head (3c), `repa_weight > 0` adds REPA's alignment loss on the pixel
block's hidden states, logged in the rep slot (3b).

Loss normalisation (the paper is silent): L_FM and L_Rep are means over elements
and tokens, which every example has equally many of; L_LM is the mean over examples
of each answer's mean token CE, so every example weighs the same whatever its
length. All three are then exact means over the global batch, which is what makes
a DDP step equal a single-process step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .flow import add_noise, fm_loss, timestep_embedding
from .mot import MoT, PAD, PIX, REP, UND, attention_mask
from .tokenizer import ByteTokenizer
from .vit import ViT, Connector
from .variants import DiffusionHead, REPAProjector, repa_loss
from .vq import EMAEncoder, OnlineVQ


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


def validate(cfg: ModelConfig):
    """Raise ValueError, in one line, for shapes the model cannot be built with."""
    m, v = cfg.mot, cfg.vit
    checks = [
        (cfg.image_size % cfg.patch_size == 0, f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"),
        (cfg.image_size % v.patch_size == 0, f"image_size {cfg.image_size} is not a multiple of vit.patch_size {v.patch_size}"),
        (m.dim % m.heads == 0 and (m.dim // m.heads) % 2 == 0, f"mot.dim {m.dim} must split into {m.heads} heads of even size"),
        (m.dim % 4 == 0, f"mot.dim {m.dim} must be a multiple of 4 (2-D sin-cos positions)"),
        (v.dim % (4 * v.heads) == 0, f"vit.dim {v.dim} must be a multiple of 4 * vit.heads ({4 * v.heads}) for 2-D RoPE"),
        (not cfg.rf or (cfg.image_size // v.patch_size) % cfg.vq.pool == 0,
         f"the ViT grid {cfg.image_size // v.patch_size} is not a multiple of vq.pool {cfg.vq.pool}"),
        (cfg.rep_target in ("discrete", "continuous"),
         f"rep_target {cfg.rep_target!r} must be 'discrete' or 'continuous'"),
        (not cfg.repa_weight or cfg.patch_size % v.patch_size == 0,
         f"REPA needs patch_size {cfg.patch_size} to be a multiple of vit.patch_size {v.patch_size}"),
        (0 <= cfg.repa_depth <= m.depth, f"repa_depth {cfg.repa_depth} is outside 0..{m.depth}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


@dataclass
class Layout:
    """Per-token bookkeeping of a padded batch of sequences (all (B, L))."""
    tokens: torch.Tensor    # byte / special ids; 0 where a block embedding goes
    modality: torch.Tensor  # UND / REP / PIX / PAD (expert routing)
    pos: torch.Tensor       # RoPE position
    seg: torch.Tensor       # block id (image blocks share one)
    bidir: torch.Tensor     # inside a bidirectional block
    noisy: torch.Tensor     # a noisy pixel patch
    valid: torch.Tensor     # not padding
    targets: torch.Tensor   # next-token text target, -1 where none
    vit_cols: slice | None = None
    rep_cols: slice | None = None   # columns of r_1..r_n
    pix_cols: slice | None = None   # columns of p_1..p_M

    def mask(self, drop_rep: torch.Tensor | None = None) -> torch.Tensor:
        return attention_mask(self.seg, self.bidir, self.noisy, self.valid, self.modality, drop_rep)


def _stack(rows, B, L, fill, left: bool):
    """Pad python lists to length L (left or right) and stack to a (B, L) tensor."""
    out = torch.full((B, L), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(L - len(r), L) if left else slice(0, len(r))
        out[b, cols] = torch.tensor(r, dtype=torch.long)
    return out


def build_layout(rows: list[list[tuple]], left: bool) -> Layout:
    """rows[b] = list of (token, modality, pos, block, noisy, target) per token."""
    B, L = len(rows), max(len(r) for r in rows)
    fields = list(zip(*[list(zip(*r)) for r in rows]))  # per field: tuple over batch of per-token tuples
    tok, mod, pos, blk, noisy, tgt = (_stack([list(x) for x in f], B, L, fill, left)
                                       for f, fill in zip(fields, (0, PAD, 0, -1, 0, -1)))
    valid = mod != PAD
    # unique segment id per causal token; block tokens share the id of their block
    seg = torch.where(blk >= 0, blk, torch.arange(L).expand(B, L) + 10_000)
    return Layout(tok, mod, pos, seg, blk >= 0, noisy.bool(), valid, tgt)


class RFModel(nn.Module):
    """Text + ViT understanding, AR representation tokens, flow-matching pixels, one MoT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = ByteTokenizer()
        D, p = cfg.mot.dim, cfg.patch_size
        validate(cfg)
        self.n_pix = cfg.grid ** 2
        self.n_rep = cfg.rep_grid ** 2 if cfg.rf else 0
        # understanding
        self.vit = ViT(cfg.vit)
        self.connector = Connector(cfg.vit.dim, D)
        vg = cfg.image_size // cfg.vit.patch_size
        self.register_buffer("vit_pos", sincos_2d(vg, vg, D), persistent=False)
        self.tok_emb = nn.Embedding(self.tok.vocab_size, D)
        self.lm_head = nn.Linear(D, self.tok.vocab_size, bias=False)
        # representation tokens
        self.continuous = cfg.rf and cfg.rep_target == "continuous"
        if cfg.rf:
            K, rg = cfg.vq.codebook_size, cfg.rep_grid
            self.rep_pos = nn.Parameter(sincos_2d(rg, rg, D))
            if self.continuous:  # Table 3c: features in, a diffusion head out
                self.rep_in = nn.Linear(cfg.vit.dim, D)
                self.rep_head = DiffusionHead(cfg.vit.dim, D, D)
            else:
                self.rep_emb = nn.Embedding(K, D)
                self.rep_head = nn.Linear(D, K, bias=False)
        if cfg.repa_weight:  # Table 3b
            self.repa_proj = REPAProjector(D, cfg.vit.dim)
        # pixels
        self.pix_emb = nn.Linear(p * p * 3, D)
        self.t_emb = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.register_buffer("pix_pos", sincos_2d(cfg.grid, cfg.grid, D), persistent=False)
        self.pix_head = nn.Linear(D, p * p * 3)
        self.mot = MoT(cfg.mot)
        self._init_weights()

    def _init_weights(self):
        depth = self.cfg.mot.depth
        for name, m in self.mot.named_modules():
            if isinstance(m, nn.Linear):
                # residual-branch outputs start small so the trunk starts near identity (GPT-2)
                std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("down", "attn_out.0", "attn_out.1", "attn_out.2")) else 0.02
                nn.init.normal_(m.weight, std=std)
        for head in (self.lm_head, getattr(self, "rep_head", None)):
            if isinstance(head, nn.Linear):
                nn.init.normal_(head.weight, std=0.02)
        # x-prediction head starts at x = 0 (JiT zero-inits its final layer)
        nn.init.zeros_(self.pix_head.weight)
        nn.init.zeros_(self.pix_head.bias)

    # ---- sequence assembly -------------------------------------------------------------
    def gen_layout(self, prompts: list[list[int]], n_rep: int, n_pix: int) -> Layout:
        """[BOS] prompt [BOR] r_1..r_{n_rep} ([BOP] p_1..p_M if n_pix). n_rep may be less
        than N while sampling; with rf off there is no [BOR] at all."""
        t, rows = self.tok, []
        for pr in prompts:
            r = [(t.bos, UND, 0, -1, 0, -1)] + [(c, UND, i + 1, -1, 0, -1) for i, c in enumerate(pr)]
            if self.cfg.rf:
                r += [(t.bor, REP, len(r), -1, 0, -1)]
                r += [(0, REP, len(r) + i, -1, 0, -1) for i in range(n_rep)]
            if n_pix:
                r += [(t.bop, PIX, len(r), -1, 0, -1)]
                r += [(0, PIX, len(r), 1, 1, -1)] * n_pix  # one block, one shared position
            rows.append(r)
        lay = build_layout(rows, left=True)
        L = lay.tokens.shape[1]
        end = L - n_pix
        if n_pix:
            lay.pix_cols = slice(end, L)
            end -= 1
        if self.cfg.rf:
            lay.rep_cols = slice(end - n_rep, end)
        return lay

    def und_layout(self, questions: list[list[int]], answers: list[list[int]], eos: bool = True) -> Layout:
        """[BOS][BOI] v_1..v_V [EOI] question answer [EOS]; targets on answer (+[EOS])."""
        t, V, rows = self.tok, (self.cfg.image_size // self.cfg.vit.patch_size) ** 2, []
        for q, a in zip(questions, answers):
            r = [(t.bos, UND, 0, -1, 0, -1), (t.boi, UND, 1, -1, 0, -1)]
            r += [(0, UND, 2, 0, 0, -1)] * V
            r += [(t.eoi, UND, 3, -1, 0, -1)]
            text = q + a + ([t.eos] if eos else [])
            start = len(r)
            r += [(c, UND, 4 + i, -1, 0, -1) for i, c in enumerate(text)]
            # token at column j predicts column j + 1: mark the answer's predecessors
            for j in range(start + len(q) - 1, start + len(text) - 1):
                r[j] = r[j][:5] + (text[j - start + 1],)
            rows.append(r)
        lay = build_layout(rows, left=False)
        lay.vit_cols = slice(2, 2 + V)
        return lay

    # ---- forward pieces -----------------------------------------------------------------
    def embed(self, lay: Layout, vit_tokens=None, codes=None, z=None, t=None) -> torch.Tensor:
        """(B, L, D): byte embeddings, with the image blocks spliced in by column."""
        x = self.tok_emb(lay.tokens.to(self.tok_emb.weight.device))
        parts = []
        if vit_tokens is not None:
            parts.append((lay.vit_cols, self.connector(vit_tokens) + self.vit_pos))
        if lay.rep_cols is not None and codes is not None and codes.shape[1]:
            parts.append((lay.rep_cols, self.embed_rep(codes)))
        if z is not None:
            parts.append((lay.pix_cols, self.embed_pix(z, t)))
        for cols, val in sorted(parts, key=lambda cv: cv[0].start):
            x = torch.cat([x[:, :cols.start], val.to(x.dtype), x[:, cols.stop:]], dim=1)
        return x

    def embed_rep(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes (B, n) for raster positions start..start+n -> (B, n, D): identity + 2-D spatial.
        Continuous targets: codes are features (B, n, D_vit), read in by a linear layer."""
        ident = self.rep_in(codes) if self.continuous else self.rep_emb(codes)
        return ident + self.rep_pos[start:start + codes.shape[1]]

    def rep_readout(self, h: torch.Tensor) -> torch.Tensor:
        """What the sampler draws the next rep token from: logits (.., K) for discrete tokens;
        for continuous ones the hidden state itself, which conditions the diffusion head."""
        return h if self.continuous else self.rep_head(h)

    def embed_pix(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z (B, M, p*p*3) noisy patches at times t (B,) -> (B, M, D)."""
        te = self.t_emb(timestep_embedding(t, 256))                                # (B, D)
        return self.pix_emb(z) + te[:, None] + self.pix_pos

    def trunk(self, lay: Layout, x: torch.Tensor, drop_rep=None, tap=None):
        dev = x.device
        mask = lay.mask(None if drop_rep is None else drop_rep.cpu()).to(dev)
        return self.mot(x, lay.modality.to(dev), lay.pos.to(dev), mask, tap=tap)

    def gen_forward(self, prompts, codes, z, t, drop_rep=None, tap=None):
        """Teacher-forced generation pass.
        prompts: B lists of byte ids. codes (B, n) rep ids, or (B, n, D_vit) features with
        continuous targets (n <= N; None or n=0 with rf off).
        z (B, M, p*p*3) noisy patches at time t (B,), or None for a rep-only prefix.
        Returns rep_readout (B, n+1, K or D) at [BOR], r_1..r_n (None with rf off) and
        x_pred (B, M, p*p*3) (None without pixels); with `tap`, also the pixel tokens'
        residual stream (B, M, D) after `tap` blocks."""
        n = 0 if codes is None else codes.shape[1]
        lay = self.gen_layout(prompts, n, 0 if z is None else self.n_pix)
        h = self.trunk(lay, self.embed(lay, codes=codes, z=z, t=t), drop_rep, tap)
        if tap is not None:
            h, tapped = h
        rep_out = x_pred = None
        if self.cfg.rf:
            c = lay.rep_cols
            rep_out = self.rep_readout(h[:, c.start - 1:c.stop])                   # (B, n+1, K or D)
        if z is not None:
            x_pred = self.pix_head(h[:, lay.pix_cols])                             # (B, M, p*p*3)
        return (rep_out, x_pred) if tap is None else (rep_out, x_pred, tapped[:, lay.pix_cols])

    def vit_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, V, D_vit) normed patch features of the online encoder."""
        return self.vit(images)["x_norm_patchtokens"]

    def und_forward(self, images, questions, answers, eos: bool = True):
        """Returns text logits (B, L, vocab) and the layout (for its targets)."""
        lay = self.und_layout(questions, answers, eos)
        h = self.trunk(lay, self.embed(lay, vit_tokens=self.vit_tokens(images)))
        return self.lm_head(h), lay

    # ---- losses -------------------------------------------------------------------------
    def gen_loss(self, prompts, images, codes, t, eps, drop_text, drop_rep, rep_t=None, rep_eps=None,
                 align=None):
        """L_Rep and L_FM on a generation batch. images (B, 3, H, W) in [-1, 1];
        codes: targets from RepresentationTargets, (B, N) ids or (B, N, D_vit) features
        (None with rf off); t (B,); eps like the patches; drop_text, drop_rep (B,) bool
        CFG drops. Continuous targets also take the head's noise draws rep_t
        (B, DIFF_MUL, N) and rep_eps (B, DIFF_MUL, N, D_vit); REPA takes align
        (B, M, D_vit), the encoder features on the pixel grid, and returns its loss,
        weighted, in place of L_Rep."""
        prompts = [[] if d else p for p, d in zip(prompts, drop_text.tolist())]
        x = patchify(images, self.cfg.patch_size)                                  # (B, M, P)
        z = add_noise(x, t, eps)
        tap = (self.cfg.repa_depth or self.cfg.mot.depth // 2) if self.cfg.repa_weight else None
        rep_out, x_pred, *tapped = self.gen_forward(prompts, codes, z, t, drop_rep, tap)
        l_fm = fm_loss(x_pred, x, eps, z, t, self.cfg.flow.t_eps)
        l_rep = x.new_zeros(())
        if self.continuous:
            l_rep = self.rep_head.loss(rep_out[:, :-1], codes, rep_t, rep_eps, self.cfg.flow.t_eps)
        elif self.cfg.rf:
            K = self.cfg.vq.codebook_size
            l_rep = F.cross_entropy(rep_out[:, :-1].reshape(-1, K).float(), codes.reshape(-1))
        if tap is not None:
            l_rep = l_rep + self.cfg.repa_weight * repa_loss(self.repa_proj(tapped[0]), align)
        return l_rep, l_fm

    def und_loss(self, images, questions, answers):
        """L_LM: per-example mean next-token CE on the answer and [EOS], averaged over examples."""
        logits, lay = self.und_forward(images, questions, answers)
        tgt = lay.targets.to(logits.device)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten().clamp_min(0), reduction="none")
        ce = ce.view_as(tgt) * (tgt >= 0)
        per_example = ce.sum(1) / (tgt >= 0).sum(1).clamp_min(1)
        return per_example.mean()

    def question_ids(self, question: str) -> list[int]:
        """A question as sequences hold it: its bytes and one space, then the answer."""
        return self.tok.encode(question + " ", self.cfg.max_text_len)

    def forward(self, gen: dict, und: dict | None = None):
        """One training micro-batch -> (L = L_LM + L_Rep + L_FM, {"lm", "rep", "fm"} detached).
        gen: keyword arguments of gen_loss; und: of und_loss, or None for no understanding."""
        l_rep, l_fm = self.gen_loss(**gen)
        l_lm = self.und_loss(**und) if und is not None else l_fm.new_zeros(())
        parts = {"lm": l_lm.detach(), "rep": l_rep.detach(), "fm": l_fm.detach()}
        return l_lm + l_rep + l_fm, parts


class RepresentationTargets(nn.Module):
    """The EMA copy of the encoder and the online VQ that turn a clean image into
    N discrete target ids (PAPER §3). Not part of RFModel: it has no gradient, is not
    averaged into the sampling EMA, and is not needed to sample.
    The ablations read the same EMA features: continuous targets skip the VQ; REPA pools
    them to the pixel-patch grid (`align`)."""

    def __init__(self, cfg: ModelConfig, vit: ViT):
        super().__init__()
        self.cfg = cfg
        self.encoder = EMAEncoder(vit, cfg.vq.pool)
        self.vq = OnlineVQ(cfg.vit.dim, cfg.vq) if cfg.rf and cfg.rep_target == "discrete" else None
        self.decay = cfg.vq.encoder_ema

    @torch.no_grad()
    def forward(self, images: torch.Tensor, update: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N) code ids, raster order over the pooled grid; with
        continuous targets, the features x = sqrt(D) f (B, N, D) instead."""
        z = self.encoder.features(images)                                          # (B, N, D), unit norm
        B, N, D = z.shape
        if self.vq is None:
            return z * D ** 0.5
        return self.vq(z.reshape(B * N, D), update=update).view(B, N)

    @torch.no_grad()
    def align(self, images: torch.Tensor) -> torch.Tensor:
        """REPA's targets: (B, 3, H, W) -> unit features (B, M, D) on the pixel-patch grid."""
        return self.encoder.features(images, pool=self.cfg.patch_size // self.cfg.vit.patch_size)

    @torch.no_grad()
    def ema_update(self, vit: ViT):
        self.encoder.update(vit, self.decay)


def images_to_tensor(images) -> torch.Tensor:
    """List of (H, W, 3) uint8 arrays -> (B, 3, H, W) float in [-1, 1] (PAPER: pixel space)."""
    import numpy as np
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 arrays."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())
