"""Evaluation: Recall@K and NDCG@K over the full catalogue, the beam-search evaluation loop, and the
MostPop and Markov baselines on the same leave-one-out split.

    python evaluate.py RUN_DIR [key=value ...]             # re-evaluate a saved run on test, with the baselines
    python evaluate.py --baselines CONFIG [key=value ...]   # MostPop and Markov on the test split
    python evaluate.py RUN_DIR --plot [PATH]                # training loss and validation NDCG@10 as a PNG
                                                            #   (default RUN_DIR/curves.png; needs matplotlib)
    python evaluate.py RUN_DIR --recommend USER_ID [--k 10]  # top-k items after the user's last item
    python evaluate.py RUN_DIR --history ITEM_ID,ITEM_ID,.. [--k 10]   # top-k items after this history
    python evaluate.py RUN_DIR --ablate-pauses hide|shuffle  # valid and test with the pauses before the SID
                                                            #   knocked out, beside the metrics as trained

Each prints one JSON object (--recommend, --history: a JSON list) on the last line of stdout.
"""
import json
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import backbones
import common
import data
import pauserec
import sid
from model import ModelConfig


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10])  # cut-offs of Recall@K / NDCG@K
    beam_size: int = 20          # constrained beam width; must be >= max(ks)
    batch_size: int = 256        # users per beam-search batch
    every: int = 0               # validate every this many training steps (0: once per epoch)
    valid_users: int = 5000      # validate on a fixed random sample of users (0: all); test always uses all
    select: str = "ndcg@10"      # the validation metric that chooses the checkpoint: recall@K | ndcg@K, K in ks
    final_valid: str = "all"     # the chosen checkpoint's validation figures in metrics.json: all users, or the
                                 #   valid_users sample it was chosen on (sample: a whole evaluation cheaper)
    precision: str = "tf32"      # the beam search's arithmetic on CUDA: tf32 (float32, matmuls on TF32 tensor cores)
                                 #   | bf16 (autocast) | fp32; elsewhere float32 whatever this says


def check_eval_config(cfg: EvalConfig):
    if not cfg.ks or min(cfg.ks) < 1:
        raise ValueError(f"eval.ks must be a non-empty list of positive cut-offs, got {cfg.ks}")
    if cfg.beam_size < max(cfg.ks):
        raise ValueError(f"eval.beam_size ({cfg.beam_size}) must be >= the largest K in eval.ks ({max(cfg.ks)})")
    if cfg.batch_size < 1:
        raise ValueError(f"eval.batch_size must be > 0, got {cfg.batch_size}")
    if cfg.final_valid not in ("all", "sample"):
        raise ValueError(f"eval.final_valid must be all or sample, got {cfg.final_valid!r}")
    if cfg.precision not in ("tf32", "bf16", "fp32"):
        raise ValueError(f"eval.precision must be tf32 | bf16 | fp32, got {cfg.precision!r}")
    computed = [f"{m}@{k}" for m in ("recall", "ndcg") for k in cfg.ks]
    if cfg.select not in computed:
        raise ValueError(f"eval.select={cfg.select} is not computed with eval.ks={cfg.ks}: set eval.select to one "
                         f"of {', '.join(computed)}, or add its K to eval.ks")


# the sections of a run folder's config.yaml that evaluate.py reads
RUN_SECTIONS = {"data": data.DataConfig, "sid": sid.SIDConfig, "model": ModelConfig, "eval": EvalConfig}


# ----------------------------------------------------------------------------------------------
# Metrics: one target per user, so Recall@K is a hit rate and the ideal DCG is 1

def rank_metrics(ranked: torch.Tensor, targets: torch.Tensor, ks=(5, 10)) -> dict:
    """ranked [U, >=max(ks)] item ids best first (-1 = empty slot); targets [U]. Averages over users."""
    hit = ranked == targets[:, None]                                   # [U, K] at most one True per row
    gain = hit.float() / torch.log2(torch.arange(ranked.shape[1], dtype=torch.float) + 2)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = hit[:, :k].any(1).float().mean().item()
        out[f"ndcg@{k}"] = gain[:, :k].sum(1).mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Baselines, fitted on the training part of the same split

def baseline_rankings(sequences, split: str, k: int, fit: str | None = None):
    """MostPop and first-order Markov rankings [U, k] for the targets of `split` ('valid' or 'test').

    They are fitted on the training part of `fit` (default: `split`): each user's sequence without the
    split's target (and, for 'valid', without the test target). Markov ranks the items that followed the
    user's last item by transition count, ties broken by popularity (then item id), and fills up with the
    most popular items. fit='valid' for split='test' leaves the validation transitions out of the fit:
    the data a model trained on the training targets has seen.
    """
    history = data.train_part(sequences, split)
    part = data.train_part(sequences, fit or split)
    popularity = Counter(i for seq in part for i in seq)
    by_popularity = sorted(popularity, key=lambda i: (-popularity[i], i))
    transitions = defaultdict(Counter)                                 # last item -> Counter(next item)
    for seq in part:
        for a, b in zip(seq, seq[1:]):
            transitions[a][b] += 1
    mostpop = torch.tensor(by_popularity[:k]).expand(len(part), -1)
    markov = []
    for seq in history:
        follow = transitions[seq[-1]]
        ranked = sorted(follow, key=lambda i: (-follow[i], -popularity[i], i))[:k]
        seen = set(ranked)
        ranked += [i for i in by_popularity[:k + len(ranked)] if i not in seen][:k - len(ranked)]
        markov.append(ranked)
    return {"mostpop": mostpop, "markov": torch.tensor(markov)}


def baseline_metrics(sequences, split: str, ks=(5, 10)) -> dict:
    """MostPop and Markov as the protocol fits them; for test also `markov_train_only`, fitted without the
    validation transitions (the same interactions our model trains on)."""
    targets = torch.tensor([seq[-1] if split == "test" else seq[-2] for seq in sequences])
    rankings = baseline_rankings(sequences, split, max(ks))
    out = {name: rank_metrics(ranked, targets, ks) for name, ranked in rankings.items()}
    if split == "test":
        out["markov_train_only"] = rank_metrics(baseline_rankings(sequences, "test", max(ks), "valid")["markov"],
                                                targets, ks)
    return out


# ----------------------------------------------------------------------------------------------
# Are the pauses used? Knock them out at inference (--ablate-pauses)

ABLATIONS = ("hide", "shuffle")


@contextmanager
def foreign_slot_states(model, slots):
    """While active, each row's keys and values at the columns `slots` [B, T] bool (the same columns in every
    row) are those of the next row in the batch (row b reads row b+1's, the last row the first's). Only what
    attention reads is swapped: each position's own residual stream stays its own."""
    q = model.cfg.n_head * model.cfg.head_dim

    def swap(module, args, out):                      # out [B, T, q + 2 kv] of c_attn: [q; k; v] per position
        kv = out[..., q:]
        return torch.cat([out[..., :q], torch.where(slots[..., None], kv.roll(-1, 0), kv)], -1)

    hooks = [block.attn.c_attn.register_forward_hook(swap) for block in model.transformer.h]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def check_ablation(mcfg, how: str):
    if how not in ABLATIONS:
        raise ValueError(f"--ablate-pauses must be {' | '.join(ABLATIONS)}, got {how!r}")
    if pauserec.num_slots(mcfg) == 0:
        raise ValueError(f"--ablate-pauses needs a run with pauses or latent steps (model.reasoning=pause with "
                         f"num_pauses > 0, or latent), got reasoning={mcfg.reasoning}")
    if mcfg.think_pauses:   # its prompts end with </think>, not with the pauses that ablated_prefill knocks out
        raise ValueError("--ablate-pauses does not support runs with model.think_pauses")


def ablated_prefill(model, tok, mcfg, prompts, cache, how: str):
    """pauserec.prefill with the M pauses (K latent steps) right before the SID knocked out -> (logits, None).
    hide: no later position attends to them (their keys are masked, each still sees itself; positions as trained);
    shuffle: their keys and values are the next prompt's in the batch (foreign_slot_states)."""
    check_ablation(mcfg, how)
    if how == "shuffle" and len(prompts) < 2:
        raise ValueError("--ablate-pauses shuffle needs >= 2 prompts per batch (each reads the next one's pauses)")
    B, K, dev = len(prompts), pauserec.num_slots(mcfg), model.device
    if mcfg.reasoning == "latent":
        ids, key_mask = pauserec.left_pad([p[:-K] for p in prompts], dev, tok.PAD)
        h = model.hidden(ids, key_mask=key_mask, cache=cache)[:, -1]
        with foreign_slot_states(model, torch.ones(B, 1, dtype=torch.bool, device=dev)) if how == "shuffle" \
                else nullcontext():
            return model.logits(pauserec.latent_steps(model, h, cache, hide=how == "hide")[:, -1]), None
    ids, key_mask = pauserec.left_pad(prompts, dev, tok.PAD)
    slots = torch.zeros_like(key_mask)
    slots[:, -K:] = True                               # left-padded: every prompt ends with its M pauses
    if how == "shuffle":
        with foreign_slot_states(model, slots):
            return model(ids, key_mask=key_mask, cache=cache, last=True), None
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)   # as trained: the masked pauses still count
    logits = model(ids, key_mask=key_mask & ~slots, positions=positions, cache=cache, last=True)
    cache.length = cache.length + K                    # the cache did not count them: the SID's positions as trained
    return logits, None


def ablation(model, tok, cfg, trie, split, how: str) -> dict:
    """Validation and test metrics of a pause (or latent) run as trained and with its pauses knocked out
    (ablated_prefill), side by side. After a refit (train.refit_epochs > 0) model.pt has trained on the
    validation targets: its validation figures are then no held-out measure."""
    mcfg, ecfg = cfg["model"], cfg["eval"]
    check_ablation(mcfg, how)
    rows = {}
    for split_name in ("valid", "test"):
        for name, ablate in (("as trained", ""), (f"pauses {how}", how)):
            rows[f"{split_name}: {name}"] = evaluate_model(model, tok, mcfg, trie, split[split_name], ecfg,
                                                           desc=f"{split_name} {name}", ablate=ablate)
    print(results_table(rows, ecfg.ks, title="split: pauses"))
    result = {"ablate": how, **rows}
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# The model: constrained beam search over the SID trie, batched over users

@contextmanager
def eval_precision(name: str, device):
    """The arithmetic of an evaluation on CUDA (eval.precision): tf32: float32 tensors, matmuls on TF32 tensor cores
    (products of inputs rounded to 10 mantissa bits, sums in float32); bf16: autocast; fp32. On any other device
    float32 whatever the name: a CPU's figures, and the tests' beam search = exhaustive scoring, stay as they were."""
    if not str(device).startswith("cuda") or name == "fp32":
        yield
    elif name == "bf16":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)


def recommend(model, tok, mcfg, trie, examples, beam_size: int, topk: int, batch_size: int,
              device="cpu", desc="beam search", ablate="", precision="fp32"):
    """Top-k items [U, topk] for each example's history, in the examples' order. desc=None: no progress bar.
    ablate: hide | shuffle the pauses before the SID (ablated_prefill); precision: eval.precision (eval_precision)."""
    prefill = partial(ablated_prefill, how=ablate) if ablate else pauserec.prefill
    prompts = [pauserec.build_prompt(tok, mcfg, ex.history) for ex in examples]
    # Batches of similar prompt length waste less compute on padding (which never changes results).
    order = sorted(range(len(prompts)), key=lambda u: len(prompts[u]))
    ranked = torch.full((len(prompts), topk), -1, dtype=torch.long)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=None if desc else True):
        rows = order[start:start + batch_size]
        with eval_precision(precision, device):
            items, _ = pauserec.beam_search(model, tok, mcfg, trie, [prompts[u] for u in rows],
                                            beam_size=beam_size, topk=topk, device=device, prefill=prefill)
        ranked[rows] = items.cpu()
    return ranked


def evaluate_model(model, tok, mcfg, trie, examples, cfg: EvalConfig, device="cpu", desc="eval",
                   rank=0, world=1, ablate="") -> dict:
    """Metrics over examples. Under torchrun (world > 1) each rank ranks every world-th user and the
    rankings are gathered, so every rank computes the same metrics (and early-stops alike)."""
    t0 = time.time()
    ranked = recommend(model, tok, mcfg, trie, examples[rank::world], cfg.beam_size, max(cfg.ks),
                       cfg.batch_size, device, desc if rank == 0 else None, ablate, cfg.precision)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, ranked)
        ranked = torch.empty(len(examples), max(cfg.ks), dtype=torch.long)
        for r, shard in enumerate(shards):
            ranked[r::world] = shard
    metrics = rank_metrics(ranked, torch.tensor([ex.target for ex in examples]), cfg.ks)
    metrics["users"] = len(examples)
    metrics["seconds"] = round(time.time() - t0, 2)
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line

def load_run(run_dir, overrides=(), device="cpu"):
    """Rebuild data, SID table, tokens and best model of a saved run (written by train.py)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "sids.pt", "model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a run folder written by train.py?")
    cfg = common.load_config(run_dir / "config.yaml", overrides, RUN_SECTIONS, ignore=("train",))
    check_eval_config(cfg["eval"])
    ds = data.load_dataset(cfg["data"])
    codes, _, _ = sid.load_sids(run_dir / "sids.pt", len(ds.item_ids))
    checkpoint = torch.load(run_dir / "model.pt", map_location=device, weights_only=True)
    tok = backbones.make_tokens(cfg["model"], codes, checkpoint["words"], ds.item_meta)
    model = backbones.make_model(cfg["model"], tok, pretrained=False).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:  # torch lists every mismatch, one per line: show the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{run_dir / 'model.pt'} does not fit the model of config.yaml + overrides "
                         f"with sids.pt: {first[:160]}") from None
    return cfg, ds, codes, tok, model


def results_table(rows: dict, ks, metrics_path=None, title="test") -> str:
    """{name: metrics} as a small text table, R@K and N@K for every K, 4 decimals; then metrics.json's path."""
    width = max(len(name) for name in [*rows, title])
    head = "".join(f"{m}@{k}".rjust(8) for k in ks for m in ("R", "N"))
    lines = [title.ljust(width) + head]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[f'{key}@{k}']:8.4f}" for k in ks for key in ("recall", "ndcg")))
    if "markov_train_only" in rows:
        lines.append("(markov_train_only: Markov fitted without the validation transitions, as the model trains)")
    if metrics_path is not None:
        lines.append(f"metrics: {metrics_path}")
    return "\n".join(lines)


def plot_run(run_dir, path, overrides=()):
    """PNG of the training loss and validation NDCG@10 over steps (from log.jsonl), with the MostPop and
    Markov validation NDCG@10 as horizontal lines (from metrics.json, or computed when it is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    run_dir = Path(run_dir)
    log_path, metrics_path = run_dir / "log.jsonl", run_dir / "metrics.json"
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_path} not found: is {run_dir} a run folder written by train.py?")
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    baselines = json.loads(metrics_path.read_text()).get("baselines_valid") if metrics_path.is_file() else None
    if baselines is None:   # a run still training (or an older one): the baselines are cheap to fit
        cfg = common.load_config(run_dir / "config.yaml", overrides, {"data": data.DataConfig, "eval": EvalConfig},
                                 ignore=("sid", "model", "train"))
        baselines = baseline_metrics(data.load_dataset(cfg["data"]).sequences, "valid", cfg["eval"].ks)
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    end = max((s for s, _ in loss), default=0)   # refit steps are drawn after the main ones
    refit = [(end + r["refit_step"], r["loss"]) for r in records if "loss" in r and "refit_step" in r]
    ndcgs = [k for k in baselines["markov"] if k.startswith("ndcg@")]   # NDCG@10, or the largest K of eval.ks
    key = "ndcg@10" if "ndcg@10" in ndcgs else max(ndcgs, key=lambda k: int(k[5:]))
    valid = [(r["step"], r["valid"][key], r["valid"]["users"]) for r in records if "valid" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    for points, label in ((loss, "training loss"), (refit, "refit loss (validation targets too)")):
        if points:
            top.plot([p[0] for p in points], [p[1] for p in points], label=label)
    top.set_ylabel("loss")
    top.legend()
    if valid:
        bottom.plot([v[0] for v in valid], [v[1] for v in valid], marker="o",
                    label=f"model ({valid[-1][2]} validation users)")
    for name, style in (("mostpop", "--"), ("markov", ":")):
        bottom.axhline(baselines[name][key], ls=style, color="gray",
                       label=f"{'MostPop' if name == 'mostpop' else 'Markov'} (all validation users)")
    bottom.set_xlabel("step")
    bottom.set_ylabel(f"validation {key.replace('ndcg', 'NDCG')}")
    bottom.legend()
    top.set_title(str(run_dir))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def recommend_for(run_dir, overrides=(), user=None, history=None, k=10) -> list[dict]:
    """Top-k items [{item, title, score}] after a user's whole history (user: the original user id), or after
    `history` (item ids, oldest first), by the run's model and constrained beam search."""
    cfg, ds, codes, tok, model = load_run(run_dir, overrides)
    if user is not None:
        users = {u: i for i, u in enumerate(ds.user_ids)}
        if user not in users:
            raise ValueError(f"--recommend: unknown user {user!r}; the users of {run_dir} are ids like "
                             f"{', '.join(ds.user_ids[:3])}")
        items = ds.sequences[users[user]]   # all their items: what comes after the last one
    else:
        index = {a: i for i, a in enumerate(ds.item_ids)}
        ids = [a.strip() for a in history.split(",") if a.strip()]
        unknown = [a for a in ids if a not in index]
        if not ids or unknown:
            raise ValueError(f"--history: unknown item {', '.join(unknown) or '(none given)'}; the items of "
                             f"{run_dir} are ids like {', '.join(ds.item_ids[:3])}")
        items = [index[a] for a in ids]
    mcfg, beam = cfg["model"], max(cfg["eval"].beam_size, k)
    prompt = pauserec.build_prompt(tok, mcfg, items[-cfg["data"].max_history:])   # the history cap of training
    ranked, scores = pauserec.beam_search(model.eval(), tok, mcfg, pauserec.SIDTrie(codes), [prompt],
                                          beam_size=beam, topk=k)
    return [{"item": ds.item_ids[i], "title": ds.item_meta[i]["title"], "score": round(s, 4)}
            for i, s in zip(ranked[0].tolist(), scores[0].tolist()) if i >= 0]


def recommendations_table(rows: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'item':<12}  {'title':<48}  {'score':>8}"]
    for r, row in enumerate(rows, 1):
        lines.append(f"{r:>4}  {row['item']:<12}  {(row['title'] or '')[:48]:<48}  {row['score']:8.4f}")
    return "\n".join(lines)


def parse_args(argv):
    """The command line: RUN_DIR (or --baselines CONFIG), key=value overrides and the options."""
    parser = common.Parser(__doc__, RUN_SECTIONS, prog="evaluate.py")
    parser.add_argument("path", metavar="RUN_DIR | CONFIG")
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value")
    parser.add_argument("--baselines", action="store_true", help="PATH is a CONFIG: MostPop and Markov on test")
    parser.add_argument("--plot", nargs="?", const="", metavar="PATH", help="training curves as a PNG")
    parser.add_argument("--recommend", metavar="USER_ID", help="top-k items after the user's last item")
    parser.add_argument("--history", metavar="ITEM_ID,..", help="top-k items after this history")
    parser.add_argument("--k", help="how many items --recommend and --history list (default 10)")
    parser.add_argument("--ablate-pauses", choices=ABLATIONS, help="valid and test with the pauses before the "
                        "SID knocked out (hide: masked as keys; shuffle: another user's), beside the plain figures")
    args = parser.parse_intermixed_args(argv)
    if args.plot and "=" in args.plot:   # `--plot key=value`: the plot's PATH is optional, that is an override
        args.overrides, args.plot = [args.plot, *args.overrides], ""
    if args.recommend is not None and args.history is not None:
        raise ValueError("--recommend and --history exclude each other: give one")
    if args.k is not None:
        if args.recommend is None and args.history is None:
            raise ValueError("--k goes with --recommend or --history")
        if not args.k.isdigit() or int(args.k) < 1:
            raise ValueError(f"--k must be a positive integer, got {args.k!r}")
    return args


def main(argv):
    args = parse_args(argv)
    if args.baselines:
        cfg = common.load_config(args.path, args.overrides, {"data": data.DataConfig, "eval": EvalConfig},
                                 ignore=("sid", "model", "train"))
        check_eval_config(cfg["eval"])
        ds = data.load_dataset(cfg["data"])
        result = baseline_metrics(ds.sequences, "test", cfg["eval"].ks)
        print(json.dumps(result))
        return result
    run_dir, overrides = Path(args.path), args.overrides
    torch.manual_seed(0)
    if args.plot is not None:
        path = plot_run(run_dir, args.plot or run_dir / "curves.png", overrides)
        print(f"plot: {path}")
        print(json.dumps({"plot": str(path)}))
        return path
    if args.recommend is not None or args.history is not None:
        rows = recommend_for(run_dir, overrides, args.recommend, args.history, int(args.k or 10))
        print(recommendations_table(rows))
        print(json.dumps(rows))
        return rows
    cfg, ds, codes, tok, model = load_run(run_dir, overrides)
    split = data.leave_one_out(ds.sequences, cfg["data"].max_history)
    trie = pauserec.SIDTrie(codes)
    if args.ablate_pauses:
        return ablation(model, tok, cfg, trie, split, args.ablate_pauses)
    result = evaluate_model(model, tok, cfg["model"], trie, split["test"], cfg["eval"], desc="test")
    baselines = baseline_metrics(ds.sequences, "test", cfg["eval"].ks)
    saved = run_dir / "metrics.json"
    print(results_table({"model": result, **baselines}, cfg["eval"].ks, saved if saved.is_file() else None))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
