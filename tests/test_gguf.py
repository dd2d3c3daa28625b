"""gguf_to_hf's own GGUF reader on files written here by hand (needs no package): metadata of every kind, the
alignment, F32 / F16 / Q8_0 / Q4_1 tensors against values worked out by hand, a file read from its parts,
one-line errors; a tiny llama GGUF converted (whole or in parts) and loaded; --random folders.
The reader against the `gguf` package on the real SmolLM2 file: tests/test_smollm2.py."""
import json
import struct

import numpy as np
import pytest
import torch

import backbones as bb
import bpe
import gguf_to_hf as g2h
import model as mdl

torch.set_num_threads(1)

FORMATS = {"u8": (0, "B"), "i32": (5, "i"), "u32": (4, "I"), "f32": (6, "f"), "bool": (7, "?"), "u64": (10, "Q")}
TYPES = {"F32": 0, "F16": 1, "Q5_0": 6, "Q4_1": 3, "Q8_0": 8}


def pack_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def pack_value(kind, value) -> bytes:
    """(type id, bytes) -> the bytes after the key: the value type u32, then the value (docs/gguf.md)."""
    if kind == "str":
        return struct.pack("<I", 8) + pack_string(value)
    if kind.startswith("[]"):
        item = kind[2:]
        head = struct.pack("<IIQ", 9, 8 if item == "str" else FORMATS[item][0], len(value))
        return head + b"".join(pack_string(v) if item == "str" else struct.pack("<" + FORMATS[item][1], v)
                               for v in value)
    code, fmt = FORMATS[kind]
    return struct.pack("<I" + fmt, code, value)


def write_gguf(path, fields: dict, tensors: list, alignment: int = 32, version: int = 3):
    """A GGUF file: fields {key: (kind, value)}, tensors [(name, type name, dims innermost first, raw bytes)]."""
    if alignment != 32:
        fields = {**fields, "general.alignment": ("u32", alignment)}
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(fields))
    out += b"".join(pack_string(k) + pack_value(*v) for k, v in fields.items())
    blobs = b""
    for name, kind, dims, raw in tensors:
        blobs += b"\0" * (-len(blobs) % alignment)
        out += pack_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, TYPES[kind], len(blobs))
        blobs += raw
    out += b"\0" * (-len(out) % alignment)
    path.write_bytes(out + blobs)
    return path


def q8_0(x: np.ndarray) -> bytes:
    """Blocks of 32: a float16 scale d = max|x| / 127 and 32 int8 round(x / d)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(1, keepdims=True) / 127).astype(np.float16)
    q = np.round(blocks / np.maximum(d.astype(np.float32), 1e-8)).astype(np.int8)
    return b"".join(d[i].tobytes() + q[i].tobytes() for i in range(len(blocks)))


def q4_1(x: np.ndarray) -> bytes:
    """Blocks of 32: float16 d = (max - min) / 15 and m = min, then 16 bytes of 4-bit round((x - m) / d)
    (weight j in the low nibble of byte j, weight 16 + j in its high nibble)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
    q = np.clip(np.round((blocks - m.astype(np.float32)) / np.maximum(d.astype(np.float32), 1e-8)), 0, 15)
    q = q.astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return b"".join(d[i].tobytes() + m[i].tobytes() + qs[i].tobytes() for i in range(len(blocks)))


FIELDS = {"general.architecture": ("str", "llama"), "some.count": ("u32", 7), "some.big": ("u64", 2**40),
          "some.eps": ("f32", 1e-5), "some.flag": ("bool", True), "some.byte": ("u8", 255),
          "some.words": ("[]str", ["a", "Ġb", "<|im_end|>", "é"]), "some.ints": ("[]i32", [3, -1, 4])}


def hand_tensors():
    """Tensors whose values are worked out here: (name, type, dims, raw bytes, expected float32 values)."""
    q8 = struct.pack("<e", 0.25) + np.arange(-16, 16, dtype=np.int8).tobytes()       # w = 0.25 q
    nibbles = bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))
    q4 = struct.pack("<ee", 0.5, -1.0) + nibbles                                       # w = 0.5 q - 1
    q4_values = [0.5 * j - 1 for j in range(16)] + [0.5 * (15 - j) - 1 for j in range(16)]
    return [("a.weight", "F32", [3, 2], np.arange(6, dtype=np.float32).tobytes(), np.arange(6.).reshape(2, 3)),
            ("b.weight", "F16", [5], np.array([1, -2, .5, 3, 0], np.float16).tobytes(), [1, -2, .5, 3, 0]),
            ("c.weight", "Q8_0", [32], q8, 0.25 * np.arange(-16, 16)),
            ("d.weight", "Q4_1", [32, 2], q4 + q4, [q4_values, q4_values])]


@pytest.mark.parametrize("alignment", [32, 64])
def test_reader_reads_fields_and_tensors_worked_out_by_hand(tmp_path, alignment):
    tensors = hand_tensors()
    path = write_gguf(tmp_path / "m.gguf", FIELDS, [t[:4] for t in tensors], alignment)
    r = g2h.GGUF(path)
    want = {k: v for k, (_, v) in FIELDS.items()} | ({"general.alignment": alignment} if alignment != 32 else {})
    assert r.fields == {**want, "some.eps": struct.unpack("<f", struct.pack("<f", 1e-5))[0]}   # float32's value
    assert [(t.name, t.type, t.shape) for t in r.tensors] == [(n, k, tuple(reversed(d))) for n, k, d, _, _ in tensors]
    for t, (*_, values) in zip(r.tensors, tensors):
        w = g2h.dequantize(t)
        assert w.dtype == np.float32 and np.array_equal(w, np.asarray(values, np.float32)), t.name


def test_reader_reads_a_file_from_its_parts_in_order_and_says_which_file_is_wrong(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", FIELDS, [t[:4] for t in hand_tensors()])
    raw = path.read_bytes()
    cuts = [0, 50, len(raw) - 40, len(raw)]                  # the second cut falls inside the last tensor
    parts = [tmp_path / f"part.a{c}" for c in "abc"]
    for p, a, b in zip(parts, cuts, cuts[1:]):
        p.write_bytes(raw[a:b])
    whole, joined = g2h.GGUF(path), g2h.GGUF(parts)
    assert joined.fields == whole.fields
    for a, b in zip(joined.tensors, whole.tensors):
        assert np.array_equal(g2h.dequantize(a), g2h.dequantize(b))
    with pytest.raises(ValueError, match=r"part\.ab \+ .*part\.aa \+ .* is not a GGUF file.*in order"):
        g2h.GGUF([parts[1], parts[0], parts[2]])
    with pytest.raises(ValueError, match=r"part\.aa \+ .*part\.ab: tensor d\.weight .* a part missing"):
        g2h.GGUF(parts[:2])
    with pytest.raises(ValueError, match=r"part\.aa ends inside its header"):
        g2h.GGUF(parts[0])


def test_reader_refuses_other_tensor_types_and_versions_in_one_line(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", FIELDS, [("e.weight", "Q5_0", [32], b"\0" * 22)])
    with pytest.raises(ValueError, match=r"q5\.gguf: tensor e\.weight has GGML type 6; only F32 \(0\), F16 \(1\), "
                                         r"Q4_1 \(3\), Q8_0 \(8\) are read$"):
        g2h.GGUF(path)
    with pytest.raises(ValueError, match=r"v1\.gguf: GGUF version 1"):
        g2h.GGUF(write_gguf(tmp_path / "v1.gguf", FIELDS, [], version=1))


# ------------------------------------------------------------------------------------- a tiny llama GGUF, converted

TINY = dict(d=32, n_head=4, n_kv=2, ff=64, n_layer=2)


def tiny_config(vocab_size=261) -> dict:
    """A Hugging Face config.json of TINY's shapes (write_llama_gguf's, whose vocabulary has 261 tokens)."""
    d, n_head, n_kv, ff, n_layer = TINY.values()
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": ff,
            "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
            "head_dim": d // n_head, "vocab_size": vocab_size, "tie_word_embeddings": True,
            "max_position_embeddings": 256}


def tiny_vocabulary():
    """SmolLM2's three CONTROL tokens, GPT-2's 256 byte characters and two merges ('Ġ t', 'e r')."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bpe.bytes_to_unicode().values(), "Ġt", "er"]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), ["Ġ t", "e r"]


def write_llama_gguf(path, seed=0):
    """A 2-block llama GGUF as llama.cpp writes SmolLM2's (Q8_0 embedding, Q4_1 matrices, F32 norms, tied
    head, the `tokenizer.ggml.*` of a gpt2 BPE with SmolLM2's pre-tokenizer); the values are random."""
    d, n_head, n_kv, ff, n_layer = TINY.values()
    tokens, types, merges = tiny_vocabulary()
    rng = np.random.default_rng(seed)
    fields = {"general.architecture": ("str", "llama"), "llama.block_count": ("u32", n_layer),
              "llama.context_length": ("u32", 256), "llama.embedding_length": ("u32", d),
              "llama.feed_forward_length": ("u32", ff), "llama.attention.head_count": ("u32", n_head),
              "llama.attention.head_count_kv": ("u32", n_kv), "llama.rope.freq_base": ("f32", 10000.0),
              "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5), "tokenizer.ggml.model": ("str", "gpt2"),
              "tokenizer.ggml.pre": ("str", "smollm"), "tokenizer.ggml.tokens": ("[]str", tokens),
              "tokenizer.ggml.token_type": ("[]i32", types), "tokenizer.ggml.merges": ("[]str", merges),
              "tokenizer.ggml.bos_token_id": ("u32", 1), "tokenizer.ggml.eos_token_id": ("u32", 2),
              "tokenizer.ggml.padding_token_id": ("u32", 2), "tokenizer.ggml.add_bos_token": ("bool", False)}
    def matrix(name, out, inp, quant=q4_1):   # GGUF dims innermost first: [in, out]
        return (name, "Q4_1" if quant is q4_1 else "Q8_0", [inp, out], quant(0.1 * rng.standard_normal((out, inp))))
    tensors = [matrix("token_embd.weight", len(tokens), d, q8_0),
               ("output_norm.weight", "F32", [d], np.ones(d, np.float32).tobytes())]
    hd = d // n_head
    for i in range(n_layer):
        tensors += [matrix(f"blk.{i}.{n}.weight", o, k) for n, o, k in
                    (("attn_q", d, d), ("attn_k", n_kv * hd, d), ("attn_v", n_kv * hd, d), ("attn_output", d, d),
                     ("ffn_gate", ff, d), ("ffn_up", ff, d), ("ffn_down", d, ff))]
        tensors += [(f"blk.{i}.{n}.weight", "F32", [d], np.ones(d, np.float32).tobytes())
                    for n in ("attn_norm", "ffn_norm")]
    return write_gguf(path, fields, tensors)


def test_tiny_llama_gguf_converts_from_its_parts_as_whole_and_loads(tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    raw = path.read_bytes()
    (tmp_path / "part.aa").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "part.ab").write_bytes(raw[len(raw) // 2:])
    g2h.main([str(path), str(tmp_path / "whole"), "--dtype", "bfloat16"])
    g2h.main([str(tmp_path / "part.aa"), str(tmp_path / "part.ab"), str(tmp_path / "parts"), "--dtype", "bfloat16"])
    for f in g2h.HF_FOLDER_FILES:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "parts" / f).read_bytes(), f
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"], cfg["torch_dtype"]) == \
        (32, 2, 261, "bfloat16")
    mcfg = mdl.ModelConfig(backbone="hf", hf_dir=str(tmp_path / "parts"), max_len=32, dropout=0.0)
    tok = bb.make_tokens(mcfg, torch.tensor([[0, 1], [1, 0]]))
    model = bb.make_model(mcfg, tok)
    emb = g2h.dequantize(g2h.GGUF(path).tensors[0])
    assert torch.equal(model.transformer.wte.weight[:261], torch.from_numpy(emb).bfloat16().float())
    tokens = tiny_vocabulary()[0]
    ids = bpe.load_tokenizer(str(tmp_path / "parts")).encode(" the after")
    assert [tokens[i] for i in ids] == ["Ġt", "h", "e", "Ġ", "a", "f", "t", "er"]   # the merges, in rank order


def test_random_folder_has_the_configs_shapes_and_loads(tmp_path, capsys):
    config = tiny_config(vocab_size=50)
    (tmp_path / "config.json").write_text(json.dumps(config))
    g2h.main(["--random", str(tmp_path / "config.json"), str(tmp_path / "rand"), "--dtype", "bfloat16"])
    sd = bb.read_safetensors(tmp_path / "rand" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == g2h.llama_shapes(config)
    assert all(v.dtype == torch.bfloat16 for v in sd.values()) and torch.equal(sd["model.norm.weight"], torch.ones(32))
    assert 0.015 < sd["model.layers.1.mlp.down_proj.weight"].float().std() < 0.025
    assert json.loads((tmp_path / "rand" / "config.json").read_text()) == config | {"torch_dtype": "bfloat16"}
    mcfg = mdl.ModelConfig(backbone="hf", hf_dir=str(tmp_path / "rand"), max_len=32, dropout=0.0)
    bb.make_model(mcfg, bb.make_tokens(mcfg, torch.tensor([[0, 1], [1, 0]])))   # no tokenizer needed (sid_init mean)
    g2h.main(["--random", str(tmp_path / "config.json"), str(tmp_path / "rand")])
    assert "already complete" in capsys.readouterr().out.splitlines()[-1]
    del config["head_dim"]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bad\.json: a Llama config\.json needs head_dim for --random"):
        g2h.random_folder(tmp_path / "bad.json", tmp_path / "bad")
