"""Tests of rationales.py: cot's template rationales, noise and an external rationale file."""

import collections
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pauserec as pr  # noqa: E402
import rationales  # noqa: E402

META = [
    {"categories": [["Beauty", "Makeup", "Nails", "Nail Polish"], ["Beauty", "Top Coats"]], "brand": "OPI"},
    {"categories": [["Beauty", "Skin Care", "Face", "Creams"]], "brand": None},
    {"categories": [], "brand": "Dove"},
    {"categories": [["Beauty", "Hair Care", "Shampoos"]], "brand": "Pantene"},
]


def test_rationale_template_noise_and_file(tmp_path):
    assert rationales.template_rationale(META[0]) == "category nail polish , top coats ; brand opi"
    assert rationales.template_rationale(META[1]) == "category creams"
    assert rationales.template_rationale(META[2]) == "brand dove"
    words = rationales.rationale_words(META)
    assert "polish" in words and "pantene" in words and words == sorted(set(words))
    tok = pr.Tokens([2], words, torch.tensor([[0], [1], [0], [1]]))
    cfg = pr.ModelConfig(reasoning="cot", max_rationale_len=4)
    rng = random.Random(0)
    kept = rationales.make_rationale(tok, cfg, 7, 0, META, rng)
    assert kept == tok.word_ids("category nail polish ,")                   # capped to 4 words
    cfg.rationale_noise = 1.0
    others = {tuple(tok.word_ids(rationales.template_rationale(m))[:4]) for m in META[1:]}
    for _ in range(20):
        assert tuple(rationales.make_rationale(tok, cfg, 7, 0, META, rng)) in others   # always another item's
    cfg.rationale_noise = 0.0
    f = tmp_path / "r.jsonl"
    f.write_text('{"key": "7:0", "rationale": "Brand OPI shampoos"}\n\n{"key": "8:1", "rationale": "x"}\n')
    ext = rationales.load_rationales(str(f))
    assert rationales.make_rationale(tok, cfg, 7, 0, META, rng, ext) == tok.word_ids("brand opi shampoos")
    assert rationales.make_rationale(tok, cfg, 9, 0, META, rng, ext) == kept          # no entry: template
    cfg.rationale_file = str(f)
    Ex = collections.namedtuple("Ex", "user history target")
    assert rationales.example_rationales(tok, cfg, [Ex(7, [1], 0), Ex(9, [1], 0)], META, rng) == [
        tok.word_ids("brand opi shampoos"), kept]
    assert "x" in rationales.rationale_words(META, str(f)) and "x" not in words
    f.write_text('{"rationale": "x"}\n')
    with pytest.raises(ValueError, match="r.jsonl:1"):
        rationales.load_rationales(str(f))
