"""The paper's stages before next-item SFT, on a pretrained backbone, and how a run starts from another's weights.

  train.task=align           continued pretraining on texts that pair each item's SID with its text, both ways:
        SID -> text:  [BOS] Item sid(i) is | {title}. Category: {category}.
        text -> SID:  [BOS] {title}. Category: {category}. Item: | sid(i)
                             loss on the side after '|' only, softmax over the whole vocabulary (text and ours)
  train.task=pause_pretrain  the same texts with <pause> inserted before a token at rate train.pause_rate; the
                             <pause> row starts at the mean of all rows (plus a tiny spread) and is the only
                             weight trained (train.pause_trains=row, the paper's), or every weight but the text
                             rows trains (train.pause_trains=model: the blocks learn to use the pauses)
  model.init_from=RUN_DIR    a run starts from RUN_DIR/model.pt (same SID table and shapes), so stages chain:
                             align -> plain SFT; align -> pause_pretrain -> pause SFT; align -> CoT SFT

train.py runs the stages through its epoch loop (no validation, no test) and the SFTs; paper.py runs the
whole comparison.
"""

import random
from pathlib import Path

import torch
import torch.nn.functional as F

import bpe
import sid
from model import split_rows

PAUSE_SPREAD = 0.01   # the pause row's initial noise, as a fraction of each dimension's std over all rows


# ---------------------------------------------------------------------------------------------------------
# Alignment texts and pause insertion: (ids, loss_mask) examples, as pauserec.build_example returns


def describe(text, meta: dict, max_title_len: int) -> list[int]:
    """Text token ids of ' {title}. Category: {category}.' (the title cut to max_title_len tokens); [] when the
    item has no title."""
    if not meta.get("title"):
        return []
    ids = text.encode(" " + meta["title"])[:max_title_len]
    if meta.get("category"):
        ids += text.encode(". Category: " + meta["category"])
    return ids + text.encode(".")


def alignment_pair(tok, text, i: int, meta: dict, max_title_len: int) -> list[tuple[list[int], list[bool]]]:
    """Item i's two examples (text: the backbone's tokenizer), SID -> text then text -> SID (module docstring);
    loss_mask True on the generated side only: the description, or the L SID tokens. [] without a title."""
    desc = describe(text, meta, max_title_len)
    if not desc:
        return []
    sid_ids = tok.sid(i)
    to_text = [tok.BOS] + text.encode("Item") + sid_ids + text.encode(" is")
    to_sid = [tok.BOS] + desc + text.encode(" Item:")
    return [(to_text + desc, [False] * len(to_text) + [True] * len(desc)),
            (to_sid + sid_ids, [False] * len(to_sid) + [True] * len(sid_ids))]


def alignment_examples(tok, text, item_meta: list[dict], max_title_len: int) -> list[tuple[list[int], list[bool]]]:
    """Two examples per titled item (alignment_pair), in item order."""
    out = [ex for i, meta in enumerate(item_meta) for ex in alignment_pair(tok, text, i, meta, max_title_len)]
    if not out:
        raise ValueError("train.task=align needs item titles (data.item_meta): no item has one")
    return out


def insert_pauses(tok, example, rate: float, rng) -> tuple[list[int], list[bool]]:
    """example (ids, loss_mask) with an unsupervised <pause> before each token after [BOS] with probability rate
    (rng: random.Random). The token after a pause is predicted from the pause's state."""
    ids, mask = example
    out_ids, out_mask = ids[:1], mask[:1]
    for t, m in zip(ids[1:], mask[1:]):
        if rng.random() < rate:
            out_ids.append(tok.PAUSE)
            out_mask.append(False)
        out_ids.append(t)
        out_mask.append(m)
    return out_ids, out_mask


def stage_examples(tcfg, mcfg, tok, item_meta: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """A stage's training texts (train.task align | pause_pretrain): the alignment texts, with pauses inserted
    (seeded by train.seed) for pause_pretrain. tcfg, mcfg: the train and model sections."""
    if mcfg.backbone == "scratch":
        raise ValueError(f"train.task={tcfg.task} trains on item texts: it needs a pretrained model.backbone")
    text = bpe.load_tokenizer(mcfg.hf_dir)
    if len(text) > tok.base:
        raise ValueError(f"{mcfg.hf_dir}: the tokenizer has {len(text)} tokens, more than vocab_size {tok.base}")
    examples = alignment_examples(tok, text, item_meta, mcfg.max_title_len)
    if tcfg.task == "pause_pretrain":
        rng = random.Random(tcfg.seed)
        examples = [insert_pauses(tok, ex, tcfg.pause_rate, rng) for ex in examples]
    return examples


# ---------------------------------------------------------------------------------------------------------
# The loss over the whole vocabulary, and the pause row


def text_loss(model, ids, loss_mask):
    """Mean cross-entropy of the supervised tokens of ids [N, T] (right-padded), softmax over all V tokens:
    the alignment texts predict text tokens, which a head over our tokens only (model.head=new) cannot."""
    sel = loss_mask[:, 1:]                                  # position i predicts ids[:, i + 1]
    h = model.hidden(ids[:, :-1])[sel]                      # [n_supervised, d]
    return F.cross_entropy(model.logits(h, every_token=True).float(), ids[:, 1:][sel])


def pause_row(model, tok) -> tuple[torch.nn.Parameter, int]:
    """(the parameter holding the <pause> input row, its row index): our rows, apart from the text rows (the stages
    run on pretrained backbones only)."""
    return model.new_rows, tok.PAUSE - tok.base


@torch.no_grad()
def init_pause_row(model, tok, generator: torch.Generator):
    """<pause> row = the mean of all input rows (text and ours) + PAUSE_SPREAD x their per-dimension std x noise."""
    rows = model.input_rows()                               # [V, d]
    table, row = pause_row(model, tok)
    noise = torch.randn(rows.shape[1], generator=generator).to(rows.device, rows.dtype)
    table[row] = rows.mean(0) + PAUSE_SPREAD * rows.std(0) * noise


def train_only_pause_row(model, tok) -> list[torch.nn.Parameter]:
    """Freeze every weight but the <pause> row: the other parameters stop requiring grad, and the table holding the
    row gets a hook that zeroes the other rows' gradient (with AdamW at weight decay 0 they then stay bit-identical).
    Returns the one parameter to optimise. Call after moving the model to its device."""
    table, row = pause_row(model, tok)
    for p in model.parameters():
        p.requires_grad_(p is table)
    keep = torch.zeros(table.shape[0], 1, device=table.device, dtype=table.dtype)   # [V, 1]: 1 at the pause row
    keep[row] = 1
    table.register_hook(lambda grad: grad * keep)
    return [table]


# ---------------------------------------------------------------------------------------------------------
# model.init_from


ROW_TABLES = ("transformer.wte.weight", "lm_head.weight", "new_rows", "new_head_rows")


def load_init(model, tok, codes, run_dir):
    """Load RUN_DIR/model.pt into model: the run's SID table (sids.pt) must equal codes and every tensor must have
    its shape, except that our vocabulary may extend the run's by rationale words (cot from an aligned run): those
    rows keep their initial values. A mismatch is a one-line error naming the run and the first difference."""
    run_dir = Path(run_dir)
    where = f"model.init_from={run_dir}"
    for name in ("sids.pt", "model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{where}: {run_dir / name} not found (a finished train.py run is needed)")
    theirs_codes, _, _ = sid.load_sids(run_dir / "sids.pt", len(codes))
    if not torch.equal(torch.as_tensor(theirs_codes), torch.as_tensor(codes)):
        raise ValueError(f"{where}: its SID table (sids.pt) differs from this run's (other data or sid settings)")
    checkpoint = torch.load(run_dir / "model.pt", map_location=model.device, weights_only=True)
    theirs, words = checkpoint["model"], list(checkpoint.get("words", []))
    split_rows(model, theirs, "")   # a run from before our rows lived apart (new_rows)
    if tok.words[:len(words)] != words:
        raise ValueError(f"{where}: its rationale words differ from this run's")
    state = model.state_dict()
    for name in list(state) + [n for n in theirs if n not in state]:
        if name not in theirs:
            raise ValueError(f"{where}: model.pt lacks {name} (other model settings, e.g. model.keep_layers)")
        if name not in state:
            raise ValueError(f"{where}: model.pt has {name}, which this model lacks (other model settings)")
        mine, other = state[name], theirs[name]
        extra = len(tok.words) - len(words)     # rationale-word rows that this run appends
        grows = name in ROW_TABLES and extra and other.shape[0] + extra == mine.shape[0]
        if grows and other.shape[1:] == mine.shape[1:]:
            state[name] = torch.cat([other, mine[other.shape[0]:]])
        elif other.shape != mine.shape:
            raise ValueError(f"{where}: {name} is {list(other.shape)} in model.pt but {list(mine.shape)} here "
                             f"(other model settings or vocabulary)")
        else:
            state[name] = other
    model.load_state_dict(state)
