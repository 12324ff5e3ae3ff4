"""The start-up check is generated from the accessors: what is declared is what is probed."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vitbatch.adapters.vllm import patching, probing, surface, worker, worker_v1, worker_v2
from vitbatch.adapters.vllm.scheduler_patch import _PATCHES as SCHEDULER_PATCHES


def _declared(part: str) -> set[str]:
    return {str(name) for name in surface.names(part)}


@pytest.mark.parametrize(
    ("part", "patches"),
    [
        ("scheduler", SCHEDULER_PATCHES),
        ("runner_v1", worker_v1.PATCHES),
        ("runner_v2", worker_v2.PATCHES),
    ],
)
def test_every_wrapped_method_is_declared_in_its_part(part, patches) -> None:
    for point, _ in patches:
        assert f"{point.module}.{point.owner}.{point.method}" in _declared(part)


def test_installer_knows_both_runners_and_nothing_else() -> None:
    assert {part for part, _ in worker.RUNNERS.values()} == {"runner_v1", "runner_v2"}


def test_probe_reports_a_missing_field_method_and_module() -> None:
    ecm = "vllm.v1.core.encoder_cache_manager"
    field = probing.EngineName("scheduler", ecm, "EncoderCacheManager().no_such_field")
    method = probing.EngineName("scheduler", ecm, "EncoderCacheManager.no_such_method")
    module = probing.EngineName("scheduler", "vllm.no_such_module", "X")
    assert probing.missing_reason(field) == f"{ecm}.EncoderCacheManager().no_such_field"
    assert probing.missing_reason(method) == f"{ecm}.EncoderCacheManager.no_such_method"
    assert probing.missing_reason(module) == "vllm.no_such_module (ModuleNotFoundError)"
    present = probing.EngineName("scheduler", ecm, "EncoderCacheManager().freeable")
    assert probing.missing_reason(present) is None


def test_optional_names_are_listed_not_probed() -> None:
    registry = probing.Registry()
    registry.declare("scheduler", ["vllm.no_such_module:X?"])
    report = probing.probe("9.9", registry, ["scheduler"])
    assert report.ok("scheduler") and registry.names[0].optional


def test_one_wrap_helper_wraps_once_and_unwraps() -> None:
    class Owner:
        def method(self) -> str:
            return "engine"

    def factory(original):
        return lambda self: "vitbatch+" + original(self)

    patching.wrap(Owner, "method", factory)
    patching.wrap(Owner, "method", factory)  # idempotent
    assert Owner().method() == "vitbatch+engine"
    assert patching.original_of(Owner.method)(Owner()) == "engine"
    patching.unwrap(Owner, "method")
    assert Owner().method() == "engine" and patching.original_of(Owner.method) is None
