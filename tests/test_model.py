"""Tests of model.py, the decoder: parameter layouts (GPT-2's names), config checks, left padding, the loss."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_pauserec import ARCHS, LLAMA_STYLE, histories, setup  # noqa: E402

import model as md  # noqa: E402
import pauserec as pr  # noqa: E402

torch.set_num_threads(1)


def loss_from_logits(logits, ids, loss_mask, head_start: int = 0):
    """GPT.loss from logits [B, T, V'] at every position: the reference for its supervised-positions-only path."""
    sel = loss_mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][sel].float(), ids[:, 1:][sel] - head_start)


def test_pause_id_is_the_tokens_pause():
    assert md.PAUSE == pr.Tokens.PAUSE and pr.Tokens(level_sizes=[2], base=7).PAUSE == 7 + md.PAUSE


@ARCHS
def test_left_padding_does_not_change_logits(arch):
    cfg, tok, model, _, _ = setup(2, **arch)
    model.eval()
    prompts = [[1, 7, 8, 9, 10, 3, 3], [1, 11, 3, 3], [1, 3]]
    ids, mask = pr.left_pad(prompts)
    batched = model(ids, key_mask=mask, last=True)
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p]), last=True)[0]
        assert torch.allclose(batched[i], alone, atol=1e-5)


def test_loss_helper_and_fast_path_agree():
    cfg, tok, model, _, _ = setup(3)
    ex = [pr.build_example(tok, cfg, h, 5) for h in histories(3, 20)]
    ids, mask = pr.collate(ex)
    a = model.loss(ids, mask)
    b = loss_from_logits(model(ids), ids, mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert a.item() > 0
    a.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def boolean_index_loss(model, ids, loss_mask):
    """GPT.loss as it was before the loss over every position: logits only at the supervised (and draft) positions,
    picked by a boolean index (a host sync on a GPU); the draft term skipped when there is no draft position."""
    sel = loss_mask[:, 1:]
    if model.cfg.step_loss != "draft":
        return F.cross_entropy(model(ids[:, :-1], where=sel).float(), ids[:, 1:][sel] - model.head_start)
    draft, first = md.draft_targets(ids, loss_mask, model.pause_id)
    both = sel | draft
    logits = model(ids[:, :-1], where=both).float()
    target = torch.where(sel, ids[:, 1:], first)[both] - model.head_start
    is_sid = sel[both]
    loss = F.cross_entropy(logits[is_sid], target[is_sid])
    if bool(draft.any()):
        loss = loss + model.cfg.step_loss_weight * F.cross_entropy(logits[~is_sid], target[~is_sid])
    return loss


LOSS_CASES = {   # name: (ModelConfig keywords, text rows before ours: a pretrained backbone's layout)
    "none_every_item": (dict(reasoning="none", layout="every_item"), 0),
    "pause_target": (dict(layout="target"), 0),
    "pause_every_item": (dict(layout="every_item"), 0),
    "pause_every_item_draft": (dict(layout="every_item", M=3, step_loss="draft", step_loss_weight=0.5), 0),
    "llama_gqa_every_item": (dict(layout="every_item", **LLAMA_STYLE), 0),
    "pretrained_head_new": (dict(layout="every_item", head="new"), 40),
    "pretrained_head_full": (dict(layout="every_item", step_loss="draft", M=3), 40),   # the selected path
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_equals_the_boolean_index_formula(case):
    """GPT.loss over every position (ignored where nothing is supervised; a pretrained text vocabulary's head: the
    supervised positions only) gives the loss and gradients of the boolean-indexed formula, to float rounding."""
    kw, base = LOSS_CASES[case]
    cfg, tok, _, _, codes = setup(7, **kw)
    tok = pr.Tokens(tok.level_sizes, codes=codes, base=base)
    model = md.GPT(cfg, tok.size, base)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert model.every_position == (not base or cfg.head == "new")
    lengths, build = (2, 5, 3, 6), pr.build_sequence_example
    if cfg.pause_layout == "target":
        build = lambda tok, cfg, items: pr.build_example(tok, cfg, items[:-1], items[-1])   # noqa: E731
    examples = [build(tok, cfg, h) for h in histories(7, len(codes), lengths)]
    ids, mask = pr.collate(examples, tok.PAD)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn(model, ids, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    (new, new_grads), (old, old_grads) = loss_and_grads(md.GPT.loss), loss_and_grads(boolean_index_loss)
    torch.testing.assert_close(new, old)
    for a, b in zip(new_grads, old_grads):
        torch.testing.assert_close(a, b)
    assert new.item() > 0 and any(g.abs().sum() > 0 for g in new_grads)


def test_gpt2_parameter_layout():
    cfg = md.ModelConfig(n_layer=2, n_head=2, d_model=32)
    names = set(dict(md.GPT(cfg, 50).named_parameters()))
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
              "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight"):
        assert n in names, n
    m = md.GPT(cfg, 50)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.transformer.h[0].attn.c_attn.weight.shape == (96, 32)


def test_llama_style_parameter_layout():
    m = md.GPT(md.ModelConfig(n_layer=2, n_head=2, d_model=32, **LLAMA_STYLE), 50)
    shapes = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    assert {n: s for n, s in shapes.items() if n.startswith("transformer.h.0.")} == {
        "transformer.h.0.ln_1.weight": (32,), "transformer.h.0.ln_2.weight": (32,),
        "transformer.h.0.attn.c_attn.weight": ((2 + 2 * 1) * 8, 32), "transformer.h.0.attn.c_attn.bias": (32,),
        "transformer.h.0.attn.c_proj.weight": (32, 2 * 8), "transformer.h.0.attn.q_norm.weight": (8,),
        "transformer.h.0.attn.k_norm.weight": (8,), "transformer.h.0.mlp.c_fc.weight": (2 * 48, 32),
        "transformer.h.0.mlp.c_proj.weight": (32, 48)}
    assert "transformer.wpe.weight" not in shapes and shapes["inv_freq"] == (4,)   # RoPE: no learned positions
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert torch.allclose(m.inv_freq, 10000.0 ** -(torch.arange(0, 8, 2) / 8))


def test_config_validation():
    with pytest.raises(ValueError, match="model.reasoning"):
        md.ModelConfig(reasoning="think")
    with pytest.raises(ValueError, match="model.d_model"):
        md.ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="model.n_layer"):
        md.ModelConfig(n_layer=0)
    for kw, match in ((dict(norm="batchnorm"), "model.norm must be layernorm"), (dict(mlp="relu"), "model.mlp"),
                      (dict(pos="alibi"), "model.pos"), (dict(head="ours"), "model.head"),
                      (dict(n_kv_head=3), r"model.n_head \(4\) must divide by model.n_kv_head \(3\)"),
                      (dict(pos="rope", head_dim=7), "even head width"), (dict(d_ff=-1), "model.d_ff"),
                      (dict(norm_eps=0.0), "model.norm_eps"),
                      (dict(keep_layers=1), "model.keep_layers=1 needs a pretrained model.backbone"),
                      (dict(sid_init="words"), r"model.sid_init must be mean \| text"),
                      (dict(sid_init_words=0), "model.sid_init_words must be >= 1")):
        with pytest.raises(ValueError, match=match):
            md.ModelConfig(**kw)
    md.ModelConfig(d_model=30, n_head=4, head_dim=8)   # head_dim set: d_model need not divide
