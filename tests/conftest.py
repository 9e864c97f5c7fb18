"""Shared fixtures and helpers: a tiny model configuration that runs in milliseconds on CPU,
the tiny command line of train.py / sample.py, and what the end-to-end tests share.

Tiny shapes: image 16x16, pixel patch 4 (M = 16 patches of 48 values), ViT patch 4
(V = 16 ViT tokens), rep grid 2 (N = 4 representation tokens), K = 16 codes,
MoT width 32, 2 blocks, 2 heads. The command line (TINY_ARGS) runs the toy preset with the tiny
widths on the 32x32 world these tests were written for (pixel patch 8, ViT patch 4, 2x2 pooling:
4x4 rep tokens, an MLP pixel head of width 32), whatever geometry the toy recipe itself uses.
The tiny model keeps the linear pixel head (pix_head_hidden=0, no per-pixel refinement) that
most hand checks assume; tests of the MLP head and the refinement set them. The command line
keeps the toy's refinement and stochastic sampling tail, so the end-to-end tests run them.
Both also keep one question per understanding image and shared attention, the toy's settings
when these tests were written; the toy's three turns and
per-modality attention have tests of their own (test_data, test_model, test_packing, test_ddp).
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nanorf.config import apply_overrides
from nanorf.presets import get_config

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--config", "toy",
             "--set", "model.mot.dim=32", "--set", "model.mot.depth=2", "--set", "model.mot.heads=2",
             "--set", "model.vit.dim=32", "--set", "model.vit.depth=1", "--set", "model.vit.heads=2",
             "--set", "model.vq.codebook_size=16", "--set", "model.sample.steps=2",
             "--set", "model.image_size=32", "--set", "model.patch_size=8",
             "--set", "model.vit.patch_size=4", "--set", "model.vq.pool=2", "--set", "model.pix_head_hidden=32",
             "--set", "train.batch_size=8", "--set", "train.und_batch_size=4", "--eval-per-kind", "0",
             "--set", "train.und_turns=1", "--set", "model.mot.shared_attention=true"]

TINY = [
    "model.mot.dim=32", "model.mot.depth=2", "model.mot.heads=2",
    "model.vit.dim=32", "model.vit.depth=1", "model.vit.heads=2",
    "model.vq.codebook_size=16", "model.image_size=16", "model.patch_size=4",
    "model.vit.patch_size=4", "model.vq.pool=2", "model.max_text_len=40", "model.pix_head_hidden=0",
    "model.pix_field=0", "train.und_turns=1", "model.mot.shared_attention=true",
]


def _tiny_config(*extra: str):
    return apply_overrides(get_config("toy"), TINY + list(extra))


def _tiny_model(*extra: str, seed: int = 0, randomize_pix_head: bool = True):
    """An RFModel on the tiny config. The pixel head is zero-initialised by design (JiT), which
    would make every x-prediction 0 and every pixel-side test vacuous, so by default it gets
    random weights here."""
    from nanorf.variants import build_model
    torch.manual_seed(seed)
    model = build_model(_tiny_config(*extra).model)
    if randomize_pix_head:
        torch.nn.init.normal_(model.pix_out.weight, std=0.2)
        torch.nn.init.normal_(model.pix_out.bias, std=0.2)
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, on a machine without CUDA (this one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by experiments/gpu_check.sh when a GPU is lent)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    """Factory: tiny_config("model.rf=false", ...) -> Config."""
    return _tiny_config


@pytest.fixture
def tiny_model():
    """Factory: tiny_model("model.rf=false", seed=1) -> RFModel in eval mode."""
    return _tiny_model


@contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def single_thread():
    """Tiny tensors run ~20x faster on one intra-op thread than on two contended ones (measured on
    the shared 2-core box); restored afterwards. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    with threads(1):
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    """single_thread for a whole module, so module-scoped fixtures (a trained checkpoint) get it too."""
    with threads(1):
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, single_thread_module):
    """A tiny checkpoint trained for 2 steps by train.py (TINY_ARGS), once per test module."""
    import train
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train.main([*TINY_ARGS, "--max-steps", "2", "--out-dir", str(out)])
    return out / "ckpt.pt"


def noise_folder(root, n: int = 8) -> Path:
    """n random-noise 32x32 PNGs and captions.jsonl: every patch feature is distinct, so no two
    codes tie exactly. (In the shapes world the black background gives many identical features
    and near-duplicate prototypes; their p_ik tie to the last bit and the argmax then follows the
    float summation order, which differs between 1 and 2 processes.)"""
    import numpy as np
    from PIL import Image
    root = Path(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "text": f"noise image number {i}"}) + "\n")
    return root


def subprocess_env(**extra) -> dict:
    """The environment of a CLI run in a subprocess: the repo importable, one thread each."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def read_log(out_dir) -> list[dict]:
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def expect_cli_error(capsys, fn, prefix: str) -> str:
    """fn() must exit non-zero with exactly one stderr line starting with `prefix`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def state_equal(a: dict, b: dict, atol: float = 0.0, what: str = ""):
    """Two state dicts hold the same keys and tensors: floats within atol, the rest exactly."""
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            if a[k].dtype.is_floating_point:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{what} {k} differs: {m}")
            else:
                assert torch.equal(a[k], b[k]), f"{what} {k}"
