"""No training example reaches a target it is evaluated on: for every user of the demo's synthetic data, the
main phase's examples hold neither the validation nor the test item, the refit's never the test item, in both
layouts (through batching.training_examples, one user at a time, so that each example is known to be the user's)."""
import types
from dataclasses import replace
from pathlib import Path

import pytest

import batching
import common
import data
import pauserec as pr
import train

ROOT = Path(__file__).resolve().parents[1]


def items_in(ids, tok):
    """The items whose whole SID appears in a token sequence (level-0 tokens start one; ranges are disjoint)."""
    item_of = {tuple(s): i for i, s in enumerate(tok.item_sids)}
    first = range(tok.offsets[0], tok.offsets[0] + tok.level_sizes[0])
    L = tok.num_levels
    return {item_of[tuple(ids[j:j + L])] for j, t in enumerate(ids) if t in first and tuple(ids[j:j + L]) in item_of}


@pytest.mark.parametrize("layout", ["every_item", "target"])
@pytest.mark.parametrize("max_history", [20, 3])   # the default: one window per user; 3: several
def test_training_examples_never_hold_an_evaluated_target(layout, max_history):
    cfg = common.load_config(ROOT / "configs" / "demo.yaml", [], train.SECTIONS)
    ds = data.load_dataset(cfg["data"])
    n = len(ds.item_ids)
    tok = pr.Tokens.from_codes([[i // 32, i % 32] for i in range(n)])
    mcfg = replace(cfg["model"], pause_layout=layout)
    for u, seq in enumerate(ds.sequences):
        assert len(set(seq)) == len(seq)   # synthetic users buy an item once: "holds the item" is unambiguous
        one = types.SimpleNamespace(sequences=[seq], item_meta=ds.item_meta)
        split = data.leave_one_out([seq], max_history)
        for refit, banned, last_allowed in ((False, seq[-2:], seq[-3]), (True, seq[-1:], seq[-2])):
            examples = batching.training_examples(tok, mcfg, one, split, max_history, None, refit=refit)
            seen = set().union(*(items_in(ids, tok) for ids, _ in examples))
            assert not seen & set(banned), (u, refit, sorted(seen & set(banned)))
            assert last_allowed in seen, (u, refit)   # and the examples reach up to the cut, not short of it
