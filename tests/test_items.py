"""One item schema: a record gives the same token ids in training as in encode / eval, byte for byte."""

from __future__ import annotations

import numpy as np
from helpers import write_jsonl
from PIL import Image

from unite_jax.data import media
from unite_jax.data.items import canonical_text, join_instruction, prepare_item, with_instruction
from unite_jax.data.pipeline import BatchSpec, build_train_iterator, default_data_config
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.eval.evaluate import evaluate
from unite_jax.eval.items import QUERY_KEYS, encode_inputs, read_items

INSTRUCTION = "  Find the digit that matches.  "
PROCESSOR = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
# A UNITE record with an instruction and whitespace around both texts, and an MMEB record with <|image_1|>.
TRAIN_RECORDS = [
    {"instruction": INSTRUCTION, "query": {"text": "  the red one \n", "image": "red.png"},
     "candidate": {"text": "red"}},
    {"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": "red.png", "pos_text": "red",
     "pos_image_path": ""},
]
EVAL_QUERIES = [  # the same two queries as an encode / eval file holds them
    ({"id": "q0", "text": "  the red one \n", "image": "red.png", "positives": ["c0"]}, INSTRUCTION),
    ({"id": "q1", "text": "<|image_1|>\nRepresent the given image.", "image": "red.png", "positives": ["c0"]}, None),
]


def _training_ids(tmp_path, tokenizer) -> list[np.ndarray]:
    """The query token ids of each record as the training pipeline packs them (left padding removed)."""
    data = default_data_config()
    data.train = write_jsonl(tmp_path / "train.jsonl", TRAIN_RECORDS)
    data.shuffle = False
    data.seq_len, data.patches_per_row, data.vision_block = 256, 256, 256
    spec = BatchSpec.from_config(data, num_chunks=1, local_shards=1, rows_per_shard=2, pad_id=tokenizer.pad_id,
                                 patch_dim=PROCESSOR.patch_dim)
    with build_train_iterator(data, spec, tokenizer, PROCESSOR, seed=0, process_index=0, process_count=1) as it:
        query = next(it).arrays["query"]
    return [ids[mask == 1] for ids, mask in zip(query["input_ids"][0], query["attention_mask"][0])]


def test_a_record_gives_the_same_token_ids_in_training_and_in_encode_eval(tmp_path, tiny_tokenizer_dir):
    Image.new("RGB", (60, 50), (210, 30, 30)).save(tmp_path / "red.png")
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    training = _training_ids(tmp_path, tokenizer)
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [{"id": "c0", "text": "red"}])

    def ids_of(items):
        return [prepare_item(item, i, tokenizer, PROCESSOR).input_ids for i, item in enumerate(items)]

    for k, (query, instruction) in enumerate(EVAL_QUERIES):
        queries = write_jsonl(tmp_path / f"queries{k}.jsonl", [query])
        # launch/encode.py: the items file and --instruction
        encoded = ids_of(encode_inputs(read_items(queries, extra_keys=QUERY_KEYS), instruction))
        # launch/eval.py and the trainer's evaluation: evaluate() hands encode_fn the items it encodes
        seen = []

        def encode_fn(items, seen=seen):
            seen.extend(ids_of(items))
            return np.eye(len(items), 4, dtype=np.float32)

        evaluate(encode_fn, queries, candidates, query_instruction=instruction)
        for ids in (encoded[0], seen[0]):
            assert ids.dtype == training[k].dtype and ids.tobytes() == training[k].tobytes(), k


def test_instruction_join_and_markers():
    assert join_instruction(" Find it. ", "  a cat ") == "Find it.\na cat"
    assert join_instruction("Find it.", "   ") == "Find it."
    assert join_instruction(None, " a cat ") == " a cat " and join_instruction("  ", "x") == "x"
    assert with_instruction({"id": "a", "image": "x.png"}, "Find it.") == {"id": "a", "image": "x.png",
                                                                           "text": "Find it."}
    assert canonical_text("<|image_1|> and <|image_12|>") == "<|IMAGE|> and <|IMAGE|>"
