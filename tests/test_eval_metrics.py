"""Retrieval, metrics, items files, the embedding cache and resumable encoding (no model: fake encoders).

Expected rankings and metric values are worked out by hand in the comments; the random-data
checks compare against a brute-force float64 ranking written independently of the library.
"""

import json
import os
import sys
import zlib

import numpy as np
import pytest
from helpers import write_jsonl

from unite_jax.data.items import with_instruction
from unite_jax.eval import retrieval
from unite_jax.eval.evaluate import evaluate, format_table, load_task, score_task
from unite_jax.eval.items import ItemsError, read_items
from unite_jax.eval.metrics import one_to_one_pairs, precision_at_1, recall_at_k, reverse_positives
from unite_jax.eval.retrieval import top_k
from unite_jax.eval.store import EmbeddingCache, encode_to_file

# Integer vectors: every dot product below is exact, so ties are exact ties.
CANDIDATES = np.array([[1, 0], [0, 1], [1, 0], [3, 4], [4, 3]], np.float32)
QUERIES = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
# scores q0: [1, 0, 1, 3, 4] -> 4, 3, then c0/c2 tie (lower index first), then 1
# scores q1: [0, 1, 0, 4, 3] -> 3, 4, 1, then c0/c2 tie
# scores q2: [1, 1, 1, 7, 7] -> c3/c4 tie, then c0/c1/c2 tie
EXPECTED_ORDER = [[4, 3, 0, 2, 1], [3, 4, 1, 0, 2], [3, 4, 0, 1, 2]]
EXPECTED_SCORES = [[4, 3, 1, 1, 0], [4, 3, 1, 0, 0], [7, 7, 1, 1, 1]]


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_top_k_hand_case_breaks_ties_by_candidate_order(backend):
    indices, scores = top_k(QUERIES, CANDIDATES, 5, backend=backend)
    np.testing.assert_array_equal(indices, EXPECTED_ORDER)
    np.testing.assert_array_equal(scores, EXPECTED_SCORES)
    # more slots than candidates: padded with -1 / -inf
    indices, scores = top_k(QUERIES, CANDIDATES, 7, backend=backend)
    np.testing.assert_array_equal(indices[:, 5:], -1)
    assert np.isneginf(scores[:, 5:]).all()
    np.testing.assert_array_equal(top_k(QUERIES, CANDIDATES, 2, backend=backend)[0], [[4, 3], [3, 4], [3, 4]])


def test_top_k_subsets_rank_only_among_their_candidates():
    # q0 among {4, 1, 3}: scores c1=0, c3=3, c4=4 -> [4, 3, 1]
    # q1 among {2, 0}: both score 0 -> file order [0, 2], third slot empty
    # q2 among {1, 2, 0}: all score 1 -> [0, 1, 2] whatever order the subset was listed in
    indices, scores = top_k(QUERIES, CANDIDATES, 3, candidate_subsets=[[4, 1, 3], [2, 0], [1, 2, 0]])
    np.testing.assert_array_equal(indices, [[4, 3, 1], [0, 2, -1], [0, 1, 2]])
    np.testing.assert_array_equal(scores[:, :2], [[4, 3], [0, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"candidate_subsets\[1\]: repeated"):
        top_k(QUERIES, CANDIDATES, 3, candidate_subsets=[[0], [1, 1], [2]])
    with pytest.raises(ValueError, match=r"candidate_subsets\[0\]: indices must lie in \[0, 5\)"):
        top_k(QUERIES, CANDIDATES, 3, candidate_subsets=[[5], [1], [2]])


def test_metrics_hand_case_with_several_positives():
    ranked = np.array(EXPECTED_ORDER)
    # q0 positives {2, 1}: first hit at rank 4 (c2);  q1 {0}: rank 4;  q2 {3, 1}: rank 1
    positives = [[2, 1], [0], [3, 1]]
    assert recall_at_k(ranked, positives, ks=(1, 3, 4, 5)) == {
        "recall@1": pytest.approx(1 / 3), "recall@3": pytest.approx(1 / 3), "recall@4": 1.0, "recall@5": 1.0}
    assert precision_at_1(ranked, positives) == pytest.approx(1 / 3)
    # empty slots (-1) never count as hits
    assert recall_at_k(np.array([[0, -1], [-1, -1]]), [[1], [0]], ks=(2,)) == {"recall@2": 0.0}


def test_one_to_one_detection_and_reverse_ground_truth():
    assert one_to_one_pairs([[1], [0], [2]], 3)
    assert not one_to_one_pairs([[1], [1], [2]], 3)  # candidate 1 twice, candidate 0 never
    assert not one_to_one_pairs([[1, 0], [2]], 3)  # two positives
    assert not one_to_one_pairs([[0], [1]], 3)  # candidate 2 is nobody's
    assert reverse_positives([[1], [0], [2]], 3) == [[1], [0], [2]]


def test_score_task_symmetric_pairs_report_both_directions():
    # q0 -> c4 (top-1 hit), q1 -> c3 (hit), q2 -> c0 (rank 3); reverse: c0's query is q2 etc.
    candidates = CANDIDATES[[4, 3, 0]]  # c0' = [4,3], c1' = [3,4], c2' = [1,0]
    result = score_task(QUERIES, candidates, [[0], [1], [2]], ks=(1, 2, 3))
    # forward: q0 scores [4,3,1] -> c0' hit@1; q1 [3,4,0] -> c1' hit@1; q2 [7,7,1] -> c2' at rank 3
    assert result["recall@1"] == pytest.approx(2 / 3) and result["recall@2"] == pytest.approx(2 / 3)
    assert result["recall@3"] == 1.0
    # reverse (candidate -> query): c0'=[4,3] vs queries [4,3,7] -> q2 first, its query q0 at rank 2;
    # c1'=[3,4]: [3,4,7] -> q2, q1: rank 2;  c2'=[1,0]: [1,0,1] -> q0/q2 tie, q0 first, q2 at rank 2
    assert result["reverse_recall@1"] == 0.0 and result["reverse_recall@2"] == 1.0
    assert result["num_queries"] == 3 and result["num_candidates"] == 3
    assert "precision@1" not in result
    mmeb = score_task(QUERIES, candidates, [[0], [1], [2]], [np.array([0, 2]), np.array([1]), np.array([2, 0])],
                      ks=(1,))
    assert mmeb == {"recall@1": pytest.approx(2 / 3), "precision@1": pytest.approx(2 / 3), "num_queries": 3,
                    "num_candidates": 3}
    table = format_table(mmeb)
    assert "precision@1" in table and "66.67 %" in table


def _brute_force(queries, candidates, k):
    """Reference ranking: float64 scores from a plain elementwise sum, full lexsort (score desc, index asc)."""
    scores = (queries[:, None, :].astype(np.float64) * candidates[None].astype(np.float64)).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(candidates)), scores.shape), -scores), axis=-1)
    return order[:, :k]


def test_numpy_and_faiss_agree_on_random_data_with_duplicates(monkeypatch):
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((700, 48)).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    candidates[300:360] = candidates[7]  # 61 copies of one vector: more ties than faiss's first search width
    candidates[500:503] = candidates[11]
    queries = np.concatenate([candidates[[7, 11, 600]], rng.standard_normal((40, 48)).astype(np.float32)])
    queries[-1] = queries[-2]  # duplicate query
    for k in (1, 5, 10, 64):
        reference = _brute_force(queries, candidates, k)
        by_numpy, numpy_scores = top_k(queries, candidates, k, backend="numpy")
        by_faiss, faiss_scores = top_k(queries, candidates, k, backend="faiss")
        np.testing.assert_array_equal(by_numpy, reference)
        np.testing.assert_array_equal(by_faiss, by_numpy)
        np.testing.assert_array_equal(faiss_scores, numpy_scores)
    assert list(by_numpy[0, :61]) == [7] + list(range(300, 360)) and list(by_numpy[1, :4]) == [11, 500, 501, 502]
    # tiny score blocks (one query per chunk) and "auto" switching to faiss change nothing
    monkeypatch.setattr(retrieval, "SCORE_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(retrieval, "FAISS_MIN_CANDIDATES", 10)
    expected = _brute_force(queries, candidates, 10)
    np.testing.assert_array_equal(top_k(queries, candidates, 10, backend="numpy")[0], expected)
    np.testing.assert_array_equal(top_k(queries, candidates, 10, backend="auto")[0], expected)


@pytest.mark.parametrize("subsets", [False, True])
def test_shortlist_tolerates_worst_case_float32_rounding(monkeypatch, subsets):
    """Near-ties closer than float32 rounding: stage-1 scores perturbed by up to the error bound
    (gamma_D |q| |c|, as an adversarial BLAS might round) must not change the exact ranking."""
    rng = np.random.default_rng(1)
    dim = 48
    base = rng.standard_normal(dim)
    base /= np.linalg.norm(base)
    candidates = (base + 1e-6 * rng.standard_normal((200, dim))).astype(np.float32)
    queries = (base + 1e-6 * rng.standard_normal((5, dim))).astype(np.float32)
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    exact = retrieval._shortlist_scores

    def adversarial(q, c):
        bound = gamma * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(c, axis=1)[None]
        return (exact(q, c) + bound * rng.uniform(-1, 1, (len(q), len(c)))).astype(np.float32)

    monkeypatch.setattr(retrieval, "_shortlist_scores", adversarial)
    reference = _brute_force(queries, candidates, 10)
    if subsets:
        got, _ = top_k(queries, candidates, 10, candidate_subsets=[np.arange(200)] * len(queries))
    else:
        got, _ = top_k(queries, candidates, 10, backend="numpy")
    np.testing.assert_array_equal(got, reference)


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[faiss\]"'):
        top_k(QUERIES, CANDIDATES, 2, backend="faiss")
    retrieval_auto, _ = top_k(QUERIES, CANDIDATES, 5, backend="auto")  # auto falls back to numpy
    np.testing.assert_array_equal(retrieval_auto, EXPECTED_ORDER)


def test_top_k_rejects_bad_vectors():
    with pytest.raises(ValueError, match="query_vectors: row 1 holds NaN"):
        top_k(np.array([[1, 0], [np.nan, 0]], np.float32), CANDIDATES, 1)
    with pytest.raises(ValueError, match="dimension 3 but candidate_vectors 2"):
        top_k(np.ones((1, 3), np.float32), CANDIDATES, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        top_k(QUERIES, CANDIDATES, 1, backend="annoy")


# ----------------------------------------------------------------------------- items files
def test_read_items_resolves_media_and_skips_blank_lines(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    path = write_jsonl(tmp_path / "items.jsonl", [
        '{"id": "a", "text": "hello"}', "", '{"id": "b", "image": "img/a.png", "text": "<|IMAGE|> hi"}',
        '{"id": "c", "video": ["v.mp4", "v.mp4"]}'])
    items = read_items(path)
    assert items == [{"id": "a", "text": "hello"},
                     {"id": "b", "text": "<|IMAGE|> hi", "image": str(tmp_path / "img" / "a.png")},
                     {"id": "c", "video": [str(tmp_path / "v.mp4")] * 2}]
    assert with_instruction(items[0], "Find it.")["text"] == "Find it.\nhello"
    assert with_instruction(items[2], "Find it.")["text"] == "Find it."
    assert with_instruction(items[0], None) is items[0]


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "text": ', r"items\.jsonl:3: invalid JSON"),
    ('["b"]', r"items\.jsonl:3: expected a JSON object, got list"),
    ('{"text": "b"}', r"items\.jsonl:3: missing field 'id'"),
    ('{"id": 7, "text": "b"}', r"items\.jsonl:3: field 'id': expected a non-empty string, got 7"),
    ('{"id": "a", "text": "b"}', r"items\.jsonl:3: field 'id': duplicate id 'a' \(first used on line 1\)"),
    ('{"id": "b", "caption": "b"}', r"items\.jsonl:3: unknown key\(s\) \['caption'\]"),
    ('{"id": "b", "text": 3}', r"items\.jsonl:3: field 'text': expected a string, got int"),
    ('{"id": "b", "image": 3}', r"items\.jsonl:3: field 'image': expected a path"),
    ('{"id": "b", "image": "nope.png"}', r"items\.jsonl:3: field 'image': file 'nope\.png' not found"),
    ('{"id": "b", "text": "  "}', r"items\.jsonl:3: item 'b' is empty"),
    ('{"id": "b", "text": "x", "positives": ["a"]}', r"items\.jsonl:3: unknown key\(s\) \['positives'\]"),
])
def test_read_items_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "items.jsonl", ['{"id": "a", "text": "first"}', "", line])
    with pytest.raises(ItemsError, match=message):
        read_items(path)


def test_read_items_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: items file does not exist"):
        read_items(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ItemsError, match="no items"):
        read_items(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_load_task_checks_ids_against_candidates(tmp_path):
    candidates = write_jsonl(tmp_path / "c.jsonl", ['{"id": "c0", "text": "x"}', '{"id": "c1", "text": "y"}'])

    def queries(*lines):
        return write_jsonl(tmp_path / "q.jsonl", lines)

    task = load_task(queries('{"id": "q0", "text": "x", "positives": ["c1", "c0"]}'), candidates)
    assert [list(p) for p in task.positives] == [[1, 0]] and task.subsets is None
    with pytest.raises(ItemsError, match=r"q\.jsonl:2: field 'positives': unknown candidate id\(s\) \['c9'\]"):
        load_task(queries('{"id": "q0", "text": "x", "positives": ["c0"]}',
                          '{"id": "q1", "text": "x", "positives": ["c9"]}'), candidates)
    with pytest.raises(ItemsError, match=r"q\.jsonl:1: missing field 'positives'"):
        load_task(queries('{"id": "q0", "text": "x"}'), candidates)
    with pytest.raises(ItemsError, match=r"q\.jsonl:1: field 'positives': expected a non-empty list"):
        load_task(queries('{"id": "q0", "text": "x", "positives": "c0"}'), candidates)
    with pytest.raises(ItemsError, match=r"q\.jsonl:2: field 'candidates': either every query"):
        load_task(queries('{"id": "q0", "text": "x", "positives": ["c0"], "candidates": ["c0"]}',
                          '{"id": "q1", "text": "x", "positives": ["c0"]}'), candidates)
    with pytest.raises(ItemsError, match=r"q\.jsonl:1: field 'positives': \['c1'\] not among"):
        load_task(queries('{"id": "q0", "text": "x", "positives": ["c1"], "candidates": ["c0"]}'), candidates)


# ----------------------------------------------------------------------------- evaluate with a fake encoder
def _vector(text: str, dim: int = 16) -> np.ndarray:
    """A fixed random unit vector per text (the same text always gives the same vector)."""
    v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Encodes an item by its text only (media ignored); records what it was asked to encode."""

    def __init__(self):
        self.seen = []

    def __call__(self, items):
        self.seen.append([dict(item) for item in items])
        return np.stack([_vector(item.get("text", "")) for item in items])


def _eval_files(tmp_path):
    texts = ["red", "green", "blue", "cyan"]
    candidates = write_jsonl(tmp_path / "c.jsonl", [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)])
    # q0..q2 are copies of c0..c2 (their own twin is the exact top-1); q3 copies c3 but names c0 as positive
    queries = write_jsonl(tmp_path / "q.jsonl", [
        json.dumps({"id": f"q{i}", "text": t, "positives": [f"c{i if i < 3 else 0}"]}) for i, t in enumerate(texts)])
    return queries, candidates


def test_evaluate_known_answers_with_a_fake_encoder(tmp_path):
    queries, candidates = _eval_files(tmp_path)
    encoder = FakeEncoder()
    result = evaluate(encoder, queries, candidates, batch_size=3)
    # q3's twin c3 outranks c0 (score 1 vs < 1); c0 is within the 4 candidates, so recall@5 counts it
    assert result["recall@1"] == 0.75 and result["recall@5"] == 1.0 and result["recall@10"] == 1.0
    assert "reverse_recall@1" not in result  # c0 is two queries' positive: not one to one
    assert [len(call) for call in encoder.seen] == [3, 1, 3, 1]  # batch_size items per call, each file once
    assert encoder.seen[0][0] == {"text": "red"}  # only model inputs reach the encoder
    # a query instruction changes the query text the encoder sees (not the candidates'), and the result
    encoder = FakeEncoder()
    result = evaluate(encoder, queries, candidates, query_instruction="Find the color.")
    assert encoder.seen[0][0] == {"text": "Find the color.\nred"} and encoder.seen[1][0] == {"text": "red"}
    assert result["num_queries"] == 4


def test_evaluate_symmetric_files_report_reverse_recall(tmp_path):
    texts = ["red", "green", "blue"]
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"id": t, "text": t}) for t in texts])
    queries = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"id": "q" + t, "text": t, "positives": [t]})
                                                  for t in texts])
    result = evaluate(FakeEncoder(), queries, path, ks=(1, 2))
    assert result == {"recall@1": 1.0, "recall@2": 1.0, "reverse_recall@1": 1.0, "reverse_recall@2": 1.0,
                      "num_queries": 3, "num_candidates": 3}


def test_evaluate_cache_hits_and_rewrites_corrupted_files(tmp_path):
    queries, candidates = _eval_files(tmp_path)
    cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="cache_dir needs a model_key"):
        evaluate(FakeEncoder(), queries, candidates, cache_dir=cache_dir)
    first = FakeEncoder()
    expected = evaluate(first, queries, candidates, cache_dir=cache_dir, model_key="m1")
    files = sorted(os.listdir(cache_dir))
    assert len(first.seen) == 2 and len(files) == 2
    again = FakeEncoder()
    assert evaluate(again, queries, candidates, cache_dir=cache_dir, model_key="m1") == expected
    assert again.seen == []  # everything from the cache
    other_model = FakeEncoder()
    evaluate(other_model, queries, candidates, cache_dir=cache_dir, model_key="m2")
    assert len(other_model.seen) == 2  # a different model key misses
    # a truncated cache file is ignored, re-encoded and rewritten
    broken = os.path.join(cache_dir, files[0])
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) - 8)
    repaired = FakeEncoder()
    assert evaluate(repaired, queries, candidates, cache_dir=cache_dir, model_key="m1") == expected
    assert len(repaired.seen) == 1
    assert EmbeddingCache(cache_dir).load(files[0][:-4], 4) is not None
    # editing the queries file changes its key: re-encoded
    with open(queries, "a") as f:
        f.write(json.dumps({"id": "q9", "text": "red", "positives": ["c0"]}) + "\n")
    edited = FakeEncoder()
    evaluate(edited, queries, candidates, cache_dir=cache_dir, model_key="m1")
    assert [len(call) for call in edited.seen] == [5]


def test_evaluate_rejects_bad_encoder_output(tmp_path):
    queries, candidates = _eval_files(tmp_path)

    def nan_encoder(items):
        out = np.stack([_vector(item["text"]) for item in items])
        out[1] = np.nan
        return out

    with pytest.raises(ValueError, match=r"NaN or infinite values for item 1 \(.*q\.jsonl:2\)"):
        evaluate(nan_encoder, queries, candidates)
    with pytest.raises(ValueError, match=r"encode_fn returned float32 \(3, 16\) for 4 items"):
        evaluate(lambda items: np.stack([_vector("x")] * 3), queries, candidates)


# ----------------------------------------------------------------------------- resumable encoding
def test_encode_to_file_resumes_skipping_finished_shards(tmp_path, capsys):
    items = [{"text": f"item {i}"} for i in range(7)]
    ids = [f"id{i}" for i in range(7)]
    expected = np.stack([_vector(item["text"]) for item in items])
    output = str(tmp_path / "out.npy")
    encoder = FakeEncoder()
    # shards of 2: [0,2) [2,4) [4,6) [6,7); stop after 3 new shards, as if the job had been killed
    assert not encode_to_file(encoder, items, ids, output, key="k", shard_size=2, chunk_size=1, max_shards=3,
                              show_progress=False)
    parts = tmp_path / "out.npy.parts"
    assert sorted(os.listdir(parts)) == ["manifest.json", "part-000000.npy", "part-000001.npy", "part-000002.npy"]
    assert not os.path.exists(output)
    os.remove(parts / "part-000001.npy")  # one finished shard lost
    (parts / "part-000002.npy").write_bytes(b"\x93NUMPY garbage")  # one shard half written
    capsys.readouterr()
    encoder = FakeEncoder()
    assert encode_to_file(encoder, items, ids, output, key="k", shard_size=2, chunk_size=2, show_progress=False)
    log = capsys.readouterr().err
    assert "shard 0 [0, 2): skipped" in log
    assert "shard 1 [2, 4): skipped" not in log and "shard 2 [4, 6): " in log and "unreadable" in log
    assert [[item["text"] for item in call] for call in encoder.seen] == [
        ["item 2", "item 3"], ["item 4", "item 5"], ["item 6"]]
    got = np.load(output)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "out.ids.txt").read_text().splitlines() == ids
    assert not parts.exists()


def test_encode_to_file_starts_over_when_the_run_changed(tmp_path, capsys):
    items = [{"text": f"item {i}"} for i in range(4)]
    output = str(tmp_path / "out.npy")
    encode_to_file(FakeEncoder(), items, list("abcd"), output, key="old", shard_size=2, max_shards=1,
                   show_progress=False)
    encoder = FakeEncoder()
    encode_to_file(encoder, items, list("abcd"), output, key="new", shard_size=2, show_progress=False)
    assert "starting over" in capsys.readouterr().err
    assert sum(len(call) for call in encoder.seen) == 4  # nothing reused from the other run
    with pytest.raises(ValueError, match="ending in .npy"):
        encode_to_file(encoder, items, list("abcd"), str(tmp_path / "out.bin"), key="k")
