import collections
import json
import traceback
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import batching
import common
import data
import evaluate
import pauserec
import train

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a unit test: 300 users, 60 items, a 2-layer d=32 decoder.
TINY = ["data.source=synthetic", "data.num_users=300", "data.num_items=60", "sid.codebook_size=8",
        "sid.embed_dim=32", "sid.hidden=[64]", "sid.latent_dim=8", "sid.epochs=20", "sid.batch_size=60",
        "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.reasoning=pause", "model.num_pauses=2",
        "train.batch_size=32", "train.warmup_steps=5", "train.lr=3e-3", "train.patience=0",
        "train.threads=1", "eval.batch_size=128", "model.pause_layout=target", "eval.every=0",
        "model.dropout=0.0", "train.refit_epochs=0", "train.device=cpu"]


def tiny_args(tmp_path, *extra):
    return [str(ROOT / "configs" / "demo.yaml"), *TINY, f"train.out_dir={tmp_path / 'runs'}",
            f"train.sid_cache={tmp_path / 'sids'}", *extra]


def killed_at_first_checkpoint(monkeypatch, args):
    """train.main(args) stopped (KeyboardInterrupt) right after it writes its first last.pt."""
    save = train.checkpoint

    def killed(run):
        save(run)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train, "checkpoint", save)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'model.num_pause'.*model.num_pauses"):
        common.load_config(write(tmp_path, "model:\n  num_pause: 4\n"), [], train.SECTIONS)


def test_config_unknown_section_and_bad_override(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'modle'"):
        common.load_config(write(tmp_path, "modle: {}\n"), [], train.SECTIONS)
    with pytest.raises(ValueError, match="section.key=value"):
        common.load_config(write(tmp_path, "{}\n"), ["epochs=3"], train.SECTIONS)


def test_config_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="train.epochs must be int"):
        common.load_config(write(tmp_path, "train:\n  epochs: three\n"), [], train.SECTIONS)
    with pytest.raises(ValueError, match=r"eval.ks\[1\] must be int"):
        common.load_config(write(tmp_path, "{}\n"), ["eval.ks=[5, x]"], train.SECTIONS)


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        common.load_config(tmp_path / "nope.yaml", [], train.SECTIONS)


def test_config_overrides_and_int_as_float(tmp_path):
    cfg = common.load_config(write(tmp_path, "train:\n  lr: 1\n"), ["model.num_pauses=8", "data.dir=x/y"],
                           train.SECTIONS)
    assert cfg["train"].lr == 1.0 and isinstance(cfg["train"].lr, float)
    assert cfg["model"].num_pauses == 8 and cfg["data"].dir == "x/y"
    assert cfg["eval"].ks == [5, 10]   # untouched defaults


def test_tiny_run_learns_and_evaluate_reproduces_test(tmp_path, capsys):
    metrics = train.main(tiny_args(tmp_path, "train.epochs=6"))
    run = tmp_path / "runs" / "demo"
    assert {"config.yaml", "sids.pt", "model.pt", "log.jsonl", "metrics.json"} <= {p.name for p in run.iterdir()}
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])        # the loss falls
    saved = json.loads((run / "metrics.json").read_text())
    written = {"valid", "test", "baselines", "train_seconds", "sid"}   # keys only: train seconds is a clock's
    assert set(saved) >= written
    assert saved["test"]["ndcg@10"] > saved["baselines"]["mostpop"]["ndcg@10"]
    assert saved["test"]["ndcg@10"] > 0.22   # half the N@10 of this run, measured once (far above MostPop)
    # evaluate.py RUN_DIR reproduces the test numbers exactly
    again = evaluate.main([str(run), "eval.batch_size=7"])
    for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert again[k] == metrics["test"][k]


def test_refit_trains_the_chosen_checkpoint_on_the_validation_targets(tmp_path):
    """refit_epochs > 0: the checkpoint chosen on validation (kept as model_valid.pt) trains on the validation
    targets too; model.pt is the refit model, and evaluate.py reproduces its test numbers."""
    metrics = train.main(tiny_args(tmp_path, "train.epochs=3", "train.refit_epochs=2", "train.refit_lr=3e-3",
                                   "model.pause_layout=every_item"))
    run = tmp_path / "runs" / "demo"
    chosen, refit = (torch.load(run / name, weights_only=True) for name in ("model_valid.pt", "model.pt"))
    assert refit["step"] == chosen["step"] == metrics["best_step"] and refit["refit_epochs"] == 2
    assert metrics["refit_steps"] > 0 and any(not torch.equal(t, refit["model"][k]) for k, t in chosen["model"].items())

    cfg, ds, codes, tok, model = evaluate.load_run(run)
    # refit examples: every user's sequence up to its validation target (the first window of each user ends there)
    examples = batching.training_examples(tok, cfg["model"], ds, None, cfg["data"].max_history, None, refit=True)
    windows = [len(range(len(s) - 1, 1, -cfg["data"].max_history)) for s in ds.sequences]
    assert len(examples) == sum(windows)
    firsts = [examples[sum(windows[:u])][0] for u in range(len(ds.sequences))]
    assert all(ids[-len(tok.sid(s[-2])):] == tok.sid(s[-2]) for ids, s in zip(firsts, ds.sequences))
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)   # layout target: one example per target
    target = batching.training_examples(tok, replace(cfg["model"], pause_layout="target"), ds, split,
                                     cfg["data"].max_history, None, refit=True)
    assert len(target) == len(split["train"]) + len(split["valid"])
    again = evaluate.main([str(run)])
    assert all(again[k] == metrics["test"][k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))


def test_checkpoint_metric_missing_from_ks_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"eval.select=ndcg@10 is not computed with eval.ks=\[5, 20\]"):
        train.main(tiny_args(tmp_path, "eval.ks=[5, 20]"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sids").exists()


def test_final_validation_on_the_sample_the_checkpoint_was_chosen_on(tmp_path):
    """eval.final_valid=sample: metrics.json's validation figures are those of the eval.valid_users sample at the
    chosen checkpoint (its best logged validation), not of every user; a bad value is a one-line error."""
    metrics = train.main(tiny_args(tmp_path, "train.epochs=2", "eval.valid_users=40", "eval.final_valid=sample"))
    logged = [json.loads(line) for line in (tmp_path / "runs" / "demo" / "log.jsonl").read_text().splitlines()]
    best = [r["valid"] for r in logged if r.get("best")][-1]
    assert metrics["valid"]["users"] == 40 and metrics["valid"]["ndcg@10"] == best["ndcg@10"]
    every = train.main(tiny_args(tmp_path, "train.epochs=2", "eval.valid_users=40", "train.name=all"))
    assert every["valid"]["users"] == 300 and every["test"]["ndcg@10"] == metrics["test"]["ndcg@10"]
    with pytest.raises(ValueError, match="eval.final_valid must be all or sample"):
        train.main(tiny_args(tmp_path, "eval.final_valid=some", "train.name=bad"))


def test_sid_method_id_is_an_item_id_model_whose_beam_is_exact_top_k(tmp_path):
    """sid.method=id: one code per item, so the trie has one level and the beam search is a plain top-k."""
    metrics = train.main(tiny_args(tmp_path, "train.epochs=3", "sid.method=id", "model.reasoning=none",
                                   "model.pause_layout=every_item"))
    assert metrics["test"]["ndcg@10"] > metrics["baselines"]["mostpop"]["ndcg@10"]
    assert metrics["test"]["ndcg@10"] > 0.30   # half the N@10 of this run, measured once (far above MostPop)
    cfg, ds, codes, tok, model = evaluate.load_run(tmp_path / "runs" / "demo")
    assert codes.tolist() == [[i] for i in range(len(ds.item_ids))] and tok.num_levels == 1
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)
    prompts = [pauserec.build_prompt(tok, cfg["model"], ex.history) for ex in split["test"][:40]]
    items, scores = pauserec.beam_search(model, tok, cfg["model"], pauserec.SIDTrie(codes), prompts,
                                         beam_size=20, topk=10)
    with torch.no_grad():
        ids, key_mask = pauserec.left_pad(prompts, pad=tok.PAD)
        logp = torch.log_softmax(model(ids, key_mask=key_mask, last=True).float(), -1)  # [U, V]
    best = logp[:, tok.offsets[0]:tok.offsets[0] + len(ds.item_ids)].topk(10)
    assert torch.equal(items, best.indices)
    assert torch.allclose(scores, best.values, atol=1e-5)


def test_existing_run_needs_resume_flag(tmp_path):
    train.main(tiny_args(tmp_path, "train.epochs=1"))
    with pytest.raises(FileExistsError, match="train.resume=true"):
        train.main(tiny_args(tmp_path, "train.epochs=1"))


def test_demo_config_is_valid():
    cfg = common.load_config(ROOT / "configs" / "demo.yaml", [], train.SECTIONS)
    assert cfg["data"].source == "synthetic"
    for name in ("beauty", "sports", "toys"):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert common.load_config(ROOT / "configs" / f"{name}.yaml", [], train.SECTIONS)["data"].source == "amazon", raw


def test_tiny_latent_run_trains_and_evaluate_reproduces_test(tmp_path):
    metrics = train.main(tiny_args(tmp_path, "train.epochs=1", "train.log_every=5", "sid.epochs=5",
                                   "model.reasoning=latent", "model.latent_steps=2"))
    run = tmp_path / "runs" / "demo"
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0]   # a bar with room below the fall measured once
    assert "reasoning_pos" in torch.load(run / "model.pt", weights_only=True)["model"]
    again = evaluate.main([str(run), "eval.batch_size=7"])
    assert all(again[k] == metrics["test"][k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"))


# ----------------------------------------------------------------------------------------------- host reads


def waits_for_the_device(func, args) -> bool:
    """Does this op read a tensor's value back to the host? item, tolist, int, float and bool of a tensor all end in
    aten._local_scalar_dense; nonzero, masked_select and indexing with a bool mask size their output by the mask's
    values. On a GPU each one waits for the queued work (on a CPU they run alike, so the test sees them here)."""
    if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default):
        return True
    indexing = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default)
    return func in indexing and any(t is not None and t.dtype == torch.bool for t in args[1])


class HostReads(TorchDispatchMode):
    """Counts, by the Python line that asked, the ops that read a tensor's value back to the host
    (waits_for_the_device)."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if waits_for_the_device(func, args):
            frame = next(f for f in traceback.extract_stack()[-2::-1] if "torch" not in Path(f.filename).parts)
            self.where[f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"] += 1
        return func(*args, **(kwargs or {}))


def host_reads_in_quiet_steps(monkeypatch, args) -> collections.Counter:
    """train.main(args) with each train_step that does not log (step % log_every) watched by HostReads, and AdamW
    fused as on CUDA (the for-loop AdamW keeps its step counts on the host and reads them there)."""
    reads, step = collections.Counter(), train.train_step
    monkeypatch.setattr(train, "adamw", lambda groups, lr, device: torch.optim.AdamW(groups, lr, fused=True))

    def watched(run, phase, rows, epoch):
        if (getattr(run, phase.counter) + 1) % run.tcfg.log_every == 0:
            return step(run, phase, rows, epoch)
        with HostReads() as seen:
            step(run, phase, rows, epoch)
        reads.update(seen.where)
        reads["quiet steps"] += 1
    monkeypatch.setattr(train, "train_step", watched)
    train.main(args)
    return reads


@pytest.mark.parametrize("extra", [[], ["model.pause_layout=every_item", "model.reasoning=none", "train.amp=true"]],
                         ids=["pause_target", "none_every_item_amp"])
def test_a_step_that_does_not_log_reads_nothing_back(tmp_path, monkeypatch, extra):
    """A training step that does not log reads no tensor's value on the host (a GPU runs ahead of it), which
    is what lets the device stay busy; the logged steps read the loss."""
    reads = host_reads_in_quiet_steps(monkeypatch, tiny_args(tmp_path, "train.epochs=1", "train.log_every=4",
                                                             "eval.valid_users=20", *extra))
    assert reads.pop("quiet steps") >= 5 and not reads, reads


def test_fused_adamw_agrees_with_the_for_loop_adamw_on_the_cpu():
    """train.adamw is fused on CUDA only. torch's CPU build runs the fused AdamW too, and it agrees with the for-loop
    AdamW to float rounding, not bit for bit (why the CPU keeps the for-loop one): after one step to 1e-7; after 10,
    to 1% of how far the weights moved (the key biases' gradient is 0 up to rounding, which Adam scales up to lr)."""
    assert train.adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, "cpu").defaults["fused"] is False
    cfg = pauserec.ModelConfig(n_layer=2, n_head=2, d_model=16, reasoning="pause", num_pauses=2, dropout=0.0)
    tok = pauserec.Tokens([4, 4], codes=torch.tensor([[i // 4, i % 4] for i in range(16)]))
    g = torch.Generator().manual_seed(0)
    batch = pauserec.collate([pauserec.build_sequence_example(tok, cfg, torch.randint(0, 16, (n,), generator=g)
                                                              .tolist()) for n in (3, 6, 4)])

    def trained(fused, steps):
        torch.manual_seed(0)
        model = pauserec.GPT(cfg, tok.size)
        opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.98), fused=fused)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model.loss(*batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return model.state_dict()
    for steps, atol in ((1, 1e-7), (10, 1e-3)):
        loop, fused = trained(False, steps), trained(True, steps)
        assert any(not torch.equal(loop[k], v) for k, v in fused.items())   # two computations, not one
        for k, v in fused.items():
            torch.testing.assert_close(v, loop[k], rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------------------------- the step's cost


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit, imported by inductor
def test_compiled_training_forward_gives_eager_loss_and_gradients():
    """train.compile (inductor; gcc on a CPU) on a tiny pause model: the compiled forward and backward give eager's
    loss and gradients to float rounding. Dropout 0: a compiled graph draws its own dropout masks."""
    torch.manual_seed(0)
    cfg = pauserec.ModelConfig(n_layer=1, n_head=2, d_model=16, reasoning="pause", num_pauses=2, dropout=0.0,
                               pause_layout="every_item", max_len=64)
    tok = pauserec.Tokens([4, 4], codes=torch.tensor([[i // 4, i % 4] for i in range(16)]))
    model = pauserec.GPT(cfg, tok.size)
    g = torch.Generator().manual_seed(0)
    examples = [pauserec.build_sequence_example(tok, cfg, torch.randint(0, 16, (n,), generator=g).tolist())
                for n in (2, 5, 3)]
    batch = batching.collate(examples, tok.PAD, pad_to=16)

    def loss_and_grads(forward):
        model.zero_grad()
        loss = forward(*batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    compiled = train.training_forward(model, pauserec.training_loss, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    (got, got_grads), (want, want_grads) = loss_and_grads(compiled), loss_and_grads(train.BatchLoss(model))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """train.compile_mode is torch.compile's mode; train.compile=false compiles nothing."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: modes.append(mode) or module)
    model = torch.nn.Linear(2, 2)
    for mode in train.COMPILE_MODES:
        assert isinstance(train.training_forward(model, pauserec.training_loss, True, mode), train.BatchLoss)
    assert isinstance(train.training_forward(model, pauserec.training_loss), train.BatchLoss)
    assert modes == list(train.COMPILE_MODES)


def test_train_seconds_wait_for_the_device(monkeypatch):
    """stop_clock: on CUDA the steps run behind the host, so train_seconds is read only after a device synchronize
    (a clock read at the host's end of a step would miss the queued work); once per stretch of steps, none on a CPU."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append((device, run.train_seconds)))
    monkeypatch.setattr(train.time, "time", lambda: 105.0)
    for device, want in (("cuda:0", [("cuda:0", 1.0)]), ("cpu", [])):
        run = types.SimpleNamespace(device=device, t_train=100.0, train_seconds=1.0)
        synced.clear()
        train.stop_clock(run)
        train.stop_clock(run)   # stopped: no second synchronize, nothing added
        counted = run.train_seconds   # time.time is faked (105.0): exactly the stretch 100 -> 105 added once
        assert synced == want and counted == 6.0 and run.t_train is None
