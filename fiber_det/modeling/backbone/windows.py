"""Window geometry of the Swin: partition / reverse, the relative-position index, and the
attention mask of cyclically shifted windows. Token maps are (B, H, W, C)."""
import torch

__all__ = ["window_partition", "window_reverse", "relative_position_index", "shift_window_mask"]


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


def shift_window_mask(height: int, width: int, window: int, shift: int, device=None) -> torch.Tensor:
    """(nW, N, N) attention mask of cyclically shifted windows over an (H, W) map padded to
    window multiples: 0 between tokens of the same region, -100.0 across regions (the upstream
    value, not -inf). N = window²."""
    # ceil to window multiples with non-negative operands only: traced for ONNX, a floor
    # division of a negative size becomes ONNX Div, which truncates (a wrong, smaller mask)
    hp, wp = (height + window - 1) // window * window, (width + window - 1) // window * window
    img = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for wsl in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img, window).squeeze(-1)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
