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


# ---------------------------------------------------------------------------
# The engine's door and the import graph, read from the sources
# ---------------------------------------------------------------------------
ENGINES = ("vllm", "sglang")


def surface_files(engine: str) -> set[Path]:
    """The files of an engine's surface: ``adapters/<engine>/surface.py``, or every module of
    the package ``adapters/<engine>/surface/`` where the surface is one."""
    adapter = SRC / "adapters" / engine
    package = adapter / "surface"
    return set(package.rglob("*.py")) if package.is_dir() else {adapter / "surface.py"}


SURFACES = set().union(*(surface_files(engine) for engine in ENGINES))


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_has_its_surface(engine: str) -> None:
    files = surface_files(engine)
    assert files and all(path.is_file() for path in files), (engine, sorted(map(str, files)))


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of src/vitbatch."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def vitbatch_defines() -> set[str]:
    """Every name vitbatch itself defines or binds anywhere in src/vitbatch."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return names


def private_names_used(path: Path) -> list[tuple[int, str]]:
    """Underscored (not dunder) attributes a module reads, writes or names in getattr & co."""
    used = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name = node.args[1].value
        if name and name.startswith("_") and not name.startswith("__"):
            used.append((node.lineno, name))
    return used


@pytest.mark.parametrize(
    "path", sorted(set(modules().values()) - SURFACES), ids=lambda p: str(p.relative_to(SRC))
)
def test_only_the_surface_modules_touch_an_engine(path: Path) -> None:
    """An engine is imported, and its private names touched, by its surface alone (the
    module, or every module of the package): a name with a leading underscore that vitbatch
    never defines is the engine's."""
    for module, _ in imports_of(path):
        assert module.split(".")[0] not in ENGINES, (
            f"{path.relative_to(SRC)} imports {module}: "
            "only adapters/<engine>/surface (its module or package) may"
        )
    ours = vitbatch_defines()
    foreign = [(line, name) for line, name in private_names_used(path) if name not in ours]
    assert not foreign, f"{path.relative_to(SRC)} touches engine-private names {foreign}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the vitbatch modules it imports (lazily or not), the seam left out."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                graph[name].add(target)
    return graph


def test_no_import_circle_in_src() -> None:
    """No module reaches itself through imports, the lazy seam core/hooks.py -> plugin
    included (the default hooks take the piece helpers from core/pieces.py, which calls no
    hook); a package's ``__init__`` importing its own modules is a re-export, not a
    circle, and is left out."""
    graph = import_graph()
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(f"{t}.")}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles
