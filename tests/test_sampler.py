"""Tests for nanorf/sampler.py: logit sampling, AR rep tokens against a manual greedy loop and
the CFG formula, the pixel ODE against hand-applied steps, image-to-text decoding, and the
text-to-image entry point on the tiny config."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import nanorf.rep_tokens
from nanorf.config import SamplingSettings as S
from nanorf.model import GenOutput
from nanorf.rep_tokens import DiscreteRep, sample_logits
from nanorf.patches import unpatchify
from nanorf.sampler import answer, sample_pixels, sample_rep_tokens, text_to_image

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- sample_logits -------------------------------------------------------------------------

def test_greedy_at_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_logits(logits, temperature=0.0).tolist() == [1, 0]
    assert sample_logits(logits, top_k=3, temperature=-1.0).tolist() == [1, 0]


def test_top_k_1_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    for _ in range(5):
        got = sample_logits(logits, top_k=1, temperature=5.0, generator=g)
        assert torch.equal(got, logits.argmax(-1))


def test_top_k_never_leaves_the_top_k_and_follows_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 1.5, -3.0]]).repeat(20000, 1)
    ids = sample_logits(logits, top_k=3, temperature=1.0, generator=g)
    assert set(ids.tolist()) <= {0, 1, 4}
    # renormalised softmax over the top 3: e^2 / (e^2 + e^1.5 + e^1)
    p0 = math.exp(2) / (math.exp(2) + math.exp(1.5) + math.exp(1))
    assert (ids == 0).float().mean().item() == pytest.approx(p0, abs=0.015)
    # temperature flattens: at T = 4 the three are close to uniform within the top-k
    ids = sample_logits(logits, top_k=3, temperature=4.0, generator=g)
    p0t = math.exp(0.5) / (math.exp(0.5) + math.exp(0.375) + math.exp(0.25))
    assert (ids == 0).float().mean().item() == pytest.approx(p0t, abs=0.015)
    # without top-k every id with non-negligible mass appears
    ids = sample_logits(logits[:5000], top_k=0, temperature=1.0, generator=g)
    assert {0, 1, 2, 3, 4} <= set(ids.tolist())


def test_same_generator_seed_same_samples():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    a = sample_logits(logits, 10, 1.0, torch.Generator().manual_seed(3))
    b = sample_logits(logits, 10, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---- representation tokens -----------------------------------------------------------------

def _manual_greedy_reps(model, prompt, w):
    codes = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(model.n_rep):
        lc = model.gen_forward([prompt], codes, None, None).rep
        l = lc[:, -1]
        if w != 1.0:
            lu = model.gen_forward([[]], codes, None, None).rep
            l = lu[:, -1] + w * (l - lu[:, -1])
        codes = torch.cat([codes, l.argmax(-1, keepdim=True)], 1)
    return codes


def test_rep_tokens_greedy_equal_manual_loop(tiny_model):
    m = tiny_model()
    prompts = [[65, 66, 67], [68]]
    got = sample_rep_tokens(m, prompts, S(cfg_rep=1.0, top_k=0, temperature=0.0))
    assert got.shape == (2, 4)
    for b, p in enumerate(prompts):
        assert got[b].tolist() == _manual_greedy_reps(m, p, 1.0)[0].tolist()
    # guided: the batched cond/uncond pass equals separate passes
    got = sample_rep_tokens(m, prompts, S(cfg_rep=2.0, top_k=0, temperature=0.0))
    for b, p in enumerate(prompts):
        assert got[b].tolist() == _manual_greedy_reps(m, p, 2.0)[0].tolist()


class FakeRepModel:
    """Known logits: conditional rows depend on the prompt and the step, unconditional
    (empty prompt) rows on the step only. Records every call."""
    n_rep, K = 3, 5

    @property
    def cfg(self):  # what sample_rep_tokens reads: the rep grid's token count
        return SimpleNamespace(grids=lambda size=None: SimpleNamespace(n_rep=self.n_rep))

    def __init__(self):
        self.p = nn.Parameter(torch.zeros(1))
        self.calls = []
        self.rep = DiscreteRep(4, self.K)  # only its draw() and buffer() are used

    def parameters(self):
        yield self.p

    @staticmethod
    def logits(prompt, n):
        seed = (1000 + n) if not prompt else (sum(prompt) * 31 + n)
        return torch.randn(FakeRepModel.K, generator=torch.Generator().manual_seed(seed))

    def gen_forward(self, batch, codes, z, t, drop_rep=None, size=None):
        assert z is None and t is None
        self.calls.append(([list(p) for p in batch], codes.clone()))
        n = codes.shape[1]
        rows = [torch.stack([self.logits(p, i) for i in range(n + 1)]) for p in batch]
        return GenOutput(rep=torch.stack(rows), x_pred=None)                    # (B, n+1, K)


def test_rep_cfg_formula(monkeypatch):
    fake = FakeRepModel()
    seen = []
    real = nanorf.rep_tokens.sample_logits

    def spy(logits, top_k, temperature, generator):
        seen.append(logits.clone())
        return real(logits, top_k, temperature, generator)

    monkeypatch.setattr(nanorf.rep_tokens, "sample_logits", spy)
    prompts, w = [[1, 2], [7]], 2.5
    codes = sample_rep_tokens(fake, prompts, S(cfg_rep=w, top_k=0, temperature=0.0))
    assert codes.shape == (2, 3) and len(seen) == 3
    for step, got in enumerate(seen):
        lu = FakeRepModel.logits([], step)
        for b, p in enumerate(prompts):
            lc = FakeRepModel.logits(p, step)
            assert torch.allclose(got[b], lu + w * (lc - lu), atol=1e-6)
            assert codes[b, step].item() == (lu + w * (lc - lu)).argmax().item()
    # each call held the B conditional rows, then B unconditional rows with empty prompts,
    # and both halves carried the same (conditional) code history
    for batch, c in fake.calls:
        assert batch == prompts + [[], []]
        assert torch.equal(c[:2], c[2:])
    assert torch.equal(fake.calls[-1][1][:2], codes[:, :2])


def test_rep_cfg_changes_the_choice():
    """A case where guidance picks a code neither branch would pick alone."""

    class Fixed(FakeRepModel):
        n_rep = 1

        @staticmethod
        def logits(prompt, n):
            return torch.tensor([1.0, 0.95, 0.0]) if prompt else torch.tensor([1.0, 0.0, 0.0])

    lc, lu = torch.tensor([1.0, 0.95, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    assert lc.argmax() == 0 and lu.argmax() == 0 and (lu + 2 * (lc - lu)).argmax() == 1
    assert sample_rep_tokens(Fixed(), [[3]], S(cfg_rep=1.0, top_k=0, temperature=0.0)).tolist() == [[0]]
    assert sample_rep_tokens(Fixed(), [[3]], S(cfg_rep=2.0, top_k=0, temperature=0.0)).tolist() == [[1]]


# ---- pixels --------------------------------------------------------------------------------

def _z0(m, seed, B=1):
    """The sampler's starting noise for generator seed `seed`, at the model's noise scale."""
    return torch.randn(B, 16, 48, generator=torch.Generator().manual_seed(seed)) * m.cfg.flow.noise_scale


def test_sample_pixels_shape_and_range(tiny_model):
    m = tiny_model()
    codes = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    img = sample_pixels(m, [[65], [66, 67]], codes, S(steps=3, cfg_pix=2.0),
                        generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 16, 16)
    assert img.min() >= -1 and img.max() <= 1
    assert img.std() > 0.05


def test_sample_pixels_one_euler_step_by_hand(tiny_model):
    m = tiny_model()
    codes = torch.tensor([[1, 5, 9, 3]])
    got = sample_pixels(m, [[65, 66]], codes, S(steps=1, cfg_pix=1.0, shift=1.0), generator=torch.Generator().manual_seed(5))
    z0 = _z0(m, 5)
    x = m.gen_forward([[65, 66]], codes, z0, torch.tensor([0.0])).x_pred
    z1 = z0 + 1.0 * (x - z0) / 1.0            # t: 0 -> 1, v = (x - z) / (1 - 0)
    assert torch.allclose(got, unpatchify(z1, 4, 4, 4).clamp(-1, 1), atol=1e-5)


def test_sample_pixels_two_steps_by_hand(tiny_model):
    m = tiny_model()
    codes = torch.tensor([[1, 5, 9, 3]])
    got = sample_pixels(m, [[65]], codes, S(steps=2, cfg_pix=1.0, shift=1.0), generator=torch.Generator().manual_seed(6))
    z0 = _z0(m, 6)
    x0 = m.gen_forward([[65]], codes, z0, torch.tensor([0.0])).x_pred
    z1 = z0 + 0.5 * (x0 - z0)                 # grid [0, 0.5, 1]
    x1 = m.gen_forward([[65]], codes, z1, torch.tensor([0.5])).x_pred
    z2 = z1 + 0.5 * (x1 - z1) / 0.5
    assert torch.allclose(got, unpatchify(z2, 4, 4, 4).clamp(-1, 1), atol=1e-5)


def test_sample_pixels_cfg_by_hand(tiny_model):
    m = tiny_model()
    codes = torch.tensor([[1, 5, 9, 3]])
    got = sample_pixels(m, [[65, 66]], codes, S(steps=1, cfg_pix=3.0, shift=1.0), generator=torch.Generator().manual_seed(5))
    z0 = _z0(m, 5)
    t = torch.tensor([0.0])
    xc = m.gen_forward([[65, 66]], codes, z0, t).x_pred
    xu = m.gen_forward([[]], codes, z0, t, drop_rep=torch.tensor([True])).x_pred   # prompt and reps dropped
    vc, vu = xc - z0, xu - z0
    want = unpatchify(z0 + vu + 3.0 * (vc - vu), 4, 4, 4).clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-4)
    # outside cfg_interval no guidance: equals the conditional sample
    plain = sample_pixels(m, [[65, 66]], codes, S(steps=1, cfg_pix=1.0, shift=1.0), generator=torch.Generator().manual_seed(5))
    off = sample_pixels(m, [[65, 66]], codes, S(steps=1, cfg_pix=3.0, shift=1.0, cfg_interval=(0.5, 1.0)),
                        generator=torch.Generator().manual_seed(5))
    assert torch.allclose(off, plain, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


class OracleModel:
    """x-prediction that is always the same known image: the ideal denoiser of a one-point
    data set. Exposes what sample_pixels uses."""

    def __init__(self, cfg, x_star):
        self.cfg, self.n_pix, self.x_star = cfg, cfg.grid ** 2, x_star
        self.p = nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.p

    def gen_forward(self, batch, codes, z, t, drop_rep=None, size=None):
        return GenOutput(rep=None, x_pred=self.x_star.expand(len(batch), -1, -1))


def test_sample_pixels_with_oracle_lands_on_target(tiny_config):
    cfg = tiny_config().model
    x_star = torch.rand(1, 16, 48, generator=torch.Generator().manual_seed(0)) - 0.5
    img = sample_pixels(OracleModel(cfg, x_star), [[65]], None, S(steps=25, cfg_pix=1.0),
                        generator=torch.Generator().manual_seed(1))
    assert torch.allclose(img, unpatchify(x_star, 4, 4, 4), atol=1e-4)


def test_sample_pixels_with_oracle_lands_on_target_with_coarse_grid(tiny_config):
    """With steps whose last step is longer than t_eps the oracle sample is exact."""
    cfg = tiny_config().model
    x_star = torch.rand(1, 16, 48, generator=torch.Generator().manual_seed(0)) - 0.5
    for solver in ("euler", "heun"):
        img = sample_pixels(OracleModel(cfg, x_star), [[65]], None, S(steps=10, cfg_pix=1.0, solver=solver),
                            generator=torch.Generator().manual_seed(1))
        assert torch.allclose(img, unpatchify(x_star, 4, 4, 4), atol=1e-5)


# ---- entry points --------------------------------------------------------------------------

@pytest.mark.parametrize("rf", ["true", "false"])
def test_text_to_image_runs(tiny_model, rf):
    m = tiny_model(f"model.rf={rf}")
    images, codes = text_to_image(m, ["a red circle at the top left", "a blue square"], steps=2,
                                  generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    if rf == "true":
        assert codes.shape == (2, 4) and codes.dtype == torch.long
        assert (codes >= 0).all() and (codes < 16).all()
    else:
        assert codes is None
    again, codes2 = text_to_image(m, ["a red circle at the top left", "a blue square"], steps=2,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)   # reproducible from the generator


def test_text_to_image_rejects_too_long_prompt(tiny_model):
    from nanorf.tokenizer import TokenizerError
    m = tiny_model()
    with pytest.raises(TokenizerError):
        text_to_image(m, ["x" * 100], steps=1)


def test_answer_returns_strings_and_greedy_is_deterministic(tiny_model):
    m = tiny_model()
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = answer(m, img, ["what color is the circle?", "where?"], max_new_tokens=5)
    b = answer(m, img, ["what color is the circle?", "where?"], max_new_tokens=5)
    assert isinstance(a, list) and len(a) == 2 and all(isinstance(s, str) for s in a)
    assert a == b
    # the first generated byte is the greedy choice at the last question column
    logits, lay = m.und_forward(img[:1], [m.question_ids("where?")], [[]], eos=False)
    first = logits[0, lay.valid[0].sum() - 1].argmax().item()
    one = answer(m, img[:1], ["where?"], max_new_tokens=1)[0]
    assert one == (m.tok.decode([first]) if first < 256 else "")


class _FixedHead(nn.Module):
    """LM head replacement whose argmax everywhere is winners[call index] (the last one repeats)."""

    def __init__(self, vocab, *winners):
        super().__init__()
        self.vocab, self.winners, self.calls = vocab, winners, 0

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab)
        out[..., self.winners[min(self.calls, len(self.winners) - 1)]] = 1.0
        self.calls += 1
        return out


def test_answer_stopping_rules(tiny_model):
    m = tiny_model()
    img = torch.zeros(1, 3, 16, 16)
    V, x = m.tok.vocab_size, ord("x")
    m.lm_head = _FixedHead(V, x)
    assert answer(m, img, ["q?"], max_new_tokens=4) == ["xxxx"]          # capped at max_new_tokens
    m.lm_head = _FixedHead(V, x, m.tok.eos, x)
    assert answer(m, img, ["q?"], max_new_tokens=4) == ["x"]             # EOS ends the answer
    m.lm_head = _FixedHead(V, x, x, m.tok.bor, x)
    assert answer(m, img, ["q?"], max_new_tokens=6) == ["xx"]            # so does any other special
    assert m.lm_head.calls == 3                                          # and decoding stops there


def test_sampling_argv_round_trips_through_the_flags():
    """A driver that hands sampler overrides to a subprocess (experiments.ablate -> nanorf.eval)
    gets back exactly the overrides it started from; no overrides give no flags."""
    import argparse
    from nanorf.sampler import add_sampling_args, sampling_argv, sampling_overrides
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    want = {"steps": 7, "solver": "heun", "cfg_pix": 2.5, "cfg_interval": (0.0, 0.5), "top_k": 3,
            "temperature": 0.7, "cfg_mode": "split", "cfg_pix_rep": 1.5, "cfg_rep": 1.0}
    assert sampling_overrides(p.parse_args(sampling_argv(want))) == want
    assert sampling_argv({}) == [] and sampling_overrides(p.parse_args([])) == {}
