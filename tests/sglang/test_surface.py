"""The engine surface check against the installed SGLang: it has every name; a missing one
turns vitbatch off with one line; the feature probes read what this release really does."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("sglang.srt.managers.mm_schedule")

from vitbatch.adapters.sglang import entry, surface  # noqa: E402


def test_installed_sglang_has_the_whole_surface() -> None:
    assert surface.missing_piece() is None
    assert surface.surface_problem() is None


def test_missing_attribute_is_named_with_the_version(monkeypatch) -> None:
    from sglang.srt.managers import mm_schedule

    monkeypatch.delattr(mm_schedule, "_get_chunked_embedding_full")
    problem = surface.surface_problem()
    assert problem is not None
    assert "sglang.srt.managers.mm_schedule._get_chunked_embedding_full" in problem
    assert surface.sglang_version() in problem and surface.sglang_version() != "unknown"


def test_missing_nested_attribute_is_named(monkeypatch) -> None:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

    monkeypatch.delattr(MultimodalDataItem, "is_audio")
    missing = surface.missing_piece()
    assert missing == "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_audio"


def test_missing_module_is_named() -> None:
    assert surface.missing_piece((("sglang.srt.no_such_module", None),)) == (
        "sglang.srt.no_such_module"
    )


def test_mismatch_registers_no_hook_and_logs_one_line(monkeypatch, caplog) -> None:
    from sglang.srt.managers import mm_schedule
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    record = staticmethod(lambda *a, **k: registered.append(a))
    monkeypatch.setattr(HookRegistry, "register", record)
    monkeypatch.setattr(entry, "_mm_hook_registered", False)
    monkeypatch.delattr(mm_schedule, "_can_skip_pre_embed_feature_move")
    with caplog.at_level(logging.ERROR, logger="vitbatch.sglang"):
        entry._register_mm_hook()
    assert registered == []
    lines = [r.getMessage() for r in caplog.records if "vitbatch is off" in r.getMessage()]
    assert len(lines) == 1 and "_can_skip_pre_embed_feature_move" in lines[0]


# ---------------------------------------------------------------------------
# Feature probes, each checked against the installed release's own behaviour
# ---------------------------------------------------------------------------


def _recording_full_path(monkeypatch):
    from sglang.srt.managers import mm_schedule

    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        return None, args[5]

    monkeypatch.setattr(mm_schedule, "_get_chunked_embedding_full", full)
    return calls


def _step(items, offsets, prefix, extend):
    from sglang.srt.managers import mm_schedule

    mm_schedule.init_mm_embedding_cache(1 << 20)
    return mm_schedule._get_chunked_prefill_embedding(
        lambda batch: torch.zeros(sum(e - s + 1 for i in batch for s, e in i.offsets), 2),
        items,
        [0, len(items)],
        [prefix],
        [extend],
        [offsets],
        torch.zeros(extend, dtype=torch.int64),
    )


def _item(modality_name, runs):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    item = MultimodalDataItem(
        modality=getattr(Modality, modality_name), offsets=list(runs), feature=torch.zeros(1, 2)
    )
    item.set_hash(1234)
    return item


def test_audio_probe_matches_sglang(monkeypatch) -> None:
    """A request whose only item is multi-run audio goes down SGLang's full path exactly
    when the probe says its per-image path does not take it."""
    calls = _recording_full_path(monkeypatch)
    audio = _item("AUDIO", [(0, 1), (4, 5)])
    _step([audio], [(0, 1), (4, 5)], prefix=0, extend=6)
    assert (len(calls) == 0) == surface.audio_runs_per_image()
    assert surface.per_image_request([audio]) == surface.audio_runs_per_image()


def test_full_path_probe_matches_sglang(monkeypatch) -> None:
    """A multi-run video item whose runs are all after the chunk: SGLang's full path runs
    for it exactly when the probe says so."""
    calls = _recording_full_path(monkeypatch)
    video = _item("VIDEO", [(10, 11), (14, 15)])
    _step([video], [(10, 11), (14, 15)], prefix=0, extend=4)
    assert surface.per_image_request([video]) is False
    assert bool(calls) == surface.runs_full_path([(10, 11), (14, 15)], 0, 4)
    assert bool(calls) != surface.full_path_only_on_overlap()


def test_release_numbers_compare_as_releases() -> None:
    assert surface._release("0.5.23") == (0, 5, 23)
    assert surface._release("0.5.23.post1") >= (0, 5, 23)
    assert surface._release("0.5.24.dev3+g1234abc") >= (0, 5, 23)
    assert surface._release("0.5.22") < (0, 5, 23) and surface._release("unknown") < (0, 5, 23)


def test_offload_and_borrow_probes_read_the_installed_release() -> None:
    from sglang.srt.managers import mm_schedule

    assert surface.host_offload_event() is getattr(mm_schedule, "host_offload_event", None)
    key = surface.borrow_cuda_ipc_key()
    assert key is None or isinstance(key, str)
