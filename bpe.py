"""The byte-level BPE tokenizer of a model folder (GPT-2, SmolLM2, Qwen2/2.5/3, Llama 3), without `tokenizers`.

What the byte-level BPE families (GPT-2, SmolLM2, Qwen2/2.5/3, Llama 3) keep in tokenizer.json, read
generically and run in the order of the `tokenizers` library:
  added tokens with normalized=false split the raw text -> the normalizer (NFC or none) runs on the pieces
  between them -> added tokens with normalized=true split those -> the pre-tokenizers (Split, Digits, then
  ByteLevel) cut each piece into pre-tokens -> UTF-8 bytes as printable characters -> BPE merges -> ids.
Split patterns are Oniguruma's; onig_to_re rewrites them for Python's `re`.

backbones.py uses it for titled prompts (model.prompt=sids+titles) and for the rationale words' first rows.
Imports no project module.
"""

import functools
import itertools
import json
import math
import os
import re
import sys
import unicodedata

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


