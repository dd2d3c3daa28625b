"""Where a pause run goes wrong, on the synthetic catalogue (configs/demo_smollm2.yaml; no training, run folders are
only read). docs/RESULTS.md "why the pauses lose" has its figures.

    python tools/pause_analysis.py RUN_DIR [RUN_DIR ..] [--init]

For each run, on its test users:
  1. the misses at rank 1, split by what the top item gets wrong: the type (the routine's next type, which the
     last item fixes), the brand (the target's), or both; and how often the top item's brand is the history's
     most frequent one (the user's loyal brand, as the catalogue writes it: data.load_synthetic)
  2. the attention weight (softmax(q k^T / sqrt(Dh)), averaged over heads and test users, per block) that the
     LAST prompt position (the last pause; the last history SID token in a plain run) puts on: the last
     history item's SID tokens, the earlier pauses, BOS, itself, and the rest of the history
--init: the same attention for the run's model before training (the backbone's weights and our initial rows),
     so one can see where the pauses look before SFT moves anything.
"""

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's modules, from tools/
import backbones  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import pauserec  # noqa: E402
from model import apply_rope  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- rank-1 misses


def miss_split(ds, examples, top1: torch.Tensor) -> dict:
    """Fractions of the users: hit at rank 1, and misses split into wrong type only, wrong brand only, both;
    top_is_loyal: the top item's brand is the history's most frequent brand."""
    meta, out = ds.item_meta, Counter()
    for ex, top in zip(examples, top1.tolist()):
        t, p = meta[ex.target], meta[top]
        brand_ok, type_ok = p["brand"] == t["brand"], p["category"] == t["category"]
        out["hit@1" if top == ex.target else
            "wrong type only" if brand_ok else "wrong brand only" if type_ok else "wrong brand and type"] += 1
        loyal = Counter(meta[h]["brand"] for h in ex.history).most_common(1)[0][0]
        out["top is loyal brand"] += p["brand"] == loyal
        out["target is loyal brand"] += t["brand"] == loyal
    return {k: round(v / len(examples), 4) for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------------------------- attention


def attention_weights(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """ids [1, T] (one prompt, no padding) -> per block the attention weights [H, T, T], recomputed from the q and
    k that each block's attention reads (a pre-hook on CausalSelfAttention: its inputs x, mask, cache, layer, rope);
    the model's own forward (scaled_dot_product_attention) runs unchanged."""
    weights = []

    def grab(module, args):
        x, _, _, _, rope = args
        N, T, _ = x.shape
        H, Hkv, Dh = module.n_head, module.n_kv_head, module.head_dim
        q, k, _ = module.c_attn(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=2)
        q, k = (t.view(N, T, -1, Dh).transpose(1, 2) for t in (q, k))     # [1, H or Hkv, T, Dh]
        if module.q_norm is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.repeat_interleave(H // Hkv, dim=1)                           # grouped-query: k per query head
        scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)                    # [1, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        weights.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])

    hooks = [block.attn.register_forward_pre_hook(grab) for block in model.transformer.h]
    try:
        model.hidden(ids)
    finally:
        for h in hooks:
            h.remove()
    return weights


def where_last_looks(model, tok, mcfg, examples) -> list[dict]:
    """Per block, the mean over examples (and heads) of the last prompt position's attention on each part of
    the prompt [BOS] sid(h1) .. sid(hn) <pause>*k."""
    L, k = tok.num_levels, mcfg.active_pauses
    sums = None
    for ex in examples:
        prompt = pauserec.build_prompt(tok, mcfg, ex.history)
        T = len(prompt)
        last_item = range(T - k - L, T - k)                # the last history item's SID tokens
        parts = {"last item SID": list(last_item), "earlier pauses": list(range(T - k, T - 1)), "BOS": [0],
                 "itself": [T - 1] if k else [], "rest of history": list(range(1, T - k - L))}
        with torch.no_grad():
            w = attention_weights(model, torch.tensor([prompt]))       # per block [H, T, T]
        row = [{name: float(wb[:, -1, idx].sum(-1).mean()) if idx else 0.0 for name, idx in parts.items()}
               for wb in w]
        sums = row if sums is None else [{n: s[n] + r[n] for n in s} for s, r in zip(sums, row)]
    return [{n: round(v / len(examples), 4) for n, v in s.items()} for s in sums]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--init", action="store_true", help="also the attention of the model before training")
    args = parser.parse_args(argv)
    out = {}
    for run in args.runs:
        cfg, ds, codes, tok, model = evaluate.load_run(run)
        mcfg, ecfg = cfg["model"], cfg["eval"]
        test = data.leave_one_out(ds.sequences, cfg["data"].max_history)["test"]
        model.eval()
        ranked = evaluate.recommend(model, tok, mcfg, pauserec.SIDTrie(codes), test, ecfg.beam_size, 10,
                                    ecfg.batch_size, desc=None)
        res = {"misses": miss_split(ds, test, ranked[:, 0]), "attention": where_last_looks(model, tok, mcfg, test)}
        if args.init:
            fresh = backbones.make_model(mcfg, tok, pretrained=True).eval()
            res["attention at init"] = where_last_looks(fresh, tok, mcfg, test)
        out[run] = res
        print(run, json.dumps(res, indent=1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
