"""tools/benchmark.py on the tiny model (CPU) and the FLOP counting of fiber_det.utils.flops."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DeformConv2d

from conftest import GPT2_DIR, REPO, load_tool, tiny_cfg, tiny_model
from fiber_det.data.tokenization import build_tokenizer
from fiber_det.utils.flops import count_flops, deform_conv2d_flops

CONFIG = str(REPO / "configs" / "quick_schedules" / "FIBER-tiny.yaml")
MEASUREMENTS = (
    "train_step_time", "train_forward_time", "train_backward_time", "train_optimizer_time", "train_throughput",
    "train_peak_memory", "train_kernel_launches", "infer_latency", "infer_preprocess_time",
    "infer_forward_time", "infer_postprocess_time", "infer_peak_memory", "infer_kernel_launches",
    "infer_batched_throughput", "forward_flops", "forward_flops_counter", "forward_flops_deformable",
    "train_step_flops", "mfu",
)

pytestmark = pytest.mark.usefixtures("single_thread")

benchmark = load_tool("benchmark")


def test_tiny_cpu_run_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config-file", CONFIG, "--device", "cpu", "--batch", "2", "--height", "64", "--width", "90",
            "--iters", "1", "--warmup", "1", "--infer-batch", "2", "--peak-tflops", "0.05", "--output", str(out)]
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())
    for key in ("device", "device_type", "torch", "torchvision", "settings", "config", "reference", "flop_counts"):
        assert key in result, key
    assert result["device_type"] == "cpu"
    m = {k: v["value"] for k, v in result["measurements"].items()}
    assert sorted(m) == sorted(MEASUREMENTS)
    for key, value in m.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert m["train_step_time"] == pytest.approx(
        m["train_forward_time"] + m["train_backward_time"] + m["train_optimizer_time"])
    assert m["train_throughput"] == pytest.approx(2 / m["train_step_time"])
    assert m["forward_flops"] == pytest.approx(m["forward_flops_counter"] + m["forward_flops_deformable"])
    assert m["mfu"] == pytest.approx(100 * m["train_step_flops"] / m["train_step_time"] / 0.05)
    # two padded 64x96 images forward + backward cost more than 2x one image's forward
    assert m["train_step_flops"] > 2 * m["forward_flops"]
    assert result["flop_counts"]["forward"]["deformable_calls"] == 13 * 2  # 13 DCN calls per DyHead block
    s = result["settings"]
    assert s["padded_size"] == [64, 96] and s["prompt_tokens"] == 64 and s["prompt_categories"] > 0
    assert result["reference"]["forward_flops"] == {"value": 1.18, "unit": "TFLOP"}
    assert "MODEL" in result["config"]


def _dcn_inputs(stride: int):
    torch.manual_seed(0)
    conv = DeformConv2d(4, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 4, 7, 9)
    h, w = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    return conv, x, torch.randn(2, 18, h, w), torch.rand(2, 9, h, w)


@pytest.mark.parametrize("stride", [1, 2])
def test_deform_conv_layer_count_equals_formula(stride):
    conv, x, offset, mask = _dcn_inputs(stride)
    out, fc = count_flops(lambda: conv(x, offset, mask), conv)
    positions = 2 * out.shape[-2] * out.shape[-1]
    assert fc.counted == 0  # FlopCounterMode has no deform_conv2d formula: nothing double-counted
    assert fc.deformable_calls == 1
    assert fc.deformable == positions * 9 * 4 * (2 * 6 + 8)  # 2·C_in·9·C_out + C_in·9·(7 + 1) per position
    assert fc.total == fc.deformable
    assert not conv._forward_hooks  # hooks removed on exit


def test_deform_conv_contraction_matches_flop_counter_conv_and_backward_triples():
    conv, x, offset, mask = _dcn_inputs(1)
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, conv.weight, conv.bias, padding=1)
    sampling = 2 * 7 * 9 * 4 * 9 * 8
    assert deform_conv2d_flops(x.shape, conv.weight.shape, (2, 6, 7, 9)) - sampling == counter.get_total_flops()
    assert deform_conv2d_flops(x.shape, conv.weight.shape, (2, 6, 7, 9), modulated=False) == (
        counter.get_total_flops() + 2 * 7 * 9 * 4 * 9 * 7)
    x.requires_grad_(True)
    _, fc = count_flops(lambda: conv(x, offset, mask).sum().backward(), conv, backward=True)
    assert fc.deformable == 3 * deform_conv2d_flops(x.shape, conv.weight.shape, (2, 6, 7, 9))


def test_tiny_model_counter_plus_deformable_exceeds_counter_alone():
    model = tiny_model(0).eval()
    images = torch.randn(1, 3, 64, 96)
    tokens = build_tokenizer(GPT2_DIR)(["person. dog. kite"], return_tensors="pt")
    with torch.no_grad():
        _, fc = count_flops(lambda: model.run(images, tokens["input_ids"], tokens["attention_mask"]), model)
        with FlopCounterMode(display=False) as counter:
            model.run(images, tokens["input_ids"], tokens["attention_mask"])
    assert fc.counted == counter.get_total_flops() > 0
    assert fc.deformable > 0 and fc.total > counter.get_total_flops()


def test_roberta_order_stand_in_tokenizer(tmp_path):
    gpt2 = build_tokenizer(GPT2_DIR)
    stand_in = build_tokenizer(benchmark.write_roberta_order_bpe(GPT2_DIR, tmp_path / "tok"))
    assert (stand_in.bos_token_id, stand_in.pad_token_id, stand_in.eos_token_id, stand_in.unk_token_id) == (0, 1, 2, 3)
    caption = "person. traffic light. hair drier. toothbrush"
    pieces = stand_in.convert_ids_to_tokens(stand_in(caption)["input_ids"])
    assert pieces[1:-1] == gpt2.convert_ids_to_tokens(gpt2(caption)["input_ids"])[1:-1]
    assert len(stand_in) <= 50265  # fits FIBER-B's MODEL.FIBER.TEXT.VOCAB_SIZE


def test_stand_in_tokenizer_refused_for_other_pad_id():
    cfg = tiny_cfg(MODEL__FIBER__TEXT__TOKENIZER="")
    with pytest.raises(ValueError, match="PAD_TOKEN_ID 50260"):
        benchmark.build_benchmark_model(cfg)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "train,speed"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--opts", "MODEL.DEVICE"])


def test_chunked_eval_section_prints_its_json_last(tmp_path, capsys):
    """Both inference paths on one real photo against the 1,203 LVIS v1 names (63 chunks of the
    tiny config's 64 tokens), detections compared."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "coffee.jpg").write_bytes((REPO / "datasets" / "real_photos" / "images" / "coffee.jpg").read_bytes())
    argv = ["--config-file", CONFIG, "--device", "cpu", "--section", "chunked-eval", "--images", str(photos),
            "--chunk-batch", "32"]
    assert benchmark.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("sequential_s", "shared_s", "speedup", "max_abs_score_diff", "detections_equal", "num_images",
                "num_chunks", "device"):
        assert key in line, key
    assert line["detections_equal"] is True and line["max_abs_score_diff"] <= 2e-5
    assert line["num_images"] == 1 and line["num_categories"] == 1203 and line["num_chunks"] == 63
    assert line["num_detections"] >= 63 * 100  # threshold 0: every chunk fills its 100
    assert line["speedup"] == pytest.approx(line["sequential_s"] / line["shared_s"])
    assert line["flops"]["shared"] < line["flops"]["sequential"] and line["flop_bound_speedup"] > 1
    assert line["text_prefix_cache_entries"] == 63 and line["chunk_batch"] == 32


def test_variant_sections_are_known():
    args = benchmark.parse_args(["--section", "chunked-eval,sdpa,compile"])
    assert args.sections == ["chunked-eval", "sdpa", "compile"]
    assert benchmark.parse_args([]).sections == ["train", "infer", "flops"]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--section", "chunked-eval", "--num-images", "-1"])


def test_sdpa_section_compares_the_same_weights(capsys):
    argv = ["--config-file", CONFIG, "--device", "cpu", "--section", "sdpa", "--batch", "1", "--height", "64",
            "--width", "96", "--iters", "1", "--warmup", "0"]
    assert benchmark.main(argv) == 0
    sdpa = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sdpa"]
    for key in ("eager_forward_s", "sdpa_forward_s", "eager_train_fwd_bwd_s", "sdpa_train_fwd_bwd_s"):
        assert math.isfinite(sdpa[key]) and sdpa[key] > 0, key
    assert sdpa["forward_speedup"] == pytest.approx(sdpa["eager_forward_s"] / sdpa["sdpa_forward_s"])
    assert sdpa["max_abs_token_logit_diff"] < 1e-4  # other kernels, other rounding, same function
