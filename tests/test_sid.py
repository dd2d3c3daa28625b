import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sid  # noqa: E402

SMALL = dict(embed_dim=16, levels=2, codebook_size=8, hidden=[32, 16], latent_dim=8, epochs=3, batch_size=64,
             kmeans_iters=5)


def texts(n=120, seed=0):
    """A toy catalogue: 4 categories, each with its own words, plus brands and shared filler."""
    rng = random.Random(seed)
    cats = {"nail polish": ["lacquer", "shine", "coat"], "face cream": ["moisturizer", "spf", "skin"],
            "hair shampoo": ["curl", "scalp", "wash"], "perfume spray": ["scent", "floral", "musk"]}
    out, labels = [], []
    for i in range(n):
        cat = list(cats)[i % 4]
        words = rng.sample(cats[cat], 2) + rng.sample(["new", "best", "value", "pack", "mini", "set"], 2)
        out.append(f"{' '.join(words)} {cat}. Brand: brand{rng.randrange(6)}. Categories: Beauty, {cat}.")
        labels.append(cat)
    return out, labels


def file_cfg(tmp_path, emb, **kw):
    path = tmp_path / "emb.npy"
    np.save(path, np.asarray(emb, dtype=np.float32))
    return sid.SIDConfig(**{**SMALL, "encoder": f"file:{path}", **kw})


# ----------------------------------------------------------------------------- unique SIDs

def test_collision_level_hand_example():
    codes = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]])
    assert sid.add_collision_level(codes)[:, -1].tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_identical_items_get_unique_sids(tmp_path, method):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 6, generator=gen)
    emb[10:20] = emb[10]  # ten identical items: every quantizer gives them the same RQ codes
    cfg = file_cfg(tmp_path, emb, method=method, balanced_last=False)
    codes, health = sid.build_sids([""] * 40, cfg)
    assert codes.shape == (40, 3)
    assert len(torch.unique(codes, dim=0)) == 40
    assert (codes[10:20, :2] == codes[10, :2]).all()
    assert codes[10:20, 2].tolist() == list(range(10))  # collision code in item index order
    assert health["max_group"] >= 10 and health["collision_rate"] >= 10 / 40


def test_balanced_last_level_spreads_colliding_items(tmp_path):
    emb = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    emb[10:15] = emb[10]
    codes, health = sid.build_sids([""] * 40, file_cfg(tmp_path, emb, method="rqkmeans", balanced_last=True))
    assert len(torch.unique(codes[10:15, :2], dim=0)) == 5  # five free codes exist in their prefix group
    assert health["collision_rate"] < health["collision_rate_nearest"]
    assert len(torch.unique(codes, dim=0)) == 40


def test_balanced_assign_hand_example():
    d = torch.tensor([[0.0, 1.0, 5.0], [0.5, 2.0, 0.9], [3.0, 3.0, 3.0]])
    # items 0 and 1 share a prefix and both want code 0: the closer (item 0) keeps it, item 1 takes code 2
    assert sid.balanced_assign(d, torch.tensor([[7], [7], [8]])).tolist() == [0, 2, 0]


# ----------------------------------------------------------------------------- determinism, save/load

@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_same_seed_same_codes(method):
    t, _ = texts()
    cfg = sid.SIDConfig(**SMALL, method=method)
    a, _ = sid.build_sids(t, cfg)
    b, _ = sid.build_sids(t, cfg)
    assert torch.equal(a, b)
    c, _ = sid.build_sids(t, sid.SIDConfig(**SMALL, method=method, seed=1))
    assert not torch.equal(a, c)  # the seed is really used


def test_save_load_round_trip(tmp_path):
    t, cats = texts()
    cfg = sid.SIDConfig(**SMALL, method="rqkmeans")
    codes, health = sid.build_sids(t, cfg, cats)
    path = tmp_path / "sids.pt"
    sid.save_sids(path, codes, {"levels": cfg.levels, "hidden": cfg.hidden}, health)
    codes2, settings, health2 = sid.load_sids(path)
    assert torch.equal(codes, codes2) and codes2.dtype == torch.long
    assert settings == {"levels": 2, "hidden": [32, 16]} and health2 == health
    assert os.listdir(tmp_path) == ["sids.pt"]  # no temp file left behind


# ----------------------------------------------------------------------------- codebook health

def test_health_hand_example():
    codes = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 2], [1, 2], [1, 2]])
    h = sid.sid_health(codes, 4, ["a", "a", "b", "b", "b", "b"])
    assert h["utilization"] == [0.5, 0.75]
    assert h["perplexity"][0] == pytest.approx(2.0)
    assert h["perplexity"][1] == pytest.approx(math.exp(-sum(p * math.log(p) for p in (2 / 6, 1 / 6, 3 / 6))))
    assert h["collision_rate"] == pytest.approx(5 / 6) and h["max_group"] == 3
    # same level-1 code: 6 pairs, 4 of them same category; any two items: 7 of 15 pairs same category
    assert h["category_purity"] == pytest.approx((4 / 6) / (7 / 15))
    assert sid.sid_health(codes, 4)["category_purity"] is None


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_no_codebook_collapse_on_clustered_data(tmp_path, method):
    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    emb = (centers[:, None] + 0.02 * torch.randn(64, 12, 16, generator=gen)).reshape(-1, 16)  # 64 clusters
    cfg = file_cfg(tmp_path, emb, method=method, codebook_size=64, levels=2, epochs=5, batch_size=256,
                   hidden=[64, 32], latent_dim=16)
    _, health = sid.build_sids([""] * len(emb), cfg)
    assert health["utilization"][0] >= 0.8, health


def test_tfidf_embeddings_and_purity():
    t, cats = texts()
    emb = sid.embed_items(t, sid.SIDConfig(**SMALL))
    assert emb.shape == (120, 16) and torch.allclose(emb.norm(dim=1), torch.ones(120), atol=1e-5)
    _, health = sid.build_sids(t, sid.SIDConfig(**{**SMALL, "codebook_size": 4}, method="rqkmeans"), cats)
    assert health["category_purity"] > 2  # the category words dominate the first level


# ----------------------------------------------------------------------------- errors

def test_config_errors():
    with pytest.raises(ValueError, match="sid.encoder"):
        sid.SIDConfig(encoder="bert")
    with pytest.raises(ValueError, match="sid.levels must be > 0"):
        sid.SIDConfig(levels=0)
    with pytest.raises(ValueError, match="sid.method"):
        sid.SIDConfig(method="vq")


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is not None,
                    reason="sentence-transformers is installed")
def test_sentence_transformers_absent_is_clear():
    with pytest.raises(ImportError, match="pip install sentence-transformers"):
        sid.embed_items(["a"], sid.SIDConfig(encoder="sentence-transformers:all-MiniLM-L6-v2"))


def test_file_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        sid.embed_items(["a", "b"], sid.SIDConfig(encoder=f"file:{tmp_path}/missing.npy"))
    cfg = file_cfg(tmp_path, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"emb.npy has shape \(3, 4\), expected \(2, dim\)"):
        sid.embed_items(["a", "b"], cfg)


# ----------------------------------------------------------------------------- CLI

def test_main_prints_health_json(tmp_path):
    """`python sid.py CONFIG overrides --out=PATH` as a user runs it: the overrides reach the data and the SIDs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = ["data.num_users=300", "data.num_items=60", "sid.codebook_size=8", "sid.embed_dim=32",
                 "sid.hidden=[64]", "sid.latent_dim=8", "sid.epochs=5", "sid.batch_size=60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "sid.py", "configs/demo.yaml", *overrides, f"--out={tmp_path}/s.pt"],
                       cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    health = json.loads(r.stdout.strip().splitlines()[-1])
    reported = {"utilization", "perplexity", "collision_rate", "max_group", "category_purity", "seconds"}   # keys only
    assert reported <= set(health)
    codes, _, saved = sid.load_sids(tmp_path / "s.pt")
    assert codes.shape == (60, 3) and int(codes[:, :2].max()) < 8   # 60 items, 2 levels of 8 codes + collision
    assert len(health["utilization"]) == 2 and saved["max_group"] == health["max_group"]
    assert len({tuple(c) for c in codes.tolist()}) == 60
