"""Sharded checkpoints of FSDP runs (train.py --fsdp), written with torch.distributed.checkpoint.

A sharded checkpoint is a folder, `<out-dir>/ckpt-<step>.dcp/`, that holds:
    .metadata, __<rank>_0.distcp   DCP's files: {"model", "optimizer", "ema", "targets"} (as
                                   nanorf.checkpoint's dict; optimizer keyed by parameter name,
                                   from get_state_dict), each rank writing its own shards
    meta.pt                        {"format", "config", "step"}, torch.save'd by rank 0
and `<out-dir>/ckpt.dcp` is a symbolic link to the newest one (like ckpt.pt with --keep).

Every rank writes into `ckpt-<step>.dcp-tmp-*/`; after a barrier rank 0 writes meta.pt, renames
the folder into place and replaces the link with a new one (a rename, atomic), then deletes all
but the newest `keep` folders (at least the newest). A process killed at any point leaves
ckpt.dcp pointing at a whole checkpoint; a stray temporary folder is removed on the next start
(checkpoint.remove_stale_temps).

`save_sharded` / `load_sharded` run on every rank of the process group (resume restores every
shard where it was, through set_state_dict, whatever the world size). `read_sharded` reads one
in ONE process, without a process group, into full tensors (sample.py, eval, --init-from through
checkpoint.load_checkpoint); it leaves out the optimiser, which only a resume needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .checkpoint import FORMAT, TEMP_MARK, CheckpointError, _fsync, nonfinite, numbered_checkpoints, refuse_nonfinite
from .config import Config

META = "meta.pt"
PARTS = ("model", "ema", "targets")  # what a one-process read loads (not the optimiser)


def is_sharded(path) -> bool:
    """A folder written by save_sharded (or the link to one)."""
    return (Path(path) / ".metadata").is_file()


def _state(model, ema_model, optimizer, targets) -> dict:
    """The live tensors of a checkpoint on this rank (DTensor shards), keyed as DCP stores them."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd, "ema": ema_model.state_dict()}
    if targets is not None:
        state["targets"] = targets.state_dict()
    return state


def save_sharded(path, cfg: Config, step: int, model, ema, optimizer, targets, world: int, master: bool):
    """Every rank: check that its shards are finite (all agree), write them; rank 0 completes the
    folder and points `path` (out/ckpt.dcp) at it. A non-finite model raises CheckpointError and
    no file is touched. `ema` is train.ModelEMA."""
    from .fsdp import local_shards
    path = Path(path)
    state = _state(model, ema.model, optimizer, targets)
    bad = nonfinite(local_shards({k: state[k] for k in ("model", "ema", "optimizer", "targets") if k in state}))
    refuse_nonfinite(bad, step, path, dist.get_world_size(), next(model.parameters()).device)
    final = path.with_name(f"{path.stem}-{step}{path.suffix}")   # out/ckpt-1200.dcp
    name = [tempfile.mkdtemp(prefix=final.name + TEMP_MARK, dir=path.parent) if master else None]
    dist.broadcast_object_list(name, src=0)  # one temporary folder for all ranks
    tmp = Path(name[0])
    dcp.save(state, checkpoint_id=tmp)  # collective; returns once every rank's shards and .metadata are written
    if master:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual folder mode
        torch.save({"format": FORMAT, "config": cfg.to_dict(), "step": step}, tmp / META)
        for f in tmp.iterdir():
            _fsync(f)
        _publish(tmp, final, path, cfg.train.keep)
    dist.barrier()  # no rank goes on (or reads the checkpoint) before it is in place


def _publish(tmp: Path, final: Path, link: Path, keep: int):
    """Rename the finished folder to `final`, point `link` at it atomically, prune old folders."""
    if final.exists():  # this step was saved before a crash and a resume: the new save replaces it
        old = Path(tempfile.mkdtemp(prefix=final.name + TEMP_MARK, dir=final.parent))
        os.replace(final, old / "old")
        shutil.rmtree(old)
    os.replace(tmp, final)
    new_link = link.with_name(f"{link.name}{TEMP_MARK}{os.getpid()}")
    if new_link.is_symlink():
        new_link.unlink()
    os.symlink(final.name, new_link)  # relative: the out-dir can be moved or copied whole
    os.replace(new_link, link)
    _fsync(link.parent)
    step = int(final.name[len(link.stem) + 1:-len(link.suffix)])
    # as write_checkpoint: only folders up to this step count (a later one is another run's)
    for _, old in [(s, p) for s, p in numbered_checkpoints(link) if s <= step][:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path) -> dict:
    """{"format", "config", "step"} of a sharded checkpoint folder (one clear error if it is not one)."""
    path = Path(path)
    if not is_sharded(path) or not (path / META).is_file():
        raise CheckpointError(f"{path} is not a nanorf sharded checkpoint (no .metadata or {META})")
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / META}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is not a nanorf checkpoint (format {FORMAT})")
    return meta


def load_sharded(path, model, ema_model, optimizer, targets) -> int:
    """Every rank: fill the sharded model, EMA, optimiser and target maker from `path` in place;
    returns the step. The model must be built and sharded as the run that wrote it (same config)."""
    meta = read_meta(path)
    state = _state(model, ema_model, optimizer, targets)
    # RFModel's `loaded` record is a tensor whose length is the checkpoint's, absent on a fresh model
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for part in ("model", "ema"):
        key = f"{part}.loaded_names"
        if key in md and "loaded_names" not in state[part]:
            state[part]["loaded_names"] = torch.empty(md[key].size, dtype=md[key].properties.dtype)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    ema_model.load_state_dict(state["ema"])
    if targets is not None:
        targets.load_state_dict(state["targets"])
    return meta["step"]


def read_sharded(path) -> dict:
    """A sharded checkpoint in one process, on CPU, as nanorf.checkpoint's dict with full tensors
    and "optimizer": None. No process group: DCP reads every rank's files itself."""
    path = Path(path)
    meta = read_meta(path)
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()
            if isinstance(v, TensorStorageMetadata) and k.split(".", 1)[0] in PARTS}
    try:
        with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, checkpoint_id=path, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    ck = {**meta, "optimizer": None, "targets": None, "model": {}, "ema": {}}
    for k, v in flat.items():
        part, name = k.split(".", 1)
        ck[part] = ck[part] or {}
        ck[part][name] = v
    return ck
