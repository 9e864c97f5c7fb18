"""Where each of the three losses pulls the shared model: per-loss gradient norms per parameter group.

    python -m experiments.grad_share --ckpt out/toy/ckpt.pt [--batches 4] [--json grads.json]

L = L_LM + L_Rep + L_FM (docs/method.md, "Losses") trains one MoT. Each token type has its own
FFN expert (and, with per-modality attention, its own attention projections), but the prompt
text is an understanding-type token in every generation sequence too: L_Rep and L_FM reach the
understanding expert through the prompt, and L_LM is all the understanding expert learns from.
This asks, on a trained checkpoint, how hard each loss pulls each parameter group and whether
they pull the same way. For each of `--batches` training batches (the run's own stream, steps
past its end), each loss is back-propagated alone:

    ‖g_k‖         the norm of dL_k / dθ over the group's parameters, mean over batches
    cos(g_j, g_k) the cosine between two losses' gradients on the group, mean over batches
                  (0: independent directions; < 0: the losses fight over the same weights)

Groups: `und-*`, `rep-*`, `pix-*` are each expert's attention (`-attn`: q/k/v/o and their norms)
and FFN (`-ffn`); `shared-attn` replaces the three with shared attention; `*-io` the embeddings
and heads of each token type (`und-io`: text embedding, LM head, connector), `vit` the encoder,
`other` the final norm. A group a loss does not reach has ‖g‖ = 0 (the routing check of the
test). The gradients are of the training weights (not the sampling EMA), in train mode.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from nanorf.model import RFModel
from nanorf.stream import Stream
from nanorf.targets import RepresentationTargets

LOSSES = ("lm", "rep", "fm")


def group_of(name: str, shared_attention: bool) -> str:
    """A parameter's name -> its group (see the module docstring)."""
    if name.startswith("vit."):
        return "vit"
    if name.startswith(("connector.", "tok_emb.", "lm_head.")):
        return "und-io"
    if name.startswith(("rep.", "rep_pos")):
        return "rep-io"
    if name.startswith(("pix_", "t_emb.")):
        return "pix-io"
    if name.startswith("mot.blocks."):
        part, rest = name.split(".")[3], name.split(".")[4]   # mot.blocks.<i>.<part>.<modality>.…
        kind = "attn" if part.startswith("attn") else "ffn"
        if kind == "attn" and shared_attention:
            return "shared-attn"
        return ("und", "rep", "pix")[int(rest)] + "-" + kind if rest.isdigit() else f"shared-{kind}"
    return "other"


def loss_gradients(model: RFModel, targets: RepresentationTargets | None, stream: Stream,
                   steps: list[int]) -> dict:
    """{loss: {group: [flat gradient per step]}}: each loss of each step's batch back-propagated alone."""
    shared = model.cfg.mot.shared_attention
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    group = [group_of(n, shared) for n, _ in named]  # per parameter, in `named`'s order
    out: dict = {}
    t = stream.cfg.train
    for s in steps:
        gen = stream.gen_batch(s, range(t.batch_size), stream.draws(s), "cpu")
        if targets is not None:
            targets.label(gen)  # the clean images' rep targets (and REPA's features), as in training
        l_rep, l_fm = model.gen_loss(gen)
        l_lm = model.und_loss(stream.und_batch(s, range(t.und_batch_size), "cpu"))
        for name, loss in zip(LOSSES, (l_lm, l_rep, l_fm)):
            if not loss.requires_grad:  # pixel-only: L_Rep is the constant 0
                continue
            grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
            for g in sorted(set(group)):
                flat = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                  for (_, p), x, pg in zip(named, grads, group) if pg == g])
                out.setdefault(name, {}).setdefault(g, []).append(flat)
    return out


def summarize(grads: dict) -> dict:
    """{group: {"lm": mean |g|, …, "cos_lm_rep": mean cosine, …}} over the steps."""
    present = [k for k in LOSSES if k in grads]
    groups = next(iter(grads.values())).keys()
    rows = {}
    for g in groups:
        row = {k: sum(v.norm().item() for v in grads[k][g]) / len(grads[k][g]) for k in present}
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                cs = [F.cosine_similarity(x, y, dim=0).item() for x, y in zip(grads[a][g], grads[b][g])]
                row[f"cos_{a}_{b}"] = sum(cs) / len(cs)
        rows[g] = row
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-loss gradient norms and cosines per parameter group of a checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt, ckpt.dcp, or the run's out-dir)")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over (steps past the run's end)")
    p.add_argument("--json", help="also write the table to this JSON file")
    args = p.parse_args(argv)
    from nanorf.checkpoint import CheckpointError, load_checkpoint, load_model
    from nanorf.targets import targets_from_checkpoint
    try:
        if args.batches < 1:
            raise CheckpointError("--batches must be at least 1")
        ck = load_checkpoint(args.ckpt)
        model, cfg, _ = load_model(args.ckpt, ema=False, ck=ck)  # the weights the losses train
    except CheckpointError as e:
        print(f"experiments.grad_share: error: {e}", file=sys.stderr)
        sys.exit(2)
    model.train()
    targets = targets_from_checkpoint(ck, cfg.model, model.vit)
    steps = [ck["step"] + 37 * i for i in range(args.batches)]  # batches the run never trained on
    rows = summarize(loss_gradients(model, targets, Stream(cfg, model), steps))
    cols = list(next(iter(rows.values())).keys())
    print(f"{args.ckpt} (step {ck['step']}): gradient of each loss alone, mean over {args.batches} batches")
    print("| group | " + " | ".join(c if c.startswith("cos") else f"‖g_{c}‖" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for g, row in rows.items():
        print(f"| {g} | " + " | ".join(f"{row[c]:.3f}" if c.startswith("cos") else f"{row[c]:.4f}" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "step": ck["step"], "groups": rows}, f, indent=1)


if __name__ == "__main__":
    main()
