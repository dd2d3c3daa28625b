"""Sweeps of train.py runs, shared by bench.py and paper.py: train them side by side, reuse the finished ones, sum
them up over seeds; and timing in interleaved rounds (the figures of both scripts), its batches, the profiler."""
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

import batching
import common
import data
import pauserec


def train_runs(args, runs):
    """Train every run [(name, folder name, train.py arguments)]: one after another in this process (--jobs 1), or
    as --jobs concurrent `python train.py` processes (many cores, or one GPU that a single small model leaves idle);
    their logs go to args.out/<folder name>.log."""
    import train  # the scripts beside train.py drive it; nothing imports them
    if args.jobs == 1:
        for _, _, run_args in runs:
            train.main(run_args)
        return
    pending, active = list(runs), []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    while pending or active:
        while pending and len(active) < args.jobs:
            _, slug, run_args = pending.pop(0)
            run_args = job_threads(run_args, args.jobs, cpus)
            log = Path(args.out) / f"{slug}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as out:   # the child holds its own copy of the file
                proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("train.py")), *run_args],
                                        stdout=out, stderr=subprocess.STDOUT)
            active.append((proc, log))
        time.sleep(1)
        for proc, log in [a for a in active if a[0].poll() is not None]:
            active.remove((proc, log))
            if proc.returncode:
                sys.exit(f"training failed (exit {proc.returncode}), see {log}")
            print(f"done: {log}", flush=True)


def job_threads(run_args, jobs: int, cpus: int) -> list[str]:
    """The train.py arguments of a run trained beside jobs - 1 others: where its config leaves train.threads at 0
    (torch's default, every core in every process), it gets its share of the cpus cores, so that runs side by side
    (on the CPU, or several on one GPU, each fed by its host thread) do not oversubscribe them."""
    if jobs == 1 or run_config(run_args)["train"].threads:
        return run_args
    return [*run_args, f"train.threads={max(1, cpus // jobs)}"]


def mean_std(values):
    """Mean and sample standard deviation (0 for one value), rounded."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 6), "std": round(std, 6)}


def over_seeds(metrics):
    """metrics.json of runs that differ by seed -> {"valid"|"test": {metric: {"mean", "std"}}, "train_seconds": ..}
    over every ranking metric (recall@K, ndcg@K for each eval.ks) of the valid and test splits."""
    out = {split: {k: mean_std([m[split][k] for m in metrics]) for k in metrics[0][split] if "@" in k}
           for split in ("valid", "test")}
    out["train_seconds"] = mean_std([m["train_seconds"] for m in metrics])
    return out


def run_config(run_args):
    """The resolved config of a train.py argument list [CONFIG, key=value, ...]."""
    import train
    return common.load_config(run_args[0], run_args[1:], train.SECTIONS)


def finished(run_dir, run_args, ignore=()):
    """True when run_dir holds a finished run of these settings (where files live and the device aside):
    a bench that was interrupted, or whose modes were trained elsewhere (in parallel, on another machine),
    goes on from there. A run of other settings is an error; `ignore`: more 'section.key' names that may differ."""
    if not (run_dir / "metrics.json").is_file():
        return False
    resolved = {k: asdict(v) for k, v in run_config(run_args).items()}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    diff = common.changed_settings(saved, resolved, sections=resolved, ignore={*common.RUN_KEYS, *ignore})
    if diff:
        raise ValueError(f"{run_dir} holds a run with other settings ({'; '.join(diff)}): "
                         f"pass another --out")
    print(f"reusing the finished run {run_dir}")
    return True


def check_counts(args, command):
    for key in ("jobs", "seeds"):
        if getattr(args, key) < 1:
            raise ValueError(f"{command}: --{key} must be >= 1, got {getattr(args, key)}")


def interleaved_seconds(fns, reps=3):
    """Seconds of each call of each fn ([reps] per fn): all warmed up once, then `reps` rounds that call each fn
    in turn, so a machine that speeds up or slows down over time (clocks, other load) shifts every fn alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns, reps=3):
    """Median seconds of each fn, timed in interleaved rounds (interleaved_seconds)."""
    return [statistics.median(t) for t in interleaved_seconds(fns, reps)]


def median_seconds(fn, reps=3):
    return interleaved_medians([fn], reps)[0]


def optimizer_step(model, device, weight_decay, loss_fn=None, amp: bool = False, compile: bool = False,
                   compile_mode: str = "default"):
    """step(ids, loss_mask): one training step of model (forward, backward, AdamW) over the parameters that require
    grad, in train.param_groups' groups as train.py makes them: frozen weights get no gradient and no update.
    loss_fn(model, ids, loss_mask): pauserec.training_loss unless given (stages.text_loss for a stage); amp: bf16
    autocast of the forward, as train.amp; compile, compile_mode: the forward compiled as train.compile compiles it
    (the first step of each new batch shape then includes compiling). The batch is copied as train.py copies it."""
    import train
    model.train()
    forward = train.training_forward(model, loss_fn or pauserec.training_loss, compile, compile_mode)
    opt = train.adamw(train.param_groups(model, weight_decay), 1e-4, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp)

    def step(ids, loss_mask):
        if compile and compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # as train.train_step
        with autocast:
            loss = forward(*batching.to_device((ids, loss_mask), device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def synchronize(device):
    """Wait for the accelerator's queued work, so that a timer around it counts it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile(step, batches, device, path) -> str:
    """step(*batch) for each of batches under torch.profiler (the CPU's ops, and on CUDA the kernels), saved to path
    as a Chrome trace (chrome://tracing, ui.perfetto.dev); returns the table of the 15 ops of most self time (the
    device's on CUDA: launch overhead shows as the gap between the two)."""
    from torch.profiler import ProfilerActivity
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches:
            step(*batch)
        synchronize(device)
    prof.export_chrome_trace(str(path))
    return prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15)


def training_batches(tok, mcfg, ds, max_history, batch_size, steps, batch_tokens=0, pad_to=0):
    """(batches, tokens): up to `steps` batches [(ids, loss_mask)] of the run's size, built as train.py builds them
    (its examples, its shuffled length-sorted or token-budgeted batches, padded to train.pad_to), and each batch's
    real tokens (padding not counted). Token-budgeted batches are cut from all the data (their rows vary), others
    from enough of it."""
    if not batch_tokens:
        ds = ds._replace(sequences=ds.sequences[: 4 * steps * batch_size])   # enough examples for `steps` batches
    split = data.leave_one_out(ds.sequences, max_history)
    examples = batching.training_examples(tok, mcfg, ds, split, max_history, random.Random(0))
    order = batching.batches(examples, batch_size, torch.Generator().manual_seed(0), batch_tokens, pad_to)[:steps]
    return ([batching.collate([examples[i] for i in rows], tok.PAD, pad_to) for rows in order],
            [sum(len(examples[i][0]) for i in rows) for rows in order])
