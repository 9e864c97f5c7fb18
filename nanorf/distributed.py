"""How one training step spreads over processes: the process group, each rank's device, and the
split of the step's global batch into ranks and gradient-accumulation micro-steps (docs/method.md,
"Training recipe and stages"; train.py runs the step).

The split never changes what a step computes: every random draw is a function of (seed, step,
example index) (nanorf/stream.py) and the online VQ labels the whole global batch at once
(nanorf/targets.py), so any world size and --micro-batch-size give the same run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed(device_arg, fsdp: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, from torchrun's environment; joins the process
    group (nccl on GPU, gloo on CPU) when there is more than one rank, or under FSDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 or fsdp:  # FSDP needs a process group even on one rank (torchrun --nproc_per_node 1)
        dist.init_process_group("nccl" if cuda else "gloo")
        if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
                and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
            # torchrun's c10d rendezvous shares its store with the workers and keeps a failed
            # attempt's process-group keys in it, so a restarted worker can read a dead peer's
            # address (pytorch/pytorch#135712); measured here: 6 of 8 gloo restarts failed that way.
            print("note: torchrun restarts may fail to reconnect unless torchrun runs with "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, \"Long runs\")")
    return rank, world, device


def micro_batch_sizes(t, world: int) -> tuple[int, int, int]:
    """(gradient-accumulation steps, generation and understanding examples per rank per micro-step).
    batch_size 0 trains on understanding only (stage 1), in one micro-step."""
    if t.batch_size == 0:
        if t.und_batch_size % world:
            raise ValueError(f"und_batch_size {t.und_batch_size} must split into {world} ranks")
        return 1, 0, t.und_batch_size // world
    mb = t.micro_batch_size or t.batch_size // world
    if t.batch_size % (world * mb) or t.und_batch_size % (t.batch_size // mb):
        raise ValueError(f"batch_size {t.batch_size} must split into {world} ranks x micro-batches of {mb}, "
                         f"and und_batch_size {t.und_batch_size} over the same number of micro-batches")
    accum = t.batch_size // (world * mb)
    return accum, mb, t.und_batch_size // (world * accum)
