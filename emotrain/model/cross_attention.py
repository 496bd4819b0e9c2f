"""Cross-modal attention, both ways: audio frames attend to text tokens and text tokens to frames.

Shapes (B batch, T audio frames, L text tokens, d common width, H heads, d_h = d / H):

    audio [B, T, d], audio_mask [B, T]  ─┐
                                         ├─ CrossModalLayer × n ─→ audio' [B, T, d], text' [B, L, d]
    text  [B, L, d], text_mask  [B, L]  ─┘

Each layer: audio' = Norm(audio + Attn(q=audio, k=v=text)),  text' = Norm(text + Attn(q=text,
k=v=audio)), then a feed-forward block with residual + norm per stream (post-norm, as in the
original Transformer). Keys are masked with the other modality's padding mask, so a padded key never
contributes; padded queries produce values that the later stages ignore (they are masked again as
keys in the next layer and in pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of one modality's queries over the other modality's keys/values."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key_value = nn.Linear(hidden_size, 2 * hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """queries [B, Tq, d], keys [B, Tk, d], key_mask [B, Tk] bool (True = real) → [B, Tq, d].

        Every row of key_mask needs at least one True (an all-padding row would give NaN).
        """
        batch, num_queries, width = queries.shape
        num_keys = keys.shape[1]
        q = self.query(queries).view(batch, num_queries, self.num_heads, self.head_size).transpose(1, 2)
        # [B, Tk, 2d] → [2, B, H, Tk, d_h]: keys and values.
        kv = self.key_value(keys).view(batch, num_keys, 2, self.num_heads, self.head_size)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        # Bool mask: True = may attend. [B, 1, 1, Tk] broadcasts over heads and queries.
        attn_mask = key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, Tq, d_h]
        out = out.transpose(1, 2).reshape(batch, num_queries, width)
        return self.output(out)


class FeedForward(nn.Sequential):
    """Position-wise MLP d → 4d → d."""

    def __init__(self, hidden_size: int, dropout: float, expansion: int = 4):
        super().__init__(
            nn.Linear(hidden_size, expansion * hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * hidden_size, hidden_size),
        )


class CrossModalLayer(nn.Module):
    """One layer of attention both ways, each stream with residual + LayerNorm and a feed-forward."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.audio_to_text = CrossAttention(hidden_size, num_heads, dropout)  # audio queries text
        self.text_to_audio = CrossAttention(hidden_size, num_heads, dropout)  # text queries audio
        self.audio_attention_norm = nn.LayerNorm(hidden_size)
        self.text_attention_norm = nn.LayerNorm(hidden_size)
        self.audio_feed_forward = FeedForward(hidden_size, dropout)
        self.text_feed_forward = FeedForward(hidden_size, dropout)
        self.audio_feed_forward_norm = nn.LayerNorm(hidden_size)
        self.text_feed_forward_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, audio: torch.Tensor, audio_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T, d], audio_mask [B, T], text [B, L, d], text_mask [B, L] → (audio', text')."""
        # Both directions read this layer's inputs, so neither sees the other's update first.
        attended_audio = self.audio_to_text(audio, text, text_mask)  # [B, T, d]
        attended_text = self.text_to_audio(text, audio, audio_mask)  # [B, L, d]
        audio = self.audio_attention_norm(audio + self.dropout(attended_audio))
        text = self.text_attention_norm(text + self.dropout(attended_text))
        audio = self.audio_feed_forward_norm(audio + self.dropout(self.audio_feed_forward(audio)))
        text = self.text_feed_forward_norm(text + self.dropout(self.text_feed_forward(text)))
        return audio, text


class CrossModalAttention(nn.Module):
    """A stack of `num_layers` CrossModalLayers (see the module docstring for shapes)."""

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossModalLayer(hidden_size, num_heads, dropout) for _ in range(num_layers)
        )

    def forward(
        self, audio: torch.Tensor, audio_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            audio, text = layer(audio, audio_mask, text, text_mask)
        return audio, text
