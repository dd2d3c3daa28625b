"""Every weight make_model loads, compared with the raw tensor written to the checkpoint (needs only torch).

Shapes cannot catch a missing transpose of a square matrix (GPT-2's attn.c_proj [C, C]) or q/k/v and gate/up
fused in the wrong order (k and v have one shape): the values can.
"""
import json

import pytest
import torch
from test_gpt2 import write_checkpoint

import backbones as bb
import gguf_to_hf
import model as mdl

torch.set_num_threads(1)

CODES = torch.tensor([[0, 1], [1, 0], [1, 2], [2, 2], [0, 0]])
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")   # stored [in, out]


def loaded(folder, max_len=64):
    """Our state dict after make_model on a Hugging Face folder, and the Tokens (tok.base: text rows)."""
    cfg = mdl.ModelConfig(backbone="hf", hf_dir=str(folder), max_len=max_len, dropout=0.0)
    tok = bb.make_tokens(cfg, CODES)
    return bb.make_model(cfg, tok).state_dict(), tok


@pytest.mark.parametrize("prefix,fmt", [("transformer.", "safetensors"), ("", "bin")])
def test_gpt2_weights_equal_the_raw_tensors_conv1d_transposed(tmp_path, prefix, fmt):
    folder = write_checkpoint(tmp_path / "ckpt", prefix=prefix, fmt=fmt, buffers=True)
    raw = (torch.load(folder / "pytorch_model.bin") if fmt == "bin"
           else bb.read_safetensors(folder / "model.safetensors"))   # the reader has its own hand-made-file test
    ours, tok = loaded(folder, max_len=48)
    checked = set()
    for name, t in raw.items():
        name = "transformer." + name.removeprefix("transformer.")
        if name.endswith(".attn.bias"):   # the causal-mask buffer: not a weight
            continue
        want = t.t() if name.endswith(CONV1D) else t
        got = ours[name]
        if name.endswith("wpe.weight"):   # positions cut to model.max_len
            want = want[:48]
        assert torch.equal(got, want), name
        checked.add(name)
    square = raw[prefix + "h.0.attn.c_proj.weight"]
    assert square.shape[0] == square.shape[1] and not torch.equal(square, square.t())   # a transpose shows
    assert {n for n in ours if n not in ("lm_head.weight", "new_rows")} == checked   # every weight came from the file


def write_llama(folder, arch, V=40, C=32, n_head=4, n_kv=2, head_dim=0, ff=48, n_layer=2, bias=False, tie=False,
                max_positions=64):
    """A random Llama-family checkpoint in Hugging Face names (model.safetensors, config.json), written by hand
    -> {name: tensor} as written."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    Dh = head_dim or C // n_head
    sd = {"model.embed_tokens.weight": r(V, C), "model.norm.weight": r(C)}
    if not tie:
        sd["lm_head.weight"] = r(V, C)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (n_head * Dh, C), "self_attn.k_proj": (n_kv * Dh, C),
                  "self_attn.v_proj": (n_kv * Dh, C), "self_attn.o_proj": (C, n_head * Dh),
                  "mlp.gate_proj": (ff, C), "mlp.up_proj": (ff, C), "mlp.down_proj": (C, ff)}
        for m, shape in shapes.items():
            sd[p + m + ".weight"] = r(*shape)
            if bias or (arch == "Qwen2ForCausalLM" and m[-6] in "qkv"):
                sd[p + m + ".bias"] = r(shape[0])
        sd.update({p + "input_layernorm.weight": r(C), p + "post_attention_layernorm.weight": r(C)})
        if arch == "Qwen3ForCausalLM":
            sd.update({p + "self_attn.q_norm.weight": r(Dh), p + "self_attn.k_norm.weight": r(Dh)})
    gguf_to_hf.write_safetensors(folder / "model.safetensors", sd)
    config = {"architectures": [arch], "vocab_size": V, "hidden_size": C, "intermediate_size": ff,
              "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
              "max_position_embeddings": max_positions, "tie_word_embeddings": tie, "attention_bias": bias,
              "mlp_bias": bias}
    if head_dim:
        config["head_dim"] = head_dim
    (folder / "config.json").write_text(json.dumps(config))
    return sd


RENAMED = {"self_attn.o_proj": "attn.c_proj", "mlp.down_proj": "mlp.c_proj", "input_layernorm": "ln_1",
           "post_attention_layernorm": "ln_2", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
LLAMA_CASES = {
    "llama_gqa_biases_untied": ("LlamaForCausalLM", dict(bias=True)),
    "qwen2_qkv_biases": ("Qwen2ForCausalLM", dict(n_kv=1)),
    "qwen3_qk_norm_head_dim_tied": ("Qwen3ForCausalLM", dict(head_dim=16, tie=True)),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_family_weights_equal_the_raw_tensors_fused_in_order(tmp_path, case):
    """c_attn = [q; k; v] and c_fc = [gate; up] (weights and biases), row block by row block; the rest renamed."""
    arch, kw = LLAMA_CASES[case]
    raw = write_llama(tmp_path / "ckpt", arch, **kw)
    ours, tok = loaded(tmp_path / "ckpt")
    assert torch.equal(ours["transformer.wte.weight"], raw["model.embed_tokens.weight"])   # our rows: new_rows
    assert torch.equal(ours["transformer.ln_f.weight"], raw["model.norm.weight"])
    head = raw.get("lm_head.weight", raw["model.embed_tokens.weight"])   # tied: the embedding
    assert torch.equal(ours["lm_head.weight"], head)
    checked = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(2):
        h, p = f"transformer.h.{i}.", f"model.layers.{i}."
        for ours_name, parts in (("attn.c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                 ("mlp.c_fc", ("mlp.gate_proj", "mlp.up_proj"))):
            for kind in ("weight", "bias"):
                if p + parts[0] + "." + kind not in raw:
                    assert h + ours_name + "." + kind not in ours
                    continue
                fused, start = ours[h + ours_name + "." + kind], 0
                for part in parts:   # each part's rows, in this order
                    t = raw[p + part + "." + kind]
                    assert torch.equal(fused[start: start + len(t)], t), (i, part, kind)
                    start += len(t)
                assert start == len(fused)
                checked.add(h + ours_name + "." + kind)
        for theirs, mine in RENAMED.items():
            for kind in ("weight", "bias"):
                if p + theirs + "." + kind in raw:
                    assert torch.equal(ours[h + mine + "." + kind], raw[p + theirs + "." + kind]), (i, theirs)
                    checked.add(h + mine + "." + kind)
    assert set(ours) - {"inv_freq", "new_rows", "new_head_rows"} == checked   # every weight came from the file
