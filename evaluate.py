"""Evaluation: Recall@K and NDCG@K over the full catalogue, the beam-search evaluation loop, and the
MostPop and Markov baselines on the same leave-one-out split.

    python evaluate.py RUN_DIR [key=value ...]            # re-evaluate a saved run on test
    python evaluate.py --baselines CONFIG [key=value ...]  # MostPop and Markov on the test split

Both print one JSON object on the last line of stdout.
"""
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import pauserec
import sid


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10])  # cut-offs of Recall@K / NDCG@K
    beam_size: int = 20          # constrained beam width; must be >= max(ks)
    batch_size: int = 256        # users per beam-search batch
    every: int = 0               # validate every this many training steps (0: once per epoch)
    valid_users: int = 5000      # validate on a fixed random sample of users (0: all); test always uses all
    select: str = "ndcg@10"      # the validation metric that chooses the checkpoint: recall@K | ndcg@K, K in ks


def check_eval_config(cfg: EvalConfig):
    if not cfg.ks or min(cfg.ks) < 1:
        raise ValueError(f"eval.ks must be a non-empty list of positive cut-offs, got {cfg.ks}")
    if cfg.beam_size < max(cfg.ks):
        raise ValueError(f"eval.beam_size ({cfg.beam_size}) must be >= the largest K in eval.ks ({max(cfg.ks)})")
    if cfg.batch_size < 1:
        raise ValueError(f"eval.batch_size must be > 0, got {cfg.batch_size}")
    computed = [f"{m}@{k}" for m in ("recall", "ndcg") for k in cfg.ks]
    if cfg.select not in computed:
        raise ValueError(f"eval.select={cfg.select} is not computed with eval.ks={cfg.ks}: set eval.select to one "
                         f"of {', '.join(computed)}, or add its K to eval.ks")


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
# The model: constrained beam search over the SID trie, batched over users

def recommend(model, tok, mcfg, trie, examples, beam_size: int, topk: int, batch_size: int,
              device="cpu", desc="beam search"):
    """Top-k items [U, topk] for each example's history, in the examples' order. desc=None: no progress bar."""
    prompts = [pauserec.build_prompt(tok, mcfg, ex.history) for ex in examples]
    # Batches of similar prompt length waste less compute on padding (which never changes results).
    order = sorted(range(len(prompts)), key=lambda u: len(prompts[u]))
    ranked = torch.full((len(prompts), topk), -1, dtype=torch.long)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=None if desc else True):
        rows = order[start:start + batch_size]
        items, _ = pauserec.beam_search(model, tok, mcfg, trie, [prompts[u] for u in rows],
                                        beam_size=beam_size, topk=topk, device=device)
        ranked[rows] = items.cpu()
    return ranked


def evaluate_model(model, tok, mcfg, trie, examples, cfg: EvalConfig, device="cpu", desc="eval",
                   rank=0, world=1) -> dict:
    """Metrics over examples. Under torchrun (world > 1) each rank ranks every world-th user and the
    rankings are gathered, so every rank computes the same metrics (and early-stops alike)."""
    t0 = time.time()
    ranked = recommend(model, tok, mcfg, trie, examples[rank::world], cfg.beam_size, max(cfg.ks),
                       cfg.batch_size, device, desc if rank == 0 else None)
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
    cfg = data.load_config(run_dir / "config.yaml", overrides,
                           {"data": data.DataConfig, "sid": sid.SIDConfig, "model": pauserec.ModelConfig,
                            "eval": EvalConfig}, ignore=("train",))
    check_eval_config(cfg["eval"])
    ds = data.load_dataset(cfg["data"])
    codes, _, _ = sid.load_sids(run_dir / "sids.pt", len(ds.item_ids))
    checkpoint = torch.load(run_dir / "model.pt", map_location=device, weights_only=True)
    tok = pauserec.make_tokens(cfg["model"], codes, checkpoint["words"], ds.item_meta)
    model = pauserec.make_model(cfg["model"], tok, pretrained=False).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:  # torch lists every mismatch, one per line: show the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{run_dir / 'model.pt'} does not fit the model of config.yaml + overrides "
                         f"with sids.pt: {first[:160]}") from None
    return cfg, ds, codes, tok, model


def main(argv):
    if len(argv) >= 2 and argv[0] == "--baselines":
        cfg = data.load_config(argv[1], argv[2:], {"data": data.DataConfig, "eval": EvalConfig},
                               ignore=("sid", "model", "train"))
        check_eval_config(cfg["eval"])
        ds = data.load_dataset(cfg["data"])
        result = baseline_metrics(ds.sequences, "test", cfg["eval"].ks)
    elif len(argv) >= 1 and not argv[0].startswith("-"):
        torch.manual_seed(0)
        cfg, ds, codes, tok, model = load_run(argv[0], argv[1:])
        split = data.leave_one_out(ds.sequences, cfg["data"].max_history)
        trie = pauserec.SIDTrie(codes)
        result = evaluate_model(model, tok, cfg["model"], trie, split["test"], cfg["eval"], desc="test")
    else:
        sys.exit(__doc__)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

