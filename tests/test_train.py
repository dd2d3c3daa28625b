import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import common
import data
import evaluate
import pauserec
import train

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a unit test: 300 users, 60 items, a 2-layer d=32 decoder.
TINY = ["data.source=synthetic", "data.num_users=300", "data.num_items=60", "sid.codebook_size=8",
        "sid.embed_dim=32", "sid.hidden=[64]", "sid.latent_dim=8", "sid.epochs=20", "sid.batch_size=60",
        "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.reasoning=pause", "model.num_pauses=2",
        "train.batch_size=32", "train.warmup_steps=5", "train.lr=3e-3", "train.patience=0",
        "train.threads=1", "eval.batch_size=128", "model.pause_layout=target", "eval.every=0",
        "model.dropout=0.0", "train.refit_epochs=0", "train.device=cpu"]


def tiny_args(tmp_path, *extra):
    return [str(ROOT / "configs" / "demo.yaml"), *TINY, f"train.out_dir={tmp_path / 'runs'}",
            f"train.sid_cache={tmp_path / 'sids'}", *extra]


def killed_at_first_checkpoint(monkeypatch, args):
    """train.main(args) stopped (KeyboardInterrupt) right after it writes its first last.pt."""
    save = train.checkpoint

    def killed(run):
        save(run)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train, "checkpoint", save)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'model.num_pause'.*model.num_pauses"):
        common.load_config(write(tmp_path, "model:\n  num_pause: 4\n"), [], train.SECTIONS)


def test_config_unknown_section_and_bad_override(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'modle'"):
        common.load_config(write(tmp_path, "modle: {}\n"), [], train.SECTIONS)
    with pytest.raises(ValueError, match="section.key=value"):
        common.load_config(write(tmp_path, "{}\n"), ["epochs=3"], train.SECTIONS)


def test_config_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="train.epochs must be int"):
        common.load_config(write(tmp_path, "train:\n  epochs: three\n"), [], train.SECTIONS)
    with pytest.raises(ValueError, match=r"eval.ks\[1\] must be int"):
        common.load_config(write(tmp_path, "{}\n"), ["eval.ks=[5, x]"], train.SECTIONS)


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        common.load_config(tmp_path / "nope.yaml", [], train.SECTIONS)


def test_config_overrides_and_int_as_float(tmp_path):
    cfg = common.load_config(write(tmp_path, "train:\n  lr: 1\n"), ["model.num_pauses=8", "data.dir=x/y"],
                           train.SECTIONS)
    assert cfg["train"].lr == 1.0 and isinstance(cfg["train"].lr, float)
    assert cfg["model"].num_pauses == 8 and cfg["data"].dir == "x/y"
    assert cfg["eval"].ks == [5, 10]   # untouched defaults


def test_tiny_run_learns_and_evaluate_reproduces_test(tmp_path, capsys):
    metrics = train.main(tiny_args(tmp_path, "train.epochs=6"))
    run = tmp_path / "runs" / "demo"
    assert {"config.yaml", "sids.pt", "model.pt", "log.jsonl", "metrics.json"} <= {p.name for p in run.iterdir()}
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])        # the loss falls
    saved = json.loads((run / "metrics.json").read_text())
    written = {"valid", "test", "baselines", "train_seconds", "sid"}   # keys only: train seconds is a clock's
    assert set(saved) >= written
    assert saved["test"]["ndcg@10"] > saved["baselines"]["mostpop"]["ndcg@10"]
    assert saved["test"]["ndcg@10"] > 0.22   # half the N@10 of this run, measured once (far above MostPop)
    # evaluate.py RUN_DIR reproduces the test numbers exactly
    again = evaluate.main([str(run), "eval.batch_size=7"])
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert again[k] == metrics["test"][k]


def test_refit_trains_the_chosen_checkpoint_on_the_validation_targets(tmp_path):
    """refit_epochs > 0: the checkpoint chosen on validation (kept as model_valid.pt) trains on the validation
    targets too; model.pt is the refit model, and evaluate.py reproduces its test numbers."""
    metrics = train.main(tiny_args(tmp_path, "train.epochs=3", "train.refit_epochs=2", "train.refit_lr=3e-3",
                                   "model.pause_layout=every_item"))
    run = tmp_path / "runs" / "demo"
    chosen, refit = (torch.load(run / name, weights_only=True) for name in ("model_valid.pt", "model.pt"))
    assert refit["step"] == chosen["step"] == metrics["best_step"] and refit["refit_epochs"] == 2
    assert metrics["refit_steps"] > 0 and any(not torch.equal(t, refit["model"][k]) for k, t in chosen["model"].items())

    cfg, ds, codes, tok, model = evaluate.load_run(run)
    # refit examples: every user's sequence up to its validation target (the first window of each user ends there)
    examples = train.training_examples(tok, cfg["model"], ds, None, cfg["data"].max_history, None, refit=True)
    windows = [len(range(len(s) - 1, 1, -cfg["data"].max_history)) for s in ds.sequences]
    assert len(examples) == sum(windows)
    firsts = [examples[sum(windows[:u])][0] for u in range(len(ds.sequences))]
    assert all(ids[-len(tok.sid(s[-2])):] == tok.sid(s[-2]) for ids, s in zip(firsts, ds.sequences))
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)   # layout target: one example per target
    target = train.training_examples(tok, replace(cfg["model"], pause_layout="target"), ds, split,
                                     cfg["data"].max_history, None, refit=True)
    assert len(target) == len(split["train"]) + len(split["valid"])
    again = evaluate.main([str(run)])
    assert all(again[k] == metrics["test"][k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))


def test_checkpoint_metric_missing_from_ks_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"eval.select=ndcg@10 is not computed with eval.ks=\[5, 20\]"):
        train.main(tiny_args(tmp_path, "eval.ks=[5, 20]"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sids").exists()


def test_sid_method_id_is_an_item_id_model_whose_beam_is_exact_top_k(tmp_path):
    """sid.method=id: one code per item, so the trie has one level and the beam search is a plain top-k."""
    metrics = train.main(tiny_args(tmp_path, "train.epochs=3", "sid.method=id", "model.reasoning=none",
                                   "model.pause_layout=every_item"))
    assert metrics["test"]["ndcg@10"] > metrics["baselines"]["mostpop"]["ndcg@10"]
    assert metrics["test"]["ndcg@10"] > 0.30   # half the N@10 of this run, measured once (far above MostPop)
    cfg, ds, codes, tok, model = evaluate.load_run(tmp_path / "runs" / "demo")
    assert codes.tolist() == [[i] for i in range(len(ds.item_ids))] and tok.num_levels == 1
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)
    prompts = [pauserec.build_prompt(tok, cfg["model"], ex.history) for ex in split["test"][:40]]
    items, scores = pauserec.beam_search(model, tok, cfg["model"], pauserec.SIDTrie(codes), prompts,
                                         beam_size=20, topk=10)
    with torch.no_grad():
        ids, key_mask = pauserec.left_pad(prompts, pad=tok.PAD)
        logp = torch.log_softmax(model(ids, key_mask=key_mask, last=True).float(), -1)  # [U, V]
    best = logp[:, tok.offsets[0]:tok.offsets[0] + len(ds.item_ids)].topk(10)
    assert torch.equal(items, best.indices)
    assert torch.allclose(scores, best.values, atol=1e-5)


def test_existing_run_needs_resume_flag(tmp_path):
    train.main(tiny_args(tmp_path, "train.epochs=1"))
    with pytest.raises(FileExistsError, match="train.resume=true"):
        train.main(tiny_args(tmp_path, "train.epochs=1"))


def test_demo_config_is_valid():
    cfg = common.load_config(ROOT / "configs" / "demo.yaml", [], train.SECTIONS)
    assert cfg["data"].source == "synthetic"
    for name in ("beauty", "sports", "toys"):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert common.load_config(ROOT / "configs" / f"{name}.yaml", [], train.SECTIONS)["data"].source == "amazon", raw


def test_tiny_latent_run_trains_and_evaluate_reproduces_test(tmp_path):
    metrics = train.main(tiny_args(tmp_path, "train.epochs=1", "train.log_every=5", "sid.epochs=5",
                                   "model.reasoning=latent", "model.latent_steps=2"))
    run = tmp_path / "runs" / "demo"
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0]   # a bar with room below the fall measured once
    assert "reasoning_pos" in torch.load(run / "model.pt", weights_only=True)["model"]
    again = evaluate.main([str(run), "eval.batch_size=7"])
    assert all(again[k] == metrics["test"][k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))
