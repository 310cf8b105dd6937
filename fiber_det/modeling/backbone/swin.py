"""Swin Transformer whose blocks can carry FIBER's image->text cross-attention.

Parameter names follow the upstream Swin (and Detectron2's later ``swin.py``): ``patch_embed``,
``layers.i.blocks.j.{norm1,attn,norm2,mlp}``, ``layers.i.downsample``, ``norm{i}``, so an official
checkpoint converts by a prefix rename. The image->text cross-attention (spec §2.2) is an
optional part of :class:`WindowAttention`; FIBER's v3 query LayerNorm is the flag
``i2t_query_norm``, not a copy of the module.

Token tensors are (B, H*W, C) in row-major (y, x) order; feature maps are NCHW.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

__all__ = ["SwinTransformer", "SwinBlock", "WindowAttention", "SWIN_PRESETS", "TextContext"]

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


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows of one image contiguous."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """The standard Swin index (window², window²) into the (2·window − 1)² bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, optionally followed by
    FIBER's gated image->text cross-attention (spec §2.2).

    The cross-attention query is the self-attention output after ``proj`` (LayerNorm-ed by
    ``norm_i2t_i`` when ``i2t_query_norm``, FIBER v3); keys/values come from the text hidden
    states through ``qkv_text_i2t``; the result is scaled by the gate ``alpha_i2t`` and added to
    the self-attention output, i.e. it shares the block's residual branch.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        text_dim: Optional[int] = None,
        i2t_query_norm: bool = False,
    ):
        super().__init__()
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
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()
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
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)) + text.additive_mask
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_i2t(y)

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
    """Pre-norm Swin block: x + DropPath(W-MSA(LN(x)) [+ α·i2t]); x + DropPath(MLP(LN(x)))."""

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
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, text_dim, i2t_query_norm)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def fused(self) -> bool:
        return self.attn.text_dim is not None

    def forward(self, x, height: int, width: int, shift_mask=None, text: Optional[TextContext] = None):
        """
        Args:
            x: (B, H*W, C) tokens; height, width: H, W.
            shift_mask: the stage's (nW, N, N) mask, used only if this block is shifted.
            text: paired text state for fused blocks.
        Returns:
            (B, H*W, C).
        """
        b, hw, c = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        # zero-pad the *normalised* tokens to window multiples (bottom/right)
        pad_r, pad_b = (ws - width % ws) % ws, (ws - height % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shift_mask = None
        windows = self.attn(window_partition(x, ws), shift_mask, text)
        x = window_reverse(windows, ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
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
        """(nW, N, N) attention mask of the shifted windows for an (H, W) map: 0 within a
        region, -100.0 across regions (upstream value, not -inf)."""
        ws, ss = self.window_size, self.shift_size
        # ceil to window multiples with non-negative operands only: traced for ONNX, a floor
        # division of a negative size becomes ONNX Div, which truncates (a wrong, smaller mask)
        hp, wp = (height + ws - 1) // ws * ws, (width + ws - 1) // ws * ws
        img = torch.zeros((1, hp, wp, 1), device=device)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
            for wsl in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        mw = window_partition(img, ws).squeeze(-1)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class SwinTransformer(nn.Module):
    """Swin backbone; blocks listed in ``fused_blocks`` carry image->text cross-attention.

    ``forward`` runs the whole pyramid; the fusion backbone drives the text side through the
    ``fusion_step`` callback, called once per fused block with the block's input tokens.
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
        num_fused_blocks: int = 0,
        i2t_query_norm: bool = False,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            embed_dim, depths, num_heads, window_size, mlp_ratio, patch_size: Swin geometry.
            drop_path_rate: the last block's drop-path rate (linear from 0 over all blocks).
            out_indices: stages whose outputs are returned (each gets ``norm{i}``).
            text_dim: width of the text hidden states the fused blocks attend to.
            num_fused_blocks: the last N blocks (over all stages) get image->text attention.
            i2t_query_norm: FIBER v3's LayerNorm on the cross-attention query.
            use_checkpoint: activation checkpointing of every block in training.
        """
        super().__init__()
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.use_checkpoint = use_checkpoint
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        total = sum(depths)
        if not 0 <= num_fused_blocks <= total:
            raise ValueError(f"num_fused_blocks={num_fused_blocks} outside [0, {total}]")
        if num_fused_blocks and text_dim is None:
            raise ValueError("fused blocks need text_dim")
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, total, device="cpu")]
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        self.layers = nn.ModuleList()
        k = 0
        for i, depth in enumerate(depths):
            dim = self.num_features[i]
            blocks = []
            for j in range(depth):
                fused = k >= total - num_fused_blocks
                blocks.append(
                    SwinBlock(
                        dim, num_heads[i], window_size, 0 if j % 2 == 0 else window_size // 2,
                        mlp_ratio, dpr[k], text_dim if fused else None, i2t_query_norm,
                    )
                )
                k += 1
            down = PatchMerging(dim) if i < self.num_layers - 1 else None
            self.layers.append(BasicLayer(blocks, down, window_size))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SwinTransformer":
        """Swin-T/S/B/L geometry from :data:`SWIN_PRESETS`; ``kwargs`` override or add arguments."""
        if name not in SWIN_PRESETS:
            raise ValueError(f"unknown Swin preset {name!r}; choose from {sorted(SWIN_PRESETS)}")
        return cls(**{**SWIN_PRESETS[name], **kwargs})

    def _patch_embed(self, images):
        ps = self.patch_size
        _, _, h, w = images.shape
        images = F.pad(images, (0, (ps - w % ps) % ps, 0, (ps - h % ps) % ps))
        x = self.patch_embed.proj(images)
        hh, ww = x.shape[-2:]
        return self.patch_embed.norm(x.flatten(2).transpose(1, 2)), hh, ww

    def _run_block(self, blk, x, h, w, mask, text):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(blk, x, h, w, mask, text, use_reentrant=False)
        return blk(x, h, w, mask, text)

    def forward(self, images: torch.Tensor, fusion_step=None) -> dict:
        """
        Args:
            images: (B, 3, H, W) normalised images.
            fusion_step: callable ``(image_tokens (B, h*w, C)) -> TextContext`` invoked once per
                fused block, before the block runs, with the block's input tokens; it returns the
                text state the block attends to (and advances the text tower). None runs the
                fused blocks without cross-attention.
        Returns:
            {"res{i+2}": (B, C_i, H/stride_i, W/stride_i)} for i in ``out_indices`` (Detectron2
            naming: res2 is the stride-4 stage 0, ..., res5 the stride-32 stage 3).
        """
        x, h, w = self._patch_embed(images)
        outs = {}
        for i, layer in enumerate(self.layers):
            mask = layer.shift_mask(h, w, x.device).to(x.dtype)
            for blk in layer.blocks:
                text = fusion_step(x) if (blk.fused and fusion_step is not None) else None
                x = self._run_block(blk, x, h, w, mask, text)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(x)
                outs[f"res{i + 2}"] = out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            if layer.downsample is not None:
                x = layer.downsample(x, h, w)
                h, w = (h + 1) // 2, (w + 1) // 2
        return outs

    def freeze(self, freeze_at: int) -> None:
        """Detectron2 semantics: ``freeze_at >= 1`` freezes the patch embedding (the "stem"),
        ``freeze_at = k >= 2`` also Swin stages 0..k-2. Official FIBER's
        ``FREEZE_CONV_BODY_AT`` = 2 is ``freeze_at`` 2 (see fiber_det.checkpoint.official_config)."""
        modules = []
        if freeze_at >= 1:
            modules.append(self.patch_embed)
        modules += [self.layers[i] for i in range(min(freeze_at - 1, self.num_layers))]
        self._frozen = modules
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", []):
            m.eval()
        return self


def _init_weights(m):
    # upstream Swin init (only matters for training from scratch)
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
