from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_beam_small():
    out = bench.main(["beam", "--items", "300,3000", "--users", "8", "--beam", "10", "--threads", "1"])
    assert [r["items"] for r in out["rows"]] == [300, 3000]
    for row in out["rows"]:
        assert row["users_per_s"] > 0 and 0 < row["transformer_share"] <= 1 and row["trie_build_s"] >= 0


def test_bench_beam_peer_matches_generate():
    """--peer: the same weights in transformers' GPT2LMHeadModel, generate(num_beams, prefix_allowed_tokens_fn)
    on the same prompts gives the same top-10 items in the same order (up to score ties)."""
    transformers = pytest.importorskip("transformers")
    out = bench.main(["beam", "--items", "500", "--users", "4", "--beam", "10", "--threads", "1",
                      "--peer", "--peer-users", "4"])
    peer = out["peer"]
    assert (peer["items"], peer["users"], peer["beam"], peer["topk"]) == (500, 4, 10, 10)
    assert peer["threads"] == 1 and peer["transformers"] == transformers.__version__
    assert [r["batch"] for r in peer["rows"]] == [1, 4]
    for row in peer["rows"]:
        assert row["ours_users_per_s"] > 0 and row["generate_users_per_s"] > 0 and row["ours_speedup"] > 0
        assert 0 <= row["top10_identical"] <= row["top10_same_up_to_ties"] == 1.0
        assert row["max_abs_score_diff"] < 1e-3


def test_bench_beam_peer_needs_peer_users_within_users():
    with pytest.raises(ValueError, match="--peer-users"):
        bench.main(["beam", "--items", "300", "--users", "2", "--peer", "--peer-users", "3"])


def test_bench_reasoning_quick(tmp_path):
    """Trains the modes two at a time as separate processes (--jobs 2), then times them one by one."""
    overrides = [f"train.sid_cache={tmp_path / 'sids'}", "train.threads=1", "train.epochs=1", "data.num_users=200",
                 "eval.batch_size=64"]
    config = str(ROOT / "configs" / "demo.yaml")
    table = bench.main(["reasoning", config, "--quick", "--jobs", "2", "--out", str(tmp_path / "b"), *overrides])
    assert [r["mode"] for r in table] == [name for name, _ in bench.MODES]
    for row in table:
        for split in ("valid", "test"):
            for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
                assert 0 <= row[split][key] <= 1
            assert row[split]["ndcg@10"] <= row[split]["recall@10"]
        assert row["train_seconds"] > 0 and row["train_tokens"] > 0
        assert row["users_per_s_batch1"] > 0 and row["users_per_s_batch256"] > 0
        assert row["train_tokens_per_s"] > 0 and row["epochs"] == 1
    # more pauses -> more tokens trained on the same examples
    tokens = {r["mode"]: r["train_tokens"] for r in table}
    assert tokens["none"] < tokens["pause M=1"] < tokens["pause M=8"]
    assert (tmp_path / "b" / "reasoning.json").is_file()
    # a finished mode is reused by a later bench of the same settings, and refused for other settings
    name, slug, run_args = bench.mode_runs(config, bench.QUICK + overrides, tmp_path / "b")[2]
    assert bench.finished(tmp_path / "b" / slug, run_args)
    assert bench.finished(tmp_path / "b" / slug, run_args + ["train.threads=2", "data.dir=elsewhere"])
    with pytest.raises(ValueError, match="model.num_pauses"):
        bench.finished(tmp_path / "b" / slug, run_args + ["model.num_pauses=3"])
