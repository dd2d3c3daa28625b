import math

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
