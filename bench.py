"""Speed and cost figures. Each command prints one JSON object on the last line of stdout.

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
    python bench.py probe RUN_DIR [--items 200] [--seed 0]
        the paper's limitations 1 and 2 on a pretrained backbone, for the run's model and for the backbone it
        started from: perplexity of an item's category after its title (world knowledge kept), and how far an
        item's SID tokens are aligned with its title (embedding cosine gap; in-context top-1 retrieval)
    python bench.py pauserec CONFIG [--seeds 1] [--jobs N] [--out DIR] [--dry-run [--tokens-per-s X]] [key=value ...]
        the paper's pipeline on a pretrained backbone (stages.py): SID-text alignment once; from it plain SFT, pause
        pre-training then pause SFT (k = model.num_pauses, 5 unless set), and CoT SFT; the same SFTs from the backbone
        as loaded; every SFT on one example per user (model.pause_layout=last). One table: valid and test R@10 and
        N@10 (mean ± std over seeds; CoT one seed), training tokens and seconds per stage, latency at batch 1 and
        throughput at batch --time-users, the probe, MostPop and Markov. Finished runs are reused (DIR, default
        runs/pauserec_<config stem>). --dry-run trains nothing: each run's tokens and expected seconds

    python bench.py finetune CONFIG [--depths 2,8,30] [--steps 5] [--threads N] [--peak-gflops X] [key=value ...]
        the pretrained backbone cut to each depth (model.keep_layers), trained with every weight
        (model.train_text_rows=true), with its text rows frozen (the default), and with our rows only
        (model.train_only_new_tokens=true): trained parameters, training tokens/s (real tokens, not padding) over
        --steps optimizer steps after a warm-up step, and MFU against the float32 torch.mm rate measured here

Timings are medians of 3 repetitions after a warm-up; compare figures from the same run only.
"""
import argparse
import dataclasses
import functools
import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import backbones
import bpe
import common
import data
import evaluate
import pauserec
import rationales
import sid
import stages
from model import GPT, ModelConfig


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
        s_ours, s_theirs = median_seconds(ours), median_seconds(theirs)   # one after the other, same threads
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
        seconds = median_seconds(run)
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


def train_modes(args, runs):
    """Train every mode: one after another in this process (--jobs 1), or as --jobs concurrent
    `python train.py` processes (many cores, or one GPU that a single small model leaves idle)."""
    import train  # bench.py sits beside train.py and drives it; nothing imports bench.py
    if args.jobs == 1:
        for _, _, run_args in runs:
            train.main(run_args)
        return
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < args.jobs:
            _, slug, run_args = pending.pop(0)
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
                sys.exit(f"bench.py: training failed (exit {proc.returncode}), see {log}")
            print(f"done: {log}", flush=True)


def training_batches(tok, mcfg, ds, max_history, batch_size, steps):
    """(batches, tokens): up to `steps` batches [(ids, loss_mask)] of the run's size, built as train.py builds them
    (its examples, its shuffled length-sorted batches), and each batch's real tokens (padding not counted)."""
    import train
    ds = ds._replace(sequences=ds.sequences[: 4 * steps * batch_size])   # enough examples for `steps` batches
    split = data.leave_one_out(ds.sequences, max_history)
    examples = train.training_examples(tok, mcfg, ds, split, max_history, random.Random(0))
    order = train.batches(examples, batch_size, torch.Generator().manual_seed(0))[:steps]
    return ([pauserec.collate([examples[i] for i in rows], tok.PAD) for rows in order],
            [sum(len(examples[i][0]) for i in rows) for rows in order])


def optimizer_step(model, device, weight_decay):
    """step(ids, loss_mask): one training step of model (forward, backward, AdamW) over the parameters that require
    grad, in train.param_groups' groups as train.py makes them: frozen weights get no gradient and no update."""
    import train
    model.train()
    opt = torch.optim.AdamW(train.param_groups(model, weight_decay), lr=1e-4)

    def step(ids, loss_mask):
        loss = pauserec.training_loss(model, ids.to(device), loss_mask.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def synchronize(device):
    """Wait for the accelerator's queued work, so that a timer around it counts it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(tok, mcfg, ds, max_history, batch_size, model, device, steps=20, weight_decay=0.0):
    """(fn, tokens): fn runs `steps` optimizer steps (forward, backward, AdamW) on a copy of the model with
    batches of the run's size, over `tokens` training tokens; timing it gives a mode's training throughput."""
    import copy
    batches, tokens = training_batches(tok, mcfg, ds, max_history, batch_size, steps)
    step = optimizer_step(copy.deepcopy(model), device, weight_decay)

    def run():
        for ids, loss_mask in batches:
            step(ids, loss_mask)
        synchronize(device)
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
    import train
    resolved = {k: asdict(v) for k, v in run_config(run_args).items()}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    diff = train.changed_settings(saved, resolved, sections=resolved, ignore={*train.RUN_KEYS, *ignore})
    if diff:
        raise ValueError(f"bench.py: {run_dir} holds a run with other settings ({'; '.join(diff)}): "
                         f"pass another --out")
    print(f"reusing the finished run {run_dir}")
    return True


def bench_reasoning(args, overrides):
    import train
    check_counts(args, "reasoning")
    overrides = (QUICK if args.quick else []) + overrides
    out_dir = Path(args.out)
    runs = mode_runs(args.config, overrides, out_dir, args.seeds, args.modes)
    t0 = time.time()
    train_modes(args, [r for r in runs if not finished(out_dir / r[1], r[2])])
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
            summary = over_seeds(seeds)
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
    for (row, key, _, count), seconds in zip(timed, interleaved_medians([t[2] for t in timed])):
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


def check_counts(args, command):
    for key in ("jobs", "seeds"):
        if getattr(args, key) < 1:
            raise ValueError(f"bench.py {command}: --{key} must be >= 1, got {getattr(args, key)}")


def bench_seeds(args, overrides):
    """One setting over seeds 0..N-1: train (or reuse) each run, then mean and std of its metrics."""
    check_counts(args, "seeds")
    args.out = args.out or f"runs/seeds_{Path(args.config).stem}"
    out_dir = Path(args.out)
    runs = seed_runs(args.config, overrides, out_dir, args.seeds)
    t0 = time.time()
    train_modes(args, [r for r in runs if not finished(out_dir / r[1], r[2])])
    metrics = [json.loads((out_dir / slug / "metrics.json").read_text()) for _, slug, _ in runs]
    summary = over_seeds(metrics)
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



# ----------------------------------------------------------------------------------------------
# The paper's limitations 1 and 2, probed on a pretrained backbone before and after SID training

PROBE_PROMPT = "Product: {title}\nCategory:"   # the LM continues it with " {category}" (item_meta's leaf)


@torch.inference_mode()
def probe(model, tok, text, item_meta, items) -> dict:
    """Two figures of a pretrained backbone (text: its tokenizer) on the given items, titled ones only.

    verbalization_ppl (limitation 1, world knowledge): perplexity of ' {category}' after PROBE_PROMPT, the
      softmax over the text vocabulary only (ids < tok.base, so our new rows do not move it).
    sid_title_cos_gap (limitation 2, SID/text alignment in the embeddings): mean cosine between an item's SID
      rows (mean of its L input rows) and its title's text rows (mean), minus the same with the next item's
      title (a derangement of the sample); 0 when SID rows carry nothing of the text.
    sid_to_title_top1 (limitation 2, in context): the final state after [BOS] sid(i) retrieves the state after
      ' {title}' of the same item among the sample's titles (cosine, top-1); chance is 1 / items.
    And the alignment texts as generation (alignment_check).
    """
    model.eval()
    dev = model.device
    rows = model.lm_head.weight[: tok.base]                                         # [base, d] text rows
    prompts = [text.encode(PROBE_PROMPT.format(title=item_meta[i]["title"])) for i in items]
    targets = [text.encode(" " + item_meta[i]["category"]) for i in items]
    nll, count = 0.0, 0
    for p, t in zip(prompts, targets):                     # one item at a time: no padding to reason about
        ids = torch.tensor([p + t], device=dev)
        logp = torch.log_softmax(F.linear(model.hidden(ids)[0, len(p) - 1:-1], rows).float(), -1)  # [len(t), base]
        nll -= float(logp.gather(1, torch.tensor(t, device=dev)[:, None]).sum())
        count += len(t)
    titles = [text.encode(" " + item_meta[i]["title"]) for i in items]
    sid_ids = [[tok.BOS] + tok.sid(i) for i in items]
    emb = lambda ids: model.embed(torch.tensor([ids], device=dev))[0]              # noqa: E731  [T, d]
    sid_rows = torch.stack([emb(s[1:]).mean(0) for s in sid_ids])                 # [n, d]
    title_rows = torch.stack([emb(t).mean(0) for t in titles])
    match = F.cosine_similarity(sid_rows, title_rows, -1)
    other = F.cosine_similarity(sid_rows, title_rows.roll(1, 0), -1)
    last = lambda ids: model.hidden(torch.tensor([ids], device=dev))[0, -1]        # noqa: E731  [d]
    h_sid = F.normalize(torch.stack([last(s) for s in sid_ids]), dim=-1)
    h_title = F.normalize(torch.stack([last(t) for t in titles]), dim=-1)
    top1 = (h_sid @ h_title.T).argmax(1).cpu() == torch.arange(len(items))
    return {"items": len(items), "verbalization_ppl": math.exp(nll / count),
            "sid_title_cos_gap": float((match - other).mean()), "sid_to_title_top1": float(top1.float().mean()),
            "chance_top1": 1 / len(items),
            **alignment_check(model, tok, text, item_meta, items, model.cfg.max_title_len)}


@torch.inference_mode()
def alignment_check(model, tok, text, item_meta, items, max_title_len: int, n_first: int = 3) -> dict:
    """The alignment texts' two directions as generation, on the given items (stages.alignment_pair's prompts).

    title_to_sid_top1: from '[BOS] {title}. Category: {category}. Item:' the trie-constrained beam search (beam 10)
      ranks the item's own SID first; chance is 1 / catalogue items.
    sid_to_title_first: from '[BOS] Item sid(i) is' greedy decoding over the whole vocabulary writes the first
      n_first tokens of the item's own description; sid_to_title_other: of another item's (the next in the
      sample), what a model that ignores the SID gets.
    """
    model.eval()
    pairs = [stages.alignment_pair(tok, text, i, item_meta[i], max_title_len) for i in items]
    split = lambda ex: (ex[0][: ex[1].index(True)], ex[0][ex[1].index(True):])   # noqa: E731  (prompt, answer)
    to_text, to_sid = zip(*[(split(a), split(b)) for a, b in pairs])
    codes = torch.tensor(tok.item_sids) - torch.tensor(tok.offsets)
    cfg = dataclasses.replace(model.cfg, reasoning="none")
    found, _ = pauserec.beam_search(model, tok, cfg, pauserec.SIDTrie(codes), [p for p, _ in to_sid], 10, 1)
    written = []
    for prompt, _ in to_text:                         # greedy, one item at a time (a few tokens each)
        ids = torch.tensor([prompt], device=model.device)
        for _ in range(n_first):
            logits = model.logits(model.hidden(ids)[0, -1], every_token=True)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
        written.append(ids[0, len(prompt):].tolist())
    firsts = [answer[:n_first] for _, answer in to_text]
    return {"title_to_sid_top1": float((found[:, 0].cpu() == torch.tensor(items)).float().mean()),
            "chance_title_to_sid": 1 / len(codes),
            "sid_to_title_first": statistics.fmean(w == f for w, f in zip(written, firsts)),
            "sid_to_title_other": statistics.fmean(w == f for w, f in zip(written, firsts[1:] + firsts[:1]))}


def bench_probe(args, overrides):
    """Probe a run's model and the pretrained backbone it started from (same tokens, new rows as initialised)."""
    cfg, ds, codes, tok, model = evaluate.load_run(args.run_dir, overrides)
    mcfg = cfg["model"]
    if mcfg.backbone == "scratch":
        raise ValueError(f"{args.run_dir} has model.backbone=scratch: the probe needs a pretrained backbone")
    titled = [i for i, m in enumerate(ds.item_meta) if m.get("title") and m.get("category")]
    items = sorted(random.Random(args.seed).sample(titled, min(args.items, len(titled))))
    text = bpe.load_tokenizer(mcfg.hf_dir)
    torch.manual_seed(0)
    before = backbones.make_model(mcfg, tok, pretrained=True)
    rows = {"pretrained": probe(before, tok, text, ds.item_meta, items),
            f"trained ({Path(args.run_dir).name})": probe(model, tok, text, ds.item_meta, items)}
    print("| model | verbalization ppl (lower: more knowledge kept) | SID/title cosine gap | SID -> title top-1 | "
          "title -> SID top-1 | SID -> title's first 3 tokens (another item's) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['verbalization_ppl']:.2f} | {r['sid_title_cos_gap']:.4f} | "
              f"{r['sid_to_title_top1']:.3f} (chance {r['chance_top1']:.3f}) | {r['title_to_sid_top1']:.3f} (chance "
              f"{r['chance_title_to_sid']:.3f}) | {r['sid_to_title_first']:.3f} ({r['sid_to_title_other']:.3f}) |")
    out = {"run": str(args.run_dir), "items": len(items), "probe": rows}
    print(json.dumps(out))
    return out


# ----------------------------------------------------------------------------------------------
# The paper's pipeline (bench.py pauserec): alignment once; from it plain SFT, pause pre-training then pause SFT,
# and CoT SFT; the same SFTs from the backbone as loaded; one table of quality, cost, latency and the probe

PIPELINE_DEFAULTS = ["model.num_pauses=5"]   # k (the paper's), unless the command line sets model.num_pauses
SFT_MODES = (("plain", "plain SFT", ["model.reasoning=none"]), ("pause", "pause SFT", ["model.reasoning=pause"]),
             ("cot", "CoT SFT", ["model.reasoning=cot"]))
# A finished stage is reused whatever the SFT-only settings say: train.* but these, eval.*, and the modes' keys
STAGE_TRAIN_KEYS = {"task", "seed", "batch_size", "align_lr", "align_epochs", "pause_lr", "pause_epochs",
                    "pause_rate", "weight_decay", "grad_clip", "warmup_steps", "min_lr", "amp"}
SFT_MODEL_KEYS = {"num_pauses", "pause_embeddings", "latent_steps", "pause_layout", "loss_on_history",
                  "rationale_file", "rationale_noise", "max_rationale_len", "think_pauses", "step_loss",
                  "step_loss_weight", "step_temp"}


def stage_ignored() -> set[str]:
    import train
    return ({f"train.{f.name}" for f in fields(train.TrainConfig) if f.name not in STAGE_TRAIN_KEYS}
            | {f"eval.{f.name}" for f in fields(evaluate.EvalConfig)} | {f"model.{k}" for k in SFT_MODEL_KEYS})


# The scratch decoder beside the LLM's rows (same data, SIDs, layout and split): configs/demo.yaml's 2 x 64 decoder
# and schedule, with the pretrained-only settings put back to their defaults
SCRATCH = ["model.backbone=scratch", "model.keep_layers=0", "model.sid_init=mean", "model.train_text_rows=false",
           "model.prompt=sids", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.dropout=0.1",
           "train.lr=2e-3", "train.batch_size=32", "train.warmup_steps=50", "train.backbone_lr_ratio=1.0",
           "train.frozen_epochs=0", "train.align_frozen_epochs=0"]


def pipeline_runs(config, overrides, out_dir: Path, seeds: int, cot_seeds: int = 1):
    """[(row, run folder name, wave, train.py arguments)]. Waves run in order, as a run starts from one of an
    earlier wave (model.init_from); the runs of one wave are independent (--jobs runs them at once).
    Every SFT trains one example per user (model.pause_layout=last), as the paper does."""
    base = [config, *PIPELINE_DEFAULTS, *overrides, f"train.out_dir={out_dir}"]
    align, pause = out_dir / "align", out_dir / "pause_pretrain"
    runs = [("alignment", "align", 0, [*base, "model.reasoning=none", "train.task=align", "train.name=align"]),
            ("pause pre-training", "pause_pretrain", 1, [*base, "model.reasoning=none", f"model.init_from={align}",
                                                         "train.task=pause_pretrain", "train.name=pause_pretrain"])]
    for arm, prefix in (("aligned", "sft"), ("not aligned", "noalign")):
        for mode, name, mode_args in SFT_MODES:
            start = None if prefix == "noalign" else pause if mode == "pause" else align
            wave = 0 if start is None else 2 if mode == "pause" else 1
            init = [f"model.init_from={start}"] if start else []
            for s in range(cot_seeds if mode == "cot" else seeds):
                slug = f"{prefix}_{mode}_seed{s}"
                runs.append((f"{arm}: {name}", slug, wave, [*base, *mode_args, "model.pause_layout=last",
                                                            "train.task=rec", *init, f"train.seed={s}",
                                                            f"train.name={slug}"]))
    for s in range(seeds):
        runs.append(("scratch decoder: plain", f"scratch_seed{s}", 0, [*base, "model.reasoning=none", *SCRATCH,
                     "model.pause_layout=last", "train.task=rec", f"train.seed={s}", f"train.name=scratch_seed{s}"]))
    return runs


def pipeline_plan(runs, tokens_per_s: float, peak_tflops: float, jobs: int = 1) -> dict:
    """--dry-run: every run's training texts or examples, built as train.py builds them (no model is trained):
    examples, training tokens, padding share of the batches, users and tokens of its evaluations, and the seconds
    expected: the data loading measured here, plus the tokens at tokens_per_s (evaluation tokens at 3x that rate: a
    forward pass is a third of a training step). Loading the weights is not counted."""
    import train
    loaded, out, backbone = {}, [], None
    for name, slug, wave, run_args in runs:
        cfg = run_config(run_args)
        tcfg, mcfg = cfg["train"], cfg["model"]
        key = json.dumps([asdict(cfg["data"]), asdict(cfg["sid"])], sort_keys=True)
        if key not in loaded:   # one dataset and SID table for every run of the same data
            t0 = time.time()
            ds = data.load_dataset(cfg["data"])
            loaded[key] = ds, train.sid_table(cfg, ds, Path(tcfg.sid_cache))[0], time.time() - t0
        ds, codes, load_s = loaded[key]
        if mcfg.backbone != "scratch":
            backbones.fetch_hf(mcfg)
        words = rationales.rationale_words(ds.item_meta, mcfg.rationale_file) if mcfg.reasoning == "cot" else []
        tok = backbones.make_tokens(mcfg, codes, words, ds.item_meta)
        plan = {"row": name, "run": slug, "wave": wave}
        plan.update(plan_training(cfg, ds, tok) if tcfg.task == "rec" else plan_stage(cfg, ds, tok))
        plan["expected_s"] = round(load_s + (plan["train_tokens"] + plan["eval_tokens"] / 3) / tokens_per_s, 1)
        out.append(plan)
        backbone = backbone or (cfg, tok)   # the first run's model (the alignment's): not the scratch rows'
    flops = 6 * model_size(*backbone)   # FLOPs of a training token, roughly (weights only, head over ours)
    return {"tokens_per_s": tokens_per_s, "runs": out, "expected_s": round(sum(p["expected_s"] for p in out), 1),
            "jobs": jobs, "expected_s_jobs": round(waves_seconds(out, jobs), 1), "train_flops_per_token": flops,
            "implied_mfu": round(flops * tokens_per_s / (peak_tflops * 1e12), 3), "peak_tflops": peak_tflops}


def waves_seconds(plans, jobs: int) -> float:
    """Seconds of the waves one after another, each wave's runs spread over `jobs` lanes (longest first to the
    least loaded lane), as if runs side by side did not slow one another (optimistic)."""
    total = 0.0
    for wave in sorted({p["wave"] for p in plans}):
        lanes = [0.0] * jobs
        for s in sorted((p["expected_s"] for p in plans if p["wave"] == wave), reverse=True):
            lanes[lanes.index(min(lanes))] += s
        total += max(lanes)
    return total


def model_size(cfg, tok) -> int:
    """Weights multiplied per token: the blocks, and the head's rows (ours only with model.head=new)."""
    model = backbones.make_model(cfg["model"], tok, pretrained=False)
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    return blocks + model.head_rows().numel()


def padding_share(examples, batch_size: int) -> float:
    """Share of pad tokens in an epoch of train.batches (length-sorted within chunks)."""
    import train
    order = train.batches(examples, batch_size, torch.Generator().manual_seed(0))
    padded = sum(len(rows) * max(len(examples[i][0]) for i in rows) for rows in order)
    return round(1 - sum(len(x[0]) for x in examples) / padded, 3)


def plan_stage(cfg, ds, tok) -> dict:
    tcfg = cfg["train"]
    examples = stages.stage_examples(tcfg, cfg["model"], tok, ds.item_meta)
    epochs = tcfg.align_epochs if tcfg.task == "align" else tcfg.pause_epochs
    return {"examples": len(examples), "epochs": epochs, "train_tokens": epochs * sum(len(x[0]) for x in examples),
            "padding_share": padding_share(examples, tcfg.batch_size), "eval_users": 0, "eval_tokens": 0}


def plan_training(cfg, ds, tok) -> dict:
    """A next-item run's tokens as train.main counts them (no early stop): epochs, then the refit; its validations
    (eval.valid_users at each, then all users once) and the test, each user a prompt plus beam x SID tokens."""
    import train
    tcfg, mcfg, ecfg, max_history = cfg["train"], cfg["model"], cfg["eval"], cfg["data"].max_history
    split = data.leave_one_out(ds.sequences, max_history)
    rng = random.Random(tcfg.seed)
    examples = train.training_examples(tok, mcfg, ds, split, max_history, rng)
    refit = train.training_examples(tok, mcfg, ds, split, max_history, rng, refit=True) if tcfg.refit_epochs else []
    steps = tcfg.epochs * math.ceil(len(examples) / tcfg.batch_size)
    every = ecfg.every or math.ceil(len(examples) / tcfg.batch_size)
    sample = min(ecfg.valid_users or len(split["valid"]), len(split["valid"]))
    users = math.ceil(steps / every) * sample + len(split["valid"]) + len(split["test"])
    per_user = ecfg.beam_size * tok.num_levels + (mcfg.max_rationale_len if mcfg.reasoning == "cot" else 0)
    prompt = statistics.fmean(len(pauserec.build_prompt(tok, mcfg, ex.history)) for ex in split["test"])
    return {"examples": len(examples), "epochs": tcfg.epochs,
            "train_tokens": tcfg.epochs * sum(len(x[0]) for x in examples)
            + tcfg.refit_epochs * sum(len(x[0]) for x in refit),
            "padding_share": padding_share(examples, tcfg.batch_size), "eval_users": users,
            "eval_tokens": round(users * (prompt + per_user))}


def print_plan(plan):
    keys = ["run", "wave", "examples", "epochs", "train_tokens", "padding_share", "eval_users", "eval_tokens",
            "expected_s"]
    print("| " + " | ".join(k.replace("_", " ") for k in keys) + " |\n|" + "---|" * len(keys))
    for p in plan["runs"]:
        print("| " + " | ".join(str(p[k]) for k in keys) + " |")
    print(f"total: {plan['expected_s']:.0f} s ({plan['expected_s'] / 60:.1f} min) one run after another at "
          f"{plan['tokens_per_s']:.0f} training tokens/s (an assumption; implied MFU {plan['implied_mfu']:.1%} of "
          f"{plan['peak_tflops']:.0f} TFLOP/s at {plan['train_flops_per_token'] / 1e6:.0f} MFLOP per token)")
    if plan["jobs"] > 1:
        print(f"with --jobs {plan['jobs']}: {plan['expected_s_jobs']:.0f} s if runs side by side kept that rate each "
              f"(optimistic)")


def probe_items(item_meta, n: int, seed: int = 0) -> list[int]:
    titled = [i for i, m in enumerate(item_meta) if m.get("title") and m.get("category")]
    return sorted(random.Random(seed).sample(titled, min(n, len(titled))))


def sft_row(name, metrics: list[dict]) -> dict:
    """An SFT's row: R@10 and N@10 (valid and test) as mean and std over its seeds, training tokens and seconds."""
    summary = over_seeds(metrics)
    row = {"system": name, "seeds": len(metrics)}
    for split in ("valid", "test"):
        row[split] = {k: summary[split][k]["mean"] for k in ("recall@10", "ndcg@10")}
        row[split + "_std"] = {k: summary[split][k]["std"] for k in ("recall@10", "ndcg@10")}
    row["train_tokens"] = round(statistics.fmean(m["train_tokens"] for m in metrics))
    row["train_seconds"] = summary["train_seconds"]["mean"]
    return row


def pipeline_rows(runs, out_dir: Path) -> list[dict]:
    """Rows from the runs' metrics.json: MostPop and Markov, the backbone and the stages (cost), each SFT (metrics
    over its seeds, cost). "run": the run folder whose model the row's latency and probe are measured on."""
    first = {}                                       # row name -> its first run's folder name
    for name, slug, _, _ in runs:
        first.setdefault(name, slug)
    metrics = {n: [json.loads((out_dir / s / "metrics.json").read_text()) for m, s, _, _ in runs if m == n]
               for n in first}
    sft = [n for n in first if ":" in n]
    base = metrics[sft[0]][0]
    rows = [{"system": b, "valid": {k: base["baselines_valid"][b.lower()][k] for k in ("recall@10", "ndcg@10")},
             "test": {k: base["baselines"][b.lower()][k] for k in ("recall@10", "ndcg@10")}}
            for b in ("MostPop", "Markov")]
    rows.append({"system": "backbone as loaded", "run": first["alignment"]})
    rows += [{"system": n, "run": first[n], "train_tokens": metrics[n][0]["train_tokens"],
              "train_seconds": metrics[n][0]["train_seconds"]} for n in first if ":" not in n]
    for n in sft:
        k = yaml.safe_load((out_dir / first[n] / "config.yaml").read_text())["model"]["num_pauses"]
        rows.append({**sft_row(n + (f" (k={k})" if "pause" in n else ""), metrics[n]), "run": first[n]})
    return rows


def time_and_probe(args, rows, out_dir: Path):
    """Adds to the rows that name a run: the SFTs' latency (ms per user at batch 1, users/s at batch --time-users;
    interleaved rounds), and every model's probe (the backbone row: the model as loaded, our rows at their mean)."""
    timed, probed = [], []
    for row in [r for r in rows if "run" in r]:
        cfg, ds, codes, tok, model = evaluate.load_run(out_dir / row["run"], args.where, args.device)
        if row["system"] == "backbone as loaded":
            torch.manual_seed(0)
            model = backbones.make_model(cfg["model"], tok).to(args.device)
        if cfg["model"].backbone != "scratch":   # the probe reads text: a pretrained model's
            probed.append((row, model, tok, cfg, ds))
        if "test" in row:
            mcfg, ecfg, trie = cfg["model"], cfg["eval"], pauserec.SIDTrie(codes)
            test, n = data.leave_one_out(ds.sequences, cfg["data"].max_history)["test"], args.time_users
            for batch, users in ((1, test[: max(1, n // 16)]), (n, test[:n])):
                fn = functools.partial(evaluate.recommend, model, tok, mcfg, trie, users, ecfg.beam_size,
                                       max(ecfg.ks), batch, args.device, None)
                timed.append((row, batch, fn, len(users)))
    for (row, batch, _, count), seconds in zip(timed, interleaved_medians([t[2] for t in timed])):
        if batch == 1:
            row["ms_per_user_batch1"] = round(1e3 * seconds / count, 2)
        else:
            row["users_per_s_batch"] = round(count / seconds, 1)
    for row, model, tok, cfg, ds in probed:
        text = bpe.load_tokenizer(cfg["model"].hf_dir)
        row.update(probe(model, tok, text, ds.item_meta, probe_items(ds.item_meta, args.probe_items)))


def print_pipeline(rows, time_users: int):
    head = ["system", "valid R@10", "valid N@10", "test R@10", "test N@10", "train tokens", "train s",
            "ms/user b1", f"users/s b{time_users}", "verbalization ppl", "SID/title cos gap", "SID->title top-1",
            "title->SID top-1", "SID->title first 3 (other)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))

    def cell(r, split, key):
        if split not in r:
            return ""
        std = r.get(split + "_std")
        return f"{r[split][key]:.4f}" + (f" ± {std[key]:.4f}" if std and r["seeds"] > 1 else "")

    for r in rows:
        get = functools.partial(lambda r, k, f: format(r[k], f) if k in r else "", r)
        cells = [r["system"] + (f" ({r['seeds']} seeds)" if r.get("seeds", 1) > 1 else ""),
                 cell(r, "valid", "recall@10"), cell(r, "valid", "ndcg@10"), cell(r, "test", "recall@10"),
                 cell(r, "test", "ndcg@10"), get("train_tokens", ","), get("train_seconds", ".1f"),
                 get("ms_per_user_batch1", ".1f"), get("users_per_s_batch", ".1f"), get("verbalization_ppl", ".2f"),
                 get("sid_title_cos_gap", ".4f"), get("sid_to_title_top1", ".3f"), get("title_to_sid_top1", ".3f"),
                 (f"{r['sid_to_title_first']:.3f} ({r['sid_to_title_other']:.3f})" if "sid_to_title_first" in r
                  else "")]
        print("| " + " | ".join(cells) + " |")
    if any("chance_top1" in r for r in rows):
        first = next(r for r in rows if "chance_top1" in r)
        print(f"(SID->title top-1: chance {first['chance_top1']:.3f}; title->SID top-1: chance "
              f"{first['chance_title_to_sid']:.3f})")


def bench_pauserec(args, overrides):
    import train
    check_counts(args, "pauserec")
    args.out = args.out or f"runs/pauserec_{Path(args.config).stem}"   # train_modes writes --jobs logs there too
    out_dir = Path(args.out)
    runs = pipeline_runs(args.config, overrides, out_dir, args.seeds)
    for run in runs:    # refuse bad settings before anything is built or trained
        run_config(run[3])
    if args.dry_run:
        plan = pipeline_plan(runs, args.tokens_per_s, args.peak_tflops, args.jobs)
        print_plan(plan)
        print(json.dumps(plan))
        return plan
    t0, ignored = time.time(), stage_ignored()
    for wave in range(3):
        todo = [(n, s, a) for n, s, w, a in runs if w == wave
                and not finished(out_dir / s, a, ignored if n in ("alignment", "pause pre-training") else ())]
        train_modes(args, todo)
    wall = time.time() - t0
    now = run_config(runs[-1][3])   # this machine's settings (the runs may have been trained elsewhere)
    args.device = train.pick_device(now["train"].device)
    if now["train"].threads:
        torch.set_num_threads(now["train"].threads)
    args.where = [f"data.dir={now['data'].dir}"] if now["data"].dir else []
    rows = pipeline_rows(runs, out_dir)
    time_and_probe(args, rows, out_dir)
    print_pipeline(rows, args.time_users)
    result = {"config": args.config, "overrides": overrides, "seeds": args.seeds, "out": str(out_dir), "rows": rows,
              "train_wall_seconds": round(wall), "wall_seconds": round(time.time() - t0)}
    (out_dir / "pauserec.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Fine-tuning speed (bench.py finetune): training tokens/s and MFU of a pretrained backbone cut to a few depths,
# with every weight trained, the text rows frozen (the recipe's default) or only our rows trained

FINETUNE_SETTINGS = (("all weights", ["model.train_text_rows=true", "model.train_only_new_tokens=false"]),
                     ("text rows frozen", ["model.train_text_rows=false", "model.train_only_new_tokens=false"]),
                     ("our rows only", ["model.train_text_rows=false", "model.train_only_new_tokens=true"]))
PEAK_SIZE = 2048   # side of the square float32 matrices whose torch.mm rate is the measured peak


def measured_peak_gflops(device, n=PEAK_SIZE, reps=5) -> float:
    """GFLOP/s of torch.mm on two n x n float32 matrices (2 n^3 FLOPs), median of `reps` after a warm-up, at
    torch's current thread count: the peak the MFU is measured against."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)

    def mm():
        torch.mm(a, b, out=out)
        synchronize(device)
    return 2 * n ** 3 / median_seconds(mm, reps) / 1e9


def matmul_weights(model) -> tuple[int, int]:
    """(N, N_trained): the weights multiplied per token, and those of them that train: the blocks' Linear weights
    and the head's rows (model.head=new: ours only). A tied head is the input table, one matrix; looking up input
    rows multiplies nothing."""
    mats = [(m.weight.numel(), m.weight.requires_grad) for m in model.transformer.h.modules()
            if isinstance(m, torch.nn.Linear)]
    head = model.lm_head.weight                  # [V, d] from scratch, the text rows [base, d] pretrained
    if model.new_rows is None:
        mats.append((head[model.head_start:].numel(), head.requires_grad))
    else:
        ours = model.new_output_rows
        mats.append((ours.numel(), ours.requires_grad))
        if not model.head_start:   # head=full: the text rows too
            mats.append((head.numel(), head.requires_grad))
    return sum(n for n, _ in mats), sum(n for n, trained in mats if trained)


def train_flops_per_token(model) -> int:
    """Model FLOPs of a training token: 2N forward, 2N activation gradients, 2 N_trained weight gradients
    (matmul_weights). Attention's scores are left out, and the head's rows count at every token although
    model.loss multiplies them at the supervised positions only: a small overcount with model.head=new (our rows),
    a large one with head=full."""
    n, trained = matmul_weights(model)
    return 4 * n + 2 * trained


def stepper(step, batches, device):
    """fn: each call takes one optimizer step (optimizer_step's `step`) on the next of batches."""
    queue = iter(batches)

    def fn():
        step(*next(queue))
        synchronize(device)
    return fn


def bench_finetune(args, overrides):
    """Every depth x setting of FINETUNE_SETTINGS: the model as train.py builds it (the pretrained weights, cut to
    the depth), one warm-up step, then --steps steps on real training batches, the settings of one depth in
    interleaved rounds on the same batches; tokens/s and MFU against a float32 matmul peak measured here."""
    import train
    depths = [int(d) for d in args.depths.split(",")]
    if args.steps < 1 or min(depths) < 1:
        raise ValueError(f"bench.py finetune: --steps and --depths must be >= 1, got {args.steps}, {args.depths}")
    cfg = run_config([args.config, *overrides])
    tcfg, mcfg = cfg["train"], cfg["model"]
    if mcfg.backbone == "scratch":
        raise ValueError("bench.py finetune times a pretrained backbone: set model.backbone and model.hf_dir")
    if tcfg.task != "rec":
        raise ValueError(f"bench.py finetune times next-item training (train.task=rec), got train.task={tcfg.task}")
    device = train.pick_device(tcfg.device)
    if args.threads or tcfg.threads:
        torch.set_num_threads(args.threads or tcfg.threads)
    ds = data.load_dataset(cfg["data"])
    backbones.fetch_hf(mcfg)
    codes = train.sid_table(cfg, ds, Path(tcfg.sid_cache))[0]
    words = rationales.rationale_words(ds.item_meta, mcfg.rationale_file) if mcfg.reasoning == "cot" else []
    tok = backbones.make_tokens(mcfg, codes, words, ds.item_meta)
    batches, tokens = training_batches(tok, mcfg, ds, cfg["data"].max_history, tcfg.batch_size, args.steps + 1)
    if len(batches) <= args.steps:
        raise ValueError(f"bench.py finetune: the data makes {len(batches)} batches, --steps {args.steps} needs "
                         f"{args.steps + 1} (one to warm up)")
    peak = args.peak_gflops or measured_peak_gflops(device)
    rows = []
    for depth in depths:
        steps, row_of_depth = [], []
        for name, setting in FINETUNE_SETTINGS:
            row_cfg = run_config([args.config, *overrides, f"model.keep_layers={depth}", *setting])["model"]
            torch.manual_seed(tcfg.seed)
            model = backbones.make_model(row_cfg, tok).to(device)
            steps.append(stepper(optimizer_step(model, device, tcfg.weight_decay), batches, device))
            row_of_depth.append({"depth": depth, "setting": name,
                                 "params": sum(p.numel() for p in model.parameters()),
                                 "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 "flops_per_token": train_flops_per_token(model)})
        # the warm-up takes batch 0, round r batch r for every setting
        for row, seconds in zip(row_of_depth, interleaved_seconds(steps, args.steps)):
            row.update(tokens=sum(tokens[1:]), seconds=round(sum(seconds), 6))
            row["tokens_per_s"] = round(row["tokens"] / sum(seconds), 1)
            row["mfu"] = round(row["flops_per_token"] * row["tokens"] / sum(seconds) / (peak * 1e9), 5)
        rows += row_of_depth
        del steps, model   # the models of this depth, their gradients and AdamW states
    peak_source = "--peak-gflops" if args.peak_gflops else "measured fp32 matmul peak"
    print_finetune(rows, peak, peak_source, torch.get_num_threads(), device)
    result = {"config": args.config, "overrides": overrides, "device": device, "threads": torch.get_num_threads(),
              "steps": args.steps, "batch_size": tcfg.batch_size, "vocab_size": tok.size, "text_vocab": tok.base,
              "peak_gflops": round(peak, 2), "peak_source": peak_source, "rows": rows}
    print(json.dumps(result))
    return result


def print_finetune(rows, peak, peak_source, threads, device):
    what = f"torch.mm {PEAK_SIZE}x{PEAK_SIZE} float32, {threads} threads" if peak_source.startswith("measured") \
        else "given"
    print(f"peak: {peak:.1f} GFLOP/s ({what}, {device})")
    head = ["blocks", "setting", "trained params", "tokens", "seconds", "tokens/s", "GFLOP/token",
            f"MFU vs {peak_source}"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["depth"]), r["setting"], f"{r['trained_params'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M",
                 str(r["tokens"]), f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.1f}",
                 f"{r['flops_per_token'] / 1e9:.4f}", f"{100 * r['mfu']:.1f}%"]
        print("| " + " | ".join(cells) + " |")


def main(argv):
    import train  # for the config keys that `reasoning` passes on to train.py
    keys = ("reasoning, seeds, pauserec and finetune pass their key=value arguments on to train.py.\n\n"
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
    p = sub.add_parser("probe", formatter_class=raw)
    p.add_argument("run_dir")
    p.add_argument("--items", type=int, default=200, help="items probed (a fixed sample of the titled ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item sample")
    s = sub.add_parser("seeds", formatter_class=raw, epilog=keys)
    s.add_argument("config")
    s.add_argument("--seeds", type=int, default=3, help="runs with train.seed = 0..N-1")
    s.add_argument("--out", default="", help="folder of the runs (default runs/seeds_<config stem>)")
    s.add_argument("--jobs", type=int, default=1, help="runs trained at once, as separate processes "
                   "(their train seconds then overlap)")
    q = sub.add_parser("pauserec", formatter_class=raw, epilog=keys)
    q.add_argument("config")
    q.add_argument("--seeds", type=int, default=1, help="plain and pause SFTs with train.seed 0..N-1 (CoT: one)")
    q.add_argument("--out", default="", help="folder of the runs (default runs/pauserec_<config stem>)")
    q.add_argument("--jobs", type=int, default=2, help="runs of one wave trained at once, as separate processes "
                   "(each with the config's train.threads)")
    q.add_argument("--dry-run", action="store_true", help="print each run's tokens and expected seconds, train nothing")
    q.add_argument("--tokens-per-s", type=float, default=150000.0, help="--dry-run: training tokens per second assumed")
    q.add_argument("--peak-tflops", type=float, default=989.0, help="--dry-run: the accelerator's peak (for the MFU "
                   "that --tokens-per-s implies; 989: H100/H200 dense bf16)")
    q.add_argument("--time-users", type=int, default=256, help="test users timed at batch N (and N/16 at batch 1)")
    q.add_argument("--probe-items", type=int, default=200, help="items of the limitation probe")
    f = sub.add_parser("finetune", formatter_class=raw, epilog=keys)
    f.add_argument("config")
    f.add_argument("--depths", default="2,8,30", help="blocks kept (model.keep_layers), comma-separated")
    f.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row, after one warm-up step")
    f.add_argument("--threads", type=int, default=0, help="torch threads (0: train.threads, else torch's default)")
    f.add_argument("--peak-gflops", type=float, default=0.0, help="the peak the MFU is measured against, in "
                   "GFLOP/s (e.g. an accelerator's); 0: measure torch.mm's float32 rate here")
    args, rest = parser.parse_known_args(argv)
    if args.command == "beam":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        return bench_beam(args)
    if args.command == "seeds":
        return bench_seeds(args, rest)
    if args.command == "probe":
        return bench_probe(args, rest)
    if args.command == "pauserec":
        return bench_pauserec(args, rest)
    if args.command == "finetune":
        return bench_finetune(args, rest)
    return bench_reasoning(args, rest)


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
