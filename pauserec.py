"""PauseRec: generative recommendation over Semantic IDs (SIDs) with pause tokens.

One file, read top to bottom:
  1. ModelConfig and the decoder: GPT-2's parameter names, litgpt-style flags that make its blocks GPT-2's
     (LayerNorm, GELU, learned positions) or the Llama family's (RMSNorm, SwiGLU, RoPE, grouped-query
     attention; Qwen2's q/k/v biases, Qwen3's q/k norms); a KV cache for beam search; an output head over
     all tokens or over ours only
  2. Tokens: the vocabulary layout (specials, one token range per SID level, rationale words)
  3. Example builders for the modes none | pause | cot | latent, loss masks, collate
  4. SIDTrie: a CSR prefix trie over the catalogue's SIDs
  5. Constrained beam search (and exhaustive teacher-forced scoring, its reference)
  6. Backbones: a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder as the decoder, our tokens' rows appended
     (reading and renaming the weights, the tokenizer: backbones.py)

A training example in pause mode (pause_layout 'target'):
    [BOS] sid(h1) ... sid(hn) <pause> x M sid(target)      loss on the target's SID tokens only
No EOS is needed: every SID has exactly L tokens, and the trie ends the decoding after L levels.
With pause_embeddings 'distinct' the j-th pause of each run of M also gets its own learned row (pause_slots).
Latent mode (ReaRec) has the same layout with K slots, read one at a time: each slot's input is the state
the previous position produced (after the final LayerNorm) plus a learned step embedding (GPT.reason).
"""

import dataclasses
import json
import math
import random
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones

# ---------------------------------------------------------------------------------------------------------
# 1. Model


BACKBONES = ("hf", "gpt2", "llama", "qwen2", "qwen3")   # pretrained: any of config.json's, or one family


@dataclass
class ModelConfig:
    n_layer: int = 4               # transformer blocks
    n_head: int = 4                # attention (query) heads
    d_model: int = 128             # width
    dropout: float = 0.1           # dropout on embeddings, attention weights and residual branches
    max_len: int = 256             # longest sequence the model reads (learned positions: wpe rows)
    # the block (defaults: GPT-2's; a pretrained backbone takes them from its config.json, litgpt-style)
    n_kv_head: int = 0             # key/value heads, 0 = n_head; fewer = grouped-query attention (Llama 3, Qwen)
    head_dim: int = 0              # width of a head, 0 = d_model / n_head (Qwen3-0.6B: 128, d_model 1024, 16 heads)
    d_ff: int = 0                  # MLP hidden width, 0 = 4 * d_model
    norm: str = "layernorm"        # layernorm (GPT-2) | rmsnorm (Llama family)
    norm_eps: float = 1e-5         # epsilon of every norm
    mlp: str = "gelu"              # gelu: GPT-2's tanh GELU | swiglu: silu(gate) * up (Llama family)
    pos: str = "learned"           # learned: wpe rows added to the input | rope: q and k rotated (no wpe)
    rope_theta: float = 10000.0    # rope: base of the rotary frequencies
    bias: bool = True              # biases on every Linear and LayerNorm (GPT-2)
    qkv_bias: bool = False         # biases on q, k, v only (Qwen2)
    qk_norm: bool = False          # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    tie_head: bool = True          # output head = input embedding rows
    head: str = "full"             # full: softmax over all tokens | new: over ours only (ids >= tok.base)
    # the method
    reasoning: str = "none"        # none | pause | cot | latent (none won on Beauty validation: see README)
    num_pauses: int = 2            # M: <pause> tokens before each predicted item (pause mode)
    pause_embeddings: str = "shared"  # shared: one <pause> row | distinct: + a learned row per slot j of the M (pause)
    latent_steps: int = 2          # K: latent mode's reasoning steps, each fed the last state (needs layout target)
    step_loss: str = "none"        # none | draft (pause): each pause but the last (which predicts the SID) is also
                                   #   trained to predict the next item's first SID token | progressive (latent,
                                   #   ReaRec's PRL): each latent step but the last predicts it, logits divided by
                                   #   step_temp ** (steps to the last), sharper step by step
    step_loss_weight: float = 1.0  # step_loss: its mean cross-entropy's weight beside the SID tokens' loss
    step_temp: float = 2.0         # step_loss progressive: temperature base (1: no annealing)
    pause_layout: str = "every_item"  # every_item: all of a sequence's items trained in one pass, M pauses
                                   #   before each | target: one example per target, M pauses before it only
    loss_on_history: bool = False  # also supervise the history items' SID tokens (all but the first item)
    rationale_file: str = ""       # cot: JSONL {"key": "<user>:<target>", "rationale": ..} replaces templates
    rationale_noise: float = 0.0   # cot: probability that a rationale is replaced by another item's template
    max_rationale_len: int = 16    # cot: rationale words kept (training) and decoded at most (inference)
    # pretrained backbones
    backbone: str = "scratch"      # scratch | hf (family from config.json) | gpt2 | llama | qwen2 | qwen3: pretrained
                                   #   (the sizes and block flags above come from its config.json)
    hf_dir: str = ""               # pretrained: Hugging Face folder: config.json, model.safetensors (or shards and
                                   #   model.safetensors.index.json, or pytorch_model.bin), tokenizer files
    hf_url: str = ""               # pretrained: base URL (a hub repository's .../resolve/main) of the files
                                   #   hf_dir lacks: config.json, weights (shards too), the tokenizer if titled
    keep_layers: int = 0           # pretrained: load only the first K blocks (0 = all; a cheap CPU setting)
    prompt: str = "sids"           # sids | sids+titles: each history item as its title (text tokens), then its SID
    max_title_len: int = 24        # sids+titles: text tokens kept per title
    train_only_new_tokens: bool = False  # pretrained: freeze its weights, train only our token rows (new_rows)

    def __post_init__(self):
        for key in ("n_layer", "n_head", "d_model", "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        for key in ("n_kv_head", "head_dim", "d_ff", "keep_layers", "num_pauses", "max_rationale_len",
                    "latent_steps", "max_title_len"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if not self.head_dim and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must divide by model.n_head ({self.n_head}), "
                             f"or set model.head_dim")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must divide by model.n_kv_head ({self.n_kv_head})")
        for key, ok in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")), ("pos", ("learned", "rope")),
                        ("head", ("full", "new")), ("reasoning", ("none", "pause", "cot", "latent")),
                        ("pause_layout", ("target", "every_item")), ("pause_embeddings", ("shared", "distinct")),
                        ("backbone", ("scratch",) + BACKBONES), ("prompt", ("sids", "sids+titles"))):
            if getattr(self, key) not in ok:
                raise ValueError(f"model.{key} must be {' | '.join(ok)}, got {getattr(self, key)!r}")
        for key in ("norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.pos == "rope" and self.head_width % 2:
            raise ValueError(f"model.pos=rope needs an even head width (model.head_dim), got {self.head_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.reasoning == "latent":
            if self.pause_layout != "target":
                raise ValueError(f"model.reasoning=latent needs model.pause_layout=target (one example per target, "
                                 f"the K latent steps before it), got {self.pause_layout!r}")
            if self.latent_steps < 1:
                raise ValueError(f"model.latent_steps must be >= 1 with reasoning=latent, got {self.latent_steps}")
            if self.loss_on_history:
                raise ValueError("model.loss_on_history is not supported with model.reasoning=latent")
        if self.step_loss not in ("none", "draft", "progressive"):
            raise ValueError(f"model.step_loss must be none | draft | progressive, got {self.step_loss!r}")
        needs = {"draft": "pause", "progressive": "latent"}.get(self.step_loss, self.reasoning)
        if self.reasoning != needs:
            raise ValueError(f"model.step_loss={self.step_loss} needs model.reasoning={needs}, got {self.reasoning}")
        if self.step_loss_weight < 0 or self.step_temp <= 0:
            raise ValueError(f"model.step_loss_weight must be >= 0 and model.step_temp > 0, got "
                             f"{self.step_loss_weight}, {self.step_temp}")
        if not 0.0 <= self.rationale_noise <= 1.0:
            raise ValueError(f"model.rationale_noise must be in [0, 1], got {self.rationale_noise}")
        if self.backbone != "scratch" and not self.hf_dir:
            raise ValueError(f"model.backbone={self.backbone} needs model.hf_dir (a Hugging Face model folder)")
        if self.backbone == "scratch" and (self.prompt != "sids" or self.train_only_new_tokens or self.keep_layers):
            raise ValueError("model.prompt=sids+titles, model.train_only_new_tokens and model.keep_layers need a "
                             "pretrained model.backbone")

    # the 0 defaults resolved (kept 0 in the config, so that a backbone's d_model and n_head resolve them)
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_width(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model


class KVCache:
    """Keys/values of the tokens read so far, per layer, in two parts.

    The first forward pass through a cache (the prefill of B prompts) fills the shared part
    `prefix` [B, H, Tp, Dh]. Later passes append to the `own` part [B*G, H, t, Dh]: row b*G + g is
    beam g of prompt b. Beams of one user share the prompt's keys instead of copying them, so
    reordering beams copies only the few decoded tokens (4 SID tokens, not a 100-token history).
    """

    def __init__(self):
        self.prefix = []          # per layer (k, v) [B, H, Tp, Dh]
        self.prefix_bias = None   # [B, 1, 1, Tp] attention bias: 0 on real tokens, -inf on left padding
        self.own = []             # per layer (k, v) [B*G, H, t, Dh]
        self.own_mask = None      # [B*G, t] bool
        self.length = None        # [B*G] real tokens read so far = position of the next token
        self.group = 1            # G: rows per prompt
        self.pause_run = None     # [B*G] pauses at the end of what was read (distinct pause embeddings only)

    def reorder(self, beam):
        """beam [B, K] long: new row (b, k) continues old row (b, beam[b, k]); G becomes K."""
        B, K = beam.shape
        rows = (torch.arange(B, device=beam.device)[:, None] * self.group + beam).reshape(-1)
        self.own = [(k[rows], v[rows]) for k, v in self.own]
        self.own_mask, self.length, self.group = self.own_mask[rows], self.length[rows], K
        if self.pause_run is not None:
            self.pause_run = self.pause_run[rows]


def rope_frequencies(head_width: int, theta: float) -> torch.Tensor:
    """RoPE's default frequencies [head_width / 2]: theta^(-2i / head_width) (a backbone may scale them)."""
    return 1.0 / theta ** (torch.arange(0, head_width, 2, dtype=torch.float64) / head_width).float()


def rope_cos_sin(inv_freq, positions):
    """cos and sin [N, 1, T, Dh] (float32) of each token's angles positions [N, T] * inv_freq, in Hugging Face's
    rotate-half layout: frequency i turns the pair of dims (i, i + Dh/2)."""
    angle = positions[..., None].float() * inv_freq.float()       # [N, T, Dh/2]
    angle = torch.cat([angle, angle], -1)[:, None]                 # [N, 1, T, Dh]
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """x [N, H, T, Dh] rotated by its tokens' angles: (x_i, x_j) -> (x_i cos - x_j sin, x_j cos + x_i sin),
    j = i + Dh/2."""
    x1, x2 = x.chunk(2, -1)
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def make_norm(cfg: ModelConfig, width: int = 0) -> nn.Module:
    width = width or cfg.d_model
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=cfg.norm_eps)
    return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.kv_heads, cfg.head_width, cfg.dropout
        q, kv = cfg.n_head * cfg.head_width, cfg.kv_heads * cfg.head_width
        self.c_attn = nn.Linear(cfg.d_model, q + 2 * kv, bias=cfg.bias or cfg.qkv_bias)  # fused [q; k; v]
        self.c_proj = nn.Linear(q, cfg.d_model, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_width) if cfg.qk_norm else None  # Qwen3: over each head's width
        self.k_norm = make_norm(cfg, cfg.head_width) if cfg.qk_norm else None
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache: KVCache | None, layer: int, rope=None):
        """x [N, T, d] -> [N, T, d]. rope: (cos, sin) [N, 1, T, Dh] of the tokens' positions (pos=rope), or None."""
        N, T, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=2)
        q, k, v = (t.view(N, T, -1, Dh).transpose(1, 2) for t in (q, k, v))   # [N, H (q) or Hkv (k, v), T, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:   # rotated before the cache stores k: cached keys carry their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if Hkv < H:   # grouped-query attention: each k/v head serves H / Hkv query heads. Repeated here, so the
            # cache and attend_cached stay plain multi-head, at H / Hkv times the cache memory strictly needed
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        if cache is None or len(cache.prefix) <= layer:
            # no past: causal attention (mask None = the is_causal fast path used in training)
            if cache is not None:
                cache.prefix.append((k, v))
                cache.own.append((k[:, :, :0], v[:, :, :0]))
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        else:
            y = self.attend_cached(q, k, v, cache, layer)
        y = y.transpose(1, 2).reshape(N, T, H * Dh)
        return self.resid_dropout(self.c_proj(y))

    def attend_cached(self, q, k, v, cache: KVCache, layer: int):
        """Softmax over [shared prompt keys ; this row's own keys], computed without copying the prompt.

        Scores are laid out per prompt, [B, H, G*T, keys]: the G beams' queries of one prompt form one
        matrix against its Tp keys, and the big prompt-sized tensors are never transposed.
        """
        ok, ov = cache.own[layer]
        ok, ov = torch.cat([ok, k], 2), torch.cat([ov, v], 2)  # [N, H, t, Dh], t includes the T new tokens
        cache.own[layer] = (ok, ov)
        pk, pv = cache.prefix[layer]                             # [B, H, Tp, Dh]
        N, H, T, Dh = q.shape
        B, Tp, t, G = pk.shape[0], pk.shape[2], ok.shape[2], cache.group

        def grouped(x):  # [N, H, T, X] -> [B, H, G*T, X]
            return x.view(B, G, H, T, -1).transpose(1, 2).reshape(B, H, G * T, x.shape[-1])

        def rows(x):     # [B, H, G*T, X] -> [N, H, T, X]
            return x.view(B, H, G, T, -1).transpose(1, 2).reshape(N, H, T, x.shape[-1])

        q = q * (1.0 / math.sqrt(Dh))
        sp = grouped(q) @ pk.transpose(-1, -2) + cache.prefix_bias  # [B, H, G*T, Tp], -inf on padding
        # own part: causal within the row's decoded tokens, minus masked (padding) ones
        causal = torch.ones(T, t, dtype=torch.bool, device=q.device).tril(t - T)
        so = (q @ ok.transpose(-1, -2)).masked_fill(~(causal & cache.own_mask[:, None, None, :]), float("-inf"))
        a = self.attn_dropout(torch.softmax(torch.cat([sp, grouped(so)], -1), -1))  # [B, H, G*T, Tp + t]
        return rows(a[..., :Tp] @ pv) + rows(a[..., Tp:]) @ ov


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = cfg.ff_width
        self.c_fc = nn.Linear(cfg.d_model, 2 * width if self.swiglu else width, bias=cfg.bias)  # swiglu: [gate; up]
        self.c_proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, -1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, cache, layer, rope=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


def draft_targets(ids, loss_mask, pause_id: int):
    """step_loss draft: ids [N, T], loss_mask [N, T] -> (where [N, T-1] bool, target [N, T-1] long).

    Position i (input of the logits that predict ids[i+1]) is a draft position when it and the next token are
    both pauses, i.e. every pause of a run but the last, and the item after the run is supervised; its target
    is that item's first SID token. The last pause of a run already predicts that token (the SID loss).
    """
    N, T = ids.shape
    t = torch.arange(T, device=ids.device).expand(N, T)
    is_p = ids == pause_id
    # first non-pause at or after each position (T: none)
    after = torch.where(is_p, T, t).flip(1).cummin(1).values.flip(1)
    first = after[:, 1:].clamp(max=T - 1)                      # [N, T-1] for position i: the item after i's run
    where = is_p[:, :-1] & is_p[:, 1:] & (after[:, 1:] < T) & loss_mask.gather(1, first)
    return where, ids.gather(1, first)


class GPT(nn.Module):
    """Decoder-only transformer with GPT-2's parameter names; the ModelConfig flags make its blocks Llama's,
    Qwen2's or Qwen3's, so the weights of all four families load into it (backbones.py maps the names).

    With train_only_new_tokens, wte (and an untied lm_head) hold only the pretrained rows [base, d], frozen,
    and our tokens' rows live apart in new_rows (new_head_rows) [V - base, d]: the optimizer sees only those.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, base: int = 0):
        super().__init__()
        self.cfg = cfg
        self.pause_id = base + Tokens.PAUSE   # base: the text vocabulary before our tokens (GPT-2: 50257)
        self.head_start = base if cfg.head == "new" else 0   # logit j is token head_start + j
        rows = base if cfg.train_only_new_tokens else vocab_size
        modules = dict(wte=nn.Embedding(rows, cfg.d_model))
        if cfg.pos == "learned":
            modules["wpe"] = nn.Embedding(cfg.max_len, cfg.d_model)
        modules.update(drop=nn.Dropout(cfg.dropout), h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                       ln_f=make_norm(cfg))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.d_model, rows, bias=False)
        if cfg.tie_head:  # tied input/output embeddings (so the <pause> row is also the output row of a token
            #   never predicted: every supervised softmax pushes it down as well)
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # distinct pause embeddings: row j is added to the shared <pause> row at slot j of every run of pauses;
        # zeros at first, so the model starts as the shared one
        distinct = cfg.pause_embeddings == "distinct" and num_pauses(cfg) > 0
        self.pause_slots = nn.Parameter(torch.zeros(cfg.num_pauses, cfg.d_model)) if distinct else None
        # latent reasoning (ReaRec): step k's input is the previous state + reasoning_pos[k] (+ its position's wpe)
        if cfg.reasoning == "latent":
            self.reasoning_pos = nn.Parameter(torch.randn(cfg.latent_steps, cfg.d_model) * 0.02)
        if cfg.pos == "rope":   # persistent: a checkpoint carries a backbone's (scaled) frequencies. float32:
            #   use autocast for bf16, model.to(torch.bfloat16) would round them (angles off at long positions)
            self.register_buffer("inv_freq", rope_frequencies(cfg.head_width, cfg.rope_theta))
        self.new_rows = self.new_head_rows = None   # train_only_new_tokens: set by make_model (the mean row)
        if cfg.train_only_new_tokens:
            self.new_rows = nn.Parameter(torch.zeros(vocab_size - base, cfg.d_model))
            if not cfg.tie_head:
                self.new_head_rows = nn.Parameter(torch.zeros(vocab_size - base, cfg.d_model))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def device(self):
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def embed(self, ids):
        """Input rows [N, T, d] of ids [N, T]; with train_only_new_tokens ids >= base read new_rows."""
        wte = self.transformer.wte
        if self.new_rows is None:
            return wte(ids)
        base = wte.num_embeddings
        ours = F.embedding((ids - base).clamp(min=0), self.new_rows)
        return torch.where((ids >= base)[..., None], ours, wte(ids.clamp(max=base - 1)))

    def head_rows(self):
        """Output rows [V - head_start, d]: all tokens' (head full) or ours only (head new, ids >= base)."""
        w = self.lm_head.weight                      # [V, d], or [base, d] with train_only_new_tokens
        if self.new_rows is None:
            return w[self.head_start:]
        ours = self.new_rows if self.new_head_rows is None else self.new_head_rows
        return ours if self.head_start else torch.cat([w, ours])   # head full: a copy per call, as big as the head

    def logits(self, x):
        """x [.., d] -> logits [.., V - head_start]."""
        return F.linear(x, self.head_rows())

    def forward(self, ids, key_mask=None, positions=None, cache: KVCache | None = None, select=None):
        """ids [N, T] -> logits (over the head's tokens: index j is token head_start + j).

        key_mask [N, T] bool, True = real token: None means all real (right-padded training batches need
          none: causal attention never lets a real token see the pads after it). With left-padded
          prompts, pads are masked as keys and positions count from 0 at the first real token, so a
          row's results do not depend on how much padding it got.
        positions [N, T]: default = real tokens before this one (plus those already in the cache).
        cache: a KVCache, filled in place (the first call fills its shared prompt part).
        select: None -> logits [N, T, V]; 'last' -> [N, V] at the last position; a bool tensor [N, T]
          -> [n_true, V] only where True (skips the vocabulary matmul at unsupervised positions).
        """
        x = self.hidden(ids, key_mask, positions, cache)
        if isinstance(select, str) and select == "last":
            x = x[:, -1]
        elif select is not None:
            x = x[select]  # [n_true, d]
        return self.logits(x)

    def hidden(self, ids=None, key_mask=None, positions=None, cache: KVCache | None = None, embeds=None):
        """The final-norm states [N, T, d] of ids [N, T], or of input embeddings `embeds` [N, T, d] given in
        place of token rows (latent steps; positions are added or rotated in as for tokens). Arguments as in
        forward."""
        x = self.embed(ids) if embeds is None else embeds
        N, T = x.shape[:2]
        dev = x.device
        past = cache is not None and len(cache.prefix) > 0
        real = key_mask if key_mask is not None else torch.ones(N, T, dtype=torch.bool, device=dev)
        if positions is None:
            positions = (real.long().cumsum(1) - 1).clamp(min=0)
            if past:
                positions = positions + cache.length[:, None]
        if int(positions.max()) >= self.cfg.max_len:
            raise ValueError(f"sequence longer than model.max_len={self.cfg.max_len} positions")
        mask = None  # None = plain causal attention
        if not past and key_mask is not None and not bool(key_mask.all()):
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            # every query also sees itself, so padding queries get a (discarded) finite output, not NaN
            mask = (causal & key_mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
        if self.pause_slots is not None and ids is not None:
            x = x + self.pause_slot_rows(ids, cache if past else None, cache)
        if cache is not None:
            if past:
                cache.own_mask = torch.cat([cache.own_mask, real], 1)
                cache.length = cache.length + real.sum(1)
            else:
                cache.length = real.sum(1)
                cache.prefix_bias = torch.zeros(real.shape, device=dev).masked_fill(~real, float("-inf"))
                cache.prefix_bias = cache.prefix_bias[:, None, None, :]
                cache.own_mask = real[:, :0]
        rope = None
        if self.cfg.pos == "rope":
            rope = rope_cos_sin(self.inv_freq, positions)
        else:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer, rope)
        return self.transformer.ln_f(x)

    def pause_slot_rows(self, ids, past: KVCache | None, cache: KVCache | None):
        """Distinct pause embeddings: [N, T, d] holding pause_slots[j] at the j-th pause (counted from 0, mod M)
        of each run of consecutive <pause> ids, zeros elsewhere. A run read in an earlier call through the
        cache goes on counting (past.pause_run); left padding ends runs (a pad is no pause)."""
        T, M = ids.shape[1], self.pause_slots.shape[0]
        is_p = ids == self.pause_id
        t = torch.arange(T, device=ids.device)
        start = torch.where(is_p, -1, t).cummax(1).values   # [N, T] last non-pause at or before t (-1: none)
        run = t - start                                     # pauses: place in the run, from 1; others: 0
        if past is not None and past.pause_run is not None:
            run = run + torch.where(start < 0, past.pause_run[:, None], 0)
        if cache is not None:
            cache.pause_run = run[:, -1]
        slot = torch.where(is_p, (run - 1) % M + 1, 0)      # 0 picks the zero row below
        return F.embedding(slot, F.pad(self.pause_slots, (0, 0, 1, 0)))

    def reason(self, h, cache: KVCache):
        """Latent steps (ReaRec): h [N, d], the final-LayerNorm state of the last position read into cache ->
        the states after each of the K steps [N, K, d]; step k reads (previous state + reasoning_pos[k]) as its
        input embedding. The last state predicts the SID's first token."""
        states = []
        for k in range(self.cfg.latent_steps):
            h = self.hidden(embeds=(h + self.reasoning_pos[k])[:, None], cache=cache)[:, 0]
            states.append(h)
        return torch.stack(states, 1)

    def loss(self, ids, loss_mask):
        """Mean cross-entropy over supervised tokens; logits are computed only where a target is."""
        if self.cfg.reasoning == "latent":
            return self.latent_loss(ids, loss_mask)
        sel = loss_mask[:, 1:]                        # position i predicts ids[:, i + 1]
        if self.cfg.step_loss != "draft":
            logits = self(ids[:, :-1], select=sel)    # [n_supervised, V - head_start]
            return F.cross_entropy(logits.float(), ids[:, 1:][sel] - self.head_start)
        draft, first = draft_targets(ids, loss_mask, self.pause_id)
        both = sel | draft                            # disjoint: a draft position's next token is a pause
        logits = self(ids[:, :-1], select=both).float()  # [n_sid + n_draft, V'], rows in position order
        target = torch.where(sel, ids[:, 1:], first)[both] - self.head_start
        is_sid = sel[both]
        loss = F.cross_entropy(logits[is_sid], target[is_sid])
        if bool(draft.any()):
            loss = loss + self.cfg.step_loss_weight * F.cross_entropy(logits[~is_sid], target[~is_sid])
        return loss

    def latent_loss(self, ids, loss_mask):
        """Latent mode: cross-entropy on the target's L SID tokens, the first predicted from the last latent
        step's state (with step_loss progressive the earlier steps' states predict it too: ReaRec's PRL).

        ids [N, T] right-padded examples [BOS] history <slot>*K sid(target) (loss_mask True on sid(target)).
        The histories are read in one pass into a KV cache (the K slots and the target masked as keys), then
        the K latent steps and the target's first L-1 tokens one read each: K + 2 calls, gradients through all.
        """
        N, K = ids.shape[0], self.cfg.latent_steps
        L = int(loss_mask[0].sum())
        start = loss_mask.float().argmax(1)               # [N] the target's first SID token
        hlen = start - K                                  # [N] BOS + history tokens
        Th = int(hlen.max())
        cache = KVCache()
        history = torch.arange(Th, device=ids.device) < hlen[:, None]
        h = self.hidden(ids[:, :Th], key_mask=history, cache=cache)[torch.arange(N, device=ids.device), hlen - 1]
        states = self.reason(h, cache)                                                # [N, K, d]
        target = ids.gather(1, start[:, None] + torch.arange(L, device=ids.device))  # [N, L]
        logits = [self.logits(states[:, -1])[:, None]]
        if L > 1:
            logits.append(self(target[:, :-1], cache=cache))                          # [N, L-1, V']
        loss = F.cross_entropy(torch.cat(logits, 1).flatten(0, 1).float(), target.flatten() - self.head_start)
        if self.cfg.step_loss == "progressive" and K > 1:   # steps 1..K-1 predict the first SID token too
            temp = self.cfg.step_temp ** torch.arange(K - 1, 0, -1, device=ids.device)  # [K-1]: softest first
            step_logits = self.logits(states[:, :-1]).float() / temp[:, None]            # [N, K-1, V']
            first = (target[:, :1] - self.head_start).expand(N, K - 1)
            loss = loss + self.cfg.step_loss_weight * F.cross_entropy(step_logits.flatten(0, 1), first.flatten())
        return loss


def loss(logits, ids, loss_mask, head_start: int = 0):
    """Same loss from logits [B, T, V'] at every position (reference for GPT.loss; head_start: model.head_start)."""
    sel = loss_mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][sel].float(), ids[:, 1:][sel] - head_start)


# ---------------------------------------------------------------------------------------------------------
# 2. Token layout


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

    PAD, BOS, EOS, PAUSE, THINK, END_THINK = range(6)
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
# 3. Examples: token sequences and loss masks for the modes none | pause | cot


def num_pauses(cfg: ModelConfig) -> int:
    return cfg.num_pauses if cfg.reasoning == "pause" else 0


def num_slots(cfg: ModelConfig) -> int:
    """Tokens between the history and the target's SID: M pauses (pause), K latent steps (latent), else 0.
    A latent step's slot holds the <pause> id, but its input embedding is the fed-back state (GPT.reason)."""
    return cfg.latent_steps if cfg.reasoning == "latent" else num_pauses(cfg)


def _history(tok: Tokens, cfg: ModelConfig, history, supervise: bool):
    """[BOS] + history SIDs (with M pauses before each item in the every_item layout), and its loss mask.

    loss_on_history supervises every history item's SID tokens except the first item's (which has no
    history to be predicted from). Pauses are never supervised; nor are titles (prompt sids+titles,
    where each item is its title's text tokens followed by its SID).
    """
    M = num_pauses(cfg) if cfg.pause_layout == "every_item" else 0
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
    M = num_pauses(cfg) if cfg.pause_layout == "every_item" else 0
    room, n = cfg.max_len - 1 - reserve, len(history)  # 1: BOS
    while n > 0 and room >= (cost := M + len(tok.item_titles[history[n - 1]]) + tok.num_levels):
        room, n = room - cost, n - 1
    return history[n:]


def _reserve(tok: Tokens, cfg: ModelConfig) -> int:
    """Tokens after the history, up to the end of the target: pauses or the longest rationale, then the SID."""
    if cfg.reasoning == "cot":
        return cfg.max_rationale_len + 2 + tok.num_levels
    return num_slots(cfg) + tok.num_levels


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
        ids += [tok.PAUSE] * num_slots(cfg)
    return _check_len(ids, cfg)


def build_example(tok: Tokens, cfg: ModelConfig, history: list[int], target: int,
                  rationale: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """One training example: (ids, loss_mask); loss_mask[i] True = ids[i] is supervised.

      none : [BOS] sid(h1) .. sid(hn) sid(target)
      pause: [BOS] sid(h1) .. sid(hn) <pause>*M sid(target)          (pause_layout 'target')
             [BOS] (<pause>*M sid(h1)) .. (<pause>*M sid(hn)) <pause>*M sid(target)   ('every_item')
      cot  : [BOS] sid(h1) .. sid(hn) <think> w1 .. wk </think> sid(target)
      latent: [BOS] sid(h1) .. sid(hn) <slot>*K sid(target)       (slots: the <pause> id, read as latent steps)
    Supervised: the target's SID tokens, plus the rationale words and </think> in cot.
    With prompt sids+titles every sid(h) is preceded by h's title, and the oldest items are dropped
    until the example fits model.max_len.
    """
    history = _fit(tok, cfg, history, _reserve(tok, cfg))
    ids, mask = _history(tok, cfg, history, cfg.loss_on_history)
    if cfg.reasoning == "cot":
        if rationale is None:
            raise ValueError("build_example: reasoning=cot needs a rationale (token ids)")
        words = list(rationale)[: cfg.max_rationale_len]
        ids += [tok.THINK] + words + [tok.END_THINK]
        mask += [False] + [True] * (len(words) + 1)
    else:
        ids += [tok.PAUSE] * num_slots(cfg)
        mask += [False] * num_slots(cfg)
    ids += tok.sid(target)
    mask += [True] * tok.num_levels
    return _check_len(ids, cfg), mask


def build_sequence_example(tok: Tokens, cfg: ModelConfig, items: list[int]) -> tuple[list[int], list[bool]]:
    """A user's whole item sequence as one example: [BOS] (<pause>*M sid(i1)) .. (<pause>*M sid(in)).

    Every item's SID tokens but the first item's are supervised, so one pass trains all positions.
    Needs reasoning none, or pause with pause_layout every_item (or M = 0). Equal to
    build_example(items[:-1], items[-1]) with loss_on_history on.
    """
    if cfg.reasoning in ("cot", "latent") or (num_pauses(cfg) > 0 and cfg.pause_layout != "every_item"):
        raise ValueError("build_sequence_example needs model.reasoning=none, or pause with "
                         "model.pause_layout=every_item")
    items = _fit(tok, cfg, items, 0)
    if len(items) < 2:
        raise ValueError(f"build_sequence_example needs >= 2 items (that fit model.max_len), got {len(items)}")
    ids, mask = _history(tok, cfg, items, True)
    return _check_len(ids, cfg), mask


def collate(examples, pad: int = Tokens.PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (ids, loss_mask) -> ids [B, T] right-padded with pad (tok.PAD), loss_mask [B, T] bool
    (False on pads)."""
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


# cot rationales: templates from the target item's metadata, or an external file


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


# ---------------------------------------------------------------------------------------------------------
# 4. Prefix trie over the catalogue's SIDs (CSR per level)


class SIDTrie:
    """Exact prefix trie of codes [N, L], stored level by level as CSR arrays.

    Prefixes of depth d are numbered 0..P_d-1 in lexicographic order (depth 0: the root, P_0 = 1).
    The children of prefix p at depth d are entries child_start[d][p] : child_start[d][p+1] of
    child_code[d] (their codes at level d); an entry's index IS the child's prefix id at depth d+1.
    At depth L, prefix id i is item leaf_item[i]. SIDs must be unique (one leaf per item).
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
# 5. Constrained beam search


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
        logits = model(nxt[:, None], key_mask=~done[:, None], cache=cache, select="last")
        ended = (nxt == tok.END_THINK) & ~done
        sid_logits[ended] = logits[ended]
        done |= ended
        if bool(done.all()):
            break
    seq = torch.stack(steps, 1).tolist()
    rationales = [[t for t in row if t not in (tok.PAD, tok.END_THINK)] for row in seq]
    return sid_logits, rationales


ABLATIONS = ("hide", "shuffle")   # evaluate.py --ablate-pauses: knock out the reasoning slots at inference


@contextmanager
def foreign_slot_states(model: GPT, slots: torch.Tensor):
    """shuffle ablation: while active, each row's keys and values at the columns `slots` [B, T] bool (the same
    columns in every row) are those of the next row in the batch (row b reads row b+1's, the last row the first's).
    Only what attention reads is swapped; each position's own residual stream stays its own."""
    q = model.cfg.n_head * model.cfg.head_width

    def swap(module, args, out):                      # out [B, T, q + 2 kv] of c_attn: [q; k; v] per position
        kv = out[..., q:]
        return torch.cat([out[..., :q], torch.where(slots[..., None], kv.roll(-1, 0), kv)], -1)

    hooks = [block.attn.c_attn.register_forward_hook(swap) for block in model.transformer.h]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def latent_prefill(model: GPT, cfg: ModelConfig, prompts: list[list[int]], cache: KVCache, pad: int,
                   ablate: str = ""):
    """latent: logits [B, V'] after the K latent steps, cache filled. Each prompt's last K tokens are its latent
    slots: the rest ([BOS] history, left-padded) is read in one pass, then the K steps one read each.
    ablate hide: each step's key is masked for every later read (the steps then reach the SID only through the
    fed-back state); shuffle: the steps' keys and values are another prompt's (foreign_slot_states)."""
    K = cfg.latent_steps
    if min(len(p) for p in prompts) <= K:
        raise ValueError(f"latent_prefill: prompts must hold [BOS] history and {K} latent slots (build_prompt)")
    ids, key_mask = left_pad([p[:-K] for p in prompts], model.device, pad)
    h = model.hidden(ids, key_mask=key_mask, cache=cache)[:, -1]
    if not ablate:
        return model.logits(model.reason(h, cache)[:, -1])
    B = len(prompts)
    hidden_key = torch.full((B, 1), ablate != "hide", device=model.device)  # False: the step's key is masked
    with foreign_slot_states(model, torch.ones(B, 1, dtype=torch.bool, device=model.device)) \
            if ablate == "shuffle" else nullcontext():
        for k in range(K):
            positions = cache.length[:, None] + (k if ablate == "hide" else 0)  # a masked key is not counted
            h = model.hidden(embeds=(h + model.reasoning_pos[k])[:, None], key_mask=hidden_key,
                             positions=positions, cache=cache)[:, 0]
    if ablate == "hide":
        cache.length = cache.length + K               # the SID's positions as without the ablation
    return model.logits(h)


def check_ablation(cfg: ModelConfig, ablate: str):
    if ablate not in ABLATIONS:
        raise ValueError(f"--ablate-pauses must be {' | '.join(ABLATIONS)}, got {ablate!r}")
    if num_slots(cfg) == 0:
        raise ValueError(f"--ablate-pauses needs a run with pauses or latent steps (model.reasoning=pause with "
                         f"num_pauses > 0, or latent), got reasoning={cfg.reasoning}")


def prefill(model: GPT, cfg: ModelConfig, prompts: list[list[int]], cache: KVCache, pad: int, ablate: str = ""):
    """Read the prompts (build_prompt) into cache in one pass -> logits [B, V'] for the first SID token.

    ablate (evaluation only, pause and latent): knock out the M pauses (K latent steps) right before the SID.
      hide: no later position attends to them (their keys are masked; positions stay as trained);
      shuffle: their keys and values are the next prompt's in the batch (foreign_slot_states).
    """
    if ablate:
        check_ablation(cfg, ablate)
        if ablate == "shuffle" and len(prompts) < 2:
            raise ValueError("ablate=shuffle needs >= 2 prompts per batch (each reads the next one's pauses)")
    if cfg.reasoning == "latent":
        return latent_prefill(model, cfg, prompts, cache, pad, ablate)
    ids, key_mask = left_pad(prompts, model.device, pad)
    if not ablate:
        return model(ids, key_mask=key_mask, cache=cache, select="last")
    slots = torch.zeros_like(key_mask)
    slots[:, -num_slots(cfg):] = True                 # left-padded: every prompt ends with its M pauses
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    if ablate == "shuffle":
        with foreign_slot_states(model, slots):
            return model(ids, key_mask=key_mask, cache=cache, select="last")
    logits = model(ids, key_mask=key_mask & ~slots, positions=positions, cache=cache, select="last")
    cache.length = cache.length + num_slots(cfg)      # hidden keys are not counted: the SID's positions as trained
    return logits


@torch.inference_mode()
def beam_search(model: GPT, tok: Tokens, cfg: ModelConfig, trie: SIDTrie, prompts: list[list[int]],
                beam_size: int, topk: int, return_rationales: bool = False, device=None, ablate: str = ""):
    """Top-k catalogue items per prompt by trie-constrained beam search over the L SID tokens.

    -> items LongTensor [B, topk] (item indices, -1 where fewer than topk beams exist),
       scores FloatTensor [B, topk] (summed SID log-probs, descending; -inf for the -1 items).
    Log-probs are normalised over the head's whole vocabulary (all tokens, or ours with model.head=new) and
    the trie only restricts which tokens are selected, so a beam's score is exactly the teacher-forced
    log-prob of its SID (see score_items).
    In cot mode the rationale is decoded greedily first; scores are conditioned on it (its tokens are
    returned third with return_rationales=True). In latent mode the prompts' last K tokens are the latent
    steps (latent_prefill). Runs on the model's device (`device` only checks it). ablate: see prefill.
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
    logits = prefill(model, cfg, prompts, cache, tok.PAD, ablate)              # [B, V']: one parallel prefill
    rationales = None
    if cfg.reasoning == "cot":
        logits, rationales = _decode_rationale(model, tok, cfg, cache, logits)
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
            logits = model(chosen.view(-1, 1), cache=cache, select="last")
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


# ---------------------------------------------------------------------------------------------------------
# 6. Backbones: the decoder and tokens for model.backbone (weights and tokenizers: backbones.py)


def backbone_config(cfg: ModelConfig, tok: Tokens) -> ModelConfig:
    """cfg with the architecture of cfg.hf_dir's config.json: sizes and block flags (backbones.hf_config), the
    depth cut to model.keep_layers; checked against cfg.backbone, model.max_len and the tokens' text vocabulary."""
    hf = backbones.hf_config(cfg.hf_dir)
    family, vocab, max_positions = hf.pop("family"), hf.pop("vocab_size"), hf.pop("max_positions")
    where = f"{cfg.hf_dir}/config.json"
    if cfg.backbone not in ("hf", family):
        raise ValueError(f"model.backbone={cfg.backbone} but {where} holds a {family} model (model_type)")
    if cfg.max_len > max_positions:
        raise ValueError(f"model.max_len={cfg.max_len} exceeds the {max_positions} positions of {where}")
    if tok.base != vocab:
        raise ValueError(f"Tokens were built for a text vocabulary of {tok.base}, {where} has vocab_size {vocab}")
    if cfg.keep_layers > hf["n_layer"]:
        raise ValueError(f"model.keep_layers={cfg.keep_layers} exceeds the {hf['n_layer']} blocks of {where}")
    return dataclasses.replace(cfg, **dict(hf, n_layer=cfg.keep_layers or hf["n_layer"]))


def text_rows_for_words(w, tok: Tokens, hf_dir: str):
    """Initial rows [V - base, d] of our tokens from the pretrained rows w [base, d]: each the mean row, except
    that a rationale word (cot) starts as the mean of its own text tokens' rows when the folder has a tokenizer,
    so the LM reads ' brand opi' in its words from the first step."""
    ours = w.mean(0).expand(tok.size - tok.base, -1).clone()
    if tok.words and backbones.has_files(hf_dir, backbones.TOKENIZER_FILES):
        text = backbones.load_tokenizer(hf_dir)
        for j, word in enumerate(tok.words):
            ours[tok.word_start - tok.base + j] = w[text.encode(" " + word)].mean(0)
    return ours


def load_pretrained(model: GPT, tok: Tokens, hf_dir: str):
    """The checkpoint's weights into model. Our tokens' rows (ids tok.base..) come after the text rows of the
    embedding (and of an untied head): text_rows_for_words; learned positions are cut to max_len."""
    cfg = model.cfg
    sd = backbones.hf_state_dict(backbones.read_checkpoint(hf_dir), backbones.read_config(hf_dir), cfg.n_layer)
    for name, apart in (("transformer.wte.weight", "new_rows"), ("lm_head.weight", "new_head_rows")):
        if name not in sd:   # a tied head
            continue
        w = sd[name]
        if w.shape[0] != tok.base:
            raise ValueError(f"{hf_dir}: {name} has {w.shape[0]} rows, config.json's vocab_size is {tok.base}")
        ours = text_rows_for_words(w, tok, hf_dir)
        if cfg.train_only_new_tokens:
            sd[apart] = ours.clone()
        else:
            sd[name] = torch.cat([w, ours])
    if cfg.tie_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    if cfg.pos == "learned":
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: cfg.max_len]
    own = ("pause_slots", "reasoning_pos", "inv_freq")    # ours, not the checkpoint's: kept as initialised
    sd.update({k: v for k, v in model.state_dict().items() if k in own})
    model.load_state_dict(sd)


def make_model(cfg: ModelConfig, tok: Tokens, pretrained: bool = True) -> GPT:
    """The decoder for cfg.backbone. Pretrained: the architecture of config.json (n_layer, n_head, d_model and
    the block flags replace the config's: backbone_config), RoPE's frequencies as the checkpoint scales them,
    and with `pretrained` its weights (load_pretrained). train_only_new_tokens: only our rows train (new_rows,
    new_head_rows), with the pause slots and the latent step embeddings."""
    if cfg.backbone == "scratch":
        return GPT(cfg, tok.size, tok.base)
    cfg = backbone_config(cfg, tok)
    model = GPT(cfg, tok.size, tok.base)
    if cfg.pos == "rope":
        model.inv_freq.copy_(backbones.rope_inv_freq(backbones.read_config(cfg.hf_dir)))
    if pretrained:
        load_pretrained(model, tok, cfg.hf_dir)
    if cfg.train_only_new_tokens:
        for name, p in model.named_parameters():
            p.requires_grad_(name in ("new_rows", "new_head_rows", "pause_slots", "reasoning_pos"))
    return model


def make_tokens(cfg: ModelConfig, codes, words=(), item_meta=None) -> Tokens:
    """Tokens for cfg.backbone: from scratch ours only; pretrained ours after its text vocabulary (config.json's
    vocab_size, padding rows included), and with prompt sids+titles every item's title as text tokens
    (' ' + title, at most max_title_len)."""
    if cfg.backbone == "scratch":
        return Tokens.from_codes(codes, words)
    tok = Tokens.from_codes(codes, words, base=backbones.hf_config(cfg.hf_dir)["vocab_size"])
    if cfg.prompt == "sids+titles":
        bpe = backbones.load_tokenizer(cfg.hf_dir)
        if len(bpe) > tok.base:
            raise ValueError(f"{cfg.hf_dir}: the tokenizer has {len(bpe)} tokens, more than vocab_size {tok.base}")
        tok.item_titles = [bpe.encode(" " + m["title"])[: cfg.max_title_len] if m.get("title") else []
                           for m in item_meta]
    return tok
