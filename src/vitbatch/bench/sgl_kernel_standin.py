"""An importable stand-in for ``sgl_kernel`` whose names fail loudly when called.

Why: on CUDA, SGLang's ``mm_schedule``/``mm_utils`` import chain pulls in
``sgl_kernel`` for quantization kernels. Its wheel is tied to one torch build,
so on a machine with another torch it does not import, although the multimodal
path never calls it. The stand-in lets the modules import; every call of one of
its names is recorded *and* raises, so a call swallowed by some ``try`` in the
engine still fails the benchmark (see :func:`calls`).

It is installed only by the benchmark, only when the real module does not import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

NAME = "sgl_kernel"

_calls: list[str] = []


class StandInCalled(RuntimeError):
    """A name of the ``sgl_kernel`` stand-in was called: the path under test needs the real
    kernels."""


class _StandIn:
    """Any attribute of the stand-in: attribute chains resolve, calls fail."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __getattr__(self, name: str) -> _StandIn:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self._qualname}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        _calls.append(self._qualname)
        raise StandInCalled(
            f"{self._qualname} was called, but {NAME} is only a stand-in here (the real wheel "
            "does not import with this torch); the benchmark's run is invalid"
        )

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in {self._qualname}>"


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> _StandIn:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == NAME or fullname.startswith(NAME + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []  # a package, so ``sgl_kernel.x`` submodules import too
        return module

    def exec_module(self, module) -> None:
        module.__version__ = "0.0.0+vitbatch-standin"


_finder: _Finder | None = None


def install_if_missing() -> bool:
    """Install the stand-in when ``import sgl_kernel`` fails; True if it was installed."""
    global _finder
    if _finder is not None:
        return True
    try:
        __import__(NAME)
        return False
    except Exception:  # noqa: BLE001 - ImportError, or an ABI error from a wheel built for another torch
        for name in [n for n in sys.modules if n == NAME or n.startswith(NAME + ".")]:
            del sys.modules[name]
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
    return True


def uninstall() -> None:
    """Remove the stand-in and its modules (tests)."""
    global _finder
    if _finder is not None:
        sys.meta_path.remove(_finder)
        _finder = None
    for name in [n for n, m in sys.modules.items() if isinstance(m, _Module)]:
        del sys.modules[name]
    _calls.clear()


def installed() -> bool:
    return _finder is not None


def calls() -> list[str]:
    """Every stand-in name called so far, in order (empty on a valid run)."""
    return list(_calls)
