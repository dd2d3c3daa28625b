"""Training examples and their batches: each user's token ids and loss masks (built once), which of them train
together (shuffled batches of similar length, or token-budgeted ones), the length a batch is padded to (train.pad_to),
and its copy to the device. train.py draws each epoch's batches here; sweep.py and paper.py build the same examples
and batches to time them."""
import torch
import torch.nn.functional as F

import data
import pauserec
import rationales


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
    if mcfg.pause_layout == "last":   # one example per user: its last target (dict: a user's later ones win)
        targets = list({ex.user: ex for ex in targets}.values())
    rationale_ids = None
    if mcfg.reasoning == "cot":
        rationale_ids = rationales.example_rationales(tok, mcfg, targets, ds.item_meta, rng)
    return [pauserec.build_example(tok, mcfg, ex.history, ex.target, rationale_ids[i] if rationale_ids else None)
            for i, ex in enumerate(targets)]


def padded_length(longest: int, pad_to: int) -> int:
    """A batch's length T: its longest example's, rounded up to a multiple of pad_to (0: as it is). Few lengths make
    few shapes, and torch.compile (CUDA graphs too) builds a graph per shape; right padding changes no loss."""
    return -(-longest // pad_to) * pad_to if pad_to else longest


def batches(examples, batch_size, generator, batch_tokens=0, pad_to=0):
    """Shuffled batches of similar length (sorted within chunks of 64 batches): less padding. batch_tokens > 0:
    token_batches instead."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    if batch_tokens:
        return token_batches(examples, order, batch_tokens, generator, pad_to)
    chunk = 64 * batch_size
    out = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    shuffle = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in shuffle]


def token_batches(examples, order, batch_tokens, generator, pad_to=0):
    """Batches whose padded size (rows x padded_length of the longest row) is at most batch_tokens, shuffled: all
    examples sorted by length (ties in the random order), then cut greedily. The lengths in that order are the same
    in every epoch, so are the cuts: the number of batches is fixed (Phase.steps_per_epoch); equal-length examples
    mix across epochs."""
    out, rows = [], []
    for i in sorted(order, key=lambda i: len(examples[i][0])):   # ascending: example i is its batch's longest
        length = padded_length(len(examples[i][0]), pad_to)
        if length > batch_tokens:
            raise ValueError(f"train.batch_tokens={batch_tokens} is below a training example's {length} tokens"
                             + (f" (padded to a multiple of train.pad_to={pad_to})" if pad_to else ""))
        if (len(rows) + 1) * length > batch_tokens:
            out, rows = out + [rows], []
        rows.append(i)
    out += [rows] if rows else []
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def collate(examples, pad: int, pad_to: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pauserec.collate, right-padded to padded_length: ids [B, T] (pad), loss_mask [B, T] bool (False on pads)."""
    ids, loss_mask = pauserec.collate(examples, pad)
    extra = padded_length(ids.shape[1], pad_to) - ids.shape[1]
    return F.pad(ids, (0, extra), value=pad), F.pad(loss_mask, (0, extra), value=False)


def to_device(tensors, device: str) -> list[torch.Tensor]:
    """CPU tensors on device. CUDA: copied from pinned (page-locked) memory without blocking, so the host goes on
    to launch the step while the copy runs (a pageable copy makes the host wait for it)."""
    if device.startswith("cuda"):
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]
