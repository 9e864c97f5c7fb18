"""What lets a long run survive what long runs meet (docs/method.md, "Training recipe and
stages"): every rank agreeing whether a step was finite, images that do not decode, and saves
that never replace a good checkpoint with a broken one.

train.py calls these once per step: `agree_on_step` folds the step's losses, its health flags
and which examples went bad into one all-reduce, so a NaN on one rank is every rank's decision
to skip; `share_bad_items` tells every rank which folder images failed to decode, so all
substitute the same ones; `save` checks that what it would write is finite, on every rank,
before rank 0 writes. `RunStopped` ends a run that keeps failing without touching the last
good checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import checkpoint_state, nonfinite, refuse_nonfinite, write_checkpoint
from .config import Config
from .data import DataError
from .stream import Stream


class RunStopped(RuntimeError):
    """The run cannot usefully go on (too many non-finite steps in a row); the last good
    checkpoint is left as it was."""


LOSS_PARTS = ("lm", "rep", "fm", "aux")  # aux: a routed-MoE decoder's load-balancing loss, else 0


@dataclass
class StepVerdict:
    """What every rank knows after a step's one all-reduce, so all take the same decision."""
    losses: torch.Tensor       # (4,) LOSS_PARTS of the global batch (NaN where a part was not finite)
    bad: list[str]             # the parts that were not finite, of LOSS_PARTS and "grad_norm"
    bad_gen: list[int]         # global-batch positions of micro-batches whose loss was not finite
    bad_und: list[int]
    fresh_bad_items: int       # undecodable folder images found this step, summed over ranks

    @property
    def ok(self) -> bool:
        return not self.bad


def agree_on_step(sums, bad_slots, n_gen: int, gnorm, n_fresh: int, world: int, device) -> StepVerdict:
    """All-reduce the step's losses and its health flags in one collective (a NaN on one rank
    becomes everyone's decision to skip) and read the verdict. bad_slots: (n_gen + n_und,) 1
    where this rank's micro-batch of that example had a non-finite loss."""
    B = bad_slots.numel()
    gnorm = gnorm.detach().float().cpu().view(1)
    flags = torch.cat([~torch.isfinite(sums), ~torch.isfinite(gnorm)]).float()  # (5,) 1 = not finite
    vec = torch.cat([sums, flags, bad_slots, torch.tensor([float(n_fresh)])])  # (4 + 5 + B_gen + B_und + 1,)
    if world > 1:
        red = vec.to(device)
        dist.all_reduce(red)
        vec = red.cpu()
        vec[:4] /= world  # the global batch's mean losses, not rank 0's share
    flags, slots = vec[4:9] > 0, vec[9:9 + B] > 0
    return StepVerdict(losses=vec[:4], bad=[n for n, f in zip((*LOSS_PARTS, "grad_norm"), flags) if f],
                       bad_gen=slots[:n_gen].nonzero().flatten().tolist(),
                       bad_und=slots[n_gen:].nonzero().flatten().tolist(), fresh_bad_items=int(vec[-1]))


def share_bad_items(stream: Stream, world: int) -> list[tuple[int, str]]:
    """The undecodable folder images any rank found this step, as (index, error), now known to
    every rank (so they all skip them from here on and count the same)."""
    found = stream.take_fresh()
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, found)
        found = list(dict(pair for part in everyone for pair in part).items())  # once each, rank order
        stream.bad.update(found)
    return found


def check_bad_fraction(stream: Stream, limit: float):
    n = len(stream.gen)
    if len(stream.bad) > limit * n:
        examples = "; ".join(list(stream.bad.values())[:3])
        raise DataError(f"{len(stream.bad)} of {n} images in {stream.gen.root} do not decode, more than "
                        f"train.max_bad_fraction = {limit}: {examples}; list them all with "
                        f"python -m nanorf.data --check {stream.gen.root}")


def save(path: Path, cfg: Config, step: int, model, ema, opt, targets, world: int, master: bool):
    """Every rank checks that what would be saved is finite (the weights are the same on every
    rank) and they agree, so all stop together; rank 0 writes. A non-finite model raises
    CheckpointError and no file is touched."""
    state = checkpoint_state(cfg, step, model, ema.model, opt, targets)
    bad = nonfinite({k: state[k] for k in ("model", "ema", "optimizer", "targets")})
    refuse_nonfinite(bad, step, path, world, next(model.parameters()).device)
    if master:
        write_checkpoint(path, state, cfg.train.keep)
