"""tfds: training sources, read through tfds.data_source (ArrayRecord) from a tiny builder prepared here."""

import io
import sys

import numpy as np
import pytest

# tensorflow-datasets is an optional extra of the library, but the test extra requires it: no skip here
import tensorflow_datasets as tfds
from helpers import PROMPT_HEAD as HEAD
from helpers import prompt_tail as tail
from PIL import Image

from unite_jax.data import media
from unite_jax.data.pipeline import BatchSpec, DataError, build_train_iterator, default_data_config
from unite_jax.data.tfds_source import TfdsSource, parse_tfds_entry
from unite_jax.model.pixels import normalize_stream

pytestmark = pytest.mark.slow  # prepares a tensorflow-datasets dataset

PROC = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
NUM_EXAMPLES = 6



def _pixels(i):
    return np.random.default_rng(i).integers(0, 255, (112, 112, 3), dtype=np.uint8)


def _jpeg(i):
    buffer = io.BytesIO()
    Image.fromarray(_pixels(100 + i)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class UniteTinyPairs(tfds.core.GeneratorBasedBuilder):
    """Question / caption pairs with an image given three ways: a path, raw pixels and JPEG bytes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "photo": tfds.features.Text(),
            "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "jpeg": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "modal": tfds.features.Text(),
            "hard": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(NUM_EXAMPLES):
            yield i, {"question": f"question {i}", "photo": "square.png", "pixels": _pixels(i), "jpeg": _jpeg(i),
                      "caption": f"a cat {i}", "modal": "text" if i % 2 else "", "hard": "" if i % 3 else "a dog"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    UniteTinyPairs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    media_root = tmp_path_factory.mktemp("tfds_media")
    Image.fromarray(_pixels(99)).save(media_root / "square.png")
    # the records as TFDS stores them (its own order), read independently of the code under test
    records = tfds.data_source("unite_tiny_pairs", split="train", data_dir=str(data_dir))
    return str(data_dir), str(media_root), [records[i] for i in range(len(records))]


def _batches(prepared, tokenizer, fields, count=1, rows=NUM_EXAMPLES, **overrides):
    data_dir, media_root, _ = prepared
    cfg = default_data_config()
    cfg.train = "tfds:unite_tiny_pairs:train"
    cfg.tfds_data_dir, cfg.media_root = data_dir, media_root
    cfg.seq_len, cfg.patches_per_row, cfg.vision_block, cfg.shuffle = 128, 64, 64, False
    for role, name in fields.items():
        cfg.tfds_fields[role] = name
    for key, value in overrides.items():
        cfg[key] = value
    spec = BatchSpec.from_config(cfg, num_chunks=1, local_shards=1, rows_per_shard=rows, pad_id=tokenizer.pad_id,
                                 patch_dim=PROC.patch_dim)
    with build_train_iterator(cfg, spec, tokenizer, PROC, seed=0, process_index=0, process_count=1) as it:
        return [next(it) for _ in range(count)]


def _patches(arrays, stream):
    """A stream's patches (uint8 levels in the batch) normalised as the train step does."""
    return np.asarray(normalize_stream(arrays[stream], media.normalize_table(PROC))["patches"])


def _record_index(where):
    assert where.startswith("tfds:unite_tiny_pairs:train[")
    return int(where[len("tfds:unite_tiny_pairs:train["):-1])


def test_pixels_and_hard_negatives(prepared, tokenizer, hf_tokenizer):
    hf = hf_tokenizer
    records = prepared[2]
    (batch,) = _batches(prepared, tokenizer, {"query_text": "question", "candidate_image": "pixels",
                                              "negative_text": "hard"}, hard_negatives=True)
    arrays = batch.arrays
    candidate_patches = _patches(arrays, "candidate")
    assert [_record_index(w) for w in batch.example_wheres] == list(range(NUM_EXAMPLES))
    for row, record in enumerate(records):
        query = HEAD + record["question"].decode() + tail("sentence")
        expected = hf(query, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(arrays["query"]["input_ids"][0, row, -len(expected):], expected)
        # one 112x112 image per row: 64 patches, in the row's own 64-patch tile
        patches, _ = media.preprocess_image(record["pixels"], PROC)
        np.testing.assert_array_equal(candidate_patches[0, 0, 64 * row:64 * (row + 1)], patches)
        has_negative = bool(record["hard"])
        assert arrays["negative_modality"][0, row] == (1 if has_negative else 0)
        if has_negative:
            negative = hf(HEAD + "a dog" + tail("sentence"), add_special_tokens=False)["input_ids"]
            np.testing.assert_array_equal(arrays["negative"]["input_ids"][0, row, -len(negative):], negative)
    np.testing.assert_array_equal(arrays["candidate_modality"], [[2] * NUM_EXAMPLES])
    assert "tensorflow" not in sys.modules  # ArrayRecord reading needs no TensorFlow


def test_paths_target_modal_and_encoded_bytes(prepared, tokenizer, hf_tokenizer):
    hf = hf_tokenizer
    _, media_root, records = prepared
    (batch,) = _batches(prepared, tokenizer, {"query_text": "question", "query_image": "photo",
                                              "candidate_text": "caption", "target_modal": "modal"})
    square = hf(HEAD + "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>", add_special_tokens=False)
    for row, record in enumerate(records):
        prompt = (HEAD + "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>" + record["question"].decode()
                  + tail("sentence and image"))
        expected = hf(prompt, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(batch.arrays["query"]["input_ids"][0, row, -len(expected):], expected)
        assert len(expected) > len(square["input_ids"])
    # 'text' where the record says so, inferred from the caption (text) where it is empty: 1 either way
    np.testing.assert_array_equal(batch.arrays["candidate_modality"], [[1] * NUM_EXAMPLES])
    photo, _ = media.preprocess_image(f"{media_root}/square.png", PROC)
    np.testing.assert_array_equal(_patches(batch.arrays, "query")[0, 0, :64], photo)

    (batch,) = _batches(prepared, tokenizer, {"query_text": "caption", "candidate_image": "jpeg"})
    for row, record in enumerate(records):
        decoded, _ = media.preprocess_image(Image.open(io.BytesIO(record["jpeg"])), PROC)
        np.testing.assert_array_equal(_patches(batch.arrays, "candidate")[0, 0, 64 * row:64 * (row + 1)], decoded)


def test_process_shards(prepared, tokenizer):
    seen = []
    for process in range(2):
        data_dir = prepared[0]
        cfg = default_data_config()
        cfg.train, cfg.tfds_data_dir, cfg.seq_len = "tfds:unite_tiny_pairs:train", data_dir, 64
        cfg.tfds_fields.query_text, cfg.tfds_fields.candidate_text = "question", "caption"
        spec = BatchSpec.from_config(cfg, num_chunks=1, local_shards=1, rows_per_shard=3, pad_id=tokenizer.pad_id,
                                     patch_dim=PROC.patch_dim)
        with build_train_iterator(cfg, spec, tokenizer, PROC, seed=1, process_index=process, process_count=2) as it:
            seen.append({_record_index(w) for w in next(it).example_wheres})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(NUM_EXAMPLES))


def test_field_mapping_errors(prepared):
    data_dir = prepared[0]
    with pytest.raises(DataError, match=r"no feature\(s\) \[\"candidate_text='captions'\"\]; its features: "):
        TfdsSource("tfds:unite_tiny_pairs:train", {"query_text": "question", "candidate_text": "captions"},
                   data_dir=data_dir)
    with pytest.raises(DataError, match="no candidate field mapped"):
        TfdsSource("tfds:unite_tiny_pairs:train", {"query_text": "question"}, data_dir=data_dir)
    with pytest.raises(DataError, match="unknown role"):
        TfdsSource("tfds:unite_tiny_pairs:train", {"query_txt": "question"}, data_dir=data_dir)
    with pytest.raises(DataError, match="cannot open with tfds.data_source"):
        TfdsSource("tfds:not_prepared_here:train", {"query_text": "q", "candidate_text": "c"}, data_dir=data_dir)
    assert parse_tfds_entry("tfds:my_ds/cfg:train[:90%]") == ("my_ds/cfg", "train[:90%]")
    assert parse_tfds_entry("tfds:my_ds:1.0.0:train") == ("my_ds:1.0.0", "train")
    with pytest.raises(DataError, match="expected tfds:NAME"):
        parse_tfds_entry("tfds:no_split")
