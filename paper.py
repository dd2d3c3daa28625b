"""The paper's comparison as one command: PauseRec's pipeline (He et al., arXiv 2606.14142) on a pretrained
backbone, over seeds, in one table. Each command prints one JSON object on the last line of stdout.

    python paper.py CONFIG [--seeds 1] [--jobs 2] [--arms aligned,not_aligned] [--cot-seeds 1] [--out DIR]
                    [--dry-run [--time-steps 3] [--tokens-per-s X]] [--time-users 256] [key=value ...]
        SID-text alignment once (train.task=align, stages.py); from it plain SFT, pause pre-training then pause SFT
        (k = model.num_pauses, 5 unless set) and CoT SFT (arm aligned); the same SFTs from the backbone as loaded
        (arm not_aligned); the scratch decoder beside them. Every SFT trains one example per user, as the paper does;
        every pause seed is tested again with its pauses hidden and shuffled. Tables: R@10 and N@10 (mean ± std over
        seeds), cost, latency, the probe, MostPop and Markov; the pauses knocked out. Finished runs in DIR (default
        runs/pauserec_<config stem>) are reused. --dry-run: each run's tokens and seconds at rates measured here
    python paper.py --probe RUN_DIR [--items 200] [--seed 0]
        the paper's limitations 1 and 2 for the run's model and its backbone: perplexity of an item's category after
        its title (world knowledge), SID/title alignment (cosine gap, in-context retrieval, generation both ways)
"""
import argparse
import dataclasses
import functools
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import backbones
import batching
import bpe
import common
import data
import evaluate
import pauserec
import rationales
import stages
import sweep

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
    own, other = written_matches(written, [answer[:n_first] for _, answer in to_text])
    return {"title_to_sid_top1": float((found[:, 0].cpu() == torch.tensor(items)).float().mean()),
            "chance_title_to_sid": 1 / len(codes), "sid_to_title_first": own, "sid_to_title_other": other}


def written_matches(written: list[list[int]], firsts: list[list[int]]) -> tuple[float, float]:
    """(share of items whose written tokens are their own description's first ones, share that are another item's:
    the next one's in the sample, what a model that ignores the SID gets; the baseline of the first figure)."""
    return (statistics.fmean(w == f for w, f in zip(written, firsts)),
            statistics.fmean(w == f for w, f in zip(written, firsts[1:] + firsts[:1])))


def probe_items(item_meta, n: int, seed: int = 0) -> list[int]:
    titled = [i for i, m in enumerate(item_meta) if m.get("title") and m.get("category")]
    return sorted(random.Random(seed).sample(titled, min(n, len(titled))))


def probe_run(args, overrides):
    """Probe a run's model and the pretrained backbone it started from (same tokens, new rows as initialised)."""
    cfg, ds, codes, tok, model = evaluate.load_run(args.probe, overrides)
    mcfg = cfg["model"]
    if mcfg.backbone == "scratch":
        raise ValueError(f"{args.probe} has model.backbone=scratch: the probe needs a pretrained backbone")
    items = probe_items(ds.item_meta, args.items, args.seed)
    text = bpe.load_tokenizer(mcfg.hf_dir)
    torch.manual_seed(0)
    before = backbones.make_model(mcfg, tok, pretrained=True)
    rows = {"pretrained": probe(before, tok, text, ds.item_meta, items),
            f"trained ({Path(args.probe).name})": probe(model, tok, text, ds.item_meta, items)}
    print("| model | verbalization ppl (lower: more knowledge kept) | SID/title cosine gap | SID -> title top-1 | "
          "title -> SID top-1 | SID -> title's first 3 tokens (another item's) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['verbalization_ppl']:.2f} | {r['sid_title_cos_gap']:.4f} | "
              f"{r['sid_to_title_top1']:.3f} (chance {r['chance_top1']:.3f}) | {r['title_to_sid_top1']:.3f} (chance "
              f"{r['chance_title_to_sid']:.3f}) | {r['sid_to_title_first']:.3f} ({r['sid_to_title_other']:.3f}) |")
    out = {"run": str(args.probe), "items": len(items), "probe": rows}
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# The chain of runs: alignment once; from it plain SFT, pause pre-training then pause SFT, and CoT SFT; the same
# SFTs from the backbone as loaded; the scratch decoder beside them

PIPELINE_DEFAULTS = ["model.num_pauses=5"]   # k (the paper's), unless the command line sets model.num_pauses
SFT_MODES = (("plain", "plain SFT", ["model.reasoning=none"]), ("pause", "pause SFT", ["model.reasoning=pause"]),
             ("cot", "CoT SFT", ["model.reasoning=cot"]))
ARMS = {"aligned": "sft", "not_aligned": "noalign"}   # --arms name -> the prefix of its run folders
# What a finished stage is compared on before it is reused (every other train.* and eval.* key, and the modes'
# model keys, belong to the SFTs): the keys that change what the stage trains
STAGE_KEYS = {"task", "seed", "batch_size", "batch_tokens", "backbone_lr_ratio", "weight_decay", "grad_clip",
              "warmup_steps", "max_warmup_share", "min_lr", "amp"}
STAGE_TRAIN_KEYS = {"align": STAGE_KEYS | {"align_lr", "align_epochs", "align_frozen_epochs"},
                    "pause_pretrain": STAGE_KEYS | {"pause_lr", "pause_epochs", "pause_rate", "pause_trains"}}
SFT_MODEL_KEYS = {"num_pauses", "pause_embeddings", "latent_steps", "pause_layout", "loss_on_history",
                  "rationale_file", "rationale_noise", "max_rationale_len", "think_pauses", "step_loss",
                  "step_loss_weight", "step_temp"}
STAGES = {"alignment": "align", "pause pre-training": "pause_pretrain"}   # row name -> train.task


def stage_ignored(task: str) -> set[str]:
    import train
    return ({f"train.{f.name}" for f in fields(train.TrainConfig) if f.name not in STAGE_TRAIN_KEYS[task]}
            | {f"eval.{f.name}" for f in fields(evaluate.EvalConfig)} | {f"model.{k}" for k in SFT_MODEL_KEYS})


# The scratch decoder beside the LLM's rows (same data, SIDs, layout and split): configs/demo.yaml's 2 x 64 decoder
# and schedule, with the pretrained-only settings put back to their defaults
SCRATCH = ["model.backbone=scratch", "model.keep_layers=0", "model.sid_init=mean", "model.train_text_rows=false",
           "model.prompt=sids", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.dropout=0.1",
           "train.lr=2e-3", "train.batch_size=32", "train.warmup_steps=50", "train.backbone_lr_ratio=1.0",
           "train.frozen_epochs=0", "train.align_frozen_epochs=0"]


def pipeline_runs(config, overrides, out_dir: Path, seeds: int, cot_seeds: int = 1, arms=tuple(ARMS)):
    """[(row, run folder name, wave, train.py arguments)]. Waves run in order, as a run starts from one of an
    earlier wave (model.init_from); the runs of one wave are independent (--jobs runs them at once).
    Every SFT trains one example per user (model.pause_layout=last), as the paper does."""
    base = [config, *PIPELINE_DEFAULTS, *overrides, f"train.out_dir={out_dir}"]
    align, pause = out_dir / "align", out_dir / "pause_pretrain"
    stage = lambda task, init: [*base, "model.reasoning=none", *init, f"train.task={task}", f"train.name={task}"]  # noqa: E731
    runs = [("alignment", "align", 0, stage("align", [])),
            ("pause pre-training", "pause_pretrain", 1, stage("pause_pretrain", [f"model.init_from={align}"]))] \
        if "aligned" in arms else []
    for arm in [a for a in ARMS if a in arms]:
        for mode, name, mode_args in SFT_MODES:
            start = None if arm == "not_aligned" else pause if mode == "pause" else align
            wave = 0 if start is None else 2 if mode == "pause" else 1
            init = [f"model.init_from={start}"] if start else []
            for s in range(cot_seeds if mode == "cot" else seeds):
                slug = f"{ARMS[arm]}_{mode}_seed{s}"
                runs.append((f"{arm.replace('_', ' ')}: {name}", slug, wave,
                             [*base, *mode_args, "model.pause_layout=last", "train.task=rec", *init, f"train.seed={s}",
                              f"train.name={slug}"]))
    for s in range(seeds):
        runs.append(("scratch decoder: plain", f"scratch_seed{s}", 0, [*base, "model.reasoning=none", *SCRATCH,
                     "model.pause_layout=last", "train.task=rec", f"train.seed={s}", f"train.name=scratch_seed{s}"]))
    return runs


def parse_arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    if not arms or any(a not in ARMS for a in arms):
        raise ValueError(f"--arms: a comma-separated subset of {', '.join(ARMS)}, got {text!r}")
    return arms


# ----------------------------------------------------------------------------------------------
# --dry-run: every run's examples and tokens, and the seconds expected from rates measured on this device

def pipeline_plan(runs, time_steps: int, tokens_per_s: float = 0.0, peak_tflops: float = 989.0,
                  jobs: int = 1) -> dict:
    """--dry-run: every run's training texts or examples, built as train.py builds them (no model is trained):
    examples, training tokens, padding share of the batches, users of its evaluations (the ablations' included),
    and the seconds expected: data and weights loading measured here, plus its training tokens and evaluation
    users at the rates measured here for its kind of run (measured_rates), or with tokens_per_s > 0 at that
    assumed rate (evaluation tokens at 3x it: a forward pass is a third of a training step)."""
    import train
    loaded, rates, out, backbone = {}, {}, [], None
    for name, slug, wave, run_args in runs:
        cfg = sweep.run_config(run_args)
        tcfg, mcfg = cfg["train"], cfg["model"]
        device = train.pick_device(tcfg.device)
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
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
        plan, examples, order = plan_training(cfg, ds, tok) if tcfg.task == "rec" else plan_stage(cfg, ds, tok)
        plan = {"row": name, "run": slug, "wave": wave, **plan}
        kind = json.dumps([asdict(dataclasses.replace(mcfg, init_from="")), tcfg.task, tcfg.batch_size, tcfg.amp,
                           tcfg.batch_tokens, device, tcfg.threads], sort_keys=True)
        if tokens_per_s:
            seconds = (plan["train_tokens"] + plan["eval_tokens"] / 3) / tokens_per_s
        else:
            if kind not in rates:   # seeds and arms of one kind of run share its rates
                rates[kind] = measured_rates(cfg, ds, codes, tok, examples, order[: time_steps + 1], device)
            plan.update(rates[kind])
            seconds = plan["load_s"] + plan["train_tokens"] / plan["train_tokens_per_s"] + \
                (plan["eval_users"] / plan["eval_users_per_s"] if plan["eval_users"] else 0.0)
        plan["expected_s"] = round(load_s + seconds, 1)
        out.append(plan)
        backbone = backbone or (cfg, tok)   # the first run's model (the alignment's): not the scratch rows'
    flops = 6 * model_size(*backbone)   # FLOPs of a training token, roughly (weights only, head over ours)
    rate = tokens_per_s or out[0].get("train_tokens_per_s", 0.0)
    return {"tokens_per_s": tokens_per_s, "measured": not tokens_per_s, "runs": out,
            "expected_s": round(sum(p["expected_s"] for p in out), 1), "jobs": jobs,
            "expected_s_jobs": round(waves_seconds(out, jobs), 1), "train_flops_per_token": flops,
            "implied_mfu": round(flops * rate / (peak_tflops * 1e12), 4), "peak_tflops": peak_tflops}


def measured_rates(cfg, ds, codes, tok, examples, order, device: str) -> dict:
    """A kind of run's speed here (the config's device, threads): seconds to build its model (weights loaded), training
    tokens/s over the batches `order` (rows of examples; the first a warm-up), and for a next-item run users/s of the
    beam search over 4 x eval.batch_size test users (at most 1,024). The model trains what the run trains."""
    tcfg, mcfg, ecfg = cfg["train"], cfg["model"], cfg["eval"]
    t0 = time.perf_counter()
    model = backbones.make_model(mcfg, tok).to(device)
    load_s = time.perf_counter() - t0
    if tcfg.task == "pause_pretrain":
        stages.train_only_pause_row(model, tok)
    loss_fn = pauserec.training_loss if tcfg.task == "rec" else stages.text_loss
    step = sweep.optimizer_step(model, device, tcfg.weight_decay, loss_fn, tcfg.amp, tcfg.compile, tcfg.compile_mode)
    batches = [batching.collate([examples[i] for i in rows], tok.PAD, tcfg.pad_to) for rows in order]
    step(*batches[0])                                    # a warm-up step
    sweep.synchronize(device)
    t0 = time.perf_counter()
    for ids, loss_mask in batches[1:]:
        step(ids, loss_mask)
    sweep.synchronize(device)
    tokens = sum(len(examples[i][0]) for rows in order[1:] for i in rows)
    rates = {"load_s": round(load_s, 1), "train_tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
    if tcfg.task == "rec":   # (evaluate.recommend puts the model in eval mode)
        test = data.leave_one_out(ds.sequences, cfg["data"].max_history)["test"]
        users = random.Random(0).sample(test, min(4 * ecfg.batch_size, 1024, len(test)))   # batched by length
        search = functools.partial(evaluate.recommend, model, tok, mcfg, pauserec.SIDTrie(codes),
                                   beam_size=ecfg.beam_size, topk=max(ecfg.ks), batch_size=ecfg.batch_size,
                                   device=device, desc=None, precision=ecfg.precision)
        search(test[:4])
        t0 = time.perf_counter()
        search(users)
        rates["eval_users_per_s"] = round(len(users) / (time.perf_counter() - t0), 1)
    return rates


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


def epoch_batches(examples, tcfg) -> list[list[int]]:
    """One epoch of batching.batches (seed 0): its count is Phase's steps per epoch, its rows those the rates time."""
    return batching.batches(examples, tcfg.batch_size, torch.Generator().manual_seed(0), tcfg.batch_tokens, tcfg.pad_to)


def padding_share(examples, order, tcfg) -> float:
    """Share of pad tokens in an epoch of batches (length-sorted within chunks, or token-budgeted; train.pad_to)."""
    longest = [max(len(examples[i][0]) for i in rows) for rows in order]
    padded = sum(len(rows) * batching.padded_length(n, tcfg.pad_to) for rows, n in zip(order, longest))
    return round(1 - sum(len(x[0]) for x in examples) / padded, 3)


def plan_stage(cfg, ds, tok) -> tuple[dict, list]:
    """(a stage's plan, its training texts, an epoch of their batches)."""
    tcfg = cfg["train"]
    examples = stages.stage_examples(tcfg, cfg["model"], tok, ds.item_meta)
    epochs, order = tcfg.align_epochs if tcfg.task == "align" else tcfg.pause_epochs, epoch_batches(examples, tcfg)
    return ({"examples": len(examples), "epochs": epochs, "train_tokens": epochs * sum(len(x[0]) for x in examples),
             "padding_share": padding_share(examples, order, tcfg), "eval_users": 0, "eval_tokens": 0}, examples, order)


def plan_training(cfg, ds, tok) -> tuple[dict, list]:
    """(a next-item run's plan, its training examples, an epoch of their batches): tokens as train.main counts them
    (no early stop): epochs, then the refit; its validations (eval.valid_users at each, then the chosen checkpoint's:
    all users, or the sample with eval.final_valid=sample), the test, and for a pause run
    the test twice more with its pauses knocked out (hide, shuffle); each user a prompt plus beam x SID tokens."""
    tcfg, mcfg, ecfg, max_history = cfg["train"], cfg["model"], cfg["eval"], cfg["data"].max_history
    split = data.leave_one_out(ds.sequences, max_history)
    rng = random.Random(tcfg.seed)
    examples = batching.training_examples(tok, mcfg, ds, split, max_history, rng)
    refit = batching.training_examples(tok, mcfg, ds, split, max_history, rng, refit=True) if tcfg.refit_epochs else []
    order = epoch_batches(examples, tcfg)
    steps, every = tcfg.epochs * len(order), ecfg.every or len(order)
    sample = min(ecfg.valid_users or len(split["valid"]), len(split["valid"]))
    tests = 1 + len(evaluate.ABLATIONS) * (mcfg.reasoning == "pause")
    final = len(split["valid"]) if ecfg.final_valid == "all" else sample   # the chosen checkpoint's validation
    users = math.ceil(steps / every) * sample + final + tests * len(split["test"])
    per_user = ecfg.beam_size * tok.num_levels + (mcfg.max_rationale_len if mcfg.reasoning == "cot" else 0)
    prompt = statistics.fmean(len(pauserec.build_prompt(tok, mcfg, ex.history)) for ex in split["test"])
    return ({"examples": len(examples), "epochs": tcfg.epochs,
             "train_tokens": tcfg.epochs * sum(len(x[0]) for x in examples)
             + tcfg.refit_epochs * sum(len(x[0]) for x in refit),
             "padding_share": padding_share(examples, order, tcfg), "eval_users": users,
             "eval_tokens": round(users * (prompt + per_user))}, examples, order)


def print_plan(plan):
    keys = ["run", "wave", "examples", "epochs", "train_tokens", "padding_share", "eval_users", "expected_s"]
    if plan["measured"]:
        keys[-1:-1] = ["load_s", "train_tokens_per_s", "eval_users_per_s"]
    print("| " + " | ".join(k.replace("_", " ") for k in keys) + " |\n|" + "---|" * len(keys))
    for p in plan["runs"]:
        print("| " + " | ".join(str(p.get(k, "")) for k in keys) + " |")
    how = "at the rates measured here" if plan["measured"] else f"at {plan['tokens_per_s']:.0f} tokens/s (assumed)"
    print(f"total: {plan['expected_s']:.0f} s ({plan['expected_s'] / 60:.1f} min) one run after another {how}; "
          f"implied MFU of the first run {plan['implied_mfu']:.2%} of {plan['peak_tflops']:.0f} TFLOP/s at "
          f"{plan['train_flops_per_token'] / 1e6:.0f} MFLOP per token")
    if plan["jobs"] > 1:
        print(f"with --jobs {plan['jobs']}: {plan['expected_s_jobs']:.0f} s ({plan['expected_s_jobs'] / 60:.1f} min) "
              f"if runs side by side kept those rates each (optimistic where they share a device)")


# ----------------------------------------------------------------------------------------------
# The tables: quality over seeds, cost, latency and the probe; the pauses knocked out

def sft_row(name, metrics: list[dict]) -> dict:
    """An SFT's row: R@10 and N@10 (valid and test) as mean and std over its seeds, training tokens and seconds."""
    summary = sweep.over_seeds(metrics)
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
    rows.append({"system": "backbone as loaded", "run": first.get("alignment", first[sft[0]])})
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
                                       max(ecfg.ks), batch, args.device, None, precision=ecfg.precision)
                timed.append((row, batch, fn, len(users)))
    for (row, batch, _, count), seconds in zip(timed, sweep.interleaved_medians([t[2] for t in timed])):
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
    def cell(r, split, key):   # mean ± std over seeds
        std = r.get(split + "_std")
        spread = f" ± {std[key]:.4f}" if std and r["seeds"] > 1 else ""
        return f"{r[split][key]:.4f}{spread}" if split in r else ""
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
    if first := next((r for r in rows if "chance_top1" in r), None):
        print(f"(SID->title top-1: chance {first['chance_top1']:.3f}; title->SID top-1: chance "
              f"{first['chance_title_to_sid']:.3f})")


def ablated_test(run_dir: Path, how: str, where, device: str) -> dict:
    """Test metrics of a pause run with its pauses knocked out (evaluate.py --ablate-pauses HOW, the test split
    only), kept in RUN_DIR/ablate_<how>.json so that a rerun reuses them."""
    path = run_dir / f"ablate_{how}.json"
    if path.is_file():
        return json.loads(path.read_text())["test"]
    cfg, ds, codes, tok, model = evaluate.load_run(run_dir, where, device)
    test = data.leave_one_out(ds.sequences, cfg["data"].max_history)["test"]
    metrics = evaluate.evaluate_model(model, tok, cfg["model"], pauserec.SIDTrie(codes), test, cfg["eval"], device,
                                      desc=f"{run_dir.name}: test, pauses {how}", ablate=how)
    path.write_text(json.dumps({"ablate": how, "test": metrics}, indent=1))
    return metrics


def ablation_rows(runs, out_dir: Path, where, device: str) -> list[dict]:
    """Per pause SFT row: each seed's test N@10 as trained (its metrics.json) and with its pauses hidden and
    shuffled (ablated_test)."""
    rows = []
    for name in dict.fromkeys(n for n, _, _, _ in runs if n.endswith("pause SFT")):
        slugs = [s for n, s, _, _ in runs if n == name]
        row = {"system": name, "as trained": [json.loads((out_dir / s / "metrics.json").read_text())["test"]
                                              ["ndcg@10"] for s in slugs]}
        for how in evaluate.ABLATIONS:
            row[how] = [ablated_test(out_dir / s, how, where, device)["ndcg@10"] for s in slugs]
        rows.append(row)
    return rows


def print_ablations(rows):
    """Test N@10 as trained and with the pauses knocked out: mean ± std (the seeds' values), and the paired
    change (knocked out minus as trained, per seed) as mean ± std."""
    if not rows:
        return
    cols = ["as trained", *evaluate.ABLATIONS]
    print("| pause SFT: test N@10 | " + " | ".join(cols) + " | " +
          " | ".join(f"{how} - as trained" for how in evaluate.ABLATIONS) + " |\n|" + "---|" * (2 * len(cols)))

    def cell(values):
        m = sweep.mean_std(values)
        return f"{m['mean']:.4f} ± {m['std']:.4f} (" + ", ".join(f"{v:.4f}" for v in values) + ")"

    for r in rows:
        drops = [sweep.mean_std([a - b for a, b in zip(r[how], r["as trained"])]) for how in evaluate.ABLATIONS]
        print(f"| {r['system']} | " + " | ".join(cell(r[c]) for c in cols) + " | " +
              " | ".join(f"{d['mean']:+.4f} ± {d['std']:.4f}" for d in drops) + " |")


# ----------------------------------------------------------------------------------------------
# The commands

def run_pipeline(args, overrides):
    """Train the chain (or reuse its finished runs), wave by wave; then the tables."""
    import train
    sweep.check_counts(args, "paper.py")
    if args.cot_seeds < 0:
        raise ValueError(f"paper.py: --cot-seeds must be >= 0, got {args.cot_seeds}")
    args.out = args.out or f"runs/pauserec_{Path(args.config).stem}"   # train_runs writes --jobs logs there too
    out_dir = Path(args.out)
    runs = pipeline_runs(args.config, overrides, out_dir, args.seeds, args.cot_seeds, parse_arms(args.arms))
    for run in runs:    # refuse bad settings before anything is built or trained
        sweep.run_config(run[3])
    if args.dry_run:
        plan = pipeline_plan(runs, args.time_steps, args.tokens_per_s, args.peak_tflops, args.jobs)
        print_plan(plan)
        print(json.dumps(plan))
        return plan
    t0 = time.time()
    for wave in range(3):
        todo = [(n, s, a) for n, s, w, a in runs if w == wave
                and not sweep.finished(out_dir / s, a, stage_ignored(STAGES[n]) if n in STAGES else ())]
        sweep.train_runs(args, todo)
    wall = time.time() - t0
    now = sweep.run_config(runs[-1][3])   # this machine's settings (the runs may have been trained elsewhere)
    args.device = train.pick_device(now["train"].device)
    if now["train"].threads:   # what follows runs alone: on the threads of the --jobs lanes together
        torch.set_num_threads(now["train"].threads * args.jobs)
    args.where = [f"data.dir={now['data'].dir}"] if now["data"].dir else []
    rows = pipeline_rows(runs, out_dir)
    ablations = ablation_rows(runs, out_dir, args.where, args.device)
    time_and_probe(args, rows, out_dir)
    print_pipeline(rows, args.time_users)
    print_ablations(ablations)
    result = {"config": args.config, "overrides": overrides, "seeds": args.seeds, "out": str(out_dir), "rows": rows,
              "ablations": ablations, "train_wall_seconds": round(wall), "wall_seconds": round(time.time() - t0)}
    (out_dir / "pauserec.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def main(argv):
    import train  # for the config keys passed on to train.py
    keys = "key=value arguments are passed on to train.py (and to evaluate.py's loading with --probe).\n\n" + \
        common.cli_help("", train.SECTIONS)
    raw = argparse.RawDescriptionHelpFormatter   # keeps the docstring's and the key list's lines
    parser = common.Parser(description=__doc__, formatter_class=raw, epilog=keys, prog="paper.py")
    parser.add_argument("config", nargs="?", default="", metavar="CONFIG")
    parser.add_argument("--seeds", type=int, default=1, help="plain and pause SFTs with train.seed 0..N-1")
    parser.add_argument("--cot-seeds", type=int, default=1, help="CoT SFTs with train.seed 0..N-1 (0: none)")
    parser.add_argument("--arms", default=",".join(ARMS), help="SFTs from the aligned checkpoint (aligned: also the "
                        "stages) and/or from the backbone as loaded (not_aligned), comma-separated")
    parser.add_argument("--out", default="", help="folder of the runs (default runs/pauserec_<config stem>)")
    parser.add_argument("--jobs", type=int, default=2, help="runs of one wave trained at once, as separate "
                        "processes (each with the config's train.threads; 0: its share of the cores)")
    parser.add_argument("--dry-run", action="store_true", help="each run's tokens and expected seconds; no training")
    parser.add_argument("--time-steps", type=int, default=3, help="--dry-run: timed training steps per kind of run")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="--dry-run: assume this training rate "
                        "instead of measuring (0: measure)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="--dry-run: the accelerator's peak (for the "
                        "MFU that the rate implies; 989: H100/H200 dense bf16)")
    parser.add_argument("--time-users", type=int, default=256, help="test users timed at batch N (N/16 at batch 1)")
    parser.add_argument("--probe-items", type=int, default=200, help="items of the limitation probe")
    parser.add_argument("--probe", metavar="RUN_DIR", help="probe one run's model and its backbone instead")
    parser.add_argument("--items", type=int, default=200, help="--probe: items probed (a sample of the titled)")
    parser.add_argument("--seed", type=int, default=0, help="--probe: seed of the item sample")
    args, rest = parser.parse_known_args(argv)
    if args.probe:   # a positional argument here is an override, not a config
        return probe_run(args, ([args.config] if args.config else []) + rest)
    if not args.config:
        parser.error("give a CONFIG (or --probe RUN_DIR)")
    return run_pipeline(args, rest)


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
