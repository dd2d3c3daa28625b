"""Tests of the GPT-2 backbone: safetensors reader, weight import, byte-level BPE, titled prompts, fetch.

Checkpoints here are tiny and random, written by the tests in the Hugging Face layout (Conv1D weights
[in, out], names with 'transformer.'), so most tests need no `transformers`; those that compare with
it (logits, tokenizer, generate) are skipped where it is absent.
"""

import collections
import functools
import http.server
import json
import os
import random
import re
import struct
import sys
import threading
import unicodedata
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_train import tiny_args  # noqa: E402

import backbones as bb  # noqa: E402
import bench  # noqa: E402
import bpe  # noqa: E402
import evaluate  # noqa: E402
import pauserec as pr  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world! It's 2024, isn't it? We're here;
they'll see. I'd say you've got 3.14 reasons, 1,000 items at $9.99 each. Nail polish top coat,
lip gloss & mascara (waterproof) - 12 pack. Café crème brûlée, naïve résumé, Straße, Ελληνικά,
русский текст, 日本語のテキスト, 한국어, emoji 😀🎉 and tabs\tnew\nlines  double  spaces."""
STRINGS = [
    "", " ", "  ", "\n", "\n\n", " \n ", "\t\t x", "a  b", "a\n\nb", "ends with space ", "ends with spaces   ",
    "Hello world", " Hello world", "HELLO", "it's", "It'S", "don't", "we'll", "I'm", "you've", "they're",
    "I'd", "'s", "''", "'sx", "x's's", "123", " 123", "1,234.56", "½ cup", "Ⅻ chapters", "²³", "٣٤٥ arabic digits",
    "x²", "3rd", "a1b2", "foo_bar", "__init__", "snake_case_2", "e-mail", "U.S.A.", "!!!", " ?!", "...", "$$$ 99",
    "café", "naïve", "Straße", "ΑΒΓ αβγ", "Привет мир", "日本語", "中文 字符", "한국어", "😀", "a😀b", " 😀 ",
    "👩‍👩‍👧", "e\u0301", "\u00a0nbsp", "a\u2003b", "a\u3000b", "\u200b zero width", "x\u1680y", "\x1c\x1d\x1e\x1f",
    "a\x1cb", "\x85", "\r\n", "\x0b\x0c", "\u2028\u2029", "tab\t", "\x00nul", "ǅ title case", "ʰ modifier",
    "ﬁ ligature", "Ⓐ circled", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001d7d8 math digit", "🇫🇷 flag",
]


# ----------------------------------------------------------------------------------------------- helpers


def write_safetensors(path, tensors, metadata=None):
    """The format by hand: 8-byte little-endian header size, JSON header, raw tensor bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def train_bpe(corpus: str, num_merges: int):
    """A small byte-level BPE vocabulary (GPT-2's recipe): count pairs in pre-tokens, merge the commonest."""
    b2u = bpe.bytes_to_unicode()
    words = collections.Counter(tuple(b2u[b] for b in piece.encode()) for piece in
                                bpe.gpt2_pretokenizer().findall(corpus))
    vocab = list(b2u.values())
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return {t: i for i, t in enumerate(vocab + ["<|endoftext|>"])}, merges


@functools.cache
def bpe_files():
    return train_bpe(CORPUS * 3, 200)


def write_tokenizer(folder):
    vocab, merges = bpe_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


def write_checkpoint(folder, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0, prefix="transformer.",
                     fmt="safetensors", buffers=False):
    """A random GPT-2 in the Hugging Face layout (Conv1D weights [in, out]), with its tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    V = write_tokenizer(folder)
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    C = n_embd
    sd = {"wte.weight": r(V, C), "wpe.weight": r(n_positions, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(n_layer):
        h = f"h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C), h + "ln_2.weight": 1 + r(C),
                   h + "ln_2.bias": r(C), h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
                   h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
                   h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
                   h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C)})
        if buffers:  # what old checkpoints (openai-community/gpt2) also hold
            sd[h + "attn.bias"] = torch.ones(1, 1, n_positions, n_positions).tril()
    sd = {prefix + k: v for k, v in sd.items()}
    if fmt == "safetensors":
        write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    config = {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
              "n_positions": n_positions, "vocab_size": V, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train_trainable(model, tok, cfg, steps, **adamw):
    """`steps` AdamW steps (lr 1e-2) of the model's trainable parameters on two fixed examples."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **adamw)
    batch = pr.collate([pr.build_example(tok, cfg, [0, 1], 3), pr.build_example(tok, cfg, [2], 4)], tok.PAD)
    for _ in range(steps):
        opt.zero_grad()
        pr.training_loss(model, *batch).backward()
        opt.step()


def gpt2_setup(folder, **kw):
    cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(folder), max_len=kw.pop("max_len", 64), **kw)
    codes = torch.tensor([[0, 1, 0], [1, 0, 2], [1, 2, 1], [2, 2, 0], [0, 0, 1]])
    meta = [{"title": t} for t in ("Nail polish top coat", "Lip gloss, 12 pack", None, "Crème brûlée mask",
                                   "Waterproof mascara")]
    tok = bb.make_tokens(cfg, codes, (), meta)
    return cfg, tok, codes, meta


# ----------------------------------------------------------------------------------------------- safetensors


def test_safetensors_reader_hand_written_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "b.half": torch.randn(5, generator=g).half(),
               "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(7.0)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    got = bb.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k


def test_safetensors_reader_matches_the_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 6), "h": torch.randn(3).half(), "bf": torch.randn(2, 5).bfloat16()}
    st.save_file(tensors, str(tmp_path / "y.safetensors"))
    got = bb.read_safetensors(tmp_path / "y.safetensors")
    for k, t in tensors.items():
        assert torch.equal(got[k], t), k


# ----------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("prefix,fmt,buffers", [("transformer.", "safetensors", False), ("", "safetensors", True),
                                                ("transformer.", "bin", True)])
def test_load_gpt2_maps_names_and_transposes_conv1d(tmp_path, prefix, fmt, buffers):
    folder = write_checkpoint(tmp_path / "ckpt", prefix=prefix, fmt=fmt, buffers=buffers)
    sd, hf = bb.hf_state_dict(bb.read_checkpoint(folder), bb.read_config(folder)), bb.hf_config(folder)
    assert (hf["family"], hf["n_layer"], hf["pos"], hf["tie_head"]) == ("gpt2", 2, "learned", True)
    cfg, tok, _, _ = gpt2_setup(folder)
    model = bb.make_model(cfg, tok)
    ours = model.state_dict()
    assert set(sd) | {"lm_head.weight", "new_rows"} == set(ours)   # our rows apart from the text rows
    assert ours["transformer.h.1.attn.c_attn.weight"].shape == (96, 32)    # nn.Linear [out, in]
    assert torch.equal(ours["transformer.h.1.mlp.c_fc.weight"], sd["transformer.h.1.mlp.c_fc.weight"])
    rows = model.input_rows()
    assert rows.shape[0] == tok.size and tok.PAD == tok.base == hf["vocab_size"]
    new = rows[tok.base:]
    assert torch.allclose(new, rows[: tok.base].mean(0).expand_as(new))    # new rows: mean of the pretrained
    assert model.lm_head.weight is model.transformer.wte.weight


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="model.backbone"):
        pr.ModelConfig(backbone="bert")
    with pytest.raises(ValueError, match="hf_dir"):
        pr.ModelConfig(backbone="gpt2")
    with pytest.raises(ValueError, match="model.prompt"):
        pr.ModelConfig(prompt="titles")
    for key, value in (("prompt", "sids+titles"), ("train_text_rows", True), ("sid_init", "text")):
        with pytest.raises(ValueError, match=re.escape(f"model.{key}={value} needs a pretrained model.backbone")):
            pr.ModelConfig(**{key: value})
    folder = write_checkpoint(tmp_path / "ckpt")
    cfg, tok, _, _ = gpt2_setup(folder)
    with pytest.raises(ValueError, match="max_len=65 exceeds the 64 positions"):
        bb.make_model(pr.ModelConfig(backbone="gpt2", hf_dir=str(folder), max_len=65), tok)
    with pytest.raises(ValueError, match="model.backbone=llama but .* holds a gpt2 model"):
        bb.make_model(pr.ModelConfig(backbone="llama", hf_dir=str(folder), max_len=64), tok)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(conf, activation_function="relu")))
    with pytest.raises(ValueError, match="activation_function"):
        bb.make_model(cfg, tok)
    with pytest.raises(FileNotFoundError, match="config.json"):
        bb.hf_config(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_match_transformers(tmp_path, fmt):
    """A tiny random GPT-2 built and saved by `transformers`, in both weight formats, loads into our decoder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir()
    V = write_tokenizer(folder)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():  # larger than GPT-2's init, so that a wrong transpose cannot hide
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if fmt == "safetensors":
        ref.save_pretrained(str(folder))
        assert (folder / "model.safetensors").is_file()
    else:  # the legacy format: torch.save of the state dict (transformers 5 writes safetensors only)
        ref.config.save_pretrained(str(folder))
        torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    cfg, tok, _, _ = gpt2_setup(folder)
    ours = bb.make_model(cfg, tok).eval()
    ids = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)[..., : tok.base]
    diff = (got - want).abs().max().item()
    print(f"max abs logit difference ({fmt}): {diff:.2e}")
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------- tokenizer


def many_strings():
    r = random.Random(0)
    words = CORPUS.split(" ") + [s for s in STRINGS if s]
    out = list(STRINGS)
    for _ in range(300):
        out.append("".join(r.choice(words) + r.choice(["", " ", "  ", "\n", "\t", " \n", "'s ", "'ll"])
                           for _ in range(r.randint(1, 6))))
    return out


def test_bpe_round_trip_and_pretokens(tmp_path):
    write_tokenizer(tmp_path)
    text = bpe.load_tokenizer(tmp_path)
    for s in many_strings():
        assert text.decode(text.encode(s)) == s, repr(s)
    pat = bpe.gpt2_pretokenizer()
    assert pat.findall("Hello world's  café 12 ½Ⅻ x²!!  \n\n  end  ") == [
        "Hello", " world", "'s", " ", " café", " 12", " ½Ⅻ", " x", "²", "!!", "  \n\n ", " end", "  "]
    assert pat.findall("It'S don't") == ["It", "'", "S", " don", "'t"]   # contractions are lower case only
    assert pat.findall("a\x1cb") == ["a", "\x1c", "b"]                  # \x1c is not White_Space
    assert text.decode([text.encoder["Ġ"]]) == " "
    assert text.decode([text.encoder[bpe.bytes_to_unicode()[0xC3]]]) == "\ufffd"   # half a character: replaced


def test_pretokenizer_classes_equal_regex_module():
    """\\p{L}, \\p{N} and \\s of `regex` (what GPT-2's own encoder.py used) over every code point."""
    regex = pytest.importorskip("regex")
    # exact for the code points this Python's Unicode version has assigned
    text = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs"))
    pat = bpe.gpt2_pretokenizer().pattern
    L = pat[pat.index(" ?[") + 2: pat.index("]+|")] + "]"
    for ours, theirs in ((L, r"\p{L}"), (r"[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]", r"\s")):
        assert re.findall(ours, text) == regex.findall(theirs, text), theirs
    ref = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for s in many_strings():
        assert bpe.gpt2_pretokenizer().findall(s) == ref.findall(s), repr(s)


def test_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path)
    ref = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    ours = bpe.load_tokenizer(tmp_path)
    strings = many_strings()
    assert len(strings) > 300
    for s in strings:
        want = ref.encode(s, add_special_tokens=False)
        assert ours.encode(s) == want, repr(s)
        assert ours.decode(want) == ref.decode(want, clean_up_tokenization_spaces=False), repr(s)


# ----------------------------------------------------------------------------------------------- prompts


def test_gpt2_token_layout_is_the_scratch_layout_shifted(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    cfg, tok, codes, _ = gpt2_setup(folder, prompt="sids")
    scratch = pr.Tokens.from_codes(codes)
    b = tok.base
    assert tok.item_titles is None and tok.size == scratch.size + b
    ids, mask = pr.build_example(tok, cfg, [0, 3], 1)
    ids0, mask0 = pr.build_example(scratch, pr.ModelConfig(max_len=64), [0, 3], 1)
    assert ids == [t + b for t in ids0] and mask == mask0
    assert tok.decode(ids) == scratch.decode(ids0)


def test_titled_prompt_and_oldest_first_truncation(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    cfg, tok, codes, meta = gpt2_setup(folder, prompt="sids+titles", reasoning="pause", num_pauses=2,
                                       pause_layout="target", max_len=64)
    text = bpe.load_tokenizer(folder)
    assert tok.item_titles[0] == text.encode(" Nail polish top coat")[: cfg.max_title_len]
    assert tok.item_titles[2] == []                                        # no title
    ids, mask = pr.build_example(tok, cfg, [0, 2], 4)
    want = [tok.BOS] + tok.item_titles[0] + tok.sid(0) + tok.sid(2) + [tok.PAUSE] * 2 + tok.sid(4)
    assert ids == want
    assert [i for i, m in enumerate(mask) if m] == list(range(len(ids) - 3, len(ids)))
    assert pr.build_prompt(tok, cfg, [0, 2]) == want[:-3]
    # a long history: the oldest items are dropped until prompt + pauses + target fit max_len
    history = [0, 1, 3, 4, 0, 1, 3, 4, 0, 1, 3, 2]
    ids, _ = pr.build_example(tok, cfg, history, 4)
    assert len(ids) <= cfg.max_len
    n = next(n for n in range(1, len(history) + 1) if pr.build_example(tok, cfg, history[-n:], 4)[0] == ids)
    kept = history[-n:]
    assert 1 < len(kept) < len(history)
    assert ids[1: 1 + len(tok.item_titles[kept[0]])] == tok.item_titles[kept[0]]
    cost = len(tok.item_titles[history[-len(kept) - 1]]) + 3               # the next older item would not fit
    assert len(ids) + cost > cfg.max_len
    prompt = pr.build_prompt(tok, cfg, history)
    assert len(prompt) + tok.num_levels <= cfg.max_len


def test_train_only_new_tokens_freezes_pretrained_weights(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    cfg, tok, _, _ = gpt2_setup(folder, prompt="sids+titles", train_only_new_tokens=True)
    model = bb.make_model(cfg, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["new_rows"]   # our rows, apart
    assert model.transformer.wte.weight.shape[0] == tok.base and model.new_rows.shape[0] == tok.size - tok.base
    train_trainable(model, tok, cfg, steps=3, weight_decay=0.0)
    after = model.state_dict()
    for k, v in before.items():
        if k != "new_rows":
            assert torch.equal(v, after[k]), k                             # GPT-2's weights and rows stay
    assert not torch.equal(before["new_rows"], after["new_rows"])          # ours learn


# ----------------------------------------------------------------------------------------------- fetch



def test_rationale_words_start_as_their_text_tokens_mean_row(tmp_path):
    folder = write_checkpoint(tmp_path / "gpt2")
    cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(folder), max_len=64, reasoning="cot", pause_layout="target")
    tok = bb.make_tokens(cfg, torch.tensor([[0, 1], [1, 0]]), ["polish", "brand", "opi"])
    wte = bb.make_model(cfg, tok).input_rows().detach()
    text = bpe.load_tokenizer(folder)
    for w in tok.words:
        assert torch.allclose(wte[tok.word_index[w]], wte[text.encode(" " + w)].mean(0)), w
    assert torch.allclose(wte[tok.PAUSE], wte[: tok.base].mean(0))      # every other new row: the mean row

def serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_fetch_hf_folder_from_local_http_server(tmp_path):
    src = write_checkpoint(tmp_path / "hub")
    server = serve(src)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path / "local"), hf_url=url + "/",
                             prompt="sids+titles")
        bb.fetch_hf(cfg)
        for name in ("config.json", "vocab.json", "merges.txt", "model.safetensors"):
            assert (tmp_path / "local" / name).read_bytes() == (src / name).read_bytes(), name
        bb.fetch_hf(cfg)  # all there: nothing to do
        broken = pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path / "other"), hf_url=url + "/missing")
        with pytest.raises(OSError, match="fetching it failed"):
            bb.fetch_hf(broken)
        assert not any((tmp_path / "other").iterdir())                        # no partial files
    finally:
        server.shutdown()
        server.server_close()
    offline = pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path / "x"), hf_url=url)   # server is gone
    with pytest.raises(OSError, match="offline"):
        bb.fetch_hf(offline)
    with pytest.raises(FileNotFoundError, match="model.hf_url"):
        bb.fetch_hf(pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path / "y")))



@pytest.mark.parametrize("needs_text", [dict(prompt="sids+titles"), dict(sid_init="text")])
def test_fetch_hf_takes_tokenizer_json_and_the_shards_the_index_names(tmp_path, needs_text):
    hub = tmp_path / "hub"
    hub.mkdir()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    files = {"config.json": "{}", "tokenizer.json": "{}", shards[0]: "a", shards[1]: "b",
             "model.safetensors.index.json": json.dumps({"weight_map": {"x": shards[0], "y": shards[1]}})}
    for name, text in files.items():
        (hub / name).write_text(text)
    server = serve(hub)
    try:
        cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(tmp_path / "local"), **needs_text,
                             hf_url=f"http://127.0.0.1:{server.server_address[1]}")
        bb.fetch_hf(cfg)
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == sorted(files)   # no vocab.json tried after

# ----------------------------------------------------------------------------------------------- end to end


def test_tiny_gpt2_run_with_titles_trains_and_evaluates(tmp_path):
    folder = write_checkpoint(tmp_path / "gpt2", n_positions=96)
    metrics = train.main(tiny_args(tmp_path, "train.epochs=2", "model.backbone=gpt2", f"model.hf_dir={folder}",
                                   "model.prompt=sids+titles", "model.max_len=96", "model.max_title_len=8",
                                   "train.lr=1e-2", "train.log_every=10"))
    run = tmp_path / "runs" / "demo"
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert losses and losses[-1] < 0.6 * losses[0]   # a bar with room below the fall measured once
    assert set(metrics["test"]) >= {"recall@10", "ndcg@10"} and 0 < metrics["test"]["ndcg@10"] <= 1
    again = evaluate.main([str(run)])
    assert again["ndcg@10"] == metrics["test"]["ndcg@10"]


# ----------------------------------------------------------------------------------------------- peer check


def test_beam_search_matches_transformers_generate(tmp_path):
    """Our trie-constrained beam search vs `generate(num_beams, prefix_allowed_tokens_fn)` on the same weights
    (exported into GPT2LMHeadModel by bench.to_hf_gpt2): the same top-k items, in the same order, with the same
    scores. All SIDs have L tokens, so length_penalty=0 makes HF's beam score the summed log-prob, as ours.
    Also batched: prompts of different lengths left-padded, with an attention mask (bench.hf_beam_search)."""
    pytest.importorskip("transformers")
    folder = write_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(3)
    codes = torch.unique(torch.stack([torch.randint(0, s, (60,), generator=g) for s in (4, 5, 6)], 1), dim=0)
    meta = [{"title": f"item {i} " + ("gloss" if i % 2 else "polish")} for i in range(len(codes))]
    cfg = pr.ModelConfig(backbone="gpt2", hf_dir=str(folder), max_len=64, prompt="sids+titles", num_pauses=2)
    tok = bb.make_tokens(cfg, codes, (), meta)
    model = bb.make_model(cfg, tok).eval()
    with torch.no_grad():  # distinct new rows, so that items get clearly different scores
        model.new_rows += torch.randn(tok.size - tok.base, 32, generator=g) * 0.5
    ref = bench.to_hf_gpt2(model, tok)   # raises if a weight does not map
    assert (ref.config.n_layer, ref.config.n_embd, ref.config.n_positions) == (2, 32, 64)
    trie = pr.SIDTrie(codes)
    L, K = trie.num_levels, 10
    r = random.Random(0)
    prompts = [pr.build_prompt(tok, cfg, [r.randrange(len(codes)) for _ in range(r.randint(1, 4))]) for _ in range(4)]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=K, topk=K)
    for u, prompt in enumerate(prompts):
        allowed = bench.trie_allowed_tokens(trie, tok, len(prompt))
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           num_beams=K, num_return_sequences=K, max_new_tokens=L, min_new_tokens=L,
                           do_sample=False, length_penalty=0.0, early_stopping=True,
                           prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True)
        theirs = [trie.lookup([t - o for t, o in zip(seq[-L:].tolist(), tok.offsets)]) for seq in out.sequences]
        assert theirs == items[u].tolist(), u
        assert torch.allclose(out.sequences_scores, scores[u], atol=1e-4), u
    batched, batched_scores = bench.hf_beam_search(ref, tok, trie, prompts, K, K)
    assert len(set(map(len, prompts))) > 1                  # left padding is exercised
    assert torch.equal(batched, items) and torch.allclose(batched_scores, scores, atol=1e-4)


def test_gpt2_backbone_latent_and_distinct_pauses(tmp_path):
    """The latent steps and the distinct pause rows on a pretrained GPT-2 with titled prompts: the full beam
    equals exhaustive scoring, and with train_only_new_tokens their parameters train beside the new rows."""
    folder = write_checkpoint(tmp_path / "ckpt", n_positions=96)
    for kw in ({"reasoning": "latent", "latent_steps": 2}, {"reasoning": "pause", "pause_embeddings": "distinct"}):
        cfg, tok, codes, _ = gpt2_setup(folder, prompt="sids+titles", train_only_new_tokens=True, max_len=96,
                                        pause_layout="target", num_pauses=2, **kw)
        model = bb.make_model(cfg, tok)
        own = "reasoning_pos" if cfg.reasoning == "latent" else "pause_slots"
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {"new_rows", own}
        with torch.no_grad():   # our rows all start as GPT-2's mean row: make the items' scores differ
            getattr(model, own).normal_(0, 0.5)
            model.new_rows += 0.5 * torch.randn(tok.size - tok.base, model.cfg.d_model)
        prompts = [pr.build_prompt(tok, cfg, h) for h in ([0, 1], [3], [2, 4, 1])]
        items, scores = pr.beam_search(model, tok, cfg, pr.SIDTrie(codes), prompts, beam_size=5, topk=5)
        for b, p in enumerate(prompts):
            ref_scores, ref_items = pr.score_items(model, tok, cfg, p, range(5)).sort(descending=True)
            assert items[b].tolist() == ref_items.tolist() and torch.allclose(scores[b], ref_scores, atol=1e-5)
        batch = pr.collate([pr.build_example(tok, cfg, [0, 1], 3), pr.build_example(tok, cfg, [2], 4)], tok.PAD)
        pr.training_loss(model, *batch).backward()
        assert getattr(model, own).grad.abs().sum() > 0
