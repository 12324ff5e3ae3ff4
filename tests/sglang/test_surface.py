"""The engine surface check against the installed SGLang: it has every name; a missing one
turns vitbatch off with one line; the feature probes read what this release really does."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import pytest
import torch

pytest.importorskip("sglang.srt.managers.mm_utils")

from vitbatch.adapters.sglang import entry, surface  # noqa: E402

# SGLang's step module in the installed release (mm_schedule 0.5.18+, mm_utils 0.5.17)
mm_step = importlib.import_module(surface.step_module_name())


def test_installed_sglang_has_the_whole_surface() -> None:
    assert surface.missing_piece() is None
    assert surface.surface_problem() is None


def test_missing_attribute_is_named_with_the_version(monkeypatch) -> None:
    monkeypatch.delattr(mm_step, "_get_chunked_embedding_full")
    problem = surface.surface_problem()
    assert problem is not None
    assert f"{mm_step.__name__}._get_chunked_embedding_full" in problem
    assert surface.sglang_version() in problem and surface.sglang_version() != "unknown"


def test_missing_nested_attribute_is_named(monkeypatch) -> None:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

    monkeypatch.delattr(MultimodalDataItem, "is_audio")
    missing = surface.missing_piece()
    assert missing == "sglang.srt.managers.schedule_batch.MultimodalDataItem.is_audio"


def test_step_probe_finds_the_module_that_defines_the_step() -> None:
    """The step lives in mm_schedule where SGLang has that module (0.5.18+), else in
    mm_utils (0.5.17); the probe names the module whose own code the step is."""
    split_out = importlib.util.find_spec("sglang.srt.managers.mm_schedule") is not None
    assert surface.step_module_name() == (
        "sglang.srt.managers.mm_schedule" if split_out else "sglang.srt.managers.mm_utils"
    )
    native = surface.chunked_prefill_function()
    native = getattr(native, "__wrapped__", native)
    assert native.__module__ == surface.step_module_name()
    assert native.__globals__ is mm_step.__dict__  # its embedding_cache is the one read
    assert (surface.step_module_name(), "embedding_cache") in surface.names()
    assert not [name for name in surface.names() if "{" in name[0] + (name[1] or "")]


def test_resolution_probe_names_where_server_args_resolve() -> None:
    """``resolve_once`` where SGLang separates resolution from construction (0.5.19+),
    else the dataclass's ``__post_init__``; the hook target is a real method either way."""
    from sglang.srt.server_args import ServerArgs

    method = surface.resolution_method()
    assert method == ("resolve_once" if hasattr(ServerArgs, "resolve_once") else "__post_init__")
    assert callable(getattr(ServerArgs, method))
    assert ("sglang.srt.server_args", f"ServerArgs.{method}") in surface.names()


def test_bad_setting_stops_server_args_resolution(monkeypatch) -> None:
    """The BEFORE hook on the probed resolution method raises a bad VITBATCH_* value to
    whoever resolves ServerArgs, on every supported release."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import ServerArgs

    method = surface.resolution_method()
    original = ServerArgs.__dict__[method]
    HookRegistry.reset()
    try:
        surface.hook_server_args_resolution(entry._before_resolution)
        surface.apply_hooks()
        assert ServerArgs.__dict__[method] is not original
        monkeypatch.setenv("VITBATCH_MAX_ITEMS", "many")
        with pytest.raises(ValueError, match="VITBATCH_MAX_ITEMS"):
            getattr(ServerArgs, method)(None)  # the hook raises before SGLang runs
    finally:
        setattr(ServerArgs, method, original)
        HookRegistry.reset()


def test_missing_module_is_named() -> None:
    assert surface.missing_piece((("sglang.srt.no_such_module", None),)) == (
        "sglang.srt.no_such_module"
    )


def test_mismatch_registers_no_hook_and_logs_one_line(monkeypatch, caplog) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    record = staticmethod(lambda *a, **k: registered.append(a))
    monkeypatch.setattr(HookRegistry, "register", record)
    monkeypatch.setattr(entry, "_mm_hook_registered", False)
    monkeypatch.delattr(mm_step, "_can_skip_pre_embed_feature_move")
    with caplog.at_level(logging.ERROR, logger="vitbatch.sglang"):
        entry._register_mm_hook()
    assert registered == []
    lines = [r.getMessage() for r in caplog.records if "vitbatch is off" in r.getMessage()]
    assert len(lines) == 1 and "_can_skip_pre_embed_feature_move" in lines[0]


# ---------------------------------------------------------------------------
# Feature probes, each checked against the installed release's own behaviour
# ---------------------------------------------------------------------------


def _recording_full_path(monkeypatch):
    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        return None, args[5]

    monkeypatch.setattr(mm_step, "_get_chunked_embedding_full", full)
    return calls


def _step(items, offsets, prefix, extend):
    mm_step.init_mm_embedding_cache(1 << 20)
    return mm_step._get_chunked_prefill_embedding(
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
    assert surface.host_offload_event() is getattr(mm_step, "host_offload_event", None)
    key = surface.borrow_cuda_ipc_key()
    assert key is None or isinstance(key, str)
