"""The training schedule: lr_at's endpoints, batches' epoch cover (token-budgeted too), early stopping, and what a
resume may change."""
import json
import math
import random
import shutil

import pytest
import torch
from test_reliability import train_args

import batching
import pauserec
import train


def test_lr_at_warmup_peak_and_cosine_end():
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    total = 110
    assert train.lr_at(0, total, cfg) == pytest.approx(1e-4)          # warmup from lr / warmup_steps
    assert train.lr_at(9, total, cfg) == pytest.approx(1e-3)          # the peak at warmup's last step
    assert train.lr_at(10, total, cfg) == pytest.approx(1e-3)         # the cosine starts at the peak
    assert train.lr_at(60, total, cfg) == pytest.approx((1e-3 + 1e-5) / 2)   # halfway: the mean
    assert train.lr_at(total, total, cfg) == pytest.approx(1e-5)      # the end: min_lr
    lrs = [train.lr_at(s, total, cfg) for s in range(total + 1)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.lr_at(0, total, train.TrainConfig(lr=1e-3, warmup_steps=0)) == pytest.approx(1e-3)   # no warmup


def test_warmup_takes_at_most_its_share_of_a_short_phase():
    """Token-budgeted batches make few steps: warmup_steps counts steps (Adam's moments settle per update), at most
    train.max_warmup_share of a phase, so that a short phase (the refit, a stage) is not all warmup; a long one keeps
    warmup_steps as set."""
    cfg = train.TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=50, max_warmup_share=0.25)
    assert train.lr_at(48, 1000, cfg) < train.lr_at(49, 1000, cfg) == pytest.approx(1e-3)   # 50 of 1,000 steps
    lrs = [train.lr_at(s, 40, cfg) for s in range(41)]                                     # 10 of 40 steps
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[40] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.lr_at(0, 3, cfg) == pytest.approx(1e-3)   # ceil(0.75): one warmup step
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"train.max_warmup_share must be in \(0, 1\], got {share}"):
            train.check_train_config(train.TrainConfig(max_warmup_share=share), pauserec.ModelConfig())


@pytest.mark.parametrize("n,batch_size", [(5000, 32), (100, 7), (3, 8), (64 * 8, 8)])
def test_batches_cover_each_example_once_per_epoch(n, batch_size):
    r = random.Random(n)
    examples = [([0] * r.randint(2, 60), None) for _ in range(n)]
    epochs = [batching.batches(examples, batch_size, torch.Generator().manual_seed(e)) for e in range(2)]
    for order in epochs:
        assert sorted(i for rows in order for i in rows) == list(range(n))   # each example once
        assert all(0 < len(rows) <= batch_size for rows in order)
        assert len(order) == math.ceil(n / batch_size)   # train.py's steps_per_epoch: the resume arithmetic
    assert n <= batch_size or epochs[0] != epochs[1]       # another epoch, another order (one batch: sorted)
    assert epochs[0] == batching.batches(examples, batch_size, torch.Generator().manual_seed(0))   # replayable


def ranking(metrics):
    """The ranking metrics of a metrics dict (not its timing)."""
    return {k: v for k, v in metrics.items() if "@" in k}


def test_early_stopping_and_the_resume_of_a_stopped_run(tmp_path, capsys):
    """lr ~ 0: validation never improves after the first, so patience=1 stops at the second validation; a resume
    of the stopped run trains no further and evaluates it again."""
    args = train_args(tmp_path, "train.epochs=3", "eval.every=2", "train.patience=1", "train.lr=1e-9",
                      "train.min_lr=0", "eval.valid_users=50")
    first = train.main(args)
    run = tmp_path / "runs" / "demo"
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log if "valid" in r] == [2, 4] and first["steps"] == 4
    assert first["steps"] < 3 * first["steps_per_epoch"] and first["best_step"] == 2
    assert "early stop: 1 validations without improvement" in capsys.readouterr().out
    again = train.main(args + ["train.resume=true"])
    assert "the run stopped early at step 4" in capsys.readouterr().out
    assert again["steps"] == 4 and ranking(again["test"]) == ranking(first["test"])
    assert ranking(again["valid"]) == ranking(first["valid"])
    assert [json.loads(line) for line in open(run / "log.jsonl")] == log   # nothing trained, nothing logged


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    train.main(train_args(folder, "train.epochs=1", "eval.valid_users=50"))
    return folder


@pytest.mark.parametrize("change", ["train.epochs=2", "train.batch_size=16", "train.lr=1e-3", "train.seed=1",
                                    "train.patience=3", "train.refit_epochs=1", "eval.select=recall@10",
                                    "eval.ks=[10, 20]", "eval.every=5"])
def test_resume_refuses_a_changed_schedule_seed_or_metric(tmp_path, finished, change):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "runs" / "demo" / "config.yaml").read_text()
    key, value = change.split("=", 1)
    with pytest.raises(ValueError, match=rf"last.pt comes from another config \({key}: .* -> ") as error:
        train.main(train_args(tmp_path, "train.epochs=1", "eval.valid_users=50", change, "train.resume=true"))
    assert "\n" not in str(error.value)
    assert (tmp_path / "runs" / "demo" / "config.yaml").read_text() == before


def test_resume_may_change_where_it_runs_and_how_often_it_logs(tmp_path, finished):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    want = json.loads((tmp_path / "runs" / "demo" / "metrics.json").read_text())
    got = train.main(train_args(tmp_path, "train.epochs=1", "eval.valid_users=50", "train.resume=true",
                                "train.threads=2", "train.log_every=7", "eval.batch_size=33"))
    assert ranking(got["test"]) == ranking(want["test"]) and got["steps"] == want["steps"]


# ----------------------------------------------------------------------------------------------- token-budgeted batches


@pytest.mark.parametrize("n,budget", [(3000, 600), (100, 60), (3, 500), (50, 61)])
def test_token_batches_keep_the_budget_cover_each_example_once_and_keep_their_count(n, budget):
    """train.batch_tokens: every batch's padded size (rows x longest row) within the budget, each example once per
    epoch, the order a function of the generator's seed (a resume replays it), and as many batches in every epoch
    (Phase.steps_per_epoch counts one epoch's)."""
    r = random.Random(n)
    examples = [([0] * r.randint(2, 60), None) for _ in range(n)]
    epochs = [batching.batches(examples, 32, torch.Generator().manual_seed(e), budget) for e in range(3)]
    for order in epochs:
        assert sorted(i for rows in order for i in rows) == list(range(n))   # each example once
        assert all(rows and len(rows) * max(len(examples[i][0]) for i in rows) <= budget for rows in order)
    assert len({len(order) for order in epochs}) == 1
    assert len(epochs[0]) == 1 or epochs[0] != epochs[1]   # another epoch, another order (one batch: sorted)
    assert epochs[0] == batching.batches(examples, 32, torch.Generator().manual_seed(0), budget)   # replayable
    with pytest.raises(ValueError, match=r"train.batch_tokens=59 is below a training example's 60 tokens"):
        batching.batches([([0] * 60, None)], 32, torch.Generator(), 59)


def test_token_batches_schedule_and_resume(tmp_path, monkeypatch):
    """A run with train.batch_tokens takes as many steps per epoch as its batches, and a run killed mid-epoch and
    resumed ends as the uninterrupted one."""
    from test_train import killed_at_first_checkpoint
    args = ["train.epochs=2", "eval.every=3", "eval.valid_users=50", "train.batch_tokens=400"]
    whole = train.main(train_args(tmp_path / "whole", *args))
    run = train.setup(train_args(tmp_path / "count", *args))
    train.prepare(run)
    assert whole["steps_per_epoch"] == len(batching.batches(run.examples, 32, torch.Generator(), 400)) != \
        math.ceil(len(run.examples) / 32) and whole["steps"] == 2 * whole["steps_per_epoch"]
    killed_at_first_checkpoint(monkeypatch, train_args(tmp_path / "killed", *args))
    resumed = train.main(train_args(tmp_path / "killed", *args, "train.resume=true"))
    assert ranking(resumed["test"]) == ranking(whole["test"]) and resumed["steps"] == whole["steps"]


def test_a_batch_trains_what_its_examples_train_alone():
    """What a token-budgeted batch trains: model.loss is the mean over the batch's supervised tokens, so a batch's
    loss and gradients are its examples' alone, each weighted by its supervised tokens; right padding (the causal
    mask keeps a row's real tokens from the pads after them) never changes a row's loss."""
    torch.manual_seed(0)
    cfg = pauserec.ModelConfig(n_layer=2, n_head=2, d_model=16, reasoning="pause", num_pauses=2, dropout=0.0,
                               pause_layout="every_item")
    tok = pauserec.Tokens([4, 4], codes=torch.tensor([[i // 4, i % 4] for i in range(16)]))
    model = pauserec.GPT(cfg, tok.size)
    g = torch.Generator().manual_seed(0)
    examples = [pauserec.build_sequence_example(tok, cfg, torch.randint(0, 16, (n,), generator=g).tolist())
                for n in (2, 5, 3, 8)]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model.loss(*batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    whole, whole_grads = loss_and_grads(pauserec.collate(examples))
    weights = [sum(m[1:]) for _, m in examples]   # supervised tokens (loss_mask[1:])
    alone = [loss_and_grads(pauserec.collate([ex])) for ex in examples]
    assert whole.item() == pytest.approx(sum(w * a[0].item() for w, a in zip(weights, alone)) / sum(weights), rel=1e-5)
    for i, p in enumerate(whole_grads):
        torch.testing.assert_close(p, sum(w * a[1][i] for w, a in zip(weights, alone)) / sum(weights))
    ids, mask = pauserec.collate(examples)
    padded = [loss_and_grads((ids[r:r + 1], mask[r:r + 1])) for r in range(len(examples))]   # row r, padded
    for (loss, grads), (loss_alone, grads_alone) in zip(padded, alone):
        torch.testing.assert_close(loss, loss_alone)
        for p, q in zip(grads, grads_alone):
            torch.testing.assert_close(p, q)
