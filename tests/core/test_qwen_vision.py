"""The bundled Qwen2.5-VL-style ViT: batch invariance and equality with transformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitbatch.encoders.qwen_vision import (
    CONFIGS,
    QwenVisionEncoder,
    build_encoder,
    image_grid,
    load_transformers_state_dict,
)

CONFIG = CONFIGS["tiny"]
grids = st.lists(
    st.tuples(
        st.integers(1, 2),
        st.integers(1, 9).map(lambda n: 2 * n),
        st.integers(1, 9).map(lambda n: 2 * n),
    ),
    min_size=1,
    max_size=5,
)


def pixels(grids, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, CONFIG.patch_dim, generator=generator) for t, h, w in grids]


@pytest.fixture(scope="module")
def model() -> QwenVisionEncoder:
    torch.manual_seed(0)
    return build_encoder("tiny")


@settings(max_examples=40, deadline=None)
@given(grids=grids)
def test_images_never_attend_to_each_other(model, grids) -> None:
    """Encoding images together equals encoding each alone (non-square, windows not dividing
    the grid)."""
    xs = pixels(grids)
    with torch.no_grad():
        together = model(torch.cat(xs), grids)
        alone = torch.cat([model(x, [g]) for x, g in zip(xs, grids)])
    assert together.shape == (
        sum(CONFIG.tokens_for_grid(*g) for g in grids),
        CONFIG.out_hidden_size,
    )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_device_grid_is_refused(model) -> None:
    """The grid must be host data (reading a device grid would sync); a CPU tensor is accepted."""
    x = pixels([(1, 4, 4)])[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([[1, 4, 4]])), model(x, [(1, 4, 4)]))
        with pytest.raises(ValueError, match="grid_thw must be on the host"):
            model(x, torch.tensor([[1, 4, 4]], device="meta"))


def test_image_grid_checks_sizes() -> None:
    assert image_grid(CONFIG, 56, 112) == (1, 4, 8)
    with pytest.raises(ValueError, match="multiples of 28px"):
        image_grid(CONFIG, 50, 56)


def test_flops_scale_with_patches(model) -> None:
    assert model.flops([(1, 8, 8), (1, 8, 8)]) == pytest.approx(2 * model.flops([(1, 8, 8)]))


def test_equals_transformers_qwen2_5_vision_tower() -> None:
    """Same random weights as transformers' implementation → same embeddings."""
    modeling = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    c = CONFIG
    hf_config = Qwen2_5_VLVisionConfig(
        depth=c.depth,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_heads,
        patch_size=c.patch_size,
        temporal_patch_size=c.temporal_patch_size,
        spatial_merge_size=c.spatial_merge_size,
        window_size=c.window_size,
        fullatt_block_indexes=list(c.fullatt_block_indexes),
        out_hidden_size=c.out_hidden_size,
        in_channels=c.in_channels,
        hidden_act="silu",
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    reference = modeling.Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config).eval()
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    ours = QwenVisionEncoder(c).eval()
    load_transformers_state_dict(ours, reference.state_dict())
    grids = [(1, 4, 4), (1, 8, 12), (2, 6, 10), (1, 16, 16), (1, 18, 2)]
    x = torch.cat(pixels(grids, seed=3))
    with torch.no_grad():
        got = ours(x, grids)
        expected = reference(x, grid_thw=torch.tensor(grids))
    if not isinstance(expected, torch.Tensor):
        expected = expected.pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
