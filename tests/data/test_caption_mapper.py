"""ImageCaptionMapper on real photos from each file format: the output contract (uint8 RGB S x S
image, int64 max-length tokens), the evaluation items, and bad images (error at test time,
counted skip in training)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from caption_files import PHOTOS, arrow_rows, write_arrow, write_jsonl
from conftest import GPT2_DIR, tiny_cfg
from fiber_det.data.caption_mapper import ImageCaptionMapper
from fiber_det.data.caption_transforms import build_caption_transform
from fiber_det.data.datasets.caption_pairs import load_caption_arrow, load_caption_jsonl, retrieval_items

S, L = 48, 12


@pytest.fixture
def mapper(gpt2):
    return make_mapper(gpt2, is_train=False)


def make_mapper(tokenizer, is_train, name="albef"):
    return ImageCaptionMapper(is_train, transform=build_caption_transform(name, S), image_size=S,
                              tokenizer=tokenizer, max_length=L)


def _resized(name):
    with Image.open(PHOTOS / f"{name}.jpg") as img:
        return torch.from_numpy(np.array(img.convert("RGB").resize((S, S), Image.BICUBIC))).permute(2, 0, 1)


def test_pair_from_jsonl(tmp_path, mapper, gpt2):
    pairs = load_caption_jsonl(str(write_jsonl(tmp_path)), None, "test")
    out = mapper(pairs[0])
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, S, S)
    assert torch.equal(out["image"], _resized("astronaut"))  # RGB order, PIL bicubic, aspect not kept
    assert out["height"] == out["width"] == S
    for key in ("input_ids", "attention_mask", "special_tokens_mask"):
        assert out[key].dtype == torch.int64 and out[key].shape == (L,)
    n = int(out["attention_mask"].sum())
    assert gpt2.decode(out["input_ids"][:n]) == "<s>An astronaut in an orange suit.</s>"
    assert (out["input_ids"][n:] == gpt2.pad_token_id).all()
    assert out["special_tokens_mask"].tolist() == [1] + [0] * (n - 2) + [1] * (L - n + 1)
    assert (out["image_index"], out["caption_index"], out["caption"]) == (0, 0, "An astronaut in an orange suit.")
    assert out["image_id"] == "images/astronaut.jpg" and "modality" not in out
    assert pairs[0]["file_name"].endswith("astronaut.jpg") and "image" not in pairs[0]  # input not modified


def test_long_caption_truncated(tmp_path, mapper):
    pair = {**load_caption_jsonl(str(write_jsonl(tmp_path)), None, "test")[0], "caption": "a cat " * 40}
    out = mapper(pair)
    assert out["attention_mask"].all() and out["special_tokens_mask"].tolist() == [1] + [0] * (L - 2) + [1]


def test_arrow_bytes_give_the_file_pixels(tmp_path, mapper):
    pairs = load_caption_arrow([str(write_arrow(tmp_path / "t.arrow", arrow_rows()))], "test")
    out = mapper(pairs[4])
    assert torch.equal(out["image"], _resized("coffee")) and out["image_id"] == "coffee.jpg"


def test_evaluation_items(tmp_path, mapper):
    items = retrieval_items(load_caption_jsonl(str(write_jsonl(tmp_path)), None, "test"))
    image = mapper(items[1])
    assert image["modality"] == "image" and torch.equal(image["image"], _resized("chelsea"))
    assert image["image_index"] == 1 and not {"input_ids", "caption", "caption_index"} & set(image)
    text = mapper(items[-1])
    assert text["modality"] == "text" and "image" not in text
    assert (text["caption_index"], text["image_index"], text["input_ids"].shape) == (4, 2, (L,))
    with pytest.raises(ValueError, match="'modality' must be 'image' or 'text'"):
        mapper({**items[0], "modality": "video"})


def _broken_jsonl(tmp_path):
    pairs = load_caption_jsonl(str(write_jsonl(tmp_path)), None, "test")
    (tmp_path / "images" / "chelsea.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "images" / "coffee.jpg").unlink()
    return pairs


def test_bad_image_raises_at_test_time_naming_file_and_line(tmp_path, mapper):
    pairs = _broken_jsonl(tmp_path)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: cannot read image '.*chelsea\.jpg'"):
        mapper(pairs[2])
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl:4: image file '.*coffee\.jpg' does not exist"):
        mapper(pairs[4])
    rows = arrow_rows()
    rows[1]["image"] = b"\xff\xd8 truncated"
    arrow = load_caption_arrow([str(write_arrow(tmp_path / "b.arrow", rows))], "test")
    with pytest.raises(ValueError, match=r"b\.arrow: row 1 \(image bytes of .*b\.arrow, row 1\): cannot decode"):
        mapper(arrow[2])


def test_bad_image_skipped_and_counted_in_training(tmp_path, gpt2, caplog):
    pairs = _broken_jsonl(tmp_path)
    train = make_mapper(gpt2, is_train=True)
    with caplog.at_level(logging.WARNING, logger="fiber_det"):
        assert train(pairs[2]) is None and train(pairs[4]) is None
    assert train.skipped == 2
    assert "(1 so far" in caplog.text and "(2 so far" in caplog.text and "pairs.jsonl:4" in caplog.text
    assert train(pairs[0])["image"].shape == (3, S, S)


def test_from_config(gpt2):
    cfg = tiny_cfg(INPUT__FORMAT="RGB", MODEL__FIBER__COARSE__IMAGE_SIZE=64, MODEL__FIBER__TEXT__MAX_QUERY_LEN=20,
                   INPUT__CAPTION_TRANSFORM="albef_randaug")
    train, test = ImageCaptionMapper(cfg, True), ImageCaptionMapper(cfg, False)
    assert (train.image_size, train.max_length, train.is_train) == (64, 20, True)
    assert len(train.transform.transforms) == 4 and len(test.transform.transforms) == 2  # test: plain albef
    assert str(GPT2_DIR).endswith(cfg.MODEL.FIBER.TEXT.TOKENIZER)
    with pytest.raises(ValueError, match="INPUT.FORMAT must be 'RGB'"):
        ImageCaptionMapper(tiny_cfg(), True)
    with pytest.raises(ValueError, match="CAPTION_TRANSFORM must be one of"):
        ImageCaptionMapper(tiny_cfg(INPUT__FORMAT="RGB", INPUT__CAPTION_TRANSFORM="randaug"), True)


def test_false_images_for_itm_with_random_negatives(tmp_path, gpt2):
    """Each training pair gets the image of a uniformly drawn dataset entry (python's random);
    evaluation items and a mapper without the pool get none; an unreadable false image skips."""
    import random

    pairs = load_caption_jsonl(str(write_jsonl(tmp_path)), None, "test")
    train = ImageCaptionMapper(True, transform=build_caption_transform("albef", S), image_size=S, tokenizer=gpt2,
                               max_length=L, false_images=pairs)
    random.seed(4)
    drawn = random.randint(0, len(pairs) - 1)
    random.seed(4)
    out = train(pairs[0])
    assert torch.equal(out["false_image"], make_mapper(gpt2, False)(pairs[drawn])["image"])
    assert "false_image" not in make_mapper(gpt2, True)(pairs[0])
    assert "false_image" not in train(retrieval_items(pairs)[0])
    broken = _broken_jsonl(tmp_path / "broken")
    train.false_images = [broken[2]]
    assert train(pairs[0]) is None and train.skipped == 1
