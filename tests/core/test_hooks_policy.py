"""Every hook is tested and documented (datasette's habit)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from vitbatch.plugin import hookspecs, make_plugin_manager

DOCS = Path(__file__).resolve().parents[2] / "docs" / "custom-encoders.md"
HOOKS = sorted(
    name for name in dir(make_plugin_manager(False).hook) if name.startswith("vitbatch_")
)


def test_hook_set_is_what_the_docs_promise() -> None:
    assert HOOKS == ["vitbatch_assemble_chunk", "vitbatch_encode_batch"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_arguments(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    args = list(inspect.signature(spec).parameters)
    assert f"### `{hook}({', '.join(args)})`" in DOCS.read_text()
    doc = inspect.getdoc(spec) or ""
    for arg in args:
        assert f":param {arg}:" in doc
    assert ":returns:" in doc and "Stops at first non-None result." in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_behaviour_tests(hook: str) -> None:
    tests = "".join(
        p.read_text()
        for p in Path(__file__).parent.glob("test_*.py")
        if p.name != Path(__file__).name
    )
    assert f"def {hook}(" in tests, f"no test implements {hook}"
