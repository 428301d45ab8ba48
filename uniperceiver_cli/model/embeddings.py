"""Text and visual token embeddings (before the LayerNorm they share)."""

from __future__ import annotations

import torch
from torch import nn

from uniperceiver_cli.model.config import SPE_ID, ModelConfig


def sincos_2d(grid: int, dim: int, scale: float = 1.0, temperature: float = 10000.0) -> torch.Tensor:
    """The frozen 2-D sin-cos table: row m is [sin(r w), cos(r w), sin(c w), cos(c w)].

    ``r = (m // grid) * scale`` is the patch row, ``c = (m % grid) * scale`` its column and
    ``w_k = temperature ** (-k / (dim / 4))``. Returns (grid * grid, dim).
    """
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    rows, cols = rows.flatten() * scale, cols.flatten() * scale
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    r, c = rows[:, None] * omega[None], cols[:, None] * omega[None]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


class TextEmbedding(nn.Module):
    """word + learned absolute position + the text type vector; <|spe|> can carry a prompt-tuned bias."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.width)
        self.position = nn.Embedding(config.max_text_len, config.width)
        self.text_type = nn.Parameter(torch.zeros(config.width))
        self.spe_bias = nn.Parameter(torch.zeros(config.width)) if config.prompt.spe_bias else None
        self.register_buffer("spe_id", torch.tensor([SPE_ID]), persistent=False)  # on the device with the weights

    def _words(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.word(ids)
        if self.spe_bias is not None:
            emb = emb + (ids == SPE_ID).unsqueeze(-1).to(emb.dtype) * self.spe_bias
        return emb

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> (B, L, D). Positions default to 0..L-1; every text piece starts at 0."""
        if ids.shape[1] > self.position.num_embeddings:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len {self.position.num_embeddings}")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        return self._words(ids) + self.position(positions) + self.text_type

    def spe(self) -> torch.Tensor:
        """The global <|spe|> prefix before the norm: its word embedding only, no position or type. (D,)"""
        return self._words(self.spe_id)[0]


class VisualEmbedding(nn.Module):
    """Per-frame 16x16 conv patches + frozen spatial sin-cos + learned temporal table.

    An image is a one-frame video. Tokens are frame-major, then row-major within a frame.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.grid_size
        self.patch = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.temporal = nn.Embedding(config.max_frames, config.width)
        self.register_buffer("spatial", sincos_2d(config.grid_size, config.width, config.pos_scale), persistent=False)

    def forward(self, video: torch.Tensor, temporal_offset: int = 0) -> torch.Tensor:
        """video (B, T, 3, H, W) -> (B, T * N, D), N patches per frame."""
        b, t, _, h, w = video.shape
        if h != w or h // self.patch_size != self.grid:
            size = self.grid * self.patch_size
            raise ValueError(f"input frames are {h}x{w} but the model expects {size}x{size}")
        if t + temporal_offset > self.temporal.num_embeddings:
            raise ValueError(f"{t} frames exceed the temporal table of {self.temporal.num_embeddings}")
        x = self.patch(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, N, D)
        x = x.unflatten(0, (b, t))  # (B, T, N, D)
        frames = torch.arange(temporal_offset, temporal_offset + t, device=video.device)
        pos = self.temporal(frames)[:, None] + self.spatial[None].to(x.dtype)  # (T, N, D)
        return (x + pos).flatten(1, 2)
