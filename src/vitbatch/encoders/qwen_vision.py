"""A Qwen2.5-VL-style vision transformer, built from a config with random weights.

Why it ships with vitbatch: the benchmark must run on a fresh machine with no
download, yet measure a *real* encoder — patch embedding, 2D rotary positions,
window attention with a few full-attention blocks, gated-SiLU MLPs and the 2×2
patch merger — because those decide how encode time and memory scale with the
batch. With the ``qwen2.5-vl-7b`` config it has the exact shapes of
Qwen2.5-VL-7B's vision tower; the parameter names match transformers'
``Qwen2_5_VisionTransformerPretrainedModel`` so its weights load with
:func:`load_transformers_state_dict`.

Attention is variable-length over ``cu_seqlens`` like serving engines run it:
``torch.nn.attention.varlen.varlen_attn`` (flash) on CUDA, one padded SDPA call
elsewhere. Every index (window permutation, segment boundaries, rotary
positions) is computed on the host from the host-side grid and moved once with
non-blocking copies: no device→host synchronisation inside ``forward``.
Attention never crosses images, so encoding images together or one by one gives
the same result up to floating-point reassociation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    in_channels: int = 3
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tokens_for_grid(self, t: int, h: int, w: int) -> int:
        return t * h * w // self.spatial_merge_size**2


CONFIGS: dict[str, VisionConfig] = {
    # Small enough for a 2-core CPU, same structure (windows + full blocks, merger).
    "tiny": VisionConfig(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        window_size=56,
        fullatt_block_indexes=(1, 3),
        out_hidden_size=128,
    ),
    "qwen2.5-vl-7b": VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
}


def image_grid(config: VisionConfig, height_px: int, width_px: int) -> Grid:
    """The (t, h, w) patch grid of one still image; sides must be multiples of patch × merge."""
    unit = config.patch_size * config.spatial_merge_size
    if height_px % unit or width_px % unit:
        raise ValueError(f"image {height_px}x{width_px}px: sides must be multiples of {unit}px")
    return (1, height_px // config.patch_size, width_px // config.patch_size)


# -- host-side index preparation ------------------------------------------------


def _as_grids(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[Grid]:
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.device.type != "cpu":
            raise ValueError(
                "grid_thw must be on the host (a list or a CPU tensor): reading it would sync"
            )
        grid_thw = grid_thw.tolist()
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw]


def _merge_order(h: int, w: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column of every patch, in the merge-block order the processor emits."""
    hpos = torch.arange(h).unsqueeze(1).expand(h, w)
    wpos = torch.arange(w).unsqueeze(0).expand(h, w)

    def blocked(pos: torch.Tensor) -> torch.Tensor:
        return pos.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()

    return blocked(hpos), blocked(wpos)


@dataclass(frozen=True)
class _Layout:
    """Everything ``forward`` needs besides the pixels, built on the host."""

    window_index: torch.Tensor  # merge-unit permutation into window order
    reverse_index: torch.Tensor
    cu_window: torch.Tensor  # int32 segment boundaries for window blocks
    cu_full: torch.Tensor  # int32 segment boundaries (one per frame) for full blocks
    max_window: int
    max_full: int
    positions: torch.Tensor  # [patches, 2] (row, col) in window order


def _layout(config: VisionConfig, grids: Sequence[Grid]) -> _Layout:
    m = config.spatial_merge_size
    unit = m * m
    merger_window = config.window_size // m // config.patch_size
    window_index: list[torch.Tensor] = []
    window_lengths: list[int] = []
    positions: list[torch.Tensor] = []
    full_lengths: list[int] = []
    offset = 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h = (-gh) % merger_window
        pad_w = (-gw) % merger_window
        nh, nw = (gh + pad_h) // merger_window, (gw + pad_w) // merger_window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        padded = padded.reshape(t, nh, merger_window, nw, merger_window).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, merger_window * merger_window)
        counts = (padded >= 0).sum(-1).flatten()
        flat = padded.flatten()
        window_index.append(flat[flat >= 0] + offset)
        window_lengths.extend(int(c) * unit for c in counts if c > 0)
        hpos, wpos = _merge_order(h, w, m)
        positions.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        full_lengths.extend([h * w] * t)
        offset += t * gh * gw
    window = torch.cat(window_index)
    pos = torch.cat(positions)
    pos = pos.reshape(-1, unit, 2)[window].reshape(-1, 2)

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

    return _Layout(
        window_index=window,
        reverse_index=torch.argsort(window),
        cu_window=cumulative(window_lengths),
        cu_full=cumulative(full_lengths),
        max_window=max(window_lengths),
        max_full=max(full_lengths),
        positions=pos,
    )


# -- attention -------------------------------------------------------------------


def _varlen_flash():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Attention restricted to the segments ``cu`` delimits. ``q, k, v``: [tokens, heads, dim]."""
    flash = _varlen_flash()
    if flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash(q, k, v, cu, cu, max_len, max_len)
    if cu.device.type != "cpu":
        raise ValueError("segment boundaries must be on the host for the portable attention path")
    # Segments of equal length form one unmasked SDPA call (fast kernels, no
    # padding); windows come in very few distinct lengths, so few calls.
    starts = cu[:-1].to(torch.long)
    lengths = cu[1:].to(torch.long) - starts
    out = torch.empty_like(q)
    for length in torch.unique(lengths).tolist():
        chosen = starts[lengths == length]
        rows = (
            (chosen.unsqueeze(1) + torch.arange(length)).flatten().to(q.device, non_blocking=True)
        )

        def gathered(x: torch.Tensor) -> torch.Tensor:
            return x[rows].reshape(len(chosen), length, *x.shape[1:]).transpose(1, 2)

        attended = F.scaled_dot_product_attention(gathered(q), gathered(k), gathered(v))
        out[rows] = attended.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


# -- modules ---------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, cu: torch.Tensor, max_len: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).reshape(tokens, 3, self.num_heads, -1).unbind(1)
        cos_, sin_ = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * cos_ + _rotate_half(q.float()) * sin_).to(v.dtype)
        k = (k.float() * cos_ + _rotate_half(k.float()) * sin_).to(v.dtype)
        out = segment_attention(q, k, v, cu, max_len)
        return self.proj(out.reshape(tokens, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.eps)
        self.norm2 = RMSNorm(config.hidden_size, config.eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, cu: torch.Tensor, max_len: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu, max_len, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The 3D convolution over (t, p, p) patches, as the linear map it is on flattened patches."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, config.eps)
        self.mlp = nn.Sequential(
            nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size)
        )
        self.merged = merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


class QwenVisionEncoder(nn.Module):
    """Qwen2.5-VL's vision tower: pixels ``[patches, patch_dim]`` + host grids →
    ``[tokens, out_hidden]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        half = config.head_dim // 2
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        grids = _as_grids(grid_thw)
        device = pixel_values.device
        layout = _layout(self.config, grids)
        unit = self.config.spatial_merge_size**2
        window_index = layout.window_index.to(device, non_blocking=True)
        reverse_index = layout.reverse_index.to(device, non_blocking=True)
        cu_window = layout.cu_window.to(device, non_blocking=True)
        cu_full = layout.cu_full.to(device, non_blocking=True)
        positions = layout.positions.to(device, non_blocking=True)
        host_cu = {"window": layout.cu_window, "full": layout.cu_full}

        x = self.patch_embed(pixel_values)
        tokens = x.shape[0]
        x = x.reshape(tokens // unit, unit, -1)[window_index].reshape(tokens, -1)
        freqs = (positions.unsqueeze(-1).float() * self.inv_freq).flatten(1)  # [tokens, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        on_device = device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
        for index, block in enumerate(self.blocks):
            full = index in self.config.fullatt_block_indexes
            kind = "full" if full else "window"
            cu = (cu_full if full else cu_window) if on_device else host_cu[kind]
            max_len = layout.max_full if full else layout.max_window
            x = block(x, cu, max_len, cos, sin)
        merged = self.merger(x)
        return merged[reverse_index]

    def flops(self, grids: Sequence[Grid]) -> float:
        """Matmul FLOPs of encoding ``grids`` (linear layers + attention scores and values)."""
        c = self.config
        d, i = c.hidden_size, c.intermediate_size
        layout = _layout(c, [tuple(g) for g in grids])
        tokens = sum(t * h * w for t, h, w in grids)
        window_sq = float(((layout.cu_window[1:] - layout.cu_window[:-1]).double() ** 2).sum())
        full_sq = float(((layout.cu_full[1:] - layout.cu_full[:-1]).double() ** 2).sum())
        linear = 2 * tokens * (3 * d * d + d * d + 3 * d * i)
        total = 2 * tokens * c.patch_dim * d
        for index in range(c.depth):
            squares = full_sq if index in c.fullatt_block_indexes else window_sq
            total += linear + 4 * squares * d
        merged_tokens = tokens // c.spatial_merge_size**2
        m = d * c.spatial_merge_size**2
        total += 2 * merged_tokens * (m * m + m * c.out_hidden_size)
        return float(total)


def build_encoder(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> QwenVisionEncoder:
    """The bundled encoder ``name`` with random weights (seeded by the caller), eval mode."""
    if name not in CONFIGS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(CONFIGS)}")
    config = CONFIGS[name]
    model = QwenVisionEncoder(config)
    _init_weights(model)
    return model.to(device=device, dtype=dtype).eval()


def _init_weights(model: nn.Module) -> None:
    """Small random weights so activations stay finite through 32 blocks in bf16."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def load_transformers_state_dict(
    model: QwenVisionEncoder, state: Mapping[str, torch.Tensor]
) -> None:
    """Load weights of transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (same names;
    the patch-embedding Conv3d kernel is flattened into the linear layer it is)."""
    converted = dict(state)
    key = "patch_embed.proj.weight"
    converted[key] = converted[key].reshape(converted[key].shape[0], -1)
    model.load_state_dict(converted)
