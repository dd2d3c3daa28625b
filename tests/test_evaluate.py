import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import evaluate


def test_rank_metrics_by_hand():
    ranked = torch.tensor([[3, 1, 2], [0, 5, 9], [7, 8, 6]])
    targets = torch.tensor([1, 9, 4])        # hit at rank 2, hit at rank 3, miss
    m = evaluate.rank_metrics(ranked, targets, ks=(1, 2, 3))
    assert m["recall@1"] == 0
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_rank_metrics_ignores_empty_slots():
    m = evaluate.rank_metrics(torch.tensor([[-1, -1], [2, -1]]), torch.tensor([5, 2]), ks=(2,))
    assert m["recall@2"] == 0.5 and m["ndcg@2"] == 0.5


# u0..u3; the last item is the test target, the second last the validation target.
SEQUENCES = [[0, 1, 2, 3], [0, 1, 3, 2], [4, 0, 1, 2], [5, 3, 6, 7]]


def test_baselines_on_hand_made_data():
    ranks = evaluate.baseline_rankings(SEQUENCES, "test", k=2)
    # Training part without test targets: popularity 0:3 1:3 3:2, the rest 1.
    assert ranks["mostpop"].tolist() == [[0, 1]] * 4
    # u0 ends on 2 and u3 on 6 (no transitions): most popular; u1 ends on 3 -> 6, then popular;
    # u2 ends on 1 -> {2, 3} once each, tie broken by popularity (3 is more popular).
    assert ranks["markov"].tolist() == [[0, 1], [6, 0], [3, 2], [0, 1]]
    m = evaluate.baseline_metrics(SEQUENCES, "test", ks=(1, 2))
    assert m["mostpop"]["recall@2"] == 0
    assert m["markov"]["recall@1"] == 0
    assert m["markov"]["recall@2"] == pytest.approx(0.25)
    assert m["markov"]["ndcg@2"] == pytest.approx(0.25 / math.log2(3))
    # Fitted without the validation transitions (0->1 x3, 4->0, 5->3 remain), no user's last test-history
    # item (2, 3, 1, 6) has a follower: all fall back to popularity, and u2's hit on 2 is lost.
    assert evaluate.baseline_rankings(SEQUENCES, "test", k=2, fit="valid")["markov"].tolist() == [[0, 1]] * 4
    assert m["markov_train_only"]["recall@2"] == 0


def test_baselines_valid_split_excludes_test_and_valid_targets():
    ranks = evaluate.baseline_rankings(SEQUENCES, "valid", k=2)
    # Validation training parts [0,1] [0,1] [4,0] [5,3]: 1 -> nothing seen, so u0/u1 get popularity;
    # u2 ends on 0 -> 1 (twice); u3 ends on 3 -> nothing.
    assert ranks["mostpop"].tolist() == [[0, 1]] * 4
    assert ranks["markov"].tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]
    m = evaluate.baseline_metrics(SEQUENCES, "valid", ks=(1,))
    assert m["markov"]["recall@1"] == pytest.approx(0.25)   # only u2 (target 1) is a hit


def test_eval_config_checks():
    with pytest.raises(ValueError, match="beam_size"):
        evaluate.check_eval_config(evaluate.EvalConfig(beam_size=5, ks=[5, 10]))
    with pytest.raises(ValueError, match="eval.ks"):
        evaluate.check_eval_config(evaluate.EvalConfig(ks=[]))
    with pytest.raises(ValueError, match=r"eval.select=ndcg@10 is not computed with eval.ks=\[5, 20\]"):
        evaluate.check_eval_config(evaluate.EvalConfig(ks=[5, 20]))
    evaluate.check_eval_config(evaluate.EvalConfig(ks=[5, 20], select="recall@20"))


def test_evaluation_precision_applies_on_cuda_only(monkeypatch):
    """eval.precision on CUDA: tf32 lets float32 matmuls run on TF32 during the evaluation (the setting restored
    after), bf16 is autocast; on a CPU, and with fp32, the evaluation stays float32 as before."""
    assert torch.get_float32_matmul_precision() == "highest"
    with evaluate.eval_precision("tf32", "cuda:0"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
    for name, device in (("tf32", "cpu"), ("bf16", "cpu"), ("fp32", "cuda")):
        with evaluate.eval_precision(name, device):
            assert torch.get_float32_matmul_precision() == "highest" and not torch.is_autocast_enabled("cpu")
    autocasts = []
    monkeypatch.setattr(torch, "autocast", lambda device, dtype: autocasts.append((device, dtype)) or nullcontext())
    with evaluate.eval_precision("bf16", "cuda"):
        pass
    assert autocasts == [("cuda", torch.bfloat16)]


def test_evaluate_model_searches_under_eval_precision(monkeypatch):
    """evaluate_model runs each beam-search batch under eval.precision on its device."""
    from test_pauserec import setup
    cfg, tok, model, trie, codes = setup(0)
    seen, precision = [], evaluate.eval_precision
    monkeypatch.setattr(evaluate, "eval_precision", lambda name, device: seen.append((name, device)) or
                        precision(name, device))
    users = [SimpleNamespace(history=[i, i + 1], target=i + 2) for i in range(5)]
    ecfg = evaluate.EvalConfig(precision="bf16", batch_size=2)
    metrics = evaluate.evaluate_model(model, tok, cfg, trie, users, ecfg, "cpu")
    assert seen == [("bf16", "cpu")] * 3 and metrics["users"] == 5
