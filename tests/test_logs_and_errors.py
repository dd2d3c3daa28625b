"""What a log file and a user see when the data is wrong: an error inside a data file (a malformed JSON line, a
reviews file that is not 5-core) or a failed download is one line `error: ...` before the config dump, and the
RQ-VAE progress bar writes no carriage returns where stderr is not a terminal."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import make_dir, review_lines
from test_sid import SMALL, texts

import sid

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PAUSEREC_TRACEBACK")} | {"OMP_NUM_THREADS": "1"}
BAD_LINE = '{"reviewerID": "u9", "asin": "A", "unixReviewTime": 1'   # cut off mid-record
FOUR_CORE = [(f"u{u}", a, 100 + j) for u in range(6) for j, a in enumerate("ABCD")]   # 4 items each


def one_line_error(tmp_path, *overrides) -> str:
    """Run train.py on the Test category in tmp_path: exit code 2, one line on stderr, nothing on stdout."""
    r = subprocess.run([sys.executable, "train.py", "configs/beauty.yaml", "data.category=Test",
                        f"data.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                        f"train.out_dir={tmp_path / 'runs'}", *overrides],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert r.stdout == ""                              # before the config dump
    assert not (tmp_path / "runs").exists()
    return lines[0]


@pytest.mark.parametrize("case", ["malformed_json", "not_5_core", "failed_download"])
def test_data_file_errors_are_one_line_before_the_config(tmp_path, case):
    if case == "malformed_json":
        make_dir(tmp_path, gz=False, reviews_lines=[*review_lines(FOUR_CORE)[:3], BAD_LINE])
        assert "reviews_Test_5.json:4: malformed JSON" in one_line_error(tmp_path)
    elif case == "not_5_core":
        make_dir(tmp_path, gz=False, reviews=FOUR_CORE)
        line = one_line_error(tmp_path)
        assert "reviews_Test_5.json: 6 users and 0 items have < 5 interactions" in line, line
    else:
        missing = (tmp_path / "nowhere" / "r.json.gz").as_uri()
        line = one_line_error(tmp_path, "data.download=true", f"data.reviews_url={missing}")
        assert "download of file:" in line and "nothing was saved" in line, line


def test_rqvae_progress_bar_writes_no_carriage_returns_into_a_log(capsys):
    t, cats = texts()
    sid.build_sids(t, sid.SIDConfig(**SMALL, method="rqvae"), cats)   # stderr is captured: not a terminal
    err = capsys.readouterr().err
    assert "rqvae" not in err and "\r" not in err   # the bar is off, the health comes with the table
