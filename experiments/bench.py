"""Benchmark: training throughput against the machine's matmul ceiling, and the fast
sampler against the reference one, measured side by side in one run.

    python -m experiments.bench              # everything (a few minutes on 2 CPU cores)
    python -m experiments.bench --quick      # fewer repeats, only the narrow 1024-px probe, fitted decode

FLOPs are counted analytically from the shapes of the actual padded batch (matmuls
and attention only, 2 FLOPs per multiply-add, backward = 2x forward), so the model
FLOPs utilisation (MFU) is "useful FLOPs / second / the measured matmul ceiling".
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from nanorf.config import apply_overrides
from nanorf.presets import get_config
from nanorf.model import RFModel
from nanorf.targets import RepresentationTargets
from nanorf.mot import PIX
from nanorf.stream import Stream
from nanorf.sampler import prefill, sample_rep_tokens, settings_for, step_tokens, text_to_image


def synchronize(device) -> None:
    """Wait for the device's queued kernels: CUDA runs asynchronously, so a timer read without
    this measures the launches, not the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, dtype=None):
    """torch.autocast to `dtype` on `device`'s type, or nothing when dtype is None (float32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def build(cfg_model, device="cpu") -> RFModel:
    """An RFModel whose parameters are created on `device` (a 760M-parameter paper trunk
    initialises in seconds on a GPU, minutes on a few CPU cores)."""
    with torch.device(device):
        return RFModel(cfg_model).to(device)


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeat` wall-clock seconds of fn() (best-of resists a noisy shared machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_ceiling(n: int = 2048, dtype=torch.float32, device="cpu") -> float:
    """GFLOP/s of an n x n matmul: the roof the training step is measured against."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def mm():
        for _ in range(4):
            a @ b
        sync()
    return 4 * 2 * n ** 3 / timeit(mm) / 1e9


def trunk_flops(tokens: int, seq_len: int, dim: int, depth: int, hidden: int) -> float:
    """Forward FLOPs of `tokens` tokens through the MoT trunk, in sequences of seq_len
    (each token's FFN is one expert's: routing adds no FLOPs)."""
    proj = 2 * (4 * dim * dim + 3 * dim * hidden)       # q, k, v, o and the SwiGLU FFN
    attn = 2 * 2 * seq_len * dim                         # q.k and attn.v over seq_len keys
    return tokens * depth * (proj + attn)


def vit_flops(images: int, cfg) -> float:
    v = cfg.vit
    n = (cfg.image_size // v.patch_size) ** 2 + 1 + v.n_storage_tokens
    per = 2 * (4 * v.dim * v.dim + 2 * v.dim * int(v.dim * v.mlp_ratio)) + 4 * n * v.dim
    return images * (n * v.depth * per + 2 * (cfg.image_size ** 2) * 3 * v.dim)


def train_step_flops(cfg, gen_len: int, und_len: int) -> float:
    """Useful FLOPs of one training step (fwd + bwd) on the configured global batch."""
    m, t = cfg.model, cfg.train
    D, depth = m.mot.dim, m.mot.depth
    hidden = int(D * m.mot.mlp_ratio * 2 / 3) // 8 * 8
    P, K = m.patch_size ** 2 * 3, m.vq.codebook_size
    n_rep = (m.rep_grid ** 2) if m.rf else 0
    gen = trunk_flops(t.batch_size * gen_len, gen_len, D, depth, hidden)
    gen += t.batch_size * (m.grid ** 2) * 2 * 2 * P * D                 # pixel embed + head
    gen += t.batch_size * n_rep * 2 * D * K                             # rep head
    und = trunk_flops(t.und_batch_size * und_len, und_len, D, depth, hidden)
    und += t.und_batch_size * und_len * 2 * D * 264                     # LM head (upper bound: every token)
    und += vit_flops(t.und_batch_size, m)
    targets = vit_flops(t.batch_size, m) if m.rf else 0                  # EMA encoder, forward only
    return 3 * (gen + und) + targets


def bench_train(name: str, overrides=(), repeat: int = 3, device="cpu", dtype=None, warmup: int = 1) -> dict:
    """Time full training steps (targets + forward + backward + AdamW) of a preset on `device`,
    forward and backward under autocast to `dtype` as train.py does on CUDA (None: float32).
    The FLOPs are the same whatever the dtype: MFU is then measured against that dtype's peak."""
    cfg = get_config(name)
    apply_overrides(cfg, list(overrides))
    torch.manual_seed(0)
    device = torch.device(device)
    model = build(cfg.model, device)
    targets = RepresentationTargets(cfg.model, model.vit).to(device) if cfg.model.rf else None
    opt = model.configure_optimizer(cfg.train)
    stream, t = Stream(cfg, model), cfg.train
    gen = stream.gen_batch(0, range(t.batch_size), stream.draws(0), device)
    und = stream.und_batch(0, range(t.und_batch_size), device)
    gen_len = model.gen_layout(gen.prompts, model.n_rep, model.n_pix).tokens.shape[1]
    und_len = model.und_layout(und.questions, und.answers, follow_ups=und.follow_ups).tokens.shape[1]
    amp, losses = autocast(device, dtype), []

    def step():
        if targets is not None:
            targets.label(gen)  # outside autocast, as in train.py: the EMA encoder's targets in float32
        with amp:
            loss, _ = model(gen, und)
            loss.backward()
        losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
    sec = timeit(step, repeat, warmup)
    flops = train_step_flops(cfg, gen_len, und_len)
    tokens = t.batch_size * gen_len + t.und_batch_size * und_len
    return {"name": name, "sec": sec, "tokens_s": tokens / sec, "gflops": flops / sec / 1e9, "flops": flops,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "loss": float(losses[-1])}  # finite: the timed steps trained on real numbers


def bench_sampling(model: RFModel, prompts, steps: int, repeat: int = 2) -> dict:
    """Seconds per image, cached and uncached, same seed, same outputs."""
    run = lambda cache: text_to_image(model, prompts, torch.Generator().manual_seed(0), kv_cache=cache,
                                      steps=steps)
    cached = timeit(lambda: run(True), repeat)
    ref = timeit(lambda: run(False), max(1, repeat - 1), warmup=0)
    return {"cached": cached / len(prompts), "uncached": ref / len(prompts), "ratio": ref / cached}


def uncached_decode_s(m: RFModel, prompt, fit: bool) -> float:
    """Seconds the reference sampler takes to decode m.n_rep rep tokens (batch 1, no CFG):
    token i re-runs a forward over the whole prefix, i rep tokens long. fit=False times
    them all; fit=True times the forwards at 9 prefix lengths and sums a least-squares
    a + b i + c i^2 over all i (linear layers cost ~i, attention ~i^2)."""
    N, dev = m.n_rep, next(m.parameters()).device
    if not fit:
        synchronize(dev)
        t0 = time.perf_counter()
        sample_rep_tokens(m, prompt, settings_for(m, cfg_rep=1.0, top_k=0, temperature=1.0),
                          torch.Generator().manual_seed(0))
        synchronize(dev)
        return time.perf_counter() - t0
    codes = torch.zeros(1, N, dtype=torch.long, device=dev)

    def forward(i):
        m.gen_forward(prompt, codes[:, :i], None, None)
        synchronize(dev)
    xs = torch.linspace(0, N - 1, 9).round().long().tolist()
    ys = [timeit(lambda: forward(i), 2) for i in xs]
    A = torch.tensor([[1.0, i, i * i] for i in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(A, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
    i = torch.arange(N, dtype=torch.float64)
    return float((coef[0] + coef[1] * i + coef[2] * i * i).sum())


def paper1024_probe(dim: int, depth: int, heads: int, fit: bool, device="cpu", dtype=None,
                    overrides=()) -> dict:
    """The paper's 1024-px token counts (1,024 rep tokens, 4,096 pixel patches) on a random
    model that runs here: rep decoding cached vs uncached, and one cached diffusion step
    against the uncached one and against a forward over the pixel block alone. On `device`,
    under autocast to `dtype` (None: float32); `overrides` change anything else (tests shrink
    the token counts with them)."""
    cfg = get_config("paper1024")
    # the ViT and the codebook do not take part in sampling: small ones build faster
    apply_overrides(cfg, [f"model.mot.dim={dim}", f"model.mot.depth={depth}", f"model.mot.heads={heads}",
                          "model.vit.dim=64", "model.vit.depth=1", "model.vit.heads=1", "model.vq.codebook_size=1024",
                          *overrides])
    torch.manual_seed(0)
    dev = torch.device(device)
    m = build(cfg.model, dev).eval()
    out = {"n_rep": m.n_rep, "n_pix": m.n_pix, "dim": dim, "depth": depth, "heads": heads, "fit": fit}
    prompt = [m.tok.encode("a red circle at the top left")]
    with torch.no_grad(), autocast(dev, dtype):
        # cached: prefill, then every token one single-token step
        synchronize(dev)
        t0 = time.perf_counter()
        lay = m.gen_layout(prompt, 0, 0)
        _, cache = prefill(m, lay, m.embed(lay), m.n_rep + 1)
        pos = lay.pos[:, -1:].to(dev) + 1
        codes = torch.zeros(1, m.n_rep, dtype=torch.long, device=dev)
        for i in range(m.n_rep):
            h = step_tokens(m, cache, m.embed_rep(codes[:, i:i + 1], i), 1, pos + i, cache.mask(1, bidir=False), write=True)
            m.rep.readout(h[:, -1])
        synchronize(dev)
        out["decode_cached_s"] = time.perf_counter() - t0
        out["decode_uncached_s"] = uncached_decode_s(m, prompt, fit)
        # [BOP], then one diffusion step with and without the prefix
        step_tokens(m, cache, m.tok_emb(torch.full((1, 1), m.tok.bop, device=dev)), PIX, pos + m.n_rep,
                    cache.mask(1, False), True)
        z = torch.randn(1, m.n_pix, cfg.model.patch_size ** 2 * 3, device=dev)
        t = torch.full((1,), 0.5, device=dev)
        pix_pos = pos + m.n_rep + 1
        mask = cache.mask(m.n_pix, bidir=True)
        full = torch.ones(1, 1, m.n_pix, m.n_pix, dtype=torch.bool, device=dev)

        def timed(fn, repeat):
            def run():
                fn()
                synchronize(dev)
            return timeit(run, repeat)
        step_cached = timed(lambda: m.predict_x(step_tokens(m, cache, m.embed_pix(z, t), PIX, pix_pos, mask, False), z), 2)
        pix_only = lambda: m.predict_x(m.mot(m.embed_pix(z, t), torch.full((1, m.n_pix), PIX, device=dev),
                                             pix_pos.expand(1, m.n_pix), full), z)
        step_alone = timed(pix_only, 2)
        step_uncached = timed(lambda: m.gen_forward(prompt, codes, z, t), 1)
    out.update(step_cached_s=step_cached, step_pixels_alone_s=step_alone, step_uncached_s=step_uncached)
    out["per_image_cached_s"] = out["decode_cached_s"] + 25 * step_cached
    out["per_image_uncached_s"] = out["decode_uncached_s"] + 25 * step_uncached
    return out


def report_1024(r: dict):
    print(f"paper 1024-px token counts ({r['n_rep']} rep tokens, {r['n_pix']} pixel patches; random model, "
          f"dim {r['dim']}, {r['heads']} heads, depth {r['depth']}, batch 1, no CFG):")
    print(f"  decode {r['n_rep']} rep tokens: cached {r['decode_cached_s']:.1f}s, uncached {r['decode_uncached_s']:.1f}s "
          + ("(9 prefix lengths timed, a + b i + c i^2 fit summed over all), " if r["fit"] else "(all measured), ")
          + f"speed-up {r['decode_uncached_s'] / r['decode_cached_s']:.1f}x")
    print(f"  one diffusion step: cached {r['step_cached_s']:.3f}s, uncached {r['step_uncached_s']:.3f}s, "
          f"pixel block alone {r['step_pixels_alone_s']:.3f}s -> cached / pixels-alone = "
          f"{r['step_cached_s'] / r['step_pixels_alone_s']:.2f}")
    per_img_c, per_img_u = r["per_image_cached_s"], r["per_image_uncached_s"]
    print(f"  per image at 25 steps: cached {per_img_c:.1f}s, uncached {per_img_u:.1f}s, "
          f"speed-up {per_img_u / per_img_c:.1f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description="nanorf throughput benchmark (prints ratios measured in one run).")
    p.add_argument("--quick", action="store_true", help="fewer repeats; only the narrow 1024-px probe, its uncached decode fitted")
    p.add_argument("--steps", type=int, default=25, help="ODE steps for the toy sampling benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = 2 if args.quick else 3
    ceiling = matmul_ceiling()
    print(f"machine: {torch.get_num_threads()} threads, float32 2048^2 matmul ceiling {ceiling:.1f} GFLOP/s")
    for name, ov in (("toy", ()), ("small", ("train.batch_size=32", "train.und_batch_size=16"))):
        r = bench_train(name, ov, rep)
        print(f"train {name:6s} ({r['params_m']:.1f}M params{', ' + ' '.join(ov) if ov else ''}): "
              f"{r['sec']:.3f} s/step, {r['tokens_s']:.0f} tokens/s, {r['gflops']:.1f} GFLOP/s = "
              f"{100 * r['gflops'] / ceiling:.0f}% of the matmul ceiling (MFU)")
    cfg = get_config("toy")
    torch.manual_seed(0)
    toy = RFModel(cfg.model).eval()
    prompts = ["a red circle at the top left and a blue square at the center"] * 8
    s = bench_sampling(toy, prompts, args.steps, rep)
    print(f"sample toy, {args.steps} steps, CFG on, batch {len(prompts)}: cached {s['cached'] * 1e3:.1f} ms/image, "
          f"uncached {s['uncached'] * 1e3:.1f} ms/image, speed-up {s['ratio']:.1f}x")
    # narrow: every uncached token timed; paper width: Qwen3-30B-A3B's hidden size 2048 in
    # heads of 128, one block, so matmuls and attention weigh what they weigh in the paper's trunk
    report_1024(paper1024_probe(64, 2, 2, fit=args.quick))
    if not args.quick:
        report_1024(paper1024_probe(2048, 1, 16, fit=True))


if __name__ == "__main__":
    main()
