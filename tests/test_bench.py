from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_beam_small():
    out = bench.main(["beam", "--items", "300,3000", "--users", "8", "--beam", "10", "--threads", "1"])
    assert [r["items"] for r in out["rows"]] == [300, 3000]
    for row in out["rows"]:
        assert row["users_per_s"] > 0 and 0 < row["transformer_share"] <= 1 and row["trie_build_s"] >= 0


def test_bench_reasoning_quick(tmp_path):
    table = bench.main(["reasoning", str(ROOT / "configs" / "demo.yaml"), "--quick", "--out", str(tmp_path / "b"),
                        f"train.sid_cache={tmp_path / 'sids'}", "train.threads=1", "train.epochs=1",
                        "data.num_users=200", "eval.batch_size=64"])
    assert [r["mode"] for r in table] == [name for name, _ in bench.MODES]
    for row in table:
        for split in ("valid", "test"):
            for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
                assert 0 <= row[split][key] <= 1
            assert row[split]["ndcg@10"] <= row[split]["recall@10"]
        assert row["train_seconds"] > 0 and row["train_tokens"] > 0
        assert row["users_per_s_batch1"] > 0 and row["users_per_s_batch256"] > 0
    # more pauses -> more tokens trained on the same examples
    tokens = {r["mode"]: r["train_tokens"] for r in table}
    assert tokens["none"] < tokens["pause M=1"] < tokens["pause M=8"]
    assert (tmp_path / "b" / "reasoning.json").is_file()
