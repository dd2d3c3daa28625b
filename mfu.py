"""bench.py finetune: the speed of a fine-tuning step on a pretrained backbone (tokens/s, FLOPs per token, MFU against
the card's dense bf16 spec peak, or on a CPU against a matmul rate measured here) for each depth and setting, and with
--profile where its time goes (torch.profiler)."""
import json
import re
from pathlib import Path

import torch

import backbones
import data
import rationales
import sweep

FINETUNE_SETTINGS = (("all weights", ["model.train_text_rows=true", "model.train_only_new_tokens=false"]),
                     ("text rows frozen", ["model.train_text_rows=false", "model.train_only_new_tokens=false"]),
                     ("our rows only", ["model.train_text_rows=false", "model.train_only_new_tokens=true"]))
PEAK_SIZE = 2048   # side of the square matrices whose torch.mm rate is the measured peak
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' spec sheets, by a pattern of the name
# torch.cuda.get_device_name gives ('NVIDIA H100 80GB HBM3' is the SXM card). A card not listed has no spec peak.
SPEC_PEAKS = ((r"H100.*(SXM|HBM3)", 989.0), (r"H100.*PCIe", 756.0), (r"H200(?!.*NVL)", 989.0), (r"A100", 312.0),
              (r"\bL4\b", 121.0))


def spec_peak_tflops(name: str) -> float:
    """The dense bf16 spec peak of a card named `name` (SPEC_PEAKS), 0.0 for a card not listed."""
    return next((tflops for pattern, tflops in SPEC_PEAKS if re.search(pattern, name)), 0.0)


def peak_dtype(device) -> torch.dtype:
    """The dtype of the measured peak: bfloat16 on CUDA (what tensor cores and train.amp run), float32 elsewhere."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def measured_peak_gflops(device, n=PEAK_SIZE, reps=5) -> float:
    """GFLOP/s of torch.mm on two n x n matrices of peak_dtype (2 n^3 FLOPs), median of `reps` after a warm-up, at
    torch's current thread count: the peak the MFU is measured against."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, peak_dtype(device)) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=peak_dtype(device))

    def mm():
        torch.mm(a, b, out=out)
        sweep.synchronize(device)
    return 2 * n ** 3 / sweep.median_seconds(mm, reps) / 1e9


def mfu_peak(given: float, device: str, measured: float) -> tuple[float, str]:
    """(GFLOP/s, what it is) that the MFU is measured against: --peak-gflops if given; on CUDA the card's dense bf16
    spec peak (the usual MFU), for a card not listed the measured matmul rate, said so; elsewhere the measured rate."""
    dtype = "bf16" if peak_dtype(device) == torch.bfloat16 else "fp32"
    if given:
        return given, "--peak-gflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        if tflops := spec_peak_tflops(name):
            return 1e3 * tflops, f"{name} dense bf16 spec peak"
        return measured, f"measured {dtype} matmul peak (unknown card {name}: no spec peak)"
    return measured, f"measured {dtype} matmul peak"


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
    (matmul_weights). Attention's scores are left out. The head's rows count at every token: model.loss multiplies
    them there with model.head=new (our rows), but only at the supervised positions with head=full on a backbone
    (a large overcount there)."""
    n, trained = matmul_weights(model)
    return 4 * n + 2 * trained


def stepper(step, batches, device):
    """fn: each call takes one optimizer step (optimizer_step's `step`) on the next of batches."""
    queue = iter(batches)

    def fn():
        step(*next(queue))
        sweep.synchronize(device)
    return fn


def finetune_settings(names: str):
    """FINETUNE_SETTINGS, or the comma-separated subset --settings names ('' = all)."""
    known = dict(FINETUNE_SETTINGS)
    chosen = [n.strip() for n in names.split(",")] if names else list(known)
    for n in chosen:
        if n not in known:
            raise ValueError(f"--settings: unknown setting {n!r}; the settings are {', '.join(known)}")
    return [(n, known[n]) for n in chosen]


def finetune_data(args, overrides):
    """(cfg, device, tok, batches, tokens) of bench.py finetune: the config checked, --steps + 1 training batches
    (token-budgeted with --batch-tokens or train.batch_tokens), or all the data makes if fewer (said so), and their
    real tokens."""
    import train
    cfg = sweep.run_config([args.config, *overrides])
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
    batches, tokens = sweep.training_batches(tok, mcfg, ds, cfg["data"].max_history, tcfg.batch_size, args.steps + 1,
                                       args.batch_tokens or tcfg.batch_tokens, tcfg.pad_to)
    if len(batches) < 2:
        raise ValueError(f"bench.py finetune: the data makes {len(batches)} batch, and a timed step needs 2 (one to "
                         f"warm up)")
    if len(batches) <= args.steps:
        print(f"bench.py finetune: the data makes {len(batches)} batches: {len(batches) - 1} timed steps, not --steps "
              f"{args.steps} (one warms up)")
    return cfg, device, tok, batches, tokens


def bench_finetune(args, overrides):
    """Every depth x setting of FINETUNE_SETTINGS (--settings: some): the model as train.py builds it (the pretrained
    weights, cut to the depth), one warm-up step, then --steps steps on real training batches, the settings of one
    depth in interleaved rounds on the same batches (fewer if the data makes fewer batches); tokens/s and MFU
    against the card's dense bf16 spec peak (mfu_peak), the matmul rate measured here beside it;
    --profile DIR: then each row's first --profile-steps steps again under torch.profiler."""
    depths = [int(d) for d in args.depths.split(",")]
    if min(args.steps, args.profile_steps, *depths) < 1 or args.batch_tokens < 0:
        raise ValueError(f"bench.py finetune: --steps, --depths and --profile-steps must be >= 1, --batch-tokens "
                         f">= 0, got {args.steps}, {args.depths}, {args.profile_steps}, {args.batch_tokens}")
    settings = finetune_settings(args.settings)
    cfg, device, tok, batches, tokens = finetune_data(args, overrides)
    tcfg, steps_timed = cfg["train"], len(batches) - 1
    measured = measured_peak_gflops(device)
    peak, peak_source = mfu_peak(args.peak_gflops, device, measured)
    rows = []
    for depth in depths:
        steps, row_of_depth = [], []
        for name, setting in settings:
            row_cfg = sweep.run_config([args.config, *overrides, f"model.keep_layers={depth}", *setting])["model"]
            torch.manual_seed(tcfg.seed)
            model = backbones.make_model(row_cfg, tok).to(device)
            steps.append(sweep.optimizer_step(model, device, tcfg.weight_decay, amp=tcfg.amp, compile=tcfg.compile,
                                              compile_mode=tcfg.compile_mode))
            row_of_depth.append({"depth": depth, "setting": name,
                                 "params": sum(p.numel() for p in model.parameters()),
                                 "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 "flops_per_token": train_flops_per_token(model)})
        # the warm-up takes batch 0, round r batch r for every setting
        timed = sweep.interleaved_seconds([stepper(step, batches, device) for step in steps], steps_timed)
        for row, seconds in zip(row_of_depth, timed):
            row.update(tokens=sum(tokens[1:]), seconds=round(sum(seconds), 6))
            row["tokens_per_s"] = round(row["tokens"] / sum(seconds), 1)
            row["mfu"] = round(row["flops_per_token"] * row["tokens"] / sum(seconds) / (peak * 1e9), 5)
        if args.profile:
            profile_rows(args.profile, steps, row_of_depth, batches[1: 1 + args.profile_steps], device)
        rows += row_of_depth
        del steps, model   # the models of this depth, their gradients and AdamW states
    print_finetune(rows, peak, peak_source, measured, torch.get_num_threads(), device)
    result = {"config": args.config, "overrides": overrides, "device": device, "threads": torch.get_num_threads(),
              "steps": steps_timed, "batch_size": tcfg.batch_size, "amp": tcfg.amp,
              "batch_tokens": args.batch_tokens or tcfg.batch_tokens,
              "batch_shapes": [list(b[0].shape) for b in batches[1:]], "vocab_size": tok.size, "text_vocab": tok.base,
              "peak_gflops": round(peak, 2), "peak_source": peak_source, "measured_gflops": round(measured, 2),
              "rows": rows}
    print(json.dumps(result))
    return result


def profile_rows(folder, steps, rows, batches, device):
    """Each row's step over batches under torch.profiler: its trace in folder (row["trace"]), its table printed."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for step, row in zip(steps, rows):
        row["trace"] = str(Path(folder) / f"depth{row['depth']}_{row['setting'].replace(' ', '_')}.json")
        table = sweep.profile(step, batches, device, row["trace"])
        print(f"profile: {row['depth']} blocks, {row['setting']}, {len(batches)} steps -> {row['trace']}\n{table}")


def print_finetune(rows, peak, peak_source, measured, threads, device):
    dtype = str(peak_dtype(device)).removeprefix("torch.")
    print(f"peak: {peak:.1f} GFLOP/s ({peak_source}, {device}); measured: {measured:.1f} GFLOP/s (torch.mm "
          f"{PEAK_SIZE}x{PEAK_SIZE} {dtype}, {threads} threads)")
    head = ["blocks", "setting", "trained params", "tokens", "seconds", "tokens/s", "GFLOP/token",
            f"MFU vs {peak_source}"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["depth"]), r["setting"], f"{r['trained_params'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M",
                 str(r["tokens"]), f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.1f}",
                 f"{r['flops_per_token'] / 1e9:.4f}", f"{100 * r['mfu']:.1f}%"]
        print("| " + " | ".join(cells) + " |")
