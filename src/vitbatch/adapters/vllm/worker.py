"""Worker side's installer: the one place that knows both model runners.

The wrappers live in :mod:`.worker_v1` and :mod:`.worker_v2` (each a table of
wrap points and wrapper factories); :func:`install_worker_patches` applies the
tables whose part of the engine surface is present. It runs where vitbatch is
known to be on: where the manager is built (scheduler process, in-process
workers) and in a worker process when vitbatch's step metadata first arrives
(the package wires :func:`~.metadata.on_arrival` to it).
"""

from __future__ import annotations

import logging

from vitbatch.adapters.vllm import surface, worker_v1, worker_v2

logger = logging.getLogger("vllm.vitbatch")

RUNNERS = {"v1": ("runner_v1", worker_v1.PATCHES), "v2": ("runner_v2", worker_v2.PATCHES)}
_logged_parts: set[str] = set()


def install_worker_patches() -> dict[str, bool]:
    """Route both model runners through vitbatch for steps carrying vitbatch's metadata.

    Idempotent and thread-safe. A runner whose part of the engine surface is
    missing is left alone, with one log line. Returns which runners are driven.
    """
    report = surface.check()
    driven = {}
    for runner, (part, _) in RUNNERS.items():
        driven[runner] = report.ok(part) and install_runner(runner)
        if not driven[runner] and part not in _logged_parts:
            _logged_parts.add(part)
            logger.info("vitbatch: not driving that model runner: %s", report.describe(part))
    return driven


def install_runner(runner: str) -> bool:
    """Wrap one model runner (``"v1"`` or ``"v2"``); the caller checked its engine surface."""
    for point, factory in RUNNERS[runner][1]:
        surface.wrap(point, factory)
    return True


def uninstall_runner(runner: str) -> None:
    """Restore one model runner's methods (tests)."""
    for point, _ in RUNNERS[runner][1]:
        surface.unwrap(point)


def uninstall_worker_patches() -> None:
    """Restore vLLM's methods (tests)."""
    for runner, (part, _) in RUNNERS.items():
        if runner == "v1" or surface.check().ok(part):
            uninstall_runner(runner)
