"""Tests of pauserec.py: token layout, examples and loss masks, KV cache, trie, constrained beam search.

The decoder's own tests are in test_model.py, cot's rationales in test_rationales.py."""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pauserec as pr  # noqa: E402

torch.set_num_threads(1)


def random_codes(seed, n=30, sizes=(3, 4, 5)):
    """Unique random SIDs with many shared prefixes (small code ranges)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (n,), generator=g) for s in sizes], 1)
    return torch.unique(codes, dim=0)[torch.randperm(len(torch.unique(codes, dim=0)), generator=g)]


def setup(seed=0, reasoning="pause", M=2, layout="target", n=30, sizes=(3, 4, 5), words=(), **kw):
    torch.manual_seed(seed)
    codes = random_codes(seed, n, sizes)
    cfg = pr.ModelConfig(n_layer=2, n_head=2, d_model=32, max_len=128, reasoning=reasoning, num_pauses=M,
                         pause_layout=layout, **{"dropout": 0.0, **kw})
    tok = pr.Tokens(sizes, words, codes)
    model = pr.GPT(cfg, tok.size)
    with torch.no_grad():  # larger weights than GPT-2's init so items get clearly different scores
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return cfg, tok, model, pr.SIDTrie(codes), codes


# a scratch Llama-style decoder: RMSNorm, SwiGLU, RoPE, one k/v head for two query heads, head_dim 8 != 32 / 2,
# Qwen2's q/k/v biases, Qwen3's q/k norms, an untied head
LLAMA_STYLE = dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1, head_dim=8, d_ff=48, bias=False,
                   qkv_bias=True, qk_norm=True, tie_head=False)
ARCHS = pytest.mark.parametrize("arch", [{}, LLAMA_STYLE], ids=["gpt2-style", "llama-style"])


def histories(seed, n_items, lengths=(3, 1, 5)):
    r = random.Random(seed)
    return [[r.randrange(n_items) for _ in range(k)] for k in lengths]


# ---------------------------------------------------------------------------------------------- trie


def test_trie_children_and_lookup():
    codes = torch.tensor([[1, 0, 0], [0, 2, 1], [0, 1, 0], [0, 2, 0], [1, 0, 1]])
    t = pr.SIDTrie(codes)
    assert t.children(0, 0)[0] == [0, 1]
    (c0, (p0, p1)) = t.children(0, 0)
    assert t.children(1, p0)[0] == [1, 2]          # under code 0: codes 1 and 2
    assert t.children(1, p1)[0] == [0]             # under code 1: code 0
    under_02 = t.children(1, p0)[1][1]
    assert t.children(2, under_02)[0] == [0, 1]
    assert t.max_children == [2, 2, 2]
    for i, row in enumerate(codes.tolist()):
        assert t.lookup(row) == i
    assert t.lookup([0, 0, 0]) == -1 and t.lookup([1, 0, 2]) == -1
    with pytest.raises(ValueError, match="duplicate"):
        pr.SIDTrie(torch.tensor([[0, 1], [0, 1]]))


def test_trie_matches_dict_trie():
    codes = random_codes(3, n=400, sizes=(5, 6, 7, 3))
    t = pr.SIDTrie(codes)
    L = codes.shape[1]
    # brute force: children of every prefix tuple
    for d in range(L):
        expect = {}
        for row in codes.tolist():
            expect.setdefault(tuple(row[:d]), set()).add(row[d])
        assert len(t.child_start[d]) - 1 == len(expect)
        # walk every prefix through the CSR
        for pre, kids in expect.items():
            p = 0
            for lvl, c in enumerate(pre):
                cs, ids = t.children(lvl, p)
                p = ids[cs.index(c)]
            assert set(t.children(d, p)[0]) == kids
        assert t.max_children[d] == max(len(k) for k in expect.values())
    assert sorted(t.leaf_item.tolist()) == list(range(len(codes)))


def test_trie_edge_cases_and_a_million_items():
    t = pr.SIDTrie(torch.tensor([[2], [0], [5]]))    # one level
    assert t.children(0, 0)[0] == [0, 2, 5] and t.leaf_item.tolist() == [1, 0, 2]
    t = pr.SIDTrie(torch.tensor([[3, 1]]))           # one item
    assert t.lookup([3, 1]) == 0 and t.max_children == [1, 1]
    i = torch.randperm(2**22)[:1_000_000]            # 1M distinct SIDs of level sizes 256, 256, 64, 1
    codes = torch.stack([(i >> 14) & 255, (i >> 6) & 255, i & 63, torch.zeros_like(i)], 1)
    t = pr.SIDTrie(codes)                            # its build time is bench.py beam's trie_build_s
    assert len(t.leaf_item) == len(codes)


# ---------------------------------------------------------------------------------------------- KV cache


@ARCHS
def test_kv_cache_matches_recompute(arch):
    cfg, tok, model, _, _ = setup(1, **arch)
    model.eval()
    ids = torch.randint(0, tok.size, (3, 12))
    full = torch.log_softmax(model(ids), -1)                     # [3, 12, V]
    cache = pr.KVCache()
    steps = [model(ids[:, :4], cache=cache)]                     # prefill 4, then one at a time
    steps += [model(ids[:, i: i + 1], cache=cache) for i in range(4, 12)]
    cached = torch.log_softmax(torch.cat(steps, 1), -1)
    assert torch.allclose(full, cached, atol=1e-5)
    assert not torch.allclose(full[:, 5], full[:, 6], atol=1e-3)  # the check is not vacuous


# ---------------------------------------------------------------------------------------------- examples


def test_token_layout():
    tok = pr.Tokens([3, 4], ["nail", "polish"], torch.tensor([[2, 3], [0, 1]]))
    assert tok.offsets == [6, 9] and tok.word_start == 13 and tok.size == 15
    assert tok.sid(0) == [8, 12] and tok.sid([1, 0]) == [7, 9]
    assert tok.word_ids("Nail, POLISH! xyz") == [13, 14]
    assert tok.decode([1, 8, 12, 3, 14]) == "<bos> <0:2> <1:3> <pause> polish"


def test_loss_mask_pause_and_history():
    cfg, tok, _, _, _ = setup(0, M=3)
    ids, mask = pr.build_example(tok, cfg, [0, 1], 2)
    L = 3
    assert ids == [1] + tok.sid(0) + tok.sid(1) + [3, 3, 3] + tok.sid(2)
    assert mask == [False] * (1 + 2 * L + 3) + [True] * L          # no weight on pauses or history
    cfg.loss_on_history = True
    ids2, mask2 = pr.build_example(tok, cfg, [0, 1], 2)
    assert ids2 == ids
    assert mask2 == [False] * (1 + L) + [True] * L + [False] * 3 + [True] * L
    b_ids, b_mask = pr.collate([(ids, mask), ([1] + tok.sid(2), [False] + [True] * L)])
    assert b_ids.shape == (2, len(ids)) and (b_ids[1, 1 + L:] == pr.Tokens.PAD).all()
    assert not b_mask[1, 1 + L:].any() and b_mask.sum() == 2 * L
    assert pr.build_prompt(tok, cfg, [0, 1]) == ids[:-L]


def test_m0_is_none_mode():
    cfg_n, tok, _, _, _ = setup(0, reasoning="none", M=5)
    cfg_p, _, _, _, _ = setup(0, reasoning="pause", M=0)
    for h in histories(0, 20):
        assert pr.build_example(tok, cfg_n, h, 4) == pr.build_example(tok, cfg_p, h, 4)
        assert pr.build_prompt(tok, cfg_n, h) == pr.build_prompt(tok, cfg_p, h)
        assert pr.Tokens.PAUSE not in pr.build_prompt(tok, cfg_n, h)   # none ignores num_pauses


def test_pause_embedding_changes_predictions():
    cfg, tok, model, trie, codes = setup(4, M=2)
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(4, len(codes))]
    _, s1 = pr.beam_search(model, tok, cfg, trie, prompts, 5, 5)
    with torch.no_grad():
        model.transformer.wte.weight[pr.Tokens.PAUSE] += torch.randn(cfg.d_model)  # LN cancels a constant
    _, s2 = pr.beam_search(model, tok, cfg, trie, prompts, 5, 5)
    assert (s1 - s2).abs().max() > 1e-3


def test_every_item_layout():
    cfg, tok, model, trie, codes = setup(5, M=2, layout="every_item")
    items = [3, 0, 7, 2]
    L, M = 3, 2
    ids, mask = pr.build_sequence_example(tok, cfg, items)
    expect = [1]
    for i in items:
        expect += [3] * M + tok.sid(i)
    assert ids == expect
    sup = [i for i, m in enumerate(mask) if m]                # every item's SID after the first
    assert sup == [1 + k * (M + L) + M + j for k in range(1, 4) for j in range(L)]
    cfg.loss_on_history = True
    assert pr.build_example(tok, cfg, items[:-1], items[-1]) == (ids, mask)
    prompt = pr.build_prompt(tok, cfg, items[:-1])
    assert prompt == ids[:-L]
    # the sequence example's log-prob of its last item equals the inference-time score of that item
    model.eval()
    lp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0, -L:]
    seq_score = lp.gather(1, torch.tensor(ids[-L:])[:, None]).sum()
    assert torch.allclose(seq_score, pr.score_items(model, tok, cfg, prompt, [items[-1]])[0], atol=1e-5)
    # none mode trains all positions in one pass too; target-layout pause cannot
    none = pr.ModelConfig(reasoning="none")
    n_ids, n_mask = pr.build_sequence_example(tok, none, items)
    assert n_ids == [1] + sum((tok.sid(i) for i in items), []) and sum(n_mask) == 3 * L
    with pytest.raises(ValueError, match="every_item"):
        pr.build_sequence_example(tok, pr.ModelConfig(reasoning="pause", pause_layout="target"), items)


# ---------------------------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("reasoning,M,layout", [("none", 0, "target"), ("pause", 2, "target"),
                                                 ("pause", 2, "every_item")])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_beam_equals_exhaustive_ranking(reasoning, M, layout, seed):
    cfg, tok, model, trie, codes = setup(seed, reasoning, M, layout, n=40, sizes=(3, 4, 4, 2))
    N = len(codes)
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(seed, N)]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N)
    for b, p in enumerate(prompts):
        ref = pr.score_items(model, tok, cfg, p, list(range(N)))
        ref_scores, ref_items = ref.sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-5)



@pytest.mark.parametrize("mode", [dict(reasoning="pause", M=2, layout="every_item", pause_embeddings="distinct"),
                                  dict(reasoning="latent", latent_steps=2), dict(reasoning="cot", M=0)])
def test_llama_style_full_beam_equals_exhaustive(mode):
    """RoPE rotates keys before the cache stores them, so the cached beam search (left padding, the shared prompt
    cache, beams reordered) still equals teacher-forced scoring without a cache."""
    words = [f"w{i}" for i in range(4)]
    cfg, tok, model, trie, codes = setup(3, n=40, sizes=(3, 4, 4, 2), words=words, max_rationale_len=3,
                                         **mode, **LLAMA_STYLE)
    if model.pause_slots is not None:
        torch.nn.init.normal_(model.pause_slots, 0, 0.5)
    N = len(codes)
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(3, N)]
    items, scores, rats = pr.beam_search(model, tok, cfg, trie, prompts, N, N, return_rationales=True)
    for b, p in enumerate(prompts):
        if cfg.reasoning == "cot":
            p = p + rats[b] + [tok.END_THINK]
        ref_scores, ref_items = pr.score_items(model, tok, cfg, p, list(range(N))).sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-5)


def test_narrow_beam_returns_only_real_distinct_items():
    for seed in range(30):
        r = random.Random(seed)
        sizes = tuple(r.randint(1, 5) for _ in range(r.randint(1, 4)))
        mode = r.choice([("none", 0, "target"), ("pause", 2, "target"), ("pause", 3, "every_item")])
        cfg, tok, model, trie, codes = setup(seed, *mode, n=r.randint(1, 40), sizes=sizes)
        N = len(codes)
        prompts = [pr.build_prompt(tok, cfg, h) for h in histories(seed, N, (2, 0, 4))]
        beam, k = r.randint(1, 6), r.randint(1, 8)
        items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam, k)
        assert items.shape == (3, k) and scores.shape == (3, k)
        n_valid = min(beam, N, k)
        for b in range(3):
            got = items[b, :n_valid].tolist()
            assert len(set(got)) == n_valid and all(0 <= i < N for i in got)
            assert (items[b, n_valid:] == -1).all() and torch.isinf(scores[b, n_valid:]).all()
            assert (scores[b, :n_valid].diff() <= 1e-6).all()            # sorted descending
            ref = pr.score_items(model, tok, cfg, prompts[b], got)      # scores are the items' log-probs
            assert torch.allclose(scores[b, :n_valid], ref, atol=1e-5)


def test_batched_equals_one_at_a_time():
    cfg, tok, model, trie, codes = setup(6, M=3, n=60, sizes=(4, 4, 4))
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(6, len(codes), (6, 1, 3, 0, 9))]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, 4, 4)
    for b, p in enumerate(prompts):
        i1, s1 = pr.beam_search(model, tok, cfg, trie, [p], 4, 4)
        assert i1[0].tolist() == items[b].tolist()
        assert torch.allclose(s1[0], scores[b], atol=1e-5)


def test_single_item_catalogue():
    cfg, tok, model, _, _ = setup(0)
    codes = torch.tensor([[1, 2, 3]])
    tok = pr.Tokens((3, 4, 5), (), codes)
    items, scores = pr.beam_search(model, tok, cfg, pr.SIDTrie(codes), [[1, 3, 3]], 5, 3)
    assert items.tolist() == [[0, -1, -1]]
    assert torch.isfinite(scores[0, 0]) and torch.isinf(scores[0, 1:]).all()


# ---------------------------------------------------------------------------------------------- cot


def test_cot_example_mask():
    tok = pr.Tokens([2, 3], ["a", "b"], torch.tensor([[0, 1], [1, 2]]))
    cfg = pr.ModelConfig(reasoning="cot", max_rationale_len=2)
    ids, mask = pr.build_example(tok, cfg, [0], 1, [11, 12, 11])
    assert ids == [1, 6, 9, 4, 11, 12, 5, 7, 10]
    assert mask == [False, False, False, False, True, True, True, True, True]
    assert pr.build_prompt(tok, cfg, [0]) == [1, 6, 9, 4]


def greedy_rationale(model, tok, cfg, prompt):
    """Reference greedy decoding without cache: words or </think>, </think> forced at the cap."""
    seq = list(prompt)
    for step in range(cfg.max_rationale_len + 1):
        logits = model(torch.tensor([seq]))[0, -1]
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[tok.word_start:] = True
        allowed[pr.Tokens.END_THINK] = True
        t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        if step == cfg.max_rationale_len:
            t = pr.Tokens.END_THINK
        seq.append(t)
        if t == pr.Tokens.END_THINK:
            return seq
    raise AssertionError("unreachable")


def test_cot_beam_search_matches_reference():
    words = [f"w{i}" for i in range(6)]
    found_short = False
    for seed in range(4):
        cfg, tok, model, trie, codes = setup(seed, "cot", 0, n=25, words=words, max_rationale_len=5)
        model.eval()
        N = len(codes)
        prompts = [pr.build_prompt(tok, cfg, h) for h in histories(seed, N, (2, 4, 1))]
        items, scores, rats = pr.beam_search(model, tok, cfg, trie, prompts, N, N, return_rationales=True)
        for b, p in enumerate(prompts):
            full = greedy_rationale(model, tok, cfg, p)
            assert rats[b] == full[len(p):-1]
            found_short |= len(rats[b]) < cfg.max_rationale_len
            ref = pr.score_items(model, tok, cfg, full, list(range(N)))
            ref_scores, ref_items = ref.sort(descending=True)
            assert items[b].tolist() == ref_items.tolist()
            assert torch.allclose(scores[b], ref_scores, atol=1e-5)
    assert found_short  # some rows stopped before the cap, so mixed-length batches were exercised


def test_cot_decoding_cap():
    words = ["red", "blue"]
    cfg, tok, model, trie, codes = setup(0, "cot", 0, words=words, max_rationale_len=3)
    # make the model always prefer 'red' and never </think>: final hidden state = e, wte[red] = 10 e
    with torch.no_grad():
        e = torch.zeros(cfg.d_model)
        e[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(e)
        model.transformer.wte.weight[tok.word_index["red"]] = 10 * e
        model.transformer.wte.weight[pr.Tokens.END_THINK] = -10 * e
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(0, len(codes))]
    items, _, rats = pr.beam_search(model, tok, cfg, trie, prompts, 4, 4, return_rationales=True)
    assert rats == [[tok.word_index["red"]] * 3] * 3
    assert len(calls) == 1 + (3 + 1) + (codes.shape[1] - 1)   # prefill, 3 words + </think>, SID levels
    assert all(trie.lookup(codes[i].tolist()) == i for i in items.flatten().tolist())


# ---------------------------------------------------------------------------------------------- pause variants, latent


def test_shared_pause_embeddings_unchanged_and_distinct_rows_learn():
    cfg, tok, model, trie, codes = setup(7, M=3)
    ex = [pr.build_example(tok, cfg, h, 5) for h in histories(7, len(codes))]
    ids, mask = pr.collate(ex)
    model.eval()
    # shared: logits bit-identical to the plain embedding sum (the forward as it was before the option)
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
    for block in model.transformer.h:
        x = block(x, None, None, 0)
    assert torch.equal(model(ids), model.lm_head(model.transformer.ln_f(x)))
    assert model.pause_slots is None and "pause_slots" not in model.state_dict()
    # distinct: starts as the shared model, its M rows get different gradients and part after a few steps
    dcfg, _, dmodel, _, _ = setup(7, M=3, pause_embeddings="distinct")
    dmodel.load_state_dict({**model.state_dict(), "pause_slots": torch.zeros(3, cfg.d_model)})  # GPT's init
    dmodel.eval()
    assert torch.equal(dmodel(ids), model(ids))
    opt = torch.optim.AdamW(dmodel.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        dmodel.loss(ids, mask).backward()
        assert (dmodel.pause_slots.grad.abs().sum(1) > 0).all()
        opt.step()
    rows = dmodel.pause_slots.detach()
    assert rows.shape == (3, cfg.d_model) and (torch.cdist(rows, rows) + torch.eye(3) > 1e-3).all()


def test_distinct_pause_slots_under_padding_and_kv_cache():
    cfg, tok, model, trie, codes = setup(8, M=2, pause_embeddings="distinct", layout="every_item")
    with torch.no_grad():
        model.pause_slots.normal_(0, 1.0)
    model.eval()
    P = pr.Tokens.PAUSE
    ids = torch.tensor([[1, P, P, 7, 8, P, P, P, 9, P]])
    slot = model.pause_slot_rows(ids)                        # slots 0 1 _ _ 0 1 0 _ 0
    expect = [None, 0, 1, None, None, 0, 1, 0, None, 0]
    for t, j in enumerate(expect):
        assert torch.equal(slot[0, t], torch.zeros(cfg.d_model) if j is None else model.pause_slots[j])
    # one read in three pieces through the cache (a run split across reads) = one full read
    full = model(ids)
    cache = pr.KVCache()
    parts = [model(ids[:, :6], cache=cache), model(ids[:, 6:7], cache=cache), model(ids[:, 7:], cache=cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    # left padding: batched prompts score as alone, and the full beam still equals exhaustive scoring
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(8, len(codes))]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=len(codes), topk=len(codes))
    for b, p in enumerate(prompts):
        ref_scores, ref_items = pr.score_items(model, tok, cfg, p, list(range(len(codes)))).sort(descending=True)
        assert items[b].tolist() == ref_items.tolist() and torch.allclose(scores[b], ref_scores, atol=1e-5)


def test_latent_config_and_examples():
    with pytest.raises(ValueError, match="model.pause_layout=target"):
        pr.ModelConfig(reasoning="latent")
    with pytest.raises(ValueError, match="model.latent_steps"):
        pr.ModelConfig(reasoning="latent", pause_layout="target", latent_steps=0)
    cfg, tok, model, _, _ = setup(0, reasoning="latent", latent_steps=3)
    ids, mask = pr.build_example(tok, cfg, [0, 1], 2)
    assert ids == [1] + tok.sid(0) + tok.sid(1) + [pr.Tokens.PAUSE] * 3 + tok.sid(2)
    assert mask == [False] * (len(ids) - 3) + [True] * 3
    assert pr.build_prompt(tok, cfg, [0, 1]) == ids[:-3]
    assert model.reasoning_pos.shape == (3, cfg.d_model)
    with pytest.raises(ValueError, match="every_item"):
        pr.build_sequence_example(tok, cfg, [0, 1, 2])


def test_latent_prefill_kv_cache_equals_full_recompute():
    cfg, tok, model, _, codes = setup(9, reasoning="latent", latent_steps=3)
    model.eval()
    prompts = [pr.build_prompt(tok, cfg, h) for h in histories(9, len(codes), (4, 0, 2))]
    with torch.no_grad():
        cached = pr.latent_prefill(model, cfg, prompts, pr.KVCache(), tok.PAD)      # left-padded, K cached steps
        for b, p in enumerate(prompts):                                     # by hand: K full passes, no cache
            emb = model.transformer.wte(torch.tensor([p]))
            for k in range(3):
                at = len(p) - 3 + k
                state = model.hidden(embeds=emb)[0, at - 1]
                emb = torch.cat([emb[:, :at], (state + model.reasoning_pos[k])[None, None], emb[:, at + 1:]], 1)
            full = model.lm_head(model.hidden(embeds=emb)[0, -1])
            assert torch.allclose(cached[b], full, atol=1e-5)
            stateless = model(torch.tensor([p]), last=True)[0]         # the slots read as <pause> tokens
            assert not torch.allclose(full, stateless, atol=1e-3)           # the steps matter


@pytest.mark.parametrize("seed", [0, 1])
def test_latent_full_beam_equals_exhaustive_and_loss_matches(seed):
    cfg, tok, model, trie, codes = setup(seed, reasoning="latent", latent_steps=2, n=40, sizes=(3, 4, 4, 2))
    N = len(codes)
    hs = histories(seed, N)
    prompts = [pr.build_prompt(tok, cfg, h) for h in hs]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N)
    refs = [pr.score_items(model, tok, cfg, p, list(range(N))) for p in prompts]
    for b in range(len(prompts)):
        ref_scores, ref_items = refs[b].sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-5)
    # the training loss (right-padded batch, cached steps) is the mean of the targets' token log-losses
    targets = [3, 0, 7]
    ids, mask = pr.collate([pr.build_example(tok, cfg, h, t) for h, t in zip(hs, targets)])
    model.eval()
    loss = pr.training_loss(model, ids, mask)
    expect = -sum(refs[b][t] for b, t in enumerate(targets)) / (len(targets) * tok.num_levels)
    assert torch.allclose(loss, expect, atol=1e-5)
    loss.backward()
    assert model.reasoning_pos.grad.abs().sum(1).min() > 0
