"""Train PauseRec end to end: data -> Semantic IDs -> decoder with pause tokens -> validation -> test.

    python train.py configs/demo.yaml                       # synthetic data, a few minutes on a CPU
    python train.py configs/beauty.yaml data.dir=PATH       # Amazon Beauty
    python train.py configs/beauty.yaml train.resume=true   # continue an interrupted run
    torchrun --nproc_per_node=4 train.py configs/beauty.yaml data.dir=PATH   # data parallel on 4 GPUs
    python train.py --help                                  # every config key, its default and meaning
    python train.py CONFIG train.task=align                 # a stage of the paper's pipeline (stages.py)

Writes runs/<name>/: config.yaml, sids.pt, model.pt (best on validation, eval.select: NDCG@10), last.pt (for resume),
log.jsonl and metrics.json. The test split is evaluated once, at the end, with the best checkpoint --
with train.refit_epochs > 0, after that checkpoint has also trained on the validation targets (model.pt is
then the refit model, and model_valid.pt the checkpoint chosen on validation).
"""
import hashlib
import json
import math
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
import batching
import common
import data
import ddp
import evaluate
import pauserec
import rationales
import sid
import stages
from model import ModelConfig


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
    batch_tokens: int = 0        # > 0: batches of similar-length examples, rows x longest row <= this, not batch_size
    pad_to: int = 0              # > 0: each batch's length padded up to a multiple of this (it must divide
                                 #   model.max_len): a few shapes for train.compile; batch_tokens counts the padding
    lr: float = 2e-3             # AdamW peak learning rate (after warmup)
    min_lr: float = 1e-5         # cosine decay ends here
    warmup_steps: int = 200      # linear warmup from 0 to lr, counted in steps (Adam's moments settle per step) ..
    max_warmup_share: float = 0.25  # .. but over at most this share of a phase's steps: token-budgeted batches
                                 #   (thousands of tokens a step) make few steps, and a short phase (the refit, a
                                 #   stage) would be mostly warmup. The lr stays as set (fewer, larger steps may want
                                 #   a higher one: not measured here)
    weight_decay: float = 0.1    # AdamW decay of the matrices (weights, embeddings); none on biases, norms
    grad_clip: float = 1.0       # max gradient norm (all parameters together)
    patience: int = 0            # stop after this many validations without a better eval.select (0: never;
                                 #   the best usually comes as the cosine schedule ends)
    log_every: int = 50          # steps between loss records (log.jsonl, bar; a printed line if stdout is no TTY)
    resume: bool = False         # continue runs/<name>/last.pt
    amp: bool = False            # bf16 autocast in the training forward (meant for CUDA; works on CPU)
    compile: bool = False        # torch.compile the training forward (evaluation runs uncompiled)
    compile_mode: str = "default"  # train.compile's mode: default | reduce-overhead (CUDA graphs: needs few shapes,
                                 #   train.pad_to) | max-autotune-no-cudagraphs
    refit_epochs: int = 4        # after choosing the checkpoint on validation, train it this many epochs more on
                                 #   sequences that keep their validation item (what the test input and the
                                 #   Markov baseline see), then test; 0: test the chosen checkpoint as it is
    refit_lr: float = 5e-4       # the refit's peak lr (fresh AdamW state, warmup_steps, cosine to min_lr)
    # fine-tuning a pretrained backbone (docs/RESULTS.md: what each setting does on SmolLM2)
    backbone_lr_ratio: float = 1.0  # the backbone's weights train at this times the phase's lr (lr, refit_lr,
                                 #   align_lr); our rows (new_rows, pause slots, latent step embeddings) at the lr
    frozen_epochs: int = 0       # the first epochs of next-item training train only our rows (backbone frozen);
                                 #   then the backbone joins, with its own warmup and cosine over the rest
    align_frozen_epochs: int = 0  # the same for train.task=align (all align_epochs: GTI's grounding)
    # the paper's stages before SFT (stages.py; pretrained backbones, one process, no validation or test)
    task: str = "rec"            # rec: next-item training | align: SID <-> text alignment texts | pause_pretrain:
                                 #   those texts with <pause> inserted
    align_lr: float = 1e-4       # align: peak lr (warmup_steps, cosine to min_lr)
    align_epochs: int = 3        # align: epochs over the texts
    pause_lr: float = 1e-3       # pause_pretrain: peak lr of the <pause> row
    pause_epochs: int = 2        # pause_pretrain: epochs over the texts
    pause_rate: float = 0.1      # pause_pretrain: chance of a <pause> before each token of a text
    pause_trains: str = "row"    # pause_pretrain: row: the <pause> row alone (the paper's) | model: every weight but
                                 #   the text rows, the backbone at backbone_lr_ratio x pause_lr (Goyal et al.'s)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SECTIONS = {"data": data.DataConfig, "sid": sid.SIDConfig, "model": ModelConfig,
            "eval": evaluate.EvalConfig, "train": TrainConfig}


def check_train_config(cfg: TrainConfig, mcfg: ModelConfig):
    for key in ("epochs", "batch_size", "log_every", "align_epochs", "pause_epochs"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("lr", "grad_clip", "refit_lr", "align_lr", "pause_lr"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"train.{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("min_lr", "warmup_steps", "weight_decay", "patience", "threads", "refit_epochs", "backbone_lr_ratio",
                "frozen_epochs", "align_frozen_epochs", "batch_tokens", "pad_to"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"train.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.task not in ("rec", "align", "pause_pretrain"):
        raise ValueError(f"train.task must be rec | align | pause_pretrain, got {cfg.task!r}")
    if cfg.pause_trains not in ("row", "model"):
        raise ValueError(f"train.pause_trains must be row | model, got {cfg.pause_trains!r}")
    if cfg.pad_to and mcfg.max_len % cfg.pad_to:   # a batch padded past max_len would have no positions
        raise ValueError(f"train.pad_to ({cfg.pad_to}) must divide model.max_len ({mcfg.max_len})")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be {' | '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if not 0.0 < cfg.max_warmup_share <= 1.0:
        raise ValueError(f"train.max_warmup_share must be in (0, 1], got {cfg.max_warmup_share}")
    if not 0.0 <= cfg.pause_rate < 1.0:
        raise ValueError(f"train.pause_rate must be in [0, 1), got {cfg.pause_rate}")
    tuning = {"backbone_lr_ratio": 1.0, "frozen_epochs": 0, "align_frozen_epochs": 0}
    if mcfg.backbone == "scratch" and (keys := [k for k, v in tuning.items() if getattr(cfg, k) != v]):
        raise ValueError(f"train.{keys[0]}={getattr(cfg, keys[0])} needs a pretrained model.backbone")
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


# ----------------------------------------------------------------------------------------------
# The schedule

def lr_at(step, total, cfg: TrainConfig):
    """Linear warmup over warmup_steps (at most max_warmup_share of the total), then cosine decay from lr to min_lr at
    the last step."""
    warmup = min(cfg.warmup_steps, math.ceil(cfg.max_warmup_share * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# The training forward

class BatchLoss(torch.nn.Module):
    """A batch loss as a forward(): DDP and torch.compile hook forward(), not other functions. loss_fn:
    pauserec.training_loss, or stages.text_loss (train.task align | pause_pretrain: softmax over all tokens)."""

    def __init__(self, model, loss_fn=pauserec.training_loss):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, ids, loss_mask):
        return self.loss_fn(self.model, ids, loss_mask)


def training_forward(model, loss_fn, compile: bool = False, mode: str = "default"):
    """BatchLoss, compiled with train.compile (train.compile_mode): recompiled once when the batch shape first changes,
    then with dynamic shapes (CUDA graphs record one per shape)."""
    forward = BatchLoss(model, loss_fn)
    return torch.compile(forward, mode=mode) if compile else forward


# ----------------------------------------------------------------------------------------------
# The phases of a run, in order; each reads and writes the Run they share

class Run:
    """What the phases share. setup: the configs, the run folder, this process's rank, world size and device,
    the dataset. prepare: split, SIDs (codes, their settings and health), rationale words, tokens, trie, the
    training examples (refit: with the validation targets), the validation users. build: model, optimizer,
    the training forward (train_loss) and autocast. fit: the counters below, saved in last.pt."""

    def __init__(self, cfg: dict, run_dir: Path, rank: int, world: int, device: str):
        self.cfg, self.run_dir, self.rank, self.world, self.device = cfg, run_dir, rank, world, device
        self.tcfg, self.mcfg, self.ecfg = cfg["train"], cfg["model"], cfg["eval"]
        self.resolved = {name: asdict(section) for name, section in cfg.items()}   # written as config.yaml
        self.step = self.refit_step = self.bad_evals = self.train_tokens = 0   # optimizer steps; tokens trained on
        self.best, self.train_seconds = -1.0, 0.0      # best validation eval.select; seconds in training steps
        self.t_train = None                            # when the running stretch of steps began (stop_clock)
        self.stop = False                              # early stop (train.patience)
        self.tokens, self.t_log = 0, 0.0               # tokens since the last loss record, and its time
        self.last_loss = None                          # the last step's loss (a stage's metrics.json)


def parse_args(argv) -> tuple[dict, Path]:
    """The config (every check that needs no data) and the run folder, from the command line."""
    parser = common.Parser(__doc__, SECTIONS, prog="train.py")
    parser.add_argument("config", metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value")
    args = parser.parse_args(argv)
    cfg = common.load_config(args.config, args.overrides, SECTIONS)
    check_train_config(cfg["train"], cfg["model"])
    evaluate.check_eval_config(cfg["eval"])
    data.check_data_config(cfg["data"])
    cfg["train"].name = cfg["train"].name or Path(args.config).stem
    return cfg, Path(cfg["train"].out_dir) / cfg["train"].name


def setup(argv) -> Run:
    """Config, run folder and data checked (a user error is one line before anything is printed), then the
    config printed and the seeds set."""
    cfg, run_dir = parse_args(argv)
    run = Run(cfg, run_dir, *ddp.init_distributed(pick_device(cfg["train"].device)))
    if run.world > 1 and run.tcfg.task != "rec":
        raise ValueError(f"train.task={run.tcfg.task} runs in one process: start it with python, not torchrun")
    if run.world > 1 and run.tcfg.frozen_epochs:   # DDP fixes the parameters it reduces when it wraps the model
        raise ValueError("train.frozen_epochs runs in one process: start it with python, not torchrun")
    common.check_run_dir(run_dir, run.tcfg.resume, run.resolved)
    t0 = time.time()
    run.ds = data.load_dataset(cfg["data"])   # a missing file, malformed line or failed download ends here
    seconds = time.time() - t0
    if run.mcfg.backbone != "scratch":
        backbones.fetch_hf(run.mcfg)
    print(yaml.safe_dump(run.resolved, sort_keys=False))
    print(f"data: {data.summary(run.ds)} ({seconds:.1f}s)")
    if run.tcfg.threads:
        torch.set_num_threads(run.tcfg.threads)
    random.seed(run.tcfg.seed)
    np.random.seed(run.tcfg.seed)
    torch.manual_seed(run.tcfg.seed)
    return run


def prepare(run: Run):
    """Split, SID table, tokens, trie, training examples (built once) and the validation users."""
    tcfg, mcfg, ds = run.tcfg, run.mcfg, run.ds
    run.split = data.leave_one_out(ds.sequences, run.cfg["data"].max_history)
    if run.rank > 0:
        dist.barrier()  # rank 0 builds (or loads) the cached SID table first, then the others load it
    run.codes, run.sid_settings, run.sid_health = sid_table(run.cfg, ds, Path(tcfg.sid_cache))
    if run.world > 1 and run.rank == 0:
        dist.barrier()
    print(f"SIDs: {json.dumps(run.sid_health)}")
    run.words = rationales.rationale_words(ds.item_meta, mcfg.rationale_file) if mcfg.reasoning == "cot" else []
    run.tok = backbones.make_tokens(mcfg, run.codes, run.words, ds.item_meta)
    run.trie = pauserec.SIDTrie(run.codes)
    if tcfg.task != "rec":   # align | pause_pretrain: the item texts (stages.py); no validation, no refit
        run.examples, run.refit_examples, run.valid = stages.stage_examples(tcfg, mcfg, run.tok, ds.item_meta), [], []
        return
    rng = random.Random(tcfg.seed)
    max_history = run.cfg["data"].max_history
    run.examples = batching.training_examples(run.tok, mcfg, ds, run.split, max_history, rng)
    run.refit_examples = batching.training_examples(run.tok, mcfg, ds, run.split, max_history, rng, refit=True) \
        if tcfg.refit_epochs else []
    valid = run.split["valid"]
    if 0 < run.ecfg.valid_users < len(valid):   # a fixed sample, the same at every validation
        valid = [valid[i] for i in sorted(random.Random(tcfg.seed).sample(range(len(valid)), run.ecfg.valid_users))]
    run.valid = valid


def resume_from_last(run: Run):
    """Model, optimizer, counters and RNG state from last.pt."""
    last = run.run_dir / "last.pt"
    state = torch.load(last, map_location=run.device, weights_only=False)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.best, run.bad_evals = state["step"], state["best"], state["bad_evals"]
    run.refit_step = state.get("refit_step", 0)
    run.train_seconds, run.train_tokens = state["train_seconds"], state["train_tokens"]
    ranks = state.get("rng_ranks") or []
    common.set_rng_state(ranks[run.rank] if len(ranks) == run.world else state["rng"])
    run.stop = bool(run.tcfg.patience and run.bad_evals >= run.tcfg.patience)   # it had stopped early
    if run.stop:
        print(f"{last}: the run stopped early at step {run.step}; no more main-phase training")
    print(f"resumed from {last} at step {run.step}")


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW's groups of the parameters that train (requires_grad): ours (all of a scratch model; a pretrained
    one's backbones.OURS) and a pretrained backbone's weights ("backbone": its lr is train.backbone_lr_ratio x the
    phase's, frozen_epochs freeze it), each split into matrices (decayed) and vectors (biases, norms: not)."""
    pretrained = model.new_rows is not None
    groups = []
    for backbone in (False, True):
        params = [p for n, p in model.named_parameters() if p.requires_grad
                  and (pretrained and n not in backbones.OURS) == backbone]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:   # pause_pretrain: weight_decay 0, the <pause> row shares its table with our other rows
                groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0, "backbone": backbone})
    return groups


def adamw(groups, lr: float, device: str):
    """AdamW over param_groups' groups: fused on CUDA (one kernel for all parameters, its step counts on the device,
    so a step reads nothing back); elsewhere torch's for-loop AdamW (the CPU's fused one agrees only to rounding)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.startswith("cuda"))


def build(run: Run):
    """Model (a backbone: pretrained weights, our tokens' rows appended), AdamW, the state of last.pt when
    resuming, the training forward (optionally compiled and under DDP); then the run folder is written."""
    tcfg = run.tcfg
    model = run.model = backbones.make_model(run.mcfg, run.tok).to(run.device)
    if run.mcfg.init_from:   # another run's weights (a stage of the paper's pipeline)
        stages.load_init(model, run.tok, run.codes, run.mcfg.init_from)
    if tcfg.task == "pause_pretrain":   # the <pause> row starts at the mean of all rows
        stages.init_pause_row(model, run.tok, torch.Generator().manual_seed(tcfg.seed))
    pause_only = tcfg.task == "pause_pretrain" and tcfg.pause_trains == "row"
    if pause_only:   # ... and is the only weight trained
        stages.train_only_pause_row(model, run.tok)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({trained / 1e6:.2f}M "
          f"trained), vocabulary {run.tok.size}")
    groups = param_groups(model, tcfg.weight_decay if not pause_only else 0.0)
    run.optimizer = adamw(groups, tcfg.lr, run.device)
    run.backbone_params = [p for g in groups if g["backbone"] for p in g["params"]]
    if tcfg.resume:
        resume_from_last(run)
    run.train_loss = training_forward(model, pauserec.training_loss if tcfg.task == "rec" else stages.text_loss,
                                      tcfg.compile, tcfg.compile_mode)
    if run.world > 1:
        run.train_loss = torch.nn.parallel.DistributedDataParallel(run.train_loss)
    run.autocast = torch.autocast(run.device.split(":")[0], dtype=torch.bfloat16, enabled=tcfg.amp)
    if run.rank == 0:   # written only now that config, data and checkpoint have passed every check
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if not tcfg.resume:
            (run.run_dir / "log.jsonl").unlink(missing_ok=True)
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(run.resolved, sort_keys=False))
        sid.save_sids(run.run_dir / "sids.pt", run.codes, run.sid_settings, run.sid_health)


def checkpoint(run: Run):
    """last.pt: model, optimizer, counters and every rank's RNG state (a resumed DDP run replays them all)."""
    stop_clock(run)
    rngs = [common.rng_state()] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, common.rng_state())
    if run.rank == 0:
        common.atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                            "step": run.step, "refit_step": run.refit_step, "best": run.best,
                            "bad_evals": run.bad_evals, "train_seconds": run.train_seconds,
                            "train_tokens": run.train_tokens, "rng": common.rng_state(), "rng_ranks": rngs},
                           run.run_dir / "last.pt")


def log(run: Run, record: dict):
    if run.rank == 0:
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class Phase:
    """One pass of the epoch loop: training (counter 'step', validation, early stop), the refit on the
    validation targets too (counter 'refit_step', no validation; its epochs number on after the main ones), or
    a stage, train.task align | pause_pretrain (counter 'step', its own epochs and lr, no validation)."""

    def __init__(self, run: Run, refit: bool):
        tcfg = run.tcfg
        self.refit, self.counter = refit, "refit_step" if refit else "step"
        self.validates = not refit and tcfg.task == "rec"
        self.examples = run.refit_examples if refit else run.examples
        self.steps_per_epoch = math.ceil(len(self.examples) / tcfg.batch_size) if not tcfg.batch_tokens else \
            len(batching.batches(self.examples, 0, torch.Generator(), tcfg.batch_tokens, tcfg.pad_to))   # every epoch's
        epochs, lr = {"rec": (tcfg.epochs, tcfg.lr), "align": (tcfg.align_epochs, tcfg.align_lr),
                      "pause_pretrain": (tcfg.pause_epochs, tcfg.pause_lr)}[tcfg.task]
        frozen = {"rec": tcfg.frozen_epochs, "align": tcfg.align_frozen_epochs, "pause_pretrain": 0}[tcfg.task]
        if refit:
            epochs, lr, frozen = tcfg.refit_epochs, tcfg.refit_lr, 0
        self.total = epochs * self.steps_per_epoch
        self.frozen_steps = min(frozen, epochs) * self.steps_per_epoch   # steps before the backbone trains
        self.first_epoch = tcfg.epochs if refit else 0
        self.lr_cfg = replace(tcfg, lr=lr)
        ratio = tcfg.backbone_lr_ratio   # the backbone's schedule: its own warmup and cosine from its first step
        self.backbone_lr_cfg = replace(tcfg, lr=lr * ratio, min_lr=tcfg.min_lr * ratio)

    def lrs(self, step: int) -> tuple[float, float]:
        """(our parameters' lr, the backbone's: 0 while frozen) at step (counted from 0)."""
        backbone = step - self.frozen_steps
        return (lr_at(step, self.total, self.lr_cfg),
                lr_at(backbone, self.total - self.frozen_steps, self.backbone_lr_cfg) if backbone >= 0 else 0.0)


def train_step(run: Run, phase: Phase, rows, epoch: int):
    """One optimizer step on rows of phase.examples; every log_every steps the loss goes to the bar and
    log.jsonl (and, when stdout is no terminal, to a printed line)."""
    n = getattr(run, phase.counter) + 1
    run.t_train = run.t_train or time.time()   # the clock runs (stop_clock reads it)
    lr, backbone_lr = phase.lrs(n - 1)
    for p in run.backbone_params:   # frozen: no gradient computed, AdamW skips them (no state, no decay)
        p.requires_grad_(n - 1 >= phase.frozen_steps)
    run.train_loss.train()
    mine, weight = ddp.shard(rows, phase.examples, run.rank, run.world)   # all rows when world == 1
    batch = batching.collate([phase.examples[i] for i in mine], run.tok.PAD, run.tcfg.pad_to)
    ids, loss_mask = batching.to_device(batch, run.device)
    for group in run.optimizer.param_groups:
        group["lr"] = backbone_lr if group["backbone"] else lr
    if run.tcfg.compile and run.tcfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()   # a new step: CUDA graphs may reuse the last one's outputs
    with run.autocast:
        loss = run.train_loss(ids, loss_mask)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.tcfg.grad_clip)
    run.optimizer.step()
    run.last_loss = loss.detach().clone()
    real_tokens = sum(len(phase.examples[i][0]) for i in rows)  # the whole batch, on every rank
    run.tokens, run.train_tokens = run.tokens + real_tokens, run.train_tokens + real_tokens
    setattr(run, phase.counter, n)
    run.bar.update(1)
    if n % run.tcfg.log_every == 0:
        loss = ddp.batch_loss(loss, weight, run.world)
        rate = run.tokens / (time.time() - run.t_log)
        run.bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
        log(run, {phase.counter: n, "epoch": epoch, "loss": round(loss.item(), 4), "lr": lr,
                  **({"backbone_lr": backbone_lr} if run.backbone_params else {}), "tokens_per_s": round(rate)})
        if not sys.stdout.isatty():   # a batch job's log: no bar there (tqdm hides it), so one line instead
            print(f"{phase.counter} {n}/{phase.total} epoch {epoch} loss {loss.item():.4f} lr {lr:.2e} "
                  f"tokens/s {rate:.0f}", flush=True)
        run.tokens, run.t_log = 0, time.time()


def stop_clock(run: Run):
    """train_seconds: a GPU runs the steps behind the host, so the clock times stretches of steps, stopped once the
    device has finished them (before a validation or a checkpoint, at a phase's end), not each step's host side."""
    if run.t_train:
        if run.device.startswith("cuda"):
            torch.cuda.synchronize(run.device)
        run.train_seconds += time.time() - run.t_train
        run.t_train = None


def validate(run: Run, epoch: int):
    """Validation users' metrics; a better eval.select saves model.pt; last.pt after every validation."""
    stop_clock(run)
    ecfg = run.ecfg
    metrics = evaluate.evaluate_model(run.model, run.tok, run.mcfg, run.trie, run.valid, ecfg, run.device, "valid",
                                      run.rank, run.world)
    better = metrics[ecfg.select] > run.best
    run.best, run.bad_evals = (metrics[ecfg.select], 0) if better else (run.best, run.bad_evals + 1)
    if better and run.rank == 0:
        common.atomic_save({"model": run.model.state_dict(), "words": run.words, "step": run.step},
                           run.run_dir / "model.pt")
    log(run, {"step": run.step, "epoch": epoch, "valid": metrics, "best": better})
    tqdm.write(f"step {run.step} valid {json.dumps(metrics)}{'  (best)' if better else ''}")
    checkpoint(run)
    run.tokens, run.t_log = 0, time.time()
    if run.tcfg.patience and run.bad_evals >= run.tcfg.patience:
        tqdm.write(f"early stop: {run.bad_evals} validations without improvement")
        run.stop = True


def fit(run: Run, phase: Phase):
    """The epoch loop. An epoch's order depends only on (seed, epoch): a resumed run replays it exactly."""
    tcfg = run.tcfg
    eval_every = run.ecfg.every or phase.steps_per_epoch
    while getattr(run, phase.counter) < phase.total and not (run.stop and not phase.refit):
        epoch, skip = divmod(getattr(run, phase.counter), phase.steps_per_epoch)
        seed = tcfg.seed * 1000 + phase.first_epoch + epoch
        order = batching.batches(phase.examples, tcfg.batch_size, torch.Generator().manual_seed(seed),
                                 tcfg.batch_tokens, tcfg.pad_to)
        for rows in order[skip:]:
            train_step(run, phase, rows, phase.first_epoch + epoch)
            if phase.validates and (run.step % eval_every == 0 or run.step == phase.total):
                validate(run, epoch)
                if run.stop:
                    break
        if not phase.validates:   # the refit, a stage: last.pt at each epoch's end
            checkpoint(run)
    stop_clock(run)


def refit(run: Run, phase: Phase):
    """The checkpoint chosen on validation (model_valid.pt) trains on the validation targets too, with a fresh
    optimizer; model.pt becomes the refit model once last.pt holds the refit's end (a resume never mistakes it
    for the chosen one)."""
    if run.world > 1:
        dist.barrier()  # model.pt is written by rank 0
    if phase.total and run.refit_step == 0:
        if run.rank == 0:
            shutil.copyfile(run.run_dir / "model.pt", run.run_dir / "model_valid.pt")
        # on the host, copied into the model: no second copy of the weights on the device
        chosen = torch.load(run.run_dir / "model.pt", map_location="cpu", weights_only=True)
        run.model.load_state_dict(chosen["model"])
        run.optimizer.state.clear()
    fit(run, phase)
    if phase.total and run.rank == 0:
        chosen_step = torch.load(run.run_dir / "model_valid.pt", weights_only=True)["step"]
        common.atomic_save({"model": run.model.state_dict(), "words": run.words, "step": chosen_step,
                            "refit_epochs": run.tcfg.refit_epochs}, run.run_dir / "model.pt")


def final_test(run: Run, training: Phase, refitting: Phase) -> dict:
    """All validation users with the checkpoint chosen on validation; the test split, once, with model.pt (the
    refit model when there is a refit); metrics.json, the results table and one JSON line."""
    if run.world > 1:
        dist.barrier()  # model.pt is written by rank 0
    # held on the host and copied into the model: two checkpoints on the device would cost twice the weights
    load = lambda name: torch.load(run.run_dir / name, map_location="cpu", weights_only=True)  # noqa: E731
    tested = load("model.pt")
    chosen = load("model_valid.pt") if refitting.total else tested
    args = (run.tok, run.mcfg, run.trie)
    run.model.load_state_dict(chosen["model"])
    users = run.split["valid"] if run.ecfg.final_valid == "all" else run.valid   # the sample it was chosen on
    valid = evaluate.evaluate_model(run.model, *args, users, run.ecfg, run.device, "valid",
                                    run.rank, run.world)
    run.model.load_state_dict(tested["model"])
    test = evaluate.evaluate_model(run.model, *args, run.split["test"], run.ecfg, run.device, "test",
                                   run.rank, run.world)
    sequences, ks = run.ds.sequences, run.ecfg.ks
    metrics = {"valid": valid, "test": test, "baselines": evaluate.baseline_metrics(sequences, "test", ks),
               "baselines_valid": evaluate.baseline_metrics(sequences, "valid", ks),
               "train_seconds": round(run.train_seconds, 1), "train_tokens": run.train_tokens,
               "best_step": tested["step"], "steps": run.step, "steps_per_epoch": training.steps_per_epoch,
               "refit_steps": run.refit_step, "ties": run.cfg["data"].ties, "sid": run.sid_health}
    metrics_path = run.run_dir / "metrics.json"
    if run.rank == 0:
        metrics_path.write_text(json.dumps(metrics, indent=1))
    print(evaluate.results_table({"model": test, **metrics["baselines"]}, ks, metrics_path))
    print(json.dumps({"test": test, "markov": metrics["baselines"]["markov"], "run": str(run.run_dir)}))
    return metrics


def stage_end(run: Run, phase: Phase) -> dict:
    """A stage's model.pt, and metrics.json with its cost (task, examples, tokens, seconds, steps, the last step's
    loss): there is nothing to recommend yet, so no validation or test."""
    common.atomic_save({"model": run.model.state_dict(), "words": run.words, "step": run.step},
                       run.run_dir / "model.pt")
    loss = None if run.last_loss is None else round(run.last_loss.item(), 4)   # None: resumed after its end
    metrics = {"task": run.tcfg.task, "examples": len(run.examples), "train_seconds": round(run.train_seconds, 1),
               "train_tokens": run.train_tokens, "steps": run.step, "steps_per_epoch": phase.steps_per_epoch,
               "final_loss": loss, "sid": run.sid_health}
    (run.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({**metrics, "run": str(run.run_dir)}))
    return metrics


def main(argv):
    run = setup(argv)               # config, run folder and data checked; config printed; seeds set
    prepare(run)                    # split, SIDs, tokens, trie, training examples
    training, refitting = Phase(run, refit=False), Phase(run, refit=True)   # the batches per epoch, the schedule
    build(run)                      # model, optimizer (resumed from last.pt), run folder
    run.bar = tqdm(total=training.total + refitting.total, initial=run.step + run.refit_step, desc="train",
                   disable=None if run.rank == 0 else True)
    run.tokens, run.t_log = 0, time.time()
    fit(run, training)              # training, validation, model.pt on a better eval.select, early stop
    if run.tcfg.task != "rec":      # align | pause_pretrain: model.pt and the cost, nothing to recommend yet
        run.bar.close()
        return stage_end(run, training)
    refit(run, refitting)           # the chosen checkpoint learns the validation targets too
    run.bar.close()
    return final_test(run, training, refitting)


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
