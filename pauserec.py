"""PauseRec: generative recommendation over Semantic IDs (SIDs) with pause tokens: the method.

Read top to bottom (the decoder it drives: model.py):
  1. Tokens: the vocabulary layout (specials, one token range per SID level, rationale words)
  2. Example builders and loss masks for the modes none | pause | cot | latent, collate; cot's rationales
  3. KVCache (the decoder's cache for beam search, keeping its own books) and the latent steps
  4. SIDTrie: a CSR prefix trie over the catalogue's SIDs
  5. Prefill and constrained beam search (and exhaustive teacher-forced scoring, its reference)

A training example in pause mode (pause_layout 'target'):
    [BOS] sid(h1) ... sid(hn) <pause> x M sid(target)      loss on the target's SID tokens only
No EOS is needed: every SID has exactly L tokens, and the trie ends the decoding after L levels.
With pause_embeddings 'distinct' the j-th pause of each run of M also gets its own learned row (pause_slots).
Latent mode (ReaRec) has the same layout with K slots, read one at a time: each slot's input is the state
the previous position produced (after the final norm) plus a learned step embedding (latent_steps).
Pretrained backbones (our tokens after a text vocabulary, titled prompts): backbones.py.
"""

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig

# ---------------------------------------------------------------------------------------------------------
# 1. Token layout


def words_of(text: str) -> list[str]:
    """Lowercased word tokens of a rationale: runs of letters/digits, or single punctuation marks."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class Tokens:
    """The vocabulary: 6 specials, then one contiguous token range per SID level, then rationale words.

    SID level l, code c -> token offsets[l] + c. Built from the code sizes per level; with `codes`
    [N, L] it also maps item indices to their SID tokens (`sid(item)`). With a pretrained backbone
    all our tokens come after its text vocabulary: `base` (GPT-2: 50257) is added to every id, so
    use tok.PAD, tok.BOS, .. (the class constants are the ids of base 0, the from-scratch layout).
    """

    PAD, BOS, EOS, PAUSE, THINK, END_THINK = range(6)   # PAUSE is model.PAUSE: the decoder's pause_slots go there
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<pause>", "<think>", "</think>")

    def __init__(self, level_sizes, words=(), codes=None, base: int = 0):
        self.level_sizes = [int(s) for s in level_sizes]
        if not self.level_sizes or min(self.level_sizes) <= 0:
            raise ValueError(f"Tokens: level sizes must be a non-empty list of ints > 0, got {level_sizes}")
        self.base = base          # text tokens 0..base-1 (GPT-2's BPE vocabulary), none from scratch
        self.PAD, self.BOS, self.EOS, self.PAUSE, self.THINK, self.END_THINK = range(base, base + 6)
        self.offsets, n = [], base + len(self.SPECIALS)
        for s in self.level_sizes:
            self.offsets.append(n)
            n += s
        self.word_start = n
        self.words = list(dict.fromkeys(words))  # unique, order kept
        self.word_index = {w: n + i for i, w in enumerate(self.words)}
        self.size = n + len(self.words)
        self.item_titles = None  # prompt sids+titles: per item, its title's text token ids (set by make_tokens)
        self.item_sids = None  # per item, its L token ids (a list of lists: fast in the example builders)
        if codes is not None:
            codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
            if codes.dim() != 2 or codes.shape[1] != len(self.level_sizes):
                raise ValueError(f"Tokens: codes must be [N, {self.num_levels}], got {list(codes.shape)}")
            if (codes < 0).any() or (codes >= torch.tensor(self.level_sizes)).any():
                raise ValueError(f"Tokens: codes out of range of level sizes {self.level_sizes}")
            self.item_sids = (codes + torch.tensor(self.offsets)).tolist()

    @classmethod
    def from_codes(cls, codes, words=(), base: int = 0):
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        return cls((codes.max(0).values + 1).tolist(), words, codes, base)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def sid(self, item) -> list[int]:
        """Token ids of an item's SID: `item` is an item index (needs codes) or a row of L codes."""
        if isinstance(item, (int, np.integer)):
            if self.item_sids is None:
                raise ValueError("Tokens.sid(item) needs the codes table: build Tokens with codes=")
            return self.item_sids[item]
        return [o + int(c) for o, c in zip(self.offsets, item, strict=True)]

    def word_ids(self, text: str) -> list[int]:
        """Token ids of a rationale's words; words outside the vocabulary are dropped."""
        return [self.word_index[w] for w in words_of(text) if w in self.word_index]

    def decode(self, ids) -> str:
        """Readable form of token ids, e.g. '<bos> <0:17> <1:3> <2:250> <3:0> <pause>' (for debugging)."""
        out = []
        for t in ids:
            t = int(t)
            if t < self.base:
                out.append(f"#{t}")  # a text token
            elif t < self.base + len(self.SPECIALS):
                out.append(self.SPECIALS[t - self.base])
            elif t >= self.word_start:
                out.append(self.words[t - self.word_start])
            else:
                lvl = max(i for i, o in enumerate(self.offsets) if o <= t)
                out.append(f"<{lvl}:{t - self.offsets[lvl]}>")
        return " ".join(out)


# ---------------------------------------------------------------------------------------------------------
# 2. Examples: token sequences and loss masks for the modes none | pause | cot | latent


def num_slots(cfg: ModelConfig) -> int:
    """Tokens between the history and the target's SID: M pauses (pause), K latent steps (latent), else 0.
    A latent step's slot holds the <pause> id, but its input embedding is the fed-back state (GPT.reason)."""
    return cfg.latent_steps if cfg.reasoning == "latent" else cfg.active_pauses


def _slots(tok: Tokens, cfg: ModelConfig) -> list[int]:
    """The tokens between the history and the target's SID: num_slots <pause> ids, inside <think> .. </think> with
    think_pauses (a chat template's thinking)."""
    slots = [tok.PAUSE] * num_slots(cfg)
    return [tok.THINK, *slots, tok.END_THINK] if cfg.think_pauses else slots


def _history(tok: Tokens, cfg: ModelConfig, history, supervise: bool):
    """[BOS] + history SIDs (with M pauses before each item in the every_item layout), and its loss mask.

    loss_on_history supervises every history item's SID tokens except the first item's (which has no
    history to be predicted from). Pauses are never supervised; nor are titles (prompt sids+titles,
    where each item is its title's text tokens followed by its SID).
    """
    M = cfg.active_pauses if cfg.pause_layout == "every_item" else 0
    titles = tok.item_titles
    ids, mask = [tok.BOS], [False]
    for i, item in enumerate(history):
        text = titles[item] if titles is not None else []
        ids += [tok.PAUSE] * M + text + tok.sid(item)
        mask += [False] * (M + len(text)) + [supervise and i > 0] * tok.num_levels
    return ids, mask


def _fit(tok: Tokens, cfg: ModelConfig, history, reserve: int):
    """Titled prompts: the newest history items that fit model.max_len with `reserve` tokens after them
    (the oldest go first). SID-only prompts are returned whole (and fail loudly in _check_len)."""
    if tok.item_titles is None:
        return history
    M = cfg.active_pauses if cfg.pause_layout == "every_item" else 0
    room, n = cfg.max_len - 1 - reserve, len(history)  # 1: BOS
    while n > 0 and room >= (cost := M + len(tok.item_titles[history[n - 1]]) + tok.num_levels):
        room, n = room - cost, n - 1
    return history[n:]


def _reserve(tok: Tokens, cfg: ModelConfig) -> int:
    """Tokens after the history, up to the end of the target: pauses or the longest rationale, then the SID."""
    if cfg.reasoning == "cot":
        return cfg.max_rationale_len + 2 + tok.num_levels
    return len(_slots(tok, cfg)) + tok.num_levels


def _check_len(ids, cfg: ModelConfig):
    if len(ids) > cfg.max_len:
        raise ValueError(f"example of {len(ids)} tokens exceeds model.max_len={cfg.max_len}: shorten history")
    return ids


def build_prompt(tok: Tokens, cfg: ModelConfig, history: list[int]) -> list[int]:
    """What inference prefills: [BOS] history, then M pauses (pause), K latent slots (latent) or <think> (cot)."""
    ids, _ = _history(tok, cfg, _fit(tok, cfg, history, _reserve(tok, cfg)), False)
    if cfg.reasoning == "cot":
        ids.append(tok.THINK)
    else:
        ids += _slots(tok, cfg)
    return _check_len(ids, cfg)


def build_example(tok: Tokens, cfg: ModelConfig, history: list[int], target: int,
                  rationale: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """One training example: (ids, loss_mask); loss_mask[i] True = ids[i] is supervised.

      none : [BOS] sid(h1) .. sid(hn) sid(target)
      pause: [BOS] sid(h1) .. sid(hn) <pause>*M sid(target)          (pause_layout 'target' or 'last')
             [BOS] (<pause>*M sid(h1)) .. (<pause>*M sid(hn)) <pause>*M sid(target)   ('every_item')
      cot  : [BOS] sid(h1) .. sid(hn) <think> w1 .. wk </think> sid(target)
      latent: [BOS] sid(h1) .. sid(hn) <slot>*K sid(target)       (slots: the <pause> id, read as latent steps)
    Supervised: the target's SID tokens, plus the rationale words and </think> in cot.
    With prompt sids+titles every sid(h) is preceded by h's title, and the oldest items are dropped
    until the example fits model.max_len.
    """
    ids, mask = _history(tok, cfg, _fit(tok, cfg, history, _reserve(tok, cfg)), cfg.loss_on_history)
    if cfg.reasoning == "cot":
        if rationale is None:
            raise ValueError("build_example: reasoning=cot needs a rationale (token ids)")
        words = list(rationale)[: cfg.max_rationale_len]
        ids += [tok.THINK] + words + [tok.END_THINK]
        mask += [False] + [True] * (len(words) + 1)
    else:
        slots = _slots(tok, cfg)
        ids, mask = ids + slots, mask + [False] * len(slots)
    ids += tok.sid(target)
    mask += [True] * tok.num_levels
    return _check_len(ids, cfg), mask


def build_sequence_example(tok: Tokens, cfg: ModelConfig, items: list[int]) -> tuple[list[int], list[bool]]:
    """A user's whole item sequence as one example: [BOS] (<pause>*M sid(i1)) .. (<pause>*M sid(in)).

    Every item's SID tokens but the first item's are supervised, so one pass trains all positions.
    Needs reasoning none, or pause with pause_layout every_item (or M = 0). Equal to
    build_example(items[:-1], items[-1]) with loss_on_history on.
    """
    if cfg.reasoning in ("cot", "latent") or (cfg.active_pauses > 0 and cfg.pause_layout != "every_item"):
        raise ValueError("build_sequence_example needs model.reasoning=none, or pause with "
                         "model.pause_layout=every_item")
    items = _fit(tok, cfg, items, 0)
    if len(items) < 2:
        raise ValueError(f"build_sequence_example needs >= 2 items (that fit model.max_len), got {len(items)}")
    ids, mask = _history(tok, cfg, items, True)
    return _check_len(ids, cfg), mask


def collate(examples, pad: int = Tokens.PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (ids, loss_mask) -> ids [B, T] right-padded with pad (tok.PAD), loss_mask [B, T] bool (False on pads)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def left_pad(prompts: list[list[int]], device=None, pad: int = Tokens.PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids [B, T] left-padded with pad (tok.PAD), key_mask [B, T] bool (True = real token)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = True
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------------
# 3. KV cache and latent steps


class KVCache:
    """Keys/values of the tokens read so far, per layer, in two parts, and the books of what was read.

    The first read through a cache (the prefill of B prompts) fills the shared part `prompt`
    [B, H, Tp, Dh]. Later reads append to the `own` part [B*G, H, t, Dh]: row b*G + g is beam g of
    prompt b. Beams of one user share the prompt's keys instead of copying them, so reordering beams
    copies only the few decoded tokens (4 SID tokens, not a 100-token history). The decoder calls
    read() once per forward call, attend() in every layer and count_pause_runs() for distinct pauses.
    """

    def __init__(self):
        self.prompt = []          # per layer (k, v) [B, H, Tp, Dh]
        self.prompt_bias = None   # [B, 1, 1, Tp] attention bias: 0 on real tokens, -inf on left padding
        self.own = []             # per layer (k, v) [B*G, H, t, Dh]
        self.own_mask = None      # [B*G, t] bool
        self.length = None        # [B*G] real tokens read so far = position of the next token
        self.group = 1            # G: rows per prompt
        self.pause_run = None     # [B*G] pauses at the end of what was read (distinct pause embeddings only)

    def read(self, real):
        """Book one forward call's tokens, real [N, T] bool (False: padding) -> [N] real tokens read before."""
        if self.length is None:   # the prefill
            self.length = torch.zeros(real.shape[0], dtype=torch.long, device=real.device)
            bias = torch.zeros(real.shape, device=real.device).masked_fill(~real, float("-inf"))
            self.prompt_bias, self.own_mask = bias[:, None, None, :], real[:, :0]
        else:
            self.own_mask = torch.cat([self.own_mask, real], 1)
        before, self.length = self.length, self.length + real.sum(1)
        return before

    def count_pause_runs(self, run, open_run):
        """Places in runs of pauses, run [N, T] counted within this read: a run that began in an earlier read
        (open_run [N, T] True) goes on counting from where that read ended."""
        if self.pause_run is not None:
            run = run + torch.where(open_run, self.pause_run[:, None], 0)
        self.pause_run = run[:, -1]
        return run

    def attend(self, layer: int, q, k, v, mask, dropout_p: float):
        """Attention of the new tokens' q [N, H, T, Dh] over everything read, k and v stored. The prefill is
        plain causal attention (mask [N, 1, T, T] with left padding); later reads attend_cached."""
        if len(self.prompt) <= layer:
            self.prompt.append((k, v))
            self.own.append((k[:, :, :0], v[:, :, :0]))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)
        return self.attend_cached(layer, q, k, v, dropout_p)

    def attend_cached(self, layer: int, q, k, v, dropout_p: float):
        """Softmax over [shared prompt keys ; this row's own keys], computed without copying the prompt.

        Scores are laid out per prompt, [B, H, G*T, keys]: the G beams' queries of one prompt form one
        matrix against its Tp keys, and the big prompt-sized tensors are never transposed.
        """
        ok, ov = self.own[layer]
        ok, ov = torch.cat([ok, k], 2), torch.cat([ov, v], 2)  # [N, H, t, Dh], t includes the T new tokens
        self.own[layer] = (ok, ov)
        pk, pv = self.prompt[layer]                              # [B, H, Tp, Dh]
        N, H, T, Dh = q.shape
        B, Tp, t, G = pk.shape[0], pk.shape[2], ok.shape[2], self.group

        def grouped(x):  # [N, H, T, X] -> [B, H, G*T, X]
            return x.view(B, G, H, T, -1).transpose(1, 2).reshape(B, H, G * T, x.shape[-1])

        def rows(x):     # [B, H, G*T, X] -> [N, H, T, X]
            return x.view(B, H, G, T, -1).transpose(1, 2).reshape(N, H, T, x.shape[-1])

        q = q * (1.0 / math.sqrt(Dh))
        sp = grouped(q) @ pk.transpose(-1, -2) + self.prompt_bias   # [B, H, G*T, Tp], -inf on padding
        # own part: causal within the row's decoded tokens, minus masked (padding) ones
        causal = torch.ones(T, t, dtype=torch.bool, device=q.device).tril(t - T)
        so = (q @ ok.transpose(-1, -2)).masked_fill(~(causal & self.own_mask[:, None, None, :]), float("-inf"))
        a = F.dropout(torch.softmax(torch.cat([sp, grouped(so)], -1), -1), dropout_p, dropout_p > 0)
        return rows(a[..., :Tp] @ pv) + rows(a[..., Tp:]) @ ov   # a: [B, H, G*T, Tp + t]

    def reorder(self, beam):
        """beam [B, K] long: new row (b, k) continues old row (b, beam[b, k]); G becomes K."""
        B, K = beam.shape
        rows = (torch.arange(B, device=beam.device)[:, None] * self.group + beam).reshape(-1)
        self.own = [(k[rows], v[rows]) for k, v in self.own]
        self.own_mask, self.length, self.group = self.own_mask[rows], self.length[rows], K
        if self.pause_run is not None:
            self.pause_run = self.pause_run[rows]


def latent_steps(model: GPT, h, cache: KVCache, hide: bool = False):
    """Latent steps (ReaRec): h [N, d], the final-norm state of the last position read into cache -> the states
    after each of the K steps [N, K, d]; step k reads (previous state + model.reasoning_pos[k]) as its input
    embedding. hide (evaluate.py's ablation): each step's key is masked for every later read."""
    states = []
    for k in range(model.cfg.latent_steps):
        h = model.hidden(embeds=(h + model.reasoning_pos[k])[:, None], cache=cache)[:, 0]
        states.append(h)
        if hide:
            cache.own_mask[:, -1] = False
    return torch.stack(states, 1)


def latent_loss(model: GPT, ids, loss_mask):
    """Latent mode: cross-entropy on the target's L SID tokens, the first predicted from the last latent
    step's state (with step_loss progressive the earlier steps' states predict it too: ReaRec's PRL).

    ids [N, T] right-padded examples [BOS] history <slot>*K sid(target) (loss_mask True on sid(target)).
    The histories are read in one pass into a KV cache (the K slots and the target masked as keys), then
    the K latent steps and the target's first L-1 tokens one read each: K + 2 calls, gradients through all.
    """
    N, K = ids.shape[0], model.cfg.latent_steps
    L = int(loss_mask[0].sum())
    start = loss_mask.float().argmax(1)               # [N] the target's first SID token
    hlen = start - K                                  # [N] BOS + history tokens
    Th = int(hlen.max())
    cache = KVCache()
    history = torch.arange(Th, device=ids.device) < hlen[:, None]
    h = model.hidden(ids[:, :Th], key_mask=history, cache=cache)[torch.arange(N, device=ids.device), hlen - 1]
    states = latent_steps(model, h, cache)                                       # [N, K, d]
    target = ids.gather(1, start[:, None] + torch.arange(L, device=ids.device))  # [N, L]
    logits = [model.logits(states[:, -1])[:, None]]
    if L > 1:
        logits.append(model(target[:, :-1], cache=cache))                        # [N, L-1, V']
    loss = F.cross_entropy(torch.cat(logits, 1).flatten(0, 1).float(), target.flatten() - model.head_start)
    if model.cfg.step_loss == "progressive" and K > 1:   # steps 1..K-1 predict the first SID token too
        temp = model.cfg.step_temp ** torch.arange(K - 1, 0, -1, device=ids.device)  # [K-1]: softest first
        step_logits = model.logits(states[:, :-1]).float() / temp[:, None]           # [N, K-1, V']
        first = (target[:, :1] - model.head_start).expand(N, K - 1)
        loss = loss + model.cfg.step_loss_weight * F.cross_entropy(step_logits.flatten(0, 1), first.flatten())
    return loss


def training_loss(model: GPT, ids, loss_mask):
    """The loss of a batch of examples (collate) in any mode: model.loss, or latent_loss in latent mode."""
    return latent_loss(model, ids, loss_mask) if model.cfg.reasoning == "latent" else model.loss(ids, loss_mask)


# ---------------------------------------------------------------------------------------------------------
# 4. Prefix trie over the catalogue's SIDs (CSR per level)


class SIDTrie:
    """Exact prefix trie of codes [N, L], stored level by level as CSR arrays.

    Prefixes of depth d are numbered 0..P_d-1 in lexicographic order (depth 0: the root, P_0 = 1).
    The children of prefix p at depth d are entries child_start[d][p] : child_start[d][p+1] of
    child_code[d] (their codes at level d); an entry's index IS the child's prefix id at depth d+1.
    At depth L, prefix id i is item leaf_item[i]. SIDs must be unique (one leaf per item).
    Three items, codes [[1, 0], [0, 2], [0, 1]] (item 0: SID 1-0, ...), sorted: 0-1, 0-2, 1-0:
        depth 0 (root):        child_start [0, 2]      child_code [0, 1]      -> prefixes 0-, 1- (ids 0, 1)
        depth 1 (0-, 1-):      child_start [0, 2, 3]   child_code [1, 2, 0]   -> 0-1, 0-2, 1-0 (ids 0, 1, 2)
        depth 2 (leaves):      leaf_item [2, 1, 0]     (0-1 is item 2, 0-2 item 1, 1-0 item 0)
    Beam search reads the children of all its beams' prefixes at once: start = child_start[d][prefix].
    """

    def __init__(self, codes):
        codes = np.asarray(torch.as_tensor(np.asarray(codes)).cpu(), dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"SIDTrie: codes must be a non-empty [N, L] table, got shape {codes.shape}")
        N, L = codes.shape
        order = np.lexsort(codes.T[::-1])             # items sorted by their code tuple
        s = codes[order]
        # first[i, d] True where sorted row i starts a new prefix of depth d+1
        first = np.ones((N, L), dtype=bool)
        first[1:] = np.logical_or.accumulate(s[1:] != s[:-1], axis=1)
        if not first[:, -1].all():
            dup = order[np.flatnonzero(~first[:, -1])[0]]
            raise ValueError(f"SIDTrie: duplicate SIDs (item {dup} shares its SID): add a collision level")
        pid = np.zeros((N, L + 1), dtype=np.int64)    # prefix id of each sorted row at depth 0..L
        pid[:, 1:] = np.cumsum(first, axis=0) - 1
        self.num_levels = L
        self.child_start, self.child_code, self.max_children = [], [], []
        for d in range(L):
            rows = np.flatnonzero(first[:, d])         # one row per prefix of depth d+1
            parent = pid[rows, d]
            counts = np.bincount(parent, minlength=pid[-1, d] + 1)
            self.child_start.append(torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])))
            self.child_code.append(torch.from_numpy(s[rows, d].copy()))
            self.max_children.append(int(counts.max()))
        self.leaf_item = torch.from_numpy(order)      # depth-L prefix id -> item index

    def children(self, depth: int, prefix: int) -> tuple[list[int], list[int]]:
        """(codes, child prefix ids) of one prefix: for readers and tests."""
        a, b = int(self.child_start[depth][prefix]), int(self.child_start[depth][prefix + 1])
        return self.child_code[depth][a:b].tolist(), list(range(a, b))

    def lookup(self, sid_codes) -> int:
        """Item index of a code tuple, or -1 if no item has it."""
        p = 0
        for d, c in enumerate(sid_codes):
            codes, ids = self.children(d, p)
            if int(c) not in codes:
                return -1
            p = ids[codes.index(int(c))]
        return int(self.leaf_item[p])

    def to(self, device):
        self.child_start = [t.to(device) for t in self.child_start]
        self.child_code = [t.to(device) for t in self.child_code]
        self.leaf_item = self.leaf_item.to(device)
        return self


# ---------------------------------------------------------------------------------------------------------
# 5. Prefill and constrained beam search


def _decode_rationale(model: GPT, tok: Tokens, cfg: ModelConfig, cache: KVCache, logits):
    """cot: greedy rationale after <think>, batched; </think> forced after max_rationale_len words.

    logits [B, V'] at <think> (index j: token model.head_start + j). Rows that have finished feed masked
    padding (not attended, no position used), so every row ends as if decoded alone. Returns the logits
    [B, V'] right after each row's </think>, and the rationales (list of token lists).
    """
    B, V = logits.shape
    hs = model.head_start
    allowed = torch.zeros(V, dtype=torch.bool, device=logits.device)
    allowed[tok.word_start - hs:] = True
    allowed[tok.END_THINK - hs] = True
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    sid_logits = torch.empty_like(logits)
    steps = []
    for step in range(cfg.max_rationale_len + 1):
        nxt = logits.masked_fill(~allowed, float("-inf")).argmax(-1) + hs
        if step == cfg.max_rationale_len:
            nxt.fill_(tok.END_THINK)
        nxt = torch.where(done, tok.PAD, nxt)
        steps.append(nxt)
        logits = model(nxt[:, None], key_mask=~done[:, None], cache=cache, last=True)
        ended = (nxt == tok.END_THINK) & ~done
        sid_logits[ended] = logits[ended]
        done |= ended
        if bool(done.all()):
            break
    seq = torch.stack(steps, 1).tolist()
    rationales = [[t for t in row if t not in (tok.PAD, tok.END_THINK)] for row in seq]
    return sid_logits, rationales


def latent_prefill(model: GPT, cfg: ModelConfig, prompts: list[list[int]], cache: KVCache, pad: int):
    """latent: logits [B, V'] after the K latent steps, cache filled. Each prompt's last K tokens are its latent
    slots: the rest ([BOS] history, left-padded) is read in one pass, then the K steps one read each."""
    K = cfg.latent_steps
    if min(len(p) for p in prompts) <= K:
        raise ValueError(f"latent_prefill: prompts must hold [BOS] history and {K} latent slots (build_prompt)")
    ids, key_mask = left_pad([p[:-K] for p in prompts], model.device, pad)
    h = model.hidden(ids, key_mask=key_mask, cache=cache)[:, -1]
    return model.logits(latent_steps(model, h, cache)[:, -1])


def prefill(model: GPT, tok: Tokens, cfg: ModelConfig, prompts: list[list[int]], cache: KVCache):
    """Read the prompts (build_prompt) into an empty cache, left-padded, in one parallel pass -> (logits [B, V']
    where each SID starts, cot's rationales or None): latent runs the K steps after it, cot decodes each
    row's rationale greedily."""
    if cfg.reasoning == "latent":
        return latent_prefill(model, cfg, prompts, cache, tok.PAD), None
    ids, key_mask = left_pad(prompts, model.device, tok.PAD)
    logits = model(ids, key_mask=key_mask, cache=cache, last=True)
    if cfg.reasoning == "cot":
        return _decode_rationale(model, tok, cfg, cache, logits)
    return logits, None


@torch.inference_mode()
def beam_search(model: GPT, tok: Tokens, cfg: ModelConfig, trie: SIDTrie, prompts: list[list[int]],
                beam_size: int, topk: int, return_rationales: bool = False, device=None, prefill=prefill):
    """Top-k catalogue items per prompt by trie-constrained beam search over the L SID tokens.

    -> items LongTensor [B, topk] (item indices, -1 where fewer than topk beams exist),
       scores FloatTensor [B, topk] (summed SID log-probs, descending; -inf for the -1 items).
    Log-probs are normalised over the head's whole vocabulary (all tokens, or ours with model.head=new) and
    the trie only restricts which tokens are selected, so a beam's score is exactly the teacher-forced
    log-prob of its SID (see score_items).
    In cot mode the rationale is decoded greedily first; scores are conditioned on it (its tokens are
    returned third with return_rationales=True). In latent mode the prompts' last K tokens are the latent
    steps (latent_prefill). Runs on the model's device (`device` only checks it). prefill reads the prompts
    (evaluate.py's --ablate-pauses passes one that knocks the pauses out).
    """
    if beam_size < 1 or topk < 1:
        raise ValueError(f"beam_search: beam_size and topk must be >= 1, got {beam_size}, {topk}")
    was_training = model.training
    model.eval()
    dev = model.device
    if device is not None and torch.device(device).type != dev.type:
        raise ValueError(f"beam_search: model is on {dev}, not on the requested device {device}")
    if trie.leaf_item.device != dev:
        trie.to(dev)
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("beam_search: prompts must be non-empty token lists (start with BOS)")
    B, L = len(prompts), trie.num_levels
    cache = KVCache()
    logits, rationales = prefill(model, tok, cfg, prompts, cache)          # [B, V'] before the first SID token
    score = torch.zeros(B, 1, device=dev)                 # every user starts with one beam: the root
    prefix = torch.zeros(B, 1, dtype=torch.long, device=dev)
    alive = torch.ones(B, 1, dtype=torch.bool, device=dev)
    for d in range(L):
        G = prefix.shape[1]
        logp = torch.log_softmax(logits.float(), -1).view(B, G, -1)             # [B, G, V'], V' = V - head_start
        start, end = trie.child_start[d][prefix], trie.child_start[d][prefix + 1]  # [B, G]
        j = torch.arange(trie.max_children[d], device=dev)                     # [C]
        entry = start[..., None] + j                                           # [B, G, C] CSR entries
        valid = (j < (end - start)[..., None]) & alive[..., None]
        entry = entry.clamp(max=len(trie.child_code[d]) - 1)                   # keep padding entries in range
        token = tok.offsets[d] + trie.child_code[d][entry]                     # [B, G, C]
        cand = (score[..., None] + logp.gather(2, token - model.head_start)).masked_fill(~valid, float("-inf"))
        C = cand.shape[2]
        score, flat = cand.view(B, G * C).topk(min(beam_size, G * C), dim=1)   # [B, K], sorted
        alive = score > float("-inf")
        prefix = entry.view(B, -1).gather(1, flat)        # the chosen entry is the child's prefix id
        if d + 1 < L:
            cache.reorder(flat // C)                      # the beam each new beam continues
            chosen = token.view(B, -1).gather(1, flat)    # [B, K]
            logits = model(chosen.view(-1, 1), cache=cache, last=True)
    items = trie.leaf_item[prefix].masked_fill(~alive, -1)
    K = items.shape[1]
    if K < topk:  # tiny catalogue: pad
        items = F.pad(items, (0, topk - K), value=-1)
        score = F.pad(score, (0, topk - K), value=float("-inf"))
    model.train(was_training)
    out = (items[:, :topk], score[:, :topk])
    return out + (rationales,) if return_rationales else out


@torch.inference_mode()
def score_items(model: GPT, tok: Tokens, cfg: ModelConfig, prompt: list[int], item_ids, chunk: int = 512):
    """Exhaustive teacher-forced scoring: log P(sid(item) | prompt) for each item -> FloatTensor [n].

    The reference the beam search must match (in cot, pass a prompt ending with the rationale and </think>).
    In latent mode the K latent steps are recomputed without a cache: K full passes over the prompt, each
    filling in one more step's input (the state before it + reasoning_pos[k]), then one over prompt + SID.
    """
    was_training = model.training
    model.eval()
    Tp, out = len(prompt), []
    prompt_ids = torch.tensor([prompt], device=model.device)
    emb = model.embed(prompt_ids)                                              # [1, Tp, d]
    if cfg.reasoning == "latent":
        for k in range(cfg.latent_steps):
            at = Tp - cfg.latent_steps + k                                     # step k's slot
            emb = emb.clone()
            emb[:, at] = model.hidden(embeds=emb)[:, at - 1] + model.reasoning_pos[k]
    for i in range(0, len(item_ids), chunk):
        sids = torch.tensor([tok.sid(int(x)) for x in item_ids[i: i + chunk]], device=model.device)
        if cfg.reasoning == "latent":
            embeds = torch.cat([emb.expand(len(sids), -1, -1), model.embed(sids[:, :-1])], 1)
            logits = model.logits(model.hidden(embeds=embeds)[:, Tp - 1:])     # [n, L, V']
        else:
            seq = torch.cat([prompt_ids.expand(len(sids), Tp), sids], 1)
            logits = model(seq[:, :-1])[:, Tp - 1:]                            # [n, L, V']
        logp = torch.log_softmax(logits.float(), -1)
        out.append(logp.gather(2, sids[..., None] - model.head_start).sum((1, 2)))
    model.train(was_training)
    return torch.cat(out)

