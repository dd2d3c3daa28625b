"""tools/pause_analysis.py: the attention it reads back is a causal softmax, and the parts of the prompt it reports
for the last position (last item's SID, earlier pauses, BOS, itself, the rest) cover the prompt once."""
import importlib.util
from pathlib import Path

import torch

import data
import pauserec as pr
from model import GPT, ModelConfig

spec = importlib.util.spec_from_file_location("pause_analysis",
                                              Path(__file__).parents[1] / "tools" / "pause_analysis.py")
analysis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analysis)


def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, reasoning="pause", num_pauses=3, pause_layout="last",
                      pos="rope")
    tok = pr.Tokens.from_codes(torch.tensor([[c, p] for c in range(3) for p in range(2)]))
    return cfg, tok, GPT(cfg, tok.size, tok.base).eval()


def test_attention_weights_are_a_causal_softmax():
    cfg, tok, model = tiny()
    prompt = pr.build_prompt(tok, cfg, [0, 3, 5])
    for w in analysis.attention_weights(model, torch.tensor([prompt])):   # per block [H, T, T]
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w.triu(1) == 0).all()


def test_the_last_positions_parts_cover_the_prompt_once():
    cfg, tok, model = tiny()
    examples = [data.Example(user=u, history=h, target=1) for u, h in enumerate([[0, 3, 5], [2], [4, 4, 1, 0]])]
    for block in analysis.where_last_looks(model, tok, cfg, examples):
        assert abs(sum(block.values()) - 1) < 1e-5, block
