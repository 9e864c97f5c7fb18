"""Reading other projects' weight files: torch `.pth` state dicts, safetensors files and sharded
Hugging Face folders, and the SHA-256 check of torch.hub's file names.

Used by the loaders of official weights (nanorf/dinov3.py, nanorf/qwen3.py). Every failure is a
`nanorf.checkpoint.CheckpointError` with a one-line message. safetensors is an optional package
(`pip install -e ".[pretrained]"`), imported only when a safetensors file is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from nanorf.checkpoint import CheckpointError

INSTALL_HINT = 'pip install -e ".[pretrained]"'
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torch.hub's convention, >= 8 hex digits


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def check_sha256_prefix(path) -> None:
    """If the file name ends in `-<hex>.<ext>`, its SHA-256 must start with <hex> (torch.hub's rule)."""
    path = Path(path)
    m = HASH_SUFFIX.search(path.name)
    if m is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        got = h.hexdigest()[:len(m.group(1))]
        raise CheckpointError(f"{path} fails its SHA-256 check: the name says {m.group(1)}, the file hashes to {got} "
                              "(a truncated or altered download? check_hash=False if the suffix is no hash)")


def safetensors_load():
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading Hugging Face safetensors needs the safetensors package: {INSTALL_HINT}") \
            from None
    return load_file


def safetensors_files(path: Path) -> tuple[list[Path], set | None]:
    """The weight files of a Hugging Face folder: model.safetensors, or the shards its index
    lists, with the tensor names the index promises (None for a single file)."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    if not index.is_file():
        raise CheckpointError(f"{path} holds no model.safetensors (nor model.safetensors.index.json)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))], set(weight_map)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {index}: {one_line(e)}") from None


def read_safetensors_dir(path: Path, what: str) -> dict:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    files, expected = safetensors_files(path)
    load_file = safetensors_load()
    sd = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{what} shard {f} is missing (listed in {index.name})")
        try:
            sd.update(load_file(str(f), device="cpu"))
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read {f}: {one_line(e)}") from None
    if expected is not None and expected - sd.keys():
        lost = sorted(expected - sd.keys())
        raise CheckpointError(f"{index} lists tensors its shards lack: {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}")
    return sd


def read_state_dict(path, check_hash: bool = True) -> tuple[dict, dict | None]:
    """(state dict as stored, Hugging Face config.json dict or None) from a .pth, a .safetensors or an HF folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no DINOv3 checkpoint at {path}")
    hf_config = None
    # an HF folder's config.json, also when given the folder's model.safetensors itself
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if (path.is_dir() or path.suffix == ".safetensors") and cfg_file.is_file():
        try:
            hf_config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {cfg_file}: {one_line(e)}") from None
    files = safetensors_files(path)[0] if path.is_dir() else [path]
    sd = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"no DINOv3 checkpoint at {f}")
        if check_hash:
            check_sha256_prefix(f)
        if f.suffix == ".safetensors":
            load_file = safetensors_load()
            try:
                part = load_file(str(f), device="cpu")
            except Exception as e:  # truncated or not a safetensors file
                raise CheckpointError(f"cannot read {f}: {one_line(e)}") from None
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated, not a torch file, or pickled objects beyond tensors
                raise CheckpointError(f"cannot read {f}: {one_line(e)}") from None
        if not isinstance(part, dict) or not all(isinstance(v, Tensor) for v in part.values()):
            raise CheckpointError(f"{f} is not a state dict (a dict of tensors); DINOv3 training checkpoints "
                                  "(teacher/student dicts) are not supported")
        sd.update(part)
    return sd, hf_config
