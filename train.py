"""Train nanorf: L = L_LM + L_Rep + L_FM on one process or under torchrun
(docs/method.md, "Training recipe and stages").

    python train.py                                   # toy preset on CPU, writes out/toy/
    python train.py --config toy --max-steps 200 --out-dir out/x --seed 0
    python train.py --config toy --no-rf              # pixel-only baseline (Table 3a)
    python train.py --config toy --no-rf --repa       # REPA instead of RF (Table 3b)
    python train.py --config toy --continuous-rep     # continuous rep targets (Table 3c)
    python train.py --config toy --data my_folder/    # images + captions.jsonl
    torchrun --nproc_per_node 2 train.py --config toy # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc_per_node 2 train.py --config toy --fsdp   # FSDP2, sharded checkpoints ckpt.dcp/
    python train.py --config toy --out-dir out/x --resume
    torchrun --max-restarts 3 ... train.py ... --resume auto --keep 3   # long runs (README, "Long runs")

One step = one global batch of `batch_size` generation examples and `und_batch_size`
understanding examples, split over ranks and gradient-accumulation micro-steps.
Every random draw of a step (which examples, t, noise, CFG drops) is a function of
(seed, step, example index), never of the rank or the micro-step (nanorf/stream.py), and the
online VQ assigns codes over the step's whole global batch, so a run gives the same result on
any number of processes and any --micro-batch-size, and resumes exactly from a checkpoint
that holds only weights, optimiser, codebook and the step.

The step (in `train`, top to bottom): the EMA encoder + online VQ turn the clean images of the
step's global batch into target codes (one assignment and one codebook update per step);
forward and backward on every micro-batch or packed row (DDP's all-reduce or FSDP's
reduce-scatter syncs gradients on the last one only); clip; every rank agrees whether the
losses and the gradient norm are finite; if so, AdamW (0.9, 0.95, wd 0.1) with linear warmup
then constant LR (and an optional linear warmdown), then the target encoder's EMA and the
sampling EMA of the whole model are updated; if not, the step is skipped and the codebook put
back as it was.
`train.max_bad_steps` skipped steps in a row end the run (RunStopped) without touching the
last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanorf.checkpoint import (CheckpointError, check_model_config, checkpoint_path, load_checkpoint, load_model,
                               load_vit_weights, remove_stale_temps)
from nanorf.config import Config, apply_overrides
from nanorf.presets import PRESETS, get_config
from nanorf.data import DataError, ImageCaptionFolder
from nanorf.dcp import is_sharded, load_sharded, read_meta, save_sharded
from nanorf.distributed import micro_batch_sizes, setup_distributed
from nanorf.fsdp import clip_grad_norm, shard_encoder, shard_model
from nanorf.guard import RunStopped, agree_on_step, check_bad_fraction, save, share_bad_items
from nanorf.model import RFModel, validate
from nanorf.packing import average_gradients, check_packing, packed_micro_steps
from nanorf.runlog import RunLog, step_record
from nanorf.stages import apply_stage, freeze, initial_model, load_weights_from, parse_freeze
from nanorf.stream import Stream
from nanorf.targets import RepresentationTargets
from nanorf.variants import build_model


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
                   help="start the ViT from weights written by experiments.pretrain_vit (a pretrained encoder, as the paper's DINOv3)")
    p.add_argument("--init-llm", default=None, metavar="QWEN3_DIR",
                   help="start the decoder, embeddings, LM head and tokenizer from a local Qwen3 checkpoint folder")
    p.add_argument("--init-vit", default=None, metavar="DINOV3",
                   help="start the encoder from a local official DINOv3 checkpoint (.pth or Hugging Face)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from every weight of another run's checkpoint, with a fresh optimiser and "
                        "schedule, in this run's config (stage 1 -> 2 -> 3; the rep position table is resized)")
    p.add_argument("--freeze", default=None, metavar="GROUPS",
                   help="comma-separated groups that do not train: vit, connector, llm, gen")
    p.add_argument("--stage", type=int, default=None, choices=(1, 2, 3),
                   help="the paper's stages: 1 = only the connector trains, on understanding data "
                        "(--freeze vit,llm,gen, no generation examples); 2 and 3 train everything")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue from <out-dir>/ckpt.pt (ckpt.dcp with --fsdp) exactly (an error if there is none); "
                        "--resume auto: continue if it exists, else start fresh (for torchrun --max-restarts)")
    p.add_argument("--keep", type=int, default=None, metavar="K",
                   help="also keep the last K checkpoints as <out-dir>/ckpt-<step>.pt (ckpt.pt is always "
                        "the latest; default 0: ckpt.pt only)")
    p.add_argument("--batch-size", type=int, default=None, help="global generation batch per step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="per-rank generation examples per micro-step (gradient accumulation)")
    p.add_argument("--tokens-per-rank", type=int, default=None, metavar="T",
                   help="pack each rank's share of the step into rows of T tokens, one row per forward, "
                        "examples of any size and aspect ratio back to back (NaViT; paper: 32768); "
                        "replaces --micro-batch-size")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--per-modality-attention", action="store_true",
                   help="BAGEL's MoT variant: separate q/k/v/o and norms per modality")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (MoT and ViT); sequence assembly stays eager")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimiser state over the ranks (FSDP2, "
                        "per block); checkpoints become <out-dir>/ckpt.dcp, a folder sample.py reads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--eval-per-kind", type=int, default=None,
                   help="held-out prompts per prompt kind scored at the end, and twice as many images "
                        "for understanding (0 = skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.mot.dim=256 (repeatable)")
    return p.parse_args(argv)


def build_config(args) -> Config:
    cfg = get_config(args.config)
    if args.init_from:  # the model is that run's, with this command line's changes (e.g. a new image size)
        cfg.model = Config.from_dict(load_checkpoint(args.init_from)["config"]).model
    t, m = cfg.train, cfg.model
    for name, value in (("max_steps", args.max_steps), ("seed", args.seed), ("batch_size", args.batch_size),
                        ("micro_batch_size", args.micro_batch_size), ("tokens_per_rank", args.tokens_per_rank),
                        ("lr", args.lr),
                        ("data", args.data), ("eval_per_kind", args.eval_per_kind), ("vit_init", args.vit_init),
                        ("init_llm", args.init_llm), ("init_vit", args.init_vit), ("init_from", args.init_from),
                        ("freeze", args.freeze), ("stage", args.stage), ("keep", args.keep)):
        if value is not None:
            setattr(t, name, value)
    if args.compile:
        t.compile = True
    if args.fsdp:
        t.fsdp = True
    if args.no_rf:
        m.rf = False
    if args.repa:
        m.repa_weight = 0.5
    if args.continuous_rep:
        m.rep_target = "continuous"
    if args.per_modality_attention:
        m.mot.shared_attention = False
    apply_overrides(cfg, args.set)
    apply_stage(t)
    if t.freeze:
        parse_freeze(t.freeze)  # fail early on an unknown group
    validate(cfg.model)
    if t.und_turns < 1:
        raise ValueError(f"train.und_turns {t.und_turns} must be at least 1")
    if t.tokens_per_rank:
        check_packing(cfg.model, t.tokens_per_rank, t.und_turns)
    return cfg


class ModelEMA:
    """Exponential moving average of the model's weights, used for sampling (docs/method.md,
    "Sampling"). The decay ramps up as min(decay, (1 + step) / (10 + step)) so short runs are
    not dominated by the random initialisation. Under --fsdp the copy is sharded as the model is
    (nanorf/fsdp.py) and each rank averages its own shard: the same code, on DTensors."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


def lr_at(step: int, t) -> float:
    """Linear warmup, then constant (docs/method.md, "Training recipe and stages"); with
    t.decay_frac > 0, a linear fall to 0 over the last decay_frac * max_steps steps."""
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    n_decay = round(t.decay_frac * t.max_steps)
    cool = min(1.0, (t.max_steps - step) / n_decay) if n_decay > 0 else 1.0
    return t.lr * min(warm, cool)


def train(cfg: Config, out_dir: Path, resume: bool, device_arg=None, log=print) -> dict:
    t = cfg.train
    fsdp = t.fsdp
    rank, world, device = setup_distributed(device_arg, fsdp)
    master = rank == 0
    accum, mb, umb = micro_batch_sizes(t, world)
    ckpt_path = checkpoint_path(out_dir, fsdp)

    # the model, the target maker (EMA encoder + codebook), the sampling EMA, the optimiser;
    # a fresh run starts from random or pretrained weights (nanorf/stages.py), a resumed one from its own
    torch.manual_seed(t.seed)
    if resume:
        ck = read_meta(ckpt_path) if fsdp else load_checkpoint(ckpt_path)  # FSDP: config and step; shards below
        if t.init_llm or t.init_vit:  # the model's shape came from those checkpoints when the run started
            cfg.model = Config.from_dict(ck["config"]).model
        check_model_config(ck, cfg, ckpt_path)
        model = build_model(cfg.model)
    else:
        model = initial_model(cfg)
    model = model.to(device)
    needs_targets = cfg.model.rf or cfg.model.repa_weight
    targets = RepresentationTargets(cfg.model, model.vit).to(device) if needs_targets else None
    if t.init_from and not resume:
        load_weights_from(model, targets, t.init_from)
    freeze(model, t.freeze)
    ema = ModelEMA(model, t.ema_decay)
    if t.compile:  # blocks, not the whole forward: sequence assembly is Python lists and would break graphs
        for blk in list(model.mot.blocks) + list(model.vit.blocks):
            blk.compile(dynamic=True)  # before fully_shard, so FSDP's hooks stay outside the compiled blocks
    if fsdp:  # the EMA and the EMA encoder were copied whole above and are sharded as the model (nanorf/fsdp.py)
        shard_model(model, vit_blocks=not t.tokens_per_rank)
        shard_model(ema.model, vit_blocks=not t.tokens_per_rank)
        if targets is not None:
            shard_encoder(targets.encoder.encoder)
    opt = model.configure_optimizer(t)  # after sharding: it holds the sharded parameters
    step = 0
    if resume and fsdp:
        step = load_sharded(ckpt_path, model, ema.model, opt, targets)
        if master:
            log(f"resumed from {ckpt_path} at step {step}")
    elif resume:
        model.load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        if targets is not None:
            targets.load_state_dict(ck["targets"])
        step = ck["step"]
        if master:
            log(f"resumed from {ckpt_path} at step {step}")
    stream = Stream(cfg, model)
    # packed rows differ per rank in number and in which parameters they touch (a row of
    # understanding documents leaves the pixel side unused), which DDP's per-backward hooks cannot
    # follow: a packed DDP step averages its gradients once, by hand, after the last row
    hand_sync = world > 1 and not fsdp and t.tokens_per_rank > 0
    ddp = DDP(model) if world > 1 and not fsdp and not hand_sync else model
    write = save_sharded if fsdp else save  # every rank calls it; nanorf/dcp.py, nanorf/guard.py
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    stop = {"flag": False}  # Ctrl-C finishes the step, saves and exits
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True)) if master and world == 1 else None
    runlog = None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(out_dir)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted save: {', '.join(stale)}")
        runlog = RunLog(out_dir / "log.jsonl", step if resume else None, t, cfg.model.vq.codebook_size, log)
    t0, last, bad_run, saved = time.time(), {}, [], step if resume else None  # bad_run: steps skipped in a row
    try:
        while step < t.max_steps and not stop["flag"]:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t) * group["lr_mult"]
            draws = stream.draws(step)
            # Rank r's share of the global batch is the contiguous slice [r * share, (r + 1) * share)
            # of its examples, cut into `accum` micro-batches. Which rank and micro-step an example
            # lands on changes no result (up to float summation order; a routed-MoE decoder's
            # load-balancing loss aside, which is per micro-batch). Contiguity makes the step's
            # target features, gathered in rank order, the global batch in example order, which the
            # codebook's first-step initialisation draws from (so it too is the same on any number
            # of processes).
            share, ushare = accum * mb, accum * umb
            starts = [(rank * share + micro * mb, rank * ushare + micro * umb) for micro in range(accum)]
            # All of this rank's generation micro-batches are built up front so the online VQ can
            # assign codes over the whole step at once (RepresentationTargets.label: the batch softmax
            # and the codebook update see the global batch, not one micro-batch, so the targets do not
            # depend on --micro-batch-size). Holding a step's images and noise (B/world x 3 x H x W
            # each) is cheap next to one micro-batch's activations; the EMA encoder still runs one
            # micro-batch at a time.
            if t.tokens_per_rank:  # packing: one example per batch, each at its own size
                gens = stream.gen_examples(step, range(rank * share, (rank + 1) * share), draws, device)
            else:
                gens = [stream.gen_batch(step, range(start, start + mb), draws, device) if mb else None
                        for start, _ in starts]
            # The codebook (and the mean patch per code of --rep-map) is updated once, here, before
            # the step is known to be finite; we copy it first (K x D and K patches) and put it back
            # if the step is skipped. A good step never reads the copy, so resume and DDP equality hold.
            codebook = targets.snapshot() if targets is not None else None
            if targets is not None and mb:
                targets.label(*gens)  # the clean images' rep targets (and REPA's features)
            if t.tokens_per_rank:  # the rank's share as packed rows: (inputs, example slots) per forward
                unds = stream.und_examples(step, range(rank * ushare, (rank + 1) * ushare), device)
                micro_steps, scale = packed_micro_steps(model, gens, unds, rank * share, t.batch_size + rank * ushare,
                                                        t.tokens_per_rank, same_count=fsdp and world > 1,
                                                        device=device), 1.0
            else:
                micro_steps = [((gen, stream.und_batch(step, range(u, u + umb), device)),
                                list(range(g, g + mb)) + list(range(t.batch_size + u, t.batch_size + u + umb)))
                               for gen, (g, u) in zip(gens, starts)]
                scale = 1.0 / accum  # each micro-batch's loss is its mean; a pack's is already a share of the step's
            sums = torch.zeros(4)  # lm, rep, fm, aux (MoE only) of this rank's share of the batch
            bad_slots = torch.zeros(t.batch_size + t.und_batch_size)  # examples of non-finite micro-batches
            for micro, (inputs, slots) in enumerate(micro_steps):
                last = micro == len(micro_steps) - 1  # ranks may hold different numbers of packs
                if fsdp:  # FSDP's no_sync: gradients stay unsharded, reduce-scattered on the last micro-step
                    model.set_requires_gradient_sync(last)
                sync = ddp.no_sync() if world > 1 and not fsdp and not hand_sync and not last else nullcontext()
                with sync, amp:
                    loss, parts = ddp(*inputs) if not t.tokens_per_rank else ddp(None, None, packed=inputs)
                    (loss * scale).backward()
                part = torch.stack([parts.lm, parts.rep, parts.fm, parts.aux if parts.aux is not None
                                    else parts.lm.new_zeros(())]).float().cpu()
                sums += part * scale
                if not torch.isfinite(part).all():
                    bad_slots[slots] = 1
            if hand_sync:
                average_gradients(model, world)
            gnorm = (clip_grad_norm(model.parameters(), t.grad_clip) if fsdp  # the norm over all shards
                     else torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
            v = agree_on_step(sums, bad_slots, t.batch_size, gnorm, len(stream.fresh), world, device)
            if v.ok:
                opt.step()
                if targets is not None:
                    targets.ema_update(model.vit)
                ema.update(model, step)
            elif targets is not None:  # skipped: no optimiser, EMA or encoder-EMA update; the codebook as it was
                targets.restore(codebook)
            opt.zero_grad(set_to_none=True)
            step += 1
            bad_run = [] if v.ok else bad_run + [step]

            found = share_bad_items(stream, world) if v.fresh_bad_items else []
            if master:
                if found:
                    runlog.bad_items(step, found, len(stream.bad), len(stream.gen))
                rec = step_record(step, v, gnorm, lr_at(step - 1, t), t0, targets, stream)
                runlog.step(rec, in_a_row=len(bad_run))
                last = rec if v.ok else last
            if found:
                check_bad_fraction(stream, t.max_bad_fraction)
            if len(bad_run) >= t.max_bad_steps:
                raise RunStopped(f"{len(bad_run)} steps in a row had a non-finite loss or gradient (steps "
                                 f"{bad_run[0]}-{bad_run[-1]}, last: {', '.join(v.bad)}); stopped without saving, "
                                 f"{ckpt_path} left as it was")
            if v.ok and t.ckpt_every and step % t.ckpt_every == 0:
                write(ckpt_path, cfg, step, model, ema, opt, targets, world, master)
                saved = step

        if saved != step:
            write(ckpt_path, cfg, step, model, ema, opt, targets, world, master)
        if master and stop["flag"]:
            log(f"interrupted: saved {ckpt_path} at step {step}")
        if world > 1 or fsdp:
            dist.barrier()
        # the sampling EMA whole, for the end-of-run report: read back from the checkpoint just
        # written, in rank 0 alone, as sample.py would (no rank ever holds the full EMA otherwise)
        report = master and t.eval_per_kind > 0 and not t.data  # final_report's condition
        ema_model = (load_model(ckpt_path)[0].to(device) if report else None) if fsdp else ema.model
    finally:  # also when the run stops on an error, which every rank reaches at the same step
        if master:
            runlog.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"model": model, "ema": ema_model, "step": step, "last": last, "interrupted": stop["flag"],
            "master": master, "seconds": time.time() - t0}


def final_report(cfg: Config, out_dir: Path, ema_model: RFModel, log=print) -> dict:
    """Score the EMA model on held-out prompts and images (nanorf.eval) and write the sample
    grid (rank 0): samples.png / samples.txt and score.json {"generation", "understanding"}."""
    from nanorf.eval import generation_score, understanding_score
    from nanorf.sampler import save_grid
    n = cfg.train.eval_per_kind
    if n <= 0 or cfg.train.data:
        return {}
    t0 = time.time()
    # the sampling seed is part of the evaluation, not of the run: every run is scored on the
    # same noise as `python -m nanorf.eval` (its --seed 0), so the two report the same numbers
    # and runs of different training seeds differ only by their models
    s = generation_score(ema_model, n_per_kind=n, seed=0)
    k = min(16, len(s["prompts"]))
    save_grid(s["images"][:k], out_dir / "samples.png", scale=max(1, 128 // cfg.model.image_size))
    (out_dir / "samples.txt").write_text("".join(p + "\n" for p in s["prompts"][:k]))
    gen = {key: round(v, 4) for key, v in s.items() if key not in ("images", "prompts")}
    und = {key: round(v, 4) for key, v in understanding_score(ema_model, n_images=2 * n).items()}
    score = {"generation": gen, "understanding": und}
    (out_dir / "score.json").write_text(json.dumps(score, indent=1) + "\n")
    log(f"held-out generation, {gen['n']} prompts, strict (GenEval's rules, nothing extra): "
        + ", ".join(f"{key} {gen[key]:.3f}" for key in ("single", "two", "counting", "position", "located", "overall"))
        + f"; lenient overall {gen['lenient_overall']:.3f}, extra objects per image {gen['extras']:.2f}")
    log(f"held-out understanding, {und['n_questions']} questions: "
        + ", ".join(f"{key} {v:.3f}" for key, v in und.items() if not key.startswith("n_"))
        + f" (EMA model, {time.time() - t0:.0f}s)")
    log(f"wrote {out_dir / 'samples.png'} (prompts in samples.txt), {out_dir / 'score.json'}, "
        f"{checkpoint_path(out_dir, cfg.train.fsdp)}, {out_dir / 'log.jsonl'}")
    return score


def main(argv=None):
    args = parse_args(argv)
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # `nohup ... > log`: each progress line as it is printed
    try:
        cfg = build_config(args)
        out_dir = Path(args.out_dir or f"out/{cfg.name}")
        if cfg.train.keep < 0 or cfg.train.max_bad_steps < 1 or not 0 <= cfg.train.max_bad_fraction <= 1:
            raise ValueError("need --keep >= 0, train.max_bad_steps >= 1 and 0 <= train.max_bad_fraction <= 1")
        if not 0 <= cfg.train.decay_frac <= 1:
            raise ValueError(f"train.decay_frac {cfg.train.decay_frac} is outside 0..1")
        fsdp = cfg.train.fsdp
        if fsdp and "MASTER_ADDR" not in os.environ:
            raise ValueError("--fsdp shards over a process group: run it under torchrun "
                             "(torchrun --nproc_per_node N train.py --fsdp ...)")
        ckpt, other = checkpoint_path(out_dir, fsdp), checkpoint_path(out_dir, not fsdp)
        found = is_sharded(ckpt) if fsdp else ckpt.is_file()
        if args.resume and not found and (other.is_file() or is_sharded(other)):
            raise CheckpointError(f"--resume: no checkpoint at {ckpt}; {other} was written "
                                  f"{'without' if fsdp else 'with'} --fsdp, so resume it {'without' if fsdp else 'with'} it")
        resume = found if args.resume == "auto" else args.resume
        if args.resume is True and not resume:
            raise CheckpointError(f"--resume: no checkpoint at {ckpt}")
        if cfg.train.data:
            ImageCaptionFolder(cfg.train.data, cfg.model.image_size)  # fail early on a bad folder
        if cfg.train.vit_init:
            load_vit_weights(cfg.train.vit_init, cfg.model.vit)  # fail early on a bad file
        if args.resume == "auto" and not resume and int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume auto: no checkpoint at {ckpt} yet, starting fresh")
        res = train(cfg, out_dir, resume, args.device)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
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
