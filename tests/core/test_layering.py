"""Import layering: adapters -> plugin layer -> core; the core reaches hooks through one seam."""

from __future__ import annotations

import ast
from pathlib import Path

import pluggy
import pytest

from vitbatch.core.errors import OutOfMemoryError, PluginCallError, VitBatchError
from vitbatch.core.hooks import call_first_result
from vitbatch.plugin import hookimpl, make_plugin_manager

SRC = Path(__file__).resolve().parents[2] / "src" / "vitbatch"


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top) for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((SRC / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_plugin_layer_and_no_engine(path: Path) -> None:
    for module, top_level in imports_of(path):
        assert not module.startswith(("sglang", "vllm", "vitbatch.adapters")), (path.name, module)
        if module.startswith("vitbatch.plugin"):
            # the one seam: the step engine's hook module, lazily
            assert path.name == "hooks.py" and not top_level, (path.name, module)


@pytest.mark.parametrize("path", sorted((SRC / "plugin").glob("*.py")), ids=lambda p: p.name)
def test_plugin_layer_imports_no_adapter_and_no_engine(path: Path) -> None:
    for module, _ in imports_of(path):
        assert not module.startswith(("sglang", "vllm", "vitbatch.adapters")), (path.name, module)


class Spec:
    @pluggy.HookspecMarker("t")
    def hook(self, x):
        """A firstresult test hook."""

    hook = pluggy.HookspecMarker("t")(firstresult=True)(hook)


def manager(*plugins) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("t")
    pm.add_hookspecs(Spec)
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    return pm


impl = pluggy.HookimplMarker("t")


class Declines:
    @impl
    def hook(self, x):
        return None


class Answers:
    @impl
    def hook(self, x):
        return x * 2


class Raises:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    @impl
    def hook(self, x):
        raise self.error


def test_call_first_result_names_the_answering_plugin() -> None:
    pm = manager(("answers", Answers()), ("declines", Declines()))  # last registered asked first
    assert call_first_result(pm.hook.hook, x=21) == (42, "answers")
    assert call_first_result(manager(("declines", Declines())).hook.hook, x=1) is None


def test_call_first_result_wraps_plugin_errors_and_passes_ours_through() -> None:
    with pytest.raises(
        PluginCallError, match=r"plugin 'bad' raised KeyError in hook for items \[1\]"
    ):
        call_first_result(manager(("bad", Raises(KeyError("k")))).hook.hook, "items [1]", x=1)
    for error in (OutOfMemoryError("oom"), VitBatchError("ours")):
        with pytest.raises(type(error)):
            call_first_result(manager(("bad", Raises(error))).hook.hook, x=1)


def test_call_first_result_refuses_wrappers() -> None:
    class Wrapper:
        @impl(wrapper=True)
        def hook(self, x):
            return (yield)

    with pytest.raises(VitBatchError, match="registers a wrapper"):
        call_first_result(manager(("w", Wrapper())).hook.hook, x=1)


def test_manager_check_pending_catches_misspelled_hooks() -> None:
    class Misspelled:
        @hookimpl
        def vitbatch_encode_batches(self, items):  # not a vitbatch hook
            return None

    with pytest.raises(pluggy.PluginValidationError, match="vitbatch_encode_batches"):
        make_plugin_manager(load_entry_points=False, plugins=[Misspelled()])
