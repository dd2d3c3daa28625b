"""Pretrained backbones: a Hugging Face folder (GPT-2, Llama, Qwen2, Qwen3) as our decoder, without `transformers`.

Read top to bottom:
  1. Hugging Face folders: config.json -> ModelConfig flags, safetensors (one file or shards), names mapped
     onto our GPT's (GPT-2's)
  2. Fetching a folder's missing files from model.hf_url
  3. The decoder and tokens for model.backbone: our tokens' rows appended after the text rows (make_model,
     make_tokens; scratch models too)
The byte-level BPE tokenizer is bpe.py; the GGUF converter (SmolLM2 offline) is gguf_to_hf.py.
"""

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

import bpe
import common
from model import GPT, ModelConfig
from pauserec import Tokens

# ---------------------------------------------------------------------------------------------------------
# 1. Hugging Face folders

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
# 2. Fetching


def fetch_hf(mcfg: ModelConfig):
    """Fetch the files that model.hf_dir lacks from model.hf_url (e.g. a Hugging Face hub repository):
    config.json, then the first weights form the server has (a sharded checkpoint's index, then the shards
    it names) and, for titled prompts and rows started from words (sid_init, pause_init text), the first
    tokenizer form."""
    folder = Path(mcfg.hf_dir)
    needs = {"weights": WEIGHT_FILES}
    if mcfg.prompt != "sids" or "text" in (mcfg.sid_init, mcfg.pause_init):
        needs["a tokenizer"] = TOKENIZER_FILES
    missing = [what for what, forms in needs.items() if not has_files(folder, forms)]
    has_config = (folder / "config.json").is_file()
    missing = ([] if has_config else ["config.json"]) + missing
    if missing and not mcfg.hf_url:
        raise FileNotFoundError(f"model.hf_dir={folder} lacks {', '.join(missing)}: put a Hugging Face model "
                                f"folder there, or set model.hf_url to fetch it")
    if not has_config:
        fetch_one(mcfg, "config.json")
    for forms in needs.values():
        if not has_files(folder, forms):
            fetch_first(mcfg, forms)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (folder / shard).is_file():
                fetch_one(mcfg, shard)


def fetch_first(mcfg: ModelConfig, forms):
    """Fetch the first of `forms` (tuples of file names) that the server has all of."""
    errors = []
    for names in forms:
        try:
            for name in names:
                fetch_one(mcfg, name)
            return
        except OSError as e:
            errors.append(str(e))
    raise common.DownloadError(f"model.hf_dir={mcfg.hf_dir}: none of {[' + '.join(f) for f in forms]} could be "
                               f"fetched from model.hf_url (offline?): {errors[0]}")


def fetch_one(mcfg: ModelConfig, name: str):
    try:
        common.download(f"{mcfg.hf_url.rstrip('/')}/{name}", Path(mcfg.hf_dir) / name, desc=name)
    except OSError as e:
        raise common.DownloadError(f"model.hf_dir={mcfg.hf_dir} lacks {name} and fetching it failed "
                                   f"(offline?): {e}") from e


# ---------------------------------------------------------------------------------------------------------
# 3. The decoder and tokens for model.backbone


def backbone_config(cfg: ModelConfig, tok: Tokens) -> ModelConfig:
    """cfg with the architecture of cfg.hf_dir's config.json: sizes and block flags (hf_config), the
    depth cut to model.keep_layers; checked against cfg.backbone, model.max_len and the tokens' text vocabulary."""
    hf = hf_config(cfg.hf_dir)
    fam, vocab, max_positions = hf.pop("family"), hf.pop("vocab_size"), hf.pop("max_positions")
    where = f"{cfg.hf_dir}/config.json"
    if cfg.backbone not in ("hf", fam):
        raise ValueError(f"model.backbone={cfg.backbone} but {where} holds a {fam} model (model_type)")
    if cfg.max_len > max_positions:
        raise ValueError(f"model.max_len={cfg.max_len} exceeds the {max_positions} positions of {where}")
    if tok.base != vocab:
        raise ValueError(f"Tokens were built for a text vocabulary of {tok.base}, {where} has vocab_size {vocab}")
    if cfg.keep_layers > hf["n_layer"]:
        raise ValueError(f"model.keep_layers={cfg.keep_layers} exceeds the {hf['n_layer']} blocks of {where}")
    return dataclasses.replace(cfg, **dict(hf, n_layer=cfg.keep_layers or hf["n_layer"]))


def sid_keywords(tok: Tokens, item_text: list[list[int]], n_words: int) -> dict[int, list[int]]:
    """sid_init text: for each SID token, the n_words text tokens most typical of the items whose SID has it:
    tf-idf, tf = the token's count in those items' texts, idf = log(items / items whose text has the token)."""
    df = torch.zeros(tok.base)
    for ids in item_text:
        df[sorted(set(ids))] += 1
    idf = torch.log(len(item_text) / df.clamp(min=1))
    counts: dict[int, torch.Tensor] = {}                  # SID token -> [base] token counts of its items' texts
    for item, ids in enumerate(item_text):
        for t in tok.sid(item):
            counts.setdefault(t, torch.zeros(tok.base)).index_add_(0, torch.tensor(ids, dtype=torch.long),
                                                                   torch.ones(len(ids)))
    score = {t: torch.where(c > 0, c * idf, -1.0) for t, c in counts.items()}   # -1: not in these items' texts
    return {t: s.topk(min(n_words, int((s >= 0).sum()))).indices.tolist() for t, s in score.items()}


def initial_rows(w, tok: Tokens, cfg: ModelConfig):
    """Initial rows [V - base, d] of our tokens from the pretrained rows w [base, d]: each the mean row, except
    that a rationale word (cot) starts as the mean of its own text tokens' rows when the folder has a tokenizer,
    so the LM reads ' brand opi' in its words from the first step; with model.sid_init=text each SID token starts
    as the mean row of its keywords (sid_keywords: TS-Rec's SA-Init, with tf-idf in place of a teacher LLM);
    model.pause_init and model.bos_init move the <pause> and BOS rows (special_rows)."""
    ours = w.mean(0).expand(tok.size - tok.base, -1).clone()
    if tok.words and has_files(cfg.hf_dir, TOKENIZER_FILES):
        text = bpe.load_tokenizer(cfg.hf_dir)
        for j, word in enumerate(tok.words):
            ours[tok.word_start - tok.base + j] = w[text.encode(" " + word)].mean(0)
    if cfg.sid_init == "text":
        for t, words in sid_keywords(tok, tok.item_text, cfg.sid_init_words).items():
            if words:
                ours[t - tok.base] = w[words].mean(0)
    special_rows(ours, w, tok, cfg)
    return ours


PAUSE_WORD = " wait"   # model.pause_init=text: the <pause> row starts at the mean row of this word's text tokens


def special_rows(ours, w, tok: Tokens, cfg: ModelConfig):
    """model.pause_init=text and model.bos_init=backbone, in place on our rows ours [V - base, d]: at the mean row
    every special starts as the same vector, so k pauses may read like k more BOS tokens (the position a pretrained LM
    parks its attention on); a word's row (pause) or the backbone's own BOS row (bos) sets them apart."""
    if cfg.pause_init == "text":
        if not has_files(cfg.hf_dir, TOKENIZER_FILES):
            raise ValueError(f"model.pause_init=text needs a tokenizer in {cfg.hf_dir} (tokenizer.json or vocab.json + "
                             f"merges.txt)")
        ours[tok.PAUSE - tok.base] = w[bpe.load_tokenizer(cfg.hf_dir).encode(PAUSE_WORD)].mean(0)
    if cfg.bos_init == "backbone":
        bos = read_config(cfg.hf_dir).get("bos_token_id")
        if not isinstance(bos, int) or not 0 <= bos < w.shape[0]:
            raise ValueError(f"model.bos_init=backbone needs a bos_token_id in {cfg.hf_dir}/config.json, got {bos!r}")
        ours[tok.BOS - tok.base] = w[bos]


def load_pretrained(model: GPT, tok: Tokens, cfg: ModelConfig):
    """The checkpoint's weights into model: the text rows into wte (and an untied lm_head), our tokens' rows
    (ids tok.base..) from initial_rows into new_rows (new_head_rows); learned positions cut to max_len."""
    hf_dir = cfg.hf_dir
    sd = hf_state_dict(read_checkpoint(hf_dir), read_config(hf_dir), cfg.n_layer)
    for name, apart in (("transformer.wte.weight", "new_rows"), ("lm_head.weight", "new_head_rows")):
        if name not in sd:   # a tied head
            continue
        w = sd[name]
        if w.shape[0] != tok.base:
            raise ValueError(f"{hf_dir}: {name} has {w.shape[0]} rows, config.json's vocab_size is {tok.base}")
        sd[apart] = initial_rows(w, tok, cfg)
    if cfg.tie_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    if cfg.pos == "learned":
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: cfg.max_len]
    own = ("pause_slots", "reasoning_pos", "inv_freq")    # ours, not the checkpoint's: kept as initialised
    sd.update({k: v for k, v in model.state_dict().items() if k in own})
    model.load_state_dict(sd)


OURS = ("new_rows", "new_head_rows", "pause_slots", "reasoning_pos")   # a pretrained model's parameters of our own


def make_model(cfg: ModelConfig, tok: Tokens, pretrained: bool = True) -> GPT:
    """The decoder for cfg.backbone. Pretrained: the architecture of config.json (n_layer, n_head, d_model and
    the block flags replace the config's: backbone_config), RoPE's frequencies as the checkpoint scales them,
    and with `pretrained` its weights (load_pretrained). The text rows train only with model.train_text_rows;
    with train_only_new_tokens only our parameters train (OURS: our rows, pause slots, latent step embeddings)."""
    if cfg.backbone == "scratch":
        return GPT(cfg, tok.size, tok.base)
    cfg = backbone_config(cfg, tok)
    model = GPT(cfg, tok.size, tok.base)
    if cfg.pos == "rope":
        model.inv_freq.copy_(rope_inv_freq(read_config(cfg.hf_dir)))
    if pretrained:
        load_pretrained(model, tok, cfg)
    model.transformer.wte.weight.requires_grad_(cfg.train_text_rows)   # the text rows (a tied head's too)
    model.lm_head.weight.requires_grad_(cfg.train_text_rows)
    if cfg.train_only_new_tokens:
        for name, p in model.named_parameters():
            p.requires_grad_(name in OURS)
    return model


def make_tokens(cfg: ModelConfig, codes, words=(), item_meta=None) -> Tokens:
    """Tokens for cfg.backbone: from scratch ours only; pretrained ours after its text vocabulary (config.json's
    vocab_size, padding rows included), and with prompt sids+titles every item's title as text tokens
    (' ' + title, at most max_title_len)."""
    if cfg.backbone == "scratch":
        return Tokens.from_codes(codes, words)
    tok = Tokens.from_codes(codes, words, base=hf_config(cfg.hf_dir)["vocab_size"])
    if cfg.prompt == "sids+titles" or cfg.sid_init == "text":
        text = bpe.load_tokenizer(cfg.hf_dir)
        if len(text) > tok.base:
            raise ValueError(f"{cfg.hf_dir}: the tokenizer has {len(text)} tokens, more than vocab_size {tok.base}")
        titles = [text.encode(" " + m["title"])[: cfg.max_title_len] if m.get("title") else [] for m in item_meta]
        if cfg.prompt == "sids+titles":
            tok.item_titles = titles
        if cfg.sid_init == "text":   # each item's title and category (sid_keywords)
            tok.item_text = [t + text.encode(" " + m["category"]) if m.get("category") else t
                             for t, m in zip(titles, item_meta)]
    return tok
