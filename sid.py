"""Semantic IDs: item text -> embedding -> residual quantizer -> unique code tuples.

    texts --(tfidf | sentence-transformers | file:.npy)--> emb [N, D]
          --(rqvae | rqkmeans)--> codes [N, levels]  (one codebook of codebook_size codes per level)
          --(+ collision level)--> SIDs [N, levels + 1], unique per item

    python sid.py CONFIG [key=value ...]                  # build the SID table, print its health as JSON
    python sid.py CONFIG [key=value ...] --out=sids.pt    # also save it: codes, sid settings, health

Health figures come with the table, so codebook collapse is seen at once (sid_health; printed by sid.py and
train.py, saved in sids.pt and metrics.json):
  utilization             per level: share of the codebook_size codes that at least one item uses
  perplexity              per level: exp(entropy) of the code usage (codebook_size when all are used evenly)
  collision_rate          share of items that share their full RQ code (all `levels` codes, before the
                          collision level) with another item; the collision level then tells them apart
  collision_rate_nearest  the same with plain nearest-codeword assignment at every level, i.e. without
                          sid.balanced_last; the rqvae progress bar shows it for each epoch's codes
  max_group               most items sharing one full RQ code
  category_purity         how much more often two items with the same first code share a leaf category
                          than two random items do
This file imports no project module but common (main() aside: data).
"""
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common


@dataclass
class SIDConfig:
    encoder: str = "tfidf"      # tfidf | sentence-transformers:<model name or path> | file:<path>.npy
    embed_dim: int = 256        # tfidf: dimension after the truncated SVD
    max_vocab: int = 50000      # tfidf: keep the most frequent terms (by document frequency)
    min_df: int = 2             # tfidf: drop terms found in fewer item texts than this
    method: str = "rqkmeans"    # rqkmeans (residual k-means; compared: docs/RESULTS.md) | rqvae (TIGER) |
                                #   id (one code per item, its index: a one-level SID, the item-ID baseline;
                                #   the text, levels, codebook_size and the settings below are not used)
    levels: int = 3             # RQ levels (codebooks); the SID has levels + 1 codes
    codebook_size: int = 256    # codes per level
    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])  # rqvae encoder MLP widths
    latent_dim: int = 32        # rqvae latent (codeword) dimension
    beta: float = 0.25          # rqvae commitment weight
    epochs: int = 50            # rqvae training epochs (full passes over the catalogue)
    batch_size: int = 1024      # rqvae items per step; the first batch seeds the codebooks by k-means
    lr: float = 1e-3            # rqvae AdamW learning rate
    kmeans_iters: int = 20      # Lloyd iterations per k-means (rqkmeans, and rqvae's codebook init)
    balanced_last: bool = True  # last level: items that would collide take the nearest still-free code
    seed: int = 0               # seeds the SVD, k-means, rqvae init and shuffling
    threads: int = 1            # torch CPU threads while building; codes depend on it (float sum order)

    def __post_init__(self):
        self.validate()

    def validate(self):
        for key in ("embed_dim", "max_vocab", "min_df", "levels", "codebook_size", "latent_dim", "epochs",
                    "batch_size", "kmeans_iters", "threads"):
            if getattr(self, key) <= 0:
                raise ValueError(f"sid.{key} must be > 0, got {getattr(self, key)}")
        if self.lr <= 0 or self.beta < 0:
            raise ValueError(f"sid.lr must be > 0 and sid.beta >= 0, got lr={self.lr} beta={self.beta}")
        if not self.hidden or min(self.hidden) <= 0:
            raise ValueError(f"sid.hidden must be a non-empty list of sizes > 0, got {self.hidden}")
        if self.method not in ("rqvae", "rqkmeans", "id"):
            raise ValueError(f"sid.method must be rqvae | rqkmeans | id, got {self.method!r}")
        if not (self.encoder == "tfidf" or self.encoder.startswith(("sentence-transformers:", "file:"))):
            raise ValueError("sid.encoder must be tfidf | sentence-transformers:<model> | file:<path>.npy, "
                             f"got {self.encoder!r}")


# ----------------------------------------------------------------------------- text -> embedding

def tfidf_embed(texts, cfg):
    """TF-IDF over words and word bigrams, truncated SVD (LSA). -> [N, <=embed_dim], rows L2-normalised."""
    docs = []
    for t in texts:
        words = re.findall(r"[a-z0-9]+", t.lower())
        docs.append(Counter(words + [a + " " + b for a, b in zip(words, words[1:])]))
    df = Counter(term for d in docs for term in d)
    kept = sorted((t for t, c in df.items() if c >= cfg.min_df), key=lambda t: (-df[t], t))[:cfg.max_vocab]
    if not kept:
        raise ValueError(f"sid.encoder=tfidf: no term occurs in >= sid.min_df={cfg.min_df} of the "
                         f"{len(texts)} item texts")
    vocab = {t: j for j, t in enumerate(kept)}
    n = len(texts)
    rows, cols, vals = [], [], []
    for i, d in enumerate(docs):
        for t, c in d.items():
            if t in vocab:  # sublinear tf times smoothed idf
                rows.append(i)
                cols.append(vocab[t])
                vals.append((1 + math.log(c)) * (math.log((1 + n) / (1 + df[t])) + 1))
    vals = torch.tensor(vals, dtype=torch.float32)
    rows = torch.tensor(rows)
    norms = torch.zeros(n).index_add_(0, rows, vals * vals).sqrt().clamp_min(1e-12)
    a = torch.sparse_coo_tensor(torch.stack([rows, torch.tensor(cols)]), vals / norms[rows], (n, len(kept)),
                                check_invariants=True)
    q = min(cfg.embed_dim, n, len(kept))
    with torch.random.fork_rng():  # svd_lowrank draws its random projection from the global RNG
        torch.manual_seed(cfg.seed)
        u, s, _ = torch.svd_lowrank(a.coalesce(), q=q, niter=4)
    emb = u * s  # [N, q] item coordinates in the latent topic space
    emb = emb - emb.mean(0)  # the first topic is mostly "every item"; centring leaves the quantizer the rest
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


def embed_items(texts, cfg):
    """Item texts -> float32 embeddings [N, D], per cfg.encoder."""
    if cfg.encoder == "tfidf":
        return tfidf_embed(texts, cfg)
    kind, _, arg = cfg.encoder.partition(":")
    if kind == "sentence-transformers":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(f"sid.encoder={cfg.encoder} needs the optional package sentence-transformers "
                              "(pip install sentence-transformers); sid.encoder=tfidf needs nothing") from e
        model = SentenceTransformer(arg, device="cpu")
        emb = model.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        return torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    if not os.path.isfile(arg):
        raise FileNotFoundError(f"sid.encoder={cfg.encoder}: no such file {arg} "
                                f"(expected a .npy array of shape ({len(texts)}, dim), one row per item)")
    emb = np.load(arg, allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != len(texts) or emb.shape[1] == 0:
        raise ValueError(f"sid.encoder={cfg.encoder}: {arg} has shape {emb.shape}, "
                         f"expected ({len(texts)}, dim), one row per item in catalogue order")
    return torch.as_tensor(emb, dtype=torch.float32)


# ----------------------------------------------------------------------------- k-means, residual quantization

def sqdist(x, c):
    """Squared Euclidean distances, x [N, D], c [K, D] -> [N, K]."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)


def kmeans(x, k, iters, gen):
    """k-means++ init, then Lloyd. x [N, D] -> (centroids [k, D], assign [N]). Seeded by gen."""
    n = x.shape[0]
    cent = x.new_empty(k, x.shape[1])
    cent[0] = x[torch.randint(n, (1,), generator=gen)]
    d2 = sqdist(x, cent[:1])[:, 0].clamp_min(0)  # [N] distance to the nearest chosen centroid
    for j in range(1, k):  # next centroid drawn with probability proportional to d2
        i = torch.multinomial(d2, 1, generator=gen) if d2.sum() > 0 else torch.randint(n, (1,), generator=gen)
        cent[j] = x[i]
        d2 = torch.minimum(d2, sqdist(x, cent[j:j + 1])[:, 0].clamp_min(0))
    for _ in range(iters):
        mind, assign = sqdist(x, cent).min(1)
        counts = torch.bincount(assign, minlength=k)
        cent = torch.zeros_like(cent).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero()[:, 0][:n]
        if len(empty):  # re-seed empty clusters with the points farthest from their centroid
            cent[empty] = x[mind.topk(len(empty)).indices]
    return cent, sqdist(x, cent).argmin(1)


def balanced_assign(d, prefix):
    """Codes for one level given distances d [N, K]; items sharing a prefix [N, P] prefer distinct codes.

    Nearest code, except inside a prefix group whose items would collide: there items, closest first,
    take their nearest code not yet taken in the group (any code once all K are taken)."""
    codes = d.argmin(1)
    group = torch.unique(prefix, dim=0, return_inverse=True)[1] if prefix.shape[1] else torch.zeros_like(codes)
    order = torch.argsort(group, stable=True)  # items grouped by prefix, item index order within
    for items in torch.split(order, torch.bincount(group).tolist()):
        if len(items) < 2 or len(torch.unique(codes[items])) == len(items):
            continue
        sub = d[items]
        taken = torch.zeros(d.shape[1], dtype=torch.bool)
        for r in torch.argsort(sub.min(1).values, stable=True).tolist():
            if taken.all():
                taken[:] = False
            c = int(sub[r].masked_fill(taken, float("inf")).argmin())
            codes[items[r]], taken[c] = c, True
    return codes


def residual_codes(z, codebooks, balanced_last):
    """Nearest-codeword residual quantization. z [N, D], codebooks [L, K, D] -> codes [N, L]."""
    codes, resid = [], z
    for l, cb in enumerate(codebooks):
        d = sqdist(resid, cb)  # [N, K]
        last = l == len(codebooks) - 1
        c = balanced_assign(d, torch.stack(codes, 1) if codes else d.new_zeros(len(z), 0)) \
            if last and balanced_last else d.argmin(1)
        codes.append(c)
        resid = resid - cb[c]
    return torch.stack(codes, 1)


def rq_kmeans(emb, cfg, gen):
    """Residual k-means: k-means of the residuals, level by level. -> codebooks [levels, K, D]."""
    books, resid = [], emb
    for _ in range(cfg.levels):
        cent, assign = kmeans(resid, cfg.codebook_size, cfg.kmeans_iters, gen)
        books.append(cent)
        resid = resid - cent[assign]
    return torch.stack(books)


# ----------------------------------------------------------------------------- RQ-VAE (TIGER)

def mlp(dims):
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no activation on the output


class RQVAE(nn.Module):
    def __init__(self, in_dim, cfg):
        super().__init__()
        dims = [in_dim, *cfg.hidden, cfg.latent_dim]
        self.encoder, self.decoder = mlp(dims), mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, cfg.latent_dim))
        self.beta = cfg.beta

    def forward(self, x):
        """x [B, in_dim] -> (loss, codes [B, L], residuals [L, B, latent])."""
        z = self.encoder(x)  # [B, latent]
        resid, zq, codes, resids, qloss = z, 0, [], [], 0
        for cb in self.codebooks:  # [K, latent]
            c = sqdist(resid.detach(), cb.detach()).argmin(1)
            e = cb[c]  # [B, latent]
            # codebook loss moves the codeword to the residual; commitment moves the residual to the codeword
            qloss = qloss + ((e - resid.detach()) ** 2).sum(1).mean() \
                + self.beta * ((resid - e.detach()) ** 2).sum(1).mean()
            codes.append(c)
            resids.append(resid.detach())
            zq = zq + e.detach()
            resid = resid - e.detach()
        x_hat = self.decoder(z + (zq - z).detach())  # straight-through: decoder grads flow to the encoder
        loss = ((x_hat - x) ** 2).sum(1).mean() + qloss
        return loss, torch.stack(codes, 1), torch.stack(resids)


def train_rqvae(emb, cfg, gen):
    """Train TIGER's RQ-VAE on emb [N, D]. -> (encoder latents z [N, latent], codebooks [L, K, latent])."""
    n = len(emb)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = RQVAE(emb.shape[1], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, n)
    with torch.no_grad():  # codebooks seeded by k-means on the first batch's latents, level by level
        model.codebooks.copy_(rq_kmeans(model.encoder(emb[torch.randperm(n, generator=gen)[:bs]]), cfg, gen))
    bar = tqdm(range(cfg.epochs), desc=f"rqvae {n} items", file=sys.stderr, disable=None)   # None: off in a log file
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        epoch_codes, total = torch.empty(n, cfg.levels, dtype=torch.long), 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss, codes, resids = model(emb[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_codes[idx], total = codes, total + loss.item() * len(idx)
        h = sid_health(epoch_codes, cfg.codebook_size)
        bar.set_postfix(loss=f"{total / n:.4f}", util="/".join(f"{u:.2f}" for u in h["utilization"]),
                        collision_rate_nearest=f"{h['collision_rate']:.3f}")   # codes of this epoch
        if epoch < cfg.epochs - 1:  # dead codes (unused this epoch) re-seeded from the last batch's residuals
            with torch.no_grad():
                for l in range(cfg.levels):
                    dead = (torch.bincount(epoch_codes[:, l], minlength=cfg.codebook_size) == 0).nonzero()[:, 0]
                    pick = torch.randint(resids.shape[1], (len(dead),), generator=gen)
                    model.codebooks[l, dead] = resids[l, pick]
    model.eval()
    with torch.no_grad():
        return model.encoder(emb), model.codebooks.detach().clone()


# ----------------------------------------------------------------------------- unique SIDs, health

def add_collision_level(codes):
    """codes [N, L] -> [N, L + 1]: items sharing all L codes get 0..g-1 in item index order.

    When no two items collide the extra level would always be 0: it is left out ([N, L] is returned),
    since it would cost the model one token per item and tell it nothing.
    """
    n = len(codes)
    group = torch.unique(codes, dim=0, return_inverse=True)[1]  # [N]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group)
    start = torch.cumsum(counts, 0) - counts  # first position of each group in order
    extra = torch.empty(n, dtype=torch.long)
    extra[order] = torch.arange(n) - start[group[order]]
    sids = torch.cat([codes, extra[:, None]], 1) if extra.any() else codes
    assert len(torch.unique(sids, dim=0)) == n, "SIDs are not unique"
    return sids


def sid_health(codes, codebook_size, categories=None):
    """Codebook health of RQ codes [N, levels] (without the collision level)."""
    n = len(codes)
    util, perp = [], []
    for col in codes.T:
        p = torch.bincount(col, minlength=codebook_size).double() / n
        util.append((p > 0).sum().item() / codebook_size)
        perp.append(math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()))
    sizes = torch.unique(codes, dim=0, return_counts=True)[1]
    purity = None
    if categories is not None:  # P(same leaf category | same level-1 code) / P(same leaf category)
        def pairs(keys):
            return sum(c * (c - 1) // 2 for c in Counter(keys).values())
        first = codes[:, 0].tolist()
        same_code, same_cat = pairs(first), pairs(categories)
        same_both = pairs(zip(first, categories))
        if same_code and same_cat:
            purity = (same_both / same_code) / (same_cat / (n * (n - 1) // 2))
    return {"utilization": util, "perplexity": perp,
            "collision_rate": sizes[sizes > 1].sum().item() / n, "max_group": int(sizes.max()),
            "category_purity": purity}


def build_sids(texts, cfg, categories=None):
    """Item texts -> (SIDs LongTensor [N, levels + 1], health dict)."""
    cfg.validate()
    if categories is not None and len(categories) != len(texts):
        raise ValueError(f"build_sids: {len(categories)} categories for {len(texts)} items")
    t0, threads = time.time(), torch.get_num_threads()
    if cfg.method == "id":  # item i -> (i,): the decoder becomes an item-ID model (SASRec-style, full softmax)
        codes = torch.arange(len(texts))[:, None]
        health = sid_health(codes, len(texts), categories)
        return codes, {**health, "collision_rate_nearest": 0.0, "seconds": time.time() - t0}
    # Small ops gain little from threads, and on a busy CPU spinning threads slow them 10-100x.
    torch.set_num_threads(cfg.threads)
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        emb = embed_items(texts, cfg)  # [N, D]
        if cfg.method == "rqkmeans":
            z, books = emb, rq_kmeans(emb, cfg, gen)
        else:
            z, books = train_rqvae(emb, cfg, gen)
        codes = residual_codes(z, books, cfg.balanced_last)  # [N, levels]
        plain = codes if not cfg.balanced_last else residual_codes(z, books, False)
    finally:
        torch.set_num_threads(threads)
    health = sid_health(codes, cfg.codebook_size, categories)
    health["collision_rate_nearest"] = sid_health(plain, cfg.codebook_size)["collision_rate"]
    health["seconds"] = time.time() - t0
    return add_collision_level(codes), health


def save_sids(path, codes, settings, health):
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two runs building the same table don't collide
    torch.save({"codes": codes, "settings": settings, "health": health}, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def load_sids(path, num_items=None):
    """(codes [N, L], settings, health); with num_items, a table for another catalogue raises."""
    try:
        d = torch.load(path, weights_only=True)
        codes, settings, health = d["codes"], d["settings"], d["health"]
    except Exception as e:
        first_line = str(e).partition("\n")[0]
        raise ValueError(f"{path}: not a readable SID table ({type(e).__name__}: {first_line})") from None
    if num_items is not None and len(codes) != num_items:
        raise ValueError(f"{path}: the SID table has {len(codes)} items but the catalogue has {num_items} "
                         f"(a stale or foreign file; a cached one can be deleted to rebuild it)")
    return codes, settings, health


def main(argv):
    import data  # lazily: the library part of this file imports no project module but common
    sections = {"data": data.DataConfig, "sid": SIDConfig}
    parser = common.Parser(__doc__, sections, prog="sid.py")
    parser.add_argument("config", metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value")
    parser.add_argument("--out", default="", help="also save the table here (codes, sid settings, health)")
    args = parser.parse_intermixed_args(argv)
    cfgs = common.load_config(args.config, args.overrides, sections, ignore=("model", "eval", "train"))
    ds = data.load_dataset(cfgs["data"])
    codes, health = build_sids(ds.item_text, cfgs["sid"], [m["category"] for m in ds.item_meta])
    if args.out:
        save_sids(args.out, codes, asdict(cfgs["sid"]), health)
    print(json.dumps(health))


if __name__ == "__main__":
    common.run_cli(main, sys.argv[1:])
