"""`launch/encode.py` and `launch/eval.py` end to end on a tiny random model.

The happy paths run the scripts as subprocesses (the real command lines); error paths call the
programs' `main` in-process (same code, no JAX start-up per case) and one bad-input run goes
through a subprocess to check the real exit code. Answers that hold for ANY weights: identical
inputs give identical embeddings, so an item's twin is its exact top-1.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_jsonl
from PIL import Image

from unite_jax import Embedder
from unite_jax.cli import encode as encode_cli
from unite_jax.cli import eval as eval_cli
from unite_jax.demo.random_model import write_random_model

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOL = 1e-5  # batch composition differs between the CLI's shards and one encode call
ITEMS = [
    {"id": "t0", "text": "a photo of a cat sitting on a red sofa"},
    {"id": "t1", "text": "A dog runs across the green park"},
    {"id": "i0", "image": "img/shape.png"},
    {"id": "f0", "text": "<|IMAGE|> What is in the picture?", "image": "img/shape.png"},
    {"id": "t2", "text": "the digit seven moves left"},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    model_dir = write_random_model(str(root / "model"))
    (root / "data" / "img").mkdir(parents=True)
    pixels = np.full((70, 90, 3), 255, np.uint8)
    pixels[20:50, 30:60] = (200, 30, 30)
    Image.fromarray(pixels).save(root / "data" / "img" / "shape.png")
    write_jsonl(root / "data" / "items.jsonl", ITEMS)
    return {"root": root, "model": model_dir, "items": str(root / "data" / "items.jsonl")}


def _run(script, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *flags], capture_output=True,
                          text=True, timeout=300, check=False)


def _media_resolved(item, data_dir):
    out = {k: v for k, v in item.items() if k != "id"}
    if "image" in out:
        out["image"] = os.path.join(data_dir, out["image"])
    return out


@pytest.mark.slow  # runs the command line as a subprocess
def test_encode_cli_resumes_and_matches_embedder(workspace):
    output = str(workspace["root"] / "out" / "vectors.npy")
    flags = [f"--model={workspace['model']}", f"--input={workspace['items']}", f"--output={output}",
             "--shard_size=2", "--batch_size=4", "--instruction=Find the match."]
    first = _run("encode.py", *flags, "--max_shards=2")  # shards [0,2) [2,4) [4,5): stop after two
    assert first.returncode == 3, first.stderr
    assert "rerun to continue" in first.stderr and not os.path.exists(output)
    parts = output + ".parts"
    assert sorted(os.listdir(parts)) == ["manifest.json", "part-000000.npy", "part-000001.npy"]
    os.remove(os.path.join(parts, "part-000000.npy"))
    second = _run("encode.py", *flags)
    assert second.returncode == 0, second.stderr
    assert "shard 1 [2, 4): skipped" in second.stderr
    assert "shard 0 [0, 2): skipped" not in second.stderr and "shard 2 [4, 5): skipped" not in second.stderr
    assert "items/s" in second.stderr and not os.path.exists(parts)
    vectors = np.load(output)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 64)
    assert (workspace["root"] / "out" / "vectors.ids.txt").read_text() == "t0\nt1\ni0\nf0\nt2\n"
    # the reference: Embedder.encode on the same items with the instruction written out by hand
    data_dir = os.path.dirname(workspace["items"])
    items = [_media_resolved(item, data_dir) for item in ITEMS]
    for item in items:
        item["text"] = "Find the match.\n" + item["text"] if "text" in item else "Find the match."
    expected = Embedder.from_pretrained(workspace["model"]).encode(items, batch_size=4)
    np.testing.assert_allclose(vectors, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # runs the command line as a subprocess
def test_eval_cli_known_answers(workspace):
    root = workspace["root"]
    candidates = workspace["items"]
    # each query is a copy of candidate i; the last one names a different candidate as its positive
    queries = [dict(item, id=f"q_{item['id']}", positives=[item["id"]]) for item in ITEMS[:4]]
    queries[3]["positives"] = ["t0"]
    queries_path = write_jsonl(root / "data" / "queries.jsonl", queries)
    output = str(root / "results" / "full.json")
    cache = str(root / "cache")
    full = _run("eval.py", f"--model={workspace['model']}", f"--queries={queries_path}",
                f"--candidates={candidates}", f"--output={output}", f"--cache_dir={cache}", "--backend=numpy")
    assert full.returncode == 0, full.stderr
    result = json.loads(full.stdout)  # stdout is exactly one JSON object
    # q_f0's twin f0 is its top-1 but t0 is its positive; with 5 candidates recall@5 counts everything
    assert result == {"recall@1": 0.75, "recall@5": 1.0, "recall@10": 1.0, "num_queries": 4, "num_candidates": 5}
    with open(output) as f:
        assert json.load(f) == result
    assert "recall@1" in full.stderr and "75.00 %" in full.stderr  # the readable table

    # MMEB style: q_t1 is ranked among {t1, i0} with i0 as positive -> its twin t1 wins: a miss
    mmeb = [dict(item, id=f"q_{item['id']}", positives=[item["id"]], candidates=[item["id"], "t2"])
            for item in ITEMS[:4]]
    mmeb[1].update(positives=["i0"], candidates=["i0", "t1"])
    mmeb_path = write_jsonl(root / "data" / "mmeb.jsonl", mmeb)
    run = _run("eval.py", f"--model={workspace['model']}", f"--queries={mmeb_path}", f"--candidates={candidates}",
               f"--cache_dir={cache}")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"recall@1": 0.75, "recall@5": 1.0, "recall@10": 1.0, "precision@1": 0.75,
                                      "num_queries": 4, "num_candidates": 5}
    assert "candidates: 5 vectors from cache" in run.stderr  # same model, file and flags as the first run


def _swap_pad_tokens(model_dir, out_dir):
    """A copy of the model whose tokenizer has <|image_pad|> and <|video_pad|> ids swapped."""
    shutil.copytree(model_dir, out_dir)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        tokenizer = json.load(f)
    ids = {t: tokenizer["model"]["vocab"][t] for t in ("<|image_pad|>", "<|video_pad|>")}
    for token, other in (("<|image_pad|>", "<|video_pad|>"), ("<|video_pad|>", "<|image_pad|>")):
        tokenizer["model"]["vocab"][token] = ids[other]
    for entry in tokenizer["added_tokens"]:
        if entry["content"] in ids:
            entry["id"] = ids["<|video_pad|>" if entry["content"] == "<|image_pad|>" else "<|image_pad|>"]
    with open(path, "w") as f:
        json.dump(tokenizer, f)
    return out_dir


def test_cli_errors_are_one_line_with_exit_code_2(workspace, tmp_path, capsys):
    encode, evaluate = "encode", "eval"
    output = str(tmp_path / "o.npy")

    def fails(program, *flags):
        main = {"encode": encode_cli.main, "eval": eval_cli.main}[program]
        code = main(list(flags), prog=f"{program}.py")
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        return err

    items = workspace["items"]
    err = fails(encode, f"--model={tmp_path / 'nowhere'}", f"--input={items}", f"--output={output}")
    assert err.startswith("encode.py: error: model directory") and "does not exist" in err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(workspace["model"], incomplete)
    os.remove(incomplete / "model.safetensors")
    err = fails(encode, f"--model={incomplete}", f"--input={items}", f"--output={output}")
    assert "safetensors" in err
    (incomplete / "config.json").unlink()
    assert "no config.json" in fails(encode, f"--model={incomplete}", f"--input={items}", f"--output={output}")
    mismatched = _swap_pad_tokens(workspace["model"], str(tmp_path / "mismatched"))
    one_query = write_jsonl(tmp_path / "q.jsonl", [dict(ITEMS[0], positives=["t0"])])
    err = fails(evaluate, f"--model={mismatched}", f"--queries={one_query}",
                f"--candidates={items}")
    assert err.startswith("eval.py: error: ") and "tokenizer and model do not match" in err
    bad_positive = write_jsonl(tmp_path / "bad_q.jsonl", [dict(ITEMS[0], positives=["nope"])])
    err = fails(evaluate, f"--model={workspace['model']}", f"--queries={bad_positive}", f"--candidates={items}")
    assert "bad_q.jsonl:1: field 'positives': unknown candidate id(s) ['nope']" in err
    assert "ending in .npy" in fails(encode, f"--model={workspace['model']}", f"--input={items}",
                                     f"--output={tmp_path / 'o.bin'}")
    assert not os.path.exists(output) and not os.path.exists(output + ".parts")  # failed runs leave no trace


@pytest.mark.slow  # runs the command line as a subprocess
def test_encode_cli_bad_line_exits_2_naming_file_and_line(workspace, tmp_path):
    shutil.copytree(os.path.dirname(workspace["items"]), tmp_path / "data")
    path = tmp_path / "data" / "items.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-3]  # cut the closing of line 3's JSON object
    path.write_text("\n".join(lines) + "\n")
    run = _run("encode.py", f"--model={workspace['model']}", f"--input={path}", f"--output={tmp_path / 'o.npy'}")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"encode.py: error: {path}:3: invalid JSON"), run.stderr
