"""GroundingDatasetMapper on real photos (the vendored scikit-image ones): boxes through the
official resize rule and legacy flip computed by hand, positive maps decoded back to the phrase
text with the real GPT-2 BPE and BERT WordPiece, prompts per dataset mode, image decoding."""
import copy
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from fiber_det.data.captions import clean_name
from fiber_det.data.image_io import read_image
from fiber_det.data.mapper import GroundingDatasetMapper, legacy_xyxy_boxes
from fiber_det.data.prompt import Prompt, PromptBuilder
from fiber_det.data.transforms import LegacyRandomFlip, LegacyResize
from records import COFFEE, IMAGES, ann, chelsea_grounding, coffee_grounding

def make_mapper(tokenizer, is_train=True, sizes=(480,), max_size=1333, flip=0.0, max_query_len=256, **kwargs):
    augs = [LegacyResize(sizes, max_size)] + ([LegacyRandomFlip(flip)] if is_train else [])
    return GroundingDatasetMapper(
        is_train, augmentations=augs, prompt_builder=PromptBuilder(tokenizer, max_length=max_query_len), **kwargs
    )


def caption_of(out):
    """The caption of a mapped input's one prompt."""
    (prompt,) = out["prompts"]
    assert isinstance(prompt, Prompt)
    return prompt.caption


def decoded_rows(tokenizer, caption, positive_map):
    """The text of the tokens each row marks (checked contiguous)."""
    ids = tokenizer(caption, max_length=positive_map.shape[1], truncation=True)["input_ids"]
    texts = []
    for row in positive_map:
        marked = torch.nonzero(row).flatten().tolist()
        assert marked == list(range(marked[0], marked[-1] + 1))
        texts.append(tokenizer.decode([ids[i] for i in marked]).strip())
    return texts


@pytest.fixture
def detection_dataset():
    """Registers throw-away detection datasets: ``register(**metadata) -> name``."""
    names = []

    def register(**metadata):
        names.append(f"test_mapper_{uuid.uuid4().hex[:8]}")
        DatasetCatalog.register(names[-1], lambda: [])
        MetadataCatalog.get(names[-1]).set(**metadata)
        return names[-1]

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def coffee_detection(name, labels=(0, 1, 2)):
    return {"file_name": str(IMAGES / "coffee.jpg"), "height": 400, "width": 600, "image_id": 1,
            "task": "detection", "dataset": name,
            "annotations": [ann(box, category_id=c) for box, c in zip(COFFEE.values(), labels)]}


# ---------------------------------------------------------------------------------------------
# boxes and positive maps


def test_resize_and_flip_by_hand(gpt2):
    # coffee 600x400, short side 480 -> 720x480 (scale 1.2); flip with p = 1 in the resized frame
    out = make_mapper(gpt2, sizes=(480,), flip=1.0)(coffee_grounding())
    assert tuple(out["image"].shape) == (3, 480, 720) and out["image"].dtype == torch.uint8
    # cup: legacy xyxy [172, 16, 409, 305] -> x1' = 720 - 409*1.2 - 1, x2' = 720 - 172*1.2 - 1
    expected = torch.tensor([[228.2, 19.2, 512.6, 366.0], [144.2, 88.8, 627.8, 466.8], [209.0, 76.8, 330.2, 390.0]])
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected)
    assert caption_of(out) == "cup. saucer. spoon."  # flipping leaves the caption alone
    assert out["instances"].image_size == (480, 720)


def test_max_size_caps_the_long_side(gpt2):
    # size 800 would give a 1200 long side > 1000: size = round(1000*400/600) = 667, long = int(1000.5)
    out = make_mapper(gpt2, sizes=(800,), max_size=1000)(coffee_grounding())
    assert tuple(out["image"].shape) == (3, 667, 1000)
    cup = out["instances"].gt_boxes.tensor[0]
    expected = torch.tensor([172 * 1000 / 600, 16 * 667 / 400, 409 * 1000 / 600, 305 * 667 / 400])
    torch.testing.assert_close(cup, expected)


def test_positive_maps_decode_to_the_phrases(gpt2, bert):
    for tokenizer in (gpt2, bert):
        out = make_mapper(tokenizer)(coffee_grounding())
        pmap = out["instances"].gt_positive_map
        assert pmap.shape == (3, 256) and set(pmap.unique().tolist()) == {0.0, 1.0}
        assert decoded_rows(tokenizer, caption_of(out), pmap) == ["cup", "saucer", "spoon"]
        out = make_mapper(tokenizer, max_query_len=64)(chelsea_grounding())
        # the two "green eyes" boxes share one label of the prompt, hence one token row
        assert out["prompts"][0].labels == (1, 2, 3)
        texts = decoded_rows(tokenizer, caption_of(out), out["instances"].gt_positive_map)
        assert [t.lower() for t in texts] == ["a tabby cat", "green eyes", "green eyes", "a pink nose"]


def test_crowd_and_degenerate_boxes_leave_with_their_spans(gpt2):
    record = coffee_grounding()
    record["annotations"][0]["iscrowd"] = 1  # cup: crowd
    record["annotations"][1]["bbox"] = [76, 74, 1, 50]  # saucer: x2 = x1 + 1 - 1 = x1 -> degenerate
    record["annotations"].append(ann((700, 10, 720, 30), category_id=1, tokens_positive=[[5, 11]]))  # clamps away
    out = make_mapper(gpt2, sizes=(400,))(record)
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, torch.tensor([[324.0, 64.0, 425.0, 325.0]]))
    assert decoded_rows(gpt2, caption_of(out), out["instances"].gt_positive_map) == ["spoon"]
    assert len(out["annotations"]) == 4  # the dataset dict's own annotations pass through untouched


def test_legacy_boxes_clamp_in_the_original_frame():
    xyxy = {"bbox": [1, 2, 11, 12], "bbox_mode": BoxMode.XYXY_ABS}
    boxes = legacy_xyxy_boxes([ann((-5, 10, 620, 30)), xyxy], 400, 600)
    np.testing.assert_allclose(boxes, [[0, 10, 599, 29], [1, 2, 10, 11]])


def test_training_output_contract_and_no_mutation(gpt2):
    record = coffee_grounding()
    before = copy.deepcopy(record)
    out = make_mapper(gpt2)(record)
    assert record == before
    for key, value in before.items():
        assert out[key] == value  # every field passes through
    assert {"image", "instances", "prompts"} <= set(out)


def test_image_without_boxes_is_kept(gpt2):
    record = coffee_grounding(annotations=[])
    out = make_mapper(gpt2)(record)
    assert len(out["instances"]) == 0 and out["instances"].gt_positive_map.shape == (0, 256)


# ---------------------------------------------------------------------------------------------
# detection prompts


def test_all_categories_training_prompt(gpt2, detection_dataset):
    name = detection_dataset(thing_classes=["cup", "saucer", "spoon", "traffic_light"], prompt_mode="all_categories")
    mapper = make_mapper(gpt2)
    captions = set()
    for seed in range(6):
        np.random.seed(seed)
        out = mapper(coffee_detection(name))
        captions.add(caption_of(out))
        assert sorted(caption_of(out).split(". ")) == ["cup", "saucer", "spoon", "traffic light"]
        assert decoded_rows(gpt2, caption_of(out), out["instances"].gt_positive_map) == ["cup", "saucer", "spoon"]
    assert len(captions) > 1  # shuffled per sample
    fixed = make_mapper(gpt2, shuffle=False)(coffee_detection(name))
    assert caption_of(fixed) == "cup. saucer. spoon. traffic light"


def test_sampled_negatives_training_prompt(bert, detection_dataset):
    vocabulary = ["cup", "saucer", "spoon"] + [f"object kind {i}" for i in range(300)]
    name = detection_dataset(thing_classes=vocabulary, prompt_mode="sampled_negatives")
    np.random.seed(0)
    out = make_mapper(bert, max_query_len=64)(coffee_detection(name))
    names = caption_of(out).split(". ")
    assert {"cup", "saucer", "spoon"} <= set(names) and len(names) > 3
    assert len(bert(caption_of(out))["input_ids"]) <= 64
    assert decoded_rows(bert, caption_of(out), out["instances"].gt_positive_map) == ["cup", "saucer", "spoon"]


def test_detection_errors(gpt2, detection_dataset):
    name = detection_dataset(thing_classes=["cup", "saucer", "spoon"])
    with pytest.raises(ValueError, match="prompt_mode must be one of"):
        make_mapper(gpt2)(coffee_detection(name))
    long_name = detection_dataset(thing_classes=[f"word{i}" for i in range(100)], prompt_mode="all_categories")
    with pytest.raises(ValueError, match="use prompt_mode 'sampled_negatives'"):
        make_mapper(gpt2, max_query_len=64)(coffee_detection(long_name))
    with pytest.raises(ValueError, match="CONTROL_PROB"):
        make_mapper(gpt2, control_prob=(0.05, 0.05, 0.5, 0.2))


def test_test_mode_detection_single_and_chunked(gpt2, detection_dataset):
    classes = [f"class_{i}" for i in range(100)]
    name = detection_dataset(thing_classes=classes, prompt_mode="all_categories")
    mapper = make_mapper(gpt2, is_train=False, sizes=(800,), max_query_len=1024)
    single = mapper(coffee_detection(name))
    assert "instances" not in single and tuple(single["image"].shape) == (3, 800, 1200)
    (prompt,) = single["prompts"]
    assert prompt.caption.startswith("class 0. class 1. ") and prompt.labels == tuple(range(1, 101))
    assert prompt.names[100] == "class_99"
    assert mapper(coffee_detection(name))["prompts"] is single["prompts"]  # made once, shared unchanged
    chunked = make_mapper(gpt2, is_train=False, chunk_size=40, max_query_len=1024)(coffee_detection(name))
    assert [p.labels for p in chunked["prompts"]] == [tuple(range(1, 41)), tuple(range(41, 81)), tuple(range(81, 101))]
    auto = make_mapper(gpt2, is_train=False, max_query_len=64)(coffee_detection(name))  # too long: split
    assert len(auto["prompts"]) > 1
    assert [label for p in auto["prompts"] for label in p.labels] == list(range(1, 101))
    assert all(len(gpt2(p.caption)["input_ids"]) <= 64 for p in auto["prompts"])
    for p in auto["prompts"]:
        for label, ((s, e),) in p.spans.items():
            assert p.caption[s:e] == clean_name(classes[label - 1])


def test_test_mode_grounding(bert):
    out = make_mapper(bert, is_train=False)(chelsea_grounding())
    (prompt,) = out["prompts"]
    assert prompt.spans == {1: ((0, 11),), 2: ((17, 27),), 3: ((32, 43),)}
    assert prompt.names == {1: "A tabby cat", 2: "green eyes", 3: "a pink nose"}
    assert [bert.decode([prompt.input_ids[i] for i in prompt.token_map[k]]) for k in prompt.labels] == [
        "a tabby cat", "green eyes", "a pink nose"]
    assert out["tokens_positive_eval"] == chelsea_grounding()["tokens_positive_eval"] and "instances" not in out
    with pytest.raises(ValueError, match="tokens_positive_eval' is missing or empty"):
        make_mapper(bert, is_train=False)({**chelsea_grounding(), "tokens_positive_eval": []})
    with pytest.raises(ValueError, match=r"image_id 3\): label 2: span \[17, 99\)"):
        make_mapper(bert, is_train=False)({**chelsea_grounding(), "tokens_positive_eval": [[[0, 11]], [[17, 99]]]})


def test_from_config(gpt2):
    cfg = tiny_cfg(INPUT__FLIP_PROB=1.0, TEST__CHUNK_SIZE=40)
    mapper = GroundingDatasetMapper(cfg, True)
    assert mapper.prompt_builder.max_length == 64 and mapper.chunk_size == 40
    out = mapper(coffee_grounding())
    assert out["image"].shape[1] in (96, 128)  # MIN_SIZE_TRAIN (96, 128)
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        GroundingDatasetMapper(tiny_cfg(INPUT__FORMAT="RGB"), True)


# ---------------------------------------------------------------------------------------------
# image decoding


def _rgb_pixels(h=6, w=8):
    return (np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 5)


@pytest.mark.parametrize("kind", ["L", "RGBA", "P", "I;16", "RGB"])
def test_image_modes_become_bgr_uint8(tmp_path, kind):
    rgb = _rgb_pixels()
    if kind == "L":
        image, expected = Image.fromarray(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2)
    elif kind == "RGBA":
        alpha = np.zeros(rgb.shape[:2] + (1,), dtype=np.uint8)  # fully transparent: alpha is dropped
        image, expected = Image.fromarray(np.concatenate([rgb, alpha], axis=2)), rgb
    elif kind == "P":
        image = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        expected = np.asarray(image.convert("RGB"))
    elif kind == "I;16":
        sixteen = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)  # up to 64155
        image = Image.fromarray(sixteen)
        expected = np.repeat((sixteen >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        image, expected = Image.fromarray(rgb), rgb
    path = tmp_path / f"image_{kind.replace(';', '')}.png"
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode in ({"I;16", "I"} if kind == "I;16" else {kind})  # the mode under test
    bgr = read_image(str(path))
    assert bgr.dtype == np.uint8 and bgr.shape == (6, 8, 3)
    np.testing.assert_array_equal(bgr, expected[:, :, ::-1])
    if kind == "I;16":
        assert bgr.max() == 64155 >> 8 == 250  # full range kept, not saturated at 255


def test_sixteen_bit_photo_through_the_mapper(gpt2, tmp_path):
    gray = np.asarray(Image.open(IMAGES / "coffee.jpg").convert("L"), dtype=np.uint16) * 257
    path = tmp_path / "coffee16.png"
    Image.fromarray(gray).save(path)
    out = make_mapper(gpt2, sizes=(400,))(coffee_grounding(file_name=str(path)))
    image = out["image"].numpy()
    np.testing.assert_array_equal(image[0], image[2])
    np.testing.assert_array_equal(image[0], (gray >> 8).astype(np.uint8))


def test_bad_image_files_are_named(tmp_path, gpt2):
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        read_image(str(missing))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match="cannot read image .*garbage.jpg"):
        read_image(str(garbage))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((IMAGES / "chelsea.jpg").read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        read_image(str(truncated))
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        make_mapper(gpt2)(coffee_grounding(file_name=str(missing)))
    with pytest.raises(SizeMismatchError, match="coffee.jpg"):
        make_mapper(gpt2)(coffee_grounding(height=401))
