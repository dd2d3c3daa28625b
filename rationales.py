"""cot's rationales: the words each training example's rationale holds, and the word vocabulary.

A rationale is the target item's template ('category nail polish , top coats ; brand opi', from its
metadata) or an external one from a JSONL file; with model.rationale_noise another item's template stands
in. pauserec.build_example writes it between <think> and </think>; only mode cot reads this file.
"""

import json
import random

from model import ModelConfig
from pauserec import Tokens, words_of


def template_rationale(meta: dict) -> str:
    """E.g. 'category nail polish , top coats ; brand opi': leaf categories of the item's paths, brand."""
    leaves = list(dict.fromkeys(p[-1] for p in meta.get("categories") or [] if p))
    parts = []
    if leaves:
        parts.append("category " + " , ".join(leaves))
    if meta.get("brand"):
        parts.append(f"brand {meta['brand']}")
    return " ; ".join(parts).lower()


def rationale_words(item_meta: list[dict], rationale_file: str = "") -> list[str]:
    """Sorted word vocabulary of all items' template rationales, plus those of a rationale file."""
    texts = [template_rationale(meta) for meta in item_meta]
    texts += list(load_rationales(rationale_file).values()) if rationale_file else []
    return sorted({w for text in texts for w in words_of(text)})


def load_rationales(path: str) -> dict[str, str]:
    """JSONL lines {"key": "<user>:<target>", "rationale": "..."} (user and item indices) -> {key: text}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    out[str(row["key"])] = str(row["rationale"])
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"key\": .., \"rationale\": ..}}: {e}") from e
    return out


def make_rationale(tok: Tokens, cfg: ModelConfig, user: int, target: int, item_meta: list[dict],
                   rng: random.Random, external: dict[str, str] | None = None) -> list[int]:
    """Rationale token ids for one training example: the external one for '<user>:<target>' if given,
    else the target's template; with probability cfg.rationale_noise, another random item's template."""
    text = (external or {}).get(f"{user}:{target}")
    if text is None:
        text = template_rationale(item_meta[target])
    if cfg.rationale_noise > 0 and len(item_meta) > 1 and rng.random() < cfg.rationale_noise:
        other = rng.randrange(len(item_meta) - 1)
        text = template_rationale(item_meta[other + (other >= target)])  # any item but the target
    return tok.word_ids(text)[: cfg.max_rationale_len]


def example_rationales(tok: Tokens, cfg: ModelConfig, examples, item_meta: list[dict],
                       rng: random.Random) -> list[list[int]]:
    """Rationale token ids for training examples (objects with .user and .target), per cfg."""
    external = load_rationales(cfg.rationale_file) if cfg.rationale_file else None
    return [make_rationale(tok, cfg, ex.user, ex.target, item_meta, rng, external) for ex in examples]
