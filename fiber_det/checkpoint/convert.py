"""Official fine-grained FIBER checkpoints -> fiber-det state dicts, with a report (no file I/O).

Fine-grained checkpoints (``fiber_coco.pth`` ...): :func:`convert_official_state_dict`, driven by
the prefix table of :mod:`.rename_table`. Coarse-grained checkpoints: :mod:`.coarse`. Every key
ends in exactly one bucket of the report; anything unexplained is an error.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..modeling.backbone.windows import relative_position_index
from ..modeling.head.atss import generate_cell_anchors
from .rename_table import DROPPED, REGENERATED_BUFFERS, V3_MARKER, rename_key

__all__ = [
    "ConversionReport", "ConversionError", "list_problems", "unwrap_checkpoint", "convert_official_state_dict",
    "FIBER_ANCHORS", "anchor_spec_from_cfg",
]

# FIBER's anchors: (stride, sizes, aspect ratios) per level: stride 8-128, one square anchor of 8 x stride
FIBER_ANCHORS = tuple((8 * 2**i, (64 * 2**i,), (1.0,)) for i in range(5))


def anchor_spec_from_cfg(cfg, strides=(8, 16, 32, 64, 128)):
    """(stride, sizes, aspect ratios) per level of a fiber-det config, to check stored anchors."""
    ag = cfg.MODEL.ANCHOR_GENERATOR
    return tuple((s, tuple(sizes), tuple(ag.ASPECT_RATIOS[0])) for s, sizes in zip(strides, ag.SIZES))


def list_problems(problems: Dict[str, List[str]]) -> str:
    """Format {kind: [keys]} as "N kind:" headings each followed by its keys, one per line
    (empty kinds left out; "" when there is nothing to report)."""
    lines = []
    for kind, items in problems.items():
        if items:
            lines.append(f"{len(items)} {kind}:")
            lines += [f"    {k}" for k in items]
    return "\n".join(lines)


class ConversionError(ValueError):
    """A checkpoint that does not convert cleanly; the message lists every problem."""


@dataclass
class ConversionReport:
    """What happened to every key."""

    source: str = "model"  # which entry of the checkpoint was read
    version: str = ""  # "v2" / "v3" (fine-grained) or "coarse"
    stripped_prefix: bool = False
    converted: Dict[str, str] = field(default_factory=dict)  # official -> fiber-det
    regenerated: List[str] = field(default_factory=list)  # buffers checked and recomputed
    dropped: List[str] = field(default_factory=list)  # keys with no counterpart, by design
    notes: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)  # no rule: error
    missing: List[str] = field(default_factory=list)  # expected by the model, not provided: error
    mismatched: List[str] = field(default_factory=list)  # wrong shape or buffer value: error
    fresh: List[str] = field(default_factory=list)  # coarse init: model keys left at their init

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.missing or self.mismatched)

    def raise_if_errors(self) -> None:
        if not self.ok:
            problems = {f"{name} key(s)": getattr(self, name) for name in ("unmatched", "missing", "mismatched")}
            raise ConversionError("checkpoint conversion failed:\n" + list_problems(problems))

    def summary(self) -> str:
        s = (f"source={self.source!r} version={self.version} converted={len(self.converted)} "
             f"regenerated={len(self.regenerated)} dropped={len(self.dropped)}")
        if self.fresh:
            s += f" fresh={len(self.fresh)}"
        if not self.ok:
            s += f" unmatched={len(self.unmatched)} missing={len(self.missing)} mismatched={len(self.mismatched)}"
        return s


def unwrap_checkpoint(checkpoint: Mapping, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], str, bool]:
    """Pick the state dict out of ``{"model": ...}``, ``{"model_ema": ...}``,
    ``{"state_dict": ...}`` or a bare dict, and strip a ``module.`` prefix carried by every key
    (the official loader's rule). Returns (state dict, entry name, prefix stripped)."""
    if use_ema:
        if "model_ema" not in checkpoint:
            raise ConversionError(f"--use-ema: the checkpoint has no 'model_ema' entry (keys: {sorted(checkpoint)[:10]})")
        sd, source = checkpoint["model_ema"], "model_ema"
    elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        sd, source = checkpoint["model"], "model"
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        sd, source = checkpoint["state_dict"], "state_dict"
    else:
        sd, source = checkpoint, "<bare>"
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not sd:
        raise ConversionError(f"no tensors found in checkpoint entry {source!r}")
    stripped = all(k.startswith("module.") for k in sd)
    if stripped:
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, source, stripped


def _expected_buffer(key: str, value: torch.Tensor, anchors) -> Optional[torch.Tensor]:
    if key.endswith("relative_position_index"):
        window = int(round(value.shape[0] ** 0.5))
        return relative_position_index(window)
    if key.endswith("embeddings.position_ids"):
        return torch.arange(value.shape[-1]).expand(1, -1)
    m = re.search(r"cell_anchors\.(\d+)$", key)
    if m and int(m.group(1)) < len(anchors):
        stride, sizes, ratios = anchors[int(m.group(1))]
        return torch.from_numpy(generate_cell_anchors(stride, sizes, ratios))
    return None


def _check_expected(new_sd, expected, report):
    if expected is None:
        return
    official = {new: old for old, new in report.converted.items()}
    for k, v in new_sd.items():
        if k not in expected:
            report.unmatched.append(f"{official[k]} -> {k} (converted name unknown to the model)")
        elif tuple(expected[k]) != tuple(v.shape):
            report.mismatched.append(f"{official[k]} -> {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}")
    report.missing += sorted(k for k in expected if k not in new_sd)


def convert_official_state_dict(
    checkpoint: Mapping,
    expected_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    use_ema: bool = False,
    anchors=FIBER_ANCHORS,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Official fine-grained checkpoint -> fiber-det state dict.

    Args:
        checkpoint: the loaded file (any accepted layout, see :func:`unwrap_checkpoint`).
        expected_shapes: {key: shape} of the target model's state dict; when given, missing
            and mis-shaped keys are errors too.
        use_ema: read ``model_ema`` instead of ``model``.
        anchors: (stride, sizes, aspect ratios) per level, to check the stored cell anchors
            (:func:`anchor_spec_from_cfg`).
    Returns:
        (state dict, report); call ``report.raise_if_errors()`` (the CLI does).
    """
    sd, source, stripped = unwrap_checkpoint(checkpoint, use_ema)
    report = ConversionReport(source=source, stripped_prefix=stripped)
    report.version = "v3" if any(V3_MARKER.search(k) for k in sd) else "v2"
    new_sd = {}
    for k, v in sd.items():
        if any(p.match(k) for p in DROPPED):
            report.dropped.append(k)
        elif any(p.match(k) for p in REGENERATED_BUFFERS):
            _check_buffer(k, v, anchors, source, report)
        else:
            new = rename_key(k)
            if new is None:
                report.unmatched.append(k)
            else:
                report.converted[k] = new
                new_sd[new] = v
    _check_expected(new_sd, expected_shapes, report)
    return new_sd, report


def _check_buffer(key, value, anchors, source, report):
    want = _expected_buffer(key, value, anchors)
    if want is None:
        report.mismatched.append(f"{key}: cannot regenerate (unexpected index)")
        return
    if want.shape != value.shape:
        report.mismatched.append(f"{key}: shape {tuple(value.shape)} vs regenerated {tuple(want.shape)}")
        return
    if torch.equal(want.to(value.dtype), value):
        report.regenerated.append(key)
    elif source == "model_ema":
        # EMA averages integer buffers in float and casts back, which can corrupt them;
        # they are regenerated anyway
        report.notes.append(f"{key}: EMA copy differs from the regenerated buffer (ignored)")
        report.regenerated.append(key)
    else:
        report.mismatched.append(f"{key}: stored values differ from the regenerated buffer")
