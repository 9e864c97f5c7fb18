"""What only runs on a CUDA GPU: the model on the GPU against the same model on the CPU,
bfloat16 autocast (train.py's on CUDA), the fused AdamW, train.py and sample.py with
--device cuda, and the fast sampler against the reference on the GPU.

Marked `cuda` (registered in pyproject.toml): skipped without CUDA (conftest.py), run by
`pytest -m cuda` and by experiments/gpu_check.sh. Nothing here has run on a GPU yet: the
machine these tests were written on has none (README, "GPU check").
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from nanorf.checkpoint import load_checkpoint
from nanorf.sampler import text_to_image
from nanorf.stream import Stream
from nanorf.targets import RepresentationTargets
from nanorf.variants import build_model

from conftest import TINY_ARGS, read_log

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
# the tiny model on the 32 px shapes world (TINY's 16 px canvas is below what the world draws)
WORLD32 = ("model.image_size=32", "model.patch_size=8", "model.vq.pool=2")
PROMPTS = ["a red circle at the top left and a blue", "a green triangle"]  # tiny model: <= 40 bytes


@pytest.fixture
def exact_float32():
    """TF32 off: cuDNN convolutions (the patch embeddings) use it by default, and TF32 keeps
    10 mantissa bits, so a float32 comparison against the CPU would fail on rounding alone."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def to(batch, device):
    """A GenBatch / UndBatch with every tensor field on `device`."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if torch.is_tensor(getattr(batch, f.name))})


def model_and_batches(tiny_config):
    """A tiny model and one labelled generation + understanding batch, all on the CPU. The
    targets are labelled once, so both devices train on the same codes (the online VQ would
    otherwise take a second step on the second labelling)."""
    cfg = tiny_config(*WORLD32)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    stream = Stream(cfg, model)
    gen = stream.gen_batch(0, range(4), stream.draws(0), "cpu")
    und = stream.und_batch(0, range(2), "cpu")
    RepresentationTargets(cfg.model, model.vit).label(gen)
    return cfg, model, gen, und


def test_forward_and_backward_on_cuda_match_cpu(tiny_config, exact_float32):
    cfg, cpu_model, gen, und = model_and_batches(tiny_config)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    loss_c, parts_c = cpu_model(gen, und)
    loss_g, parts_g = gpu_model(to(gen, CUDA), to(und, CUDA))
    for k in ("lm", "rep", "fm"):
        assert getattr(parts_g, k).item() == pytest.approx(getattr(parts_c, k).item(), rel=1e-4, abs=1e-5), k
    loss_c.backward()
    loss_g.backward()
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_trains_close_to_float32(tiny_config):
    """train.py's CUDA step runs forward and backward under bfloat16 autocast: the loss stays
    within bf16 rounding of the float32 one, the weights and their gradients stay float32,
    and the optimiser is the fused AdamW."""
    cfg, model, gen, und = model_and_batches(tiny_config)
    model = model.to(CUDA)
    gen, und = to(gen, CUDA), to(und, CUDA)
    with torch.no_grad():
        ref = model(gen, und)[0].item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = model(gen, und)
        loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=3e-2)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    opt = model.configure_optimizer(cfg.train)
    assert opt.defaults.get("fused") is True
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_sampler_equals_reference_on_cuda(tiny_model, exact_float32):
    m = tiny_model().to(CUDA)
    kw = dict(steps=4, temperature=1.0)
    a, ca = text_to_image(m, PROMPTS, torch.Generator().manual_seed(3), kv_cache=True, **kw)
    b, cb = text_to_image(m, PROMPTS, torch.Generator().manual_seed(3), kv_cache=False, **kw)
    assert a.device.type == "cuda" and a.shape == (2, 3, 16, 16)
    assert torch.equal(ca, cb)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_bf16_sampling_runs_on_cuda(tiny_model):
    """Both samplers under bfloat16 autocast (the KV cache then holds bf16 keys and values)."""
    m = tiny_model().to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for cache in (True, False):
            x, codes = text_to_image(m, PROMPTS, torch.Generator().manual_seed(0), kv_cache=cache, steps=3)
            assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
            assert codes.shape == (2, m.n_rep)


def test_train_and_sample_cli_on_cuda(tmp_path):
    """train.py --device cuda (bf16 autocast, fused AdamW) for 3 steps, then sample.py --device cuda."""
    out = tmp_path / "run"
    train.main([*TINY_ARGS, "--device", "cuda", "--max-steps", "3", "--out-dir", str(out),
                "--set", "train.log_every=1"])
    steps = [r for r in read_log(out) if "fm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in steps for k in ("lm", "rep", "fm"))
    ck = load_checkpoint(out / "ckpt.pt")  # saved from the GPU, read on the CPU
    assert ck["step"] == 3 and all(t.device.type == "cpu" for t in ck["model"].values() if torch.is_tensor(t))
    png = tmp_path / "red.png"
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "a red circle", "--out", str(png), "--device", "cuda"])
    with Image.open(png) as im:
        assert im.size == (32, 32)


def test_packed_loss_with_flex_block_mask_equals_the_dense_mask(tiny_model, exact_float32):
    """On CUDA packed rows attend through flex_attention's block mask (nanorf/packing.py); the
    loss and gradients must equal the same pack on the CPU, where the dense mask runs."""
    from test_packing import _gen, _und
    from nanorf.packing import gen_doc, packed_loss, split_gen, split_und, stack, und_doc
    cpu = tiny_model()
    cpu.train()
    gen, und = _gen(cpu, 3, (16, 16), 0), _und(cpu, 2, (16, 8), 1)
    docs = [gen_doc(cpu, b) for b in split_gen(gen)] + [und_doc(cpu, b) for b in split_und(und)]
    p = stack(docs)
    gpu = copy.deepcopy(cpu).to(CUDA)
    out = {}
    for name, m, pk in (("cpu", cpu, p), ("cuda", gpu, _to(p, docs, CUDA))):
        m.zero_grad()
        loss, _ = packed_loss(m, pk, 3, 2)
        loss.backward()
        out[name] = (loss.item(), {n: q.grad.cpu() for n, q in m.named_parameters() if q.grad is not None})
    assert out["cpu"][0] == pytest.approx(out["cuda"][0], abs=1e-4)
    for n, g in out["cpu"][1].items():
        assert torch.allclose(g, out["cuda"][1][n], atol=1e-3), n


def _to(p, docs, device):
    """The same pack with its documents' tensors on `device`."""
    from nanorf.packing import stack
    moved = []
    for d in docs:
        d = dataclasses.replace(d)
        if d.gen is not None:
            d.gen = dataclasses.replace(d.gen, images=d.gen.images.to(device), targets=d.gen.targets.to(device),
                                        t=d.gen.t.to(device), eps=d.gen.eps.to(device))
        if d.und is not None:
            d.und = dataclasses.replace(d.und, images=d.und.images.to(device))
        moved.append(d)
    return stack(moved)
