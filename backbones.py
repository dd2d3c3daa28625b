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

def gpt2_config(model_dir) -> dict:
    """config.json of a GPT-2 folder, checked against what our decoder implements."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.hf_dir must be a Hugging Face GPT-2 folder "
                                f"(or set model.hf_url to fetch one)")
    with open(path) as f:
        hf = json.load(f)
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
                   "n_inner": (None, 4 * hf["n_embd"])}
    for key, ok in unsupported.items():
        if hf.get(key, ok[0]) not in ok:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (expected one of {ok})")
    return hf


def load_gpt2(model_dir) -> tuple[dict[str, torch.Tensor], dict]:
    """GPT-2 weights renamed to our GPT's parameters (float32), and the folder's config.json.

    Hugging Face names 'transformer.h.0.attn.c_attn.weight' (or without 'transformer.') map to ours
    unchanged, but GPT-2's Conv1D layers store weights [in, out]: c_attn, c_proj and c_fc are transposed
    into nn.Linear's [out, in]. The attention mask buffers (attn.bias, attn.masked_bias) and the tied
    lm_head are dropped.
    """
    hf = gpt2_config(model_dir)
    st, pt = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        raw = read_safetensors(st)
    elif os.path.isfile(pt):
        raw = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor pytorch_model.bin")
    out = {}
    for name, t in raw.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        out["transformer." + name] = t.float().contiguous()
    return out, hf


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
