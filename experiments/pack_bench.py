"""Benchmark: packed rows against padded rows on a mixed-size batch, side by side in one run.

    python -m experiments.pack_bench                         # the toy model, 48 mixed-size examples
    python -m experiments.pack_bench --tokens-per-rank 4096 --examples 96

The examples are the shapes world at mixed aspect ratios and resolutions (each size from
nanorf.data.fit_to_budget, as an image folder read with train.py --tokens-per-rank gives), half
generation, half understanding. Both layouts run the same code (nanorf.packing.packed_loss,
forward + backward) on the same examples; only the rows differ:

  padded  micro-batches of --batch examples, one example per row, every row as long as the
          longest of its micro-batch (what a padded batch of mixed sizes costs)
  packed  first-fit packs of --tokens-per-rank tokens, one pack per forward

Throughput is real (non-padding) tokens per second; the table also gives the padding share.
On CPU the dense mask makes a packed row attend over its whole length (the masked scores are
computed, then dropped); on CUDA the flex_attention block mask skips the tiles between
documents, so there the packed side gains more than here.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nanorf.config import apply_overrides, get_config
from nanorf.data import fit_to_budget
from nanorf.model import GenBatch, UndBatch
from nanorf.packing import gen_doc, pack, packed_loss, stack, und_doc
from nanorf.patches import images_to_tensor
from nanorf.shapes import ShapesWorld
from nanorf.variants import build_model

ASPECTS = (1.0, 0.5, 2.0, 0.75, 4 / 3, 1 / 3, 3.0)   # height / width
SCALES = (0.25, 0.5, 1.0)                            # share of the full pixel budget


def mixed_sizes(n: int, side: int, multiple: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (H, W) sizes of mixed aspect ratio and resolution, within side x side pixels."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, s = rng.choice(ASPECTS), rng.choice(SCALES)
        out.append(fit_to_budget(round(1000 * a), 1000, int(s * side * side), multiple))
    return out


def make_docs(model, sizes: list[tuple[int, int]], seed: int = 0):
    """Half generation, half understanding documents at these sizes, with fixed random draws."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, (H, W) in enumerate(sizes):
        item = ShapesWorld((H, W), seed=seed)[i]
        img = images_to_tensor([item["image"]])
        gr = cfg.grids((H, W))
        if i % 2 == 0:
            b = GenBatch(prompts=[model.tok.encode(item["caption"], cfg.max_text_len)], images=img,
                         targets=torch.randint(0, cfg.vq.codebook_size, (1, gr.n_rep), generator=g) if cfg.rf else None,
                         t=torch.rand(1, generator=g), eps=torch.randn(1, gr.n_pix, cfg.patch_size ** 2 * 3, generator=g),
                         drop_text=torch.tensor([False]), drop_rep=torch.tensor([False]))
            docs.append(gen_doc(model, b))
        else:
            q, a = item["qa"][0]
            docs.append(und_doc(model, UndBatch(img, [model.question_ids(q)], [model.tok.encode(a, cfg.max_text_len)])))
    return docs


def run(layouts, model, n_gen: int, n_und: int) -> float:
    """Seconds for one forward + backward over every pack of `layouts`."""
    def step():
        model.zero_grad(set_to_none=True)
        for p in layouts:
            loss, _ = packed_loss(model, p, n_gen, n_und)
            loss.backward()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy", help="preset whose model runs (default toy)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--examples", type=int, default=48, help="examples in the batch (half generation)")
    ap.add_argument("--batch", type=int, default=8, help="padded side: examples per micro-batch")
    ap.add_argument("--tokens-per-rank", type=int, default=2048, help="packed side: tokens per pack")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats (best of)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sizes, images and draws")
    args = ap.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set).model
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    sizes = mixed_sizes(args.examples, cfg.image_size, cfg.size_multiple, args.seed)
    docs = make_docs(model, sizes, args.seed)
    real = sum(len(d.tokens) for d in docs)
    n_gen, n_und = (len(docs) + 1) // 2, len(docs) // 2
    padded = [stack([[d] for d in docs[i:i + args.batch]]) for i in range(0, len(docs), args.batch)]
    packed = pack(docs, args.tokens_per_rank)
    rows = {"padded": padded, "packed": packed}
    slots = {k: sum(p.doc.numel() for p in v) for k, v in rows.items()}
    # one interleaved measurement per repeat, so a noisy neighbour hits both sides alike
    best = {k: float("inf") for k in rows}
    fns = {k: run(v, model, n_gen, n_und) for k, v in rows.items()}
    for k in fns:
        fns[k]()                                                        # warm-up
    for _ in range(args.repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    print(f"{len(docs)} examples ({n_gen} generation, {n_und} understanding), {len(set(sizes))} sizes "
          f"from {min(sizes, key=lambda s: s[0] * s[1])} to {max(sizes, key=lambda s: s[0] * s[1])}, "
          f"{real} real tokens; model {args.config}, {torch.get_num_threads()} threads")
    print(f"{'layout':8} {'rows':>5} {'forwards':>8} {'token slots':>11} {'padding':>8} {'seconds':>8} {'real tok/s':>10}")
    for k in rows:
        R = sum(p.doc.shape[0] for p in rows[k])
        print(f"{k:8} {R:>5} {len(rows[k]):>8} {slots[k]:>11} {1 - real / slots[k]:>8.1%} {best[k]:>8.2f} "
              f"{real / best[k]:>10.0f}")
    print(f"packed / padded throughput: {best['padded'] / best['packed']:.2f}x")
    return {"padded_s": best["padded"], "packed_s": best["packed"], "real_tokens": real, "slots": slots}


if __name__ == "__main__":
    main()
