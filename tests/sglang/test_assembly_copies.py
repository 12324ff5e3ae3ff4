"""vitbatch assembles a step with no more concatenations than SGLang's own path.

SGLang's ``_get_chunked_prefill_embedding`` slices every overlapping item to the
chunk window (a view, also for an audio item of several runs) and makes one
``torch.concat`` over all slices of all requests, none when there is one slice.
Every ``torch.cat`` / ``torch.concat`` is a copy of the step's embedding rows,
so vitbatch must not add any: these tests count them, natively and with
vitbatch, on cold (encoded) and warm (cached) steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.sglang.conftest import (
    FakeEncoder,
    ItemSpec,
    Modality,
    RequestSpec,
    build_step,
    mm_schedule,
    random_requests,
    run_get_embedding_and_mask,
)
from vitbatch.adapters import sglang as adapter
from vitbatch.core import Item, Span, Window
from vitbatch.plugin import defaults


@contextmanager
def counting_concatenations() -> Iterator[list[int]]:
    """Count ``torch.cat`` and ``torch.concat`` calls (either name, any caller) while active."""
    calls = [0]
    real_cat, real_concat = torch.cat, torch.concat

    def counted(real: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)

        return wrapper

    torch.cat, torch.concat = counted(real_cat), counted(real_concat)
    try:
        yield calls
    finally:
        torch.cat, torch.concat = real_cat, real_concat


def concatenations_per_step(sequence, function, settings=None) -> tuple[list[int], list]:
    """Run each step of ``sequence`` through ``get_embedding_and_mask`` with ``function`` as
    ``_get_chunked_prefill_embedding``; count the concatenations inside ``function`` only."""
    mm_schedule.init_mm_embedding_cache(1 << 20)
    if settings is not None:
        adapter.reset_state(settings)
    counts: list[int] = []

    def counted(*args):
        with counting_concatenations() as calls:
            result = function(*args)
        counts.append(calls[0])
        return result

    encoder = FakeEncoder(per_item_list=True)  # the encoder itself concatenates nothing
    previous = mm_schedule._get_chunked_prefill_embedding
    mm_schedule._get_chunked_prefill_embedding = counted
    try:
        outputs = [run_get_embedding_and_mask(build_step(step), encoder) for step in sequence]
    finally:
        mm_schedule._get_chunked_prefill_embedding = previous
    return counts, outputs


def image(hash_: int, start: int, tokens: int) -> ItemSpec:
    return ItemSpec(hash_, Modality.IMAGE, [(start, start + tokens - 1)])


def audio(hash_: int, *runs: tuple[int, int]) -> ItemSpec:
    return ItemSpec(hash_, Modality.AUDIO, list(runs))


# (step, concatenations SGLang makes: 0 for one slice, else one for the whole step)
CASES = {
    "one image, whole": ([RequestSpec([image(1, 2, 6)], 12, 0, 12)], 0),
    "one image, cut by the window": ([RequestSpec([image(1, 2, 6)], 12, 4, 8)], 0),
    "one audio item of two runs": ([RequestSpec([audio(3, (2, 3), (6, 7))], 12, 0, 12)], 0),
    "one audio item of two runs, cut": ([RequestSpec([audio(3, (2, 3), (6, 7))], 12, 3, 9)], 0),
    "two images, one request": (
        [RequestSpec([image(1, 2, 4), image(2, 8, 3)], 14, 0, 14)],
        1,
    ),
    "two requests, one image each": (
        [RequestSpec([image(1, 2, 4)], 8, 0, 8), RequestSpec([image(2, 1, 3)], 6, 0, 6)],
        1,
    ),
    "two requests, two items each": (
        [
            RequestSpec([audio(3, (2, 3), (6, 7)), audio(4, (10, 11), (14, 15))], 17, 3, 12),
            RequestSpec([image(1, 2, 4), image(2, 8, 3)], 14, 0, 14),
        ],
        1,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_more_concatenations_than_sglang(native_and_plugin, case) -> None:
    original, patched = native_and_plugin
    step, expected = CASES[case]
    sequence = [step, step]  # cold (every item encoded), then warm (every item cached)

    native_counts, native = concatenations_per_step(sequence, original)
    settings = adapter.Settings(enabled=True, max_patches=0, max_items=0)
    plugin_counts, plugin = concatenations_per_step(sequence, patched, settings)

    assert adapter.get_state().fallbacks == 0
    assert native_counts == [expected, expected]  # what SGLang 0.5.19-0.5.23 makes
    assert plugin_counts == native_counts
    for (n_emb, _, _), (p_emb, _, _) in zip(native, plugin, strict=True):
        assert torch.equal(n_emb, p_emb)


@pytest.mark.parametrize("seed", range(40))
def test_random_steps_concatenate_no_more_than_sglang(native_and_plugin, seed) -> None:
    original, patched = native_and_plugin
    rng = random.Random(seed)
    sequence = [random_requests(rng) for _ in range(rng.randint(2, 4))]

    native_counts, native = concatenations_per_step(sequence, original)
    settings = adapter.Settings(enabled=True, max_patches=0, max_items=0)
    plugin_counts, plugin = concatenations_per_step(sequence, patched, settings)

    assert adapter.get_state().fallbacks == 0
    assert len(plugin_counts) == len(native_counts)
    for step, (n, p) in enumerate(zip(native_counts, plugin_counts, strict=True)):
        assert p <= n, f"step {step}: vitbatch made {p} concatenations, SGLang {n}"
    for (n_emb, _, _), (p_emb, _, _) in zip(native, plugin, strict=True):
        assert (n_emb is None) == (p_emb is None)
        if n_emb is not None:
            assert torch.equal(n_emb, p_emb)


def core_item(hash_: int, *spans: tuple[int, int]) -> Item:
    return Item(
        hash=hash_,
        modality="audio",
        num_tokens=sum(n for _, n in spans),
        spans=tuple(Span(o, n) for o, n in spans),
    )


def test_default_assembly_copies_nothing_for_one_item() -> None:
    """The default ``vitbatch_assemble_chunk`` hands back the item's own rows: the tensor
    itself when the window holds all of it, a view of it when the window cuts it."""
    item = core_item(1, (2, 2), (6, 2))  # two runs: rows 0-1 at 2-3, rows 2-3 at 6-7
    embedding = torch.arange(8.0).reshape(4, 2)
    with counting_concatenations() as calls:
        whole = defaults.vitbatch_assemble_chunk(Window(0, 12), [item], [embedding])
        cut = defaults.vitbatch_assemble_chunk(Window(3, 15), [item], [embedding])
    assert calls[0] == 0
    assert whole is embedding
    assert torch.equal(cut, embedding[1:]) and cut.data_ptr() == embedding[1:].data_ptr()


def test_default_assembly_concatenates_once_for_several_items() -> None:
    first, second = core_item(1, (2, 2), (6, 2)), core_item(2, (10, 2), (14, 2))
    a, b = torch.arange(8.0).reshape(4, 2), -torch.arange(8.0).reshape(4, 2)
    with counting_concatenations() as calls:
        rows = defaults.vitbatch_assemble_chunk(Window(3, 15), [first, second], [a, b])
    assert calls[0] == 1
    assert torch.equal(rows, torch.cat([a[1:], b[:3]]))
