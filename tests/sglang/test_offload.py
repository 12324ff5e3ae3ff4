"""CPU-reference offload inside SGLang's step: features go to the device for the
encoder and come back as their original host tensors, with no device-to-host copy.

CI has no GPU, so the step runs with its input ids on the ``meta`` device: the
host→device moves are real ``.to()`` calls and any copy back would be a real
``.to("cpu")`` call, which we count by wrapping ``torch.Tensor.to``.
"""

from __future__ import annotations

from unittest import mock

import torch

from tests.sglang.conftest import (
    FakeEncoder,
    ItemSpec,
    Modality,
    RequestSpec,
    build_step,
    mm_schedule,
)
from vitbatch.adapters import sglang as adapter


def test_features_come_back_as_host_references_without_copies() -> None:
    mm_schedule.init_mm_embedding_cache(1 << 20)
    state = adapter.reset_state(adapter.Settings(enabled=True))
    image = Modality.IMAGE
    requests = [  # three requests, a repeated image, a window cutting the second item
        RequestSpec(
            [ItemSpec(11, image, [(2, 9)]), ItemSpec(12, image, [(12, 15)])],
            length=20,
            prefix=0,
            extend=14,
        ),
        RequestSpec([ItemSpec(11, image, [(0, 7)])], length=10, prefix=0, extend=10),
        RequestSpec([ItemSpec(13, image, [(4, 19)])], length=24, prefix=3, extend=21),
    ]
    step = build_step(requests, device="meta")
    host_before = {id(item): item.feature for item in step.items}
    seen_on_device = []
    encoder = FakeEncoder()

    def encode(items):
        seen_on_device.extend(item.feature.device.type for item in items)
        return encoder(items)

    copies_back = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if str(target).startswith("cpu") and self.device.type != "cpu":
            copies_back.append(self.numel() * self.element_size())
        return real_to(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "to", spy):
        embedding, _ = adapter.chunked_prefill_embedding(
            state,
            mm_schedule._get_chunked_prefill_embedding,
            encode,
            step.items,
            step.items_size,
            step.prefix_length,
            step.extend_length,
            step.items_offset_list,
            step.input_ids,
        )
        # SGLang's post-forward offload copies back only features still on the device.
        still_on_device = [item for item in step.items if item.feature.device.type != "cpu"]

    assert embedding is not None and embedding.device.type == "meta"
    assert seen_on_device and set(seen_on_device) == {"meta"}  # the encoder saw device features
    assert copies_back == [] and still_on_device == []
    for item in step.items:
        assert item.feature is host_before[id(item)]  # the very same host tensor, no copy
    stats = state.batcher.offload.stats
    assert stats.d2h_copies == 0
    assert stats.d2h_copies_avoided == len(seen_on_device) == 3  # distinct images, once each
    assert stats.d2h_bytes_avoided == sum(
        host_before[id(item)].numel() * 8 for call in encoder.calls for item in call
    )
    print(
        f"sample step: {stats.d2h_copies_avoided} copies, {stats.d2h_bytes_avoided} bytes avoided"
    )
