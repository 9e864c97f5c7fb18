"""Train nanorf: L = L_LM + L_Rep + L_FM on one process or under torchrun (PAPER §6).

    python train.py                                   # toy preset on CPU, writes out/toy/
    python train.py --config toy --max-steps 200 --out-dir out/x --seed 0
    python train.py --config toy --no-rf              # pixel-only baseline (Table 3a)
    python train.py --config toy --no-rf --repa       # REPA instead of RF (Table 3b)
    python train.py --config toy --continuous-rep     # continuous rep targets (Table 3c)
    python train.py --config toy --data my_folder/    # images + captions.jsonl
    torchrun --nproc_per_node 2 train.py --config toy # DDP: gloo on CPU, nccl on GPU
    python train.py --config toy --out-dir out/x --resume

One step = one global batch of `batch_size` generation examples and `und_batch_size`
understanding examples, split over ranks and gradient-accumulation micro-steps.
Every random draw of a step (which examples, t, noise, CFG drops) is a function of
(seed, step, example index), never of the rank or the micro-step, so a run gives the
same result on any number of processes and resumes exactly from a checkpoint that
holds only weights, optimiser, codebook and the step.

Per step: EMA encoder + online VQ turn the clean images into target codes; forward
and backward on every micro-batch (DDP syncs gradients on the last one only); clip;
AdamW (0.9, 0.95, wd 0.1) with linear warmup then constant LR; then the target
encoder's EMA and the sampling EMA of the whole model are updated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanorf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanorf.config import PRESETS, Config, apply_overrides, get_config
from nanorf.data import DataError, ImageCaptionFolder, ShapesWorld
from nanorf.flow import sample_t
from nanorf.model import RFModel, RepresentationTargets, images_to_tensor, validate
from nanorf.pretrain_vit import load_vit_init
from nanorf.variants import DIFF_MUL
from nanorf.vq import codebook_stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a Representation Forcing model (nanorf).")
    p.add_argument("--config", default="toy", choices=sorted(PRESETS), help="named preset (default: toy)")
    p.add_argument("--out-dir", default=None, help="output folder (default: out/<config>)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps to train for")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (default: preset's)")
    p.add_argument("--no-rf", action="store_true", help="pixel-only baseline: no representation tokens")
    p.add_argument("--repa", action="store_true",
                   help="add REPA's feature-alignment loss on the pixel block (weight 0.5); "
                        "with --no-rf this is the paper's REPA variant (Table 3b)")
    p.add_argument("--continuous-rep", action="store_true",
                   help="continuous rep targets: encoder features regressed by a per-position "
                        "diffusion head instead of VQ codes (Table 3c)")
    p.add_argument("--data", default=None, help="image folder with captions.jsonl instead of the shapes world")
    p.add_argument("--vit-init", default=None,
                   help="start the ViT from weights written by nanorf.pretrain_vit (a pretrained encoder, as the paper's DINOv3)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt exactly")
    p.add_argument("--batch-size", type=int, default=None, help="global generation batch per step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="per-rank generation examples per micro-step (gradient accumulation)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--per-modality-attention", action="store_true",
                   help="BAGEL's MoT variant: separate q/k/v/o and norms per modality")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (MoT and ViT); sequence assembly stays eager")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts scored at the end (0 = skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.mot.dim=256 (repeatable)")
    return p.parse_args(argv)


def build_config(args) -> Config:
    cfg = get_config(args.config)
    t, m = cfg.train, cfg.model
    for name, value in (("max_steps", args.max_steps), ("seed", args.seed), ("batch_size", args.batch_size),
                        ("micro_batch_size", args.micro_batch_size), ("lr", args.lr),
                        ("data", args.data), ("eval_prompts", args.eval_prompts), ("vit_init", args.vit_init)):
        if value is not None:
            setattr(t, name, value)
    if args.compile:
        t.compile = True
    if args.no_rf:
        m.rf = False
    if args.repa:
        m.repa_weight = 0.5
    if args.continuous_rep:
        m.rep_target = "continuous"
    if args.per_modality_attention:
        m.mot.shared_attention = False
    apply_overrides(cfg, args.set)
    validate(cfg.model)
    return cfg


class ModelEMA:
    """Exponential moving average of the model's weights, used for sampling (PAPER §5).
    The decay ramps up as min(decay, (1 + step) / (10 + step)) so short runs are not
    dominated by the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


class Stream:
    """Which examples and random draws make up each step's global batch.

    Example k of step s is item `s * B + k` of the generation stream (its own seed for
    understanding); the step's t, noise and CFG drops come from a generator seeded with
    (seed, step), drawn for the whole global batch so each rank just slices its part."""

    def __init__(self, cfg: Config):
        m, t = cfg.model, cfg.train
        self.cfg = cfg
        self._perm = (-1, None)  # (epoch, permutation) of a folder dataset
        if t.data:
            self.gen = self.und = ImageCaptionFolder(t.data, m.image_size)
        else:
            self.gen = ShapesWorld(m.image_size, seed=t.seed)
            self.und = ShapesWorld(m.image_size, seed=t.seed + 1_000_003)

    def _item(self, ds, i: int):
        if isinstance(ds, ShapesWorld):
            return ds[i]
        n, epoch = len(ds), i // len(ds)  # a folder: a fresh permutation every epoch, drawn once
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return ds[int(self._perm[1][i % n])]

    def draws(self, step: int, n_patches: int, patch_dim: int) -> dict:
        m = self.cfg.model
        B = self.cfg.train.batch_size
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        return {"t": sample_t(B, m.flow.p_mean, m.flow.p_std, g),
                "eps": torch.randn(B, n_patches, patch_dim, generator=g) * m.flow.noise_scale,
                "drop_text": torch.rand(B, generator=g) < m.p_drop_text,
                "drop_rep": torch.rand(B, generator=g) < m.p_drop_rep,
                **self.rep_draws(B, g)}

    def rep_draws(self, B: int, g: torch.Generator) -> dict:
        """The continuous targets' diffusion-head noise (drawn after the rest, so the
        other variants' streams are unchanged)."""
        m = self.cfg.model
        if not (m.rf and m.rep_target == "continuous"):
            return {}
        N, F = m.rep_grid ** 2, m.vit.dim
        return {"rep_t": sample_t(B * DIFF_MUL * N, m.flow.p_mean, m.flow.p_std, g).view(B, DIFF_MUL, N),
                "rep_eps": torch.randn(B, DIFF_MUL, N, F, generator=g)}

    def gen_items(self, step: int, idx: range):
        B = self.cfg.train.batch_size
        items = [self._item(self.gen, step * B + k) for k in idx]
        return [it["caption"] for it in items], images_to_tensor([it["image"] for it in items])

    def und_items(self, step: int, idx: range):
        B = self.cfg.train.und_batch_size
        qs, ans, imgs = [], [], []
        for k in idx:
            it = self._item(self.und, step * B + k)
            q, a = random.Random(f"{self.cfg.train.seed}:qa:{step * B + k}").choice(it["qa"])
            qs.append(q), ans.append(a), imgs.append(it["image"])
        return qs, ans, images_to_tensor(imgs)


def lr_at(step: int, t) -> float:
    """Linear warmup, then constant (PAPER §6)."""
    return t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))


def make_optimizer(model: RFModel, t) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only; `new_param_lr_mult` on generation-side parameters
    (PAPER §6: x4 on newly initialised generation parameters; the rep/pix experts, their
    embeddings and heads are "new" here)."""
    groups = {}
    for name, p in model.named_parameters():
        gen = name.startswith(("rep_", "repa_", "pix_", "t_emb")) or any(
            f".{k}.1." in name or f".{k}.2." in name for k in ("ffn", "attn_in", "attn_out"))
        key = (p.dim() >= 2, gen)
        groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                     "lr_mult": t.new_param_lr_mult if gen else 1.0} for (decay, gen), ps in groups.items()]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, **fused)


def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def train(cfg: Config, out_dir: Path, resume: bool, device_arg=None, log=print) -> dict:
    rank, world, device = setup_distributed(device_arg)
    master = rank == 0
    t = cfg.train
    mb = t.micro_batch_size or t.batch_size // world
    if t.batch_size % (world * mb) or t.und_batch_size % (t.batch_size // mb):
        raise ValueError(f"batch_size {t.batch_size} must split into {world} ranks x micro-batches of {mb}, "
                         f"and und_batch_size {t.und_batch_size} over the same number of micro-batches")
    accum = t.batch_size // (world * mb)
    umb = t.und_batch_size // (world * accum)
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(t.seed)
    model = RFModel(cfg.model)
    if t.vit_init and not resume:  # before the EMA copies are made; a resumed run has its own weights
        model.vit.load_state_dict(load_vit_init(t.vit_init, cfg.model.vit))
    model = model.to(device)
    needs_targets = cfg.model.rf or cfg.model.repa_weight
    targets = RepresentationTargets(cfg.model, model.vit).to(device) if needs_targets else None
    ema = ModelEMA(model, t.ema_decay)
    opt = make_optimizer(model, t)
    step = 0
    if resume:
        ck = load_checkpoint(ckpt_path, expect=cfg)
        model.load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        if targets is not None:
            targets.load_state_dict(ck["targets"])
        step = ck["step"]
        if master:
            log(f"resumed from {ckpt_path} at step {step}")
    stream = Stream(cfg)
    ddp = DDP(model) if world > 1 else model
    if t.compile:  # blocks, not the whole forward: sequence assembly is Python lists and would break graphs
        for blk in list(model.mot.blocks) + list(model.vit.blocks):
            blk.compile(dynamic=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def save(path=ckpt_path):
        if master:
            save_checkpoint(path, cfg, step, model, ema.model, opt, targets)

    stop = {"flag": False}

    def on_sigint(*_):
        stop["flag"] = True
    old = signal.signal(signal.SIGINT, on_sigint) if master and world == 1 else None

    out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "log.jsonl", "a" if resume else "w") if master else None
    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=step, dynamic_ncols=True, disable=None)
    t0, last = time.time(), {}
    n_pix, pdim = model.n_pix, cfg.model.patch_size ** 2 * 3
    while step < t.max_steps and not stop["flag"]:
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step, t) * gparam["lr_mult"]
        draws = stream.draws(step, n_pix, pdim)
        sums = {"lm": 0.0, "rep": 0.0, "fm": 0.0}
        for micro in range(accum):
            start = (micro * world + rank) * mb
            gi = range(start, start + mb)
            ustart = (micro * world + rank) * umb
            prompts, images = stream.gen_items(step, gi)
            qs, ans, uimages = stream.und_items(step, range(ustart, ustart + umb))
            images, uimages = images.to(device), uimages.to(device)
            codes = targets(images) if cfg.model.rf else None
            sl = slice(start, start + mb)
            gen = {"prompts": [model.tok.encode(p, cfg.model.max_text_len) for p in prompts],
                   "images": images, "codes": codes, "t": draws["t"][sl].to(device),
                   "eps": draws["eps"][sl].to(device), "drop_text": draws["drop_text"][sl],
                   "drop_rep": draws["drop_rep"][sl]}
            if "rep_t" in draws:
                gen.update(rep_t=draws["rep_t"][sl].to(device), rep_eps=draws["rep_eps"][sl].to(device))
            if cfg.model.repa_weight:
                gen["align"] = targets.align(images)
            und = {"images": uimages, "questions": [model.question_ids(q) for q in qs],
                   "answers": [model.tok.encode(a, cfg.model.max_text_len) for a in ans]}
            sync = ddp.no_sync() if world > 1 and micro < accum - 1 else nullcontext()
            with sync, amp:
                loss, parts = ddp(gen, und)
                (loss / accum).backward()
            for k in sums:
                sums[k] += parts[k].item() / accum
        if world > 1:  # log the global batch's losses, not rank 0's share
            red = torch.tensor([sums[k] for k in sums], device=device)
            dist.all_reduce(red)
            sums = {k: v / world for k, v in zip(sums, red.tolist())}
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if targets is not None:
            targets.ema_update(model.vit)
        ema.update(model, step)
        step += 1
        if master:
            rec = {"step": step, **{k: round(v, 4) for k, v in sums.items()},
                   "grad_norm": round(float(gnorm), 3), "lr": lr_at(step - 1, t), "time": round(time.time() - t0, 1)}
            if targets is not None and targets.vq is not None:
                rec.update(codes_used=int(targets.vq.last_usage), code_perplexity=round(float(targets.vq.last_perplexity), 1))
            last = rec
            bar.set_postfix({k: rec[k] for k in ("lm", "rep", "fm")}, refresh=False)
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if t.ckpt_every and step % t.ckpt_every == 0:
                save()
    if master:
        bar.close()
        save()
        if stop["flag"]:
            log(f"interrupted: saved {ckpt_path} at step {step}")
        logf.close()
    if old is not None:
        signal.signal(signal.SIGINT, old)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"model": model, "ema": ema.model, "step": step, "last": last, "interrupted": stop["flag"],
            "master": master, "seconds": time.time() - t0}


def final_report(cfg: Config, out_dir: Path, ema_model: RFModel, log=print) -> dict:
    """Score the EMA model on held-out prompts and write the sample grid (rank 0)."""
    from nanorf.eval import generation_score
    from nanorf.sampler import save_grid
    n = cfg.train.eval_prompts
    if n <= 0 or cfg.train.data:
        return {}
    t0 = time.time()
    s = generation_score(ema_model, n_per_kind=-(-n // 5), seed=cfg.train.seed)  # n rounded up to whole rounds of 5 kinds
    k = min(16, n)
    save_grid(s["images"][:k], out_dir / "samples.png", scale=max(1, 128 // cfg.model.image_size))
    (out_dir / "samples.txt").write_text("".join(p + "\n" for p in s["prompts"][:k]))
    score = {key: round(v, 4) for key, v in s.items() if key not in ("images", "prompts")}
    (out_dir / "score.json").write_text(json.dumps(score, indent=1) + "\n")
    log(f"shapes-world score on {s['n']} held-out prompts (EMA model, {time.time() - t0:.0f}s): "
        + ", ".join(f"{key} {v:.3f}" for key, v in score.items() if key != "n"))
    log(f"wrote {out_dir / 'samples.png'} (prompts in samples.txt), {out_dir / 'ckpt.pt'}, {out_dir / 'log.jsonl'}")
    return score


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        out_dir = Path(args.out_dir or f"out/{cfg.name}")
        if args.resume and not (out_dir / "ckpt.pt").exists():
            raise CheckpointError(f"--resume: no checkpoint at {out_dir / 'ckpt.pt'}")
        if cfg.train.data:
            ImageCaptionFolder(cfg.train.data, cfg.model.image_size)  # fail early on a bad folder
        if cfg.train.vit_init:
            load_vit_init(cfg.train.vit_init, cfg.model.vit)  # fail early on a bad file
        res = train(cfg, out_dir, args.resume, args.device)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if res["master"]:
        last = res["last"]
        if last:
            print(f"step {res['step']}: lm {last['lm']:.3f} rep {last['rep']:.3f} fm {last['fm']:.3f}"
                  + (f", codebook {last['codes_used']}/{cfg.model.vq.codebook_size} codes used in the last batch,"
                     f" perplexity {last['code_perplexity']}" if "codes_used" in last else "")
                  + f"; {res['seconds']:.0f}s")
        if res["interrupted"]:
            sys.exit(130)
        final_report(cfg, out_dir, res["ema"])


if __name__ == "__main__":
    main()
