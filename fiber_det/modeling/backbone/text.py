"""BERT/RoBERTa-style text encoder whose last layers carry FIBER's text->image cross-attention.

Parameter names follow HF BERT/RoBERTa (``embeddings.*``, ``encoder.layer.k.attention.self.query``
...) so HF checkpoints and official FIBER checkpoints load by name. HF's own layers cannot be
reused: FIBER's cross-attention takes 512/1024-d image keys and is added to the self-attention
output *before* the residual and LayerNorm, and the coarse-grained model's fused path skips the
last layer's output LayerNorm (``last_norm``).

Shapes: B batch, T tokens, D hidden size (768 for roberta-base, 384 for MiniLM).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from .frozen import FrozenModulesMixin

__all__ = ["TextEncoderConfig", "TextEncoder", "TextLayer", "extended_attention_mask"]


@dataclass
class TextEncoderConfig:
    """Architecture of the text tower; field names are those of a HF BERT/RoBERTa config.

    ``position_style`` is "roberta" (positions counted from ``pad_token_id + 1`` over non-pad
    tokens, pads at ``pad_token_id``) or "bert" (0..T-1).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    position_style: str = "roberta"

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "TextEncoderConfig":
        """From a ``transformers`` BertConfig/RobertaConfig (or its ``to_dict()``)."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type", "bert")
        if model_type not in ("bert", "roberta"):
            raise ValueError(f"unsupported text model_type {model_type!r} (bert or roberta)")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r}: only exact 'gelu' is supported")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        fields = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        fields["position_style"] = model_type
        fields.update(overrides)
        return cls(**fields)


def extended_attention_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive mask: 0 for tokens, finfo(dtype).min for pads
    (what ``get_extended_attention_mask`` of recent transformers releases returns)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TextEmbeddings(nn.Module):
    """word + token-type(0) + position embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        pad = cfg.pad_token_id if cfg.position_style == "roberta" else None
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.position_style = cfg.position_style
        self.pad_token_id = cfg.pad_token_id

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.position_style == "roberta":
            # RoBERTa: real tokens get pad+1, pad+2, ...; pads get pad (so 2.. and 1 for roberta)
            not_pad = input_ids.ne(self.pad_token_id).long()
            return torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D). Token types are all 0 (FIBER never passes them)."""
        x = self.word_embeddings(input_ids)
        x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        x = x + self.position_embeddings(self.position_ids(input_ids))
        return self.dropout(self.LayerNorm(x))


class MultiHeadAttention(nn.Module):
    """HF-style attention core: ``query``/``key``/``value`` Linears, scores / sqrt(d_head),
    additive mask, softmax, dropout. Keys/values may have another width than queries.

    ``sdpa``: the same through ``F.scaled_dot_product_attention`` (other float rounding; its own
    dropout draws in training)."""

    def __init__(self, hidden: int, heads: int, kv_dim: Optional[int], dropout: float, sdpa: bool = False):
        super().__init__()
        self.sdpa = sdpa
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} not divisible by {heads} heads")
        self.heads, self.head_dim = heads, hidden // heads
        kv_dim = kv_dim or hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden, kv=None, mask=None):
        """hidden (B, T, D), kv (B, S, D_kv) or None (self-attention), mask (B, 1, 1, S)."""
        kv = hidden if kv is None else kv
        q = self._split(self.query(hidden))
        k, v = self._split(self.key(kv)), self._split(self.value(kv))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                dropout_p=self.dropout.p if self.training else 0.0,
            )
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            ctx = torch.matmul(self.dropout(scores.softmax(dim=-1)), v)
        ctx = ctx.permute(0, 2, 1, 3)
        return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)


class _Dense(nn.Module):
    """``dense`` Linear + dropout (+ an optional ``LayerNorm`` owned here, applied by the layer)."""

    def __init__(self, d_in: int, d_out: int, dropout: float, eps: Optional[float]):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.dropout = nn.Dropout(dropout)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x):
        return self.dropout(self.dense(x))


class _AttentionBlock(nn.Module):
    """``self`` (the attention core) + ``output`` (dense, dropout [, LayerNorm])."""

    def __init__(self, cfg: TextEncoderConfig, kv_dim: Optional[int], with_norm: bool, sdpa: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.self = MultiHeadAttention(d, cfg.num_attention_heads, kv_dim, cfg.attention_probs_dropout_prob, sdpa)
        self.output = _Dense(d, d, cfg.hidden_dropout_prob, cfg.layer_norm_eps if with_norm else None)


class TextLayer(nn.Module):
    """One transformer layer; with ``image_dim`` it also attends to image tokens:

        a  = dropout(dense(SelfAttn(h)))                     # no residual yet
        a += alpha_t2i * dropout(dense_c(CrossAttn(q=a, kv=image)))   # fused layers only
        h1 = LN(a + h);  out = LN(dropout(dense(GELU(intermediate(h1)))) + h1)

    The cross-attention's keys/values are the image tokens as they are (no mask, no norm). With
    ``alpha_t2i`` = 0 or no image this is exactly a BERT/RoBERTa layer. ``last_norm=False`` leaves
    out the final LN (the official coarse model's last fused text layer).
    """

    def __init__(self, cfg: TextEncoderConfig, image_dim: Optional[int] = None, sdpa: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.attention = _AttentionBlock(cfg, None, with_norm=True, sdpa=sdpa)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, cfg.intermediate_size)
        self.act = nn.GELU()
        self.output = _Dense(cfg.intermediate_size, d, cfg.hidden_dropout_prob, cfg.layer_norm_eps)
        self.image_dim = image_dim
        if image_dim is not None:
            self.crossattention_t2i = _AttentionBlock(cfg, image_dim, with_norm=False, sdpa=sdpa)
            self.alpha_t2i = nn.Parameter(torch.zeros(1))

    def forward(self, hidden, mask, image_tokens=None, last_norm: bool = True):
        """hidden (B, T, D), mask (B, 1, 1, T) additive, image_tokens (B, S, image_dim) or None
        -> (B, T, D)."""
        a = self.attention.output(self.attention.self(hidden, mask=mask))
        if image_tokens is not None and self.image_dim is not None:
            c = self.crossattention_t2i.self(a, kv=image_tokens)  # no mask over image tokens
            a = a + self.alpha_t2i * self.crossattention_t2i.output(c)
        h1 = self.attention.output.LayerNorm(a + hidden)
        y = self.output(self.act(self.intermediate.dense(h1)))
        return self.output.LayerNorm(y + h1) if last_norm else y + h1


class TextEncoder(FrozenModulesMixin, nn.Module):
    """Embeddings + ``encoder.layer``; layer k gets cross-attention to image tokens of width
    ``image_dims[k]`` (None for a plain layer).

    FIBER (RoBERTa-base, 12 layers): layers 6-9 attend to Swin stage-3 tokens (512-d), 10-11 to
    stage-4 tokens (1024-d). The layers are run one at a time by the fusion backbone
    (:meth:`embed`, :meth:`run_layer`); :meth:`forward` runs them without images.
    """

    def __init__(self, cfg: TextEncoderConfig, image_dims: Optional[Sequence[Optional[int]]] = None,
                 use_checkpoint: bool = False, sdpa: bool = False):
        super().__init__()
        self.config = cfg
        image_dims = list(image_dims) if image_dims is not None else [None] * cfg.num_hidden_layers
        if len(image_dims) != cfg.num_hidden_layers:
            raise ValueError(f"image_dims has {len(image_dims)} entries for {cfg.num_hidden_layers} layers")
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TextLayer(cfg, dim, sdpa) for dim in image_dims)
        self.use_checkpoint = use_checkpoint
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # HF BERT init (std 0.02, zero bias, LayerNorm 1/0); pretrained weights replace it
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def freeze(self, freeze_at: int) -> None:
        """Detectron2's FREEZE_AT convention on the text tower: ``freeze_at >= 1`` freezes the
        embeddings, ``freeze_at = k >= 2`` also layers 0..k-2. Frozen modules stay in eval mode
        (no dropout), as frozen Swin stages do, so a frozen prefix is a fixed function of the ids."""
        if freeze_at < 0 or freeze_at > self.num_layers + 1:
            raise ValueError(f"MODEL.FIBER.TEXT.FREEZE_AT = {freeze_at}: expected 0..{self.num_layers + 1} "
                             f"(embeddings + {self.num_layers} layers)")
        modules = [self.embeddings] if freeze_at >= 1 else []
        modules += [self.encoder.layer[k] for k in range(max(0, freeze_at - 1))]
        self.freeze_modules(modules)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def run_layer(self, k: int, hidden, mask, image_tokens=None, last_norm: bool = True):
        """Layer k on hidden (B, T, D) with additive mask (B, 1, 1, T) (see :class:`TextLayer`)."""
        layer = self.encoder.layer[k]
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(layer, hidden, mask, image_tokens, last_norm, use_reentrant=False)
        return layer(hidden, mask, image_tokens, last_norm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text only: (B, T) ids and 0/1 mask -> (B, T, D) last hidden states."""
        mask = extended_attention_mask(attention_mask)
        h = self.embed(input_ids)
        for k in range(self.num_layers):
            h = self.run_layer(k, h, mask)
        return h
