"""Supervised reasoning slots (model.step_loss draft | progressive) and the pause ablations (evaluate.py
--ablate-pauses hide | shuffle): the losses reach exactly the slots they claim, inference stays exact, and the
ablations knock out what they say."""
import contextlib
import io
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from test_pauserec import histories, setup
from test_train import tiny_args

import evaluate
import model as mdl
import pauserec as pr
import train

# ---------------------------------------------------------------------------------------------- draft


def test_draft_targets_are_every_pause_but_the_last_before_a_supervised_item():
    cfg, tok, model, trie, codes = setup(5, M=3, layout="every_item", step_loss="draft")
    items, M, L = [3, 0, 7, 2], 3, 3
    ids, mask = pr.build_sequence_example(tok, cfg, items)
    where, first = mdl.draft_targets(torch.tensor([ids]), torch.tensor([mask]), tok.PAUSE)
    # item k's pauses start at 1 + k (M + L); the first item is not supervised, so it gets no draft either
    expect = [1 + k * (M + L) + j for k in range(1, 4) for j in range(M - 1)]
    assert where[0].nonzero().flatten().tolist() == expect
    assert [first[0, i].item() for i in expect] == [tok.sid(items[k])[0] for k in range(1, 4) for _ in range(M - 1)]
    # target layout: only the run before the target; M = 1 has no draft position at all
    cfg.pause_layout = "target"
    ids, mask = pr.build_example(tok, cfg, items[:-1], items[-1])
    where, first = mdl.draft_targets(torch.tensor([ids]), torch.tensor([mask]), tok.PAUSE)
    assert where[0].nonzero().flatten().tolist() == [len(ids) - L - M, len(ids) - L - M + 1]
    ids, mask = pr.build_example(tok, mdl.ModelConfig(reasoning="pause", num_pauses=1, pause_layout="target"),
                                 items[:-1], items[-1])
    assert not mdl.draft_targets(torch.tensor([ids]), torch.tensor([mask]), tok.PAUSE)[0].any()


@pytest.mark.parametrize("layout", ["every_item", "target"])
def test_draft_loss_is_sid_loss_plus_weighted_draft_cross_entropy(layout):
    cfg, tok, model, trie, codes = setup(2, M=3, layout=layout, step_loss="draft", step_loss_weight=0.7)
    model.eval()
    hs, targets = histories(2, len(codes)), [4, 1, 6]
    build = pr.build_sequence_example if layout == "every_item" else None
    examples = ([build(tok, cfg, h + [t]) for h, t in zip(hs, targets)] if build else
                [pr.build_example(tok, cfg, h, t) for h, t in zip(hs, targets)])
    ids, mask = pr.collate(examples)
    logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)          # reference: logits at every position
    nll = -logp.gather(2, ids[:, 1:, None])[..., 0]                   # [N, T-1] of the next token
    sid_loss = nll[mask[:, 1:]].mean()
    draft = []   # by hand: each pause followed by a pause predicts the first SID token after its run
    for n, row in enumerate(ids.tolist()):
        for i in range(len(row) - 1):
            if row[i] == row[i + 1] == tok.PAUSE:
                j = next(j for j in range(i, len(row)) if row[j] != tok.PAUSE)
                if mask[n, j]:
                    draft.append(-logp[n, i, row[j]])
    assert len(draft) > 0
    expect = sid_loss + 0.7 * torch.stack(draft).mean()
    assert torch.allclose(model.loss(ids, mask), expect, atol=1e-5)
    model.cfg.step_loss_weight = 0.0   # weight 0: the plain pause loss (the model holds its own resolved cfg)
    assert torch.allclose(model.loss(ids, mask), sid_loss, atol=1e-5)


# ---------------------------------------------------------------------------------------------- progressive


def test_progressive_loss_adds_annealed_step_losses():
    K, temp, w = 3, 2.0, 0.5
    cfg, tok, model, trie, codes = setup(1, reasoning="latent", latent_steps=K, step_loss="progressive",
                                         step_temp=temp, step_loss_weight=w, n=40, sizes=(3, 4, 4, 2))
    model.eval()
    hs, targets = histories(1, len(codes)), [3, 0, 7]
    ids, mask = pr.collate([pr.build_example(tok, cfg, h, t) for h, t in zip(hs, targets)])
    main, steps = [], []
    for h, t in zip(hs, targets):   # reference without a cache: fill the K slots one full pass at a time
        prompt = pr.build_prompt(tok, cfg, h)
        main.append(-pr.score_items(model, tok, cfg, prompt, [t])[0] / tok.num_levels)
        emb, Tp = model.embed(torch.tensor([prompt])), len(prompt)
        for k in range(K):
            emb = emb.clone()
            emb[:, Tp - K + k] = model.hidden(embeds=emb)[:, Tp - K + k - 1] + model.reasoning_pos[k]
        states = model.hidden(embeds=emb)[0, Tp - K:]                   # [K, d]: the state after each step
        for k in range(K - 1):
            logits = model.logits(states[k]) / temp ** (K - 1 - k)
            steps.append(F.cross_entropy(logits[None].float(), torch.tensor([tok.sid(t)[0]])))
    expect = torch.stack(main).mean() + w * torch.stack(steps).mean()
    assert torch.allclose(pr.training_loss(model, ids, mask), expect, atol=1e-5)


@pytest.mark.parametrize("mode", [dict(reasoning="pause", M=3, layout="every_item", step_loss="draft"),
                                  dict(reasoning="pause", M=2, layout="target", step_loss="draft",
                                       pause_embeddings="distinct"),
                                  dict(reasoning="latent", latent_steps=3, step_loss="progressive")])
def test_step_losses_train_and_full_beam_stays_exact(mode):
    cfg, tok, model, trie, codes = setup(4, n=40, sizes=(3, 4, 4, 2), **mode)
    N, hs = len(codes), histories(4, len(codes))
    ids, mask = pr.collate([pr.build_example(tok, cfg, h, t) for h, t in zip(hs, [1, 2, 3])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):   # the variant's own weights, not the init's
        opt.zero_grad()
        pr.training_loss(model, ids, mask).backward()
        opt.step()
    prompts = [pr.build_prompt(tok, cfg, h) for h in hs]
    items, scores = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N)
    for b, p in enumerate(prompts):
        ref_scores, ref_items = pr.score_items(model, tok, cfg, p, list(range(N))).sort(descending=True)
        assert items[b].tolist() == ref_items.tolist()
        assert torch.allclose(scores[b], ref_scores, atol=1e-4)


def test_step_loss_config_checks():
    with pytest.raises(ValueError, match="step_loss=draft needs model.reasoning=pause"):
        mdl.ModelConfig(reasoning="none", step_loss="draft")
    with pytest.raises(ValueError, match="step_loss=progressive needs model.reasoning=latent"):
        mdl.ModelConfig(reasoning="pause", step_loss="progressive")
    with pytest.raises(ValueError, match="step_temp"):
        mdl.ModelConfig(reasoning="pause", step_loss="draft", step_temp=0)


# ---------------------------------------------------------------------------------------------- ablations


def ablated_search(model, tok, cfg, trie, prompts, N, how):
    return pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N,
                          prefill=partial(evaluate.ablated_prefill, how=how))


def hidden_scores(model, tok, cfg, prompt, items):
    """Reference for ablate=hide without a cache: one full pass over prompt + SID in which the M pauses before
    the SID are masked as keys for every query (each still sees itself), positions as trained."""
    M, Tp = pr.num_slots(cfg), len(prompt)
    sids = torch.tensor([tok.sid(i) for i in items])
    seq = torch.cat([torch.tensor([prompt]).expand(len(items), Tp), sids], 1)[:, :-1]
    keep = torch.ones_like(seq, dtype=torch.bool)
    keep[:, Tp - M:Tp] = False
    positions = torch.arange(seq.shape[1]).expand_as(seq)
    logits = model(seq, key_mask=keep, positions=positions)[:, Tp - 1:]
    return torch.log_softmax(logits.float(), -1).gather(2, sids[..., None]).sum((1, 2))


def latent_hidden_scores(model, tok, cfg, prompt, items):
    """Reference for ablate=hide in latent mode without a cache: the K slots filled one full pass at a time with
    the earlier steps masked as keys (each position still sees itself), then one pass over prompt + SID."""
    K, Tp = cfg.latent_steps, len(prompt)
    emb, keep = model.embed(torch.tensor([prompt])), torch.ones(1, Tp, dtype=torch.bool)
    for k in range(K):
        at = Tp - K + k
        emb = emb.clone()
        emb[:, at] = model.hidden(embeds=emb, key_mask=keep, positions=torch.arange(Tp)[None])[:, at - 1] \
            + model.reasoning_pos[k]
        keep[:, at] = False
    sids = torch.tensor([tok.sid(i) for i in items])
    embeds = torch.cat([emb.expand(len(items), -1, -1), model.embed(sids[:, :-1])], 1)
    T = embeds.shape[1]
    keep = torch.cat([keep, torch.ones(1, T - Tp, dtype=torch.bool)], 1).expand(len(items), T)
    logits = model.logits(model.hidden(embeds=embeds, key_mask=keep, positions=torch.arange(T).expand(len(items), T)))
    return torch.log_softmax(logits[:, Tp - 1:].float(), -1).gather(2, sids[..., None]).sum((1, 2))


@pytest.mark.parametrize("layout", ["target", "every_item", "latent"])
def test_hide_equals_masked_full_pass(layout):
    mode = dict(reasoning="latent", latent_steps=3) if layout == "latent" else dict(M=2, layout=layout)
    cfg, tok, model, trie, codes = setup(6, n=40, sizes=(3, 4, 4, 2), **mode)
    reference = latent_hidden_scores if layout == "latent" else hidden_scores
    model.eval()
    N, hs = len(codes), histories(6, len(codes))
    prompts = [pr.build_prompt(tok, cfg, h) for h in hs]
    items, scores = ablated_search(model, tok, cfg, trie, prompts, N, "hide")
    plain, _ = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N)
    assert not torch.equal(items, plain)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            ref_scores, ref_items = reference(model, tok, cfg, p, list(range(N))).sort(descending=True)
            assert items[b].tolist() == ref_items.tolist()
            assert torch.allclose(scores[b], ref_scores, atol=1e-5)


@pytest.mark.parametrize("mode", [dict(reasoning="pause", M=2, layout="target"),
                                  dict(reasoning="latent", latent_steps=2)])
def test_shuffle_reads_the_next_prompts_slots(mode):
    """Identical prompts: shuffling changes nothing (bit for bit); different prompts: it changes the scores, and
    hide changes them too."""
    cfg, tok, model, trie, codes = setup(7, n=40, sizes=(3, 4, 4, 2), **mode)
    model.eval()
    N, hs = len(codes), histories(7, len(codes), lengths=(4, 4, 4))
    prompts = [pr.build_prompt(tok, cfg, h) for h in hs]
    same = [prompts[0]] * 3
    plain_same = pr.beam_search(model, tok, cfg, trie, same, beam_size=N, topk=N)
    assert all(torch.equal(a, b) for a, b in
               zip(ablated_search(model, tok, cfg, trie, same, N, "shuffle"), plain_same))
    _, plain = pr.beam_search(model, tok, cfg, trie, prompts, beam_size=N, topk=N)
    for how in evaluate.ABLATIONS:
        _, ablated = ablated_search(model, tok, cfg, trie, prompts, N, how)
        assert (ablated - plain).abs().max() > 1e-3, how
    with pytest.raises(ValueError, match=">= 2 prompts"):
        ablated_search(model, tok, cfg, trie, prompts[:1], N, "shuffle")


@pytest.fixture(scope="module")
def tiny_pause_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_args(tmp, "train.epochs=3", "eval.batch_size=64"))
    return tmp


def test_ablate_pauses_on_a_trained_run(tiny_pause_run, capsys):
    run = tiny_pause_run / "runs" / "demo"
    result = evaluate.main([str(run), "--ablate-pauses", "hide"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for split in ("valid", "test"):
        plain, hidden = result[f"{split}: as trained"], result[f"{split}: pauses hide"]
        assert any(abs(plain[k] - hidden[k]) > 0 for k in ("recall@10", "ndcg@10", "ndcg@5"))
    with pytest.raises(ValueError, match="invalid choice: 'zero'"):
        evaluate.main([str(run), "--ablate-pauses", "zero"])


def test_ablate_pauses_refuses_a_run_without_pauses(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_args(tmp_path, "train.epochs=1", "model.reasoning=none"))
    with pytest.raises(ValueError, match="needs a run with pauses or latent steps"):
        evaluate.main([str(tmp_path / "runs" / "demo"), "--ablate-pauses", "shuffle"])
