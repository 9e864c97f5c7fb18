"""NaViT-style packing: examples of any size in rows of a fixed token budget (docs/method.md,
"Packing").

The paper trains on mixed resolutions and aspect ratios, packed at 32,768 tokens per GPU. A
padded batch (layout.py) holds one example per row, every row as long as the longest: with
mixed sizes most of it is padding. A pack holds whole examples back to back, each a
*document*, generation and understanding alike:

    row 0   [BOS] prompt [BOR] r.. [BOP] p..  | [BOS][BOI] v.. [EOI] q a [EOS] | [BOS] prompt ..  | PAD
            <----------- doc 0 ------------->   <------------- doc 1 -------->   <-- doc 2 ..-->

Each document keeps its own RoPE positions (they restart at 0), its own image grids and 2-D
positions (model.py: functions of normalised coordinates), and its own CFG drops. The attention
mask is today's rule inside a document and nothing across documents (mot.attention_mask with
`doc`): a dense boolean mask for SDPA, or on CUDA a flex_attention block mask, which skips the
tiles between documents instead of computing and masking them.

Losses keep the padded path's normalisation, so a packed step equals the same examples run
through RFModel.forward: every example's L_Rep and L_FM is its own mean (over its tokens and
elements) and its L_LM the mean over its answer; a pack's loss sums them and divides by the
number of generation / understanding examples of the whole step on this rank (`n_gen`,
`n_und`), so the packs of a step add up to the step's means. Packing is first-fit in the
examples' order: deterministic, and padding only at the end of each row.

Scope (our choice): the discrete RF model and the pixel-only baseline pack; Table 3's
continuous and REPA variants train padded (`check_packing`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .flow import add_noise, fm_loss
from .layout import NO_TARGET, PAD_TOKEN, Layout, Token, gen_row, und_row
from .config import ModelConfig
from .model import GenBatch, LossParts, RFModel, UndBatch
from .mot import PAD, DocMasks, attention_mask, attention_mask_mod, flex_attention
from .patches import patchify


def check_packing(cfg: ModelConfig, budget: int, und_turns: int = 1) -> None:
    """ValueError, in one line, for a model the packed path does not cover or a budget that cannot
    hold the longest example at the config's size (prompts, questions and answers of max_text_len
    bytes; und_turns of them per understanding example)."""
    if cfg.rf and cfg.rep_target != "discrete" or cfg.repa_weight:
        raise ValueError("--tokens-per-rank packs the RF model and --no-rf only; the continuous-target "
                         "and REPA variants (Table 3) train padded")
    g = cfg.grids()
    longest = max(1 + cfg.max_text_len + (1 + g.n_rep if cfg.rf else 0) + 1 + g.n_pix,   # gen_row
                  3 + g.n_vit + und_turns * (2 * cfg.max_text_len + 1))                  # und_row
    if budget < longest:
        raise ValueError(f"--tokens-per-rank {budget} cannot hold the longest example of this config "
                         f"({longest} tokens at {cfg.image_size} px with {cfg.max_text_len}-token texts)")


def first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of examples per pack: each example, in order, goes into the first pack with room."""
    packs, room = [], []
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"an example of {n} tokens does not fit --tokens-per-rank {budget}")
        for p, r in enumerate(room):
            if n <= r:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(budget - n)
    return packs


def split_to(packs: list[list[int]], n: int) -> list[list[int]]:
    """The same examples in exactly n packs (n <= number of examples), by halving the fullest pack
    until there are n: under FSDP every forward gathers weights collectively, so all ranks must
    run the same number of rows (train.py agrees on the largest count). Halves keep the order."""
    packs = [list(p) for p in packs]
    if n > sum(len(p) for p in packs):
        raise ValueError(f"cannot make {n} packs of {sum(len(p) for p in packs)} examples")
    while len(packs) < n:
        i = max(range(len(packs)), key=lambda k: len(packs[k]))
        p = packs[i]
        packs[i:i + 1] = [p[:len(p) // 2], p[len(p) // 2:]]
    return packs


@dataclass
class Doc:
    """One example in a pack: a generation example (gen, a GenBatch of one) or an understanding
    one (und, an UndBatch of one), its tokens, and where they sit (row, first column)."""
    tokens: list[Token]
    gen: GenBatch | None = None
    und: UndBatch | None = None
    row: int = 0
    start: int = 0


@dataclass
class Pack:
    """Rows of documents: the layout (R, L) with `doc` ids, and the documents in order."""
    layout: Layout
    doc: torch.Tensor          # (R, L) document index within its row, -1 on padding
    drop_q: torch.Tensor       # (R, L) bool: the token's document hides its rep tokens from its pixels
    docs: list[Doc]

    def mask(self) -> torch.Tensor:
        """(R, 1, L, L) dense boolean mask (SDPA)."""
        lay = self.layout
        return attention_mask(lay.block, lay.noisy, lay.valid, lay.modality, self.drop_q, self.doc)

    def doc_masks(self) -> DocMasks:
        """The same rule as one small dense mask per document (CPU: attention document by document)."""
        lay, docs = self.layout, []
        for d in self.docs:
            s, e = d.start, d.start + len(d.tokens)
            m = attention_mask(lay.block[d.row:d.row + 1, s:e], lay.noisy[d.row:d.row + 1, s:e],
                               lay.valid[d.row:d.row + 1, s:e], lay.modality[d.row:d.row + 1, s:e],
                               self.drop_q[d.row:d.row + 1, s])                   # (1, 1, n, n)
            docs.append((d.row, s, e, m))
        return DocMasks(docs, *self.doc.shape)

    def block_mask(self, device):
        """The same rule as a flex_attention BlockMask (CUDA)."""
        from torch.nn.attention.flex_attention import create_block_mask
        lay = self.layout
        t = [x.to(device) for x in (lay.block, lay.noisy, lay.valid, lay.modality, self.drop_q, self.doc)]
        R, L = self.doc.shape
        return create_block_mask(attention_mask_mod(*t), R, None, L, L, device=device)


def gen_doc(model: RFModel, b: GenBatch) -> Doc:
    """A one-example GenBatch as a document: its prompt (after the CFG drop), rep and pixel tokens."""
    g = model.cfg.grids(b.images.shape[-2:])
    prompt = [] if bool(b.drop_text[0]) else b.prompts[0]
    return Doc(gen_row(model.tok, prompt, g.n_rep, g.n_pix, model.cfg.rf), gen=b)


def und_doc(model: RFModel, b: UndBatch) -> Doc:
    """A one-example UndBatch as a document."""
    g = model.cfg.grids(b.images.shape[-2:])
    more = b.follow_ups[0] if b.follow_ups else ()
    return Doc(und_row(model.tok, g.n_vit, b.questions[0], b.answers[0], follow_ups=more), und=b)


def pack(docs: list[Doc], budget: int) -> list[Pack]:
    """First-fit the documents into packs of one row each (the training step runs one pack per
    forward); every row is as long as its documents (the rest of the budget is not padded)."""
    return [stack([docs[i] for i in idx]) for idx in first_fit([len(d.tokens) for d in docs], budget)]


def stack(rows: list[Doc] | list[list[Doc]]) -> Pack:
    """Documents (one row) or rows of documents -> a Pack, rows right-padded to the longest."""
    rows = [rows] if rows and isinstance(rows[0], Doc) else rows
    lens = [sum(len(d.tokens) for d in row) for row in rows]
    L = max(lens)
    table, docs_id, drop, docs = [], [], [], []
    for r, row in enumerate(rows):
        toks, ids, dq, col = [], [], [], 0
        for k, d in enumerate(row):
            d = replace(d, row=r, start=col)  # placed copies: one Doc may sit in several packings
            toks += d.tokens
            ids += [k] * len(d.tokens)
            dq += [bool(d.gen is not None and d.gen.drop_rep[0])] * len(d.tokens)
            col += len(d.tokens)
            docs.append(d)
        pad = L - col
        table.append(toks + [PAD_TOKEN] * pad)
        docs_id.append(ids + [-1] * pad)
        drop.append(dq + [False] * pad)
    t = torch.tensor([[list(tk) for tk in row] for row in table], dtype=torch.long)   # (R, L, 6)
    tokens, modality, pos, block, noisy, targets = t.unbind(-1)                    # each (R, L)
    lay = Layout(tokens, modality, pos, block, noisy.bool(), modality != PAD, targets)
    return Pack(lay, torch.tensor(docs_id), torch.tensor(drop), docs)


def _groups(docs: list[Doc], key):
    """Documents grouped by image size, in first-seen order: each group runs as one batch."""
    out: dict[tuple, list[Doc]] = {}
    for d in docs:
        out.setdefault(tuple(key(d).images.shape[-2:]), []).append(d)
    return out.items()


def _cols(d: Doc, L: int, first: int, n: int, device) -> torch.Tensor:
    """Flat (row * L + column) indices of n columns of a document from its column `first`."""
    return d.row * L + d.start + first + torch.arange(n, device=device)


def packed_loss(model: RFModel, p: Pack, n_gen: int, n_und: int, dense: bool = False) -> tuple[torch.Tensor, LossParts]:
    """The loss of one pack, normalised by the step's example counts on this rank (module
    docstring); returns (loss, its parts detached) like RFModel.forward. dense: attend through
    the reference (R, 1, L, L) mask instead of the fast path."""
    cfg, lay = model.cfg, p.layout
    dev = model.pix_emb.weight.device
    R, L = lay.tokens.shape
    x = model.tok_emb(lay.tokens.to(dev)).flatten(0, 1)                             # (R*L, D)
    where, vals = [], []                                                           # block embeddings by flat index
    gens, unds = [], []                                                            # per size group, for the readouts

    for (H, W), docs in _groups([d for d in p.docs if d.gen is not None], lambda d: d.gen):
        g = cfg.grids((H, W))
        B = len(docs)
        images = torch.cat([d.gen.images for d in docs])                           # (B, 3, H, W)
        t = torch.cat([d.gen.t for d in docs])
        eps = torch.cat([d.gen.eps for d in docs])                                 # (B, M, P)
        x0 = patchify(images, cfg.patch_size)                                      # (B, M, P)
        z = add_noise(x0, t, eps)
        # a document's columns: [BOS] prompt ([BOR] r_1..r_N) [BOP] p_1..p_M
        n_prompt = [len(d.tokens) - 1 - (1 + g.n_rep if cfg.rf else 0) - 1 - g.n_pix for d in docs]
        pix_idx = torch.cat([_cols(d, L, 1 + n + (1 + g.n_rep if cfg.rf else 0) + 1, g.n_pix, dev)
                             for d, n in zip(docs, n_prompt)])
        where.append(pix_idx), vals.append(model.embed_pix(z, t, g.pix).flatten(0, 1))
        grp = {"x0": x0, "z": z, "t": t, "eps": eps, "pix": pix_idx, "B": B}
        if cfg.rf:
            codes = torch.cat([d.gen.targets for d in docs])                       # (B, N)
            rep_idx = torch.cat([_cols(d, L, 2 + n, g.n_rep, dev) for d, n in zip(docs, n_prompt)])
            where.append(rep_idx), vals.append(model.embed_rep(codes, 0, g.rep).flatten(0, 1))
            # the readout at [BOR], r_1..r_{N-1} predicts r_1..r_N
            grp["read"] = torch.cat([_cols(d, L, 1 + n, g.n_rep, dev) for d, n in zip(docs, n_prompt)])
            grp["codes"] = codes
        gens.append(grp)

    for (H, W), docs in _groups([d for d in p.docs if d.und is not None], lambda d: d.und):
        g = cfg.grids((H, W))
        feats = model.connector(model.vit_tokens(torch.cat([d.und.images for d in docs])))  # (B, V, D)
        feats = feats + model.vit_positions(g.vit)
        where.append(torch.cat([_cols(d, L, 2, g.n_vit, dev) for d in docs])), vals.append(feats.flatten(0, 1))
        unds += docs

    if where:
        x = x.index_copy(0, torch.cat(where), torch.cat(vals).to(x.dtype))
    x = x.view(R, L, -1)                                                           # (R, L, D)
    # the rule of `Pack.mask`, run the fast way: flex_attention's block mask on CUDA, one small
    # attention per document on CPU (tests/test_packing.py checks both against the dense mask)
    if dense:
        mask = p.mask().to(dev)
    else:
        mask = p.block_mask(dev) if dev.type == "cuda" and flex_attention is not None else p.doc_masks()
    log = model.mot.router_log()
    h = model.mot(x, lay.modality.to(dev), lay.pos.to(dev), mask, router_log=log).flatten(0, 1)  # (R*L, D)

    zero = x.new_zeros(())
    l_rep, l_fm, l_lm = zero, zero, zero
    for grp in gens:
        B = grp["B"]
        z = grp["z"]
        x_pred = model.predict_x(h[grp["pix"]].view(*z.shape[:2], -1), z)           # (B, M, P)
        # fm_loss and rep.loss are means over the group's equal-sized examples: x B is their sum
        l_fm = l_fm + B * fm_loss(x_pred, grp["x0"], grp["eps"], z, grp["t"], cfg.flow.t_eps)
        if cfg.rf:
            logits = model.rep.readout(h[grp["read"]]).view(B, -1, model.rep.K)    # (B, N, K)
            l_rep = l_rep + B * model.rep.loss(logits, grp["codes"])
    if unds:
        tgt = lay.targets.flatten().to(dev)                                        # (R*L,)
        cols = (tgt != NO_TARGET).nonzero().squeeze(1)
        ce = F.cross_entropy(model.lm_head(h[cols]).float(), tgt[cols], reduction="none")
        owner = (p.doc.flatten().to(dev) + L * torch.arange(R, device=dev).repeat_interleave(L))[cols]
        # per-document mean over its answer: sum and count by document, then divide
        sums = torch.zeros(R * L, device=dev).index_add(0, owner, ce)
        counts = torch.zeros(R * L, device=dev).index_add(0, owner, torch.ones_like(ce))
        l_lm = (sums[counts > 0] / counts[counts > 0]).sum()
    l_rep, l_fm = l_rep / max(n_gen, 1), l_fm / max(n_gen, 1)
    l_lm = l_lm / max(n_und, 1)
    total = l_lm + l_rep + l_fm
    if cfg.mot.n_routed_experts:
        aux = model.mot.aux_loss(log)
        aux = cfg.mot.aux_loss_coef * (aux if aux is not None else zero)
        return total + aux, LossParts(l_lm.detach(), l_rep.detach(), l_fm.detach(), aux.detach())
    return total, LossParts(l_lm.detach(), l_rep.detach(), l_fm.detach())


def split_gen(b: GenBatch) -> list[GenBatch]:
    """A GenBatch of B examples -> B GenBatches of one (the units packing places)."""
    out = []
    for i in range(len(b.prompts)):
        s = slice(i, i + 1)
        out.append(GenBatch(prompts=b.prompts[s], images=b.images[s], targets=None if b.targets is None else b.targets[s],
                            t=b.t[s], eps=b.eps[s], drop_text=b.drop_text[s], drop_rep=b.drop_rep[s]))
    return out


def split_und(b: UndBatch) -> list[UndBatch]:
    """An UndBatch of B examples -> B UndBatches of one."""
    return [UndBatch(b.images[i:i + 1], b.questions[i:i + 1], b.answers[i:i + 1],
                     b.follow_ups[i:i + 1] if b.follow_ups else None) for i in range(len(b.questions))]


# ---- the training step (train.py --tokens-per-rank) ---------------------------------------

def packed_micro_steps(model: RFModel, gens, unds, gen_slot: int, und_slot: int, budget: int,
                       same_count: bool = False, device=None):
    """This rank's examples as packed rows of `budget` tokens, one per forward (train.py):
    [((Pack, n_gen, n_und), the examples' slots in the step's global batch)]. Each pack's loss is
    its examples' share of the rank's means, so the packs' losses add up to the padded step's.
    same_count (FSDP, whose every forward is collective): all ranks agree on the largest number of
    rows and the others split theirs to match."""
    docs = [gen_doc(model, b) for b in gens] + [und_doc(model, b) for b in unds]
    slots = list(range(gen_slot, gen_slot + len(gens))) + list(range(und_slot, und_slot + len(unds)))
    groups = first_fit([len(d.tokens) for d in docs], budget)
    if same_count:
        n = torch.tensor([len(groups)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        groups = split_to(groups, int(n))
    return [((stack([docs[i] for i in idx]), len(gens), len(unds)), [slots[i] for i in idx]) for idx in groups]


def average_gradients(model: torch.nn.Module, world: int, bucket: int = 1 << 24) -> None:
    """DDP's gradient average, by hand: every trainable parameter's gradient (zeros where this
    rank's rows did not touch it) all-reduced in flat buckets of about `bucket` elements."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    i = 0
    while i < len(params):
        j, n = i, 0
        while j < len(params) and (n == 0 or n + params[j].numel() <= bucket):
            n += params[j].numel()
            j += 1
        flat = torch.cat([p.grad.reshape(-1) for p in params[i:j]])                # (n,)
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(params[i:j], flat.split([p.numel() for p in params[i:j]])):
            p.grad.copy_(g.view_as(p))
        i = j
