"""Sampling: text -> representation tokens -> pixels, and image -> text (PAPER §5).

Text to image, in two stages:
  1. representation tokens r_1..r_N autoregressively from the prompt, raster order,
     top-k / temperature sampling with CFG on the logits:
         l = l_u + w_rep * (l_c - l_u),     l_u: the prompt dropped (PAPER: w_rep = 2.0)
  2. pixels by integrating the flow ODE from noise (t = 0) to the image (t = 1) with the
     prompt and the sampled r in context, CFG on both conditions jointly:
         v = v(0, 0) + w_pix * (v(c, r) - v(0, 0))       (PAPER: w_pix = 3.0)
     where v(0, 0) drops the prompt and hides r from the pixel block, exactly as the
     two independent training drops do. Guidance is applied for t inside cfg_interval.
Image to text: greedy or top-k decoding of an answer to a question about an image.

This is the plain reference: every new token and every ODE step re-runs the whole
sequence through the model. It is slow but has nothing to get wrong, which makes it the
yardstick for any cached fast path.

The conditional and unconditional branches run as one batch of 2B sequences.
"""

from __future__ import annotations

import torch

from .flow import ode_step, resolution_shift, time_grid, velocity
from .model import RFModel, unpatchify
from .mot import PIX, REP, UND, KVCache


def sample_logits(logits: torch.Tensor, top_k: int = 0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) ids. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def draw_rep(model: RFModel, out: torch.Tensor, B: int, cfg_rep: float, top_k: int, temperature: float,
             steps: int, generator=None) -> torch.Tensor:
    """The next rep token of B sequences from the readout at their last position,
    out (B, K or D), or (2B, ..) with the prompt-dropped rows second when guided.
    Discrete: ids (B,) from l_u + w_rep (l_c - l_u). Continuous (Table 3c): features
    (B, D_vit) from the diffusion head's ODE, guided the same way on its velocity."""
    guided = cfg_rep != 1.0 and out.shape[0] > B
    if getattr(model, "continuous", False):
        return model.rep_head.sample(out if guided else out[:B], B, cfg_rep, steps, generator)
    logits = out.float()
    if guided:
        logits = logits[B:] + cfg_rep * (logits[:B] - logits[B:])
    return sample_logits(logits[:B], top_k, temperature, generator)


def rep_buffer(model: RFModel, rows: int, n: int, device) -> torch.Tensor:
    """Zeros to hold n rep tokens per row: ids (rows, n), or continuous features (rows, n, D_vit)."""
    if getattr(model, "continuous", False):
        return torch.zeros(rows, n, model.cfg.vit.dim, device=device)
    return torch.zeros(rows, n, dtype=torch.long, device=device)


@torch.no_grad()
def sample_rep_tokens(model: RFModel, prompts: list[list[int]], cfg_rep: float, top_k: int,
                      temperature: float, generator=None, steps: int = 25) -> torch.Tensor:
    """(B, N) representation ids (or (B, N, D_vit) continuous features), one full forward
    per token. steps: ODE steps of the continuous targets' head."""
    B, N = len(prompts), model.n_rep
    dev = next(model.parameters()).device
    guided = cfg_rep != 1.0
    batch = prompts + [[] for _ in prompts] if guided else prompts
    codes = rep_buffer(model, len(batch), 0, dev)
    for _ in range(N):
        out, _ = model.gen_forward(batch, codes, None, None)                       # (B or 2B, n+1, K or D)
        nxt = draw_rep(model, out[:, -1], B, cfg_rep, top_k, temperature, steps, generator)
        nxt = torch.cat([nxt, nxt]) if guided else nxt
        codes = torch.cat([codes, nxt[:, None]], dim=1)
    return codes[:B]


def pixel_branches(cfg_pix: float, cfg_mode: str) -> list[tuple[bool, bool]]:
    """The (keep prompt, hide rep) condition of each batch branch of the pixel ODE.

    joint (paper default): (c, r) and (0, 0);  v = v(0,0) + w (v(c,r) - v(0,0))
    split:  (c, r), (0, 0) and (0, r);  v = v(0,0) + w_r (v(0,r) - v(0,0)) + w (v(c,r) - v(0,r)),
            guiding the rep plan and the prompt with separate weights (InstructPix2Pix-style).
    norep:  (c, 0) and (0, 0): the rep tokens are sampled but hidden from the pixel block,
            to see what the pixels do from the prompt alone (a diagnostic, nanorf.probe).
    """
    if cfg_mode == "norep":
        return [(True, True)] if cfg_pix == 1.0 else [(True, True), (False, True)]
    if cfg_pix == 1.0:
        return [(True, False)]
    if cfg_mode == "joint":
        return [(True, False), (False, True)]
    if cfg_mode == "split":
        return [(True, False), (False, True), (False, False)]
    raise ValueError(f"unknown cfg_mode {cfg_mode!r}; use 'joint', 'split' or 'norep'")


def guide(v: torch.Tensor, n: int, t: float, opt: dict) -> torch.Tensor:
    """Combine the branch velocities (stacked, n rows each) by the formula of pixel_branches."""
    chunks = v.split(n)
    if len(chunks) == 1:
        return v
    inside = opt["cfg_interval"][0] <= t <= opt["cfg_interval"][1]
    w = opt["cfg_pix"] if inside else 1.0
    if len(chunks) == 2:
        v_c, v_u = chunks
        return v_u + w * (v_c - v_u)
    v_c, v_u, v_r = chunks
    w_r = opt["cfg_pix_rep"] if inside else 1.0
    return v_u + w_r * (v_r - v_u) + w * (v_c - v_r)


@torch.no_grad()
def sample_pixels(model: RFModel, prompts: list[list[int]], codes: torch.Tensor | None,
                  steps: int, cfg_pix: float, solver: str = "euler", shift: float = 0.0,
                  cfg_interval=(0.0, 1.0), generator=None, cfg_mode: str = "joint",
                  cfg_pix_rep: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1]; one full forward per ODE evaluation."""
    cfg = model.cfg
    B, M, P = len(prompts), model.n_pix, cfg.patch_size ** 2 * 3
    dev = next(model.parameters()).device
    shift = shift or resolution_shift(cfg.image_size)
    z = torch.randn(B, M, P, generator=generator).to(dev) * cfg.flow.noise_scale
    branches = pixel_branches(cfg_pix, cfg_mode)
    batch = [p if keep else [] for keep, _ in branches for p in prompts]
    drop_rep = torch.tensor([hide for _, hide in branches for _ in prompts])
    if codes is not None:
        codes = codes.repeat(len(branches), *[1] * (codes.dim() - 1))             # ids or features
    opt = {"cfg_pix": cfg_pix, "cfg_pix_rep": cfg_pix_rep, "cfg_interval": cfg_interval}

    def v_fn(z, t):
        zz = z.repeat(len(branches), 1, 1)
        tt = torch.full((zz.shape[0],), t, device=dev)
        _, x_pred = model.gen_forward(batch, codes, zz, tt, drop_rep)
        # no (1 - t) clamp here: t < 1 at every evaluation, and the training clamp would
        # make the last Euler step stop short of the predicted image
        return guide(velocity(x_pred.float(), zz, tt, 1e-6), B, t, opt)

    ts = time_grid(steps, shift).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = ode_step(v_fn, z, t0, t1, solver)
    g = cfg.grid
    return unpatchify(z, cfg.patch_size, g, g).clamp(-1, 1)


# ---- the fast path: KV cache for the prefix, cached prefix for every ODE step -----------------

def _step(model: RFModel, cache: KVCache, x, modality: int, pos, mask, write: bool):
    """Run n new embedded tokens (B, n, D) of one type against the cache; optionally append them."""
    B, n, _ = x.shape
    mod = torch.full((B, n), modality, dtype=torch.long, device=x.device)
    h = model.mot(x, mod, pos.expand(B, n), mask.to(x.device), cache=cache, write=write)
    if write:
        cache.commit(torch.ones(B, n, dtype=torch.bool, device=x.device), mod)
    return h


def prefill(model: RFModel, lay, x: torch.Tensor, room: int):
    """Run a whole layout (embedded as x (B, L, D)) into a fresh cache with `room` more
    columns for what gets appended later. Returns (hidden (B, L, D), cache)."""
    dev = x.device
    cache = KVCache(model.cfg.mot.depth, lay.tokens.shape[1] + room)
    h = model.mot(x, lay.modality.to(dev), lay.pos.to(dev), lay.mask().to(dev), cache=cache, write=True)
    cache.commit(lay.valid.to(dev), lay.modality.to(dev))
    return h, cache


@torch.no_grad()
def sample_cached(model: RFModel, prompts: list[list[int]], opt: dict, generator=None):
    """Same distribution and, for the same generator, the same draws as the reference
    path (rep tokens, then pixels), with each token and each prefix computed once.

    The conditional and unconditional branches are the halves of one 2B batch, each
    row with its own cache entries: cond rows hold the prompt, uncond rows an empty
    prompt, and both the same sampled rep tokens. For the pixel ODE the rows are
    arranged into the guidance branches (pixel_branches); a branch that drops the rep
    sequence hides it from [BOP] and the pixel block (hide_rep), exactly as the
    reference's drop_rep mask."""
    cfg, tok = model.cfg, model.tok
    dev = next(model.parameters()).device
    B, N, M, P = len(prompts), model.n_rep, model.n_pix, cfg.patch_size ** 2 * 3
    two = opt["cfg_rep"] != 1.0 or opt["cfg_pix"] != 1.0  # the cache holds cond and uncond rows
    batch = prompts + [[] for _ in prompts] if two else prompts
    R = len(batch)

    # prefill: [PAD..] [BOS] prompt ([BOR] with rf)
    lay = model.gen_layout(batch, 0, 0)
    h, cache = prefill(model, lay, model.embed(lay), N + 1)
    pos = lay.pos[:, -1:].to(dev) + 1                                              # (R, 1) next position

    codes = None
    if cfg.rf:
        codes = rep_buffer(model, R, N, dev)
        last = h[:, -1]                                                            # [BOR]'s hidden (R, D)
        for i in range(N):
            nxt = draw_rep(model, model.rep_readout(last), B, opt["cfg_rep"], opt["top_k"], opt["temperature"],
                           opt["steps"], generator)                                # (B,) or (B, D_vit)
            codes[:, i] = torch.cat([nxt, nxt]) if two else nxt
            h = _step(model, cache, model.embed_rep(codes[:, i:i + 1], i), REP, pos,
                      cache.mask(1, bidir=False), write=True)
            last, pos = h[:, -1], pos + 1
    # the pixel branches: cache rows 0..B-1 hold the prompt, B..2B-1 the empty prompt
    branches = pixel_branches(opt["cfg_pix"], opt["cfg_mode"])
    rows = torch.cat([torch.arange(B) + (0 if keep else B) for keep, _ in branches]).to(dev)
    hide = torch.tensor([hidden for _, hidden in branches for _ in range(B)], device=dev)
    if not torch.equal(rows, torch.arange(R, device=dev)):
        cache.select(rows)
        pos = pos[rows]
    R = len(rows)
    # [BOP]: causal, of the pixel expert; in the rep-dropped rows it cannot see the rep tokens
    bop = model.tok_emb(torch.full((R, 1), tok.bop, device=dev))
    _step(model, cache, bop, PIX, pos, cache.mask(1, bidir=False, hide_rep=hide), write=True)
    pos = pos + 1

    # the pixel ODE: each evaluation runs only the M pixel tokens against the fixed prefix
    shift = opt["shift"] or resolution_shift(cfg.image_size)
    z = torch.randn(B, M, P, generator=generator).to(dev) * cfg.flow.noise_scale
    pix_mask = cache.mask(M, bidir=True, hide_rep=hide)

    def v_fn(z, t):
        zz = z.repeat(len(branches), 1, 1)
        tt = torch.full((R,), t, device=dev)
        h = _step(model, cache, model.embed_pix(zz, tt), PIX, pos, pix_mask, write=False)
        return guide(velocity(model.pix_head(h).float(), zz, tt, 1e-6), B, t, opt)

    ts = time_grid(opt["steps"], shift).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = ode_step(v_fn, z, t0, t1, opt["solver"])
    g = cfg.grid
    return unpatchify(z, cfg.patch_size, g, g).clamp(-1, 1), (None if codes is None else codes[:B])


SAMPLING_FIELDS = ("steps", "solver", "shift", "cfg_pix", "cfg_rep", "cfg_interval", "cfg_mode", "cfg_pix_rep",
                   "top_k", "temperature")


@torch.no_grad()
def text_to_image(model: RFModel, prompts: list[str], generator=None, kv_cache: bool = True, **overrides):
    """Prompts -> (images (B, 3, H, W) in [-1, 1], rep codes (B, N) or None).
    kv_cache=False runs the uncached reference path. overrides: any FlowConfig
    sampling field (steps, cfg_pix, cfg_rep, top_k, ...)."""
    f = model.cfg.flow
    opt = {k: overrides.get(k, getattr(f, k)) for k in SAMPLING_FIELDS}
    ids = [model.tok.encode(p, model.cfg.max_text_len) for p in prompts]
    if kv_cache:
        return sample_cached(model, ids, opt, generator)
    codes = None
    if model.cfg.rf:
        codes = sample_rep_tokens(model, ids, opt["cfg_rep"], opt["top_k"], opt["temperature"], generator,
                                  opt["steps"])
    images = sample_pixels(model, ids, codes, opt["steps"], opt["cfg_pix"], opt["solver"], opt["shift"],
                           opt["cfg_interval"], generator, opt["cfg_mode"], opt["cfg_pix_rep"])
    return images, codes


@torch.no_grad()
def answer(model: RFModel, images: torch.Tensor, questions: list[str], max_new_tokens: int = 72,
           top_k: int = 0, temperature: float = 0.0, generator=None, kv_cache: bool = True) -> list[str]:
    """Image -> text. images (B, 3, H, W) in [-1, 1]; greedy when temperature is 0.
    With kv_cache the image and question are prefilled once and each answer byte costs
    one token's forward; without it every byte re-runs the whole sequence (reference)."""
    tok = model.tok
    qs = [model.question_ids(q) for q in questions]
    B, dev = len(qs), images.device
    outs: list[list[int]] = [[] for _ in qs]
    done = [False] * B
    rows = torch.arange(B, device=dev)
    if kv_cache:  # prefill [BOS][BOI] v [EOI] question, right-padded
        lay = model.und_layout(qs, [[] for _ in qs], eos=False)
        h, cache = prefill(model, lay, model.embed(lay, vit_tokens=model.vit_tokens(images)), max_new_tokens)
        last = (lay.valid.sum(1) - 1).to(dev)                                      # (B,) last real column
        pos = lay.pos.to(dev)[rows, last][:, None] + 1                              # (B, 1)
        logits = model.lm_head(h[rows, last])
    for step in range(max_new_tokens):
        if not kv_cache:
            full, lay = model.und_forward(images, qs, outs, eos=False)
            logits = full[rows, (lay.valid.sum(1) - 1).to(dev)]
        nxt = sample_logits(logits, top_k, temperature, generator)                 # (B,)
        for b, c in enumerate(nxt.tolist()):
            if not done[b]:
                if c == tok.eos or c >= tok.n_bytes:
                    done[b] = True
                else:
                    outs[b].append(c)
        if all(done) or step == max_new_tokens - 1:
            break
        if kv_cache:  # finished rows keep decoding into the void; their bytes are ignored
            h = _step(model, cache, model.tok_emb(nxt[:, None]), UND, pos, cache.mask(1, bidir=False), write=True)
            logits, pos = model.lm_head(h[:, 0]), pos + 1
    return [tok.decode(o) for o in outs]


def save_grid(images, path, ncol: int = 8, scale: int = 1, pad: int = 2):
    """Write a list of (H, W, 3) uint8 images as one PNG grid (nearest upscaling by `scale`),
    atomically: to a temporary name first, then renamed."""
    import os
    import numpy as np
    from PIL import Image
    n = len(images)
    ncol = min(ncol, n)
    nrow = (n + ncol - 1) // ncol
    h, w = images[0].shape[:2]
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = str(path)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
