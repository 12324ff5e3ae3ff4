"""SGLang's own multimodal step, as the SGLang bench drives it, natively and with vitbatch.

Each step calls SGLang's real ``mm_schedule.get_embedding_and_mask`` with the
bundled Qwen2.5-VL-shaped vision tower as ``data_embedding_func``. Features start
on the host, where SGLang's scheduler hands them over; after the step the
post-forward copy-back of ``mm_utils.general_mm_embed_routine`` runs
(:func:`offload_after_forward`, reproduced because the routine needs a whole
model forward; ``tests/sglang/test_bench_sglang.py`` guards it against drift in
SGLang's ``prepare_mm_inputs``).

Every SGLang name the bench uses (and the SGLang adapter's) is reached through
:func:`sglang_names`, the one marked engine touch of the bench, which calls the
adapter's ``surface`` accessors.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitbatch.bench.sglang_workload import EngineRequest, StepSlice

# ===========================================================================
# ENGINE TOUCH (SGLang). The only place in the bench that reaches SGLang: through
# the accessors of ``vitbatch.adapters.sglang.surface``.
# ===========================================================================


@dataclass(frozen=True)
class SGLangNames:
    """What the bench needs of SGLang (``mm_schedule``'s step and module state, its
    cache and item types, its hook registry) and of vitbatch's SGLang adapter."""

    version: str
    get_embedding_and_mask: Callable[..., Any]
    get_chunked_prefill_embedding: Callable[[], Callable]
    set_chunked_prefill_embedding: Callable[[Callable], None]
    set_embedding_cache: Callable[[object], None]
    get_offload_event: Callable[[], Any]
    set_offload_event: Callable[[Any], None]
    new_cache: Callable[[int], object]
    new_image_item: Callable[[list, torch.Tensor, int], object]
    apply_hooks: Callable[[], None]
    adapter_register: Callable[[], None]
    adapter_reset: Callable[..., Any]
    adapter_state: Callable[[], Any]
    adapter_counters: Callable[[Any], tuple[int, int, int]]


@functools.cache
def sglang_names() -> SGLangNames:
    """SGLang's names, through the SGLang adapter's surface accessors (import after the
    ``sgl_kernel`` stand-in, if any, is installed)."""
    from vitbatch.adapters import sglang as adapter
    from vitbatch.adapters.sglang import surface

    surface.load_multimodal_modules()  # fails here when SGLang is missing

    def reset(max_patches: int, max_items: int) -> Any:
        settings = adapter.Settings(enabled=True, max_patches=max_patches, max_items=max_items)
        return adapter.reset_state(settings)

    return SGLangNames(
        version=surface.sglang_version(),
        get_embedding_and_mask=surface.get_embedding_and_mask,
        get_chunked_prefill_embedding=surface.chunked_prefill_function,
        set_chunked_prefill_embedding=surface.set_chunked_prefill_function,
        set_embedding_cache=surface.set_embedding_cache,
        get_offload_event=surface.host_offload_event,
        set_offload_event=surface.set_host_offload_event,
        new_cache=surface.new_embedding_cache,
        new_image_item=lambda runs, feature, hash_: surface.image_item(runs[0], feature, hash_),
        apply_hooks=surface.apply_hooks,
        adapter_register=adapter.register,
        adapter_reset=reset,
        adapter_state=adapter.get_state,
        adapter_counters=lambda s: (s.fallbacks, s.unsupported, s.batcher.totals.items),
    )


# ===========================================================================
# SGLang's pieces, through :func:`sglang_names`
# ===========================================================================


def embedding_func(
    model: torch.nn.Module, grids: dict[int, tuple[int, int, int]], calls: list[int]
) -> Callable:
    """A ``data_embedding_func`` like Qwen2.5-VL's ``get_image_feature``: one tower call
    over the concatenated features of the given items."""
    dtype = next(model.parameters()).dtype

    def embed_images(items: Sequence) -> torch.Tensor:
        calls[0] += 1
        pixel_values = torch.cat([item.feature for item in items]).to(dtype)
        with torch.inference_mode():
            return model(pixel_values, [grids[item.hash] for item in items])

    return embed_images


def offload_after_forward(items: Sequence, device: torch.device) -> tuple[int, int]:
    """The post-forward copy-back of SGLang's ``general_mm_embed_routine``: every
    feature still on the GPU is copied to the host asynchronously, and
    ``mm_schedule.host_offload_event`` is recorded so the next step's host→device
    move waits for it. Returns (copies, bytes)."""
    if device.type != "cuda":  # SGLang offloads only when the input embeddings are on CUDA
        return 0, 0
    names = sglang_names()
    stream = torch.cuda.current_stream(device)
    copies = nbytes = 0
    for item in items:
        feature = item.feature
        if isinstance(feature, torch.Tensor) and feature.is_cuda:
            feature.record_stream(stream)
            item.feature = feature.to("cpu", non_blocking=True)
            copies += 1
            nbytes += feature.numel() * feature.element_size()
    if copies:
        if names.get_offload_event() is None:
            names.set_offload_event(torch.cuda.Event())
        names.get_offload_event().record(stream)
    return copies, nbytes


def install_hook() -> tuple[Callable, Callable]:
    """SGLang's ``_get_chunked_prefill_embedding`` and the same with vitbatch's hook,
    installed the way the plugin entry point does it."""
    names = sglang_names()
    original = names.get_chunked_prefill_embedding()
    original = getattr(original, "__wrapped__", original)
    os.environ["VITBATCH_ENABLE"] = "1"
    names.adapter_register()
    names.apply_hooks()
    patched = names.get_chunked_prefill_embedding()
    if patched is original:
        raise RuntimeError(
            "vitbatch's hook was not installed on mm_schedule._get_chunked_prefill_embedding"
        )
    names.set_chunked_prefill_embedding(original)
    return original, patched


class ModeState:
    """What one mode keeps across the steps of a pass: SGLang's cache (in vitbatch mode
    also vitbatch's device tier) and offload event, vitbatch's adapter state, the engine's
    items of each request."""

    def __init__(self, mode: str, function: Callable, args: argparse.Namespace) -> None:
        self.names = sglang_names()  # fails early if SGLang is missing
        self.mode = mode
        self.function = function
        self.cache = self.names.new_cache(args.cache_mb * 2**20)
        self.event = None
        self.adapter = (
            self.names.adapter_reset(args.max_patches, args.max_items)
            if mode == "vitbatch"
            else None
        )
        self.items: dict[int, list] = {}
        self.calls = [0]
        self.copies = self.bytes = 0
        self.d2h_seconds = 0.0

    def counters(self) -> tuple[int, int, int]:
        """vitbatch's (fallbacks, steps left to SGLang as unsupported, items batched)."""
        return self.names.adapter_counters(self.adapter) if self.adapter else (0, 0, 0)

    def enter(self) -> None:
        self.names.set_embedding_cache(self.cache)
        self.names.set_offload_event(self.event)
        self.names.set_chunked_prefill_embedding(self.function)
        if self.adapter is not None and self.names.adapter_state() is not self.adapter:
            raise RuntimeError("another vitbatch adapter state replaced this mode's")

    def leave(self) -> None:
        self.event = self.names.get_offload_event()

    def engine_items(self, request: EngineRequest) -> list:
        items = self.items.get(request.rid)
        if items is None:
            items = [
                self.names.new_image_item([run], image.features, image.hash)
                for image, run in zip(request.images, request.offsets)
            ]
            self.items[request.rid] = items
        return items


def _token_ids(request: EngineRequest, items: Sequence) -> list[int]:
    tokens = [5 + (position % 50) for position in range(request.length)]
    for item in items:
        for start, end in item.offsets:
            tokens[start : end + 1] = item.padding_sequence(end - start + 1)
    return tokens


def run_step(
    state: ModeState,
    step: Sequence[StepSlice],
    requests: dict[int, EngineRequest],
    func: Callable,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One scheduler step for one mode: SGLang's ``get_embedding_and_mask``, then its copy-back."""
    items: list = []
    items_size, prefix, extend, offsets, ids = [0], [], [], [], []
    for part in step:
        request = requests[part.rid]
        own = state.engine_items(request)
        items.extend(own)
        items_size.append(len(items))
        prefix.append(part.start)
        extend.append(part.end - part.start)
        offsets.append(list(request.offsets))
        ids.extend(_token_ids(request, own)[part.start : part.end])
    pads = sorted({value for item in items for value in item.padding_values()})
    input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    placeholder = torch.as_tensor(pads, device=device)
    state.enter()
    try:
        embedding, mask, _ = state.names.get_embedding_and_mask(
            func, items, placeholder, input_ids, items_size, prefix, extend, offsets
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        copies, nbytes = offload_after_forward(items, device)
        if copies:
            state.names.get_offload_event().synchronize()
        state.d2h_seconds += time.perf_counter() - started
        state.copies += copies
        state.bytes += nbytes
    finally:
        state.leave()
    return embedding, mask
