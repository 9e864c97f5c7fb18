"""Sampling: text -> representation tokens -> pixels, and image -> text (docs/method.md, "Sampling").

Text to image, in two stages:
  1. representation tokens r_1..r_N autoregressively from the prompt, raster order,
     top-k / temperature sampling with CFG on the logits:
         l = l_u + w_rep * (l_c - l_u),     l_u: the prompt dropped (paper: w_rep = 2.0)
  2. pixels by integrating the flow ODE from noise (t = 0) to the image (t = 1) with the
     prompt and the sampled r in context, CFG on both conditions jointly:
         v = v(0, 0) + w_pix * (v(c, r) - v(0, 0))       (paper: w_pix = 3.0)
     where v(0, 0) drops the prompt and hides r from the pixel block, exactly as the
     two independent training drops do ("Classifier-free guidance"). Guidance is applied
     for t inside cfg_interval.
Image to text: greedy or top-k decoding of an answer to a question about an image.

Two implementations of text to image, which draw the same numbers from the same generator:
  reference  `sample_rep_tokens` + `sample_pixels`: every new token and every ODE step re-runs
             the whole sequence. Slow, but nothing to get wrong: the yardstick.
  cached     `sample_cached`: the prompt and rep tokens go through a KV cache once, and each
             ODE evaluation runs only the M pixel tokens against the cached prefix.
Both take one `SamplingSettings` (config.py) and share the ODE loop (`integrate`) and the
guidance formula (`pixel_branches`, `guide`). The conditional and unconditional branches
run as one batch. Both paint at any size whose sides are multiples of
ModelConfig.size_multiple (`size=(H, W)`; default the config's square canvas): the grids
come from ModelConfig.grids and the positions from normalised image coordinates (model.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint import atomic_path
from .config import SamplingSettings
from .flow import ode_step, renoise_step, resolution_shift, time_grid, velocity
from .layout import Layout
from .model import RFModel
from .rep_tokens import sample_logits
from .patches import unpatchify
from .mot import PIX, REP, UND, KVCache


def settings_for(model: RFModel, settings: SamplingSettings | None = None, **overrides) -> SamplingSettings:
    """The model's default sampling settings (or `settings`), with any field overridden."""
    return replace(settings or model.cfg.sample, **overrides)


@torch.no_grad()
def sample_rep_tokens(model: RFModel, prompts: list[list[int]], s: SamplingSettings,
                      generator=None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reference: (B, N) representation tokens, one full forward per token."""
    B, N = len(prompts), model.cfg.grids(size).n_rep
    dev = next(model.parameters()).device
    guided = s.cfg_rep != 1.0
    batch = prompts + [[] for _ in prompts] if guided else prompts
    codes = model.rep.buffer(len(batch), 0, dev)
    for _ in range(N):
        out = model.gen_forward(batch, codes, None, None, size=size).rep                      # (B or 2B, n+1, ..)
        nxt = model.rep.draw(out[:, -1], B, s.cfg_rep, s, generator)
        nxt = torch.cat([nxt, nxt]) if guided else nxt
        codes = torch.cat([codes, nxt[:, None]], dim=1)
    return codes[:B]


def pixel_branches(cfg_pix: float, cfg_mode: str) -> list[tuple[bool, bool]]:
    """The (keep prompt, hide rep) condition of each batch branch of the pixel ODE.

    joint (paper default): (c, r) and (0, 0);  v = v(0,0) + w (v(c,r) - v(0,0))
    split:  (c, r), (0, 0) and (0, r);  v = v(0,0) + w_r (v(0,r) - v(0,0)) + w (v(c,r) - v(0,r)),
            guiding the rep plan and the prompt with separate weights (InstructPix2Pix-style).
    norep:  (c, 0) and (0, 0): the rep tokens are sampled but hidden from the pixel block,
            to see what the pixels do from the prompt alone (a diagnostic, experiments.probe).
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


def guide(v: torch.Tensor, n: int, t: float, s: SamplingSettings) -> torch.Tensor:
    """Combine the branch velocities (stacked, n rows each) by the formula of pixel_branches."""
    chunks = v.split(n)
    if len(chunks) == 1:
        return v
    inside = s.cfg_interval[0] <= t <= s.cfg_interval[1]
    w = s.cfg_pix if inside else 1.0
    if len(chunks) == 2:
        v_c, v_u = chunks
        return v_u + w * (v_c - v_u)
    v_c, v_u, v_r = chunks
    w_r = s.cfg_pix_rep if inside else 1.0
    return v_u + w_r * (v_r - v_u) + w * (v_c - v_r)


def add_sampling_args(p) -> None:
    """The command-line flags of sample.py and nanorf.eval that override the checkpoint's
    SamplingSettings, one field each; a flag left unset keeps the checkpoint's value."""
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the checkpoint's; the paper's 25, the toy's 100)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help="ODE solver for the steps before --renoise-from (those after it are stochastic whatever the solver)")
    p.add_argument("--renoise-from", type=float, default=None, metavar="T",
                   help="steps from t >= T re-noise the x-prediction afresh instead of following the ODE "
                        "(1 = never; the toy's 0.7)")
    p.add_argument("--cfg-pix", type=float, default=None, help="pixel guidance w_pix (paper 3.0; 1 = off)")
    p.add_argument("--cfg-rep", type=float, default=None, help="rep-token logit guidance w_rep (paper 2.0; 1 = off)")
    p.add_argument("--cfg-mode", choices=("joint", "split", "norep"), default=None,
                   help="pixel guidance formula: joint (paper), split (separate weight for the rep plan), "
                        "or norep (rep tokens hidden from the pixels, a diagnostic)")
    p.add_argument("--cfg-pix-rep", type=float, default=None, help="with --cfg-mode split: weight of the rep plan")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T0", "T1"),
                   help="apply pixel guidance only for t in [T0, T1] (t = 1 is clean)")
    p.add_argument("--top-k", type=int, default=None, help="rep-token top-k (0 = all codes)")
    p.add_argument("--temperature", type=float, default=None, help="rep-token temperature")


def sampling_overrides(args) -> dict:
    """The SamplingSettings fields set by add_sampling_args' flags: {field: value}."""
    vals = {"steps": args.steps, "solver": args.solver, "renoise_from": args.renoise_from,
            "cfg_pix": args.cfg_pix, "cfg_rep": args.cfg_rep,
            "cfg_mode": args.cfg_mode, "cfg_pix_rep": args.cfg_pix_rep, "top_k": args.top_k,
            "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None,
            "temperature": args.temperature}
    return {k: v for k, v in vals.items() if v is not None}


def sampling_argv(overrides: dict) -> list[str]:
    """The add_sampling_args flags that give `overrides` ({field: value}) back through
    sampling_overrides: for a driver that runs sample.py or nanorf.eval in a subprocess."""
    argv = []
    for k, v in overrides.items():
        argv += [f"--{k.replace('_', '-')}", *(str(x) for x in (v if isinstance(v, (tuple, list)) else [v]))]
    return argv


def integrate(model: RFModel, v_fn, B: int, s: SamplingSettings, generator=None,
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """The pixel ODE of both paths: noise z (B, M, p*p*3) at t = 0, `s.steps` steps of
    dz/dt = v_fn(z, t) on the shifted grid, then (B, 3, H, W) images in [-1, 1]. Steps that
    start at t >= s.renoise_from are stochastic instead (flow.renoise_step): fresh noise from
    the same generator, after the initial noise, so both paths draw alike."""
    cfg, g = model.cfg, model.cfg.grids(size)
    dev = next(model.parameters()).device
    z = torch.randn(B, g.n_pix, cfg.patch_size ** 2 * 3, generator=generator).to(dev) * cfg.flow.noise_scale
    side = (g.size[0] * g.size[1]) ** 0.5  # the shift follows the pixel count: a square of the same area
    ts = time_grid(s.steps, s.shift or resolution_shift(side)).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        if t0 >= s.renoise_from:
            z = renoise_step(v_fn, z, t0, t1, cfg.flow.noise_scale, generator)
        else:
            z = ode_step(v_fn, z, t0, t1, s.solver)
    return unpatchify(z, cfg.patch_size, *g.pix).clamp(-1, 1)


@torch.no_grad()
def sample_pixels(model: RFModel, prompts: list[list[int]], codes: torch.Tensor | None, s: SamplingSettings,
                  generator=None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reference: (B, 3, H, W) images in [-1, 1]; one full forward per ODE evaluation."""
    B, dev = len(prompts), next(model.parameters()).device
    branches = pixel_branches(s.cfg_pix, s.cfg_mode)
    batch = [p if keep else [] for keep, _ in branches for p in prompts]
    drop_rep = torch.tensor([hide for _, hide in branches for _ in prompts])
    if codes is not None:
        codes = codes.repeat(len(branches), *[1] * (codes.dim() - 1))             # (len(branches) B, N, ..)

    def v_fn(z, t):
        zz = z.repeat(len(branches), 1, 1)
        tt = torch.full((zz.shape[0],), t, device=dev)
        x_pred = model.gen_forward(batch, codes, zz, tt, drop_rep, size=size).x_pred
        # no (1 - t) clamp here: t < 1 at every evaluation, and the training clamp would
        # make the last Euler step stop short of the predicted image
        return guide(velocity(x_pred.float(), zz, tt, 1e-6), B, t, s)

    return integrate(model, v_fn, B, s, generator, size)


# ---- the fast path: KV cache for the prefix, cached prefix for every ODE step -----------------

def step_tokens(model: RFModel, cache: KVCache, x, modality: int, pos, mask, write: bool):
    """Run n new embedded tokens (B, n, D) of one type against the cache; optionally append them."""
    B, n, _ = x.shape
    mod = torch.full((B, n), modality, dtype=torch.long, device=x.device)
    h = model.mot(x, mod, pos.expand(B, n), mask.to(x.device), cache=cache, write=write)
    if write:
        cache.commit(torch.ones(B, n, dtype=torch.bool, device=x.device), mod)
    return h


def prefill(model: RFModel, lay: Layout, x: torch.Tensor, room: int):
    """Run a whole layout (embedded as x (B, L, D)) into a fresh cache with `room` more
    columns for what gets appended later. Returns (hidden (B, L, D), cache)."""
    dev = x.device
    cache = KVCache(model.cfg.mot.depth, lay.tokens.shape[1] + room)
    h = model.mot(x, lay.modality.to(dev), lay.pos.to(dev), lay.mask().to(dev), cache=cache, write=True)
    cache.commit(lay.valid.to(dev), lay.modality.to(dev))
    return h, cache


@torch.no_grad()
def sample_cached(model: RFModel, prompts: list[list[int]], s: SamplingSettings, generator=None,
                  size: tuple[int, int] | None = None):
    """Same distribution and, for the same generator, the same draws as the reference
    path (rep tokens, then pixels), with each token and each prefix computed once.

    The conditional and unconditional branches are the halves of one 2B batch, each
    row with its own cache entries: cond rows hold the prompt, uncond rows an empty
    prompt, and both the same sampled rep tokens. For the pixel ODE the rows are
    arranged into the guidance branches (pixel_branches); a branch that drops the rep
    sequence hides it from [BOP] and the pixel block (hide_rep), exactly as the
    reference's drop_rep mask. Returns (images (B, 3, H, W), rep tokens or None)."""
    tok, dev = model.tok, next(model.parameters()).device
    g = model.cfg.grids(size)
    B, N, M = len(prompts), g.n_rep, g.n_pix
    two = s.cfg_rep != 1.0 or s.cfg_pix != 1.0  # the cache holds cond and uncond rows
    batch = prompts + [[] for _ in prompts] if two else prompts
    R = len(batch)

    # prefill: [PAD..] [BOS] prompt ([BOR] with rf)
    lay = model.gen_layout(batch, 0, 0)
    h, cache = prefill(model, lay, model.embed(lay), N + 1)
    pos = lay.pos[:, -1:].to(dev) + 1                                              # (R, 1) next position

    codes = None
    if model.rep is not None:
        codes = model.rep.buffer(R, N, dev)
        last = h[:, -1]                                                            # [BOR]'s hidden (R, D)
        for i in range(N):
            nxt = model.rep.draw(model.rep.readout(last), B, s.cfg_rep, s, generator)
            codes[:, i] = torch.cat([nxt, nxt]) if two else nxt
            h = step_tokens(model, cache, model.embed_rep(codes[:, i:i + 1], i, g.rep), REP, pos,
                            cache.mask(1, bidir=False), write=True)
            last, pos = h[:, -1], pos + 1
    # the pixel branches: cache rows 0..B-1 hold the prompt, B..2B-1 the empty prompt
    branches = pixel_branches(s.cfg_pix, s.cfg_mode)
    rows = torch.cat([torch.arange(B) + (0 if keep else B) for keep, _ in branches]).to(dev)
    hide = torch.tensor([hidden for _, hidden in branches for _ in range(B)], device=dev)
    if not torch.equal(rows, torch.arange(R, device=dev)):
        cache.select(rows)
        pos = pos[rows]
    R = len(rows)
    # [BOP]: causal, of the pixel expert; in the rep-dropped rows it cannot see the rep tokens
    bop = model.tok_emb(torch.full((R, 1), tok.bop, device=dev))
    step_tokens(model, cache, bop, PIX, pos, cache.mask(1, bidir=False, hide_rep=hide), write=True)
    pos = pos + 1

    # the pixel ODE: each evaluation runs only the M pixel tokens against the fixed prefix
    pix_mask = cache.mask(M, bidir=True, hide_rep=hide)

    def v_fn(z, t):
        zz = z.repeat(len(branches), 1, 1)
        tt = torch.full((R,), t, device=dev)
        h = step_tokens(model, cache, model.embed_pix(zz, tt, g.pix), PIX, pos, pix_mask, write=False)
        return guide(velocity(model.predict_x(h, zz).float(), zz, tt, 1e-6), B, t, s)

    images = integrate(model, v_fn, B, s, generator, size)
    return images, (None if codes is None else codes[:B])


@torch.no_grad()
def text_to_image(model: RFModel, prompts: list[str], generator=None, kv_cache: bool = True,
                  settings: SamplingSettings | None = None, size: tuple[int, int] | None = None,
                  **overrides):
    """Prompts -> (images (B, 3, H, W) in [-1, 1], rep tokens (B, N) or None).
    kv_cache=False runs the uncached reference path. settings: a SamplingSettings (default:
    the model's); size: (H, W), default the config's square canvas; overrides: any
    SamplingSettings field (steps=10, cfg_pix=1.0, ...)."""
    s = settings_for(model, settings, **overrides)
    model.cfg.grids(size)  # a size that does not fit fails here, before any work
    ids = [model.tok.encode(p, model.cfg.max_text_len) for p in prompts]
    if kv_cache:
        return sample_cached(model, ids, s, generator, size)
    codes = sample_rep_tokens(model, ids, s, generator, size) if model.rep is not None else None
    return sample_pixels(model, ids, codes, s, generator, size), codes


@torch.no_grad()
def answer(model: RFModel, images: torch.Tensor, questions: list[str], max_new_tokens: int = 72,
           top_k: int = 0, temperature: float = 0.0, generator=None, kv_cache: bool = True) -> list[str]:
    """Image -> text. images (B, 3, H, W) in [-1, 1], any size that fits the model; greedy when
    temperature is 0.
    With kv_cache the image and question are prefilled once and each answer byte costs
    one token's forward; without it every byte re-runs the whole sequence (reference)."""
    tok = model.tok
    qs = [model.question_ids(q) for q in questions]
    B, dev = len(qs), images.device
    outs: list[list[int]] = [[] for _ in qs]
    done = [False] * B
    rows = torch.arange(B, device=dev)
    if kv_cache:  # prefill [BOS][BOI] v [EOI] question, right-padded
        g = model.cfg.grids(images.shape[-2:])
        lay = model.und_layout(qs, [[] for _ in qs], eos=False, n_vit=g.n_vit)
        h, cache = prefill(model, lay, model.embed(lay, vit_tokens=model.vit_tokens(images), grids=g), max_new_tokens)
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
                if c == tok.eos or tok.is_special(c):
                    done[b] = True
                else:
                    outs[b].append(c)
        if all(done) or step == max_new_tokens - 1:
            break
        if kv_cache:  # finished rows keep decoding into the void; their bytes are ignored
            h = step_tokens(model, cache, model.tok_emb(nxt[:, None]), UND, pos, cache.mask(1, bidir=False), write=True)
            logits, pos = model.lm_head(h[:, 0]), pos + 1
    return [tok.decode(o) for o in outs]


def draw_plan(codes: torch.Tensor, code_patches: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A plan of rep tokens drawn as a coarse preview: (B, N) codes on an h x w grid
    (default square) -> (B, 3, h*s, w*s) images in [-1, 1], each code as its mean training
    patch (code_patches (K, s*s*3) in patchify's layout, RepresentationTargets keeps it with
    the codebook)."""
    if grid is None:
        g = int(round(codes.shape[1] ** 0.5))
        grid = (g, g)
    s = int(round((code_patches.shape[1] // 3) ** 0.5))
    return unpatchify(code_patches[codes.cpu()], s, *grid)                        # (B, N, s*s*3) -> images


def save_grid(images, path, ncol: int = 8, scale: int = 1, pad: int = 2):
    """Write a list of (H, W, 3) uint8 images as one PNG grid (nearest upscaling by `scale`),
    atomically."""
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
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
