"""Shared fixtures: a tiny model configuration that runs in milliseconds on CPU.

Tiny shapes: image 16x16, pixel patch 4 (M = 16 patches of 48 values), ViT patch 4
(V = 16 ViT tokens), rep grid 2 (N = 4 representation tokens), K = 16 codes,
MoT width 32, 2 blocks, 2 heads.
"""

import pytest
import torch

from nanorf.config import apply_overrides, get_config

TINY = [
    "model.mot.dim=32", "model.mot.depth=2", "model.mot.heads=2",
    "model.vit.dim=32", "model.vit.depth=1", "model.vit.heads=2",
    "model.vq.codebook_size=16", "model.image_size=16", "model.patch_size=4",
    "model.vit.patch_size=4", "model.max_text_len=40",
]


def _tiny_config(*extra: str):
    return apply_overrides(get_config("toy"), TINY + list(extra))


def _tiny_model(*extra: str, seed: int = 0, randomize_pix_head: bool = True):
    """An RFModel on the tiny config. The pixel head is zero-initialised by design (JiT), which
    would make every x-prediction 0 and every pixel-side test vacuous, so by default it gets
    random weights here."""
    from nanorf.model import RFModel
    torch.manual_seed(seed)
    model = RFModel(_tiny_config(*extra).model)
    if randomize_pix_head:
        torch.nn.init.normal_(model.pix_head.weight, std=0.2)
        torch.nn.init.normal_(model.pix_head.bias, std=0.2)
    return model.eval()


@pytest.fixture
def tiny_config():
    """Factory: tiny_config("model.rf=false", ...) -> Config."""
    return _tiny_config


@pytest.fixture
def tiny_model():
    """Factory: tiny_model("model.rf=false", seed=1) -> RFModel in eval mode."""
    return _tiny_model


@pytest.fixture
def single_thread():
    """Tiny tensors run ~20x faster on one intra-op thread than on two contended ones (measured on
    the shared 2-core box); restored afterwards. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
