import gzip
import http.server
import json
import os
import random
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import data  # noqa: E402

# The real Beauty files, for the tests that need them: the folder PAUSEREC_BEAUTY_DIR names (skipped when unset;
# a folder named there that lacks the files is an error, not a skip)
BEAUTY = os.environ.get("PAUSEREC_BEAUTY_DIR", "")

# 6 users x 5 items over items A..E (a 5-core); u1's items share timestamps to test the stable sort
REVIEWS = [(f"u{u}", a, 100 + 10 * j) for u in range(6) for j, a in enumerate("ABCDE")]
REVIEWS = [(u, a, 500 if u == "u1" else t) for u, a, t in REVIEWS]
META = {
    "A": {"asin": "A", "title": "Nail &amp; Lip Kit &#39;Red&#39;", "brand": "OPI", "price": 12.0,
          "categories": [["Beauty", "Makeup", "Nails"], ["Beauty", "Gift Sets"]], "salesRank": {"Beauty": 3}},
    "B": {"asin": "B", "categories": [["Beauty", "Skin Care"]]},            # no title, brand, price
    "C": {"asin": "C", "title": "Cream", "brand": "Kirk&amp;#39;s", "categories": []},  # double-escaped
    "D": {"asin": "D", "title": "Soap", "price": 3.5, "categories": [["Beauty"]]},
    "E": {"asin": "E", "title": "Brush", "brand": "Real", "categories": [["Beauty", "Tools"]]},
    "Z": {"asin": "Z", "title": "never reviewed", "categories": []},
}


def review_lines(rows):
    return [json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "reviewTime": "x"})
            for u, a, t in rows]


def write(path: Path, lines, gz: bool):
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def make_dir(tmp_path, gz=True, reviews=REVIEWS, meta=META, reviews_lines=None, meta_lines=None):
    ext = ".json.gz" if gz else ".json"
    write(tmp_path / f"reviews_Test_5{ext}", reviews_lines or review_lines(reviews), gz)
    write(tmp_path / f"meta_Test{ext}", meta_lines or [repr(m) for m in meta.values()], gz)
    return data.DataConfig(category="Test", dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("gz", [True, False])
def test_load_both_formats(tmp_path, gz):
    ds = data.load_dataset(make_dir(tmp_path, gz))
    assert ds.item_ids == list("ABCDE")  # first appearance order, unreviewed Z dropped
    assert ds.user_ids == [f"u{u}" for u in range(6)]
    assert ds.sequences[0] == [0, 1, 2, 3, 4]
    assert data.summary(ds) == {"users": 6, "items": 5, "interactions": 30, "mean_length": 5.0,
                                "min_length": 5, "max_length": 5}


def test_meta_fields_text_and_unescape(tmp_path):
    ds = data.load_dataset(make_dir(tmp_path))
    a, b = ds.item_meta[0], ds.item_meta[1]
    assert a["title"] == "Nail & Lip Kit 'Red'" and a["brand"] == "OPI" and a["price"] == 12.0
    assert a["category"] == "Nails" and a["categories"][1] == ["Beauty", "Gift Sets"]
    assert b == {"title": None, "brand": None, "categories": [["Beauty", "Skin Care"]], "price": None,
                 "category": "Skin Care"}
    assert ds.item_meta[2]["category"] == "" and ds.item_meta[2]["brand"] == "Kirk's"
    assert ds.item_text[0] == ("Nail & Lip Kit 'Red'. Brand: OPI. "
                               "Categories: Beauty > Makeup > Nails; Beauty > Gift Sets. Price: 12.00.")
    assert ds.item_text[1] == ". Brand: . Categories: Beauty > Skin Care. Price: ."
    assert "None" not in " ".join(ds.item_text)


def test_item_text_template(tmp_path):
    cfg = make_dir(tmp_path)
    cfg.item_text = "{brand}|{title}"
    assert data.load_dataset(cfg).item_text[4] == "Real|Brush"
    cfg.item_text = "{title} {colour}"
    with pytest.raises(ValueError, match=r"data\.item_text.*colour"):
        data.load_dataset(cfg)


def test_stable_tie_order(tmp_path):
    # u1: all five reviews share one timestamp -> file order kept; u2: reversed times -> reversed order
    rows = [(u, a, (200 - 10 * "ABCDE".index(a)) if u == "u2" else t) for u, a, t in REVIEWS]
    ds = data.load_dataset(make_dir(tmp_path, reviews=rows))
    assert ds.sequences[1] == [0, 1, 2, 3, 4]
    assert ds.sequences[2] == [4, 3, 2, 1, 0]
    # ties in the middle: (C,100) (A,50) (B,100) (D,100) (E,10) -> E A C B D
    rows = [(u, a, t) for u, a, t in rows if u != "u3"] + [("u3", a, t) for a, t in
                                                           zip("CABDE", [100, 50, 100, 100, 10])]
    ds = data.load_dataset(make_dir(tmp_path, reviews=rows))
    assert [ds.item_ids[i] for i in ds.sequences[ds.user_ids.index("u3")]] == list("EACBD")


def test_ties_shuffle_reorders_only_same_time_runs(tmp_path):
    # 30 users x 8 items with times drawn from 3 days: long same-day runs; the file order is a random one
    r = random.Random(1)
    rows = [(f"u{u}", a, r.choice([100, 200, 300])) for u in range(30) for a in r.sample("ABCDEFGH", 8)]
    meta = {a: {"asin": a, "title": a, "categories": []} for a in "ABCDEFGH"}
    cfg = make_dir(tmp_path, reviews=rows, meta=meta)
    time_of = {(u, a): t for u, a, t in rows}
    file_order = data.load_dataset(cfg)
    runs = {}
    for seed in (0, 0, 1):
        cfg.ties, cfg.seed = "shuffle", seed
        ds = data.load_dataset(cfg)
        runs.setdefault(seed, []).append(ds.sequences)
        assert ds.item_ids == file_order.item_ids and ds.user_ids == file_order.user_ids
        for u, (new, old) in enumerate(zip(ds.sequences, file_order.sequences)):
            times = [time_of[(ds.user_ids[u], ds.item_ids[i])] for i in new]
            assert times == sorted(times)                                # still chronological
            assert sorted(new) == sorted(old)                            # the same items
            for t in set(times):                                         # the same items on each day
                assert {i for i in new if time_of[(ds.user_ids[u], ds.item_ids[i])] == t} == \
                       {i for i in old if time_of[(ds.user_ids[u], ds.item_ids[i])] == t}
    assert runs[0][0] == runs[0][1]                                      # deterministic for a seed
    assert runs[0][0] != runs[1][0] != file_order.sequences              # the seed and the option matter
    assert runs[0][0] != file_order.sequences


def test_ties_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="data.ties must be"):
        data.load_dataset(data.DataConfig(source="synthetic", ties="random"))
    with pytest.raises(ValueError, match="data.ties=shuffle.*synthetic"):
        data.load_dataset(data.DataConfig(source="synthetic", ties="shuffle"))


@pytest.mark.parametrize("gz", [True, False])
def test_malformed_review_line(tmp_path, gz):
    lines = review_lines(REVIEWS)
    lines[16] = '{"reviewerID": "u3", "asin": '
    with pytest.raises(ValueError, match=r"reviews_Test_5\.json(\.gz)?:17: malformed JSON"):
        data.load_dataset(make_dir(tmp_path, gz, reviews_lines=lines))
    lines[16] = json.dumps({"reviewerID": "u3", "asin": "B"})  # no unixReviewTime
    with pytest.raises(ValueError, match=r":17: a review needs"):
        data.load_dataset(make_dir(tmp_path, gz, reviews_lines=lines))


def test_malformed_meta_lines(tmp_path):
    lines = [repr(m) for m in META.values()]
    bad = lines[:2] + ["['not', 'a', 'dict']"] + lines[2:]
    with pytest.raises(ValueError, match=r"meta_Test\.json\.gz:3: a meta line must be a dict"):
        data.load_dataset(make_dir(tmp_path, meta_lines=bad))
    bad = lines[:1] + ["{'asin': 'B', 'title': __import__('os')}"] + lines[2:]
    with pytest.raises(ValueError, match=r"meta_Test\.json\.gz:2: malformed Python literal"):
        data.load_dataset(make_dir(tmp_path, meta_lines=bad))


def test_missing_meta_items(tmp_path):
    meta = {k: v for k, v in META.items() if k not in "BD"}
    with pytest.raises(ValueError, match=r"2 reviewed items have no meta line, e\.g\. B, D"):
        data.load_dataset(make_dir(tmp_path, meta=meta))


def test_empty_and_truncated_files(tmp_path):
    cfg = make_dir(tmp_path)
    (tmp_path / "reviews_Test_5.json.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match="empty file"):
        data.load_dataset(cfg)
    whole = gzip.compress("\n".join(review_lines(REVIEWS)).encode())
    (tmp_path / "reviews_Test_5.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"reviews_Test_5\.json\.gz: truncated or corrupt"):
        data.load_dataset(cfg)


def test_missing_files_error(tmp_path):
    cfg = data.DataConfig(category="Test", dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"reviews_Test_5\.json.*meta_Test\.json.*data\.dir=.*"
                                                r"data\.download=true"):
        data.load_dataset(cfg)


def test_k_core_check_and_filter(tmp_path):
    # u6 has 2 items; item F is reviewed only by u6 -> 1 user and 1 item violate the 5-core
    rows = REVIEWS + [("u6", "A", 1), ("u6", "F", 2)]
    meta = {**META, "F": {"asin": "F", "title": "F"}}
    cfg = make_dir(tmp_path, reviews=rows, meta=meta)
    with pytest.raises(ValueError, match=r"1 users and 1 items have < 5 .*data\.filter_k_core=true"):
        data.load_dataset(cfg)
    cfg.filter_k_core = True
    ds = data.load_dataset(cfg)
    assert ds.user_ids == [f"u{u}" for u in range(6)] and ds.item_ids == list("ABCDE")
    cfg.k_core = 7  # nobody has 7 items: filtering empties the dataset
    with pytest.raises(ValueError, match="no interactions left"):
        data.load_dataset(cfg)


def test_k_core_filter_is_iterative():
    # removing user x (2 items) leaves item B with 2 users < 3, which then removes more
    rows = [(u, i, 0) for u in "abc" for i in "ACD"] + [("x", "A", 0), ("x", "B", 0), ("a", "B", 0),
                                                        ("b", "B", 0)]
    kept = data.k_core(rows, 3, filter=True)
    assert {r[1] for r in kept} == set("ACD") and {r[0] for r in kept} == set("abc")


def test_leave_one_out_rules():
    seqs = [list(range(10, 35)), [1, 2, 3], [5, 6, 7, 8, 9]]
    split = data.leave_one_out(seqs, max_history=20)
    assert [len(split[k]) for k in ("train", "valid", "test")] == [22 + 0 + 2, 3, 3]
    for u, s in enumerate(seqs):
        train = [e for e in split["train"] if e.user == u]
        (valid,) = [e for e in split["valid"] if e.user == u]
        (test,) = [e for e in split["test"] if e.user == u]
        assert [e.target for e in train] == s[1:-2]
        assert valid.target == s[-2] and test.target == s[-1]
        assert valid.target not in {e.target for e in train} and test.target not in {e.target for e in train}
        for e in train + [valid, test]:
            t = s.index(e.target)
            assert e.history == s[max(0, t - 20):t]  # the most recent items before the target, no later
            assert e.target not in e.history and len(e.history) <= 20
    assert split["test"][0].history == list(range(14, 34))  # capped at 20
    assert data.leave_one_out(seqs, 2)["valid"][2].history == [6, 7]
    with pytest.raises(ValueError, match="user 0 has 2 items"):
        data.leave_one_out([[1, 2]], 20)


def test_train_part():
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert data.train_part(seqs, "test") == [[1, 2, 3, 4], [6, 7]]
    assert data.train_part(seqs, "valid") == [[1, 2, 3], [6]]
    with pytest.raises(ValueError):
        data.train_part(seqs, "train")


def test_synthetic_determinism_and_shape():
    cfg = data.DataConfig(source="synthetic")
    a = data.load_dataset(cfg)
    assert a == data.load_dataset(cfg)
    b = data.load_dataset(data.DataConfig(source="synthetic", seed=1))
    assert a.sequences != b.sequences
    assert len(a.user_ids) == 2000 and len(a.item_ids) == len(a.item_text) == len(a.item_meta) == 500
    assert a.item_ids[0] == "item0000" and a.user_ids[-1] == "user1999"
    assert all(5 <= len(s) <= 10 and len(set(s)) == len(s) for s in a.sequences)
    assert all(0 <= i < 500 for s in a.sequences for i in s)
    counts = [0] * 500
    for s in a.sequences:
        for i in s:
            counts[i] += 1
    assert sum(c >= 5 for c in counts) > 0.9 * 500
    # every item is one brand's product of one type, and its text names both
    m = a.item_meta
    assert len({x["category"] for x in m}) == 10 and len({x["brand"] for x in m}) == 50
    assert len({(x["brand"], x["category"]) for x in m}) == 500
    assert all(x["category"].lower() in t and x["brand"] in t for x, t in zip(m, a.item_text))
    split = data.leave_one_out(a.sequences, 20)
    assert len(split["test"]) == 2000
    with pytest.raises(ValueError, match="multiple of 10"):
        data.load_dataset(data.DataConfig(source="synthetic", num_items=55))


def test_synthetic_next_item_needs_the_whole_history():
    """The next item is the user's brand's product of the type after the last one: read from the history (the
    brand most of it holds), it is predicted far better than from the last item alone (Markov's top successor)."""
    ds = data.load_dataset(data.DataConfig(source="synthetic"))
    kind = {i: data.PRODUCT_TYPES.index(m["category"].lower()) for i, m in enumerate(ds.item_meta)}
    item = {(m["brand"], kind[i]): i for i, m in enumerate(ds.item_meta)}
    follow = {}
    for seq in ds.sequences:
        for a, b in zip(seq[:-2], seq[1:-1]):          # transitions without the test targets
            follow.setdefault(a, Counter())[b] += 1
    rule = markov = 0
    for seq in ds.sequences:
        history, target = seq[:-1], seq[-1]
        brand = Counter(ds.item_meta[i]["brand"] for i in history).most_common(1)[0][0]
        rule += item[(brand, (kind[history[-1]] + 1) % len(data.PRODUCT_TYPES))] == target
        markov += bool(follow.get(history[-1])) and follow[history[-1]].most_common(1)[0][0] == target
    assert rule / len(ds.sequences) > markov / len(ds.sequences) + 0.1


# ------------------------------------------------------------------------- download


class Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = Handler.body
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if self.path.startswith("/short") else 0)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_complete_and_used(tmp_path, server):
    (tmp_path / "src").mkdir()
    make_dir(tmp_path / "src")
    files = {n: (tmp_path / "src" / n).read_bytes() for n in ("reviews_Test_5.json.gz", "meta_Test.json.gz")}
    cache = tmp_path / "cache"
    Handler.body = files["reviews_Test_5.json.gz"]
    common.download(server + "/r.json.gz", cache / "reviews_Test_5.json.gz")
    assert (cache / "reviews_Test_5.json.gz").read_bytes() == files["reviews_Test_5.json.gz"]
    cfg = data.DataConfig(category="Test", cache_dir=str(cache), download=True,
                          meta_url=(tmp_path / "src").as_uri() + "/meta_{category}.json.gz")  # file://
    ds = data.load_dataset(cfg)
    assert len(ds.item_ids) == 5 and (cache / "meta_Test.json.gz").read_bytes() == files["meta_Test.json.gz"]
    assert sorted(p.name for p in cache.iterdir()) == ["meta_Test.json.gz", "reviews_Test_5.json.gz"]


@pytest.mark.parametrize("path,match", [("/short.json.gz", "IncompleteRead|closed early"),
                                        ("/corrupt.json.gz", "EOFError|BadGzipFile"),
                                        ("/missing", "404")])
def test_download_failure_leaves_nothing(tmp_path, server, path, match):
    whole = gzip.compress(b"x" * 10000)
    Handler.body = whole[: len(whole) // 2] if path.startswith("/corrupt") else whole
    cfg = data.DataConfig(category="Test", cache_dir=str(tmp_path / "cache"), download=True,
                          reviews_url=server + path, meta_url=server + path)
    with pytest.raises(OSError, match=f"({match}).*nothing was saved.*reviews_Test_5.*data\\.dir="):
        data.load_dataset(cfg)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_file_url_and_sha256(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    dest = common.download(src.as_uri(), tmp_path / "out" / "w.bin", desc="w")
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(OSError, match="sha256 mismatch"):
        common.download(src.as_uri(), tmp_path / "out2" / "w.bin", sha256="0" * 64)
    assert list((tmp_path / "out2").iterdir()) == []


# ------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def beauty():
    if not BEAUTY:
        pytest.skip("PAUSEREC_BEAUTY_DIR is not set (a folder with the Amazon Beauty files)")
    return data.load_dataset(data.DataConfig(dir=BEAUTY))


def test_real_beauty(beauty):
    ds = beauty
    s = data.summary(ds)
    assert (s["users"], s["items"], s["interactions"]) == (22363, 12101, 198502)
    assert s["min_length"] == 5 and s["max_length"] == 204
    assert all(len(set(q)) == len(q) for q in ds.sequences)
    assert ds.item_ids[0] == "B004756YJA" and ds.item_meta[0]["category"] == "Nail Polish"
    assert not any("&amp;" in t or "&#" in t for t in ds.item_text)
    split = data.leave_one_out(ds.sequences, 20)
    assert len(split["test"]) == len(split["valid"]) == 22363
    assert len(split["train"]) == 198502 - 3 * 22363


def test_real_beauty_tie_protocols(beauty):
    """ties=file reproduces the standard protocol's Markov exactly; ties=shuffle (same-day items in a seeded
    random order) takes most of its lead away, and changes no user's items."""
    import evaluate

    def markov(sequences):
        ranked = evaluate.baseline_rankings(sequences, "test", 10)["markov"]
        return evaluate.rank_metrics(ranked, torch.tensor([s[-1] for s in sequences]), (10,))
    standard = markov(beauty.sequences)
    assert round(standard["ndcg@10"], 4) == 0.0492 and round(standard["recall@10"], 4) == 0.0753
    shuffled = data.load_dataset(data.DataConfig(dir=BEAUTY, ties="shuffle"))
    assert [sorted(s) for s in shuffled.sequences] == [sorted(s) for s in beauty.sequences]
    shuffled = markov(shuffled.sequences)
    assert 0.033 < shuffled["ndcg@10"] < 0.036 and 0.057 < shuffled["recall@10"] < 0.061


def test_sample_users_keeps_a_fixed_subset_and_every_item():
    full = data.load_dataset(data.DataConfig(source="synthetic"))
    a = data.load_dataset(data.DataConfig(source="synthetic", sample_users=300))
    b = data.load_dataset(data.DataConfig(source="synthetic", sample_users=300))
    assert a == b and len(a.user_ids) == 300 and a.item_ids == full.item_ids
    index = {u: i for i, u in enumerate(full.user_ids)}
    assert [index[u] for u in a.user_ids] == sorted(index[u] for u in a.user_ids)   # original order kept
    assert all(full.sequences[index[u]] == s for u, s in zip(a.user_ids, a.sequences))
    assert data.load_dataset(data.DataConfig(source="synthetic", sample_users=10**6)) == full
    with pytest.raises(ValueError, match="data.sample_users"):
        data.load_dataset(data.DataConfig(source="synthetic", sample_users=-1))
