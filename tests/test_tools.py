"""tools/pause_analysis.py: the attention it reads back is a causal softmax, and the parts of the prompt it reports
for the last position (last item's SID, earlier pauses, BOS, itself, the rest) cover the prompt once.
tools/gpu_check.sh: its dry run on a CPU with tiny settings packs one archive of plain names and every step's
status."""
import importlib.util
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import torch

import data
import pauserec as pr
from model import GPT, ModelConfig

spec = importlib.util.spec_from_file_location("pause_analysis",
                                              Path(__file__).parents[1] / "tools" / "pause_analysis.py")
analysis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analysis)


def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, reasoning="pause", num_pauses=3, pause_layout="last",
                      pos="rope")
    tok = pr.Tokens.from_codes(torch.tensor([[c, p] for c in range(3) for p in range(2)]))
    return cfg, tok, GPT(cfg, tok.size, tok.base).eval()


def test_attention_weights_are_a_causal_softmax():
    cfg, tok, model = tiny()
    prompt = pr.build_prompt(tok, cfg, [0, 3, 5])
    for w in analysis.attention_weights(model, torch.tensor([prompt])):   # per block [H, T, T]
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w.triu(1) == 0).all()


def test_the_last_positions_parts_cover_the_prompt_once():
    cfg, tok, model = tiny()
    examples = [data.Example(user=u, history=h, target=1) for u, h in enumerate([[0, 3, 5], [2], [4, 4, 1, 0]])]
    for block in analysis.where_last_looks(model, tok, cfg, examples):
        assert abs(sum(block.values()) - 1) < 1e-5, block


def test_gpu_check_dry_run_packs_one_archive_of_plain_names_and_every_steps_status(tmp_path):
    """tools/gpu_check.sh on a CPU, tiny: synthetic data (BEAUTY_DIR '-'), the speed runs on random weights of a
    tiny config.json, a tiny GGUF in two parts for the paper's dry run. $OUT holds one archive; every name in it is
    plain (what a GPU session brings back); status.txt has a line per step, and a failing step (RUNS entry bs0)
    stops none after it."""
    from test_gguf import tiny_config, write_llama_gguf
    raw = write_llama_gguf(tmp_path / "tiny.gguf").read_bytes()
    parts = [tmp_path / "part.aa", tmp_path / "part.ab"]
    parts[0].write_bytes(raw[: len(raw) // 2])
    parts[1].write_bytes(raw[len(raw) // 2:])
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))    # the random folder: the GGUF's shapes
    knobs = {"OUT": str(tmp_path / "out"), "CONFIG": "configs/demo_smollm2.yaml",
             "MODEL_CONFIG": str(tmp_path / "config.json"), "DEPTHS": "1", "STEPS": "2",
             "RUNS": "bs8 bs0 tokens2000", "EXTRA": "model.max_len=64 train.threads=1", "DEVICE": "cpu",
             "PAPER_ARGS": "--seeds 1 --cot-seeds 0 --time-steps 1", "STEP_S": "300", "PAPER_S": "300",
             "DEADLINE_S": "1200", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "-", *map(str, parts)], cwd=root, capture_output=True,
                          text=True, env=os.environ | knobs, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_check.tar.gz"]
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for name in files for part in name.split("/")), list(files)
    assert files["gpu_check/left_out.txt"] == b""                         # nothing too big or oddly named
    status = dict(line.split(": ", 1) for line in files["gpu_check/status.txt"].decode().splitlines())
    steps = ["env", "weights", "gguf", "sync", "finetune_bs8", "finetune_bs0", "finetune_tokens2000", "paper_dry_run"]
    assert list(status) == steps, status
    assert [s.split(" in ")[0] for s in status.values()] == ["exit 0"] * 5 + ["exit 2"] + ["exit 0"] * 2, status
    assert all(f"gpu_check/{step}.log" in files for step in steps)
    bs8, tokens = (json.loads(files[f"gpu_check/finetune_{r}.json"]) for r in ("bs8", "tokens2000"))
    assert (bs8["batch_size"], bs8["steps"], tokens["batch_tokens"]) == (8, 2, 2000)
    assert bs8["text_vocab"] == 261 and bs8["rows"][0]["setting"] == "text rows frozen"
    assert "gpu_check/profile/depth1_text_rows_frozen.json.gz" in files     # the first run's trace only
    assert [n for n in files if "profile" in n] == ["gpu_check/profile/depth1_text_rows_frozen.json.gz"]
    assert json.loads(files["gpu_check/paper_dry_run.json"])["runs"][0]["row"] == "alignment"


def test_gpu_check_past_its_deadline_skips_every_step_and_still_packs(tmp_path):
    """DEADLINE_S too short for any step: each is skipped, said so in status.txt, and the archive still comes back."""
    root = Path(__file__).resolve().parents[1]
    knobs = {"OUT": str(tmp_path / "out"), "DEADLINE_S": "25", "RUNS": "bs8", "DEVICE": "cpu"}
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=root, capture_output=True, text=True,
                          env=os.environ | knobs, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        status = tar.extractfile("gpu_check/status.txt").read().decode().splitlines()
    assert [line.split(": ")[0] for line in status] == ["env", "weights", "gguf", "sync", "finetune_bs8",
                                                        "paper_dry_run"]
    assert all("skipped" in line for line in status), status
