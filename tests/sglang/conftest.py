"""Shared builders for tests against the real SGLang (0.5.17 to 0.5.23).

Steps are built from real ``MultimodalDataItem``s with real pad values
(``set_hash``), laid out in token sequences the way SGLang's tokenizer manager
does, and run through SGLang's own ``get_embedding_and_mask``.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt.managers.mm_utils")
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem  # noqa: E402

from vitbatch.adapters import sglang as adapter  # noqa: E402
from vitbatch.adapters.sglang import entry, surface  # noqa: E402

# The module holding SGLang's step in the installed release: ``mm_schedule`` (0.5.18+) or
# ``mm_utils`` (0.5.17); the tests keep the newer name for it.
mm_schedule = importlib.import_module(surface.step_module_name())
# SGLang 0.5.19+ looks up and deduplicates per-image items by hash *and* token count;
# 0.5.17 and 0.5.18 by hash alone, so there one hash with two token counts (a collision that
# content hashes do not make) gives SGLang's own path a wrong-length embedding ("Insufficient
# multimodal embedding length ... internal error"). Steps compared with SGLang's path then
# keep one layout per hash. (vitbatch keys by both on every release.)
KEYS_BY_TOKEN_COUNT = hasattr(mm_schedule, "_discard_mismatched_cached_embedding")

HIDDEN = 8
FEATURE_DIM = 4
_WEIGHT = torch.linspace(-1, 1, FEATURE_DIM * HIDDEN, dtype=torch.float64).reshape(
    FEATURE_DIM, HIDDEN
)


def features_for(hash_: int, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash_ * 7919 + tokens)
    return torch.randn(tokens, FEATURE_DIM, generator=generator, dtype=torch.float64)


@dataclass
class ItemSpec:
    hash: int
    modality: Modality
    runs: list[tuple[int, int]]  # inclusive (start, end), SGLang's convention

    @property
    def tokens(self) -> int:
        return sum(end - start + 1 for start, end in self.runs)

    def build(self) -> MultimodalDataItem:
        item = MultimodalDataItem(
            modality=self.modality,
            offsets=list(self.runs),
            feature=features_for(self.hash, self.tokens),
        )
        item.set_hash(self.hash)
        return item


@dataclass
class RequestSpec:
    items: list[ItemSpec]
    length: int
    prefix: int
    extend: int


@dataclass
class StepInputs:
    """The arguments of ``get_embedding_and_mask`` for one modality call."""

    items: list[MultimodalDataItem]
    placeholder_tensor: torch.Tensor
    input_ids: torch.Tensor
    items_size: list[int]
    prefix_length: list[int]
    extend_length: list[int]
    items_offset_list: list[list[tuple[int, int]]]


def padding_values(item: MultimodalDataItem) -> tuple[int, ...]:
    """The item's placeholder ids (several from SGLang 0.5.23, one ``pad_value`` before)."""
    if hasattr(item, "padding_values"):
        return tuple(item.padding_values())
    return (item.pad_value,)


def padding(item: MultimodalDataItem, length: int) -> list[int]:
    """What SGLang's tokenizer manager writes over ``length`` placeholder positions."""
    if hasattr(item, "padding_sequence"):
        return list(item.padding_sequence(length))
    return [item.pad_value] * length


def build_step(requests: Sequence[RequestSpec], device: str = "cpu") -> StepInputs:
    items: list[MultimodalDataItem] = []
    items_size = [0]
    ids: list[int] = []
    for request in requests:
        built = [spec.build() for spec in request.items]
        tokens = [
            5 + (position % 50) for position in range(request.length)
        ]  # text ids, far from pad values
        for item in built:
            for start, end in item.offsets:
                for position, value in zip(range(start, end + 1), padding(item, end - start + 1)):
                    tokens[position] = value
        ids.extend(tokens[request.prefix : request.prefix + request.extend])
        items.extend(built)
        items_size.append(len(items))
    pads = sorted({value for item in items for value in padding_values(item)}) or [1 << 40]
    return StepInputs(
        items=items,
        placeholder_tensor=torch.tensor(pads, dtype=torch.int64),
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        items_size=items_size,
        prefix_length=[r.prefix for r in requests],
        extend_length=[r.extend for r in requests],
        items_offset_list=[[run for spec in r.items for run in spec.runs] for r in requests],
    )


@dataclass
class FakeEncoder:
    """A ``data_embedding_func``: one pass over the concatenated batch, per-item mixing.

    Records each call's items so tests can count calls and check budgets.
    """

    per_item_list: bool = False
    calls: list[list[MultimodalDataItem]] = field(default_factory=list)
    # Like a model's config: the adapter reads the embedding width from it.
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(hidden_size=HIDDEN))

    def __call__(self, items: list[MultimodalDataItem]):
        self.calls.append(list(items))
        outputs = []
        for item in items:
            projected = torch.tanh(item.feature.to(torch.float64) @ _WEIGHT.to(item.feature.device))
            outputs.append(projected + projected.mean(0, keepdim=True))
        return outputs if self.per_item_list else torch.cat(outputs)


def run_get_embedding_and_mask(step: StepInputs, encoder: Callable) -> tuple:
    return mm_schedule.get_embedding_and_mask(
        encoder,
        step.items,
        step.placeholder_tensor,
        step.input_ids,
        step.items_size,
        step.prefix_length,
        step.extend_length,
        step.items_offset_list,
    )


def random_requests(rng: random.Random, pool: int = 6) -> list[RequestSpec]:
    """One modality call of a step, as SGLang makes it (``embed_mm_inputs`` calls
    ``get_embedding_and_mask`` once per modality): several requests, 0-4 items
    each, repeated hashes, windows cutting items. Audio items may have several
    runs (SGLang's per-image path); video items with several runs send their
    request down SGLang's per-request "full" path. Where SGLang keys by hash alone
    (:data:`KEYS_BY_TOKEN_COUNT` false), an item's layout follows from its hash."""
    modality = rng.choices([Modality.IMAGE, Modality.AUDIO, Modality.VIDEO], weights=[6, 2, 2])[0]
    requests = []
    for _ in range(rng.randint(1, 5)):
        position = rng.randint(0, 6)
        specs = []
        for _ in range(rng.randint(0, 4)):
            hash_ = rng.randint(1, pool)
            runs_count = 1 if modality == Modality.IMAGE else rng.choice([1, 1, 2, 3])
            layout = rng if KEYS_BY_TOKEN_COUNT else random.Random(hash_ * 10 + runs_count)
            tokens = layout.choice([2, 3, 4, 6, 9, 16]) if runs_count == 1 else None
            runs = []
            for _ in range(runs_count):
                length = tokens if tokens is not None else layout.randint(1, 5)
                runs.append((position, position + length - 1))
                position += length + rng.randint(1, 4)
            specs.append(ItemSpec(hash_ * 10 + runs_count, modality, runs))
            position += rng.randint(0, 3)
        length = position + rng.randint(1, 6)
        prefix = rng.randint(0, length - 1)
        extend = rng.randint(1, length - prefix)
        requests.append(RequestSpec(specs, length, prefix, extend))
    return requests


@pytest.fixture(scope="session")
def native_and_plugin():
    """Install vitbatch's hook for real (entry point's register + SGLang's apply_hooks)
    once, keep SGLang's original at hand, restore everything at the end."""
    import os

    from sglang.srt.plugins.hook_registry import HookRegistry

    original = mm_schedule._get_chunked_prefill_embedding
    original = getattr(
        original, "__wrapped__", original
    )  # never mistake a patched function for SGLang's
    assert original.__globals__ is mm_schedule.__dict__
    saved_env = os.environ.get("VITBATCH_ENABLE")
    os.environ["VITBATCH_ENABLE"] = "1"
    entry._registered = entry._mm_hook_registered = False
    HookRegistry.reset()
    adapter.register()
    HookRegistry.apply_hooks()
    patched = mm_schedule._get_chunked_prefill_embedding
    assert patched is not original and getattr(patched, "__wrapped__", None) is original
    try:
        yield original, patched
    finally:
        mm_schedule._get_chunked_prefill_embedding = original
        HookRegistry.reset()
        entry._registered = entry._mm_hook_registered = False
        if saved_env is None:
            os.environ.pop("VITBATCH_ENABLE", None)
        else:
            os.environ["VITBATCH_ENABLE"] = saved_env
