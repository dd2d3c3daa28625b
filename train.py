"""Train PauseRec end to end: data -> Semantic IDs -> decoder with pause tokens -> validation -> test.

    python train.py configs/demo.yaml                       # synthetic data, a few minutes on a CPU
    python train.py configs/beauty.yaml data.dir=PATH       # Amazon Beauty
    python train.py configs/beauty.yaml train.resume=true   # continue an interrupted run
    torchrun --nproc_per_node=4 train.py configs/beauty.yaml data.dir=PATH   # data parallel on 4 GPUs
    python train.py --help                                  # every config key, its default and meaning

Writes runs/<name>/: config.yaml, sids.pt, model.pt (best on validation, eval.select: NDCG@10), last.pt (for resume),
log.jsonl and metrics.json. The test split is evaluated once, at the end, with the best checkpoint --
with train.refit_epochs > 0, after that checkpoint has also trained on the validation targets (model.pt is
then the refit model, and model_valid.pt the checkpoint chosen on validation).
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

import backbones
import data
import evaluate
import pauserec
import sid


@dataclass
class TrainConfig:
    name: str = ""               # run folder runs/<name>; default: the config file's name
    out_dir: str = "runs"        # run folders are <out_dir>/<name>
    sid_cache: str = "cache/sids"  # SID tables cached by their data and sid settings
    seed: int = 0                # seeds init, dropout and batch order
    device: str = "auto"         # auto | cpu | cuda | cuda:N | mps (under torchrun: cuda:LOCAL_RANK)
    threads: int = 0             # torch.set_num_threads (0: leave torch's default)
    epochs: int = 40             # the cosine schedule spans all of them
    batch_size: int = 32         # training sequences per step (every_item: whole sequences, ~7 targets each)
    lr: float = 2e-3             # AdamW peak learning rate (after warmup)
    min_lr: float = 1e-5         # cosine decay ends here
    warmup_steps: int = 200      # linear warmup from 0 to lr
    weight_decay: float = 0.1    # AdamW decay of the matrices (weights, embeddings); none on biases, norms
    grad_clip: float = 1.0       # max gradient norm (all parameters together)
    patience: int = 0            # stop after this many validations without a better eval.select (0: never;
                                 #   the best usually comes as the cosine schedule ends)
    log_every: int = 50          # steps between loss records (log.jsonl, bar; a printed line if stdout is no TTY)
    resume: bool = False         # continue runs/<name>/last.pt
    amp: bool = False            # bf16 autocast in the training forward (meant for CUDA; works on CPU)
    compile: bool = False        # torch.compile the training forward (evaluation runs uncompiled)
    refit_epochs: int = 4        # after choosing the checkpoint on validation, train it this many epochs more on
                                 #   sequences that keep their validation item (what the test input and the
                                 #   Markov baseline see), then test; 0: test the chosen checkpoint as it is
    refit_lr: float = 5e-4       # the refit's peak lr (fresh AdamW state, warmup_steps, cosine to min_lr)


SECTIONS = {"data": data.DataConfig, "sid": sid.SIDConfig, "model": pauserec.ModelConfig,
            "eval": evaluate.EvalConfig, "train": TrainConfig}


def check_train_config(cfg: TrainConfig):
    for key in ("epochs", "batch_size", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("lr", "grad_clip", "refit_lr"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"train.{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("min_lr", "warmup_steps", "weight_decay", "patience", "threads", "refit_epochs"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"train.{key} must be >= 0, got {getattr(cfg, key)}")
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", cfg.device):
        raise ValueError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but torch sees no CUDA device")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"train.device={name} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device=mps but torch sees no MPS device")
    return name


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# SID table, cached by everything that determines it

def sid_table(cfg, ds, cache_dir: Path):
    settings = {"data": asdict(cfg["data"]), "sid": asdict(cfg["sid"]), "items": len(ds.item_ids)}
    for key in ("dir", "download", "cache_dir", "max_history", "ties", "sample_users"):   # SIDs: item texts only
        settings["data"].pop(key)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"sids-{key}.pt"
    if path.is_file():
        codes, _, health = sid.load_sids(path, len(ds.item_ids))
        print(f"SID table loaded from {path}")
    else:
        codes, health = sid.build_sids(ds.item_text, cfg["sid"], [m["category"] for m in ds.item_meta])
        cache_dir.mkdir(parents=True, exist_ok=True)
        sid.save_sids(path, codes, settings, health)
    return codes, settings, health


def fetch_hf(mcfg):
    """Fetch the files that model.hf_dir lacks from model.hf_url (e.g. a Hugging Face hub repository):
    config.json, then the first weights form the server has (a sharded checkpoint's index, then the shards
    it names) and, for titled prompts, the first tokenizer form."""
    folder = Path(mcfg.hf_dir)
    needs = {"weights": backbones.WEIGHT_FILES}
    if mcfg.prompt != "sids":
        needs["a tokenizer"] = backbones.TOKENIZER_FILES
    missing = [what for what, forms in needs.items() if not backbones.has_files(folder, forms)]
    has_config = (folder / "config.json").is_file()
    missing = ([] if has_config else ["config.json"]) + missing
    if missing and not mcfg.hf_url:
        raise FileNotFoundError(f"model.hf_dir={folder} lacks {', '.join(missing)}: put a Hugging Face model "
                                f"folder there, or set model.hf_url to fetch it")
    if not has_config:
        fetch_one(mcfg, "config.json")
    for forms in needs.values():
        if not backbones.has_files(folder, forms):
            fetch_first(mcfg, forms)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (folder / shard).is_file():
                fetch_one(mcfg, shard)


def fetch_first(mcfg, forms):
    """Fetch the first of `forms` (tuples of file names) that the server has all of."""
    errors = []
    for names in forms:
        try:
            for name in names:
                fetch_one(mcfg, name)
            return
        except OSError as e:
            errors.append(str(e))
    raise OSError(f"model.hf_dir={mcfg.hf_dir}: none of {[' + '.join(f) for f in forms]} could be fetched "
                  f"from model.hf_url (offline?): {errors[0]}")


def fetch_one(mcfg, name):
    try:
        data.download(f"{mcfg.hf_url.rstrip('/')}/{name}", Path(mcfg.hf_dir) / name, desc=name)
    except OSError as e:
        raise OSError(f"model.hf_dir={mcfg.hf_dir} lacks {name} and fetching it failed (offline?): {e}") from e


# ----------------------------------------------------------------------------------------------
# Training examples: token ids and loss masks, built once

def training_examples(tok, mcfg, ds, split, max_history, rng, refit=False):
    """[(ids, loss_mask)] for the training targets of every user (refit: and the validation targets).

    Layout 'every_item' trains all of a user's positions in one sequence: the training part of each
    sequence (all but the last two items; refit: all but the last) is cut into windows of max_history + 1 items.
    """
    if mcfg.pause_layout == "every_item":
        out = []
        for seq in data.train_part(ds.sequences, "test" if refit else "valid"):
            for end in range(len(seq), 1, -max_history):
                out.append(pauserec.build_sequence_example(tok, mcfg, seq[max(0, end - max_history - 1):end]))
        return out
    targets = split["train"] + (split["valid"] if refit else [])
    rationales = None
    if mcfg.reasoning == "cot":
        rationales = pauserec.example_rationales(tok, mcfg, targets, ds.item_meta, rng)
    return [pauserec.build_example(tok, mcfg, ex.history, ex.target, rationales[i] if rationales else None)
            for i, ex in enumerate(targets)]


def batches(examples, batch_size, generator):
    """Shuffled batches of similar length (sorted within chunks of 64 batches): less padding."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    chunk = 64 * batch_size
    out = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    shuffle = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in shuffle]


def lr_at(step, total, cfg: TrainConfig):
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def changed_settings(saved: dict, resolved: dict, sections=("data", "sid", "model"), ignore=()) -> list[str]:
    """'section.key: old -> new' for every setting of `sections` that differs from a saved config.yaml.
    Where files live (data.dir, model.hf_dir, *_url, data.download) may change; keys new since, and the
    'section.key' names in `ignore`, are skipped."""
    return [f"{s}.{k}: {saved[s][k]!r} -> {v!r}" for s in sections for k, v in resolved[s].items()
            if k in saved.get(s, {}) and saved[s][k] != v and f"{s}.{k}" not in ignore
            and not (k in ("dir", "download") or k.endswith(("_dir", "_url")))]


# What a resumed run may change: where it runs, where its files live, how often it logs, the evaluation batch.
# Anything else (the schedule: epochs, batch_size, lr, ..; the seed; eval.select, ks, every) would break the
# epoch arithmetic of last.pt's step, or compare its `best` with another metric.
RESUME_MAY_CHANGE = ("train.name", "train.out_dir", "train.sid_cache", "train.device", "train.threads",
                     "train.resume", "train.log_every", "eval.batch_size")


def check_resume(run_dir: Path, resolved: dict):
    """last.pt continues only the run it was saved by: name every setting that changed (RESUME_MAY_CHANGE aside)."""
    changed = changed_settings(yaml.safe_load((run_dir / "config.yaml").read_text()), resolved,
                               ("data", "sid", "model", "eval", "train"), RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"{run_dir / 'last.pt'} comes from another config ({'; '.join(changed)}): resume with "
                         f"the saved settings, or start a new run with train.name=<other>")


# ----------------------------------------------------------------------------------------------
# Distributed data parallel: `torchrun --nproc_per_node=N train.py ...` runs this script N times.
# Every rank holds all data and the same model; each step splits the batch across ranks, DDP averages
# the gradients, and rank 0 alone writes files and prints.

def init_distributed(device: str):
    """(rank, world size, device); a plain `python train.py` (no torchrun environment) is rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = pick_device(f"cuda:{os.environ['LOCAL_RANK']}")  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank:
        sys.stdout = open(os.devnull, "w")  # silences print and tqdm.write
    return rank, world, device


class BatchLoss(torch.nn.Module):
    """model.loss as a forward(): DDP and torch.compile hook forward(), not other methods."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, loss_mask):
        return self.model.loss(ids, loss_mask)


def shard(rows, examples, rank, world):
    """This rank's rows of a batch and the weight of their mean loss. DDP averages gradients over ranks,
    so weighting by world * (the rank's supervised tokens) / (the batch's) makes the step the same as one
    process taking the whole batch. A rank left without rows (short last batch) takes one at weight 0."""
    if world == 1:
        return rows, 1.0
    if len(rows) <= rank:
        return rows[:1], 0.0
    supervised = [sum(examples[i][1][1:]) for i in rows]   # loss_mask[1:]: the tokens the loss averages
    return rows[rank::world], world * sum(supervised[rank::world]) / sum(supervised)


# ----------------------------------------------------------------------------------------------

def check_run_dir(run_dir: Path, resume: bool, resolved: dict):
    """A new run needs a folder without a run in it; a resumed one needs last.pt of the same settings."""
    last_path = run_dir / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"train.resume=true but {last_path} does not exist: drop train.resume=true "
                                f"to start the run, or pass the train.name of the run to continue")
    if not resume and last_path.is_file():
        raise FileExistsError(f"{run_dir} holds a run already: pass train.resume=true to continue it, "
                              f"or train.name=<other> to start a new one")
    if resume:
        check_resume(run_dir, resolved)


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(data.cli_help(__doc__, SECTIONS))
        return None
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"{'missing CONFIG' if not argv else f'unknown option {argv[0]}'}: usage: "
                         f"python train.py CONFIG [section.key=value ...] (--help lists the keys)")
    # --- config: every check that needs no data runs before the config is printed -----------------
    cfg = data.load_config(argv[0], argv[1:], SECTIONS)
    tcfg, mcfg, ecfg = cfg["train"], cfg["model"], cfg["eval"]
    check_train_config(tcfg)
    evaluate.check_eval_config(ecfg)
    data.check_data_config(cfg["data"])
    tcfg.name = tcfg.name or Path(argv[0]).stem
    run_dir = Path(tcfg.out_dir) / tcfg.name
    resolved = {name: asdict(section) for name, section in cfg.items()}
    rank, world, device = init_distributed(pick_device(tcfg.device))
    last_path = run_dir / "last.pt"
    check_run_dir(run_dir, tcfg.resume, resolved)
    if cfg["data"].source == "amazon":
        data.find_files(cfg["data"])   # a missing folder or file is named now, not after the config dump
    print(yaml.safe_dump(resolved, sort_keys=False))
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)

    # --- data and Semantic IDs -----------------------------------------------------------------
    t0 = time.time()
    ds = data.load_dataset(cfg["data"])
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)
    print(f"data: {data.summary(ds)} ({time.time() - t0:.1f}s)")
    if rank > 0:
        dist.barrier()  # rank 0 builds (or loads) the cached SID table first, then the others load it
    codes, sid_settings, sid_health = sid_table(cfg, ds, Path(tcfg.sid_cache))
    if world > 1 and rank == 0:
        dist.barrier()
    print(f"SIDs: {json.dumps(sid_health)}")
    words = pauserec.rationale_words(ds.item_meta, mcfg.rationale_file) if mcfg.reasoning == "cot" else []
    if mcfg.backbone != "scratch":
        fetch_hf(mcfg)
    tok = pauserec.make_tokens(mcfg, codes, words, ds.item_meta)
    trie = pauserec.SIDTrie(codes)
    rng = random.Random(tcfg.seed)
    examples = training_examples(tok, mcfg, ds, split, cfg["data"].max_history, rng)
    refit_examples = training_examples(tok, mcfg, ds, split, cfg["data"].max_history, rng, refit=True) \
        if tcfg.refit_epochs else []
    valid = split["valid"]
    if 0 < ecfg.valid_users < len(valid):   # a fixed sample, the same at every validation
        valid = [valid[i] for i in sorted(random.Random(tcfg.seed).sample(range(len(valid)), ecfg.valid_users))]

    # --- model and optimizer -------------------------------------------------------------------
    model = pauserec.make_model(mcfg, tok).to(device)   # gpt2: pretrained weights, our tokens' rows appended
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {tok.size}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    wd = 0.0 if mcfg.train_only_new_tokens else tcfg.weight_decay  # decay would shrink the frozen GPT-2 rows
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(examples) / tcfg.batch_size)
    total_steps = tcfg.epochs * steps_per_epoch
    refit_steps_per_epoch = math.ceil(len(refit_examples) / tcfg.batch_size)
    refit_total = tcfg.refit_epochs * refit_steps_per_epoch
    step, refit_step, best, bad_evals, train_seconds, train_tokens = 0, 0, -1.0, 0, 0.0, 0
    if tcfg.resume:
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, bad_evals = state["step"], state["best"], state["bad_evals"]
        refit_step = state.get("refit_step", 0)
        train_seconds, train_tokens = state["train_seconds"], state["train_tokens"]
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[rank] if len(ranks) == world else state["rng"])
        print(f"resumed from {last_path} at step {step}")
    train_loss = BatchLoss(model)   # the training forward: model.loss, optionally compiled and under DDP
    if tcfg.compile:
        train_loss = torch.compile(train_loss)
    if world > 1:
        train_loss = torch.nn.parallel.DistributedDataParallel(train_loss)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=tcfg.amp)

    # --- the run folder: written only now that config, data and checkpoint have passed every check --
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not tcfg.resume:
            (run_dir / "log.jsonl").unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        sid.save_sids(run_dir / "sids.pt", codes, sid_settings, sid_health)

    def checkpoint():
        rngs = [rng_state()] * world
        if world > 1:  # every rank's own dropout stream, so that a resumed DDP run replays them all
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "refit_step": refit_step, "best": best, "bad_evals": bad_evals, "train_seconds": train_seconds,
                         "train_tokens": train_tokens, "rng": rng_state(), "rng_ranks": rngs}, last_path)

    def log(record):
        if rank == 0:
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(exs, rows, lr, counter, n, epoch):
        """One optimizer step on rows of exs, the n-th of `counter` ("step" | "refit_step"); every log_every
        steps the loss goes to the bar and log.jsonl."""
        nonlocal train_seconds, train_tokens, tokens, t_log
        t_step = time.time()
        train_loss.train()
        mine, weight = shard(rows, exs, rank, world)   # all rows when world == 1
        ids, loss_mask = pauserec.collate([exs[i] for i in mine], tok.PAD)
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = train_loss(ids, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        real_tokens = sum(len(exs[i][0]) for i in rows)  # the whole batch, on every rank
        tokens, train_tokens = tokens + real_tokens, train_tokens + real_tokens
        train_seconds += time.time() - t_step
        bar.update(1)
        if n % tcfg.log_every == 0:
            if world > 1:  # the whole batch's mean loss, as one process would log it
                loss = (loss * weight).detach()
                dist.all_reduce(loss)
                loss /= world
            rate = tokens / (time.time() - t_log)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
            log({counter: n, "epoch": epoch, "loss": round(loss.item(), 4), "lr": lr, "tokens_per_s": round(rate)})
            if not sys.stdout.isatty():   # a batch job's log: no bar there (tqdm hides it), so one line instead
                print(f"{counter} {n}/{total_steps if counter == 'step' else refit_total} epoch {epoch} "
                      f"loss {loss.item():.4f} lr {lr:.2e} tokens/s {rate:.0f}", flush=True)
            tokens, t_log = 0, time.time()

    # --- training loop -------------------------------------------------------------------------
    eval_every = ecfg.every or steps_per_epoch
    stop = bool(tcfg.patience and bad_evals >= tcfg.patience)   # a resumed run that had stopped early
    if stop:
        print(f"{last_path}: the run stopped early at step {step}; no more main-phase training")
    bar = tqdm(total=total_steps + refit_total, initial=step + refit_step, desc="train",
               disable=None if rank == 0 else True)
    tokens, t_log = 0, time.time()
    while step < total_steps and not stop:
        epoch, skip = divmod(step, steps_per_epoch)
        # The order of an epoch depends only on (seed, epoch): a resumed run replays it exactly.
        order = batches(examples, tcfg.batch_size, torch.Generator().manual_seed(tcfg.seed * 1000 + epoch))
        for rows in order[skip:]:
            train_step(examples, rows, lr_at(step, total_steps, tcfg), "step", step + 1, epoch)
            step += 1
            if step % eval_every == 0 or step == total_steps:
                metrics = evaluate.evaluate_model(model, tok, mcfg, trie, valid, ecfg, device, "valid", rank, world)
                better = metrics[ecfg.select] > best
                best, bad_evals = (metrics[ecfg.select], 0) if better else (best, bad_evals + 1)
                if better and rank == 0:
                    atomic_save({"model": model.state_dict(), "words": words,
                                 "step": step}, run_dir / "model.pt")
                log({"step": step, "epoch": epoch, "valid": metrics, "best": better})
                tqdm.write(f"step {step} valid {json.dumps(metrics)}{'  (best)' if better else ''}")
                checkpoint()
                tokens, t_log = 0, time.time()
                if tcfg.patience and bad_evals >= tcfg.patience:
                    tqdm.write(f"early stop: {bad_evals} validations without improvement")
                    stop = True
                    break

    # --- refit: the chosen checkpoint also learns the validation targets (no validation from here on) --
    if world > 1:
        dist.barrier()  # model.pt is written by rank 0
    if refit_total and refit_step == 0:   # start: the checkpoint chosen on validation, a fresh optimizer
        if rank == 0:
            shutil.copyfile(run_dir / "model.pt", run_dir / "model_valid.pt")
        model.load_state_dict(torch.load(run_dir / "model.pt", map_location=device, weights_only=True)["model"])
        optimizer.state.clear()
    refit_cfg = replace(tcfg, lr=tcfg.refit_lr)
    while refit_step < refit_total:
        epoch, skip = divmod(refit_step, refit_steps_per_epoch)
        order = batches(refit_examples, tcfg.batch_size,   # refit epochs number on after the main ones
                        torch.Generator().manual_seed(tcfg.seed * 1000 + tcfg.epochs + epoch))
        for rows in order[skip:]:
            train_step(refit_examples, rows, lr_at(refit_step, refit_total, refit_cfg),
                       "refit_step", refit_step + 1, tcfg.epochs + epoch)
            refit_step += 1
        checkpoint()
    # model.pt is replaced only once last.pt holds the refit's end: a resume never mistakes it for the chosen one
    if refit_total and rank == 0:
        chosen_step = torch.load(run_dir / "model_valid.pt", weights_only=True)["step"]
        atomic_save({"model": model.state_dict(), "words": words, "step": chosen_step,
                     "refit_epochs": tcfg.refit_epochs}, run_dir / "model.pt")
    bar.close()

    # --- validation (all users) of the chosen checkpoint; test, once, with model.pt -----------------
    if world > 1:
        dist.barrier()  # model.pt is written by rank 0
    best_state = torch.load(run_dir / "model.pt", map_location=device, weights_only=True)   # the model tested
    chosen_state = torch.load(run_dir / "model_valid.pt", map_location=device, weights_only=True) \
        if refit_total else best_state
    model.load_state_dict(chosen_state["model"])
    valid_full = evaluate.evaluate_model(model, tok, mcfg, trie, split["valid"], ecfg, device, "valid", rank, world)
    model.load_state_dict(best_state["model"])
    test = evaluate.evaluate_model(model, tok, mcfg, trie, split["test"], ecfg, device, "test", rank, world)
    metrics = {"valid": valid_full, "test": test,
               "baselines": evaluate.baseline_metrics(ds.sequences, "test", ecfg.ks),
               "baselines_valid": evaluate.baseline_metrics(ds.sequences, "valid", ecfg.ks),
               "train_seconds": round(train_seconds, 1), "train_tokens": train_tokens,
               "best_step": best_state["step"], "steps": step, "steps_per_epoch": steps_per_epoch,
               "refit_steps": refit_step, "ties": cfg["data"].ties,
               "sid": sid_health}
    if rank == 0:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(evaluate.results_table({"model": test, **metrics["baselines"]}, ecfg.ks, run_dir / "metrics.json"))
    print(json.dumps({"test": test, "markov": metrics["baselines"]["markov"], "run": str(run_dir)}))
    return metrics


if __name__ == "__main__":
    data.run_cli(main, sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
