"""FSDP for train.py --fsdp: shard parameters, gradients and optimiser state over the ranks
with FSDP2's `torch.distributed.fsdp.fully_shard`.

`shard_model` calls fully_shard on every MoT block and every ViT block, then on the module
itself (the root: embeddings, heads, connector, norms). One call per block is the unit FSDP
all-gathers before that block's forward and frees after it, so a rank holds the whole weights
of one block at a time, not of the model; the root's few tensors are gathered once per forward.

Everything that mirrors the model's weights is sharded the same way, so that their updates stay
shard-local and need no communication:
  - the sampling EMA (train.ModelEMA) is a deep copy taken before sharding and then sharded like
    the model: each rank lerps its own shard toward the model's same shard (DTensor arithmetic on
    equal placements is local). Gathering full tensors instead would all-gather the whole model
    every step and hold a full copy on every rank, which is what FSDP is for avoiding.
  - the target maker's EMA encoder (RepresentationTargets) is a copy of the ViT, sharded per block
    with its own root; its forward (the targets, under no_grad) all-gathers block by block as
    the training forward does.
Only `forward` (RFModel.forward) gathers the root's parameters; the training loop calls nothing
else on the sharded model. Sampling reads a checkpoint in one process (nanorf.dcp) instead.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shard_blocks(module: torch.nn.Module, blocks) -> None:
    """fully_shard each block, then the module as the root of the rest. reshard_after_forward:
    the root too frees its gathered weights after a forward, which the no_grad EMA encoder needs
    (no backward follows to free them) and costs the model one extra gather of a few tensors."""
    # A MoT block also returns its (k, v), views of one projection, for the sampler's KV cache,
    # which copies them; FSDP warns in case someone writes into a view in place, and nothing does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMoTBlock\) returned a view tensor")
    for blk in blocks:
        fully_shard(blk)
    fully_shard(module, reshard_after_forward=True)


def shard_model(model, vit_blocks: bool = True) -> None:
    """Shard an RFModel (or its EMA copy) in place: MoT blocks, ViT blocks, then the root.
    vit_blocks=False leaves the ViT in the root's unit, gathered once per forward: packed rows
    (train.py --tokens-per-rank) run the ViT once per image size of their understanding documents,
    a count that differs between ranks, and a per-block all-gather must happen on every rank."""
    shard_blocks(model, list(model.mot.blocks) + (list(model.vit.blocks) if vit_blocks else []))


def shard_encoder(vit) -> None:
    """Shard a ViT (the target maker's EMA encoder) in place: its blocks, then itself."""
    shard_blocks(vit, vit.blocks)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for sharded gradients: the global norm of all ranks' shards as a plain
    scalar tensor (the same on every rank), and the gradients scaled as clip_grad_norm_ would."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):  # a partial sum over the shards: reduce it to the global norm
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def local_shards(state):
    """A (nested) state with every DTensor replaced by this rank's shard, for checks that read
    values (a non-finite check) without gathering anything."""
    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: local_shards(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [local_shards(v) for v in state]
    return state
