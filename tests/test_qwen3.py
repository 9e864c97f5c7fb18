"""Qwen3 decoders from checkpoint folders (nanorf/qwen3.py, `load_qwen3`) and the Qwen
tokenizer (nanorf/tokenizer.py, `QwenTokenizer`).

Parity: tiny random Qwen3 / Qwen3-MoE models of transformers (dense tied and untied, MoE with
and without normalised top-k, sharded and not, GQA with a head size independent of the width),
saved with `save_pretrained`, loaded by `load_qwen3`: `RFModel.lm_logits` equals transformers'
logits to 1e-4 in float32 (measured: 3e-7 to 5.4e-7), its router logits and load-balancing loss equal
transformers', and its greedy decode through the KV cache gives transformers' tokens. These tests
skip where transformers is not installed (it is in the `test` extra).

Everything else (copied experts, the loaded-parameter record and `new_parameters`, the
tokenizer's special tokens, every error case) runs on folders this file writes by hand with
safetensors (`write_qwen3_folder`, which a stage test can reuse).
"""

import copy
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nanorf.checkpoint import CheckpointError
from nanorf.config import Config, ModelConfig, TrainConfig, ViTConfig, VQConfig
from nanorf.tokenizer import SPECIALS, QwenTokenizer, TokenizerError

pytest.importorskip("safetensors", reason="the Qwen3 loader reads safetensors (the [pretrained] extra)")
pytest.importorskip("tokenizers", reason="the Qwen tokenizer needs the tokenizers package (the [pretrained] extra)")
pytestmark = pytest.mark.usefixtures("single_thread")

# the non-decoder part of the model: the tiny shapes of tests/conftest.py
BASE = ModelConfig(image_size=16, patch_size=4, max_text_len=40,
                   vit=ViTConfig(patch_size=4, dim=32, depth=1, heads=2), vq=VQConfig(codebook_size=16))
N_WORDS = 90      # tokenizer words w0..w89; two added special tokens take ids 90 and 91
EOT, IM_END = 90, 91
# head size 12 with width 32 and 4 query heads over 2 key/value heads: Qwen3's head_dim and GQA
SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, max_position_embeddings=64)
MOE = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)
TOL = 1e-4


def write_tokenizer(folder, pad: bool = True):
    """A word-level tokenizer.json with Qwen's two special tokens after the words, and
    tokenizer_config.json naming the pad token as Qwen3's does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(N_WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(Path(folder) / "tokenizer.json"))
    if pad:
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "bos_token": None}))


def qwen3_state_dict(moe: bool = False, tied: bool = True, seed: int = 0) -> dict:
    """Random tensors named and shaped as a Qwen3 (or Qwen3-MoE) checkpoint of SHAPE."""
    g = torch.Generator().manual_seed(seed)
    D, H, Hkv, hd, F = 32, 4, 2, 12, 48

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1 + w(n)

    sd = {"model.embed_tokens.weight": w(96, D, std=0.5), "model.norm.weight": norm(D)}
    if not tied:
        sd["lm_head.weight"] = w(96, D, std=0.5)
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D),
                   p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(Hkv * hd, D),
                   p + "self_attn.v_proj.weight": w(Hkv * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
                   p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
        if moe:
            sd[p + "mlp.gate.weight"] = w(4, D, std=1.0)
            for j in range(4):
                sd.update({p + f"mlp.experts.{j}.gate_proj.weight": w(16, D), p + f"mlp.experts.{j}.up_proj.weight": w(16, D),
                           p + f"mlp.experts.{j}.down_proj.weight": w(D, 16)})
        else:
            sd.update({p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                       p + "mlp.down_proj.weight": w(D, F)})
    return sd


def write_qwen3_folder(folder, moe: bool = False, tied: bool = True, shards: int = 1, seed: int = 0,
                       sd: dict | None = None, **config) -> Path:
    """A Hugging Face Qwen3 checkpoint folder written without transformers: config.json,
    model.safetensors (or `shards` files and the index), tokenizer.json."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = qwen3_state_dict(moe, tied, seed) if sd is None else sd
    hf = dict(SHAPE, model_type="qwen3_moe" if moe else "qwen3", tie_word_embeddings=tied, hidden_act="silu",
              rope_theta=1e6, bos_token_id=EOT, eos_token_id=IM_END, **(MOE if moe else {}))
    hf.update(config)
    (folder / "config.json").write_text(json.dumps(hf))
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
    else:
        keys, weight_map = sorted(sd), {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k].contiguous() for k in keys[s::shards]}
            save_file(part, str(folder / name))
            weight_map.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)
    return folder


def _load(folder, **kw):
    from nanorf.pretrained import load_qwen3
    return load_qwen3(folder, BASE, **kw).eval()


# ---- parity with transformers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed: the parity tests compare "
                                                      "against its Qwen3ForCausalLM / Qwen3MoeForCausalLM")


def hf_model(transformers, moe: bool, tied: bool, norm_topk_prob: bool = True, seed: int = 0):
    """A tiny transformers Qwen3 / Qwen3-MoE with every weight random (norm gains around 1, routers
    wide enough that no top-k choice is a near tie), in float32."""
    torch.manual_seed(seed)
    kw = dict(SHAPE, tie_word_embeddings=tied, rope_theta=1e6, bos_token_id=EOT, eos_token_id=IM_END)
    if moe:
        cfg = transformers.Qwen3MoeConfig(**kw, **MOE, norm_topk_prob=norm_topk_prob)
        m = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("mlp.gate.weight") else 0.1))
    return m.float().eval()


def save_hf(m, folder, shard: bool = False) -> Path:
    kw = {"max_shard_size": "20KB"} if shard else {}
    m.save_pretrained(str(folder), **kw)
    write_tokenizer(folder)
    assert (Path(folder) / "model.safetensors.index.json").is_file() == shard
    return Path(folder)


def _ids_and_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 13), generator=g)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, 9:] = False  # the second row is right-padded
    return ids, valid


CASES = {  # name: (moe, tied, norm_topk_prob, sharded, load_qwen3 overrides)
    "dense-tied": (False, True, True, False, {}),
    "dense-untied-sharded": (False, False, True, True, {}),
    "dense-tied-per-modality-attention": (False, True, True, False, {"shared_attention": False}),
    "moe-untied-norm-topk": (True, False, True, False, {}),
    "moe-tied-no-norm-topk-sharded": (True, True, False, True, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lm_logits_equal_transformers(transformers, tmp_path, case):
    moe, tied, norm_topk, shard, overrides = CASES[case]
    hf = hf_model(transformers, moe, tied, norm_topk)
    m = _load(save_hf(hf, tmp_path, shard), **overrides)
    assert m.cfg.tie_lm_head == tied and (m.lm_head.weight is m.tok_emb.weight) == tied
    assert m.cfg.mot.n_routed_experts == (4 if moe else 0) and m.cfg.mot.norm_topk_prob == (norm_topk if moe else True)
    assert (m.cfg.mot.head_dim, m.cfg.mot.kv_heads, m.cfg.mot.rope_base) == (12, 2, 1e6)
    ids, valid = _ids_and_mask()
    with torch.no_grad():
        want = hf(ids, attention_mask=valid.long()).logits
        got = m.lm_logits(ids, valid)
    assert got.shape == (2, 13, m.tok.vocab_size) and m.tok.vocab_size > 96
    diff = (got[..., :96] - want).abs()[valid].max().item()
    print(f"{case}: max |nanorf - transformers| = {diff:.2e}")
    assert diff <= TOL, diff
    # the unpadded row alone gives the same logits as in the padded batch
    with torch.no_grad():
        alone = m.lm_logits(ids[1:, :9])
    assert torch.allclose(alone, got[1:, :9], atol=1e-5)


def test_router_logits_and_load_balancing_loss_equal_transformers(transformers, tmp_path):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    from nanorf.moe import load_balancing_loss
    hf = hf_model(transformers, moe=True, tied=False)
    m = _load(save_hf(hf, tmp_path))
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        log = m.mot.router_log()
        m.lm_logits(ids, router_log=log)
    und = log[0]
    assert [len(g) for g in log] == [2, 0, 0]  # text is UND only: one entry per layer in its pool
    for ours, theirs in zip(und, out.router_logits):
        assert torch.allclose(ours, theirs, atol=1e-5)
    aux = m.mot.aux_loss(log)
    assert abs(aux.item() - out.aux_loss.item()) < 1e-6, (aux.item(), out.aux_loss.item())
    assert m.cfg.mot.aux_loss_coef == 0.01  # router_aux_loss_coef from config.json
    # and the function itself, on arbitrary logits of three layers
    layers = tuple(torch.randn(17, 4, generator=torch.Generator().manual_seed(s)) * 2 for s in range(3))
    for k in (1, 2, 3):
        assert torch.allclose(load_balancing_loss(torch.cat(layers), k), load_balancing_loss_func(layers, 4, k),
                              atol=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cached_greedy_decode_equals_full_pass_and_transformers(transformers, tmp_path, moe):
    """GQA (2 kv heads for 4 query heads): prefill + one token at a time through the KV cache
    gives the full pass's logits, and greedy decoding gives transformers' generate() tokens."""
    from nanorf.layout import Token, build_layout
    from nanorf.mot import UND
    from nanorf.sampler import prefill, step_tokens
    hf = hf_model(transformers, moe=moe, tied=True)
    m = _load(save_hf(hf, tmp_path))
    prompt = torch.randint(0, N_WORDS, (1, 5), generator=torch.Generator().manual_seed(3))
    n_new = 6
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        lay = build_layout([[Token(int(t), pos=i) for i, t in enumerate(prompt[0])]], left=False)
        h, cache = prefill(m, lay, m.tok_emb(lay.tokens), n_new)
        assert cache.k.shape[2] == 2  # (blocks, B, Hkv, len, hd)
        seq, pos = prompt[0].tolist(), lay.pos[:, -1:] + 1
        logits = m.lm_head(h[:, -1])
        for _ in range(n_new):
            nxt = logits.argmax(-1)
            seq.append(int(nxt))
            h = step_tokens(m, cache, m.tok_emb(nxt[:, None]), UND, pos, cache.mask(1, bidir=False), write=True)
            logits, pos = m.lm_head(h[:, 0]), pos + 1
            full = m.lm_logits(torch.tensor([seq]))[:, -1]
            assert torch.allclose(logits, full, atol=1e-5)
    assert seq == want[0].tolist()


def test_answer_cached_equals_reference_on_a_loaded_model(transformers, tmp_path):
    """sampler.answer on a Qwen3-loaded model (Qwen tokenizer, GQA cache, random ViT): cached and
    uncached decoding agree; they stop on Qwen's special tokens via is_special."""
    from nanorf.sampler import answer
    m = _load(save_hf(hf_model(transformers, moe=False, tied=False), tmp_path))
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    qs = ["w1 w2 w3", "w4"]
    a = answer(m, imgs, qs, max_new_tokens=6, kv_cache=True)
    b = answer(m, imgs, qs, max_new_tokens=6, kv_cache=False)
    assert a == b and all(isinstance(x, str) for x in a)


# ---- what the loader fills, and the record of it -------------------------------------------------

def _names(m, params):
    ids = {id(p) for p in params}
    return {n for n, p in m.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("moe", [False, True])
def test_experts_are_identical_copies_at_load(tmp_path, moe):
    m = _load(write_qwen3_folder(tmp_path, moe=moe), shared_attention=False)
    sd = m.state_dict()
    for i in range(2):
        for g in (1, 2):
            for part in ("ffn", "attn_in", "attn_out"):
                pre0, pre = f"mot.blocks.{i}.{part}.0.", f"mot.blocks.{i}.{part}.{g}."
                keys = [k for k in sd if k.startswith(pre0)]
                assert keys
                for k in keys:
                    assert torch.equal(sd[k], sd[pre + k[len(pre0):]]), k
        assert torch.equal(sd["mot.norm.0.weight"], sd[f"mot.norm.{g}.weight"])
    # copies, not aliases: training one expert leaves the others alone
    assert m.mot.blocks[0].ffn[1].norm.weight.data_ptr() != m.mot.blocks[0].ffn[0].norm.weight.data_ptr()
    # the checkpoint's tensors themselves, e.g. q/k/v stacked into qkv
    ck = qwen3_state_dict(moe=moe)
    qkv = torch.cat([ck[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(sd["mot.blocks.1.attn_in.2.qkv.weight"], qkv)
    if moe:
        up = torch.stack([ck[f"model.layers.0.mlp.experts.{j}.up_proj.weight"] for j in range(4)])
        assert torch.equal(sd["mot.blocks.0.ffn.1.up"], up)


def test_new_parameters_are_exactly_what_was_not_loaded(tmp_path):
    m = _load(write_qwen3_folder(tmp_path, tied=False))
    everything = {n for n, _ in m.named_parameters()}
    new = _names(m, m.new_parameters())
    assert new == everything - m.loaded
    for n in new:  # the non-text parts of RF: ViT, connector, rep and pixel embeddings and heads
        assert n.startswith(("vit.", "connector.", "rep.", "rep_pos", "pix_emb", "pix_head", "t_emb")), n
    for want in ("vit.patch_embed.proj.weight", "connector.fc1.weight", "rep_pos", "rep.head.weight", "t_emb.0.weight"):
        assert any(n.startswith(want) for n in new), want
    assert not any(n.startswith(("mot.", "tok_emb", "lm_head")) for n in new)
    # the ViT loaded separately (load_dinov3): record it, and it is no longer new
    m.record_loaded(n for n in everything if n.startswith("vit."))
    assert not any(n.startswith("vit.") for n in _names(m, m.new_parameters()))
    with pytest.raises(ValueError, match="not parameters"):
        m.record_loaded(["no.such.weight"])
    # the optimiser gives exactly them the multiplier
    opt = m.configure_optimizer(TrainConfig(new_param_lr_mult=4.0))
    mult = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    newids = {id(p) for p in m.new_parameters()}
    assert all(mult[id(p)] == (4.0 if id(p) in newids else 1.0) for p in m.parameters())


def test_without_copies_the_rep_and_pix_groups_are_new(tmp_path):
    m = _load(write_qwen3_folder(tmp_path), copy_experts=False, shared_attention=False)
    new = _names(m, m.new_parameters())
    for g in (1, 2):
        assert f"mot.norm.{g}.weight" in new and f"mot.blocks.0.ffn.{g}.up.weight" in new
        assert f"mot.blocks.1.attn_in.{g}.qkv.weight" in new and f"mot.blocks.1.attn_out.{g}.weight" in new
        assert not torch.equal(m.mot.blocks[0].ffn[g].up.weight, m.mot.blocks[0].ffn[0].up.weight)
    assert not any(re.search(r"\.(ffn|attn_in|attn_out)\.0\.", n) for n in new)  # the understanding group
    assert "mot.norm.0.weight" not in new


def test_loaded_record_travels_with_the_state_dict(tmp_path):
    from nanorf.variants import build_model
    m = _load(write_qwen3_folder(tmp_path))
    sd = m.state_dict()
    # a checkpoint rebuilds the model from its config (through a dict, as checkpoints store it)
    cfg = Config.from_dict(json.loads(json.dumps(Config(model=m.cfg).to_dict()))).model
    fresh = build_model(cfg)
    assert fresh.loaded is None and fresh.tok.vocab_size == m.tok.vocab_size and fresh.cfg.tie_lm_head
    fresh.load_state_dict(sd)
    assert fresh.loaded == m.loaded
    assert _names(fresh, fresh.new_parameters()) == _names(m, m.new_parameters())
    assert copy.deepcopy(m).loaded == m.loaded  # the sampling EMA is a deep copy
    # a state dict without a record (trained from scratch) clears it: the module-based set again
    plain = {k: v for k, v in sd.items() if k != "loaded_names"}
    fresh.load_state_dict(plain)
    assert fresh.loaded is None
    assert _names(fresh, fresh.new_parameters()) == _names(fresh, fresh.new_by_module())


def test_tied_head_is_the_embedding_and_new_rows_are_the_mean(tmp_path):
    m = _load(write_qwen3_folder(tmp_path, tied=True))
    assert m.lm_head.weight is m.tok_emb.weight
    assert "lm_head.weight" in m.loaded and "tok_emb.weight" in m.loaded
    emb = qwen3_state_dict()["model.embed_tokens.weight"]
    W = m.tok_emb.weight.detach()
    assert torch.equal(W[:96], emb)
    # appended ids (nanorf's [BOI] [EOI] [BOR] [BOP] and the rounding) start at the mean of the
    # tokenizer's rows (0..91; Qwen's unused rows 92..95 are not text)
    assert torch.allclose(W[96:], emb[:N_WORDS + 2].mean(0).expand(W.shape[0] - 96, -1), atol=1e-6)


def test_overrides_and_config(tmp_path):
    m = _load(write_qwen3_folder(tmp_path, moe=True), shared_attention=False, image_size=32, aux_loss_coef=0.0)
    c = m.cfg
    assert (c.image_size, c.mot.shared_attention, c.mot.aux_loss_coef) == (32, False, 0.0)
    assert (c.mot.dim, c.mot.depth, c.mot.heads, c.mot.kv_heads, c.mot.head_size) == (32, 2, 4, 2, 12)
    assert (c.mot.ffn_hidden, c.mot.moe_hidden, c.mot.n_routed_experts, c.mot.top_k) == (48, 16, 4, 2)
    assert c.tokenizer == str(Path(tmp_path).resolve())
    with pytest.raises(TypeError, match="unknown override"):
        _load(tmp_path, no_such_field=1)
    # the checkpoint decides the decoder's shape, whatever the given config's was; the rest stays
    from nanorf.config import MoTConfig
    from nanorf.pretrained import load_qwen3
    d = write_qwen3_folder(tmp_path / "dense")
    m = load_qwen3(d, replace(BASE, mot=MoTConfig(n_routed_experts=8, moe_hidden=4, shared_attention=False)))
    assert m.cfg.mot.n_routed_experts == 0 and m.cfg.mot.shared_attention is False


# ---- the tokenizer ---------------------------------------------------------------------------------

def _bpe_folder(folder, config: dict | None = None, tcfg: dict | None = None):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on a few sentences, with two added
    special tokens, and optional config.json / tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["a red circle at the top left", "two blue squares", "what color is the circle?"] * 5,
                            trainer)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(folder) / "tokenizer.json"))
    for name, d in (("config.json", config), ("tokenizer_config.json", tcfg)):
        if d is not None:
            (Path(folder) / name).write_text(json.dumps(d))
    return tok


def test_qwen_tokenizer_maps_specials_to_qwens_and_appends_the_rest(tmp_path):
    raw = _bpe_folder(tmp_path, config={"vocab_size": 512, "bos_token_id": None, "eos_token_id": [0, 1]},
                      tcfg={"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    eot, im_end = raw.token_to_id("<|endoftext|>"), raw.token_to_id("<|im_end|>")
    tok = QwenTokenizer(tmp_path)
    assert tok.n_text == raw.get_vocab_size() and tok.text_vocab == 512
    assert tok.pad == eot                      # tokenizer_config's pad token
    assert tok.eos == 0                        # config.json's eos (the first of a list) wins
    # [BOS] is null in both files: appended, with [BOI] [EOI] [BOR] [BOP], after the 512 rows
    assert [tok.bos, tok.boi, tok.eoi, tok.bor, tok.bop] == [512, 513, 514, 515, 516]
    assert tok.vocab_size == 520 and tok.vocab_size % 8 == 0
    for i in (tok.bos, tok.boi, tok.bop, tok.pad, im_end, tok.n_text, 519):
        assert tok.is_special(i), i
    assert not tok.is_special(5)
    text = "a red circle at the top left"
    ids = tok.encode(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids and len(ids) < len(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos] + ids + [im_end, tok.bor]) == text     # specials skipped
    with pytest.raises(TokenizerError, match="tokens but this model holds at most 2"):
        tok.encode(text, max_len=2)


def test_qwen_tokenizer_without_config_files_appends_all_specials(tmp_path):
    raw = _bpe_folder(tmp_path)
    tok = QwenTokenizer(tmp_path / "tokenizer.json")  # the file itself works too
    n = raw.get_vocab_size()
    assert [getattr(tok, s.strip("[]").lower()) for s in SPECIALS] == list(range(n, n + len(SPECIALS)))
    assert tok.vocab_size == (n + len(SPECIALS) + 7) // 8 * 8


def test_qwen_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        QwenTokenizer(tmp_path)
    _bpe_folder(tmp_path, config={"vocab_size": 10})
    with pytest.raises(TokenizerError, match="only 10 rows"):
        QwenTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        QwenTokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError) as e:
        QwenTokenizer(tmp_path)
    assert 'pip install -e ".[pretrained]"' in str(e.value)


def test_byte_tokenizer_is_special():
    from nanorf.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    assert not tok.is_special(0) and not tok.is_special(255)
    assert all(tok.is_special(i) for i in (tok.bos, tok.eos, tok.pad, tok.vocab_size - 1))


# ---- errors: one line each ------------------------------------------------------------------------

def _error(folder, match, **kw) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        _load(folder, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_loads_hand_written_folders(tmp_path):
    """The hand-written folders load (the error tests below start from them)."""
    for moe, shards in ((False, 1), (True, 3)):
        m = _load(write_qwen3_folder(tmp_path / f"{moe}{shards}", moe=moe, shards=shards))
        with torch.no_grad():
            assert torch.isfinite(m.lm_logits(torch.tensor([[1, 2, 3]]))).all()


def test_missing_truncated_and_foreign_folders(tmp_path):
    _error(tmp_path / "nothing", "no Qwen3 checkpoint folder")
    d = write_qwen3_folder(tmp_path / "a")
    (d / "config.json").unlink()
    _error(d, "cannot read .*config.json")
    d = write_qwen3_folder(tmp_path / "b", model_type="llama")
    _error(d, "'llama' model, not Qwen3")
    d = write_qwen3_folder(tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    _error(d, "cannot read .*model.safetensors")
    d = write_qwen3_folder(tmp_path / "d", shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    _error(d, "shard .* is missing")
    d = write_qwen3_folder(tmp_path / "e")
    (d / "model.safetensors").unlink()
    _error(d, "holds no model.safetensors")
    d = write_qwen3_folder(tmp_path / "f")
    (d / "tokenizer.json").unlink()
    _error(d, "no tokenizer.json")


def test_shape_missing_and_unexpected_tensors(tmp_path):
    _error(write_qwen3_folder(tmp_path / "a", intermediate_size=40), r"shape mot\.blocks\.0\.ffn\.0\.gate\.weight")
    sd = qwen3_state_dict()
    del sd["model.layers.1.self_attn.k_norm.weight"]
    _error(write_qwen3_folder(tmp_path / "b", sd=sd), r"missing model\.layers\.1\.self_attn\.k_norm\.weight")
    sd = dict(qwen3_state_dict(), **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    _error(write_qwen3_folder(tmp_path / "c", sd=sd), r"unexpected model\.layers\.0\.mlp\.extra\.weight")
    # a dense checkpoint whose config says MoE: the MoE tensors are missing, the dense ones unexpected
    msg = _error(write_qwen3_folder(tmp_path / "d", sd=qwen3_state_dict(moe=False), model_type="qwen3_moe", **MOE),
                 "missing")
    assert "unexpected" in msg
    # more layers than the tensors hold
    _error(write_qwen3_folder(tmp_path / "e", num_hidden_layers=3), r"missing model\.layers\.2\.")
    # embedding rows other than config.json's vocab_size
    sd = dict(qwen3_state_dict(), **{"model.embed_tokens.weight": torch.zeros(100, 32)})
    _error(write_qwen3_folder(tmp_path / "f", sd=sd), r"shape tok_emb\.weight")
    # tied, but the stored head is not the embedding
    sd = dict(qwen3_state_dict(), **{"lm_head.weight": torch.zeros(96, 32)})
    _error(write_qwen3_folder(tmp_path / "g", sd=sd), "lm_head.weight differs")


def test_unsupported_features_are_named(tmp_path):
    _error(write_qwen3_folder(tmp_path / "a", use_sliding_window=True, sliding_window=8), "sliding-window")
    _error(write_qwen3_folder(tmp_path / "b", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling")
    _error(write_qwen3_folder(tmp_path / "c", attention_bias=True), "attention biases")
    _error(write_qwen3_folder(tmp_path / "d", moe=True, mlp_only_layers=[1]), "dense layers among the MoE")
    _error(write_qwen3_folder(tmp_path / "e", num_key_value_heads=3), "cannot build its model")


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    d = write_qwen3_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    msg = _error(d, "safetensors")
    assert 'pip install -e ".[pretrained]"' in msg
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    msg = _error(d, "tokenizers")
    assert 'pip install -e ".[pretrained]"' in msg


def test_preset_shaped_like_qwen3_0p6b():
    from nanorf.presets import get_config
    from nanorf.model import RFModel
    cfg = get_config("qwen3_0p6b").model
    with torch.device("meta"):
        m = RFModel(cfg)
    # Qwen3-0.6B: 0.44B parameters besides the embedding, in one expert group
    one_group = sum(p.numel() for n, p in m.named_parameters()
                    if n.startswith("mot.") and not any(f"{x}.{g}." in n for x in ("ffn", "norm") for g in (1, 2)))
    assert round(one_group / 1e9, 2) == 0.44
    assert m.mot.blocks[0].attn_in[0].qkv.weight.shape == ((16 + 2 * 8) * 128, 1024)
    assert m.lm_head.weight is m.tok_emb.weight
    assert replace(cfg.vit, mask_k_bias=True) == cfg.vit and cfg.vit.n_storage_tokens == 4
