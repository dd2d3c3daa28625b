"""Scale-out and failure handling: torchrun DDP, a clear error for every bad input, kill and resume."""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY

import ddp
import evaluate
import pauserec
import sid
import train

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_args(folder, *extra):
    return [str(ROOT / "configs" / "demo.yaml"), *TINY, f"train.out_dir={folder / 'runs'}",
            f"train.sid_cache={folder / 'sids'}", *extra]


def files(folder: Path) -> dict:
    """{relative path: bytes} of everything under folder ({} when it does not exist)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# torchrun

# tolerance: about 3x the largest weight difference measured at 6 epochs (float rounding, grown by Adam)
@pytest.mark.parametrize("layout,tolerance", [(["model.pause_layout=target"], 5e-3),
                                              (["model.pause_layout=every_item", "model.loss_on_history=true",
                                                "train.refit_epochs=1"], 1e-4)], ids=["target", "every_item_refit"])
def test_torchrun_ddp(tmp_path, layout, tolerance):
    """2 CPU ranks (gloo) split every batch; the step equals the one-process step up to float rounding
    (every_item: rows of unequal supervised tokens, so the shard weights matter; then the refit under DDP)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    common = ["train.epochs=6", "train.log_every=10", *layout]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *train_args(ddp, *common)],
                                env=ENV, cwd=ROOT, stdout=out, stderr=err)
        want = train.main(train_args(single, *common))   # meanwhile, in this process
        proc.wait()
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-3000:]
    assert (tmp_path / "out").read_text().count('"run":') == 1   # rank 1 printed nothing
    assert [p.name for p in (ddp / "runs").iterdir()] == ["demo"]
    run = ddp / "runs" / "demo"
    assert not list(run.glob("*.tmp"))
    got = json.loads((run / "metrics.json").read_text())
    assert (got["steps"], got["refit_steps"]) == (want["steps"], want["refit_steps"])
    a, b = (torch.load(f / "runs" / "demo" / "last.pt", weights_only=False)["model"] for f in (single, ddp))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"DDP vs one process: max abs weight difference {diff:.1e}")
    assert diff < tolerance
    logs = [[r["loss"] for r in map(json.loads, open(f / "runs" / "demo" / "log.jsonl")) if "loss" in r]
            for f in (single, ddp)]
    assert len(logs[0]) > 5 and logs[0] == pytest.approx(logs[1], abs=2e-4)   # per logged step (4 decimals)
    for key in ("recall@10", "ndcg@10"):
        assert got["test"][key] == pytest.approx(want["test"][key], abs=1e-6), key
        if "model.pause_layout=target" in layout:   # every_item: 10 steps an epoch here, too few to learn
            assert want["test"][key] > 1.1 * want["baselines"]["mostpop"][key]


def test_shard_gives_each_rank_its_own_rows():
    """The ranks' shares of a batch are disjoint and together the batch: no rank trains on all rows."""
    examples = [([1] * 9, [False, True] * 4 + [True]) for _ in range(7)]
    rows = [4, 0, 6, 2, 5, 1, 3]
    for world in (2, 3):
        shares = [ddp.shard(rows, examples, rank, world)[0] for rank in range(world)]
        assert sorted(sum(shares, [])) == sorted(rows) and all(len(s) < len(rows) for s in shares)


@pytest.mark.parametrize("size", [7, 1])
def test_shard_weights_give_the_whole_batch_loss(size):
    """What DDP computes (the mean over ranks of each rank's weighted loss) is the one-process batch loss,
    also when a short batch leaves a rank without rows."""
    torch.manual_seed(0)
    cfg = pauserec.ModelConfig(n_layer=1, n_head=2, d_model=16, reasoning="pause", num_pauses=2, dropout=0.0,
                               pause_layout="target", loss_on_history=True)  # rows differ
    tok = pauserec.Tokens([4, 4], codes=torch.tensor([[i // 4, i % 4] for i in range(16)]))
    model = pauserec.GPT(cfg, tok.size)
    g = torch.Generator().manual_seed(0)
    examples = [pauserec.build_example(tok, cfg, torch.randint(0, 16, (n,), generator=g).tolist(), 3)
                for n in (1, 5, 2, 8, 3, 4, 6)][:size]
    rows = list(range(size))
    whole = model.loss(*pauserec.collate([examples[i] for i in rows]))
    world, averaged = 3, 0.0
    for rank in range(world):
        mine, weight = ddp.shard(rows, examples, rank, world)
        averaged += weight * model.loss(*pauserec.collate([examples[i] for i in mine])) / world
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-5)
    assert ddp.shard(rows, examples, 0, 1) == (rows, 1.0)


def test_amp_option_runs_on_cpu(tmp_path, monkeypatch):
    """bf16 autocast is meant for CUDA; on a CPU it runs too (slowly), so the option is testable here. The
    training forward's logits are bf16 (autocast really on), the evaluation's float32."""
    dtypes = {True: set(), False: set()}   # model.training -> dtypes of the logits
    logits = pauserec.GPT.logits

    def recorded(self, x):
        out = logits(self, x)
        dtypes[self.training].add(out.dtype)
        return out

    monkeypatch.setattr(pauserec.GPT, "logits", recorded)
    metrics = train.main(train_args(tmp_path, "train.epochs=1", "train.amp=true"))
    assert (tmp_path / "runs" / "demo" / "metrics.json").is_file() and metrics["test"]["recall@10"] > 0
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line naming the culprit, and no run folder or partial file left behind

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run (its folder and SID cache), copied by the cases that need one."""
    folder = tmp_path_factory.mktemp("tiny")
    train.main(train_args(folder, "train.epochs=1"))
    return folder


REVIEWS = [json.dumps({"reviewerID": f"u{u}", "asin": a, "unixReviewTime": 100 + j})
           for u in range(6) for j, a in enumerate("ABCDE")]             # 6 users x 5 items: a 5-core
META = [repr({"asin": a, "title": f"item {a}"}) for a in "ABCDE"]
TRUNCATED = gzip.compress("\n".join(REVIEWS).encode())[:100]


def amazon(*extra, reviews=REVIEWS, meta=META, raw=None):
    """A case: train.py on an Amazon-format folder; lists of lines replace a file, raw bytes (None: absent) too."""
    def setup(tmp, run):
        folder = tmp / "amazon"
        folder.mkdir()
        for name, lines in (("reviews_Beauty_5.json.gz", reviews), ("meta_Beauty.json.gz", meta)):
            (folder / name).write_bytes(gzip.compress("\n".join(lines).encode()) if lines else b"")
        for name, content in (raw or {}).items():
            (folder / name).unlink()
            if content is not None:
                (folder / name).write_bytes(content)
        args = train_args(tmp, "data.source=amazon", f"data.dir={folder}", f"data.cache_dir={tmp / 'cache'}", *extra)
        return lambda: train.main(args)
    return setup


def overrides(*extra):
    """A case: train.py with these overrides ({tmp} is replaced by the test's folder)."""
    return lambda tmp, run: lambda: train.main(train_args(tmp, *(e.format(tmp=tmp) for e in extra)))


def copy_run(tmp, run):
    shutil.copytree(run / "runs", tmp / "runs")
    shutil.copytree(run / "sids", tmp / "sids")
    return tmp / "runs" / "demo"


def drop_last_item(path):
    codes, settings, health = sid.load_sids(path)
    sid.save_sids(path, codes[:-1], settings, health)   # now a table for 59 of the 60 items


def stale_sid_cache(tmp, run):
    shutil.copytree(run / "sids", tmp / "sids")
    drop_last_item(next((tmp / "sids").iterdir()))
    return lambda: train.main(train_args(tmp))


def corrupt_sid_cache(tmp, run):
    shutil.copytree(run / "sids", tmp / "sids")
    path = next((tmp / "sids").iterdir())
    path.write_bytes(path.read_bytes()[:200])   # as if cut short (save_sids itself is atomic)
    return lambda: train.main(train_args(tmp))


def stale_run_sids(tmp, run):
    drop_last_item(copy_run(tmp, run) / "sids.pt")
    return lambda: evaluate.main([str(tmp / "runs" / "demo")])


def resume_other_config(tmp, run):
    copy_run(tmp, run)
    return lambda: train.main(train_args(tmp, "train.epochs=1", "train.resume=true", "model.d_model=64", "sid.seed=1"))


def evaluate_other_model(tmp, run):
    folder = copy_run(tmp, run)
    return lambda: evaluate.main([str(folder), "model.n_layer=3"])


REVIEW = '{"reviewerID": "u0", "asin": "A", "unixReviewTime": 1}'
BAD = {  # case: (setup(tmp, run) -> the failing call, message)
    "unknown_key": (overrides("model.num_pause=4"), r"unknown key 'model.num_pause'"),
    "wrong_type": (overrides("train.epochs=three"), r"train.epochs must be int, got 'three'"),
    "zero_batch": (overrides("train.batch_size=0"), r"train.batch_size must be > 0, got 0"),
    "zero_width": (overrides("model.d_model=0"), r"model.d_model must be > 0, got 0"),
    "negative_codebook": (overrides("sid.codebook_size=-8"), r"sid.codebook_size must be > 0, got -8"),
    "zero_history": (overrides("data.max_history=0"), r"data.max_history must be >= 1, got 0"),
    "negative_warmup": (overrides("train.warmup_steps=-1"), r"train.warmup_steps must be >= 0, got -1"),
    "negative_pauses": (overrides("model.num_pauses=-1"), r"model.num_pauses must be >= 0, got -1"),
    "beam_below_k": (overrides("eval.beam_size=5"), r"eval.beam_size \(5\) must be >= the largest K .* \(10\)"),
    "bogus_device": (overrides("train.device=gpu"), r"train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    "bad_compile_mode": (overrides("train.compile_mode=fast"),
                         r"train.compile_mode must be default \| reduce-overhead \| .*, got 'fast'"),
    "bad_eval_precision": (overrides("eval.precision=fp16"),
                           r"eval.precision must be tf32 \| bf16 \| fp32, got 'fp16'"),
    "device_out_of_range": (overrides("train.device=cuda:7"), r"train.device=cuda:7 but torch sees"),
    "missing_data_dir": (overrides("data.source=amazon", "data.dir={tmp}/nowhere", "data.cache_dir={tmp}/cache"),
                         r"data.dir=\S*nowhere does not exist"),
    "missing_meta_file": (amazon(raw={"meta_Beauty.json.gz": None}), r"meta_Beauty.json\(.gz\) not found in"),
    "empty_reviews": (amazon(reviews=[]), r"reviews_Beauty_5.json.gz: no reviews \(empty file\)"),
    "empty_meta": (amazon(meta=[]), r"meta_Beauty.json.gz: no items \(empty file\)"),
    "truncated_gzip": (amazon(raw={"reviews_Beauty_5.json.gz": TRUNCATED}),
                       r"reviews_Beauty_5.json.gz: truncated or corrupt file"),
    "malformed_json": (amazon(reviews=[REVIEW, REVIEW, '{"reviewerID": "u0", "asin": ']),
                       r"reviews_Beauty_5.json.gz:3: malformed JSON"),
    "meta_not_dict": (amazon(meta=[repr({"asin": "A"}), "['B', 'not a dict']"]),
                      r"meta_Beauty.json.gz:2: a meta line must be a dict"),
    "items_without_meta": (amazon(meta=[repr({"asin": a}) for a in "ABD"]),
                           r"meta_Beauty.json.gz: 2 reviewed items have no meta line, e.g. C, E"),
    "empty_after_k_core": (amazon("data.filter_k_core=true", reviews=REVIEWS[:24]),  # u0-u4, one review less
                           r"no interactions left after 5-core filtering"),
    "stale_sid_cache": (stale_sid_cache, r"sids-\w+.pt: the SID table has 59 items but the catalogue has 60"),
    "corrupt_sid_cache": (corrupt_sid_cache, r"sids-\w+.pt: not a readable SID table"),
    "stale_run_sids": (stale_run_sids, r"sids.pt: the SID table has 59 items but the catalogue has 60"),
    "resume_other_config": (resume_other_config, r"last.pt comes from another config \(sid.seed: 0 -> 1; "
                                                 r"model.d_model: 32 -> 64\)"),
    "evaluate_other_model": (evaluate_other_model, r"model.pt does not fit the model .*transformer.h.2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(tmp_path, tiny_run, case):
    setup, match = BAD[case]
    call = setup(tmp_path, tiny_run)
    before = files(tmp_path / "runs")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as error:
        call()
    assert "\n" not in str(error.value)
    assert files(tmp_path / "runs") == before      # no new run folder, no changed or partial file


# ----------------------------------------------------------------------------------------------
# Kill safety

def complete_lines(path: Path) -> list[dict]:
    """The records of a log.jsonl that another process may be appending to: only lines ended by a newline
    (the last one may be half written)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


@pytest.mark.parametrize("refit", [False, True])
def test_kill_resume(tmp_path, refit):
    """SIGKILL a training subprocess at a random step after its first checkpoint (refit: in the second of two
    refit epochs), resume it, and compare the final weights with those of an uninterrupted run (CPU, one
    thread: deterministic)."""
    common = ["train.epochs=2", "eval.every=5", "model.dropout=0.1", "eval.valid_users=50", "train.log_every=1",
              f"train.refit_epochs={2 if refit else 0}"]
    train.main(train_args(tmp_path / "full", *common))
    full = torch.load(tmp_path / "full" / "runs" / "demo" / "last.pt", weights_only=False)
    per_refit_epoch = full["refit_step"] // 2
    counter, kill_at = ("refit_step", random.Random(8).randrange(per_refit_epoch + 1, full["refit_step"])) if refit \
        else ("step", random.Random(8).randrange(6, full["step"]))   # the first checkpoint is at step 5

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *train_args(killed, *common)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "runs" / "demo" / "log.jsonl"
    while proc.poll() is None:   # no deadline: a slow machine only takes longer to reach kill_at
        records = complete_lines(log)
        if records and records[-1].get(counter, 0) >= kill_at:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before {counter} {kill_at}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = torch.load(killed / "runs" / "demo" / "last.pt", weights_only=False)
    if refit:   # the refit's first epoch is checkpointed; model.pt is still the checkpoint chosen on validation
        assert at_kill["step"] == full["step"] and at_kill["refit_step"] == per_refit_epoch
        assert "refit_epochs" not in torch.load(killed / "runs" / "demo" / "model.pt", weights_only=True)
    else:
        assert 5 <= at_kill["step"] < full["step"]
    subprocess.run(cmd + ["train.resume=true"], check=True, env=ENV, cwd=ROOT, capture_output=True)

    resumed = torch.load(killed / "runs" / "demo" / "last.pt", weights_only=False)
    assert (resumed["step"], resumed["refit_step"]) == (full["step"], full["refit_step"])
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for name in ("model.pt", "model_valid.pt") if refit else ("model.pt",):
        a, b = (torch.load(f / "runs" / "demo" / name, weights_only=True) for f in (tmp_path / "full", killed))
        assert a["step"] == b["step"] and all(torch.equal(t, b["model"][k]) for k, t in a["model"].items()), name
