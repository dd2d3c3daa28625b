"""The decoder: ModelConfig and a GPT-2-named transformer whose flags also make it Llama's, Qwen2's or Qwen3's.

Read top to bottom: the config (one flat section, `model.*`, shared with the method in pauserec.py), RoPE,
norms, attention, MLP, Block, GPT. GPT-2's parameter names throughout (wte, wpe, h.N.attn.c_attn, ...), so
old checkpoints keep loading and backbones.py maps every family's names onto them; litgpt-style flags pick
the block: LayerNorm or RMSNorm, GELU or SwiGLU, learned positions or RoPE, grouped-query attention, Qwen2's
q/k/v biases, Qwen3's q/k norms. The decoder does not own a KV cache: a caller passes one (pauserec.KVCache),
attention calls cache.attend and the cache keeps its own books (cache.read). Imports no project module.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAUSE = 3   # the <pause> token's id above the text vocabulary (pauserec.Tokens.PAUSE): distinct pause rows go there


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
    reasoning: str = "none"        # none | pause | cot | latent (which wins where: docs/RESULTS.md)
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
                                   #   | last: as target, one example per user (its last training item; the paper's)
    think_pauses: bool = False     # pause (layouts target, last): the M pauses between <think> and </think>
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
    train_only_new_tokens: bool = False  # pretrained: freeze all its weights for the whole run (every stage), train
                                   #   only our rows (new_rows; train.frozen_epochs freezes the first epochs only)
    train_text_rows: bool = False  # pretrained: its text vocabulary's rows train too (a dense update of every row
                                   #   at every step); false: frozen, only our rows and the blocks learn
    sid_init: str = "mean"         # pretrained: our SID rows start at mean: the mean text row | text: the mean row
                                   #   of the words most typical (tf-idf) of the titles and categories of the items
                                   #   with that code (backbones.sid_keywords)
    sid_init_words: int = 8        # sid_init text: words pooled per SID code
    pause_init: str = "mean"       # pretrained: the <pause> row starts at mean: the mean text row, like every
                                   #   special (BOS too) | text: the mean row of the text tokens of ' wait'
                                   #   (backbones.PAUSE_WORD), a word the LM reads, not one more BOS
    bos_init: str = "mean"         # pretrained: our BOS row starts at mean: the mean text row | backbone: the
                                   #   backbone's own BOS row (config.json's bos_token_id)
    init_from: str = ""            # a run folder whose model.pt starts training (stages.load_init: same SIDs, shapes)

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
        if self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"model.n_head ({self.n_head}) must divide by model.n_kv_head ({self.n_kv_head})")
        for key, ok in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")), ("pos", ("learned", "rope")),
                        ("head", ("full", "new")), ("reasoning", ("none", "pause", "cot", "latent")),
                        ("pause_layout", ("target", "every_item", "last")),
                        ("pause_embeddings", ("shared", "distinct")),
                        ("backbone", ("scratch",) + BACKBONES), ("prompt", ("sids", "sids+titles")),
                        ("sid_init", ("mean", "text")), ("pause_init", ("mean", "text")),
                        ("bos_init", ("mean", "backbone"))):
            if getattr(self, key) not in ok:
                raise ValueError(f"model.{key} must be {' | '.join(ok)}, got {getattr(self, key)!r}")
        for key in ("norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        head_dim = self.head_dim or self.d_model // self.n_head
        if self.pos == "rope" and head_dim % 2:
            raise ValueError(f"model.pos=rope needs an even head width (model.head_dim), got {head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.reasoning == "latent":
            if self.pause_layout == "every_item":
                raise ValueError(f"model.reasoning=latent needs model.pause_layout=target or last (one example per "
                                 f"target, the K latent steps before it), got {self.pause_layout!r}")
            if self.latent_steps < 1:
                raise ValueError(f"model.latent_steps must be >= 1 with reasoning=latent, got {self.latent_steps}")
            if self.loss_on_history:
                raise ValueError("model.loss_on_history is not supported with model.reasoning=latent")
        needs = {"draft": "pause", "progressive": "latent", "none": self.reasoning}.get(self.step_loss)
        if needs is None:
            raise ValueError(f"model.step_loss must be none | draft | progressive, got {self.step_loss!r}")
        if self.reasoning != needs:
            raise ValueError(f"model.step_loss={self.step_loss} needs model.reasoning={needs}, got {self.reasoning}")
        if self.think_pauses and (self.reasoning != "pause" or self.pause_layout == "every_item"):
            raise ValueError("model.think_pauses needs model.reasoning=pause and model.pause_layout target or last")
        if self.think_pauses and self.step_loss == "draft":   # </think>, not the SID, follows the pauses
            raise ValueError("model.step_loss=draft needs the pauses right before the SID: not with model.think_pauses")
        if self.step_loss_weight < 0 or self.step_temp <= 0:
            raise ValueError(f"model.step_loss_weight must be >= 0 and model.step_temp > 0, got "
                             f"{self.step_loss_weight}, {self.step_temp}")
        if not 0.0 <= self.rationale_noise <= 1.0:
            raise ValueError(f"model.rationale_noise must be in [0, 1], got {self.rationale_noise}")
        if self.backbone != "scratch" and not self.hf_dir:
            raise ValueError(f"model.backbone={self.backbone} needs model.hf_dir (a Hugging Face model folder)")
        pretrained_only = {"prompt": "sids", "train_only_new_tokens": False, "keep_layers": 0,
                           "train_text_rows": False, "sid_init": "mean", "pause_init": "mean", "bos_init": "mean"}
        if self.backbone == "scratch" and (keys := [k for k, v in pretrained_only.items() if getattr(self, k) != v]):
            raise ValueError(f"model.{keys[0]}={getattr(self, keys[0])} needs a pretrained model.backbone")
        if self.sid_init_words < 1:
            raise ValueError(f"model.sid_init_words must be >= 1, got {self.sid_init_words}")

    def resolved(self) -> "ModelConfig":
        """This config with its 0 defaults filled in: n_kv_head = n_head, head_dim = d_model / n_head, d_ff =
        4 d_model. The decoder reads only resolved configs (GPT resolves its own); the config file keeps its 0s,
        so that a pretrained backbone's d_model and n_head (backbones.backbone_config) resolve them."""
        return dataclasses.replace(self, n_kv_head=self.n_kv_head or self.n_head,
                                   head_dim=self.head_dim or self.d_model // self.n_head,
                                   d_ff=self.d_ff or 4 * self.d_model)

    @property
    def active_pauses(self) -> int:
        """M as read: <pause> tokens before a predicted item, model.num_pauses in pause mode, 0 in the others."""
        return self.num_pauses if self.reasoning == "pause" else 0



# ---------------------------------------------------------------------------------------------------------
# RoPE and norms


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE's default frequencies [head_dim / 2]: theta^(-2i / head_dim) (a backbone may scale them)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim).float()


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


# ---------------------------------------------------------------------------------------------------------
# The block


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):   # cfg resolved (GPT)
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, q + 2 * kv, bias=cfg.bias or cfg.qkv_bias)  # fused [q; k; v]
        self.c_proj = nn.Linear(q, cfg.d_model, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None  # Qwen3: over each head's width
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache, layer: int, rope=None):
        """x [N, T, d] -> [N, T, d]. mask [N, 1, T, T] bool or None (causal); cache: a KV cache or None (its
        attend(layer, q, k, v, mask, dropout_p) stores k, v and attends); rope: (cos, sin) [N, 1, T, Dh] of the
        tokens' positions (pos=rope), or None."""
        N, T, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=2)
        q, k, v = (t.view(N, T, -1, Dh).transpose(1, 2) for t in (q, k, v))   # [N, H (q) or Hkv (k, v), T, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:   # rotated before the cache stores k: cached keys carry their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # grouped-query attention: each k/v head serves H / Hkv query heads. Without a cache, SDPA pairs them itself
        # (enable_gqa) except in float32 on CUDA, whose memory-efficient kernel takes no GQA (it would fall back to
        # the math kernel). Elsewhere they are repeated, so the cache stays plain multi-head (at H / Hkv times the
        # cache memory strictly needed)
        gqa = Hkv < H and cache is None and not (q.is_cuda and q.dtype == torch.float32)
        if Hkv < H and not gqa:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        p = self.dropout if self.training else 0.0
        if cache is None:   # mask None: the is_causal fast path used in training
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p,
                                               enable_gqa=gqa)
        else:
            y = cache.attend(layer, q, k, v, mask, p)
        y = y.transpose(1, 2).reshape(N, T, H * Dh)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):   # cfg resolved (GPT)
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = 2 * cfg.d_ff if self.swiglu else cfg.d_ff   # swiglu: [gate; up]
        self.c_fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
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


# ---------------------------------------------------------------------------------------------------------
# GPT


def draft_targets(ids, loss_mask, pause_id: int):
    """step_loss draft: ids [N, T], loss_mask [N, T] -> (where [N, T-1] bool, target [N, T-1] long).

    Position i (whose logits predict ids[i+1]) is a draft position when it and the next token are both
    pauses, i.e. every pause of a run but the last, and the item after the run is supervised; its target is
    that item's first SID token. The last pause of a run already predicts that token (the SID loss).
    """
    N, T = ids.shape
    t = torch.arange(T, device=ids.device).expand(N, T)
    is_p = ids == pause_id
    after = torch.where(is_p, T, t).flip(1).cummin(1).values.flip(1)   # [N, T] first non-pause at or after t
    first = after[:, 1:].clamp(max=T - 1)                               # [N, T-1] the item after i's run
    where = is_p[:, :-1] & is_p[:, 1:] & (after[:, 1:] < T) & loss_mask.gather(1, first)
    return where, ids.gather(1, first)


def masked_cross_entropy(logits, target, mask):
    """Mean cross-entropy of logits [n, V'] against target [n] where mask [n] is True (0 when it is nowhere): a sum
    with the other rows ignored, divided on the device, so no count is read back to the host."""
    ignored = target.masked_fill(~mask, -100)
    return F.cross_entropy(logits, ignored, ignore_index=-100, reduction="sum") / mask.sum().clamp(min=1)


def split_rows(module, state, prefix, *_):
    """Load hook of a pretrained GPT: a checkpoint whose wte (lm_head) holds all V rows [V, d] has them split
    into the text rows [base, d] and new_rows (new_head_rows) [V - base, d], as the model keeps them."""
    base = module.transformer.wte.num_embeddings
    wte, head = prefix + "transformer.wte.weight", prefix + "lm_head.weight"
    if wte not in state or state[wte].shape[0] == base or prefix + "new_rows" in state:
        return
    state[prefix + "new_rows"], state[wte] = state[wte][base:], state[wte][:base]
    if head in state:
        rows = state[head]
        state[head] = rows[:base]
        if module.new_head_rows is not None:
            state[prefix + "new_head_rows"] = rows[base:]


class GPT(nn.Module):
    """Decoder-only transformer with GPT-2's parameter names; the ModelConfig flags make its blocks Llama's,
    Qwen2's or Qwen3's, so the weights of all four families load into it (backbones.py maps the names).

    vocab_size: all tokens; base: the text vocabulary before ours (GPT-2: 50257; 0 from scratch). A pretrained
    backbone (base > 0) keeps its text rows in wte (and an untied lm_head) [base, d] and our tokens' rows apart in
    new_rows (new_head_rows) [V - base, d], so the text rows can be frozen (model.train_text_rows) and no step
    updates them; a checkpoint with the rows in one table (runs before this layout) is split on loading.
    Two method parameters live here because the input embedding needs them: pause_slots (distinct pause
    embeddings) and reasoning_pos (latent steps, read by pauserec.latent_steps).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, base: int = 0):
        super().__init__()
        self.cfg = cfg = cfg.resolved()
        self.pause_id = base + PAUSE
        self.head_start = base if cfg.head == "new" else 0   # logit j is token head_start + j
        self.every_position = not base or cfg.head == "new"   # loss: a small head takes logits at every position
        rows = base or vocab_size
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
        distinct = cfg.pause_embeddings == "distinct" and cfg.active_pauses > 0
        self.pause_slots = nn.Parameter(torch.zeros(cfg.num_pauses, cfg.d_model)) if distinct else None
        # latent reasoning (ReaRec): step k's input is the previous state + reasoning_pos[k] (+ its position's wpe)
        if cfg.reasoning == "latent":
            self.reasoning_pos = nn.Parameter(torch.randn(cfg.latent_steps, cfg.d_model) * 0.02)
        if cfg.pos == "rope":   # persistent: a checkpoint carries a backbone's (scaled) frequencies. float32:
            #   use autocast for bf16, model.to(torch.bfloat16) would round them (angles off at long positions)
            self.register_buffer("inv_freq", rope_frequencies(cfg.head_dim, cfg.rope_theta))
        self.new_rows = self.new_head_rows = None   # pretrained: our rows, set by backbones.load_pretrained
        if base:
            self.new_rows = nn.Parameter(torch.zeros(vocab_size - base, cfg.d_model))
            if not cfg.tie_head:
                self.new_head_rows = nn.Parameter(torch.zeros(vocab_size - base, cfg.d_model))
            self.register_load_state_dict_pre_hook(split_rows)

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
        """Input rows [N, T, d] of ids [N, T]; on a pretrained backbone ids >= base read new_rows."""
        wte = self.transformer.wte
        if self.new_rows is None:
            return wte(ids)
        base = wte.num_embeddings
        ours = F.embedding((ids - base).clamp(min=0), self.new_rows)
        return torch.where((ids >= base)[..., None], ours, wte(ids.clamp(max=base - 1)))

    def input_rows(self):
        """All input rows [V, d]: the text vocabulary's, then ours (a copy on a pretrained backbone)."""
        w = self.transformer.wte.weight
        return w if self.new_rows is None else torch.cat([w, self.new_rows])

    @property
    def new_output_rows(self):
        """Our tokens' output rows [V - base, d] on a pretrained backbone: new_head_rows, or new_rows (tied head)."""
        return self.new_rows if self.new_head_rows is None else self.new_head_rows

    def head_rows(self, every_token: bool = False):
        """Output rows [V - head_start, d]: all tokens' (head full) or ours only (head new, ids >= base);
        every_token: all V rows whatever the head (the stages' text loss predicts text tokens)."""
        start = 0 if every_token else self.head_start
        w = self.lm_head.weight                      # [V, d] from scratch, [base, d] pretrained (ours apart)
        if self.new_rows is None:
            return w[start:]
        ours = self.new_output_rows
        return ours if start else torch.cat([w, ours])   # all rows: a copy per call, as big as the head

    def logits(self, x, every_token: bool = False):
        """x [.., d] -> logits [.., V - head_start] (every_token: [.., V], as head_rows)."""
        if every_token and self.new_rows is not None:   # the text rows' and ours apart: no [V, d] copy
            return torch.cat([F.linear(x, self.lm_head.weight), F.linear(x, self.new_output_rows)], -1)
        return F.linear(x, self.head_rows(every_token))

    def forward(self, ids, key_mask=None, positions=None, cache=None, last: bool = False, where=None):
        """ids [N, T] -> logits [N, T, V'] over the head's tokens (index j: token head_start + j).

        key_mask [N, T] bool, True = real token: None means all real (right-padded training batches need
          none: causal attention never lets a real token see the pads after it). With left-padded
          prompts, pads are masked as keys and positions count from 0 at the first real token, so a
          row's results do not depend on how much padding it got.
        positions [N, T]: default = real tokens before this one (plus those already in the cache).
        cache: a KV cache (pauserec.KVCache), filled in place (the first call fills its shared prompt part).
        last: logits [N, V'] at the last position only (decoding).
        where: bool [N, T] -> logits [n_true, V'] only where True (the supervised positions of a batch: the
          vocabulary matmul is skipped elsewhere).
        """
        x = self.hidden(ids, key_mask, positions, cache)
        if last:
            x = x[:, -1]
        elif where is not None:
            x = x[where]  # [n_true, d]
        return self.logits(x)

    def hidden(self, ids=None, key_mask=None, positions=None, cache=None, embeds=None):
        """The final-norm states [N, T, d] of ids [N, T], or of input embeddings `embeds` [N, T, d] given in
        place of token rows (latent steps; positions are added or rotated in as for tokens). Arguments as in
        forward."""
        x = self.embed(ids) if embeds is None else embeds
        N, T = x.shape[:2]
        dev = x.device
        real = key_mask if key_mask is not None else torch.ones(N, T, dtype=torch.bool, device=dev)
        plain = positions is None and key_mask is None and cache is None   # positions 0..T-1: no read of the device
        before = cache.read(real) if cache is not None else None   # [N] tokens each row read in earlier calls
        if positions is None:
            positions = (real.long().cumsum(1) - 1).clamp(min=0)
            if before is not None:
                positions = positions + before[:, None]
        if (T if plain else int(positions.max()) + 1) > self.cfg.max_len:   # a training step waits for no device
            raise ValueError(f"sequence longer than model.max_len={self.cfg.max_len} positions")
        mask = None  # None = plain causal attention (a cache past its prefill masks by its own books)
        if key_mask is not None and not bool(key_mask.all()):
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            # every query also sees itself, so padding queries get a (discarded) finite output, not NaN
            mask = (causal & key_mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
        if self.pause_slots is not None and ids is not None:
            x = x + self.pause_slot_rows(ids, cache)
        rope = None
        if self.cfg.pos == "rope":
            rope = rope_cos_sin(self.inv_freq, positions)
        else:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer, rope)
        return self.transformer.ln_f(x)

    def pause_slot_rows(self, ids, cache=None):
        """Distinct pause embeddings: [N, T, d] holding pause_slots[j] at the j-th pause (counted from 0, mod M)
        of each run of consecutive <pause> ids, zeros elsewhere. A run read in an earlier call through the
        cache goes on counting (cache.count_pause_runs); left padding ends runs (a pad is no pause)."""
        T, M = ids.shape[1], self.pause_slots.shape[0]
        is_p = ids == self.pause_id
        t = torch.arange(T, device=ids.device)
        start = torch.where(is_p, -1, t).cummax(1).values   # [N, T] last non-pause at or before t (-1: none)
        run = t - start                                     # pauses: place in the run, from 1; others: 0
        if cache is not None:
            run = cache.count_pause_runs(run, start < 0)
        slot = torch.where(is_p, (run - 1) % M + 1, 0)      # 0 picks the zero row below
        return F.embedding(slot, F.pad(self.pause_slots, (0, 0, 1, 0)))

    def loss(self, ids, loss_mask):
        """Mean cross-entropy over the supervised tokens of examples ids [N, T] (loss_mask [N, T] True where ids is
        a target); step_loss draft adds its positions' weighted mean cross-entropy (draft_targets). Latent mode:
        pauserec.training_loss.

        A head over a few hundred rows (ours: model.head=new; a scratch model's whole small vocabulary) takes logits
        at every position, [N, T-1, V'], the others ignored in the sums (masked_cross_entropy): the shapes are the
        batch's and nothing is read back to the host, so the device never waits for it. A head over a pretrained
        text vocabulary (head full on a backbone: 49k+ rows) takes them only where a target is, [n, V']: a boolean
        index (a host sync) instead of the head's matmul and softmax at every position."""
        if self.cfg.reasoning == "latent":
            raise ValueError("model.reasoning=latent trains through the latent steps: use pauserec.training_loss")
        sel = loss_mask[:, 1:]                        # [N, T-1] position i predicts ids[:, i + 1]
        target = ids[:, 1:] - self.head_start         # [N, T-1] the logit index of the next token
        draft = torch.zeros_like(sel)
        if self.cfg.step_loss == "draft":   # disjoint from sel: a draft position's next token is a pause
            draft, first = draft_targets(ids, loss_mask, self.pause_id)
            target = torch.where(draft, first - self.head_start, target)
        if self.every_position:
            logits = self(ids[:, :-1])                # [N, T-1, V']
        else:
            where = sel | draft
            logits, target, sel, draft = self(ids[:, :-1], where=where), target[where], sel[where], draft[where]
        logits, target = logits.flatten(0, -2).float(), target.flatten()
        loss = masked_cross_entropy(logits, target, sel.flatten())
        if self.cfg.step_loss == "draft":
            loss = loss + self.cfg.step_loss_weight * masked_cross_entropy(logits, target, draft.flatten())
        return loss
