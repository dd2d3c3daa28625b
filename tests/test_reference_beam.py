"""beam_search against a plain reference beam search, at beam widths below the catalogue size, in every mode.

The reference has no KV cache, no batching, no padding and no CSR trie: it expands every beam by each
child code its prefix has in the catalogue, scores each extended prefix by one plain full forward over
prompt + prefix, and keeps the top B by cumulative log-prob. Unlike the full-beam tests (a full beam never
prunes), this checks *which* items a narrow beam keeps. It needs only torch.
"""
import dataclasses

import pytest
import torch
from test_pauserec import LLAMA_STYLE, greedy_rationale, histories, setup

import pauserec as pr

torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(4)]
MODES = {   # setup() arguments; the modes of the full-beam tests
    "none": dict(reasoning="none", M=0),
    "pause_target": dict(reasoning="pause", M=2, layout="target"),
    "pause_every_item": dict(reasoning="pause", M=3, layout="every_item"),
    "pause_distinct": dict(reasoning="pause", M=2, layout="every_item", pause_embeddings="distinct"),
    "latent": dict(reasoning="latent", latent_steps=2),
    "cot": dict(reasoning="cot", M=0, words=WORDS, max_rationale_len=3),
}


def latent_embeds(model, cfg, prompt):
    """Input rows [1, Tp, d] of a latent prompt: each of its last K slots, filled in order, is the state one
    full pass produces at the position before it + reasoning_pos[k]."""
    emb = model.embed(torch.tensor([prompt]))
    for k in range(cfg.latent_steps):
        at = len(prompt) - cfg.latent_steps + k
        state = model.hidden(embeds=emb)[0, at - 1]
        emb = torch.cat([emb[:, :at], (state + model.reasoning_pos[k])[None, None], emb[:, at + 1:]], 1)
    return emb


def next_logp(model, cfg, prompt, prefix):
    """log P(next token | prompt + prefix) [V'] from one full forward without a cache."""
    if cfg.reasoning == "latent":
        x = torch.cat([latent_embeds(model, cfg, prompt), model.embed(torch.tensor([prefix], dtype=torch.long))], 1)
        h = model.hidden(embeds=x)[0, -1]
    else:
        h = model.hidden(torch.tensor([prompt + prefix]))[0, -1]
    return torch.log_softmax(model.logits(h).float(), -1)


def reference_beam(model, tok, cfg, n_items, prompt, beam):
    """(items, scores, margin): the top `beam` items best first, their summed log-probs, and the smallest gap at
    a cut between the last kept and the first dropped candidate (a tie there would make the order arbitrary)."""
    sids = {tuple(tok.sid(i)): i for i in range(n_items)}
    beams, margin = [((), 0.0)], float("inf")
    for d in range(tok.num_levels):
        cands = []
        for prefix, score in beams:
            logp = next_logp(model, cfg, prompt, list(prefix))
            for t in sorted({s[d] for s in sids if s[:d] == prefix}):
                cands.append((prefix + (t,), score + logp[t - model.head_start].item()))
        cands.sort(key=lambda c: -c[1])
        if len(cands) > beam:
            margin = min(margin, cands[beam - 1][1] - cands[beam][1])
        beams = cands[:beam]
    return [sids[p] for p, _ in beams], [s for _, s in beams], margin


@pytest.mark.parametrize("arch", [{}, LLAMA_STYLE], ids=["gpt2-style", "llama-style"])
@pytest.mark.parametrize("mode", list(MODES))
def test_narrow_beam_keeps_the_reference_beams_items(mode, arch):
    seed = 11
    cfg, tok, model, trie, codes = setup(seed, n=40, sizes=(3, 4, 4, 2), **MODES[mode], **arch)
    if model.pause_slots is not None:
        torch.nn.init.normal_(model.pause_slots, 0, 0.5)
    model.eval()
    N = len(codes)
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(seed, N, (3, 1, 6, 2))]
    for beam in (1, 2, 3, 5):
        assert beam < N
        items, scores, rats = pr.beam_search(model, tok, cfg, trie, prompts, beam, beam, return_rationales=True)
        for b, p in enumerate(prompts):
            with torch.no_grad():
                full = greedy_rationale(model, tok, cfg, p) if cfg.reasoning == "cot" else p
                ref_items, ref_scores, margin = reference_beam(model, tok, cfg, N, full, beam)
            assert margin > 1e-4, f"near tie at a cut ({margin:.1e}): pick another seed"
            assert items[b].tolist() == ref_items, (beam, b)
            assert torch.allclose(scores[b], torch.tensor(ref_scores), atol=1e-4), (beam, b)
            if cfg.reasoning == "cot":
                assert rats[b] == full[len(p):-1]


def test_beam_search_argument_errors():
    cfg, tok, model, trie, codes = setup(0, n=20)
    prompt = pr.build_prompt(tok, cfg, [0, 1])
    for beam, k, match in ((0, 5, "beam_size and topk must be >= 1, got 0, 5"), (3, 0, "got 3, 0")):
        with pytest.raises(ValueError, match=match):
            pr.beam_search(model, tok, cfg, trie, [prompt], beam, k)
    for prompts in ([], [prompt, []]):
        with pytest.raises(ValueError, match="prompts must be non-empty token lists"):
            pr.beam_search(model, tok, cfg, trie, prompts, 3, 3)
    with pytest.raises(ValueError, match="model is on cpu, not on the requested device cuda"):
        pr.beam_search(model, tok, cfg, trie, [prompt], 3, 3, device="cuda")
    lcfg, ltok, lmodel, ltrie, _ = setup(0, n=20, reasoning="latent", latent_steps=2)
    with pytest.raises(ValueError, match="prompts must hold \\[BOS\\] history and 2 latent slots"):
        pr.beam_search(lmodel, ltok, lcfg, ltrie, [[ltok.BOS, ltok.PAUSE]], 3, 3)


def test_max_len_overflow_is_a_clear_error():
    cfg, tok, _, trie, codes = setup(0, n=20)
    cfg = dataclasses.replace(cfg, max_len=16)   # [BOS] + 3 items x 3 SID tokens + 2 pauses = 12 tokens
    model = pr.GPT(cfg, tok.size).eval()
    assert len(pr.build_prompt(tok, cfg, [0, 1, 2])) == 12
    with pytest.raises(ValueError, match="example of 18 tokens exceeds model.max_len=16: shorten history"):
        pr.build_prompt(tok, cfg, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="example of 18 tokens exceeds model.max_len=16"):
        pr.build_example(tok, cfg, [0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match="sequence longer than model.max_len=16 positions"):
        model(torch.ones(1, 17, dtype=torch.long))
    # a prompt that fits, but not with its L SID tokens decoded after it: the beam search says so too
    with pytest.raises(ValueError, match="sequence longer than model.max_len=16 positions"):
        pr.beam_search(model, tok, cfg, trie, [[tok.BOS] * 15], 3, 3)
