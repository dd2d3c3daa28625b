"""The command line as a newcomer meets it: --help, user errors as one line, the results table, --recommend,
--plot. Most cases run the real scripts (subprocess), as a shell would."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY

import common
import data
import evaluate
import pauserec
import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PAUSEREC_TRACEBACK")} | {"OMP_NUM_THREADS": "1"}


def cli(*args):
    """Run `python SCRIPT ARGS` in the repository root, as a user types it."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=1800)   # a hang guard, not a speed check


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished two-epoch tiny run, trained in this process: (folder, its stdout, metrics)."""
    folder = tmp_path_factory.mktemp("cli")
    out = io.StringIO()   # not a TTY: train.py prints a progress line every log_every steps
    with contextlib.redirect_stdout(out):
        metrics = train.main([str(ROOT / "configs" / "demo.yaml"), *TINY, "train.epochs=2", "train.log_every=20",
                              f"train.out_dir={folder / 'runs'}", f"train.sid_cache={folder / 'sids'}"])
    return folder, out.getvalue(), metrics


# ----------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("script, keys", [
    ("train.py", ["train.epochs", "model.num_pauses", "data.dir", "eval.ks", "sid.method"]),
    ("evaluate.py", ["eval.beam_size", "model.num_pauses", "data.dir"]),
    ("sid.py", ["sid.codebook_size", "data.dir"]),
    ("bench.py", ["train.epochs", "model.num_pauses"]),
    ("paper.py", ["train.epochs", "model.num_pauses", "train.align_epochs"]),
])
def test_help_lists_every_key_with_default_and_meaning(script, keys):
    r = cli(script, "--help")
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = r.stdout.splitlines()
    for key in keys:
        assert any(line.startswith(f"  {key}=") for line in lines), key
    assert "PAUSEREC_TRACEBACK" in r.stdout
    if script == "train.py":   # the default, the field's comment, and a comment that goes on over two lines
        assert "  train.epochs=40" in r.stdout and "the cosine schedule spans all of them" in r.stdout
        patience = next(line for line in lines if line.startswith("  train.patience="))
        assert "(0: never; the best usually comes as the cosine schedule ends)" in patience
        # every key of every section is listed
        for name, cls in train.SECTIONS.items():
            for field in cls.__dataclass_fields__:
                assert any(line.startswith(f"  {name}.{field}=") for line in lines), f"{name}.{field}"
    if script == "sid.py":
        assert "--out=" in r.stdout and "collision_rate_nearest" in r.stdout


def test_field_comments_join_continuation_lines_and_skip_headings():
    comments = common.field_comments(data.DataConfig)
    assert comments["num_users"] == "users of the synthetic catalogue"   # not the '# synthetic catalogue' heading
    assert comments["max_history"] == "history cap (most recent items)"
    assert comments["meta_url"].startswith("where data.download fetches")   # a comment on the line below


# ----------------------------------------------------------------------------------------------
# User errors: one line on stderr, exit code 2, nothing printed or written before

DEMO = "configs/demo.yaml"
ERRORS = {   # case: (arguments ({tmp}: the test's folder, {runs}: the tiny run's runs/), words the line must hold)
    "unknown_key_on_command_line": (["train.py", DEMO, "model.nonsense=1"],
                                    ["command line", "unknown key 'model.nonsense'", "model.nonsense=1",
                                     "model.num_pauses"]),
    "bad_type": (["train.py", DEMO, "train.epochs=three"], ["command line", "train.epochs must be int", "three"]),
    "missing_config": (["train.py", "configs/nope.yaml"], ["config file not found", "configs/nope.yaml"]),
    "missing_data_dir": (["train.py", "configs/beauty.yaml", "data.dir=/nonexistent", "data.cache_dir={tmp}/cache"],
                         ["data.dir=/nonexistent does not exist", "reviews_Beauty_5.json"]),
    "existing_run": (["train.py", DEMO, *TINY, "train.out_dir={runs}"], ["holds a run already", "train.resume=true",
                                                                         "train.name="]),
    "unknown_user": (["evaluate.py", "{runs}/demo", "--recommend", "nobody"], ["unknown user 'nobody'", "user0000"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_error_is_one_line(tmp_path, tiny, case):
    args, words = ERRORS[case]
    runs = tiny[0] / "runs"
    args = [a.format(tmp=tmp_path, runs=runs) for a in args]
    if args[0] == "train.py" and not any(a.startswith("train.out_dir=") for a in args):
        args += [f"train.out_dir={tmp_path / 'runs'}", f"train.sid_cache={tmp_path / 'sids'}"]
    before = snapshot(runs)
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert r.stdout == ""                            # the error comes before the config dump
    assert not (tmp_path / "runs").exists() and snapshot(runs) == before   # nothing written


def test_config_errors_name_the_file_or_the_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  nonsense: 1\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key 'model.nonsense'; valid keys") as e:
        common.load_config(config, [], train.SECTIONS)
    assert "command line" not in str(e.value)
    with pytest.raises(ValueError, match=r"^command line: train.epochs must be int, got 'x' \(from train.epochs=x\)"):
        common.load_config(ROOT / DEMO, ["train.epochs=x"], train.SECTIONS)
    with pytest.raises(FileNotFoundError, match="train.resume=true but .*last.pt does not exist"):
        train.main([str(ROOT / DEMO), "train.resume=true", f"train.out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_run_cli_one_line_or_traceback_on_request(monkeypatch, capsys):
    """run_cli (what every script's __main__ calls): exit 2 and one line, or with PAUSEREC_TRACEBACK=1 the
    exception itself; a bug (not a user error) keeps its traceback."""
    monkeypatch.delenv("PAUSEREC_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        common.run_cli(train.main, [str(ROOT / DEMO), "train.epochs=three"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: command line: train.epochs must be int, got 'three' "
                                       "(from train.epochs=three)\n")
    monkeypatch.setenv("PAUSEREC_TRACEBACK", "1")
    with pytest.raises(ValueError, match="train.epochs must be int"):
        common.run_cli(train.main, [str(ROOT / DEMO), "train.epochs=three"])

    def bug(argv):
        raise KeyError("a bug")
    monkeypatch.delenv("PAUSEREC_TRACEBACK")
    with pytest.raises(KeyError):
        common.run_cli(bug, [])


# ----------------------------------------------------------------------------------------------
# Output: the results table, progress lines, --recommend, --plot

def table_rows(stdout: str) -> dict:
    """{row name: [4-decimal figures]} of a results table; checks its header."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() == ["test", "R@5", "N@5", "R@10", "N@10"])
    rows = {}
    for line in lines[head + 1:head + 5]:
        name, *figures = line.split()
        rows[name] = figures
    return rows


def expected_rows(test, baselines):
    return {name: [f"{m[f'{key}@{k}']:.4f}" for k in (5, 10) for key in ("recall", "ndcg")]
            for name, m in {"model": test, **baselines}.items()}


def test_training_ends_with_the_table_and_prints_progress_lines(tiny):
    folder, stdout, metrics = tiny
    run = folder / "runs" / "demo"
    assert table_rows(stdout) == expected_rows(metrics["test"], metrics["baselines"])
    assert list(table_rows(stdout)) == ["model", "mostpop", "markov", "markov_train_only"]
    lines = stdout.splitlines()
    assert lines[-2] == f"metrics: {run / 'metrics.json'}"
    assert set(json.loads(lines[-1])) == {"test", "markov", "run"}   # the last line stays one JSON object
    # stdout is no TTY here: one line per log_every steps, with the logged loss
    logged = [r for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    progress = [line for line in lines if line.startswith("step ") and " loss " in line]
    assert len(progress) == len(logged) >= 3
    for line, record in zip(progress, logged):
        assert line.startswith(f"step {record['step']}/{metrics['steps']} epoch {record['epoch']} ")
        assert f"loss {record['loss']:.4f}" in line and "tokens/s" in line


def test_evaluate_run_dir_prints_the_table(tiny):
    run = tiny[0] / "runs" / "demo"
    r = cli("evaluate.py", run)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((run / "metrics.json").read_text())
    assert table_rows(r.stdout) == expected_rows(saved["test"], saved["baselines"])
    last = json.loads(r.stdout.splitlines()[-1])
    printed = {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "users", "seconds"}   # keys only: seconds is a clock's
    assert set(last) == printed
    assert last["ndcg@10"] == saved["test"]["ndcg@10"]


def test_recommend_prints_the_beam_search_top_k(tiny):
    run = tiny[0] / "runs" / "demo"
    r = cli("evaluate.py", run, "--recommend", "user0007", "--k", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.splitlines()[-1])
    # what the evaluation loop ranks for the user's whole history (capped as in training)
    cfg, ds, codes, tok, model = evaluate.load_run(run)
    seq = ds.sequences[ds.user_ids.index("user0007")]
    example = data.Example(7, seq[-cfg["data"].max_history:], seq[-1])
    want = evaluate.recommend(model, tok, cfg["model"], pauserec.SIDTrie(codes), [example],
                              cfg["eval"].beam_size, 5, 1, desc=None)[0].tolist()
    assert [row["item"] for row in rows] == [ds.item_ids[i] for i in want]
    assert [row["title"] for row in rows] == [ds.item_meta[i]["title"] for i in want]
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    table = r.stdout.splitlines()[:-1]
    assert table[0].split() == ["rank", "item", "title", "score"]
    assert [line.split()[:2] for line in table[1:]] == [[str(n), row["item"]] for n, row in enumerate(rows, 1)]
    # --history with the same items gives the same list
    same = evaluate.main([str(run), "--history", ",".join(ds.item_ids[i] for i in seq), "--k", "5"])
    assert same == rows
    with pytest.raises(ValueError, match="unknown item nope"):
        evaluate.main([str(run), "--history", f"{ds.item_ids[0]},nope"])


def test_plot_writes_a_png(tiny, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(tiny[0] / "runs" / "demo", run)
    path = evaluate.main([str(run), "--plot", str(tmp_path / "c.png")])
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "metrics.json").unlink()   # a run still training: the baselines are computed from the data
    assert Path(evaluate.main([str(run), "--plot"])) == run / "curves.png" and (run / "curves.png").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    with pytest.raises(ValueError, match=r"^--plot needs matplotlib \(pip install matplotlib\)$"):
        evaluate.main([str(run), "--plot"])
