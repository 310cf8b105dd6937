"""The coarse model's small heads, with the official module names (so official checkpoints load
by name): poolers, the MLM head and the ITM head, and the official initialisation.
"""
import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

__all__ = ["Pooler", "MLMHead", "ITMHead", "init_head_weights"]


class Pooler(nn.Module):
    """tanh(dense(x[:, 0])): (B, N, H) -> (B, H), the first token (text: ``<s>``; image: the
    token mean, passed as a one-token sequence)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MLMHead(nn.Module):
    """BERT's prediction head on the fused text features: dense -> exact GELU -> LayerNorm ->
    ``decoder`` (no bias) + a separate ``bias``.

    Official details kept: the LayerNorm eps is BERT's default 1e-12 (the official head is built
    from a fresh ``RobertaConfig``, not from roberta-base's 1e-5), and the decoder is untied from
    the word embeddings and not initialised from roberta-base's LM head.
    """

    def __init__(self, dim: int, vocab_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        config = BertConfig(hidden_size=dim, hidden_act="gelu", layer_norm_eps=layer_norm_eps)
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, vocab) logits."""
        return self.decoder(self.transform(x)) + self.bias


class ITMHead(nn.Module):
    """``fc``: Linear(2H, 2) on the fused pooled features; logits [no match, match].

    The official model also has ``rank_output`` (Linear -> 1), whose weight and bias are views of
    ``fc``'s row 1 (the "match" row) and which scores ITM retrieval; here the retrieval score is
    :meth:`match_logit`, the same numbers without a second parameter.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """(B, 2H) -> (B, 2)."""
        return self.fc(cls_feats)

    def match_logit(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """(B, 2H) -> (B,) the "match" logit alone (official ``rank_output(cls_feats)[:, 0]``)."""
        return nn.functional.linear(cls_feats, self.fc.weight[1:], self.fc.bias[1:])[:, 0]


def init_head_weights(module: nn.Module) -> None:
    """The official head initialisation (``objectives.init_weights``): Linear/Embedding weights
    N(0, 0.02), biases 0, LayerNorm 1 / 0. Use with ``module.apply``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
