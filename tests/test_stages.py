"""Tests of the paper's pipeline (stages.py, train.task, model.init_from, layout last, think_pauses, paper.py)
on a tiny random Llama written in the Hugging Face layout by the tests themselves (no `transformers` needed), with a
GPT-2-style tokenizer, and the demo catalogue."""

import json
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_gpt2 import write_tokenizer  # noqa: E402
from test_train import killed_at_first_checkpoint, tiny_args  # noqa: E402

import backbones as bb  # noqa: E402
import batching  # noqa: E402
import bpe  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import gguf_to_hf  # noqa: E402
import paper  # noqa: E402
import pauserec as pr  # noqa: E402
import sid  # noqa: E402
import stages  # noqa: E402
import sweep  # noqa: E402
import train  # noqa: E402
from model import ModelConfig  # noqa: E402

torch.set_num_threads(1)


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu"}


def llama_weights(config, seed=0):
    """Random tensors under Hugging Face's Llama names (a tied head: no lm_head, as save_pretrained writes it):
    matrices of std 0.02 (transformers' initializer_range), norms 1 plus small noise, so that a norm loaded into
    the wrong place is not hidden by all of them being ones."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    C, F = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * C // config["num_attention_heads"]   # GQA: fewer k, v heads
    sd = {"model.embed_tokens.weight": r(config["vocab_size"], C), "model.norm.weight": 1 + r(C)}
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}."
        sd.update({b + "self_attn.q_proj.weight": r(C, C), b + "self_attn.k_proj.weight": r(kv, C),
                   b + "self_attn.v_proj.weight": r(kv, C), b + "self_attn.o_proj.weight": r(C, C),
                   b + "mlp.gate_proj.weight": r(F, C), b + "mlp.up_proj.weight": r(F, C),
                   b + "mlp.down_proj.weight": r(C, F), b + "input_layernorm.weight": 1 + r(C),
                   b + "post_attention_layernorm.weight": 1 + r(C)})
    return sd


def tiny_llama(folder):
    """A random 2-block Llama (GQA, tied embeddings) over the test tokenizer's vocabulary, a Hugging Face folder
    written by hand (config.json, model.safetensors, vocab.json + merges.txt): these tests need no `transformers`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**LLAMA, "vocab_size": write_tokenizer(folder)}
    (folder / "config.json").write_text(json.dumps(config))
    gguf_to_hf.write_safetensors(folder / "model.safetensors", llama_weights(config))
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def llama_args(tmp_path, folder, *extra):
    return tiny_args(tmp_path, "model.backbone=hf", f"model.hf_dir={folder}", "model.max_len=96", "model.head=new",
                     "model.reasoning=none", "train.epochs=1", "train.align_epochs=1", "train.pause_epochs=2",
                     *extra)


def stage(tmp_path, folder, task, *extra):
    """Runs train.task=task as train.name=task (under tmp_path/runs) and returns its run folder."""
    train.main(llama_args(tmp_path, folder, f"train.task={task}", f"train.name={task}", *extra))
    return tmp_path / "runs" / task


def demo_tokens(folder, n_items=60):
    meta = data.load_synthetic(data.DataConfig(source="synthetic", num_items=n_items, num_users=10)).item_meta
    g = torch.Generator().manual_seed(0)
    codes = torch.randperm(8 * 8, generator=g)[:n_items]
    codes = torch.stack([codes // 8, codes % 8], 1)           # unique 2-level SIDs
    cfg = ModelConfig(backbone="hf", hf_dir=folder, max_len=96, head="new")
    return cfg, bb.make_tokens(cfg, codes), meta, codes


# ----------------------------------------------------------------------------------------------- alignment texts


def test_alignment_texts_pair_each_sid_with_its_own_text_both_ways(llama):
    cfg, tok, meta, _ = demo_tokens(llama)
    text = bpe.load_tokenizer(llama)
    examples = stages.alignment_examples(tok, text, meta, max_title_len=24)
    assert len(examples) == 2 * len(meta)
    for i, m in enumerate(meta):
        desc = stages.describe(text, m, 24)
        assert text.decode(desc) == f" {m['title']}. Category: {m['category']}."
        (ids, mask), (ids2, mask2) = examples[2 * i], examples[2 * i + 1]
        supervised = [t for t, s in zip(ids, mask) if s]
        prompt = [t for t, s in zip(ids, mask) if not s]
        assert supervised == desc and ids[-len(desc):] == desc          # SID -> text: the text is the answer
        n_is, L = len(text.encode(" is")), tok.num_levels
        assert ids[0] == tok.BOS and prompt[len(prompt) - n_is - L: len(prompt) - n_is] == tok.sid(i)
        assert [t for t, s in zip(ids2, mask2) if s] == tok.sid(i) == ids2[-tok.num_levels:]   # text -> SID
        assert ids2[1:1 + len(desc)] == desc and not any(mask2[:-tok.num_levels])
    # an item without a title has no texts; the pause insertion adds unsupervised pauses only
    assert stages.alignment_examples(tok, text, [{"title": None}, meta[1]], 24) == examples[2:4]
    ids, mask = examples[0]
    pids, pmask = stages.insert_pauses(tok, examples[0], 0.5, random.Random(0))
    assert tok.PAUSE in pids and pids[0] == tok.BOS
    assert [t for t in pids if t != tok.PAUSE] == ids and [m for t, m in zip(pids, pmask) if t != tok.PAUSE] == mask
    assert not any(m for t, m in zip(pids, pmask) if t == tok.PAUSE)


# ----------------------------------------------------------------------------------------------- the stages' loss


def test_text_loss_is_the_mean_cross_entropy_of_the_supervised_tokens_over_every_row(llama):
    """stages.text_loss on a right-padded batch against a loop over each supervised token, predicted from its prefix
    alone with a softmax over every row (text and ours): prompts and padding add nothing, no position is shifted."""
    cfg, tok, meta, _ = demo_tokens(llama)
    model = bb.make_model(cfg, tok).eval()
    examples = stages.alignment_examples(tok, bpe.load_tokenizer(llama), meta[:2], 24)   # both directions
    T = max(len(x) for x, _ in examples)
    ids = torch.tensor([x + [0] * (T - len(x)) for x, _ in examples])
    mask = torch.tensor([m + [False] * (T - len(m)) for _, m in examples])
    rows = model.transformer.wte.weight      # a tied head: the output rows are the input rows, text and ours
    if model.new_rows is not None:           # our rows kept apart from the text rows
        rows = torch.cat([rows, model.new_rows])
    with torch.no_grad():
        want = [-torch.log_softmax(rows @ model.hidden(torch.tensor([x[:j]]))[0, -1], 0)[x[j]]
                for x, m in examples for j in range(1, len(x)) if m[j]]
        assert torch.allclose(stages.text_loss(model, ids, mask), torch.stack(want).mean(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- pause pre-training


def test_pause_row_starts_at_the_mean_of_all_rows(llama):
    cfg, tok, _, _ = demo_tokens(llama)
    model = bb.make_model(cfg, tok)
    with torch.no_grad():   # our rows far from the text rows, so that the mean of all rows is not the text mean
        model.new_rows.normal_(3.0, 1.0)
    rows = model.input_rows().detach().clone()
    stages.init_pause_row(model, tok, torch.Generator().manual_seed(0))
    pause = model.input_rows()[tok.PAUSE].detach()
    spread = (pause - rows.mean(0)).abs() / rows.std(0)
    assert 0 < spread.max() <= 5 * stages.PAUSE_SPREAD
    assert (pause - rows[:tok.base].mean(0)).abs().min() > 0.1


def test_pause_pretraining_changes_only_the_pause_row(tmp_path, llama):
    """align, then pause_pretrain from it: every tensor of the model is bit-identical except the <pause> row of our
    rows (new_rows), which has moved from its initial mean."""
    align = stage(tmp_path, llama, "align")
    run = stage(tmp_path, llama, "pause_pretrain", f"model.init_from={align}", "train.pause_rate=0.3")
    before = torch.load(align / "model.pt", weights_only=True)["model"]
    after = torch.load(run / "model.pt", weights_only=True)["model"]
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["new_rows"]                                      # our rows, apart from the text rows
    pause = pr.Tokens.PAUSE                                             # its index among our rows
    differ = (before["new_rows"] != after["new_rows"]).any(1).nonzero().flatten()
    assert differ.tolist() == [pause]
    rows = torch.cat([before["transformer.wte.weight"], before["new_rows"]])   # all input rows [V, d]
    moved = (after["new_rows"][pause] - rows.mean(0)).abs() / rows.std(0)
    assert moved.max() > 5 * stages.PAUSE_SPREAD                         # trained beyond its initial spread
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "pause_pretrain" and metrics["train_tokens"] > 0 and metrics["steps"] > 0


def test_pause_pretraining_of_the_model_trains_the_blocks_and_keeps_the_text_rows(tmp_path, llama):
    """train.pause_trains=model (Goyal et al.'s pause-pretraining): from the backbone as loaded, the blocks and our
    rows train (the <pause> row among them), the text rows stay bit-identical."""
    before = stage(tmp_path / "row", llama, "pause_pretrain", "train.pause_rate=0.3")
    run = stage(tmp_path / "model", llama, "pause_pretrain", "train.pause_rate=0.3", "train.pause_trains=model")
    before = torch.load(before / "model.pt", weights_only=True)["model"]   # only its <pause> row moved
    after = torch.load(run / "model.pt", weights_only=True)["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "transformer.wte.weight" not in changed and "new_rows" in changed
    blocks = {k for k in before if k.startswith("transformer.h.")}
    assert blocks and blocks <= changed
    moved = (before["new_rows"] != after["new_rows"]).any(1).sum()
    assert moved > 1                                                     # SID rows too, not just <pause>


def test_a_stage_resumes_from_its_last_epoch(tmp_path, llama, monkeypatch):
    """A stage writes last.pt at each epoch's end: pause_pretrain stopped after its first epoch and resumed ends
    with the weights of an uninterrupted run."""
    align = stage(tmp_path, llama, "align")
    full = stage(tmp_path, llama, "pause_pretrain", f"model.init_from={align}")
    args = llama_args(tmp_path, llama, "train.task=pause_pretrain", "train.name=cut", f"model.init_from={align}")
    killed_at_first_checkpoint(monkeypatch, args)
    cut = tmp_path / "runs" / "cut"
    assert not (cut / "model.pt").exists()
    assert torch.load(cut / "last.pt", weights_only=False)["step"] == json.loads(
        (full / "metrics.json").read_text())["steps_per_epoch"]
    train.main(args + ["train.resume=true"])
    resumed = torch.load(cut / "model.pt", weights_only=True)["model"]
    want = torch.load(full / "model.pt", weights_only=True)["model"]
    assert resumed.keys() == want.keys() and all(torch.equal(resumed[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------- pause SFT


@pytest.mark.parametrize("think", [False, True])
def test_pause_sft_masks_exactly_the_pause_positions(llama, think):
    cfg, tok, _, _ = demo_tokens(llama)
    cfg = ModelConfig(**{**cfg.__dict__, "reasoning": "pause", "num_pauses": 5, "pause_layout": "last",
                            "think_pauses": think})
    ids, mask = pr.build_example(tok, cfg, [3, 1, 4], 7)
    L = tok.num_levels
    slots = [tok.THINK] + [tok.PAUSE] * 5 + [tok.END_THINK] if think else [tok.PAUSE] * 5
    assert ids == [tok.BOS] + tok.sid(3) + tok.sid(1) + tok.sid(4) + slots + tok.sid(7)
    assert [i for i, t in enumerate(ids) if t == tok.PAUSE] == list(range(1 + 3 * L + think, 1 + 3 * L + think + 5))
    assert mask == [False] * (len(ids) - L) + [True] * L                 # pauses (and history) unsupervised
    assert pr.build_prompt(tok, cfg, [3, 1, 4]) == ids[:-L]
    with pytest.raises(ValueError, match="think_pauses"):
        ModelConfig(reasoning="none", think_pauses=True)
    # </think>, not the SID, follows the pauses: the draft loss and the pause ablation would miss them
    with pytest.raises(ValueError, match="not with model.think_pauses"):
        ModelConfig(reasoning="pause", pause_layout="last", think_pauses=True, step_loss="draft")
    if think:
        with pytest.raises(ValueError, match="--ablate-pauses does not support"):
            evaluate.check_ablation(cfg, "hide")
    else:
        evaluate.check_ablation(cfg, "hide")


def test_layout_last_is_one_example_per_user_its_last_training_item():
    ds = data.load_synthetic(data.DataConfig(source="synthetic", num_items=60, num_users=40))
    split = data.leave_one_out(ds.sequences, 20)
    cfg = ModelConfig(reasoning="pause", num_pauses=5, pause_layout="last")
    tok = pr.Tokens.from_codes(torch.stack([torch.arange(60) // 8, torch.arange(60) % 8], 1))
    for refit, last in ((False, -3), (True, -2)):
        examples = batching.training_examples(tok, cfg, ds, split, 20, random.Random(0), refit=refit)
        want = [pr.build_example(tok, cfg, s[:last][-20:], s[last]) for s in ds.sequences]
        assert examples == want


def test_full_beam_equals_exhaustive_for_the_pause_sft_model(llama):
    cfg, tok, _, codes = demo_tokens(llama)
    cfg = ModelConfig(**{**cfg.__dict__, "reasoning": "pause", "num_pauses": 5, "pause_layout": "last",
                            "think_pauses": True})
    model = bb.make_model(cfg, tok).eval()
    with torch.no_grad():   # our rows distinct (they start equal), so that every item has its own score
        model.new_rows.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    trie, N = pr.SIDTrie(codes), len(codes)
    prompts = [pr.build_prompt(tok, cfg, h) for h in ([0, 5, 9], [3], [7, 1, 2, 8])]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, N, N)
    for b, p in enumerate(prompts):
        ref_scores, ref_items = pr.score_items(model, tok, cfg, p, range(N)).sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-5)


# ----------------------------------------------------------------------------------------------- init_from


def test_init_from_loads_a_stage_and_a_mismatch_is_a_one_line_error(tmp_path, llama):
    align = stage(tmp_path, llama, "align")
    saved = torch.load(align / "model.pt", weights_only=True)["model"]
    cfg = demo_tokens(llama)[0]
    codes, _, _ = sid.load_sids(align / "sids.pt")

    def fresh(words=(), **kw):
        c = ModelConfig(**{**cfg.__dict__, **kw})
        t = bb.make_tokens(c, codes, words)
        return c, t, bb.make_model(c, t)

    _, tok, model = fresh()
    stages.load_init(model, tok, codes, align)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # cot: the rationale words' rows come after the run's, and keep their initial values
    _, tok, model = fresh(reasoning="cot", words=("alpha", "beta"))
    init = model.new_rows[-2:].detach().clone()
    stages.load_init(model, tok, codes, align)
    assert torch.equal(model.new_rows[:-2], saved["new_rows"])
    assert torch.equal(model.new_rows[-2:], init)
    for kw, match in ((dict(keep_layers=1), "model.pt has transformer.h.1"),
                      (dict(reasoning="latent", pause_layout="last"), "model.pt lacks reasoning_pos")):
        _, tok, model = fresh(**kw)
        with pytest.raises(ValueError, match=match) as e:
            stages.load_init(model, tok, codes, align)
        assert str(align) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="SID table") as e:
        stages.load_init(model, tok, codes.flip(0), align)
    with pytest.raises(FileNotFoundError, match="sids.pt not found"):
        stages.load_init(model, tok, codes, tmp_path)
    # through train.py: a run of other settings stops before training, naming the run
    with pytest.raises(ValueError, match=re.escape(f"model.init_from={align}: model.pt has transformer.h.1")):
        train.main(llama_args(tmp_path, llama, f"model.init_from={align}", "model.keep_layers=1", "train.name=x"))


# ----------------------------------------------------------------------------------------------- paper.py


def test_paper_pipeline_end_to_end(tmp_path, llama, capsys):
    """The whole comparison on the tiny Llama: the dry run's token counts are those the runs then train on, and its
    rates are measured for every run; the table has every row; every pause seed is tested with its pauses knocked
    out; a second pipeline reuses every finished stage and ablation."""
    config = tiny_args(tmp_path)[0]
    over = llama_args(tmp_path, llama)[1:] + ["data.num_users=120", "model.num_pauses=3"]
    out = str(tmp_path / "bench")
    plan = paper.main([config, "--out", out, "--dry-run", "--time-steps", "1", *over])
    assert plan["measured"] and all(p["train_tokens_per_s"] > 0 for p in plan["runs"])
    assert all(p["eval_users_per_s"] > 0 for p in plan["runs"] if p["eval_users"])
    result = paper.main([config, "--out", out, "--time-users", "8", "--probe-items", "20", *over])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["rows"] == json.loads(json.dumps(result["rows"]))
    names = [r["system"] for r in result["rows"]]
    assert names[:2] == ["MostPop", "Markov"]
    for want in ("alignment", "pause pre-training", "aligned: plain SFT", "aligned: pause SFT (k=3)",
                 "aligned: CoT SFT", "not aligned: plain SFT", "not aligned: pause SFT (k=3)", "not aligned: CoT SFT",
                 "backbone as loaded", "scratch decoder: plain"):
        assert want in names, names
    scratch = yaml.safe_load((tmp_path / "bench" / "scratch_seed0" / "config.yaml").read_text())
    assert scratch["model"]["backbone"] == "scratch" and scratch["data"]["num_users"] == 120
    for r in result["rows"]:   # the alignment check on every pretrained model, none on the scratch decoder
        probed = r["system"] not in ("MostPop", "Markov", "scratch decoder: plain")
        assert ("title_to_sid_top1" in r) == probed, r["system"]
        if probed:
            assert 0 <= r["title_to_sid_top1"] <= 1 and 0 <= r["sid_to_title_first"] <= 1
    align = sweep.run_config(paper.pipeline_runs(config, over, tmp_path / "bench", 1)[0][3])
    codes, _, _ = sid.load_sids(tmp_path / "bench" / "align" / "sids.pt")
    tok = bb.make_tokens(align["model"], codes, (), data.load_dataset(align["data"]).item_meta)
    assert plan["train_flops_per_token"] == 6 * paper.model_size(align, tok)   # the backbone's, not the scratch rows'
    for run in plan["runs"]:   # the dry run counts the tokens each run trains on
        metrics = json.loads((tmp_path / "bench" / run["run"] / "metrics.json").read_text())
        assert metrics["train_tokens"] == run["train_tokens"], run["run"]
    for r in result["rows"]:
        if r["system"].endswith("SFT") or "SFT (" in r["system"]:
            assert 0 <= r["test"]["ndcg@10"] <= r["test"]["recall@10"] <= 1
            # the latency is a clock reading (rounded to 0.01 ms): only that it is there, not its size, is checked
            assert r["ms_per_user_batch1"] >= 0 and r["users_per_s_batch"] > 0 and r["verbalization_ppl"] > 0
    ablated = {r["system"]: r for r in result["ablations"]}
    assert sorted(ablated) == ["aligned: pause SFT", "not aligned: pause SFT"]
    for prefix in ("sft", "noalign"):   # the as-trained figure is the run's own test
        test = json.loads((tmp_path / "bench" / f"{prefix}_pause_seed0" / "metrics.json").read_text())["test"]
        row = ablated["aligned: pause SFT" if prefix == "sft" else "not aligned: pause SFT"]
        assert row["as trained"] == [test["ndcg@10"]] and len(row["hide"]) == len(row["shuffle"]) == 1
        for how in ("hide", "shuffle"):
            saved = json.loads((tmp_path / "bench" / f"{prefix}_pause_seed0" / f"ablate_{how}.json").read_text())
            assert row[how] == [saved["test"]["ndcg@10"]]
    again = paper.main([config, "--out", out, "--time-users", "8", "--probe-items", "20", *over])
    assert "reusing the finished run" in capsys.readouterr().out
    assert again["ablations"] == result["ablations"]
    assert [r["test"] for r in again["rows"][:2]] == [r["test"] for r in result["rows"][:2]]


def test_paper_pipeline_without_out_keeps_the_run_logs_in_its_folder(tmp_path, llama, monkeypatch):
    """Without --out the runs, and the logs of the runs trained side by side (--jobs), go to
    runs/pauserec_<config stem>, not to the working directory."""
    monkeypatch.chdir(tmp_path)
    seen = {}

    def stop(args, runs):
        seen["out"] = args.out
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "train_runs", stop)
    with pytest.raises(KeyboardInterrupt):
        paper.main([tiny_args(tmp_path)[0], *llama_args(tmp_path, llama)[1:]])
    assert seen["out"] == "runs/pauserec_demo"


def test_paper_arms_and_cot_seeds_choose_the_runs():
    """--arms aligned --cot-seeds 0: the stages and the aligned plain and pause SFTs (and the scratch rows), no
    run from the backbone as loaded, no CoT; an unknown arm is a one-line error."""
    runs = paper.pipeline_runs("c.yaml", [], Path("o"), seeds=2, cot_seeds=0, arms=paper.parse_arms("aligned"))
    assert [slug for _, slug, _, _ in runs] == ["align", "pause_pretrain", "sft_plain_seed0", "sft_plain_seed1",
                                                "sft_pause_seed0", "sft_pause_seed1", "scratch_seed0", "scratch_seed1"]
    only = paper.pipeline_runs("c.yaml", [], Path("o"), 1, 1, paper.parse_arms("not_aligned"))
    assert [slug for _, slug, _, _ in only] == ["noalign_plain_seed0", "noalign_pause_seed0", "noalign_cot_seed0",
                                                "scratch_seed0"]
    with pytest.raises(ValueError, match="--arms"):
        paper.parse_arms("aligned,both")


def test_a_finished_stage_is_compared_on_what_it_trains():
    """The alignment is reused whatever the SFTs' schedule or pause pre-training says, but not when its own
    settings changed (its frozen epochs, the backbone's lr ratio); the pause pre-training likewise."""
    align, pause = paper.stage_ignored("align"), paper.stage_ignored("pause_pretrain")
    for key in ("train.epochs", "train.lr", "train.pause_epochs", "train.pause_lr", "model.num_pauses"):
        assert key in align, key
    for key in ("train.align_epochs", "train.align_frozen_epochs", "train.align_lr"):
        assert key not in align and key in pause, key
    assert "train.backbone_lr_ratio" not in align
    for key in ("train.pause_epochs", "train.pause_lr", "train.pause_rate", "train.pause_trains",
                "train.backbone_lr_ratio"):
        assert key not in pause, key


def test_the_alignment_checks_baseline_is_another_items_description():
    """written_matches: a model that writes every item's own first tokens scores 1 on its own and 0 against
    another item's (all descriptions differ); one that writes the same tokens for every item scores alike on both."""
    firsts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 4]]
    assert paper.written_matches(firsts, firsts) == (1.0, 0.0)
    assert paper.written_matches([[4, 5, 6]] * 4, firsts) == (0.25, 0.25)
    assert paper.written_matches(firsts[1:] + firsts[:1], firsts) == (0.0, 1.0)
