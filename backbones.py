"""Pretrained-weight plumbing for pauserec.py: Hugging Face folders and tokenizers, without `transformers`.

Imports no project module. Read top to bottom:
  1. Hugging Face folders: config.json, safetensors (one file or shards), names mapped onto our GPT
  2. Tokenizers: byte-level BPE (GPT-2's vocab.json + merges.txt, or a tokenizer.json)
  3. GGUF: a llama.cpp checkpoint converted to a Hugging Face folder (SmolLM2-135M, offline)
"""

import functools
import json
import math
import os
import re
import sys
import unicodedata

import torch

# ---------------------------------------------------------------------------------------------------------
# 1. Hugging Face folders

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """A .safetensors file: 8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}} (offsets relative to the end of the header), then the raw little-endian tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buf = bytearray(f.read())  # writable: torch.frombuffer warns on read-only memory
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of {list(SAFETENSORS_DTYPES)}")
        dtype, (a, b) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        count = (b - a) // dtype.itemsize
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=a) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


def write_safetensors(path, tensors: dict[str, torch.Tensor]):
    """The inverse of read_safetensors: {name: tensor} -> a .safetensors file (written atomically)."""
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


def read_checkpoint(model_dir) -> dict[str, torch.Tensor]:
    """A folder's tensors under their Hugging Face names: model.safetensors, or the shards that
    model.safetensors.index.json's weight_map names, or pytorch_model.bin (the legacy torch.save)."""
    st, index = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "model.safetensors.index.json")
    pt = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]   # tensor name -> shard file
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(os.path.join(model_dir, shard)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{index} names tensors its shards lack: {missing[:3]}")
        return out
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir} holds neither model.safetensors, model.safetensors.index.json "
                            f"nor pytorch_model.bin")


ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}   # config.json's architectures entry -> its model_type, our family


def read_config(model_dir) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.hf_dir must be a Hugging Face model folder "
                                f"(or, for GPT-2, set model.hf_url to fetch one)")
    with open(path) as f:
        return json.load(f)


def family(config: dict, path="config.json") -> str:
    """gpt2 | llama | qwen2 | qwen3, from config.json's `architectures` (or, where it has none, model_type)."""
    arch = (config.get("architectures") or [None])[0]
    if arch is None:
        arch = {f: a for a, f in ARCHITECTURES.items()}.get(config.get("model_type"))
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architectures {config.get('architectures')} is not supported "
                         f"(one of {', '.join(ARCHITECTURES)})")
    if config.get("model_type", ARCHITECTURES[arch]) != ARCHITECTURES[arch]:
        raise ValueError(f"{path}: model_type {config['model_type']!r} does not match architectures {arch}")
    return ARCHITECTURES[arch]


def tied(config: dict) -> bool:
    """Whether the output head is the input embedding (tie_word_embeddings; transformers' defaults if absent)."""
    return bool(config.get("tie_word_embeddings", family(config) == "gpt2"))


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_settings(config: dict, path="config.json") -> tuple[float, dict]:
    """(rope_theta, scaling) of a Llama-family config.json: transformers 4 writes rope_theta and rope_scaling
    at the top level, transformers 5 both in rope_parameters. scaling['rope_type']: default | linear | llama3."""
    scaling = dict(config.get("rope_scaling") or {})
    scaling.update(config.get("rope_parameters") or {})
    theta = float(scaling.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{path}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return theta, dict(scaling, rope_type=kind)


def rope_inv_freq(config: dict) -> torch.Tensor:
    """RoPE's frequencies [head_dim / 2] (float32) for a Llama-family config.json: theta^(-2i / head_dim), then
    linear: all divided by factor (positions stretched); llama3: divided by factor where the wavelength
    2 pi / f is longer than original_max_position_embeddings / low_freq_factor, kept where shorter than
    original / high_freq_factor, and blended linearly in 1 / wavelength in between."""
    theta, s = rope_settings(config)
    dim = head_dim(config)
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s["rope_type"] == "llama3":
        lo, hi, old = s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        keep = ((old * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)   # 1: short wavelengths, kept
        inv = keep * inv + (1 - keep) * inv / s["factor"]
    return inv.float()


def hf_config(model_dir) -> dict:
    """config.json as ModelConfig overrides, a plain dict (n_layer, n_head, d_model and the block flags:
    norm, mlp, pos, biases, ...), plus three facts for make_model: family (gpt2 | llama | qwen2 | qwen3),
    vocab_size (text rows, padding included) and max_positions. What our decoder lacks is an error."""
    path, c = os.path.join(model_dir, "config.json"), read_config(model_dir)
    fam = family(c, path)
    if fam == "gpt2":
        ok = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
              "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,)}
        for key, values in ok.items():
            if c.get(key, values[0]) not in values:
                raise ValueError(f"{path}: {key}={c[key]!r} is not supported (expected one of {values})")
        return dict(family=fam, vocab_size=c["vocab_size"], max_positions=c.get("n_positions", 1024),
                    n_layer=c["n_layer"], n_head=c["n_head"], d_model=c["n_embd"], n_kv_head=0, head_dim=0,
                    d_ff=c.get("n_inner") or 0, norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
                    mlp="gelu", pos="learned", bias=True, qkv_bias=False, qk_norm=False, tie_head=tied(c))
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={c['hidden_act']!r} is not supported (the Llama family's is silu)")
    if c.get("use_sliding_window") or any(t != "full_attention" for t in c.get("layer_types") or []):
        raise ValueError(f"{path}: sliding-window attention (use_sliding_window, layer_types) is not supported")
    attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attention_bias != mlp_bias:   # Qwen2's q/k/v biases are no config key: they are always there
        raise ValueError(f"{path}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                         f"(model.bias puts biases on every Linear or on none)")
    n_head = c["num_attention_heads"]
    return dict(family=fam, vocab_size=c["vocab_size"], max_positions=c.get("max_position_embeddings", 2048),
                n_layer=c["num_hidden_layers"], n_head=n_head, d_model=c["hidden_size"],
                n_kv_head=c.get("num_key_value_heads") or n_head, head_dim=head_dim(c),
                d_ff=c["intermediate_size"], norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), mlp="swiglu",
                pos="rope", rope_theta=rope_settings(c, path)[0], bias=attention_bias, qkv_bias=fam == "qwen2",
                qk_norm=fam == "qwen3", tie_head=tied(c))


def gpt2_names(raw: dict) -> dict:
    """GPT-2's names are ours ('transformer.' missing in some files), but its Conv1D layers store weights
    [in, out]: c_attn, c_proj and c_fc are transposed into nn.Linear's [out, in]. The attention mask
    buffers (attn.bias, attn.masked_bias) are dropped."""
    out = {}
    for name, t in raw.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        out[name if name == "lm_head.weight" else "transformer." + name] = t
    return out


LLAMA_NAMES = {"self_attn.o_proj": "attn.c_proj", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
               "mlp.down_proj": "mlp.c_proj", "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}
LLAMA_FUSED = {"self_attn.q_proj": ("attn.c_attn", 0), "self_attn.k_proj": ("attn.c_attn", 1),
               "self_attn.v_proj": ("attn.c_attn", 2), "mlp.gate_proj": ("mlp.c_fc", 0), "mlp.up_proj": ("mlp.c_fc", 1)}
LLAMA_TOP = {"embed_tokens.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
             "lm_head.weight": "lm_head.weight"}


def llama_names(raw: dict) -> dict:
    """Llama, Qwen2, Qwen3 names -> ours: per block q/k/v_proj concatenated into c_attn [q; k; v] (weights and
    biases), gate_proj/up_proj into c_fc [gate; up], the rest renamed (LLAMA_NAMES); RoPE buffers dropped."""
    out, fused = {}, {}
    for name, t in raw.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):   # old checkpoints' RoPE buffers: ours come from rope_inv_freq
            continue
        if name in LLAMA_TOP:
            out[LLAMA_TOP[name]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None or (m[2] not in LLAMA_NAMES and m[2] not in LLAMA_FUSED):
            raise ValueError(f"checkpoint tensor {name!r} has no place in our decoder")
        block = f"transformer.h.{m[1]}."
        if m[2] in LLAMA_NAMES:
            out[f"{block}{LLAMA_NAMES[m[2]]}.{m[3]}"] = t
        else:
            ours, j = LLAMA_FUSED[m[2]]
            fused.setdefault(f"{block}{ours}.{m[3]}", {})[j] = t
    for name, parts in fused.items():
        n = 3 if ".c_attn." in name else 2
        if sorted(parts) != list(range(n)):
            raise ValueError(f"checkpoint lacks parts of {name} (has {sorted(parts)} of {n})")
        out[name] = torch.cat([parts[j] for j in range(n)])
    return out


def hf_state_dict(raw: dict, config: dict, keep_layers: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (read_checkpoint) -> our GPT's state dict, float32, before our token rows are added.
    A tied head's lm_head is dropped; keep_layers > 0 keeps blocks 0..keep_layers-1 only."""
    out = gpt2_names(raw) if family(config) == "gpt2" else llama_names(raw)
    if tied(config):
        out.pop("lm_head.weight", None)
    if keep_layers:
        out = {k: v for k, v in out.items()
               if not (m := re.match(r"transformer\.h\.(\d+)\.", k)) or int(m[1]) < keep_layers}
    return {k: v.float().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# 2. Tokenizers: byte-level BPE


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    68 (controls, space, ...) to chr(256 + i), so every byte string is a string without whitespace."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def gpt2_pretokenizer() -> re.Pattern:
    r"""GPT-2's pre-tokenisation rule for Python's `re`, which lacks \p{..}:
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    \p{L} (letters) and \p{N} (numbers) are built as explicit classes from unicodedata's categories,
    exact for this Python's Unicode version. \s is the Unicode White_Space set (as in `regex` and
    `tokenizers`), not re's \s, which also matches the separators \x1c-\x1f.
    """
    def ranges(keep):
        out, start = [], None
        for cp in range(sys.maxunicode + 2):
            inside = cp <= sys.maxunicode and keep(unicodedata.category(chr(cp)))
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
                start = None
        return "".join(out)

    L, N = ranges(lambda c: c[0] == "L"), ranges(lambda c: c[0] == "N")
    S = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


class BPETokenizer:
    """GPT-2's byte-level BPE: text -> pre-tokens (gpt2_pretokenizer) -> UTF-8 bytes -> printable
    characters (bytes_to_unicode) -> repeatedly merge the adjacent pair of lowest rank in merges.txt ->
    ids in vocab.json. decode() inverts it (invalid UTF-8 becomes U+FFFD, as errors='replace')."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "vocab.json"), encoding="utf-8") as f:
            self.encoder = json.load(f)
        self.decoder = {v: k for k, v in self.encoder.items()}
        with open(os.path.join(model_dir, "merges.txt"), encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split()): i for i, ln in enumerate(lines)}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.pattern = gpt2_pretokenizer()
        self.cache = {}  # pre-token -> its BPE pieces

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            try:
                ids += [self.encoder[p] for p in self.bpe(chars)]
            except KeyError as e:
                raise ValueError(f"BPE piece {e.args[0]!r} is not in vocab.json (an incomplete vocabulary?)") from e
        return ids

    def decode(self, ids) -> str:
        data = bytes(self.char_byte[c] for i in ids for c in self.decoder[int(i)])
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------
# 3. GGUF
