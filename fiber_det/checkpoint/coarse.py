"""Coarse-grained checkpoints -> fiber-det state dicts, with a report (no file I/O here).

- :func:`convert_official_coarse_state_dict`: an official coarse checkpoint (PyTorch-Lightning
  ``state_dict``, module names ``vit_model.`` / ``text_transformer.`` + heads) -> our coarse model
  (:class:`~fiber_det.modeling.coarse.FiberCoarsePretrain`).
- :func:`convert_coarse_state_dict`: an official coarse checkpoint or one of ours -> the towers of
  the fine-grained detector (its initial weights, ``MODEL.WEIGHTS``).

Every key ends in exactly one bucket of the report (converted, regenerated = a buffer checked
against its recomputed value, dropped with a reason); anything else is an error.
"""
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..modeling.backbone.windows import relative_position_index, shift_window_mask
from .convert import ConversionError, ConversionReport, unwrap_checkpoint

__all__ = [
    "convert_official_coarse_state_dict", "convert_coarse_state_dict", "resize_relative_position_table",
    "is_coarse_state_dict", "adapt_coarse_state_dict",
    "COARSE_RENAMES", "COARSE_DISCARDED", "OFFICIAL_COARSE_RENAMES",
]

# official coarse module names -> our coarse model
OFFICIAL_COARSE_RENAMES = (("vit_model.", "backbone.vision."), ("text_transformer.", "backbone.text."))
QUEUE_KEY = re.compile(r"^(image_queue|text_queue|image_input_queue|text_input_queue|text_input_mask_queue|"
                       r"queue_ptr|queue_total)$")
BUFFER_KEY = re.compile(r"(\.relative_position_index|\.attn_mask|embeddings\.position_ids)$")
TABLE_KEY = re.compile(r"\.relative_position_bias_table$")
# parameters of one objective (MLM, ITM, ITC), absent when the objective is off
OBJECTIVE_HEAD_KEY = re.compile(r"^(mlm_score|itm_score)\.|^temp$")
# official keys our coarse model has no place for, with the reason (matched on the renamed key)
OFFICIAL_COARSE_UNUSED = (
    (QUEUE_KEY, "ITC queue: the official loader drops it too, training starts a fresh queue"),
    (re.compile(r"^backbone\.text\.encoder\.layer\.\d+\.alpha_t2i$"),
     "gate of a text layer without cross-attention (never used)"),
    (re.compile(r"crossattention_t2i\.output\.LayerNorm\."), "never applied by the official model"),
    (re.compile(r"^backbone\.text\.pooler\."), "RoBERTa pooler, never used"),
    (re.compile(r"^backbone\.vision\.head\."), "Swin classifier"),
    (re.compile(r"^(vqa_classifier|nlvr2_classifier|snli_classifier|cross_modal_att_layers)\."),
     "fine-tuning head the pre-training model does not build"),
    (OBJECTIVE_HEAD_KEY, "head of an objective switched off in this model (MODEL.FIBER.COARSE.*_ON)"),
)

# coarse (official or ours) -> the fine-grained model's towers
COARSE_RENAMES = OFFICIAL_COARSE_RENAMES + (
    ("backbone.vision.", "backbone.vision."), ("backbone.text.", "backbone.text."),
)
FINE_PREFIX = (("backbone.vision.", "backbone.bottom_up.vision."), ("backbone.text.", "backbone.bottom_up.text."))
# coarse keys the fine-grained model has no place for, with the reason (matched on the FG name)
COARSE_DISCARDED = (
    (re.compile(r"\.attn_mask$"), "timm-style shift-mask buffer (the detector computes its masks)"),
    (re.compile(r"crossattention_t2i\.output\.LayerNorm\."), "Identity in the fine-grained model"),
    (re.compile(r"^backbone\.bottom_up\.text\.pooler\."), "text pooler (coarse-stage head)"),
    (re.compile(r"^backbone\.bottom_up\.vision\.norm\.(weight|bias)$"), "Swin final norm (fine-grained uses norm1..3)"),
    (re.compile(r"^backbone\.bottom_up\.vision\.head\."), "Swin classifier"),
    (re.compile(r"\.alpha_t2i$"), "gate of a text layer without cross-attention"),
    (re.compile(r"\.attn\.norm_i2t_i\."), "v3 query LayerNorm, absent in a v2 model"),
    (re.compile(r"^(cross_modal_\w+|mlm_score|itm_score|rank_output|vqa_classifier|nlvr2_classifier|snli_classifier)\."
                r"|^(temp|queue_ptr|queue_total|\w+_queue)$"),
     "coarse-stage head, projection, pooler or ITC queue"),
)
# model keys a coarse checkpoint does not provide by design (fresh in the fine-grained model)
COARSE_FRESH = re.compile(r"^(?!backbone\.bottom_up\.)|^backbone\.bottom_up\.vision\.norm\d+\.")


def _rename(key: str, rules) -> Optional[str]:
    return next((new + key[len(old):] for old, new in rules if key.startswith(old)), None)


def _table_window(rows: int) -> int:
    """Window w of a ((2w - 1)², heads) relative-position table."""
    return (int(round(math.sqrt(rows))) + 1) // 2


def _regenerated_buffer(key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
    """The official value of a recomputable buffer, from its shape (None: not one of them)."""
    if key.endswith("relative_position_index"):
        return relative_position_index(int(round(math.sqrt(value.shape[0]))))
    if key.endswith("embeddings.position_ids"):
        return torch.arange(value.shape[-1]).expand(1, -1)
    if key.endswith("attn_mask"):  # (nW, w², w²) of a square map of sqrt(nW) x sqrt(nW) windows
        window, side = int(round(math.sqrt(value.shape[1]))), int(round(math.sqrt(value.shape[0])))
        return shift_window_mask(side * window, side * window, window, window // 2)
    return None


def _check_buffer(key: str, value: torch.Tensor, report: ConversionReport) -> None:
    want = _regenerated_buffer(key, value)
    if want is None or want.shape != value.shape:
        report.mismatched.append(f"{key}: cannot regenerate a buffer of shape {tuple(value.shape)}")
    elif torch.equal(want.to(value.dtype), value):
        report.regenerated.append(key)
    else:
        report.mismatched.append(f"{key}: stored values differ from the regenerated buffer")


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """The official fine-tuning rule for another image size (``swin_adapt_position_encoding``):
    each head's (2w - 1) x (2w - 1) bias map is resized bicubically (align_corners False) to
    (2·window - 1)². ((2w - 1)², heads) -> ((2·window - 1)², heads)."""
    before, after = 2 * _table_window(table.shape[0]) - 1, 2 * window - 1
    maps = table.transpose(0, 1).reshape(1, -1, before, before)
    maps = F.interpolate(maps.float(), size=(after, after), mode="bicubic").to(table.dtype)
    return maps[0].permute(1, 2, 0).reshape(-1, table.shape[1])


def is_coarse_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for the weights of a coarse model: official (``vit_model.``) or fiber-det's
    (``backbone.vision.``, where the detector has ``backbone.bottom_up.vision.``)."""
    return any(k.startswith(("vit_model.", "backbone.vision.")) for k in sd)


def adapt_coarse_state_dict(sd: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, Sequence[int]]
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A fiber-det coarse state dict for another coarse model, as the official fine-tuning loader
    treats it: relative-position tables of another window (another image size, e.g. 384 -> 576
    pixels) are resized (:func:`resize_relative_position_table`), and the heads of objectives the
    model does not have (``mlm_score``, ``itm_score``, ``temp``: e.g. pre-trained ITM/MLM heads
    when fine-tuning ITC alone) are dropped.

    Returns:
        (state dict, one note per resized or dropped key). Any other mismatch is left for the
        loader to report.
    """
    out, notes = {}, []
    for k, v in sd.items():
        shape = expected_shapes.get(k)
        if shape is None and OBJECTIVE_HEAD_KEY.search(k):
            notes.append(f"{k}: dropped (head of an objective this model does not have)")
            continue
        if TABLE_KEY.search(k) and shape is not None and tuple(v.shape) != tuple(shape) and v.shape[1] == shape[1]:
            v = resize_relative_position_table(v, _table_window(shape[0]))
            notes.append(f"{k}: resized (bicubic) from window {_table_window(sd[k].shape[0])} to {_table_window(shape[0])}")
        out[k] = v
    return out, notes


def convert_official_coarse_state_dict(
    checkpoint: Mapping, expected_shapes: Mapping[str, Sequence[int]], resize_tables: bool = True
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Official coarse checkpoint -> our coarse model, with strict key accounting.

    Args:
        checkpoint: the loaded file (``{"state_dict": ...}``, ``{"model": ...}`` or bare).
        expected_shapes: {key: shape} of the target model's state dict (every key must be
            provided: missing keys are errors).
        resize_tables: when the checkpoint's window differs from the model's (another image
            size), resize every relative-position table with the official bicubic rule (its shift
            masks and index buffers belong to the old window and are dropped, as the official
            loader does); False: report the tables as mis-shaped.
    Returns:
        (state dict, report); call ``report.raise_if_errors()``. ``rank_output`` is not a separate
        parameter here: its values are written into ``itm_score.fc`` row 1, which is what the
        official loader ends up with (the two share storage, ``rank_output`` is loaded last).
    """
    sd, source, stripped = unwrap_checkpoint(checkpoint)
    if not any(k.startswith("vit_model.") for k in sd):
        raise ConversionError(f"not an official coarse checkpoint: no 'vit_model.' keys in entry {source!r}")
    report = ConversionReport(source=source, version="coarse", stripped_prefix=stripped)
    ours_table = expected_shapes.get("backbone.vision.layers.0.blocks.0.attn.relative_position_bias_table")
    theirs_table = sd.get("vit_model.layers.0.blocks.0.attn.relative_position_bias_table")
    window = _table_window(ours_table[0]) if ours_table else None
    resized = ours_table is not None and theirs_table is not None and theirs_table.shape[0] != ours_table[0]
    if resized:
        old = _table_window(theirs_table.shape[0])
        note = f"relative-position tables resized (bicubic) from window {old} ({32 * old} px) to {window} ({32 * window} px)"
        if not resize_tables:
            report.mismatched.append(note.replace("resized", "need resizing") + ": not allowed here")
            resized = False
        else:
            report.notes.append(note)
    new_sd = {}
    for k, v in sd.items():
        new = _rename(k, OFFICIAL_COARSE_RENAMES) or k
        if BUFFER_KEY.search(k):
            if resized and not k.endswith("position_ids"):
                report.dropped.append(f"{k}: buffer of the checkpoint's window (recomputed for window {window})")
            else:
                _check_buffer(k, v, report)
        elif k.startswith("rank_output."):
            continue  # folded into itm_score.fc below
        elif new in expected_shapes:
            if resized and TABLE_KEY.search(k):
                v = resize_relative_position_table(v, window)
            if tuple(v.shape) != tuple(expected_shapes[new]):
                report.mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected_shapes[new])}")
                continue
            report.converted[k] = new
            new_sd[new] = v
        else:
            reason = next((r for p, r in OFFICIAL_COARSE_UNUSED if p.search(new)), None)
            (report.dropped.append(f"{k}: {reason}") if reason else report.unmatched.append(k))
    _fold_rank_output(sd, new_sd, report)
    report.missing = sorted(k for k in expected_shapes if k not in new_sd)
    return new_sd, report


def _fold_rank_output(sd, new_sd, report) -> None:
    """Writes ``rank_output`` into ``itm_score.fc`` row 1 (the official load order) and notes
    whether the two differed in the file."""
    keys = [k for k in ("rank_output.weight", "rank_output.bias") if k in sd]
    if not keys:
        return
    if "itm_score.fc.weight" not in new_sd:
        report.dropped += [f"{k}: ITM retrieval score of a model without ITM" for k in keys]
        return
    for k in keys:
        target = "itm_score.fc." + k.split(".")[-1]
        row = sd[k].reshape(-1)
        differs = not torch.equal(new_sd[target][1].reshape(-1), row)
        new_sd[target] = new_sd[target].clone()
        new_sd[target][1] = row.reshape(new_sd[target][1].shape)
        report.converted[k] = f"{target}[1]"
        if differs:
            report.notes.append(f"{k} differed from {target} row 1; row 1 now holds {k}, as in the official "
                                "model after loading (shared storage, rank_output loaded last)")


def convert_coarse_state_dict(
    checkpoint: Mapping, expected_shapes: Mapping[str, Sequence[int]]
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Coarse-grained checkpoint (official, or a fiber-det coarse model's) -> the fine-grained
    model's backbone towers.

    Initialises the Swin (with its image->text fusion, gates and, for v3 models, the query
    LayerNorm) and the text encoder (with its text->image fusion). The rest of the model (Swin
    output norms, FPN, DyHead: :data:`COARSE_FRESH`) is reported as ``fresh``; a tower key the
    checkpoint lacks is ``missing`` (an error). ``relative_position_index`` and ``position_ids``
    are checked against their recomputed values. Coarse keys without a place in the model are
    ``dropped`` only when they match a documented reason (:data:`COARSE_DISCARDED`); any other
    unknown key, and any shape mismatch, is an error. Relative-position tables of another window
    (a 576-pixel checkpoint, window 18) are refused: the detector's window is fixed, and the
    official detector loader would silently keep freshly initialised tables instead.
    """
    sd, source, stripped = unwrap_checkpoint(checkpoint)
    report = ConversionReport(source=source, version="coarse", stripped_prefix=stripped)
    new_sd = {}
    for k, v in sd.items():
        ours = _rename(k, COARSE_RENAMES)
        new = _rename(ours, FINE_PREFIX) if ours is not None else k
        if ours is not None and re.search(r"(\.relative_position_index|embeddings\.position_ids)$", k):
            _check_buffer(k, v, report)
        elif ours is not None and new in expected_shapes:
            if tuple(expected_shapes[new]) != tuple(v.shape):
                report.mismatched.append(_shape_problem(k, v, expected_shapes[new]))
                continue
            report.converted[k] = new
            new_sd[new] = v
        else:
            reason = next((r for p, r in COARSE_DISCARDED if p.search(new)), None)
            (report.dropped.append(f"{k}: {reason}") if reason else report.unmatched.append(k))
    absent = sorted(k for k in expected_shapes if k not in new_sd)
    report.fresh = [k for k in absent if COARSE_FRESH.search(k)]
    report.missing = [k for k in absent if not COARSE_FRESH.search(k)]
    return new_sd, report


def _shape_problem(key: str, value: torch.Tensor, shape: Sequence[int]) -> str:
    msg = f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(shape)}"
    if TABLE_KEY.search(key):
        theirs, ours = _table_window(value.shape[0]), _table_window(shape[0])
        msg += (f" (window {theirs}, a {32 * theirs}-pixel coarse checkpoint, vs the detector's window {ours}: "
                f"only checkpoints trained at {32 * ours} px initialise it)")
    return msg
