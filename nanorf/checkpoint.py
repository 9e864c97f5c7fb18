"""Checkpoints: weights, EMA, optimiser, codebook, config and step, written atomically.

A checkpoint is one `torch.save`d dict that loads on CPU:
    {"format": 1, "config": Config.to_dict(), "step": int,
     "model": ..., "ema": ..., "optimizer": ..., "targets": ... (EMA encoder + codebook, or None),
     "rng": torch CPU RNG state}
Training draws every random number from (seed, step) (see train.py), so the step is
all the data/RNG state a resume needs; the global RNG state is stored anyway.
It is written to a temporary file in the same folder, flushed to disk and renamed into place,
so a crash mid-write never leaves a truncated checkpoint behind (only, at worst, a stray
`*-tmp-*` file that `remove_stale_temps` clears on the next start). Every file nanorf writes
goes through the same helper, `atomic_path`.

With `keep=K > 0` a save writes `ckpt-<step>.pt`, points `ckpt.pt` at it (a hard link, renamed
into place) and deletes all but the newest K numbered files, so `ckpt.pt` is always the latest
and sample.py / nanorf.eval read it unchanged. A save refuses a model holding non-finite values,
so a diverged run can never replace a good checkpoint.

An FSDP run (train.py --fsdp) writes the same contents sharded, as a folder `ckpt.dcp`
(nanorf/dcp.py). `load_checkpoint` and `load_model` read either format, or a run's out-dir, in
one process.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config

FORMAT = 1


class CheckpointError(ValueError):
    """A missing, unreadable or mismatched checkpoint."""


TEMP_MARK = "-tmp-"  # in the name of every temporary file atomic_path makes


def checkpoint_path(out_dir: Path, fsdp: bool) -> Path:
    """Where a run keeps its latest checkpoint: ckpt.pt, or under --fsdp the link ckpt.dcp to
    the newest sharded folder (nanorf/dcp.py)."""
    return Path(out_dir) / ("ckpt.dcp" if fsdp else "ckpt.pt")


@contextmanager
def atomic_path(path, durable: bool = False):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on any
    error it is removed, so a reader never sees a half-written file. `durable` also flushes the
    file and the folder to disk, so the rename survives a power cut, not only a killed process."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + TEMP_MARK, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder) -> list[str]:
    """Delete the temporary files a killed save left in `folder` (atomic_path's `*-tmp-*`); their names.
    Call it only where no other process is writing into the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if TEMP_MARK in p.name)
    for p in stale:  # files, and the folders and links of a sharded save (nanorf.dcp)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in stale]


def nonfinite(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state that hold a NaN or an infinity."""
    if torch.is_tensor(state):
        return [prefix.rstrip(".")] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite(v, f"{prefix}{k}.")]


def refuse_nonfinite(bad: list[str], step: int, path, world: int, device) -> None:
    """Every rank's list of non-finite tensors -> CheckpointError on every rank if any rank has one
    (so all stop together, and no rank writes)."""
    if world > 1:
        import torch.distributed as dist
        flag = torch.tensor([float(bool(bad))], device=device)
        dist.all_reduce(flag)
        bad = bad or (["(on another rank)"] if flag.item() > 0 else [])
    if bad:
        raise CheckpointError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}; "
                              f"{path} left as it was")


def checkpoint_state(cfg: Config, step: int, model, ema_model, optimizer, targets=None) -> dict:
    """What a checkpoint holds (the module docstring): the live tensors, not copies."""
    return {"format": FORMAT, "config": cfg.to_dict(), "step": step,
            "model": model.state_dict(), "ema": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "targets": None if targets is None else targets.state_dict(),
            "rng": torch.get_rng_state()}


def numbered(path, step: int) -> Path:
    """out/ckpt.pt, 1200 -> out/ckpt-1200.pt"""
    path = Path(path)
    return path.with_name(f"{path.stem}-{step}{path.suffix}")


def numbered_checkpoints(path) -> list[tuple[int, Path]]:
    """(step, file) of the numbered checkpoints beside `path`, oldest first."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"-(\d+)" + re.escape(path.suffix))
    found = [(int(m.group(1)), p) for p in path.parent.glob(f"{path.stem}-*{path.suffix}")
             if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def write_checkpoint(path, state: dict, keep: int = 0):
    """Write `state` to `path` atomically; with keep > 0, as `<stem>-<step>.pt` with `path` a
    link to it, keeping the newest `keep` numbered files. A process killed at any point leaves
    `path` holding either the previous checkpoint or this one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep <= 0:
        with atomic_path(path, durable=True) as tmp:
            torch.save(state, tmp)
        return
    target = numbered(path, state["step"])
    with atomic_path(target, durable=True) as tmp:
        torch.save(state, tmp)
    with atomic_path(path, durable=True) as tmp:  # the latest: a second name for the same file
        os.remove(tmp)
        try:
            os.link(target, tmp)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(target, tmp)
    # Only files up to this step count: a later-numbered one is from another run in this folder
    # (or from this run's future, before a crash and resume) and must not push this one out.
    for _, old in [(s, p) for s, p in numbered_checkpoints(path) if s <= state["step"]][:-keep]:
        old.unlink(missing_ok=True)


def save_checkpoint(path, cfg: Config, step: int, model, ema_model, optimizer, targets=None, keep: int = 0):
    """Check that every tensor is finite, then write_checkpoint; a model holding a NaN or an
    infinity raises CheckpointError and leaves every file as it was."""
    state = checkpoint_state(cfg, step, model, ema_model, optimizer, targets)
    bad = nonfinite({k: state[k] for k in ("model", "ema", "optimizer", "targets")})
    if bad:
        raise CheckpointError(f"refusing to save step {step} to {path}: non-finite values in "
                              + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    write_checkpoint(path, state, keep)


def _diff(a, b, prefix=""):
    """Paths of the fields where two nested config dicts disagree."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append(f"{prefix}{k} ({vb!r} in the checkpoint, {va!r} asked for)")
    return out


def resolve_checkpoint(path) -> Path:
    """The checkpoint a path names: a ckpt.pt file, a sharded checkpoint folder (nanorf.dcp), or a
    run's out-dir, which means its ckpt.pt or ckpt.dcp (the newer if it holds both)."""
    from .dcp import is_sharded
    path = Path(path)
    if path.is_file() or is_sharded(path):
        return path
    if path.is_dir():
        found = [p for p in (path / "ckpt.pt", path / "ckpt.dcp") if p.is_file() or is_sharded(p)]
        if not found:
            raise CheckpointError(f"no checkpoint in {path} (neither ckpt.pt nor ckpt.dcp)")
        return max(found, key=lambda p: p.stat().st_mtime)
    raise CheckpointError(f"no checkpoint at {path}")


def load_checkpoint(path, expect: Config | None = None) -> dict:
    """Load a checkpoint on CPU, in this process: a ckpt.pt, a sharded checkpoint folder of an
    FSDP run (read whole, without its optimiser; nanorf.dcp), or a run's out-dir. With `expect`,
    its model config must match exactly (the training fields may differ, e.g. a longer max_steps
    on resume)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        from .dcp import read_sharded
        ck = read_sharded(path)
        if expect is not None:
            check_model_config(ck, expect, path)
        return ck
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or "config" not in ck:
        raise CheckpointError(f"{path} is not a nanorf checkpoint (format {FORMAT})")
    if expect is not None:
        check_model_config(ck, expect, path)
    return ck


def check_model_config(ck: dict, expect: Config, path) -> None:
    """A loaded checkpoint's model config must equal `expect`'s (one clear error line if not)."""
    # through from_dict, so fields added to the config since the checkpoint count as their defaults
    diffs = _diff(expect.to_dict()["model"], Config.from_dict(ck["config"]).to_dict()["model"], "model.")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with another model config: " + "; ".join(diffs[:3]))


def load_model(path, device="cpu", ema: bool = True, ck: dict | None = None):
    """(RFModel with the EMA weights (or the raw ones), Config, step) for sampling; `ck`: the
    checkpoint already loaded from `path`, to read it once."""
    from .variants import build_model
    ck = ck or load_checkpoint(path)
    cfg = Config.from_dict(ck["config"])
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ck["ema" if ema else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, ck["step"]


def save_vit_weights(path, vit, extra: dict | None = None):
    """An encoder's weights with the ViTConfig they fit (experiments.pretrain_vit writes these;
    train.py --vit-init reads them), atomically."""
    from dataclasses import asdict
    with atomic_path(path) as tmp:
        torch.save({"vit_config": asdict(vit.cfg), "vit": vit.state_dict(), **(extra or {})}, tmp)


def load_vit_weights(path, vcfg) -> dict:
    """The ViT state dict of a file written by save_vit_weights, checked against the run's ViTConfig."""
    from dataclasses import asdict
    if not Path(path).is_file():
        raise CheckpointError(f"--vit-init: no file at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        saved = ck["vit_config"]
    except Exception as e:
        raise CheckpointError(f"--vit-init: {path} is not a file of encoder weights written by nanorf "
                              f"({type(e).__name__})") from None
    want = asdict(vcfg)
    saved = {**asdict(type(vcfg)()), **saved}  # fields added to ViTConfig since the file was written: defaults
    if saved != want:
        diff = ", ".join(f"{k} {saved.get(k)} != {v}" for k, v in want.items() if saved.get(k) != v)
        raise CheckpointError(f"--vit-init: {path} holds a ViT of another shape ({diff})")
    return ck["vit"]
