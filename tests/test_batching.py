"""Tests of batching.py: a batch's padding to train.pad_to (the loss unchanged), the token budget with it, the copy to
the device, and a run that trains on padded batches. The batches' epoch cover and replay: test_schedule.py."""
import random

import pytest
import torch
from test_model import histories
from test_pauserec import setup
from test_train import tiny_args

import batching
import pauserec as pr
import train


def test_padded_length_and_collate():
    assert [batching.padded_length(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert batching.padded_length(13, 0) == 13
    ids, mask = batching.collate([([1, 5, 6], [False, True, True]), ([1, 7], [False, True])], pad=0, pad_to=8)
    assert ids.tolist() == [[1, 5, 6] + [0] * 5, [1, 7] + [0] * 6]
    assert mask.tolist() == [[False, True, True] + [False] * 5, [False, True] + [False] * 6]


CASES = {"none_every_item": dict(reasoning="none", layout="every_item"), "pause_target": dict(layout="target"),
         "pause_every_item_draft": dict(layout="every_item", M=3, step_loss="draft"),
         "latent_target": dict(reasoning="latent", latent_steps=2, layout="target")}


@pytest.mark.parametrize("case", list(CASES))
def test_padding_to_a_length_changes_no_loss_or_gradient(case):
    """Right padding past the longest example (train.pad_to) is masked from the loss and, causal, from every real
    token's attention: the batch's loss and gradients are the unpadded batch's to float rounding (dropout 0)."""
    cfg, tok, model, _, codes = setup(3, **CASES[case])
    one_example = pr.build_sequence_example if cfg.pause_layout == "every_item" else \
        lambda tok, cfg, items: pr.build_example(tok, cfg, items[:-1], items[-1])
    examples = [one_example(tok, cfg, h) for h in histories(3, len(codes), (2, 5, 4))]

    def loss_and_grads(pad_to):
        ids, mask = batching.collate(examples, tok.PAD, pad_to)
        model.zero_grad()
        loss = pr.training_loss(model, ids, mask)
        loss.backward()
        return ids.shape[1], loss.detach(), [p.grad.clone() for p in model.parameters()]
    (t0, loss, grads), (t1, padded, padded_grads) = loss_and_grads(0), loss_and_grads(32)
    assert t0 < t1 == 32
    torch.testing.assert_close(padded, loss)
    for a, b in zip(padded_grads, grads):
        torch.testing.assert_close(a, b)


def test_token_budget_counts_the_padding():
    """With train.pad_to every batch's rows x padded length stays within batch_tokens, and its lengths are few."""
    r = random.Random(0)
    examples = [([0] * r.randint(2, 60), None) for _ in range(500)]
    order = batching.batches(examples, 32, torch.Generator().manual_seed(0), 600, pad_to=16)
    assert sorted(i for rows in order for i in rows) == list(range(500))
    lengths = [batching.padded_length(max(len(examples[i][0]) for i in rows), 16) for rows in order]
    assert all(len(rows) * t <= 600 for rows, t in zip(order, lengths)) and set(lengths) == {16, 32, 48, 64}
    with pytest.raises(ValueError, match=r"batch_tokens=50 is below a training example's 64 tokens \(padded to a "
                                         r"multiple of train.pad_to=16\)"):
        batching.batches(examples, 32, torch.Generator(), 50, pad_to=16)


def test_copies_to_cuda_are_pinned_and_non_blocking(monkeypatch):
    """CUDA: each tensor goes through pinned memory and a non-blocking copy; any other device: a plain copy, never
    pinned (pin_memory needs an accelerator). Recorded on tensors that stand in for a CUDA build."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False: calls.append((device, non_blocking))
                        or t)
    batch = (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    batching.to_device(batch, "cuda:1")
    assert calls == ["pin", ("cuda:1", True)] * 2
    calls.clear()
    batching.to_device(batch, "cpu")
    assert calls == [("cpu", False)] * 2


def test_a_run_with_pad_to_trains_batches_of_few_lengths(tmp_path, monkeypatch):
    """train.pad_to=16 with a token budget: every training batch is a multiple of 16 long and within the budget
    counting its padding; the run trains every example's real tokens, as one without padding does."""
    shapes, collate = [], batching.collate
    monkeypatch.setattr(batching, "collate", lambda *a: shapes.append(collate(*a)[0].shape) or collate(*a))
    args = ["train.epochs=1", "train.batch_tokens=400", "eval.valid_users=20"]
    padded = train.main(tiny_args(tmp_path, *args, "train.pad_to=16"))
    assert len(shapes) == padded["steps"] and all(t % 16 == 0 and n * t <= 400 for n, t in shapes)
    plain = train.main(tiny_args(tmp_path, *args, "train.name=plain"))
    assert padded["train_tokens"] == plain["train_tokens"] and padded["steps"] > plain["steps"]
    with pytest.raises(ValueError, match=r"train.pad_to \(48\) must divide model.max_len \(256\)"):
        train.main(tiny_args(tmp_path, "train.pad_to=48", "train.name=bad"))
