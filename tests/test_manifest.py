"""Manifest formats: UNITE JSON array / JSONL records, MMEB train records, the data.train string, bad records."""

import json
import os

import numpy as np
import pytest

from unite_jax.data.manifest import JsonArraySource, JsonlSource, open_manifest, parse_train_spec
from unite_jax.data.records import DataError, RecordError, modality_code, parse_record


@pytest.fixture()
def media_dir(tmp_path):
    """A directory with empty stand-in media files (parsing only checks that they exist)."""
    for name in ("a.jpg", "b.jpg", "c.png", "v1.mp4", "v2.mp4", "sub/d.jpg"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path


def _abs(root, *names):
    return [os.path.join(str(root), n) for n in names]


# (record, expected query, candidate, negative, target code)
RECORD_CASES = [
    ({"query": {"text": "a cat"}, "candidate": {"text": "a feline"}},
     {"text": "a cat", "image": None, "video": None}, {"text": "a feline", "image": None, "video": None}, None, 1),
    ({"query": {"text": "a cat"}, "candidate": {"image": "a.jpg"}},
     {"text": "a cat", "image": None, "video": None}, {"text": None, "image": ["a.jpg"], "video": None}, None, 2),
    ({"query": {"image": ["a.jpg", "sub/d.jpg"]}, "candidate": {"video": "v1.mp4"}},
     {"text": None, "image": ["a.jpg", "sub/d.jpg"], "video": None},
     {"text": None, "image": None, "video": ["v1.mp4"]}, None, 4),
    ({"query": {"text": "<|IMAGE|> changed to night"}, "candidate": {"text": "<|VIDEO|> at dusk", "video": ["v1.mp4"]}},
     {"text": "<|IMAGE|> changed to night", "image": None, "video": None}, None, None, 5),
    ({"query": {"text": "x", "image": ""}, "candidate": {"image": "b.jpg", "text": "a dog"},
      "negative": {"text": "not a dog"}},
     {"text": "x", "image": None, "video": None}, {"text": "a dog", "image": ["b.jpg"], "video": None},
     {"text": "not a dog", "image": None, "video": None}, 3),
    # target_modal given explicitly wins over what the candidate holds (here: only the image counts)
    ({"query": {"text": "x"}, "candidate": {"image": "b.jpg", "text": "a dog"}, "target_modal": "image"},
     None, None, None, 2),
    ({"query": {"text": "x"}, "candidate": {"video": ["v1.mp4", "v2.mp4"], "text": "t"},
      "target_modal": "video, text"}, None, {"text": "t", "image": None, "video": ["v1.mp4", "v2.mp4"]}, None, 5),
    ({"query": {"text": "x"}, "candidate": {"text": "y"}, "negative": {}}, None, None, None, 1),
]


@pytest.mark.parametrize("record,query,candidate,negative,target", RECORD_CASES)
def test_unite_records(media_dir, record, query, candidate, negative, target):
    example = parse_record(record, "m.json:3", str(media_dir))
    assert example.target_modal == target
    assert example.where == "m.json:3"
    for got, want in ((example.query, query), (example.candidate, candidate), (example.negative, negative)):
        if want is None:
            continue
        want = dict(want)
        for field in ("image", "video"):
            if want[field] is not None:
                want[field] = _abs(media_dir, *want[field])
        assert got == want
    if "negative" not in record or not record["negative"]:
        assert example.negative is None and example.negative_modal == 0
    else:
        assert example.negative_modal == 1


def test_instruction_is_prepended_to_the_query_text(media_dir):
    record = {"instruction": "Find the image that matches the caption. ",
              "query": {"text": "  a red bus  "}, "candidate": {"image": "a.jpg"}}
    example = parse_record(record, "w", str(media_dir))
    assert example.query["text"] == "Find the image that matches the caption.\na red bus"
    only = parse_record({"instruction": "Represent the image.", "query": {"image": "a.jpg"},
                         "candidate": {"text": "a cat"}}, "w", str(media_dir))
    assert only.query == {"text": "Represent the image.", "image": _abs(media_dir, "a.jpg"), "video": None}


def test_mmeb_records(media_dir):
    record = {"qry": "<|image_1|>\nRepresent the given image with the following question: What is it?",
              "qry_image_path": "a.jpg", "pos_text": "a cat", "pos_image_path": "", "neg_text": "",
              "neg_image_path": ""}
    example = parse_record(record, "mmeb.jsonl:1", str(media_dir))
    assert example.query == {"text": "<|IMAGE|>\nRepresent the given image with the following question: What is it?",
                             "image": _abs(media_dir, "a.jpg"), "video": None}
    assert example.candidate == {"text": "a cat", "image": None, "video": None}
    assert example.negative is None and example.target_modal == 1
    with_neg = parse_record({"qry": "Find a photo of a dog", "pos_text": "<|image_1|> Represent the image.",
                             "pos_image_path": "b.jpg", "neg_image_path": "c.png", "neg_text": "<|image_1|>"},
                            "w", str(media_dir))
    assert with_neg.candidate == {"text": "<|IMAGE|> Represent the image.", "image": _abs(media_dir, "b.jpg"),
                                  "video": None}
    assert with_neg.target_modal == 3  # text besides the placeholder + image
    assert with_neg.negative == {"text": "<|IMAGE|>", "image": _abs(media_dir, "c.png"), "video": None}
    assert with_neg.negative_modal == 2  # a lone placeholder is not text


def test_bad_records_name_kind_and_field(media_dir):
    root = str(media_dir)
    cases = [
        ([1, 2], "invalid record", "expected a JSON object, got list"),
        ({}, "empty record", "the record is {}"),
        ({"query": {"text": "x"}}, "invalid record", "missing 'candidate'"),
        ({"query": {"text": "  "}, "candidate": {"text": "y"}}, "empty record", "query: no text, image or video"),
        ({"query": "a cat", "candidate": {"text": "y"}}, "invalid record", "query: expected an object"),
        ({"query": {"text": "x", "audio": "a.wav"}, "candidate": {"text": "y"}}, "unknown modality",
         "query: unknown modality key(s) ['audio']"),
        ({"query": {"text": "x"}, "candidate": {"text": "y"}, "target_modal": "audio"}, "unknown modality",
         "target_modal: unknown modality 'audio'"),
        ({"query": {"text": "x"}, "candidate": {"image": "nope.jpg"}}, "missing file",
         f"candidate.image: {os.path.join(root, 'nope.jpg')} not found"),
        ({"query": {"text": 3}, "candidate": {"text": "y"}}, "invalid record", "query.text: expected a string"),
        ({"query": {"image": [1]}, "candidate": {"text": "y"}}, "invalid record", "query.image: expected a path"),
        ({"qry": "", "pos_text": "y"}, "empty record", "query (qry / qry_image_path): no text or image"),
    ]
    for record, kind, fragment in cases:
        with pytest.raises(RecordError) as info:
            parse_record(record, "w", root)
        assert info.value.kind == kind, record
        assert fragment in info.value.message, (record, info.value.message)


def test_broken_negative_is_deferred(media_dir):
    example = parse_record({"query": {"text": "x"}, "candidate": {"text": "y"}, "negative": {"image": "gone.jpg"}},
                           "w", str(media_dir))
    assert example.negative is None and example.negative_error.kind == "missing file"


def test_modality_codes():
    assert [modality_code(n) for n in ("text", "image", "video", "text,image", "image,text", "text, video")] == \
        [1, 2, 4, 3, 3, 5]
    assert modality_code(6) == 6
    for bad in ("txt", 0, 8, "text,", True):
        with pytest.raises(RecordError, match="modality|code"):
            modality_code(bad)


RECORDS = [
    {"query": {"text": "zero"}, "candidate": {"image": "a.jpg"}},
    {"query": {"text": "un caf\u00e9 \u2615"}, "candidate": {"text": "\u00fcml\u00e4ut"}, "target_modal": "text"},
    {"query": {"video": "v1.mp4"}, "candidate": {"text": "three"}},
]


def test_json_array_and_jsonl_give_the_same_examples(media_dir, tmp_path):
    array_path = tmp_path / "m.json"
    # pretty-printed with non-ASCII text: byte offsets differ from character offsets
    array_path.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    lines_path = tmp_path / "m.jsonl"
    lines_path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]) + "\n\n"
                          + json.dumps(RECORDS[2]), encoding="utf-8")  # a blank line, no final newline
    array, lines = open_manifest(str(array_path)), open_manifest(str(lines_path))
    assert isinstance(array, JsonArraySource) and isinstance(lines, JsonlSource)
    assert len(array) == 3 and len(lines) == 4
    assert lines.example(2) is None  # the blank line
    for k, j in ((0, 0), (1, 1), (2, 3)):
        a, b = array.example(k), lines.example(j)
        assert (a.query, a.candidate, a.target_modal) == (b.query, b.candidate, b.target_modal)
    # default media root: the manifest's own directory
    assert array.example(0).candidate["image"] == [os.path.join(str(tmp_path), "a.jpg")]
    # where: file:line for JSONL, file:line [element i] for arrays (lines counted by hand from indent=2)
    assert lines.example(3).where == f"{lines_path}:4"
    starts = [i + 1 for i, line in enumerate(array_path.read_text(encoding="utf-8").splitlines()) if line == "  {"]
    assert [array.where(k) for k in range(3)] == [f"{array_path}:{s} [element {k}]" for k, s in enumerate(starts)]
    assert array.example(1).query["text"] == "un caf\u00e9 \u2615"


def test_media_root_and_absolute_paths(media_dir, tmp_path):
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    manifest.parent.mkdir()
    absolute = os.path.join(str(media_dir), "b.jpg")
    manifest.write_text(json.dumps({"query": {"image": "a.jpg"}, "candidate": {"image": absolute}}) + "\n")
    example = open_manifest(str(manifest), media_root=str(media_dir)).example(0)
    assert example.query["image"] == [os.path.join(str(media_dir), "a.jpg")]
    assert example.candidate["image"] == [absolute]
    with pytest.raises(RecordError, match="missing file"):
        open_manifest(str(manifest)).example(0)  # relative to the manifest's directory: absent there


def test_jsonl_lines_are_read_on_demand(tmp_path):
    path = tmp_path / "big.jsonl"
    records = [{"query": {"text": f"q{i}"}, "candidate": {"text": f"c{i}"}} for i in range(1000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = open_manifest(str(path))
    assert len(source) == 1000
    assert source.line_starts.dtype == np.int64 and source.line_starts.shape == (1001,)
    assert source.example(737).query["text"] == "q737"
    # the index is all the source holds: a file rewritten in place (same sizes) shows the new text
    path.write_text(path.read_text().replace('"q737"', '"Q737"'))
    assert open_manifest(str(path)).example(737).query["text"] == "Q737"


def test_malformed_json_line_and_broken_array(tmp_path):
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"query": {"text": "ok"}, "candidate": {"text": "y"}}\n{"query": {"text": \n')
    source = open_manifest(str(lines))
    assert source.example(0).query["text"] == "ok"
    with pytest.raises(RecordError) as info:
        source.example(1)
    assert info.value.kind == "malformed json" and "column" in info.value.message
    array = tmp_path / "m.json"
    array.write_text('[\n  {"query": {"text": "a"}, "candidate": {"text": "b"}},\n  {"query": }\n]')
    # line 3 is `  {"query": }`: the value expected at column 13 (the `}`) is missing
    with pytest.raises(DataError, match=r"m\.json:3:13: malformed JSON array: Expecting value"):
        open_manifest(str(array))
    with pytest.raises(DataError, match="not found"):
        open_manifest(str(tmp_path / "absent.jsonl"))


def test_train_spec():
    assert parse_train_spec("a.json@2, b.jsonl ,tfds:my_ds/cfg:train@0.5") == [
        ("a.json", 2.0), ("b.jsonl", 1.0), ("tfds:my_ds/cfg:train", 0.5)]
    assert parse_train_spec("dir@home/m.jsonl") == [("dir@home/m.jsonl", 1.0)]
    with pytest.raises(DataError, match="weight must be positive"):
        parse_train_spec("a.json@0")
    with pytest.raises(DataError, match="data.train is empty"):
        parse_train_spec(" , ")
