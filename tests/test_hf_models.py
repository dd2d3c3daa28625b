"""Tests of the Hugging Face backbones: GPT-2, Llama, Qwen2 and Qwen3 folders loaded into pauserec.GPT.

Tiny random models are built and saved by `transformers` (skipped where it is absent) and loaded by
make_model without it; their logits must equal transformers' forward. The config.json checks run
without `transformers`.
"""

import copy
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_gpt2 import train_trainable  # noqa: E402
from test_train import tiny_args  # noqa: E402

import backbones as bb  # noqa: E402
import bench  # noqa: E402
import evaluate  # noqa: E402
import pauserec as pr  # noqa: E402
import train  # noqa: E402
from model import rope_frequencies  # noqa: E402

torch.set_num_threads(1)

V = 300   # text vocabulary of the tiny models
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
GPT2 = dict(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}   # wavelengths 6 .. 2e4: kept, blended and scaled ones
CASES = {   # name: (architecture, config beyond LLAMA or GPT2)
    "llama_gqa_tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_sharded": ("LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "llama3_rope_biases": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3, attention_bias=True, mlp_bias=True)),
    "qwen2_qkv_bias_linear_rope": ("Qwen2ForCausalLM", dict(num_key_value_heads=2,
                                                            rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3_qk_norm_head_dim": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32,
                                                        tie_word_embeddings=True)),
    "gpt2": ("GPT2LMHeadModel", {}),
}


def codes(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    return torch.unique(torch.stack([torch.randint(0, s, (n,), generator=g) for s in (4, 5, 6)], 1), dim=0)


def hf_model(folder, case, seed=0):
    """A random model of CASES[case] by `transformers` (weights perturbed, so that norms, biases and a wrong
    split cannot hide), saved into folder by save_pretrained (llama_untied_sharded: in several shards)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    arch, extra = CASES[case][0], copy.deepcopy(CASES[case][1])   # transformers edits rope_scaling in place
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config"))
    torch.manual_seed(seed)
    ref = getattr(transformers, arch)(config_class(**(GPT2 if arch.startswith("GPT2") else LLAMA), **extra)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(str(folder), max_shard_size="100KB" if "sharded" in case else "1GB")
    return ref


def load(folder, tok=None, **kw):
    cfg = pr.ModelConfig(backbone="hf", hf_dir=str(folder), max_len=64, dropout=0.0, **kw)
    tok = tok or bb.make_tokens(cfg, codes())
    return cfg, tok, bb.make_model(cfg, tok).eval()


# ----------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    """Our forward on the text tokens = transformers', in one pass and, for a left-padded batch, through the KV
    cache (prefill, then one token at a time), compared row by row with transformers on the unpadded rows."""
    ref = hf_model(tmp_path, case)
    if "sharded" in case:
        shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 1, shards
    _, tok, ours = load(tmp_path)
    assert tok.base == V and ours.cfg.n_layer == 2 and tok.size > V
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 40), generator=g)
    prompts = [ids[0, :30].tolist(), ids[1, :17].tolist(), ids[2, :5].tolist()]
    steps = torch.randint(0, V, (3, 3), generator=g)
    with torch.no_grad():
        diffs = [(ours(ids)[..., :V] - ref(ids).logits).abs().max().item()]
        padded, mask = pr.left_pad(prompts, pad=0)
        cache = pr.KVCache()
        out = [ours(padded, key_mask=mask, cache=cache)] + [ours(steps[:, i: i + 1], cache=cache) for i in range(3)]
        got, T = torch.cat(out, 1)[..., :V], padded.shape[1]        # [3, T + 3, V]
        for b, p in enumerate(prompts):
            want = ref(torch.tensor([p + steps[b].tolist()])).logits[0]
            diffs.append((got[b, T - len(p):] - want).abs().max().item())
    print(f"{case}: max abs logit difference {max(diffs):.2e} (one pass {diffs[0]:.2e})")
    assert max(diffs) <= 1e-4


def test_keep_layers_loads_the_first_blocks(tmp_path):
    ref = hf_model(tmp_path, "qwen3_qk_norm_head_dim")
    _, tok, ours = load(tmp_path, keep_layers=1)
    assert len(ours.transformer.h) == 1
    ref.model.layers = ref.model.layers[:1]
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids)[..., :V] - ref(ids).logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="model.keep_layers=3 exceeds the 2 blocks"):
        load(tmp_path, tok, keep_layers=3)


# ----------------------------------------------------------------------------------------------- our tokens


def distinct_rows(model, tok, seed=0):
    """Our rows all start as the mean pretrained row: spread them, so that items get clearly different scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.new_rows, model.new_head_rows):   # our input rows, and an untied head's
            if w is not None:
                w += torch.randn(tok.size - tok.base, w.shape[1], generator=g) * 0.5


def test_beam_search_matches_transformers_generate_llama(tmp_path):
    """Trie-constrained beam search vs generate(num_beams=10, prefix_allowed_tokens_fn) on a tied GQA Llama:
    the same top-10 items, in the same order, with the same scores, for a left-padded batch of prompts
    (bench.hf_beam_search). transformers' copy gets our token rows by resize_token_embeddings."""
    ref = hf_model(tmp_path, "llama_gqa_tied")
    cfg, tok, model = load(tmp_path, reasoning="pause", num_pauses=2, pause_layout="target")
    distinct_rows(model, tok)
    ref.resize_token_embeddings(tok.size, mean_resizing=False)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(model.input_rows())
    assert ref.lm_head.weight is ref.get_input_embeddings().weight
    ref.generation_config.pad_token_id, ref.generation_config.eos_token_id = tok.PAD, tok.EOS
    trie, r = pr.SIDTrie(codes()), random.Random(0)
    prompts = [pr.build_prompt(tok, cfg, [r.randrange(len(codes())) for _ in range(r.randint(1, 5))])
               for _ in range(4)]
    assert len(set(map(len, prompts))) > 1                  # left padding is exercised
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=10, topk=10)
    theirs, their_scores = bench.hf_beam_search(ref, tok, trie, prompts, 10, 10)
    assert torch.equal(theirs, items)
    assert torch.allclose(their_scores, scores, atol=1e-4), (their_scores - scores).abs().max()


@pytest.mark.parametrize("mode", [dict(reasoning="none"), dict(reasoning="pause", pause_embeddings="distinct"),
                                  dict(reasoning="latent"), dict(reasoning="cot", max_rationale_len=3)])
def test_head_over_our_tokens_full_beam_equals_exhaustive(tmp_path, mode):
    """model.head=new (the softmax over our tokens only) on a Qwen3 (q/k norms, head_dim 32, GQA): its logits are
    the full head's at ids >= base, the full beam equals exhaustive score_items, the cot rationale is the full
    head's, and the training loss is the mean of the target tokens' log-losses."""
    hf_model(tmp_path, "qwen3_qk_norm_head_dim")
    words = [f"w{i}" for i in range(5)]
    kw = dict(mode, pause_layout="target", num_pauses=2, latent_steps=2)
    cfg, tok, full = load(tmp_path, bb.make_tokens(pr.ModelConfig(backbone="hf", hf_dir=str(tmp_path)), codes(),
                                                   words), **kw)
    _, _, new = load(tmp_path, tok, head="new", **kw)
    distinct_rows(full, tok)
    with torch.no_grad():
        if new.pause_slots is not None:
            full.pause_slots.normal_(0, 0.5)
        new.load_state_dict(full.state_dict())
    assert new.head_start == tok.base
    ids = torch.randint(0, tok.size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(new(ids), full(ids)[..., tok.base:])
    trie, N, hs = pr.SIDTrie(codes()), len(codes()), [[0, 5, 9], [3], [7, 1]]
    prompts = [pr.build_prompt(tok, cfg, h) for h in hs]
    items, scores, rats = pr.beam_search(new, tok, cfg, trie, prompts, N, N, return_rationales=True)
    if cfg.reasoning == "cot":
        assert rats == pr.beam_search(full, tok, cfg, trie, prompts, 1, 1, return_rationales=True)[2]
        prompts = [p + r + [tok.END_THINK] for p, r in zip(prompts, rats)]
    refs = [pr.score_items(new, tok, cfg, p, range(N)) for p in prompts]
    for b in range(len(prompts)):
        ref_scores, ref_items = refs[b].sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-5)
    if cfg.reasoning in ("none", "latent"):
        targets = [4, 0, 7]
        batch = pr.collate([pr.build_example(tok, cfg, h, t) for h, t in zip(hs, targets)], tok.PAD)
        expect = -sum(refs[b][t] for b, t in enumerate(targets)) / (len(targets) * tok.num_levels)
        assert torch.allclose(pr.training_loss(new, *batch), expect, atol=1e-5)


def test_train_only_new_tokens_untied_llama(tmp_path):
    """Untied head: our input rows (new_rows) and output rows (new_head_rows) are the only trained weights; the
    split model computes the same logits as the plain one, with either head."""
    hf_model(tmp_path, "llama_untied_sharded")
    cfg, tok, plain = load(tmp_path)
    ids = torch.randint(0, tok.size, (2, 10), generator=torch.Generator().manual_seed(0))
    for head in ("full", "new"):
        _, _, split = load(tmp_path, tok, head=head, train_only_new_tokens=True)
        assert {n for n, p in split.named_parameters() if p.requires_grad} == {"new_rows", "new_head_rows"}
        with torch.no_grad():
            want = plain(ids)[..., split.head_start:]
            assert torch.allclose(split(ids), want, atol=1e-5)
    split.train()
    before = {k: v.clone() for k, v in split.state_dict().items()}
    train_trainable(split, tok, cfg, steps=2)
    after = split.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["new_rows", "new_head_rows"]



def test_tiny_llama_run_trains_and_evaluate_reproduces(tmp_path):
    """train.py end to end on a sharded untied Llama (its first block only, head over our tokens, only our rows
    trained), and evaluate.py rebuilding the model from config.json and model.pt gives the same test metrics."""
    hf_model(tmp_path / "llama", "llama_untied_sharded")
    metrics = train.main(tiny_args(tmp_path, "train.epochs=2", "model.backbone=llama",
                                   f"model.hf_dir={tmp_path / 'llama'}", "model.max_len=96", "model.head=new",
                                   "model.train_only_new_tokens=true", "model.keep_layers=1",
                                   "model.reasoning=pause", "train.lr=1e-2"))
    assert evaluate.main([str(tmp_path / "runs" / "demo")])["ndcg@10"] == metrics["test"]["ndcg@10"]


# ----------------------------------------------------------------------------------------------- config.json


def write_config(folder, **changes):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **LLAMA}
    config.update(changes)
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def test_hf_config_reads_the_llama_family(tmp_path):
    hf = bb.hf_config(write_config(tmp_path, rope_theta=5e5))
    assert {k: hf[k] for k in ("family", "vocab_size", "max_positions", "n_kv_head", "head_dim", "d_ff", "norm",
                               "mlp", "pos", "rope_theta", "bias", "qkv_bias", "qk_norm", "tie_head")} == dict(
        family="llama", vocab_size=V, max_positions=128, n_kv_head=2, head_dim=16, d_ff=96, norm="rmsnorm",
        mlp="swiglu", pos="rope", rope_theta=5e5, bias=False, qkv_bias=False, qk_norm=False, tie_head=True)
    pr.ModelConfig(**{k: v for k, v in hf.items() if k not in ("family", "vocab_size", "max_positions")})
    # transformers 4 writes rope_theta and rope_scaling at the top, transformers 5 nests both in rope_parameters
    old = bb.read_config(write_config(tmp_path / "a", rope_theta=5e5, rope_scaling=dict(LLAMA3)))
    new = bb.read_config(write_config(tmp_path / "b", rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    plain = bb.rope_inv_freq(bb.read_config(tmp_path))
    assert torch.equal(bb.rope_inv_freq(old), bb.rope_inv_freq(new))
    assert bb.rope_inv_freq(old)[0] == plain[0] and bb.rope_inv_freq(old)[-1] == plain[-1] / 8   # kept, scaled
    assert torch.allclose(plain, rope_frequencies(16, 5e5))
    linear = bb.read_config(write_config(tmp_path / "c", rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4}))
    assert torch.allclose(bb.rope_inv_freq(linear), plain / 4)


@pytest.mark.parametrize("changes,match", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), r"config.json: architectures \['Mistral"),
    (dict(model_type="qwen2"), "model_type 'qwen2' does not match architectures LlamaForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(attention_bias=True), "attention_bias=True with mlp_bias=False is not supported"),
    (dict(use_sliding_window=True), "sliding-window attention"),
])
def test_unsupported_configs_are_one_line_errors(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match) as e:
        bb.hf_config(write_config(tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_make_model_checks_and_missing_weights(tmp_path):
    folder = write_config(tmp_path)
    tok = bb.make_tokens(pr.ModelConfig(backbone="llama", hf_dir=str(folder)), codes())
    assert tok.base == V
    with pytest.raises(ValueError, match="model.backbone=qwen3 but .* holds a llama model"):
        bb.make_model(pr.ModelConfig(backbone="qwen3", hf_dir=str(folder)), tok)
    with pytest.raises(ValueError, match="model.max_len=256 exceeds the 128 positions"):
        bb.make_model(pr.ModelConfig(backbone="llama", hf_dir=str(folder)), tok)
    with pytest.raises(ValueError, match="text vocabulary of 0"):
        bb.make_model(pr.ModelConfig(backbone="hf", hf_dir=str(folder), max_len=64), pr.Tokens.from_codes(codes()))
    with pytest.raises(FileNotFoundError, match=f"{folder} holds neither model.safetensors"):
        bb.make_model(pr.ModelConfig(backbone="hf", hf_dir=str(folder), max_len=64), tok)
    model = bb.make_model(pr.ModelConfig(backbone="hf", hf_dir=str(folder), max_len=64), tok, pretrained=False)
    assert (model.cfg.pos, model.cfg.n_kv_head, model.inv_freq.shape) == ("rope", 2, (8,))
    assert "transformer.wpe.weight" not in model.state_dict() and "inv_freq" in model.state_dict()
    with pytest.raises(ValueError, match="'layers.0.self_attn.x_proj.weight' has no place"):
        bb.hf_state_dict({"model.layers.0.self_attn.x_proj.weight": torch.zeros(1)}, bb.read_config(folder))
    with pytest.raises(ValueError, match="lacks parts of transformer.h.0.attn.c_attn.weight"):
        bb.hf_state_dict({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)}, bb.read_config(folder))
