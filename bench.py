"""Speed and cost figures (the paper's comparison and its probe: paper.py). Each command prints one JSON object on
the last line of stdout.

    python bench.py beam [--items 12000,100000,1000000] [--users 256] [--beam 20] [--threads 0]
                         [--peer] [--peer-users 32]
        constrained beam search on random catalogues: trie build seconds, users/s, and the share of
        time spent in the transformer (the rest is trie masking, top-k and KV-cache reordering).
        --peer (needs transformers): on the first catalogue, the same weights exported into
        transformers' GPT2LMHeadModel and generate(num_beams, prefix_allowed_tokens_fn) on the same
        prompts: top-10 agreement with ours and users/s of both, at batch 1 and batch --peer-users
    python bench.py reasoning CONFIG [--quick] [--jobs N] [--seeds N] [--modes A,B] [--out DIR]
                         [--time-steps 20] [--time-users 512] [key=value ...]
        train and evaluate the modes none, pause (M = 1, 2, 4, 8) and cot (rationale noise 0, 0.5, 1)
        on the same data, SIDs and budget (--jobs N: N modes at once, as separate processes; finished
        modes in DIR are reused; --seeds N: each mode with train.seed 0..N-1, metrics as mean and std);
        then time each mode's training steps and beam search in this process, in interleaved rounds
    python bench.py seeds CONFIG [--seeds 3] [--jobs N] [--out DIR] [key=value ...]
        train and evaluate one setting with train.seed = 0..N-1 (one run folder each, under DIR, default
        runs/seeds_<config stem>; finished runs are reused), then the mean and (sample) std over the seeds of
        every validation and test metric and of the training seconds
    python bench.py finetune CONFIG [--depths 2,8,30] [--steps 5] [--threads N] [--peak-gflops X] [--settings A,B]
                         [--batch-tokens N] [--profile DIR [--profile-steps 3]] [key=value ...]
        the pretrained backbone cut to each depth (model.keep_layers), trained with every weight
        (model.train_text_rows=true), with its text rows frozen (the default), and with our rows only
        (model.train_only_new_tokens=true): trained parameters, training tokens/s (real tokens, not padding) over
        --steps optimizer steps after a warm-up step (fewer if the data makes fewer batches; train.amp as
        configured), and MFU against the card's dense bf16 spec peak (H100 SXM and H200 989 TFLOP/s, A100 312, ...;
        a card not listed and a CPU: the torch.mm rate measured here, which is printed beside it in any case).
        --profile DIR: a torch.profiler trace of each row's steps in DIR and its top-15 ops printed

Timings are medians of 3 repetitions after a warm-up; compare figures from the same run only.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

import common
import data
import evaluate
import mfu
import pauserec
import sid
import sweep
from model import GPT, ModelConfig


class TimedModel(torch.nn.Module):
    """Wraps a GPT and adds up the seconds spent in its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out

    @property
    def device(self):
        return self.model.device

    @property
    def head_start(self):
        return self.model.head_start


def random_catalogue(n, levels=3, size=256, seed=0):
    """n random SIDs [n, levels (+1 collision level)], like an RQ table of `size`-code codebooks."""
    gen = torch.Generator().manual_seed(seed)
    return sid.add_collision_level(torch.randint(size, (n, levels), generator=gen))


# ---------------------------------------------------------------------------------------------- peer: HF generate


def to_hf_gpt2(model, tok):
    """Our GPT's weights in a `transformers.GPT2LMHeadModel` (eval mode): the same names, but GPT-2's Conv1D
    layers (c_attn, c_proj, c_fc) hold [in, out] where nn.Linear holds [out, in]."""
    import transformers
    cfg = model.cfg
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
        layer_norm_epsilon=model.transformer.ln_f.eps, activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.BOS, eos_token_id=tok.EOS, pad_token_id=tok.PAD)).eval()
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    state = {k: v for k, v in model.state_dict().items() if k not in ("new_rows", "new_head_rows")}
    state["transformer.wte.weight"] = state["lm_head.weight"] = model.input_rows()   # a pretrained one's rows apart
    missing, unexpected = ref.load_state_dict(
        {k: v.t() if k.endswith(conv1d) else v for k, v in state.items()}, strict=False)
    if unexpected or not all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
        raise RuntimeError(f"to_hf_gpt2: weights do not map: missing {missing}, unexpected {unexpected}")
    return ref


def trie_allowed_tokens(trie, tok, n, memo=None):
    """generate()'s prefix_allowed_tokens_fn: the SID tokens that extend the tokens decoded after the n
    (padded) prompt tokens to a prefix of a catalogue item, as MiniOneRec, LC-Rec and OneRec-Think build it
    (a lookup per decoded prefix; `memo`, shared between calls, plays their precomputed prefix table)."""
    memo = {} if memo is None else memo

    def allowed(_, ids):
        key = tuple(ids[n:].tolist())
        if key not in memo:
            p = 0
            for d, t in enumerate(key):
                children, prefixes = trie.children(d, p)
                p = prefixes[children.index(t - tok.offsets[d])]
            memo[key] = [tok.offsets[len(key)] + c for c in trie.children(len(key), p)[0]]
        return memo[key]
    return allowed


def hf_beam_search(ref, tok, trie, prompts, beam_size, topk, memo=None):
    """pauserec.beam_search's output from HF generate on left-padded prompts (with an attention mask):
    items [B, topk] (-1 where a sequence is no item) and generate's sequence scores [B, topk]."""
    ids, mask = pauserec.left_pad(prompts, pad=tok.PAD)
    L = trie.num_levels
    with torch.inference_mode():
        out = ref.generate(ids, attention_mask=mask.long(), num_beams=beam_size, num_return_sequences=topk,
                           max_new_tokens=L, do_sample=False, length_penalty=0.0, early_stopping=True,
                           prefix_allowed_tokens_fn=trie_allowed_tokens(trie, tok, ids.shape[1], memo),
                           output_scores=True, return_dict_in_generate=True)
    items = [trie.lookup([t - o for t, o in zip(seq[-L:].tolist(), tok.offsets)]) for seq in out.sequences]
    return torch.tensor(items).view(len(prompts), topk), out.sequences_scores.view(len(prompts), topk)


def in_chunks(search, chunks):
    """(items, scores) of search(chunk) for each chunk of prompts, concatenated."""
    out = [search(c) for c in chunks]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def bench_peer(model, tok, mcfg, trie, prompts, beam, tie_tol=1e-5):
    """Ours vs HF generate on the same weights and prompts, at batch 1 and batch len(prompts)."""
    import transformers
    transformers.logging.set_verbosity_error()
    ref = to_hf_gpt2(model, tok)
    P, K, memo = len(prompts), 10, {}
    rows = []
    for batch in sorted({1, P}):
        chunks = [prompts[i: i + batch] for i in range(0, P, batch)]
        ours = functools.partial(in_chunks, lambda c: pauserec.beam_search(model, tok, mcfg, trie, c, beam, K), chunks)
        theirs = functools.partial(in_chunks, lambda c: hf_beam_search(ref, tok, trie, c, beam, K, memo), chunks)
        s_ours, s_theirs = sweep.median_seconds(ours), sweep.median_seconds(theirs)  # one after the other, same threads
        (items, scores), (hf_items, hf_scores) = ours(), theirs()
        same = (items == hf_items).all(1)
        tied = same.clone()
        for u in torch.nonzero(~same).flatten().tolist():   # differing lists: are the differences ties?
            if bool((hf_items[u] >= 0).all()):   # same scores rank by rank, teacher-forced for HF's items
                true = pauserec.score_items(model, tok, mcfg, prompts[u], hf_items[u].tolist())
                tied[u] = bool(((true - scores[u]).abs() <= tie_tol).all())
        rows.append({"batch": batch, "ours_users_per_s": round(P / s_ours, 1),
                     "generate_users_per_s": round(P / s_theirs, 1), "ours_speedup": round(s_theirs / s_ours, 2),
                     "top10_identical": round(same.float().mean().item(), 4),
                     "top10_same_up_to_ties": round(tied.float().mean().item(), 4),
                     "max_abs_score_diff": float(f"{(hf_scores - scores).abs().max().item():.3g}")})
        print(json.dumps({"peer": rows[-1]}), flush=True)
    return {"items": len(trie.leaf_item), "users": P, "beam": beam, "topk": K, "tie_tol": tie_tol,
            "threads": torch.get_num_threads(), "transformers": transformers.__version__, "rows": rows}


# ----------------------------------------------------------------------------------------------


def bench_beam(args):
    if args.peer:   # the argument first: its error does not depend on what is installed
        if not 0 < args.peer_users <= args.users:
            raise ValueError(f"bench.py beam: --peer-users must be in 1..--users ({args.users}), got {args.peer_users}")
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("bench.py beam --peer compares with transformers' generate(): "
                             "pip install -r requirements-dev.txt") from None
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the default size (4 layers, d=128) with M=4 pauses before the target, as in docs/RESULTS.md
    mcfg = ModelConfig(reasoning="pause", num_pauses=4, pause_layout="target")
    rows = []
    for n in [int(x) for x in args.items.split(",")]:
        codes = random_catalogue(n)
        t0 = time.perf_counter()
        trie = pauserec.SIDTrie(codes)
        build = time.perf_counter() - t0
        tok = pauserec.Tokens.from_codes(codes)
        model = TimedModel(GPT(mcfg, tok.size).eval())
        gen = torch.Generator().manual_seed(1)
        histories = torch.randint(n, (args.users, 20), generator=gen).tolist()   # 20-item histories
        prompts = [pauserec.build_prompt(tok, mcfg, h) for h in histories]
        run = functools.partial(pauserec.beam_search, model, tok, mcfg, trie, prompts, beam_size=args.beam, topk=10)
        seconds = sweep.median_seconds(run)
        model.seconds, t0 = 0.0, time.perf_counter()   # one more run, to split its time
        run()
        share = model.seconds / (time.perf_counter() - t0)
        rows.append({"items": n, "sid_levels": codes.shape[1], "trie_build_s": round(build, 3),
                     "users_per_s": round(args.users / seconds, 1), "ms_per_user": round(1e3 * seconds / args.users, 3),
                     "transformer_share": round(share, 3)})
        print(json.dumps(rows[-1]), flush=True)
        if args.peer and len(rows) == 1:   # the first (Beauty-sized) catalogue only
            peer = bench_peer(model.model, tok, mcfg, trie, prompts[: args.peer_users], args.beam)
    base = rows[0]["ms_per_user"]
    result = {"beam": args.beam, "users": args.users, "threads": torch.get_num_threads(), "rows": rows,
              "ms_per_user_ratio_vs_first": [round(r["ms_per_user"] / base, 2) for r in rows]}
    if args.peer:
        result["peer"] = peer
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------

MODES = [("none", ["model.reasoning=none", "model.num_pauses=0"])] + \
        [(f"pause M={m}", ["model.reasoning=pause", f"model.num_pauses={m}"]) for m in (1, 2, 4, 8)] + \
        [(f"cot noise={p}", ["model.reasoning=cot", f"model.rationale_noise={p}", "model.pause_layout=target"])
         for p in (0.0, 0.5, 1.0)]

QUICK = ["data.num_users=400", "data.num_items=80", "sid.codebook_size=8", "sid.embed_dim=32", "sid.hidden=[64]",
         "sid.latent_dim=8", "sid.epochs=20", "sid.batch_size=80", "model.n_layer=2", "model.d_model=32",
         "model.n_head=2", "train.epochs=3", "train.batch_size=32", "train.warmup_steps=5", "train.patience=0",
         "train.refit_epochs=0"]


def train_steps(tok, mcfg, ds, max_history, batch_size, model, device, steps=20, weight_decay=0.0):
    """(fn, tokens): fn runs `steps` optimizer steps (forward, backward, AdamW) on a copy of the model with
    batches of the run's size, over `tokens` training tokens; timing it gives a mode's training throughput."""
    import copy
    batches, tokens = sweep.training_batches(tok, mcfg, ds, max_history, batch_size, steps)
    step = sweep.optimizer_step(copy.deepcopy(model), device, weight_decay)

    def run():
        for ids, loss_mask in batches:
            step(ids, loss_mask)
        sweep.synchronize(device)
    return run, sum(tokens)


def mode_runs(config, overrides, out_dir, seeds=1, modes=""):
    """[(mode name, run folder name, train.py arguments)] of the reasoning table: one per mode (the config's
    train.seed), or with seeds > 1 one per mode and seed 0..seeds-1 (folders <mode>_seed<s>).
    modes: a comma-separated subset of MODES' names ('' = all)."""
    runs = []
    for name, mode in pick_modes(modes):
        slug = name.replace(" ", "_").replace("=", "")
        for s in range(seeds):
            run, seed = (slug, []) if seeds == 1 else (f"{slug}_seed{s}", [f"train.seed={s}"])
            runs.append((name, run, [config, *overrides, *mode, *seed, f"train.name={run}",
                                     f"train.out_dir={out_dir}"]))
    return runs


def pick_modes(modes: str):
    if not modes:
        return MODES
    names = [m.strip() for m in modes.split(",")]
    known = dict(MODES)
    for m in names:
        if m not in known:
            raise ValueError(f"--modes: unknown mode {m!r}; the modes are {', '.join(known)}")
    return [(m, known[m]) for m in names]


def seed_runs(config, overrides, out_dir, seeds):
    """[(name, run folder name, train.py arguments)] of one setting with train.seed = 0..seeds-1."""
    return [(f"seed {s}", f"seed{s}", [config, *overrides, f"train.seed={s}", f"train.name=seed{s}",
                                       f"train.out_dir={out_dir}"]) for s in range(seeds)]


def bench_reasoning(args, overrides):
    import train
    sweep.check_counts(args, "bench.py reasoning")
    overrides = (QUICK if args.quick else []) + overrides
    out_dir = Path(args.out)
    runs = mode_runs(args.config, overrides, out_dir, args.seeds, args.modes)
    t0 = time.time()
    sweep.train_runs(args, [r for r in runs if not sweep.finished(out_dir / r[1], r[2])])
    wall = time.time() - t0
    table, timed = [], []   # timed: (row, key, fn, count); count / seconds is the figure
    for name, slug, run_args in runs[::args.seeds]:   # a mode's first seed is timed; its metrics: all seeds
        seeds = [json.loads((out_dir / r[1] / "metrics.json").read_text()) for r in runs if r[0] == name]
        metrics = seeds[0]   # slug's: the mode's first seed
        now = common.load_config(run_args[0], run_args[1:], train.SECTIONS)   # this machine's settings
        device = train.pick_device(now["train"].device)
        if now["train"].threads:
            torch.set_num_threads(now["train"].threads)
        where = [f"data.dir={now['data'].dir}"] if now["data"].dir else []   # the data may live elsewhere now
        cfg, ds, codes, tok, model = evaluate.load_run(out_dir / slug, where, device)
        trie = pauserec.SIDTrie(codes)
        test = data.leave_one_out(ds.sequences, cfg["data"].max_history)["test"]
        ecfg = cfg["eval"]
        row = {"mode": name, "valid": metrics["valid"], "test": metrics["test"],
               "train_seconds": metrics["train_seconds"], "train_tokens": metrics["train_tokens"],
               "epochs": round(metrics["steps"] / max(1, metrics["steps_per_epoch"]), 2), "device": device}
        if args.seeds > 1:   # metrics and train seconds: means over the seeds, their std beside them
            summary = sweep.over_seeds(seeds)
            for split in ("valid", "test"):
                row[split] = {k: v["mean"] for k, v in summary[split].items()}
                row[split + "_std"] = {k: v["std"] for k, v in summary[split].items()}
            row["train_seconds"], row["train_seconds_std"] = summary["train_seconds"].values()
            row["seeds"] = args.seeds
        fn, tokens = train_steps(tok, cfg["model"], ds, cfg["data"].max_history, now["train"].batch_size, model,
                                 device, args.time_steps, now["train"].weight_decay)
        timed.append((row, "train_tokens_per_s", fn, tokens))
        for batch in (1, 256):
            n = 64 if args.quick else args.time_users   # users timed at batch 256, and a 16th of them at batch 1
            users = test[: max(1, n // 16) if batch == 1 else n]
            fn = functools.partial(evaluate.recommend, model, tok, cfg["model"], trie, users, ecfg.beam_size,
                                   max(ecfg.ks), batch, device, None)
            timed.append((row, f"users_per_s_batch{batch}", fn, len(users)))
        table.append(row)
    # The honest counting: cot's figures include decoding its rationale, pause's the prefill of its pauses.
    for (row, key, _, count), seconds in zip(timed, sweep.interleaved_medians([t[2] for t in timed])):
        row[key] = round(count / seconds, 1)
        if key.startswith("users"):
            row["ms_per_user" + key[len("users_per_s"):]] = round(1e3 * seconds / count, 2)
    print_table(table)
    result = {"table": table, "wall_seconds": round(time.time() - t0), "train_wall_seconds": round(wall)}
    (out_dir / "reasoning.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return table


def print_table(table):
    head = ["mode", "valid N@10", "test R@5", "test N@5", "test R@10", "test N@10", "epochs", "train Mtok",
            "train tok/s", "train s (alone)", "users/s b1", "ms/user b1", "users/s b256"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    def cell(r, split, key):   # mean ± std over seeds (bench.py reasoning --seeds N), else the one run's value
        std = r.get(split + "_std")
        return f"{r[split][key]:.4f}" + (f" ± {std[key]:.4f}" if std else "")
    for r in table:
        cells = [r["mode"], cell(r, "valid", "ndcg@10"), cell(r, "test", "recall@5"), cell(r, "test", "ndcg@5"),
                 cell(r, "test", "recall@10"), cell(r, "test", "ndcg@10"), f"{r['epochs']}",
                 f"{r['train_tokens'] / 1e6:.1f}",
                 f"{r['train_tokens_per_s']}", f"{r['train_tokens'] / r['train_tokens_per_s']:.0f}",
                 f"{r['users_per_s_batch1']}", f"{r['ms_per_user_batch1']}", f"{r['users_per_s_batch256']}"]
        print("| " + " | ".join(cells) + " |")


def bench_seeds(args, overrides):
    """One setting over seeds 0..N-1: train (or reuse) each run, then mean and std of its metrics."""
    sweep.check_counts(args, "bench.py seeds")
    args.out = args.out or f"runs/seeds_{Path(args.config).stem}"
    out_dir = Path(args.out)
    runs = seed_runs(args.config, overrides, out_dir, args.seeds)
    t0 = time.time()
    sweep.train_runs(args, [r for r in runs if not sweep.finished(out_dir / r[1], r[2])])
    metrics = [json.loads((out_dir / slug / "metrics.json").read_text()) for _, slug, _ in runs]
    summary = sweep.over_seeds(metrics)
    head = ["metric", "mean", "std", *(f"seed {s}" for s in range(args.seeds))]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for split in ("valid", "test"):
        for key, v in summary[split].items():
            values = " | ".join(f"{m[split][key]:.4f}" for m in metrics)
            print(f"| {split} {key} | {v['mean']:.4f} | {v['std']:.4f} | {values} |")
    v = summary["train_seconds"]
    print(f"| train seconds | {v['mean']:.1f} | {v['std']:.1f} | "
          + " | ".join(f"{m['train_seconds']:.1f}" for m in metrics) + " |")
    per_run = [{"seed": s, "run": str(out_dir / slug), "valid": m["valid"], "test": m["test"],
                "train_seconds": m["train_seconds"]} for s, ((_, slug, _), m) in enumerate(zip(runs, metrics))]
    result = {"config": args.config, "overrides": overrides, "seeds": args.seeds, "out": str(out_dir),
              "summary": summary, "runs": per_run, "wall_seconds": round(time.time() - t0)}
    (out_dir / "seeds.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result



def main(argv):
    import train  # for the config keys that `reasoning` passes on to train.py
    keys = ("reasoning, seeds and finetune pass their key=value arguments on to train.py.\n\n"
            + common.cli_help("", train.SECTIONS))
    raw = argparse.RawDescriptionHelpFormatter   # keeps the docstring's and the key list's lines
    parser = common.Parser(description=__doc__, formatter_class=raw, epilog=keys, prog="bench.py")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("beam")
    b.add_argument("--items", default="12000,100000,1000000")
    b.add_argument("--users", type=int, default=256)
    b.add_argument("--beam", type=int, default=20)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--peer", action="store_true", help="also compare with transformers' generate() (first --items)")
    b.add_argument("--peer-users", type=int, default=32, help="users (of --users) in the --peer comparison")
    r = sub.add_parser("reasoning", formatter_class=raw, epilog=keys)
    r.add_argument("config")
    r.add_argument("--quick", action="store_true", help="a tiny model and 3 epochs: a smoke check in minutes")
    r.add_argument("--out", default="runs/bench_reasoning")
    r.add_argument("--jobs", type=int, default=1, help="modes trained at once, as separate processes; "
                   "their train seconds then overlap: compare modes by train_tokens_per_s, measured alone")
    r.add_argument("--seeds", type=int, default=1, help="each mode with train.seed 0..N-1: metrics as mean ± std "
                   "(with 1, the config's seed, in the folders of a bench without --seeds)")
    r.add_argument("--time-steps", type=int, default=20, help="training steps per timing round")
    r.add_argument("--time-users", type=int, default=512, help="test users per beam-search timing round at batch "
                   "256 (at batch 1: a 16th of them); a pretrained LM on a CPU wants fewer of both")
    r.add_argument("--modes", default="", help="a comma-separated subset, e.g. 'none,pause M=2,cot noise=0.0' "
                   "(default: all)")
    s = sub.add_parser("seeds", formatter_class=raw, epilog=keys)
    s.add_argument("config")
    s.add_argument("--seeds", type=int, default=3, help="runs with train.seed = 0..N-1")
    s.add_argument("--out", default="", help="folder of the runs (default runs/seeds_<config stem>)")
    s.add_argument("--jobs", type=int, default=1, help="runs trained at once, as separate processes "
                   "(their train seconds then overlap)")
    f = sub.add_parser("finetune", formatter_class=raw, epilog=keys)
    f.add_argument("config")
    f.add_argument("--depths", default="2,8,30", help="blocks kept (model.keep_layers), comma-separated")
    f.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row, after one warm-up step")
    f.add_argument("--threads", type=int, default=0, help="torch threads (0: train.threads, else torch's default)")
    f.add_argument("--peak-gflops", type=float, default=0.0, help="the peak the MFU is measured against, in "
                   "GFLOP/s; 0: the card's dense bf16 spec peak (mfu.SPEC_PEAKS), else torch.mm's rate measured here")
    f.add_argument("--settings", default="", help="a comma-separated subset of the settings, e.g. 'text rows frozen' "
                   "(default: all)")
    f.add_argument("--batch-tokens", type=int, default=0, help="token-budgeted batches of at most N padded tokens "
                   "(train.batch_tokens; 0: the config's)")
    f.add_argument("--profile", default="", metavar="DIR", help="trace each row's steps with torch.profiler into DIR "
                   "and print its top-15 ops")
    f.add_argument("--profile-steps", type=int, default=3, help="--profile: steps traced per row")
    args, rest = parser.parse_known_args(argv)
    if args.command == "beam":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        return bench_beam(args)
    if args.command == "seeds":
        return bench_seeds(args, rest)
    if args.command == "finetune":
        return mfu.bench_finetune(args, rest)
    return bench_reasoning(args, rest)


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
