"""configs/beauty_qwen3.yaml (the paper's backbone, Qwen3-1.7B) on a tiny random Qwen3 folder laid out as the real
release is: config.json with Qwen3-1.7B's keys at tiny shapes, bf16 safetensors in two shards with their index, and
padding rows after the tokenizer's vocabulary. Written by hand: needs only torch."""

import json

import torch
import yaml
from test_gpt2 import write_tokenizer
from test_mapping import write_llama
from test_train import ROOT, TINY

import backbones as bb
import gguf_to_hf
import train

torch.set_num_threads(1)

CONFIG = ROOT / "configs" / "beauty_qwen3.yaml"
# The recipe's keys: what configs/beauty_smollm2.yaml sets them to must reach a Qwen3 run unchanged
RECIPE = {"model": ["backbone", "head", "dropout", "sid_init"],
          "train": ["lr", "backbone_lr_ratio", "min_lr", "warmup_steps", "refit_epochs", "refit_lr", "align_lr",
                    "align_frozen_epochs", "amp"]}
# Qwen3-1.7B's config.json, but for its shapes (those of the tiny model below)
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
         "attention_dropout": 0.0, "hidden_act": "silu", "max_position_embeddings": 40960, "max_window_layers": 28,
         "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False}


def write_qwen3(folder) -> dict[str, torch.Tensor]:
    """A random tied Qwen3 (2 blocks, width 64, 4 query / 2 KV heads of width 32: head_dim is not width / heads) over
    the test tokenizer plus 8 padding rows, as the hub ships it -> its tensors as written (bf16)."""
    folder.mkdir()
    vocab = write_tokenizer(folder) + 8                      # Qwen's vocab_size counts padding rows too
    raw = write_llama(folder, "Qwen3ForCausalLM", V=vocab, C=64, n_head=4, n_kv=2, head_dim=32, ff=96, tie=True)
    raw = {name: t.bfloat16() for name, t in raw.items()}
    (folder / "model.safetensors").unlink()
    names, weight_map = sorted(raw), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        gguf_to_hf.write_safetensors(folder / shard, {n: raw[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **QWEN3, "bos_token_id": 0, "eos_token_id": 1}))
    return raw


def test_the_qwen3_config_loads_a_qwen3_folder_and_trains_with_the_recipe(tmp_path, monkeypatch):
    """train.py on configs/beauty_qwen3.yaml, overridden only in the data, the SID table's size, the folder, the device
    and the length of the run: the recipe's keys reach the resolved config; the model is Qwen3's block (q/k norms,
    GQA, head_dim 32) with the folder's bf16 weights; a step leaves the loss finite, moves our rows and the blocks,
    and leaves the frozen text rows bit-identical."""
    raw = write_qwen3(tmp_path / "qwen3")
    made, make_model = {}, bb.make_model

    def watched(cfg, tok, pretrained=True):   # the model as loaded, before any step
        model = make_model(cfg, tok, pretrained)
        made.update(cfg=model.cfg, state={k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(bb, "make_model", watched)
    tiny_data = [a for a in TINY if a.startswith(("data.", "sid.")) and not a.startswith("data.num_users")]
    overrides = [*tiny_data, "data.num_users=200", f"model.hf_dir={tmp_path / 'qwen3'}", "train.device=cpu",
                 "train.threads=1", "train.epochs=1", "train.log_every=1", f"train.out_dir={tmp_path / 'runs'}",
                 f"train.sid_cache={tmp_path / 'sids'}"]
    recipe = {f"{section}.{key}" for section, keys in RECIPE.items() for key in keys}
    assert not recipe & {a.split("=")[0] for a in overrides}                     # the file's own settings are run
    train.main([str(CONFIG), *overrides])

    run = tmp_path / "runs" / "beauty_qwen3"
    file = yaml.safe_load(CONFIG.read_text())
    sibling = yaml.safe_load((ROOT / "configs" / "beauty_smollm2.yaml").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for section, keys in RECIPE.items():
        for key in keys:
            assert file[section].get(key) == sibling[section][key] == resolved[section][key], f"{section}.{key}"
    assert resolved["model"]["pause_layout"] == "last"                             # one example per user

    cfg, start = made["cfg"], made["state"]
    assert (cfg.qk_norm, cfg.n_kv_head, cfg.head_dim, cfg.tie_head, cfg.rope_theta) == (True, 2, 32, True, 1e6)
    qkv = torch.cat([raw[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]).float()
    assert torch.equal(start["transformer.h.0.attn.c_attn.weight"], qkv)          # the bf16 shards, read
    losses = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    end = torch.load(run / "last.pt", weights_only=False)["model"]
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert {"new_rows", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.q_norm.weight"} <= moved
    assert "transformer.wte.weight" not in moved and "lm_head.weight" not in moved
