"""Transformer-XL-style decoder (Dai et al. 2019) with band-causal attention over a memory of cached states.

Per layer the state caches the keys and values of the last ``mem_len`` (C) positions: Transformer-XL caches
the layer inputs and re-projects them into keys and values at every step; the projections do not depend on
position (positions enter only through the relative term), so caching their result is the same model and
on-line evaluation pays C keys per token instead of C re-projections.

Attention is **band-causal**: every query attends to exactly the last ``min(t, C) + 1`` positions (itself
and at most C before it), in a window of any length and token by token alike, so windowed evaluation
equals on-line evaluation and the memory length evaluated is the one the scorer counts. A one-token window
(the scorer's on-line path) sees exactly those keys and runs without any mask.

Relative positions are Transformer-XL's: score(i, j) = (q_i + u)·k_j + (q_i + v)·W_R R_{i-j}, R the sinusoidal
encoding of the distance, u and v learned per head (here per layer too), the query scaled by 1/√d_head.
Chosen over a learned bias per head and distance because it is the encoding the 2019 winner's model used;
W_R R is input-independent, so the scorer counts the (C+1) × heads × d_head vectors it yields as stored values.

Input and output are a tied adaptive input and adaptive softmax (:class:`~models.lm_blocks.AdaptiveSoftmax`),
the input scaled by √d_model as in Transformer-XL.

The operands of the attention products (queries, keys, positions, attention weights, values) pass through
``nn.Identity`` modules named ``*_operand``: points where a compression technique may quantize them (the 2019
winner ran these matmuls in 8 bits) without the model knowing of it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .lm_blocks import AdaptiveSoftmax, LanguageModel, LinearSoftmax, State
from .registry import register_model


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]``: row d is [sin(d·ω), cos(d·ω)] with ω_k = 10000^(-2k/dim) (Vaswani et al. 2017)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class RelativeAttention(nn.Module):
    """Multi-head attention with Transformer-XL relative positions over cached keys/values (band of C + 1)."""

    def __init__(self, d_model: int, n_head: int, d_head: int, mem_len: int, dropout: float,
                 attn_dropout: float) -> None:
        super().__init__()
        self.n_head, self.d_head, self.mem_len = n_head, d_head, mem_len
        inner = n_head * d_head
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(d_model, inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_head, d_head))
        self.v = nn.Parameter(torch.zeros(n_head, d_head))
        # Distances C, C-1, ..., 0: column c of the positional scores is distance C - c.
        self.register_buffer("distances", sinusoid_table(mem_len + 1, d_model).flip(0), persistent=False)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)
        # The operands of the score and value products, as they enter them (see the module docstring).
        self.query_operand, self.key_operand = nn.Identity(), nn.Identity()
        self.position_query_operand, self.position_operand = nn.Identity(), nn.Identity()
        self.weights_operand, self.value_operand = nn.Identity(), nn.Identity()

    def outside_band(self, column: torch.Tensor) -> torch.Tensor:
        """Where a query must not look: keys further than C back (column < 0) or in its future (column > C)."""
        return (column < 0) | (column > self.mem_len)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, d_model]``, cached ``(keys, values)`` each ``[B, M, heads·d_head]`` with M <= C."""
        batch, time, _ = x.shape
        heads, d_head, span = self.n_head, self.d_head, self.mem_len + 1
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keys, values = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        memory, n_keys = cache[0].shape[1], keys.shape[1]
        q = (q * d_head ** -0.5).view(batch, time, heads, d_head).transpose(1, 2)    # [B, H, T, dh]
        content = (self.query_operand(q + self.u[:, None])
                   @ self.key_operand(keys.view(batch, n_keys, heads, d_head).permute(0, 2, 3, 1)))
        relative = self.r_net(self.distances).view(span, heads, d_head).permute(1, 2, 0)  # [H, dh, C+1]
        by_distance = self.position_query_operand(q + self.v[:, None]) @ self.position_operand(relative)  # [B,H,T,C+1]
        # Query i sits at key position M + i; key j is at distance M + i - j, i.e. column C - (M + i - j).
        column = self.mem_len - memory - torch.arange(time, device=x.device)[:, None] \
            + torch.arange(n_keys, device=x.device)[None]
        position = by_distance.gather(-1, column.clamp(0, self.mem_len).expand(batch, heads, time, n_keys))
        scores = content + position
        if time > 1:  # one query sees exactly its min(t, C) + 1 keys already; longer windows need the band
            scores = scores.masked_fill(self.outside_band(column), float("-inf"))
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        by_head = self.value_operand(values.view(batch, n_keys, heads, d_head).transpose(1, 2))
        out = self.weights_operand(weights) @ by_head
        out = self.dropout(self.out(out.transpose(1, 2).reshape(batch, time, heads * d_head)))
        keep = min(n_keys, self.mem_len)
        return out, (keys[:, n_keys - keep:], values[:, n_keys - keep:])


class DecoderLayer(nn.Module):
    """Relative attention and a ReLU feed-forward block, each with a residual and a layer norm: after the sum
    (post-norm, Transformer-XL's default) or on the block's input (``pre_norm``)."""

    def __init__(self, d_model: int, n_head: int, d_head: int, d_inner: int, mem_len: int, dropout: float,
                 attn_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attention = RelativeAttention(d_model, n_head, d_head, mem_len, dropout, attn_dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.pre_norm:
            attended, cache = self.attention(self.norm1(x), cache)
            x = x + attended
            return x + self.ff(self.norm2(x)), cache
        attended, cache = self.attention(x, cache)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff(x)), cache


class TransformerXL(LanguageModel):
    """Tied (adaptive) input × √d_model → ``n_layer`` decoder layers → (adaptive) softmax.

    The state is a tuple with one ``(keys, values)`` pair per layer, each ``[B, M, n_head·d_head]``, M <= mem_len
    (empty at the start of a stream). ``cutoffs`` empty/None gives a tied full softmax.
    """

    def __init__(self, num_classes: int, *, d_model: int, n_layer: int, n_head: int, d_head: int, d_inner: int,
                 mem_len: int, cutoffs: Sequence[int] | None, widths: Sequence[int] | None = None,
                 div_value: float = 4.0, pre_norm: bool = False, dropout: float = 0.0,
                 attn_dropout: float = 0.0, emb_dropout: float | None = None) -> None:
        for name, value in (("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head), ("d_head", d_head),
                            ("d_inner", d_inner), ("mem_len", mem_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "mem_len" else 1):
                raise ValueError(f"transformer_xl {name}={value!r} ; fix: pass a positive integer"
                                 + (" (mem_len may be 0)" if name == "mem_len" else ""))
        if d_model % 2:
            raise ValueError(f"transformer_xl d_model={d_model} is odd ; fix: use an even d_model "
                             "(the sinusoidal encoding pairs sin and cos)")
        super().__init__()
        self.embedding = None  # always tied
        self.mem_len, self.inner = mem_len, n_head * d_head
        self.embed_scale = math.sqrt(d_model)
        self.emb_dropout = nn.Dropout(dropout if emb_dropout is None else emb_dropout)
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_head, d_head, d_inner, mem_len, dropout, attn_dropout,
                                                 pre_norm) for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(d_model) if pre_norm else None
        self.dropout = nn.Dropout(dropout)
        self.decoder = (AdaptiveSoftmax(d_model, num_classes, cutoffs, widths, div_value=div_value) if cutoffs
                        else LinearSoftmax(d_model, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """Transformer-XL's: weights (tables included) N(0, 0.02), u and v N(0, 0.02), biases 0, norms 1 and 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RelativeAttention):
                nn.init.normal_(module.u, std=0.02)
                nn.init.normal_(module.v, std=0.02)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        dtype = self.layers[0].attention.u.dtype
        return tuple((torch.zeros(batch_size, 0, self.inner, dtype=dtype, device=device),
                      torch.zeros(batch_size, 0, self.inner, dtype=dtype, device=device))
                     for _ in self.layers)

    def _check_state(self, state: State, batch_size: int) -> None:
        def fits(t: object) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == batch_size \
                and t.shape[1] <= self.mem_len and t.shape[2] == self.inner

        if not isinstance(state, (tuple, list)) or len(state) != len(self.layers) or any(
                not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(map(fits, pair))
                or pair[0].shape != pair[1].shape for pair in state):
            raise ValueError(f"state must be {len(self.layers)} (keys, values) pairs of shape [{batch_size}, "
                             f"<= {self.mem_len}, {self.inner}] ; fix: pass None, initial_state(batch_size, "
                             "device) or the state the previous call returned")

    def encode(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._check_state(state, x.shape[0])
        x = self.emb_dropout(x * self.embed_scale)
        new_state = []
        for layer, cache in zip(self.layers, state):
            x, cache = layer(x, cache)
            new_state.append(cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.dropout(x), tuple(new_state)


#: The registered shapes; keyword arguments given to create_model override them.
_MICRONET = dict(d_model=256, n_layer=8, n_head=8, d_head=24, d_inner=768, mem_len=96, cutoffs=(3_500, 25_000),
                 widths=(256, 64, 4), dropout=0.1)
_TEACHER = dict(d_model=512, n_layer=12, n_head=8, d_head=64, d_inner=2048, mem_len=150, cutoffs=(3_500, 25_000),
                widths=(512, 128, 16), dropout=0.1)


@register_model
def txl_micronet(num_classes: int = 267_735, **kwargs) -> TransformerXL:
    """The 2019 MicroNet winner's shape: 8 layers, d_model 256, 8 heads × 24, FFN 768, 96 cached positions,
    tied adaptive input/softmax with cutoffs 3,500 / 25,000 and cluster widths 256 / 64 / 4, dropout 0.1
    (8,659,861 parameters dense at V = 267,735). ``kwargs`` override any :class:`TransformerXL` option."""
    return TransformerXL(num_classes, **{**_MICRONET, **kwargs})


@register_model
def txl_teacher(num_classes: int = 267_735, **kwargs) -> TransformerXL:
    """A ~50M-parameter teacher for distilling ``txl_micronet``: 12 layers, d_model 512, 8 heads × 64, FFN 2048,
    150 cached positions, tied adaptive input/softmax with the student's cutoffs and widths 512 / 128 / 16,
    dropout 0.1 (49,732,297 parameters at V = 267,735). ``kwargs`` override any :class:`TransformerXL` option."""
    return TransformerXL(num_classes, **{**_TEACHER, **kwargs})
