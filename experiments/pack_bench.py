"""Benchmark: packed rows against padded rows on a mixed-size batch, side by side in one run.

    python -m experiments.pack_bench                         # the toy model, 48 mixed-size examples
    python -m experiments.pack_bench --tokens-per-rank 4096 --examples 96
    python -m experiments.pack_bench --data my_folder/        # a folder's images, aspect kept
    python -m experiments.pack_bench --write-folder mixed/    # write the mixed-size shapes folder

The examples are an image folder read as train.py --tokens-per-rank reads it (each image's
aspect ratio kept, resized to at most image_size^2 pixels), or by default the shapes world at
mixed aspect ratios and resolutions (`--write-folder` saves it as such a folder); half
generation, half understanding. Both layouts run the same code (nanorf.packing.packed_loss,
forward + backward) on the same examples; only the rows differ:

  padded  micro-batches of --batch examples, one example per row, every row as long as the
          longest of its micro-batch, one dense mask (what a padded batch of mixed sizes costs)
  packed  first-fit packs of --tokens-per-rank tokens, one pack per forward, attention per
          document (CPU) or through a flex_attention block mask (CUDA)

Throughput is real (non-padding) tokens per second; the table also gives the padding share.
With a dense mask a packed row would attend over its whole length (every cross-document score
computed, then dropped): `--dense-packed` measures that too.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from nanorf.config import apply_overrides
from nanorf.presets import get_config
from nanorf.data import ImageCaptionFolder, fit_to_budget
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


def world_items(sizes: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """Shapes-world items, item i drawn at sizes[i]."""
    return [ShapesWorld((H, W), seed=seed)[i] for i, (H, W) in enumerate(sizes)]


def write_folder(root: Path, items: list[dict]) -> None:
    """Items as an image folder: 0000.png ... and captions.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i, it in enumerate(items):
            Image.fromarray(it["image"]).save(root / f"{i:04d}.png")
            f.write(json.dumps({"file": f"{i:04d}.png", "text": it["caption"]}) + "\n")


def make_docs(model, items: list[dict], seed: int = 0):
    """Half generation, half understanding documents of these items, with fixed random draws."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, item in enumerate(items):
        img = images_to_tensor([item["image"]])
        gr = cfg.grids(img.shape[-2:])
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


def run(layouts, model, n_gen: int, n_und: int, dense: bool):
    """A function that runs one forward + backward over every pack of `layouts`."""
    def step():
        model.zero_grad(set_to_none=True)
        for p in layouts:
            loss, _ = packed_loss(model, p, n_gen, n_und, dense=dense)
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
    ap.add_argument("--dense-packed", action="store_true",
                    help="also time packed rows through the dense reference mask")
    ap.add_argument("--data", default=None, help="an image folder (captions.jsonl) instead of the shapes world")
    ap.add_argument("--write-folder", default=None, metavar="DIR",
                    help="only write the default mixed-size shapes examples as an image folder, then exit")
    args = ap.parse_args(argv)
    cfg = apply_overrides(get_config(args.config), args.set).model
    if args.data:
        folder = ImageCaptionFolder(args.data, cfg.image_size, keep_aspect=True, multiple=cfg.size_multiple)
        items = [folder[i] for i in range(min(args.examples, len(folder)))]
    else:
        items = world_items(mixed_sizes(args.examples, cfg.image_size, cfg.size_multiple, args.seed), args.seed)
    if args.write_folder:
        write_folder(Path(args.write_folder), items)
        print(f"wrote {len(items)} images and captions.jsonl to {args.write_folder}")
        return None
    sizes = [it["image"].shape[:2] for it in items]
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    docs = make_docs(model, items, args.seed)
    real = sum(len(d.tokens) for d in docs)
    n_gen, n_und = (len(docs) + 1) // 2, len(docs) // 2
    padded = [stack([[d] for d in docs[i:i + args.batch]]) for i in range(0, len(docs), args.batch)]
    packed = pack(docs, args.tokens_per_rank)
    rows = {"padded": padded, "packed": packed}
    if args.dense_packed:
        rows["packed-dense"] = packed
    slots = {k: sum(p.doc.numel() for p in v) for k, v in rows.items()}
    # one interleaved measurement per repeat, so a noisy neighbour hits both sides alike
    best = {k: float("inf") for k in rows}
    # padded rows attend through one dense (B, 1, L, L) mask, as a padded batch does; packed rows
    # through packed_loss's fast path (per document on CPU, flex_attention on CUDA)
    fns = {k: run(v, model, n_gen, n_und, dense=k != "packed") for k, v in rows.items()}
    for k in fns:
        fns[k]()                                                        # warm-up
    for _ in range(args.repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    print(f"{len(docs)} examples ({n_gen} generation, {n_und} understanding), {len(set(map(tuple, sizes)))} sizes "
          f"from {tuple(min(sizes, key=lambda s: s[0] * s[1]))} to {tuple(max(sizes, key=lambda s: s[0] * s[1]))}, "
          f"{real} real tokens; model {args.config}, {torch.get_num_threads()} threads")
    print(f"{'layout':12} {'rows':>5} {'forwards':>8} {'token slots':>11} {'padding':>8} {'seconds':>8} {'real tok/s':>10}")
    for k in rows:
        R = sum(p.doc.shape[0] for p in rows[k])
        print(f"{k:12} {R:>5} {len(rows[k]):>8} {slots[k]:>11} {1 - real / slots[k]:>8.1%} {best[k]:>8.2f} "
              f"{real / best[k]:>10.0f}")
    print(f"packed / padded throughput: {best['padded'] / best['packed']:.2f}x")
    return {"padded_s": best["padded"], "packed_s": best["packed"], "real_tokens": real, "slots": slots,
            "sizes": [tuple(s) for s in sizes]}


if __name__ == "__main__":
    main()
