"""Checkpoints: weights, EMA, optimiser, codebook, config and step, written atomically.

A checkpoint is one `torch.save`d dict that loads on CPU:
    {"format": 1, "config": Config.to_dict(), "step": int,
     "model": ..., "ema": ..., "optimizer": ..., "targets": ... (EMA encoder + codebook, or None),
     "rng": torch CPU RNG state}
Training draws every random number from (seed, step) (see train.py), so the step is
all the data/RNG state a resume needs; the global RNG state is stored anyway.
It is written to a temporary file in the same folder and renamed into place, so a
crash mid-write never leaves a truncated checkpoint behind. Every file nanorf writes goes
through the same helper, `atomic_path`.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config

FORMAT = 1


class CheckpointError(ValueError):
    """A missing, unreadable or mismatched checkpoint."""


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on any
    error it is removed, so a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, cfg: Config, step: int, model, ema_model, optimizer, targets=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "config": cfg.to_dict(), "step": step,
             "model": model.state_dict(), "ema": ema_model.state_dict(),
             "optimizer": optimizer.state_dict(),
             "targets": None if targets is None else targets.state_dict(),
             "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def load_checkpoint(path, expect: Config | None = None) -> dict:
    """Load a checkpoint on CPU. With `expect`, its model config must match exactly
    (the training fields may differ, e.g. a longer max_steps on resume)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
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
