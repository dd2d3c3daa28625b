"""The fine-tuning recipe for pretrained backbones (issue 28): AdamW groups and their learning rates, frozen text rows,
the frozen first epochs and their resume, the SID rows' text initialisation, and a tiny Llama on which the recipe
learns what one learning rate for everything does not. The Llama folder is written by hand (no `transformers`)."""

import json
import shutil

import pytest
import torch
from test_gpt2 import write_tokenizer
from test_mapping import write_llama
from test_train import host_reads_in_quiet_steps, killed_at_first_checkpoint, tiny_args

import backbones as bb
import bpe
import pauserec as pr
import train
from model import ModelConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random tied 2-block Llama over the test tokenizer's vocabulary (vocab.json + merges.txt)."""
    folder = tmp_path_factory.mktemp("llama")
    write_llama(folder, "LlamaForCausalLM", V=write_tokenizer(folder), C=32, tie=True, max_positions=128)
    return str(folder)


def recipe_args(tmp_path, folder, *extra):
    return tiny_args(tmp_path, "model.backbone=hf", f"model.hf_dir={folder}", "model.max_len=96", "model.head=new",
                     "model.reasoning=none", "model.pause_layout=last", "train.log_every=1", *extra)


def tiny_model(folder, **kw):
    """8 items: level 0 the colour word of the title (4 codes, 2 items each), level 1 the product (polish: a nail
    product, gloss: a lip one)."""
    cfg = ModelConfig(backbone="hf", hf_dir=folder, max_len=96, head="new", **kw)
    colours, products = ("red", "top", "coat", "mask"), (("polish", "nail"), ("gloss", "lip"))
    codes = torch.tensor([[c, p] for c in range(4) for p in range(2)])
    meta = [{"title": f"{colours[c]} {products[p][0]}", "category": products[p][1]} for c, p in codes.tolist()]
    tok = bb.make_tokens(cfg, codes, (), meta)
    return tok, bb.make_model(cfg, tok)


# ----------------------------------------------------------------------------------------------- AdamW groups


@pytest.mark.parametrize("kw,backbone", [({}, "blocks"), ({"train_text_rows": True}, "blocks and text rows"),
                                         ({"train_only_new_tokens": True}, "nothing")])
def test_each_trained_parameter_is_in_exactly_one_group(llama, kw, backbone):
    _, model = tiny_model(llama, **kw)
    groups = train.param_groups(model, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))                                            # no parameter twice
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}    # every trained one
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)] for g in groups if not g["backbone"] for p in g["params"]}
    theirs = {names[id(p)] for g in groups if g["backbone"] for p in g["params"]}
    assert ours == {"new_rows"}
    blocks = {n for n in names.values() if n.startswith("transformer.h.") or n == "transformer.ln_f.weight"}
    want = {"blocks": blocks, "blocks and text rows": blocks | {"transformer.wte.weight"}, "nothing": set()}
    assert theirs == want[backbone]
    for g in groups:   # decay on matrices only
        assert g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)


def test_phase_learning_rates_our_rows_and_the_backbone(tmp_path, llama):
    """Our rows follow the phase's schedule; the backbone is at 0 through the frozen epochs, then starts its own
    warmup and cosine at backbone_lr_ratio x the peak, read back from every step's log record."""
    train.main(recipe_args(tmp_path, llama, "train.epochs=3", "train.frozen_epochs=1", "train.backbone_lr_ratio=0.1",
                           "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr=1e-4"))
    records = [json.loads(line) for line in (tmp_path / "runs" / "demo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    spe = json.loads((tmp_path / "runs" / "demo" / "metrics.json").read_text())["steps_per_epoch"]
    total = 3 * spe
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    ours = train.replace(train.TrainConfig(), lr=1e-2, min_lr=1e-4, warmup_steps=2)
    theirs = train.replace(ours, lr=1e-3, min_lr=1e-5)
    for r in steps:
        i = r["step"] - 1
        assert r["lr"] == pytest.approx(train.lr_at(i, total, ours))
        want = 0.0 if i < spe else train.lr_at(i - spe, total - spe, theirs)
        assert r["backbone_lr"] == pytest.approx(want)
    assert steps[spe]["backbone_lr"] == pytest.approx(1e-3 / 2)        # its warmup starts at the switch


# ----------------------------------------------------------------------------------------------- frozen weights


def pretrained_state(folder):
    return tiny_model(folder)[1].state_dict()


def test_frozen_epochs_keep_the_backbone_and_the_text_rows_bit_identical(tmp_path, llama):
    """After its frozen epoch only our rows moved; one epoch later the blocks moved too, the text rows never."""
    start = pretrained_state(llama)
    for epochs in (1, 2):
        train.main(recipe_args(tmp_path, llama, f"train.epochs={epochs}", "train.frozen_epochs=1",
                               f"train.name=e{epochs}", "train.backbone_lr_ratio=0.1"))
        last = torch.load(tmp_path / "runs" / f"e{epochs}" / "last.pt", weights_only=False)
        state = last["model"]
        changed = {k for k in start if not torch.equal(start[k], state[k])}
        if epochs == 1:
            assert changed == {"new_rows"}
            # no gradient was computed for the frozen backbone: AdamW holds state for our rows only (group 0)
            assert list(last["optimizer"]["state"]) == last["optimizer"]["param_groups"][0]["params"]
        else:
            assert "new_rows" in changed and "transformer.h.0.attn.c_attn.weight" in changed
            assert "transformer.wte.weight" not in changed and "lm_head.weight" not in changed
    with pytest.raises(ValueError, match="train.frozen_epochs=1 needs a pretrained model.backbone"):
        train.main(tiny_args(tmp_path, "train.frozen_epochs=1"))


def test_the_switch_survives_a_resume(tmp_path, llama, monkeypatch):
    """A run killed at its first validation (end of the frozen epoch) and resumed ends with the weights of the
    uninterrupted run: the backbone joins at the same step, with the same schedule."""
    args = recipe_args(tmp_path, llama, "train.epochs=2", "train.frozen_epochs=1", "train.backbone_lr_ratio=0.1")
    train.main(args + ["train.name=full"])
    killed_at_first_checkpoint(monkeypatch, args + ["train.name=cut"])
    cut = tmp_path / "runs" / "cut"
    spe = json.loads((tmp_path / "runs" / "full" / "metrics.json").read_text())["steps_per_epoch"]
    assert torch.load(cut / "last.pt", weights_only=False)["step"] == spe
    train.main(args + ["train.name=cut", "train.resume=true"])
    want = torch.load(tmp_path / "runs" / "full" / "last.pt", weights_only=False)["model"]
    got = torch.load(cut / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_alignment_stage_keeps_the_text_rows_bit_identical(tmp_path, llama):
    """The alignment texts read the text rows (SFT prompts of SIDs never do, so only a stage can show it): with
    model.train_text_rows false they end bit-identical and AdamW holds no state of their shape, while the blocks
    and our rows moved."""
    start = pretrained_state(llama)
    train.main(recipe_args(tmp_path, llama, "train.task=align", "train.align_epochs=1", "train.align_lr=1e-2",
                           "train.backbone_lr_ratio=0.1"))
    last = torch.load(tmp_path / "runs" / "demo" / "last.pt", weights_only=False)
    state, text_rows = last["model"], start["transformer.wte.weight"]
    assert torch.equal(state["transformer.wte.weight"], text_rows)
    assert torch.equal(state["lm_head.weight"], start["lm_head.weight"])
    assert not torch.equal(state["new_rows"], start["new_rows"])
    assert not torch.equal(state["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"])
    shapes = [s["exp_avg"].shape for s in last["optimizer"]["state"].values()]
    assert shapes and text_rows.shape not in shapes


def test_the_backbone_trains_from_the_first_step_its_lr_is_above_zero(tmp_path, llama, monkeypatch):
    """train.frozen_epochs: every logged step with backbone lr 0 leaves the blocks as they were, and the first step
    whose logged backbone lr is above 0 changes them (the switch is not one step late)."""
    moved, step = {}, train.train_step

    def watched(run, phase, rows, epoch):   # did this step change the first block?
        before = run.model.transformer.h[0].attn.c_attn.weight.detach().clone()
        step(run, phase, rows, epoch)
        moved[run.step] = not torch.equal(before, run.model.transformer.h[0].attn.c_attn.weight)
    monkeypatch.setattr(train, "train_step", watched)
    train.main(recipe_args(tmp_path, llama, "train.epochs=2", "train.frozen_epochs=1", "train.backbone_lr_ratio=0.1",
                           "train.warmup_steps=2"))
    records = [json.loads(line) for line in (tmp_path / "runs" / "demo" / "log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["backbone_lr"] for r in records if "loss" in r}
    first = min(s for s, lr in lrs.items() if lr > 0)
    assert moved[first], f"step {first} has backbone lr {lrs[first]} but left the blocks unchanged"
    assert not any(moved[s] for s, lr in lrs.items() if lr == 0)


# ----------------------------------------------------------------------------------------------- SID rows from text


def test_sid_keywords_by_hand():
    """Level-0 code 0 (items 0, 1) has tokens 1 and 2 twice each (tf-idf 2 log 2), 3 and 4 once (log 2), and 9,
    which every item has (idf 0); level-1 code 1 (items 1, 3) has 4 twice."""
    tok = pr.Tokens.from_codes(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]), base=10)
    tok.item_text = [[1, 2, 3, 9], [1, 2, 4, 9], [5, 6, 3, 9], [5, 6, 4, 9]]
    keywords = bb.sid_keywords(tok, tok.item_text, n_words=2)
    assert sorted(keywords[tok.sid([0, 0])[0]]) == [1, 2]
    assert sorted(keywords[tok.sid([1, 0])[0]]) == [5, 6]
    assert keywords[tok.sid([0, 1])[1]][0] == 4 and keywords[tok.sid([0, 0])[1]][0] == 3
    assert sorted(bb.sid_keywords(tok, tok.item_text, n_words=9)[tok.sid([0, 0])[0]]) == [1, 2, 3, 4, 9]


def test_sid_rows_start_at_their_keywords_rows(llama):
    """sid_init=text on the tiny tokenizer: the level-0 code of the two 'red ..' items starts at the mean row of
    ' red''s tokens (in 2 of 8 texts, twice in the code's: tf-idf 2 log 4, above the product and category words'
    log 2 and log 2), every other row of ours at the mean row."""
    text = bpe.load_tokenizer(llama)
    red = text.encode(" red")
    tok, model = tiny_model(llama, sid_init="text", sid_init_words=len(red))
    rows, w = model.input_rows().detach(), model.transformer.wte.weight.detach()
    assert torch.allclose(rows[tok.sid([0, 0])[0]], w[red].mean(0))
    assert torch.allclose(rows[tok.PAUSE], w.mean(0))
    _, plain = tiny_model(llama)
    assert torch.allclose(plain.input_rows()[tok.sid([0, 0])[0]], w.mean(0))


def test_pause_and_bos_rows_start_apart_from_the_mean_when_asked(llama, tmp_path):
    """pause_init=text: the <pause> row starts at the mean row of bb.PAUSE_WORD's text tokens; bos_init=backbone: our
    BOS row is the backbone's own (config.json's bos_token_id). By default both sit at the mean row, with the others."""
    folder = tmp_path / "llama_bos"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, bos_token_id=1)))
    wait = bpe.load_tokenizer(llama).encode(bb.PAUSE_WORD)
    tok, model = tiny_model(str(folder), pause_init="text", bos_init="backbone")
    rows, w = model.input_rows().detach(), model.transformer.wte.weight.detach()
    assert torch.allclose(rows[tok.PAUSE], w[wait].mean(0)) and not torch.allclose(rows[tok.PAUSE], w.mean(0))
    assert torch.equal(rows[tok.BOS], w[1])
    assert torch.allclose(rows[tok.EOS], w.mean(0))
    _, plain = tiny_model(str(folder))
    assert torch.allclose(plain.input_rows()[tok.PAUSE], w.mean(0))
    assert torch.allclose(plain.input_rows()[tok.BOS], w.mean(0))
    with pytest.raises(ValueError, match="bos_token_id"):
        tiny_model(llama, bos_init="backbone")                      # its config.json names no BOS
    with pytest.raises(ValueError, match=r"model.pause_init must be mean \| text"):
        ModelConfig(pause_init="word")


# ----------------------------------------------------------------------------------------------- the recipe learns


def test_the_recipe_learns_what_one_learning_rate_does_not(tmp_path, llama):
    """Same data, steps and pretrained weights: one lr for everything (our rows at the mean row) against the recipe
    (our rows at 10x the backbone's lr, SID rows from the item texts). The margin was measured once and is asserted
    at half (docs/RESULTS.md)."""
    same = ["train.epochs=6", "train.warmup_steps=5", "data.num_users=300"]
    one = train.main(recipe_args(tmp_path, llama, *same, "train.name=one", "train.lr=3e-4"))
    recipe = train.main(recipe_args(tmp_path, llama, *same, "train.name=recipe", "train.lr=3e-3",
                                    "train.backbone_lr_ratio=0.1", "model.sid_init=text"))
    margin = recipe["test"]["ndcg@10"] - one["test"]["ndcg@10"]
    assert margin >= MARGIN / 2, (recipe["test"]["ndcg@10"], one["test"]["ndcg@10"])


MARGIN = 0.058   # test N@10 of the recipe minus one lr, measured once (.1247 - .0668)


def test_a_checkpoint_with_all_rows_in_one_table_loads_split(llama):
    """Runs from before our rows lived apart saved wte (and the tied lm_head) as one [V, d] table: it loads into
    the text rows and new_rows."""
    tok, model = tiny_model(llama, sid_init="text")
    state = model.state_dict()
    rows = model.input_rows().detach().clone()                     # [V, d]
    old = {k: v for k, v in state.items() if k != "new_rows"}
    old["transformer.wte.weight"] = old["lm_head.weight"] = rows
    _, fresh = tiny_model(llama)                                    # our rows at the mean: they must be replaced
    fresh.load_state_dict(old)
    assert torch.equal(fresh.input_rows(), rows) and torch.equal(fresh.new_rows, model.new_rows)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_a_recipe_step_that_does_not_log_reads_nothing_back(tmp_path, llama, monkeypatch):
    """The pretrained path (our rows and the text rows apart, the backbone frozen for an epoch, then joining; bf16
    autocast): a training step that does not log reads no tensor's value back (test_train's HostReads)."""
    reads = host_reads_in_quiet_steps(monkeypatch, recipe_args(
        tmp_path, llama, "train.epochs=2", "train.frozen_epochs=1", "train.backbone_lr_ratio=0.1", "train.log_every=4",
        "train.amp=true", "eval.valid_users=20"))
    assert reads.pop("quiet steps") >= 5 and not reads, reads
