"""Swin Transformer whose blocks can carry FIBER's image->text cross-attention.

Parameter names follow the upstream Swin (and Detectron2's later ``swin.py``): ``patch_embed``,
``layers.i.blocks.j.{norm1,attn,norm2,mlp}``, ``layers.i.downsample``, ``norm{i}`` (stage outputs)
and ``norm`` (the classifier's final norm), so an official checkpoint converts by a prefix rename.
The image->text cross-attention is an optional part of :class:`WindowAttention`; FIBER's v3 query
LayerNorm is the flag ``i2t_query_norm``, not a copy of the module.

The two FIBER stages use two Swin flavours, selected by flags rather than two classes:
- fine-grained (Swin-Det): any input size, tokens zero-padded to window multiples, every odd
  block shifted, ``norm{i}`` on the returned stage outputs;
- coarse-grained (timm): fixed S x S input, window S / 32, a block whose token map fits in one
  window runs unshifted (``shift_single_window=False``), one final ``norm`` and no ``norm{i}``.

The pyramid runs in pieces (:meth:`SwinTransformer.embed`, :meth:`SwinTransformer.run`) so that
the fusion backbone can stop before the first fused block (the text-independent image prefix)
and run the fused blocks interleaved with the text tower.

Token tensors are (B, H*W, C) in row-major (y, x) order; feature maps are NCHW.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .frozen import FrozenModulesMixin
from .windows import relative_position_index, shift_window_mask, window_partition, window_reverse

__all__ = ["SwinTransformer", "SwinBlock", "SwinState", "WindowAttention", "SWIN_PRESETS", "TextContext", "FusionStep"]

# embed dim, depths, heads, window (ImageNet-22k 384 variants use window 12, as FIBER does)
SWIN_PRESETS = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


class TextContext:
    """The text side as seen by a fused Swin block.

    Attributes:
        hidden: (B, T, D_text) text hidden states entering the paired text layer.
        additive_mask: (B, 1, 1, T) float mask, 0 for real tokens and a huge negative value for
            padding (HF "extended" mask), added to the image->text attention logits.
    """

    def __init__(self, hidden: torch.Tensor, additive_mask: torch.Tensor):
        self.hidden = hidden
        self.additive_mask = additive_mask


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear (Swin's MLP; dropout is 0 in FIBER and omitted)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, optionally followed by
    FIBER's gated image->text cross-attention.

    The cross-attention query is the self-attention output after ``proj`` (LayerNorm-ed by
    ``norm_i2t_i`` when ``i2t_query_norm``, FIBER v3); keys/values come from the text hidden
    states through ``qkv_text_i2t``; the result is scaled by the gate ``alpha_i2t`` and added to
    the self-attention output, i.e. it shares the block's residual branch.

    ``sdpa`` computes both attentions with ``F.scaled_dot_product_attention`` (relative position
    bias and shift mask passed as its additive mask): the same function, other float rounding
    (about 1e-6), faster. The window self-attention keeps the upstream matmul / softmax sequence
    while its bias table is being trained (fused kernels give no gradient to a mask).
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        text_dim: Optional[int] = None,
        i2t_query_norm: bool = False,
        sdpa: bool = False,
    ):
        super().__init__()
        self.sdpa = sdpa
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # regenerated, never loaded: integer buffers must not come from (EMA) checkpoints
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

        self.text_dim = text_dim
        if text_dim is not None:
            self.qkv_text_i2t = nn.Linear(text_dim, dim * 2)  # [K; V] from text tokens
            self.qkv_i2t = nn.Linear(dim, dim)  # Q only, despite the upstream name
            self.proj_i2t = nn.Linear(dim, dim)
            self.alpha_i2t = nn.Parameter(torch.zeros(1))
            self.norm_i2t_i = nn.LayerNorm(dim) if i2t_query_norm else None

    def _self_attention(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()
        if self.sdpa and not (bias.requires_grad and torch.is_grad_enabled()):
            # one additive mask per window (bias + shift mask), materialised: the fused CPU
            # kernel is slower on broadcast (stride-0) masks. A mask that needs a gradient (a
            # trained bias table) has no fused kernel: the matmul path below is faster then.
            mask = bias.unsqueeze(0) if shift_mask is None else bias.unsqueeze(0) + shift_mask.unsqueeze(1)
            mask = mask.to(q.dtype).unsqueeze(0).expand(bw // mask.shape[0], *mask.shape)
            mask = mask.reshape(bw, self.num_heads, n, n)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            return self.proj(x.transpose(1, 2).reshape(bw, n, c))
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + bias.unsqueeze(0)
        if shift_mask is not None:
            nw = shift_mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + shift_mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)

    def _image_to_text(self, s: torch.Tensor, text: TextContext) -> torch.Tensor:
        # All windows of image b attend to the text of image b. Instead of repeating the text
        # keys per window (upstream repeat_interleave), fold the windows into the query axis:
        # the same per-query softmax over text tokens, without nW copies of K/V.
        bw, n, c = s.shape
        b, t, _ = text.hidden.shape
        heads, hd = self.num_heads, c // self.num_heads
        q_in = self.norm_i2t_i(s) if self.norm_i2t_i is not None else s
        q = self.qkv_i2t(q_in).reshape(b, bw // b * n, heads, hd).transpose(1, 2)
        kv = self.qkv_text_i2t(text.hidden).reshape(b, t, 2, heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=text.additive_mask.to(q.dtype), scale=self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)) + text.additive_mask
            y = attn.softmax(dim=-1) @ v
        return self.proj_i2t(y.transpose(1, 2).reshape(bw, n, c))

    def forward(
        self,
        x: torch.Tensor,
        shift_mask: Optional[torch.Tensor] = None,
        text: Optional[TextContext] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B * nW, N, C) window tokens, N = window².
            shift_mask: (nW, N, N) with 0 / -100 entries for shifted windows, else None.
            text: the paired text state; only used by blocks built with ``text_dim``.
        Returns:
            (B * nW, N, C).
        """
        s = self._self_attention(x, shift_mask)
        if text is not None and self.text_dim is not None:
            s = s + self.alpha_i2t * self._image_to_text(s, text)
        return s


class SwinBlock(nn.Module):
    """Pre-norm Swin block: x + DropPath(W-MSA(LN(x)) [+ α·i2t]); x + DropPath(MLP(LN(x))).

    ``shift_single_window=False`` is timm's rule (the coarse-grained model): a token map that fits
    in one window is attended to as that one window without the cyclic shift. With True (Swin-Det,
    the fine-grained model) odd blocks always shift. The two agree whenever the map spans more than
    one window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
        text_dim: Optional[int] = None,
        i2t_query_norm: bool = False,
        shift_single_window: bool = True,
        sdpa: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.shift_single_window = shift_single_window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, text_dim, i2t_query_norm, sdpa)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def fused(self) -> bool:
        return self.attn.text_dim is not None

    def shifts(self, height: int, width: int) -> bool:
        """Whether the block applies the cyclic shift on an (H, W) token map."""
        if self.shift_size == 0:
            return False
        return self.shift_single_window or height > self.window_size or width > self.window_size

    def forward(self, x, height: int, width: int, shift_mask=None, text: Optional[TextContext] = None):
        """
        Args:
            x: (B, H*W, C) tokens; height, width: H, W.
            shift_mask: the stage's (nW, N, N) mask, used only if this block shifts.
            text: paired text state for fused blocks.
        Returns:
            (B, H*W, C).
        """
        b, hw, c = x.shape
        ws = self.window_size
        shift = self.shift_size if self.shifts(height, width) else 0
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        # zero-pad the *normalised* tokens to window multiples (bottom/right)
        pad_r, pad_b = (ws - width % ws) % ws, (ws - height % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), shift_mask if shift else None, text)
        x = window_reverse(windows, ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, hw, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbour concat (order (0,0), (1,0), (0,1), (1,1)) -> LayerNorm(4C) -> Linear(4C, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, height: int, width: int):
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    """One Swin stage: ``blocks`` and an optional ``downsample`` (PatchMerging)."""

    def __init__(self, blocks: List[SwinBlock], downsample: Optional[PatchMerging], window_size: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.window_size = window_size
        self.shift_size = window_size // 2

    def shift_mask(self, height: int, width: int, device) -> torch.Tensor:
        """The stage's (nW, N, N) shifted-window mask for an (H, W) map (:func:`shift_window_mask`)."""
        return shift_window_mask(height, width, self.window_size, self.shift_size, device)


@dataclass
class SwinState:
    """The image side part-way through the pyramid.

    Attributes:
        tokens: (B, H*W, C) tokens entering block ``next_block`` (after the previous stage's
            PatchMerging when a stage was completed); after the last block, the raw output of the
            last stage (no norm).
        height, width: H, W of the token map.
        next_block: flat index (over all stages) of the next block to run.
        stage_outputs: {"res{i+2}": (B, C_i, H_i, W_i)} normalised outputs of the completed
            stages listed in ``out_indices``.
    """

    tokens: torch.Tensor
    height: int
    width: int
    next_block: int = 0
    stage_outputs: Dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(states: Sequence["SwinState"]) -> "SwinState":
        """The batch of the given states, in order (the same token map size and block)."""
        first = states[0]
        if any((s.height, s.width, s.next_block) != (first.height, first.width, first.next_block) for s in states):
            raise ValueError("SwinState.cat: the states differ in token map size or next block")
        return SwinState(torch.cat([s.tokens for s in states]), first.height, first.width, first.next_block,
                         {k: torch.cat([s.stage_outputs[k] for s in states]) for k in first.stage_outputs})


# called before a fused block with (flat block index, the block's input tokens (B, H*W, C));
# returns the text state that block attends to
FusionStep = Callable[[int, torch.Tensor], TextContext]


class SwinTransformer(FrozenModulesMixin, nn.Module):
    """Swin backbone whose blocks listed in ``fused_blocks`` carry image->text cross-attention.

    :meth:`forward` runs the whole pyramid and returns the normalised stage outputs; the fusion
    backbone runs it in pieces (:meth:`embed`, :meth:`run`) and drives the text side through a
    :data:`FusionStep` callback, called once per fused block with the block's input tokens.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (1, 2, 3),
        text_dim: Optional[int] = None,
        fused_blocks: Sequence[Tuple[int, int]] = (),
        i2t_query_norm: bool = False,
        shift_single_window: bool = True,
        final_norm: bool = False,
        use_checkpoint: bool = False,
        sdpa: bool = False,
    ):
        """
        Args:
            embed_dim, depths, num_heads, window_size, mlp_ratio, patch_size: Swin geometry.
            drop_path_rate: the last block's drop-path rate (linear from 0 over all blocks).
            out_indices: stages whose outputs are returned (each gets ``norm{i}``).
            text_dim: width of the text hidden states the fused blocks attend to.
            fused_blocks: (stage, block) of every block that gets image->text attention; the
                fusion backbone (``fusion.py``) decides which.
            i2t_query_norm: FIBER v3's LayerNorm on the cross-attention query.
            shift_single_window: False for timm's rule (see :class:`SwinBlock`).
            final_norm: create the classifier's final LayerNorm ``norm`` over the last stage
                (applied by the caller, e.g. the coarse model's contrastive image path).
            use_checkpoint: activation checkpointing of every block in training.
            sdpa: attention through ``torch.nn.functional.scaled_dot_product_attention`` (the
                same function up to float rounding; see :class:`WindowAttention`).
        """
        super().__init__()
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.use_checkpoint = use_checkpoint
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        fused = {tuple(b) for b in fused_blocks}
        unknown = sorted(b for b in fused if not (0 <= b[0] < len(depths) and 0 <= b[1] < depths[b[0]]))
        if unknown:
            raise ValueError(f"fused_blocks {unknown} do not exist in a Swin with depths {tuple(depths)}")
        if fused and text_dim is None:
            raise ValueError("fused blocks need text_dim")
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        self.block_positions: List[Tuple[int, int]] = [(i, j) for i, d in enumerate(depths) for j in range(d)]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, len(self.block_positions), device="cpu")]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim, first = self.num_features[i], sum(depths[:i])
            blocks = [
                SwinBlock(dim, num_heads[i], window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio,
                          dpr[first + j], text_dim if (i, j) in fused else None, i2t_query_norm, shift_single_window,
                          sdpa)
                for j in range(depth)
            ]
            self.layers.append(BasicLayer(blocks, PatchMerging(dim) if i < self.num_layers - 1 else None, window_size))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.norm = nn.LayerNorm(self.num_features[-1]) if final_norm else None
        self.apply(_init_weights)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SwinTransformer":
        """Swin-T/S/B/L geometry from :data:`SWIN_PRESETS`; ``kwargs`` override or add arguments."""
        if name not in SWIN_PRESETS:
            raise ValueError(f"unknown Swin preset {name!r}; choose from {sorted(SWIN_PRESETS)}")
        return cls(**{**SWIN_PRESETS[name], **kwargs})

    @property
    def num_blocks(self) -> int:
        return len(self.block_positions)

    def block(self, k: int) -> SwinBlock:
        """The block at flat index k (over all stages)."""
        i, j = self.block_positions[k]
        return self.layers[i].blocks[j]

    def embed(self, images: torch.Tensor) -> SwinState:
        """(B, 3, H, W) normalised images -> the state before block 0 (patch embedding, its
        LayerNorm; inputs zero-padded to a multiple of the patch size)."""
        ps = self.patch_size
        _, _, h, w = images.shape
        images = F.pad(images, (0, (ps - w % ps) % ps, 0, (ps - h % ps) % ps))
        x = self.patch_embed.proj(images)
        hh, ww = x.shape[-2:]
        return SwinState(self.patch_embed.norm(x.flatten(2).transpose(1, 2)), hh, ww)

    def _run_block(self, blk, x, h, w, mask, text):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(blk, x, h, w, mask, text, use_reentrant=False)
        return blk(x, h, w, mask, text)

    def run(self, state: SwinState, stop: Optional[int] = None, fusion_step: Optional[FusionStep] = None) -> SwinState:
        """Runs blocks ``state.next_block`` .. ``stop - 1`` (None: to the end).

        A stage's output (``norm{i}`` applied when i is in ``out_indices``) is recorded and its
        PatchMerging applied right after its last block. ``fusion_step`` None runs the fused
        blocks without cross-attention. Returns a new state; ``state`` is not modified.
        """
        stop = self.num_blocks if stop is None else stop
        x, h, w = state.tokens, state.height, state.width
        outs = dict(state.stage_outputs)
        masks: Dict[int, torch.Tensor] = {}
        for k in range(state.next_block, stop):
            i, j = self.block_positions[k]
            layer, blk = self.layers[i], self.layers[i].blocks[j]
            mask = None
            if blk.shifts(h, w):
                if i not in masks:
                    masks[i] = layer.shift_mask(h, w, x.device).to(x.dtype)
                mask = masks[i]
            text = fusion_step(k, x) if (blk.fused and fusion_step is not None) else None
            x = self._run_block(blk, x, h, w, mask, text)
            if j == len(layer.blocks) - 1:
                if i in self.out_indices:
                    out = getattr(self, f"norm{i}")(x)
                    outs[f"res{i + 2}"] = out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
                if layer.downsample is not None:
                    x = layer.downsample(x, h, w)
                    h, w = (h + 1) // 2, (w + 1) // 2
        return SwinState(x, h, w, max(stop, state.next_block), outs)

    def forward(self, images: torch.Tensor, fusion_step: Optional[FusionStep] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W) normalised images.
            fusion_step: see :data:`FusionStep`; None runs the fused blocks without cross-attention.
        Returns:
            {"res{i+2}": (B, C_i, H/stride_i, W/stride_i)} for i in ``out_indices`` (Detectron2
            naming: res2 is the stride-4 stage 0, ..., res5 the stride-32 stage 3).
        """
        return self.run(self.embed(images), fusion_step=fusion_step).stage_outputs

    def freeze(self, freeze_at: int) -> None:
        """Detectron2 semantics: ``freeze_at >= 1`` freezes the patch embedding (the "stem"),
        ``freeze_at = k >= 2`` also Swin stages 0..k-2. Official FIBER's
        ``FREEZE_CONV_BODY_AT`` = 2 is ``freeze_at`` 2 (see fiber_det.checkpoint.official_config)."""
        modules = []
        if freeze_at >= 1:
            modules.append(self.patch_embed)
        modules += [self.layers[i] for i in range(min(freeze_at - 1, self.num_layers))]
        self.freeze_modules(modules)


def _init_weights(m):
    # upstream Swin init (only matters for training from scratch)
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
