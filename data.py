"""Data for PauseRec: user sequences, item texts and the leave-one-out split.

Reads the Amazon 2014 5-core files of one category (reviews: JSON lines; meta: Python-literal lines),
downloading them on request, checks the k-core, sorts each user's items by time (stable), and renders
the item text that SIDs are built from. A seeded synthetic catalogue with the same structure serves the
offline demo and the tests. Imports no project module but common (downloads).
"""

import ast
import gzip
import html
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import common


@dataclass
class DataConfig:
    source: str = "amazon"          # amazon | synthetic
    category: str = "Beauty"        # names reviews_<category>_5.json(.gz) and meta_<category>.json(.gz)
    dir: str = ""                   # folder holding the two files; used as is when they are there
    download: bool = False          # fetch missing files from the urls below into cache_dir
    cache_dir: str = "cache/data"   # relative to the current directory
    reviews_url: str = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_{category}_5.json.gz"
                                    #   where data.download fetches the reviews file ({category} filled in)
    meta_url: str = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_{category}.json.gz"
                                    #   where data.download fetches the meta file
    k_core: int = 5                 # every user and item must have >= k_core interactions (checked)
    filter_k_core: bool = False     # enforce it by iterative filtering instead of raising
    max_history: int = 20           # history cap (most recent items)
    sample_users: int = 0           # keep a fixed random sample of this many users (0: all), drawn from seed
                                    #   after the k-core check; the catalogue stays whole (cheap LLM runs)
    ties: str = "file"              # order of a user's items with the same timestamp (Amazon's are days):
                                    #   file (the standard protocol: file order) | shuffle (random, from seed)
    item_text: str = "{title}. Brand: {brand}. Categories: {categories}. Price: {price}."
                                    #   the text SIDs are built from; fields: title, brand, categories, price
    # synthetic catalogue
    num_users: int = 2000           # users of the synthetic catalogue
    num_items: int = 500            # items of the synthetic catalogue (a multiple of 10, >= 20)
    seed: int = 0                   # seed of the synthetic catalogue and of ties=shuffle


class Dataset(NamedTuple):
    item_ids: list[str]          # original id (asin) of item index i; item indices are 0..N-1
    user_ids: list[str]
    sequences: list[list[int]]   # per user, ALL item indices, chronological (stable sort), uncapped
    item_text: list[str]         # text for SIDs, rendered from the template, HTML unescaped
    item_meta: list[dict]        # title, brand, categories (paths), price, category (leaf of 1st path)


class Example(NamedTuple):
    user: int
    history: list[int]   # item indices, oldest first, at most max_history, never including target or later
    target: int


TEXT_FIELDS = ("title", "brand", "categories", "price")

def find_files(cfg: DataConfig) -> tuple[Path, Path]:
    """Paths of the reviews and meta files: in cfg.dir or cache_dir, else downloaded (if allowed)."""
    names = (f"reviews_{cfg.category}_5.json", f"meta_{cfg.category}.json")
    urls = (cfg.reviews_url, cfg.meta_url)
    folders = [Path(d) for d in (cfg.dir, cfg.cache_dir) if d]
    paths = []
    for name, url in zip(names, urls):
        found = [f / n for f in folders for n in (name + ".gz", name) if (f / n).is_file()]
        if found:
            paths.append(found[0])
            continue
        where = Path(cfg.dir or cfg.cache_dir)
        hint = (f"put {names[0]}.gz and {names[1]}.gz (or plain .json) in {where}, "
                f"or point data.dir= to a folder holding them")
        if not cfg.download:
            gone = f"data.dir={cfg.dir} does not exist: " if cfg.dir and not Path(cfg.dir).is_dir() else ""
            raise FileNotFoundError(f"{gone}{name}(.gz) not found in {', '.join(map(str, folders))}; {hint}, "
                                    f"or set data.download=true to fetch them into {cfg.cache_dir}")
        dest = Path(cfg.cache_dir) / (name + ".gz")
        try:
            paths.append(common.download(url.format(category=cfg.category), dest, desc=dest.name))
        except OSError as e:
            raise common.DownloadError(f"{e}. To fix: {hint}") from e
    return paths[0], paths[1]


# -----------------------------------------------------------------------------
# parsing


def read_lines(path):
    """Yield (line number, text) of a plain or gzipped file, skipping blank lines."""
    path = Path(path)
    opener = gzip.open if common.is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield i, line
    except (EOFError, OSError, UnicodeDecodeError) as e:  # truncated or corrupt gzip, bad bytes
        raise ValueError(f"{path}: truncated or corrupt file ({type(e).__name__}: {e}); "
                         f"delete it and fetch it again") from e


def read_reviews(path) -> list[tuple[str, str, int]]:
    """(user, item, unixReviewTime) per review, in file order."""
    rows = []
    for i, line in read_lines(path):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{Path(path).name}:{i}: malformed JSON ({e})") from None
        if not isinstance(r, dict) or any(k not in r for k in ("reviewerID", "asin", "unixReviewTime")):
            raise ValueError(f"{Path(path).name}:{i}: a review needs reviewerID, asin and unixReviewTime")
        rows.append((str(r["reviewerID"]), str(r["asin"]), int(r["unixReviewTime"])))
    if not rows:
        raise ValueError(f"{path}: no reviews (empty file)")
    return rows


_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def read_meta(path, wanted: set[str]) -> dict[str, dict]:
    """Stream the meta file and keep only the wanted asins (real files hold ~10^5-10^6 items)."""
    meta, seen_lines = {}, 0
    for i, line in read_lines(path):
        seen_lines += 1
        m = _ASIN.search(line)  # cheap pre-filter: skip literal_eval of items nobody reviewed
        if m and m.group(1) not in wanted:
            continue
        try:
            d = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"{Path(path).name}:{i}: malformed Python literal ({type(e).__name__})") \
                from None
        if not isinstance(d, dict) or "asin" not in d:
            raise ValueError(f"{Path(path).name}:{i}: a meta line must be a dict with an 'asin'")
        if d["asin"] in wanted and d["asin"] not in meta:
            meta[d["asin"]] = d
    if not seen_lines:
        raise ValueError(f"{path}: no items (empty file)")
    return meta


def unescape(s: str) -> str:
    """HTML entities, also double-escaped ones (a few titles hold '&amp;#39;')."""
    for _ in range(3):
        s, prev = html.unescape(s), s
        if s == prev:
            break
    return s


def item_info(d: dict) -> dict:
    """The item_meta dict of one raw meta record; missing optional fields become None / []."""
    text = lambda x: unescape(str(x)).strip() if x not in (None, "") else None  # noqa: E731
    cats = [[unescape(str(c)) for c in path] for path in (d.get("categories") or [])]
    try:
        price = float(d["price"]) if d.get("price") not in (None, "") else None
    except (TypeError, ValueError):
        price = None
    return {"title": text(d.get("title")), "brand": text(d.get("brand")), "categories": cats,
            "price": price, "category": cats[0][-1] if cats and cats[0] else ""}


def check_template(template: str):
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"data.item_text: bad template {template!r} ({e})") from None
    unknown = fields - set(TEXT_FIELDS)
    if unknown:
        raise ValueError(f"data.item_text: unknown field(s) {sorted(unknown)}; "
                         f"known: {', '.join(TEXT_FIELDS)}")


def render_text(template: str, info: dict) -> str:
    """Item text for SIDs: missing fields render as '' (no 'None'/'unknown' placeholders)."""
    price = info["price"]
    fields = {"title": info["title"] or "", "brand": info["brand"] or "",
              "categories": "; ".join(" > ".join(p) for p in info["categories"]),
              "price": f"{price:.2f}" if price is not None else ""}
    return template.format(**fields)


# -----------------------------------------------------------------------------
# k-core and the Amazon dataset


def k_core(rows: list[tuple], k: int, filter: bool) -> list[tuple]:
    """Check (or enforce, iteratively) >= k interactions per user and item."""
    while True:
        users, items = {}, {}
        for u, i, _ in rows:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        bad_u = {u for u, c in users.items() if c < k}
        bad_i = {i for i, c in items.items() if c < k}
        if not bad_u and not bad_i:
            return rows
        if not filter:
            raise ValueError(f"{len(bad_u)} users and {len(bad_i)} items have < {k} interactions "
                             f"(data.k_core={k}); set data.filter_k_core=true to filter them out")
        rows = [r for r in rows if r[0] not in bad_u and r[1] not in bad_i]
        if not rows:
            raise ValueError(f"no interactions left after {k}-core filtering (data.k_core={k})")


def load_amazon(cfg: DataConfig) -> Dataset:   # cfg checked by load_dataset (check_data_config)
    reviews_path, meta_path = find_files(cfg)
    reviews = read_reviews(reviews_path)
    try:
        rows = k_core(reviews, cfg.k_core, cfg.filter_k_core)
    except ValueError as e:   # name the file: not the 5-core file it should be, or data.k_core too high
        raise ValueError(f"{reviews_path.name}: {e}") from None
    # indices by order of first appearance in the reviews file (deterministic)
    item_index, user_index, per_user = {}, {}, []
    for u, a, t in rows:
        if u not in user_index:
            user_index[u] = len(user_index)
            per_user.append([])
        per_user[user_index[u]].append((t, item_index.setdefault(a, len(item_index))))
    item_ids = list(item_index)
    meta = read_meta(meta_path, set(item_ids))
    missing = [a for a in item_ids if a not in meta]
    if missing:
        raise ValueError(f"{meta_path.name}: {len(missing)} reviewed items have no meta line, "
                         f"e.g. {', '.join(missing[:5])}")
    item_meta = [item_info(meta[a]) for a in item_ids]
    return Dataset(item_ids, list(user_index), order_by_time(per_user, cfg.ties, cfg.seed),
                   [render_text(cfg.item_text, m) for m in item_meta], item_meta)


def order_by_time(per_user: list[list[tuple[int, int]]], ties: str, seed: int) -> list[list[int]]:
    """Per user [(time, item)] in file order -> items sorted by time. Same-time items keep their file order
    (ties=file: sorted() is stable) or take a random order drawn from seed (ties=shuffle: a random key per
    item breaks the ties; users are drawn in index order, so the order depends on the seed only)."""
    if ties == "file":
        return [[i for _, i in sorted(s, key=lambda x: x[0])] for s in per_user]
    rng = random.Random(seed)
    return [[i for _, _, i in sorted((t, rng.random(), i) for t, i in s)] for s in per_user]


# -----------------------------------------------------------------------------
# synthetic catalogue: every item is one brand's product of one type, and its title says both. A user keeps to
# one brand and buys its products in a fixed routine of types (cleanser, then toner, ...); now and then (noise)
# the product of the routine's type comes from another brand instead. So the next item is read from the whole
# history (the brand most of it holds, the type after the last one), not from the last item alone, and the
# item text carries both: SIDs learnt from it can share what one brand's users teach with the others.

PRODUCT_TYPES = ("cleanser", "toner", "serum", "essence", "moisturizer", "sunscreen", "mask", "exfoliator",
                 "eye cream", "lip balm")   # the routine's order; a user starts anywhere in it and wraps around
NOISE = 0.3                                 # chance that a purchase is a random brand's product of the type


def _word(rng: random.Random, used: set) -> str:
    while (w := "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))) in used:
        pass
    used.add(w)
    return w


def check_synthetic(cfg: DataConfig):
    n_types = len(PRODUCT_TYPES)
    if cfg.num_items < 2 * n_types or cfg.num_items % n_types or cfg.num_users < 1:
        raise ValueError(f"data.num_items must be a multiple of {n_types} (one product of each type per brand), "
                         f">= {2 * n_types}, and data.num_users >= 1; got {cfg.num_items} and {cfg.num_users}")


def load_synthetic(cfg: DataConfig) -> Dataset:   # cfg checked by load_dataset (check_data_config)
    n_types = len(PRODUCT_TYPES)
    rng, used = random.Random(cfg.seed), set()
    n_brands = cfg.num_items // n_types
    brands = [_word(rng, used).capitalize() for _ in range(n_brands)]
    lines = [_word(rng, used).capitalize() for _ in range(min(10, n_brands))]   # brand lines: a category level
    index = list(range(cfg.num_items))
    rng.shuffle(index)                                     # item indices carry no structure
    item_of = [[index[b * n_types + k] for k in range(n_types)] for b in range(n_brands)]   # [brand][type]
    prices = [float(rng.randrange(2, 60)) for _ in range(n_brands)]   # one price tier per brand
    item_meta = [None] * cfg.num_items
    for b in range(n_brands):
        for k, kind in enumerate(PRODUCT_TYPES):
            item_meta[item_of[b][k]] = {
                "title": f"{brands[b]} {kind}", "brand": brands[b], "price": prices[b],
                "categories": [["Synthetic", lines[b % len(lines)], kind.capitalize()]], "category": kind.capitalize()}
    weights = [1 / (b + 1) ** 0.5 for b in range(n_brands)]   # some brands have many more users than others
    sequences = []
    for _ in range(cfg.num_users):
        loyal = rng.choices(range(n_brands), weights)[0]
        first, n = rng.randrange(n_types), min(5 + int(rng.expovariate(1 / 3)), n_types)
        seq = []
        for j in range(n):  # n <= n_types: the routine never comes back to a type, so items never repeat
            brand = rng.randrange(n_brands) if rng.random() < NOISE else loyal
            seq.append(item_of[brand][(first + j) % n_types])
        sequences.append(seq)
    item_ids = [f"item{i:04d}" for i in range(cfg.num_items)]
    texts = [render_text(cfg.item_text, m) for m in item_meta]
    return Dataset(item_ids, [f"user{u:04d}" for u in range(cfg.num_users)], sequences, texts, item_meta)


def check_data_config(cfg: DataConfig):
    """The checks of the data settings that need no data (train.py runs them before anything else)."""
    for key in ("k_core", "max_history"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.sample_users < 0:
        raise ValueError(f"data.sample_users must be >= 0 (0: all users), got {cfg.sample_users}")
    if cfg.source not in ("amazon", "synthetic"):
        raise ValueError(f"data.source must be 'amazon' or 'synthetic', got {cfg.source!r}")
    if cfg.ties not in ("file", "shuffle"):
        raise ValueError(f"data.ties must be 'file' or 'shuffle', got {cfg.ties!r}")
    if cfg.ties == "shuffle" and cfg.source != "amazon":
        raise ValueError("data.ties=shuffle reorders same-timestamp items, but the synthetic catalogue has no "
                         "timestamps: use data.ties=file")
    check_template(cfg.item_text)
    if cfg.source == "synthetic":
        check_synthetic(cfg)


def load_dataset(cfg: DataConfig) -> Dataset:
    check_data_config(cfg)
    ds = load_amazon(cfg) if cfg.source == "amazon" else load_synthetic(cfg)
    return sample_users(ds, cfg.sample_users, cfg.seed) if cfg.sample_users else ds


def sample_users(ds: Dataset, n: int, seed: int) -> Dataset:
    """The dataset with a fixed random sample of n users (in their original order) and every item: SIDs,
    the trie and the baselines' candidate set stay those of the whole catalogue."""
    if n >= len(ds.user_ids):
        return ds
    keep = sorted(random.Random(seed).sample(range(len(ds.user_ids)), n))
    return ds._replace(user_ids=[ds.user_ids[u] for u in keep], sequences=[ds.sequences[u] for u in keep])


# -----------------------------------------------------------------------------
# leave-one-out split


def leave_one_out(sequences: list[list[int]], max_history: int) -> dict[str, list[Example]]:
    """Last item = test target, second last = valid target, items 1..n-3 = train targets."""
    if max_history < 1:
        raise ValueError(f"data.max_history must be >= 1, got {max_history}")
    split = {"train": [], "valid": [], "test": []}
    for u, s in enumerate(sequences):
        n = len(s)
        if n < 3:
            raise ValueError(f"user {u} has {n} items; leave-one-out needs >= 3 (check data.k_core)")
        for name, targets in (("train", range(1, n - 2)), ("valid", [n - 2]), ("test", [n - 1])):
            split[name].extend(Example(u, s[max(0, t - max_history):t], s[t]) for t in targets)
    return split


def train_part(sequences: list[list[int]], split: str) -> list[list[int]]:
    """What a baseline may train on before predicting `split`: test -> seq[:-1], valid -> seq[:-2]."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 1 if split == "test" else 2
    return [s[:-cut] for s in sequences]


def summary(ds: Dataset) -> dict:
    lengths = [len(s) for s in ds.sequences]
    return {"users": len(ds.user_ids), "items": len(ds.item_ids), "interactions": sum(lengths),
            "mean_length": round(sum(lengths) / max(1, len(lengths)), 2),
            "min_length": min(lengths, default=0), "max_length": max(lengths, default=0)}
