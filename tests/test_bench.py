import json
from pathlib import Path

import pytest
import torch
import yaml

import bench
import mfu
import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_bench_beam_small():
    out = bench.main(["beam", "--items", "300,3000", "--users", "8", "--beam", "10", "--threads", "1"])
    assert [r["items"] for r in out["rows"]] == [300, 3000]
    for row in out["rows"]:
        assert row["users_per_s"] > 0 and 0 < row["transformer_share"] <= 1 and row["trie_build_s"] >= 0
        assert row["users_per_s"] * row["ms_per_user"] == pytest.approx(1000, rel=0.01)   # one timing, two units
        assert row["sid_levels"] == bench.random_catalogue(row["items"]).shape[1]
    first = out["rows"][0]["ms_per_user"]
    assert out["ms_per_user_ratio_vs_first"] == [round(r["ms_per_user"] / first, 2) for r in out["rows"]]


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
        assert row["train_tokens"] > 0
        assert row["users_per_s_batch1"] > 0 and row["users_per_s_batch256"] > 0
        assert row["train_tokens_per_s"] > 0 and row["epochs"] == 1
    # each row shows its own mode's run: trained with the mode's settings, its metrics as saved
    for (name, settings), row in zip(bench.MODES, table):
        run = tmp_path / "b" / bench.mode_runs(config, [], "o", modes=name)[0][1]
        saved = yaml.safe_load((run / "config.yaml").read_text())
        for setting in settings:
            key, value = setting.split("=", 1)
            section, key = key.split(".")
            assert str(saved[section][key]) == value, (name, setting)
        # the figures shown are the run's own (its train seconds whatever they are: no assert reads a clock)
        metrics = json.loads((run / "metrics.json").read_text())
        shown = {k: row[k] for k in ("test", "train_tokens", "train_seconds")}
        assert shown == {k: metrics[k] for k in shown}, name
    # more pauses -> more tokens trained on the same examples
    tokens = {r["mode"]: r["train_tokens"] for r in table}
    assert tokens["none"] < tokens["pause M=1"] < tokens["pause M=8"]
    assert (tmp_path / "b" / "reasoning.json").is_file()
    # a finished mode is reused by a later bench of the same settings, and refused for other settings
    name, slug, run_args = bench.mode_runs(config, bench.QUICK + overrides, tmp_path / "b")[2]
    assert sweep.finished(tmp_path / "b" / slug, run_args)
    assert sweep.finished(tmp_path / "b" / slug, run_args + ["train.threads=2", "data.dir=elsewhere"])
    with pytest.raises(ValueError, match="model.num_pauses"):
        sweep.finished(tmp_path / "b" / slug, run_args + ["model.num_pauses=3"])


def test_bench_seeds_mean_std(tmp_path, capsys):
    """Two seeds of a tiny run: a table of mean and std per metric, one JSON object last; a rerun reuses them."""
    overrides = ["data.num_users=300", "data.num_items=60", "sid.codebook_size=8", "sid.embed_dim=32",
                 "sid.hidden=[64]", "sid.latent_dim=8", "sid.epochs=5", "sid.batch_size=60", "model.n_layer=1",
                 "model.d_model=16", "model.n_head=2", "train.epochs=1", "train.warmup_steps=2", "train.patience=0",
                 "train.refit_epochs=0", "train.threads=1", "eval.every=0", "eval.batch_size=128",
                 f"train.sid_cache={tmp_path / 'sids'}"]
    args = ["seeds", str(ROOT / "configs" / "demo.yaml"), "--seeds", "2", "--out", str(tmp_path / "s"), *overrides]
    out = bench.main(args)
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == out
    assert any(line.startswith("| test ndcg@10 |") for line in printed)
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    for split in ("valid", "test"):
        for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
            values = [r[split][key] for r in out["runs"]]
            assert out["summary"][split][key]["mean"] == pytest.approx(sum(values) / 2, abs=1e-6)
            assert out["summary"][split][key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-6)
    # train seconds: the summary is that of the runs' own metrics.json, whatever the clock gave (a tiny run's
    # rounds to 0.0 on a fast machine, so no assert reads it); that they trained is train_tokens' to say
    saved = [json.loads((tmp_path / "s" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    spent = [m["train_seconds"] for m in saved]
    per_run, summary = [r["train_seconds"] for r in out["runs"]], out["summary"]["train_seconds"]
    assert all(m["train_tokens"] > 0 for m in saved) and min(spent) >= 0 and per_run == spent
    assert summary == pytest.approx({"mean": sum(spent) / 2, "std": abs(spent[0] - spent[1]) / 2 ** 0.5}, abs=1e-6)
    assert bench.main(args)["runs"] == out["runs"]                   # finished runs are reused
    assert "reusing the finished run" in capsys.readouterr().out


def test_bench_reasoning_seeds_runs_and_table(capsys):
    """--seeds N: each mode in N folders with train.seed 0..N-1; the table shows mean ± std. (The training
    itself is test_bench_reasoning_quick's and test_bench_seeds_mean_std's.)"""
    one, two = bench.mode_runs("c.yaml", ["x=1"], "o"), bench.mode_runs("c.yaml", ["x=1"], "o", seeds=2)
    assert [r[1] for r in one][:2] == ["none", "pause_M1"] and not any("train.seed=" in a for r in one for a in r[2])
    assert [r[:2] for r in two][:3] == [("none", "none_seed0"), ("none", "none_seed1"), ("pause M=1", "pause_M1_seed0")]
    assert "train.seed=1" in two[1][2] and "train.name=none_seed1" in two[1][2] and len(two) == 2 * len(one)
    m = {"recall@5": .1, "ndcg@5": .05, "recall@10": .2, "ndcg@10": .08}
    row = {"mode": "none", "valid": m, "test": m, "valid_std": dict.fromkeys(m, .01), "test_std": dict.fromkeys(m, .02),
           "epochs": 1, "train_tokens": 1e6, "train_tokens_per_s": 1e4, "users_per_s_batch1": 1,
           "ms_per_user_batch1": 1, "users_per_s_batch256": 2}
    bench.print_table([row])
    assert "| none | 0.0800 ± 0.0100 | 0.1000 ± 0.0200 |" in capsys.readouterr().out


def test_bench_reasoning_modes_subset():
    runs = bench.mode_runs("c.yaml", [], "o", modes="none, cot noise=0.0")
    assert [r[0] for r in runs] == ["none", "cot noise=0.0"] and "model.reasoning=cot" in runs[1][2]
    with pytest.raises(ValueError, match="unknown mode 'pause'.*pause M=2"):
        bench.mode_runs("c.yaml", [], "o", modes="pause")


def test_bench_finetune_rows_counts_and_flops(tmp_path):
    """bench.py finetune on a tiny tied Llama folder: a row per depth and setting; the trained parameters and the
    FLOPs per token of each setting counted here from the written shapes; tokens/s and MFU consistent."""
    from test_mapping import write_llama
    C, V, n_head, n_kv, ff = 32, 40, 4, 2, 48
    write_llama(tmp_path / "llama", "LlamaForCausalLM", V=V, C=C, n_head=n_head, n_kv=n_kv, ff=ff, tie=True)
    overrides = [f"model.hf_dir={tmp_path / 'llama'}", "model.max_len=64", f"train.sid_cache={tmp_path / 'sids'}",
                 "model.sid_init=mean"]   # the folder has no tokenizer (sid_init=text reads the titles)
    out = bench.main(["finetune", str(ROOT / "configs" / "demo_smollm2.yaml"), "--depths", "1,2", "--steps", "2",
                      "--threads", "1", *overrides])
    settings = [name for name, _ in mfu.FINETUNE_SETTINGS]
    assert settings == ["all weights", "text rows frozen", "our rows only"]
    assert [(r["depth"], r["setting"]) for r in out["rows"]] == [(d, s) for d in (1, 2) for s in settings]
    assert out["text_vocab"] == V and out["threads"] == 1 and out["steps"] == 2
    ours = (out["vocab_size"] - V) * C             # new_rows: the input rows and, tied, the head (model.head=new)
    kv = C // n_head * n_kv
    linear = C * (C + 2 * kv) + C * C + C * 2 * ff + ff * C   # c_attn [q; k; v], c_proj, c_fc [gate; up], mlp c_proj
    for r in out["rows"]:
        blocks, text_rows = r["depth"] * (linear + 2 * C), V * C   # + two RMSNorm weights per block
        every = blocks + C + text_rows + ours                     # + the final norm
        assert r["params"] == every
        assert r["trained_params"] == {"all weights": every, "text rows frozen": every - text_rows,
                                       "our rows only": ours}[r["setting"]]
        n = r["depth"] * linear + ours                   # weights multiplied per token: blocks' Linears, the head
        trained = n if r["setting"] != "our rows only" else ours
        assert r["flops_per_token"] == 4 * n + 2 * trained
        assert r["tokens"] == out["rows"][0]["tokens"] > 0   # the same batches for every row
        assert r["tokens_per_s"] > 0                            # a clock reading: only that it is there
        rate = r["flops_per_token"] * r["tokens_per_s"] / (out["peak_gflops"] * 1e9)
        assert r["mfu"] == pytest.approx(rate, rel=1e-2, abs=1e-5)
    assert out["peak_gflops"] == out["measured_gflops"] > 0 and out["peak_source"] == "measured fp32 matmul peak"


def test_bench_finetune_times_the_steps_the_data_makes(tmp_path, capsys):
    """--steps beyond the batches the data makes: the steps it makes are timed, and said so; one batch (no step
    left after the warm-up) is an error."""
    from test_mapping import write_llama
    write_llama(tmp_path / "llama", "LlamaForCausalLM", V=40, C=32, n_head=4, n_kv=2, ff=48, tie=True)
    args = ["finetune", str(ROOT / "configs" / "demo_smollm2.yaml"), "--depths", "1", "--steps", "20", "--threads",
            "1", "--settings", "text rows frozen", f"model.hf_dir={tmp_path / 'llama'}", "model.max_len=64",
            f"train.sid_cache={tmp_path / 'sids'}", "model.sid_init=mean"]
    out = bench.main([*args, "--batch-tokens", "2000"])                  # 300 users: 3 batches of 2,000 tokens
    assert out["steps"] == len(out["batch_shapes"]) == 2 and out["rows"][0]["tokens_per_s"] > 0
    assert "the data makes 3 batches: 2 timed steps, not --steps 20" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the data makes 1 batch, and a timed step needs 2"):
        bench.main([*args, "--batch-tokens", "100000"])


def test_mfu_peak_is_the_cards_dense_bf16_spec_by_name(monkeypatch):
    """The card's spec peak by torch.cuda.get_device_name (no GPU needed: the name is given here); a card not
    listed: the measured rate, said so; --peak-gflops overrides; a CPU: the measured rate."""
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 SXM5 80GB": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312, "NVIDIA L4": 121, "NVIDIA H200 NVL": 0,
             "NVIDIA L40S": 0, "NVIDIA GeForce RTX 4090": 0, "": 0}
    assert {name: mfu.spec_peak_tflops(name) for name in names} == names
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    assert mfu.mfu_peak(0.0, "cuda", 400e3) == (989e3, "NVIDIA H200 dense bf16 spec peak")
    assert mfu.mfu_peak(5e3, "cuda", 400e3) == (5e3, "--peak-gflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L40S")
    assert mfu.mfu_peak(0.0, "cuda:0", 400e3) == (400e3, "measured bf16 matmul peak (unknown card NVIDIA L40S: "
                                                         "no spec peak)")
    assert mfu.mfu_peak(0.0, "cpu", 90.0) == (90.0, "measured fp32 matmul peak")


def test_bench_finetune_settings_batch_tokens_and_profile(tmp_path, capsys, monkeypatch):
    """--settings picks the rows; --batch-tokens times token-budgeted batches (rows x longest row within it, padded
    to train.pad_to); train.compile and its mode reach the timed step (torch.compile recorded here, not run);
    --profile DIR writes a Chrome trace of each row's steps and prints its top-15 ops."""
    from test_mapping import write_llama
    write_llama(tmp_path / "llama", "LlamaForCausalLM", V=40, C=32, n_head=4, n_kv=2, ff=48, tie=True)
    overrides = [f"model.hf_dir={tmp_path / 'llama'}", "model.max_len=64", f"train.sid_cache={tmp_path / 'sids'}",
                 "model.sid_init=mean", "train.pad_to=16", "train.compile=true",
                 "train.compile_mode=max-autotune-no-cudagraphs"]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append(mode) or module)
    out = bench.main(["finetune", str(ROOT / "configs" / "demo_smollm2.yaml"), "--depths", "1", "--steps", "2",
                      "--threads", "1", "--settings", "text rows frozen", "--batch-tokens", "150",
                      "--profile", str(tmp_path / "prof"), "--profile-steps", "2", *overrides])
    assert [r["setting"] for r in out["rows"]] == ["text rows frozen"] and out["batch_tokens"] == 150
    assert compiled == ["max-autotune-no-cudagraphs"]
    assert len(out["batch_shapes"]) == 2 and all(rows * longest <= 150 and longest % 16 == 0
                                                 for rows, longest in out["batch_shapes"])
    trace = out["rows"][0]["trace"]
    assert trace == str(tmp_path / "prof" / "depth1_text_rows_frozen.json")
    names = {e.get("name") for e in json.loads(Path(trace).read_text())["traceEvents"]}
    assert {"aten::mm", "aten::scaled_dot_product_attention"} <= names     # the step's ops, forward and backward
    printed = capsys.readouterr().out
    assert "profile: 1 blocks, text rows frozen, 2 steps" in printed and "Self CPU time total" in printed
    table = printed[printed.index("profile:"):printed.index("Self CPU time total")]
    assert 15 + 4 <= len(table.strip().splitlines()) <= 15 + 6          # the title, header lines and 15 ops
    with pytest.raises(ValueError, match="unknown setting 'frozen'"):
        bench.main(["finetune", "c.yaml", "--settings", "frozen"])


def test_runs_side_by_side_share_the_cores():
    """paper.py --jobs N (sweep.train_runs): a run whose config leaves train.threads at 0 (torch's default: every
    core, in every process) gets cpus // N threads, at least 1; a config's own threads, and --jobs 1, are kept."""
    demo, smollm2 = str(ROOT / "configs" / "demo.yaml"), str(ROOT / "configs" / "demo_smollm2.yaml")   # 0, 1
    assert sweep.job_threads([demo, "train.epochs=1"], 4, 16) == [demo, "train.epochs=1", "train.threads=4"]
    assert sweep.job_threads([demo], 3, 16) == [demo, "train.threads=5"]
    assert sweep.job_threads([demo], 4, 2) == [demo, "train.threads=1"]
    assert sweep.job_threads([demo], 1, 16) == [demo]
    assert sweep.job_threads([smollm2], 4, 16) == [smollm2]
    assert sweep.job_threads([demo, "train.threads=2"], 4, 16) == [demo, "train.threads=2"]
