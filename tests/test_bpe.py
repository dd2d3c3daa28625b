"""Tests of bpe.py, the tokenizer: a tokenizer.json of each byte-level BPE family against `tokenizers` itself.

Each family's file is trained here by `tokenizers` (a small BPE, a few hundred merges) with the family's exact
normalizer, pre-tokenizer and model settings, plus added tokens of every kind; our load_tokenizer must encode
and decode every test string as the library does.
"""

import functools
import json
import os
import random
import sys
import unicodedata

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_gpt2 import CORPUS, STRINGS, many_strings  # noqa: E402

import backbones as bb  # noqa: E402
import bpe  # noqa: E402
import pauserec as pr  # noqa: E402

torch.set_num_threads(1)

# The Split patterns of the families' tokenizer.json files (transformers' convert_slow_tokenizer builds the same)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def isolated(pattern):
    return pt.Split(Regex(pattern), behavior="isolated", invert=False)


FAMILIES = {  # name: (normalizer, pre_tokenizer, ignore_merges)
    "gpt2": (None, pt.ByteLevel(add_prefix_space=False, use_regex=True), False),
    "smollm2": (None, pt.Sequence([pt.Digits(individual_digits=True),
                                   pt.ByteLevel(add_prefix_space=False, use_regex=True)]), False),
    "qwen2": (normalizers.NFC(), pt.Sequence([isolated(QWEN2_SPLIT),
                                              pt.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
    "llama3": (None, pt.Sequence([isolated(LLAMA3_SPLIT), pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
               True),
    # settings no family above uses, for the code paths behind them
    "prefix-space": (None, pt.ByteLevel(add_prefix_space=True, use_regex=True), False),
    "digit-runs": (normalizers.Sequence([normalizers.NFC()]),
                   pt.Sequence([pt.Digits(individual_digits=False), pt.ByteLevel(add_prefix_space=False)]), True),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = [AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", normalized=False),
         AddedToken("<mask>", lstrip=True, special=True, normalized=False), AddedToken("[rs]", rstrip=True),
         AddedToken("zq", single_word=True, normalized=True), AddedToken("café", normalized=True)]
STRIPPING = ("<mask>", "[rs]")   # their lstrip/rstrip swallow whitespace: no round trip
# whole words added to the vocabulary without merges: only ignore_merges reaches them
WHOLE = ["Ġquick", "Ġbrown", "Hello", "123", "".join(bpe.bytes_to_unicode()[b] for b in " Привет".encode())]

EXTRA = [
    "1", "12", "123", "1234", "12345", "1234567", "12345678901", " 1234567 ", "a1234567b", "3.14159", "-42", "1e10",
    "٣٤٥٦٧", "一二三", "①②③", "x²³", "Ⅻ12", "9\u0301", "0x1F600",
    "\r\n", "a\r\nb", "\r\n\r\n", "\n\r", "  \n  ", "x \n", "\t\n", " \t ", "\n \n", "a \u00a0b", "\u3000\u3000x",
    "line\r\n  indented", "trailing   ", "   leading", "a\x1c b", "\u2028x", "x\u0085y", "\u00a0\u00a0",
    "IT'S", "It's", "We'LL", "I'D", "she'S", "it’s", "'ſ", "'ſt", "can't've", "O'Neil's", "'RE'VE'M", "x'll'd",
    "e\u0301", "A\u030a", "\u212b", "\u1e9b\u0323", "\u1112\u1161\u11ab", "cafe\u0301", "n\u0303o", "\u0301start",
    "\uff21\uff22", "ǆ", "ﬃ", "i\u0307",
    "<|im_start|>user\nhi<|im_end|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "<|im_start|", "<|im_end",
    " <|im_start|> ", "e<|im_start|>\u0301", "<think>\nx\n</think>", "<think></think>", "<<|im_end|>>",
    "a <mask> b", "a<mask>b", "  <mask>", "\t<mask><mask>", "[rs]  x", "[rs]\n\ny", "x [rs] <mask> y",
    "zq", "zq 1", "a zq b", "zqs", "xzq", "zq_x", "_zq", "zq.", "(zq)", "zq\u0301", "ézqú", "zq1", "1zq", "zqé",
    "\u200dzq", "zq²", "Ⓐzq", "zq\u2167", "zq-zq", "zqzq", "zq zq",
    "café", "cafe\u0301 crème", "CAFÉ", "cafés",
    "def f(x):\n    return x  # ok\n", "if (a<=b) {\n\treturn;\n}", "C:\\path\\to", "a+b=c", "@user #tag", "…—–",
    "«quoted»", "¿qué?", "¡hola!", "日本語のテキスト、句読点。", "Ελληνικά!", "עברית", "العربية", "हिन्दी", "ไทย",
    "😀😀", "👍🏽", "🧑‍💻 dev", "\U0001F600x", "x\ufe0f", "zero\u200bwidth", "\ufeffbom",
]


@functools.cache
def family_strings() -> list[str]:
    r = random.Random(1)
    pool = EXTRA + [s for s in STRINGS if s] + CORPUS.split(" ")
    glue = ["", " ", "\n", "\r\n", "  ", "\t", "<|im_start|>", "<|endoftext|>", " 1234567", "'S ", " \u00a0"]
    out = many_strings() + EXTRA
    for _ in range(200):
        out.append("".join(r.choice(pool) + r.choice(glue) for _ in range(r.randint(1, 5))))
    return out


@functools.cache
def family_json(name) -> str:
    """A tokenizer.json trained by `tokenizers` with the family's settings."""
    norm, pre, ignore_merges = FAMILIES[name]
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(SPECIAL) + 400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    texts = [CORPUS] * 3 + [s for s in family_strings()[::2] if "zq" not in s]   # no merge makes the single_word 'zq'
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    assert spec["model"]["ignore_merges"] == ignore_merges and len(spec["model"]["merges"]) > 300
    vocab = spec["model"]["vocab"]
    vocab.update({w: len(vocab) + i for i, w in enumerate(w for w in WHOLE if w not in vocab)})
    tok = Tokenizer.from_str(json.dumps(spec))   # the added tokens last: the library gives them the ids after the
    tok.add_tokens(ADDED)                        # vocabulary's on loading, whatever the file says
    return tok.to_str()


def write(folder, spec: str):
    (folder / "tokenizer.json").write_text(spec, encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_encode_decode_equal_tokenizers(tmp_path, name):
    spec = family_json(name)
    ref = Tokenizer.from_str(spec)
    ours = bpe.load_tokenizer(write(tmp_path, spec))
    assert len(ours) == ref.get_vocab_size(with_added_tokens=True)
    strings = family_strings()
    assert len(strings) >= 300
    nfc = FAMILIES[name][0] is not None
    non_ascii = {ref.token_to_id(t.content) for t in ADDED if not t.content.isascii()}
    for s in strings:
        want = ref.encode(s, add_special_tokens=False).ids
        assert ours.encode(s) == want, repr(s)
        if not set(want) & non_ascii:   # the library byte-decodes added tokens too: 'café' comes out 'caf\ufffd'
            assert ours.decode(want) == ref.decode(want, skip_special_tokens=False), repr(s)
        kept = not any(t in s for t in STRIPPING) and (not nfc or unicodedata.normalize("NFC", s) == s)
        if kept and name != "prefix-space":   # (a prefix space is not taken off by decoding)
            assert ours.decode(ours.encode(s)) == s, repr(s)
    if FAMILIES[name][2]:   # ignore_merges is exercised: without it some pre-tokens split differently
        ours.ignore_merges = False
        assert any(ours.encode(s) != ref.encode(s, add_special_tokens=False).ids for s in strings)
    legacy = json.loads(spec)   # merges in the older format, "a b" strings
    legacy["model"]["merges"] = [" ".join(m) for m in legacy["model"]["merges"]]
    assert bpe.load_tokenizer(write(tmp_path, json.dumps(legacy))).ranks == ours.ranks


def test_added_token_flags_at_every_neighbour(tmp_path):
    """single_word 'zq' beside a sample of characters (the library's word characters are Rust's \\w), and the
    whitespace lstrip '<mask>' and rstrip '[rs]' take along (White_Space, not the separators \\x1c-\\x1f)."""
    spec = family_json("gpt2")
    ref, ours = Tokenizer.from_str(spec), bpe.load_tokenizer(write(tmp_path, spec))
    r = random.Random(0)
    assigned = [c for c in map(chr, range(0x800, 0x30000)) if unicodedata.category(c) not in ("Cn", "Cs")]
    sample = list(map(chr, range(0x800))) + r.sample(assigned, 1500)   # (newer characters: the Unicode of Rust)
    sample += ["\u24b6", "\u24e9", "\u24ea", "\U0001f130", "\U0001f14a", "\U0001f189", "\u200c", "\u200d", "\u2060"]
    strings = [t for c in sample for t in ("zq" + c, c + "zq")]
    spaces = bpe.WHITE_SPACE + "\x1c\x1d\x1e\x1f\u200b\ufeffx"
    strings += [t for c in spaces for t in (f"a{c}{c}<mask>", f"[rs]{c}{c}b")]
    for s in strings:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False).ids, repr(s)


@pytest.mark.parametrize("unk, fuse", [(None, False), ("<|endoftext|>", False), ("<|endoftext|>", True)])
def test_bytes_missing_from_the_vocabulary(tmp_path, unk, fuse):
    """Some real vocabularies lack rare bytes (SmolLM2's 0x1d, 0xf1, ...): the library maps them to unk_token, a run
    of them to one if fuse_unk, and drops them where there is no unk_token."""
    spec = json.loads(family_json("smollm2"))
    gone = {bpe.bytes_to_unicode()[b] for b in (0x1d, 0xf0)}   # a control character; the lead byte of emoji
    model = spec["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if not gone & set(t)}
    model["merges"] = [m for m in model["merges"] if not gone & set(m[0] + m[1])]
    model["unk_token"], model["fuse_unk"] = unk, fuse
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in model["vocab"]]   # ids stay put
    spec = json.dumps(spec)
    ref, ours = Tokenizer.from_str(spec), bpe.load_tokenizer(write(tmp_path, spec))
    strings = family_strings()
    assert sum("\x1d" in s or "\U0001f600" in s for s in strings) > 10
    for s in strings:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False).ids, repr(s)


@pytest.mark.parametrize("pattern", [bpe.GPT2_SPLIT, QWEN2_SPLIT, LLAMA3_SPLIT])
def test_split_patterns_equal_oniguruma(pattern):
    """onig_to_re against the library's own regex engine (Oniguruma), on the test strings and on every code
    point this Python's Unicode version assigns, in runs, so that each class is checked."""
    ref, ours = isolated(pattern), bpe.isolated(bpe.onig_to_re(pattern))
    assigned = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    r = random.Random(0)
    chunks = ["".join(assigned[i: i + 40]) for i in range(0, len(assigned), 40)]
    text = "".join(c + r.choice([" ", "  ", "\n", "'s", "1", "a", "é", "\r\n", " x"]) for c in chunks)
    for s in family_strings() + [text]:
        assert ours(s) == [p for p, _ in ref.pre_tokenize_str(s)], repr(s[:80])


def test_onig_to_re_classes():
    pat = bpe.onig_to_re(r"\p{Lu}+|[\p{Nd}x]|\pN|[^\S\n]+|\P{L}")
    assert pat.findall("AbCD1\u2167x \t\n٣") == ["A", "CD", "1", "\u2167", "x", " \t", "\n", "٣"]
    assert bpe.onig_to_re(r"\p{^Nd}+|\d").findall("ab1٣") == ["ab", "1", "٣"]
    with pytest.raises(ValueError, match=r"\\w"):
        bpe.onig_to_re(r"\w+")
    with pytest.raises(ValueError, match="Script=Han"):
        bpe.onig_to_re(r"\p{Script=Han}")


def spec_with(**changes) -> str:
    spec = json.loads(family_json("gpt2"))
    for key, value in changes.items():
        part, _, field = key.partition("__")
        if field:
            spec[part][field] = value
        else:
            spec[part] = value
    return json.dumps(spec)


@pytest.mark.parametrize("changes, what", [
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}},
     "Metaspace"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "Whitespace"),
    ({"pre_tokenizer": None}, "None"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}}, "Split (behavior Removed"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, {"type": "Digits"}]}},
     "ByteLevel before another"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}]}},
     "does not end in ByteLevel"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "Split: \\w"),
    ({"normalizer": {"type": "Lowercase"}}, "normalizer type 'Lowercase'"),
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "NFKC"}]}}, "'NFKC'"),
    ({"model__type": "WordPiece"}, "model type 'WordPiece'"),
    ({"model__byte_fallback": True}, "byte_fallback"),
])
def test_unsupported_settings_are_one_line_value_errors(tmp_path, changes, what):
    write(tmp_path, spec_with(**changes))
    with pytest.raises(ValueError) as e:
        bpe.load_tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "tokenizer.json") in msg and what in msg and "\n" not in msg, msg


def test_make_tokens_titles_from_tokenizer_json(tmp_path):
    """backbones.make_tokens reads a folder's tokenizer.json, and refuses one larger than config.json's vocab_size."""
    write(tmp_path, family_json("qwen2"))
    V = Tokenizer.from_str(family_json("qwen2")).get_vocab_size(with_added_tokens=True)
    codes = torch.tensor([[0, 1], [1, 0]])
    meta = [{"title": "Crème brûlée 12 pack"}, {"title": None}]
    cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path), prompt="sids+titles", max_title_len=6)
    for size in (V, V - 1):
        config = {"architectures": ["GPT2LMHeadModel"], "vocab_size": size, "n_embd": 32, "n_layer": 1, "n_head": 2,
                  "n_positions": 64}
        (tmp_path / "config.json").write_text(json.dumps(config))
        if size < V:
            with pytest.raises(ValueError, match="more than vocab_size"):
                bb.make_tokens(cfg, codes, (), meta)
            continue
        tok = bb.make_tokens(cfg, codes, (), meta)
        assert tok.item_titles == [bpe.load_tokenizer(tmp_path).encode(" Crème brûlée 12 pack")[:6], []]
