"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders") over code maps.

The network models ``p(c_ij | c_<ij, position, label)`` for a map of VQ-VAE codebook indices in raster order.
Causality comes from shifting, not from masked kernels: the vertical stack reads the embedded map shifted one row
down and the horizontal stack reads it shifted one column right, after which every convolution may include its own
row (vertical) or column (horizontal). The vertical stack's receptive field is a full-width band of the rows above,
so there is no blind spot; the horizontal stack covers the pixels to the left in the current row.

Conditioning (slice position in [0, 1] through Fourier features and a small MLP, optionally a categorical label
embedding) enters every gated layer as a per-channel bias, as in the paper's conditional PixelCNN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def gated_activation(x: torch.Tensor) -> torch.Tensor:
    """Return ``tanh(a) * sigmoid(b)`` for ``x = [a, b]`` split along the channel axis."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` (B, C, H, W) moved one row down, with a zero top row (row i then holds row i-1)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` (B, C, H, W) moved one column right, with a zero left column."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return ``probs`` (B, K) cut to their nucleus (Holtzman et al. 2020): per row the fewest most likely codes
    whose probabilities sum to at least ``top_p``, renormalised; ``top_p`` 1 leaves them unchanged."""
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=1, descending=True)
    # Keep a code when the mass before it is below top_p: the most likely code is always kept.
    keep = (ordered.cumsum(dim=1) - ordered) < top_p
    kept = torch.zeros_like(probs).scatter(1, order, ordered * keep)
    return kept / kept.sum(dim=1, keepdim=True)


class PositionEncoder(nn.Module):
    """Map a slice position in [0, 1] to a conditioning vector through Fourier features and a small MLP.

    Args:
        out_channels: size of the conditioning vector.
        frequencies: number of octaves; features are ``p, sin(pi 2^k p), cos(pi 2^k p)`` for ``k < frequencies``.
    """

    def __init__(self, out_channels: int = 32, frequencies: int = 6):
        super().__init__()
        scales = math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32)
        self.register_buffer("scales", scales, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(1 + 2 * frequencies, out_channels), nn.SiLU(), nn.Linear(out_channels, out_channels)
        )

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        """Return (B, out_channels) for positions (B,)."""
        p = position.float()[:, None]
        angles = p * self.scales
        return self.mlp(torch.cat([p, angles.sin(), angles.cos()], dim=1))


class GatedLayer(nn.Module):
    """One gated layer: a vertical stack (rows above) and a horizontal stack (left in the row) with gating.

    Inputs at row i / column j of the stacks may include row i / column j: the model shifts its input once
    at the start, so the stacks stay causal with unmasked kernels.

    Args:
        channels: feature channels of both stacks.
        kernel_size: odd width k of the vertical kernel (k//2 + 1 rows by k columns); the horizontal
            kernel is 1 row by k//2 + 1 columns. Each layer grows the receptive field by its ``reach``.
        cond_channels: size of the conditioning vector.
        dilation: spacing of the kernel taps in rows and columns; the layer then reaches
            ``dilation * (kernel_size // 2)`` rows up and columns sideways at the cost of an undilated kernel.
        dropout: share of the gated activations zeroed in training (regularises a prior on few maps).
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, cond_channels: int = 32, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.reach = dilation * (kernel_size // 2)
        self.vertical = nn.Conv2d(channels, 2 * channels, (kernel_size // 2 + 1, kernel_size), dilation=dilation)
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, kernel_size // 2 + 1), dilation=dilation)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Linear(cond_channels, 4 * channels)
        self.dropout = nn.Dropout(dropout)

    def condition_biases(self, cond: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Return the (vertical, horizontal) biases, each (B, 2C, 1, 1), from the conditioning vector."""
        if cond is None:
            return 0.0, 0.0
        bias = self.condition(cond)[:, :, None, None]
        return bias.chunk(2, dim=1)

    def vertical_preactivation(self, x_v: torch.Tensor) -> torch.Tensor:
        """Return the vertical convolution (B, 2C, R, W) over the rows of ``x_v`` at and above each row."""
        return self.vertical(F.pad(x_v, (self.reach, self.reach, self.reach, 0)))

    def horizontal_step(self, x_h: torch.Tensor, v_pre: torch.Tensor, h_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (next horizontal input, skip) from the horizontal input and the vertical pre-activation."""
        return self.horizontal_update(x_h, self.horizontal(F.pad(x_h, (self.reach, 0, 0, 0))), v_pre, h_bias)

    def horizontal_update(self, x_h: torch.Tensor, h_conv: torch.Tensor, v_pre: torch.Tensor,
                          h_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (next horizontal input, skip) from the horizontal input, its causal convolution ``h_conv`` and
        the vertical pre-activation, all at the same positions."""
        gated = self.dropout(gated_activation(h_conv + self.vertical_to_horizontal(v_pre) + h_bias))
        return x_h + self.horizontal_out(gated), self.skip(gated)

    def forward(self, x_v: torch.Tensor, x_h: torch.Tensor, cond: torch.Tensor | None = None):
        """Return (vertical output, horizontal output, skip), all (B, C, H, W)."""
        v_bias, h_bias = self.condition_biases(cond)
        v_pre = self.vertical_preactivation(x_v)
        out_h, skip = self.horizontal_step(x_h, v_pre, h_bias)
        return gated_activation(v_pre + v_bias), out_h, skip


class GatedPixelCNN(nn.Module):
    """Conditional gated PixelCNN over (B, h, w) maps of codebook indices; returns K-way logits per position.

    Args:
        codebook_size: K, the number of code values (logits per position).
        channels: feature channels of the gated stacks.
        layers: number of gated layers (receptive field: the sum of their reaches, ``dilation * (kernel_size // 2)``
            each, rows above and columns to either side, plus one).
        kernel_size: odd vertical kernel width (see :class:`GatedLayer`).
        dilations: dilation of each layer, repeated over the layers (``(1, 2, 4, 8)`` with kernel 5 reaches 30
            rows in four layers: a 32x32 map is covered whole by eight layers, where undilated ones see 16).
        dropout: dropout on each layer's gated activations in training.
        cond_channels: size of the conditioning vector from position (and label).
        position_frequencies: Fourier octaves of the slice position encoder.
        n_labels: classes of the optional categorical label; 0 for an unconditional-by-label model.
        map_size: (h, w) of the code maps; when given, a learned per-location bias is added to the input
            embedding so the model knows where in the map it is (code maps have a fixed layout: brain
            in the middle, background at the border). ``None`` makes the model size-agnostic.
        head_channels: hidden channels of the output head (1x1 convs from the summed skips to the logits).
        position_anchors: learned per-location bias maps, evenly spaced over slice positions [0, 1]; a map's bias
            interpolates linearly between the two anchors nearest its position, so the layout it starts from
            follows the axial level (a small head low, the widest one in the middle). 1 = one map for all levels.
    """

    def __init__(
        self,
        codebook_size: int,
        channels: int = 64,
        layers: int = 8,
        kernel_size: int = 3,
        cond_channels: int = 32,
        position_frequencies: int = 6,
        n_labels: int = 0,
        map_size: tuple[int, int] | None = None,
        head_channels: int = 128,
        dilations: Sequence[int] = (1,),
        dropout: float = 0.0,
        position_anchors: int = 1,
    ):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.codebook_size = codebook_size
        self.n_labels = n_labels
        self.map_size = tuple(map_size) if map_size is not None else None
        self.embedding = nn.Embedding(codebook_size, channels)
        if position_anchors < 1:
            raise ValueError(f"position_anchors must be >= 1, got {position_anchors}")
        self.location_bias = (
            nn.Parameter(torch.zeros(position_anchors, channels, *self.map_size)) if self.map_size is not None
            else None
        )
        self.position_encoder = PositionEncoder(cond_channels, position_frequencies)
        self.label_embedding = nn.Embedding(n_labels, cond_channels) if n_labels > 0 else None
        if not dilations:
            raise ValueError("dilations must name at least one dilation")
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, cond_channels, dilations[k % len(dilations)], dropout)
            for k in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, head_channels, 1), nn.ReLU(), nn.Conv2d(head_channels, codebook_size, 1)
        )

    @property
    def reach(self) -> int:
        """Rows above (and columns to the left) that the output at one position can depend on, minus one."""
        return sum(layer.reach for layer in self.layers)

    def condition(self, position: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Return the conditioning vector (B, cond_channels) for positions (B,) and labels (B,) long."""
        cond = self.position_encoder(position)
        if self.label_embedding is not None:
            if label is None:
                raise ValueError(f"this model is conditioned on a label ({self.n_labels} classes); pass label")
            cond = cond + self.label_embedding(label)
        return cond

    def location_map(self, position: torch.Tensor) -> torch.Tensor | None:
        """Return the input bias (B, C, h, w) at slice positions (B,): the per-location maps interpolated between
        the anchors nearest each position (None for a model without a map size)."""
        if self.location_bias is None:
            return None
        anchors = self.location_bias.shape[0]
        where = position.float().clamp(0, 1)[:, None] * (anchors - 1)
        weights = torch.relu(1 - (where - torch.arange(anchors, device=where.device)).abs())
        return torch.einsum("ba,achw->bchw", weights, self.location_bias)

    def embed(self, codes: torch.Tensor, location: torch.Tensor | None, rows: slice = slice(None),
              cols: slice = slice(None)) -> torch.Tensor:
        """Return embedded codes (B, C, h, w) plus the ``location`` bias (:meth:`location_map`) of the map region
        ``rows, cols`` they come from."""
        e = self.embedding(codes).permute(0, 3, 1, 2)
        if location is not None:
            e = e + location[:, :, rows, cols]
        return e

    def logits_from_embedding(self, e: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Return logits (B, K, h, w) from an embedded map (B, C, h, w); output (i, j) sees only e before (i, j)."""
        x_v, x_h = shift_down(e), shift_right(e)
        skips = 0.0
        for layer in self.layers:
            x_v, x_h, skip = layer(x_v, x_h, cond)
            skips = skips + skip
        return self.head(skips)

    def forward(
        self, codes: torch.Tensor, position: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return logits (B, K, h, w) for code maps (B, h, w) long, positions (B,) float, labels (B,) long."""
        self._check_map(codes)
        return self.logits_from_embedding(self.embed(codes, self.location_map(position)), self.condition(position, label))

    def code_bits(self, codes: torch.Tensor, position: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Return the negative log-likelihood in bits of every code (B, h, w) of code maps (B, h, w) long."""
        logits = self(codes, position, label)
        return F.cross_entropy(logits.float(), codes, reduction="none") / math.log(2)

    def _check_map(self, codes: torch.Tensor) -> None:
        if self.map_size is not None and tuple(codes.shape[-2:]) != self.map_size:
            raise ValueError(f"code maps are {tuple(codes.shape[-2:])} but this model was built for {self.map_size}")

    def raster_logits(self, codes: torch.Tensor, cond: torch.Tensor | None,
                      position: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(i, j, logits (B, K))`` in raster order, reading ``codes[:, :i+1]`` as they are filled in;
        ``cond`` is :meth:`condition` of the maps' slice ``position`` (B,) (and labels).

        The caller may write ``codes[:, i, j]`` after each yield (sampling). The logits equal those of
        :meth:`forward` at (i, j), but cost one row of the vertical stack per row and one column of the
        horizontal stack per position (each layer's inputs are kept), instead of a whole map per position.
        """
        self._check_map(codes)
        batch, h, w = codes.shape
        biases = [layer.condition_biases(cond) for layer in self.layers]
        location = self.location_map(position)
        x_v = [None] * (len(self.layers) + 1)
        # x_v[l] holds the vertical stack's input to layer l for all rows computed so far.
        x_v[0] = self.embedding.weight.new_zeros(batch, self.embedding.embedding_dim, h, w)
        for i in range(h):
            if i > 0:
                x_v[0][:, :, i] = self.embed(codes[:, i - 1 : i], location, slice(i - 1, i))[:, :, 0]
            v_pres = []
            for index, layer in enumerate(self.layers):
                window = x_v[index][:, :, max(0, i - layer.reach) : i + 1]
                window = F.pad(window, (0, 0, layer.reach + 1 - window.shape[2], 0))
                v_pre = layer.vertical(F.pad(window, (layer.reach, layer.reach, 0, 0)))
                v_pres.append(v_pre)
                if index + 1 == len(self.layers):
                    break  # the last vertical output feeds nothing
                out_v = gated_activation(v_pre + biases[index][0])
                if x_v[index + 1] is None:
                    x_v[index + 1] = out_v.new_zeros(batch, out_v.shape[1], h, w)
                x_v[index + 1][:, :, i] = out_v[:, :, 0]
            # x_h[l] holds the horizontal stack's input to layer l along row i, filled in column by column.
            x_h = [x_v[0].new_zeros(batch, x_v[0].shape[1], 1, w) for _ in self.layers]
            for j in range(w):
                if j > 0:
                    x_h[0][:, :, :, j] = self.embed(codes[:, i : i + 1, j - 1 : j], location, slice(i, i + 1),
                                                    slice(j - 1, j))[:, :, :, 0]
                skips = 0.0
                for index, layer in enumerate(self.layers):
                    window = x_h[index][:, :, :, max(0, j - layer.reach) : j + 1]
                    h_conv = layer.horizontal(F.pad(window, (layer.reach + 1 - window.shape[3], 0, 0, 0)))
                    v_pre = v_pres[index][:, :, :, j : j + 1]
                    out_h, skip = layer.horizontal_update(window[:, :, :, -1:], h_conv, v_pre, biases[index][1])
                    if index + 1 < len(self.layers):
                        x_h[index + 1][:, :, :, j] = out_h[:, :, :, 0]
                    skips = skips + skip
                yield i, j, self.head(skips)[:, :, 0, 0]
