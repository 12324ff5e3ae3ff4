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
    for runner, (part, patches) in RUNNERS.items():
        driven[runner] = report.ok(part)
        if driven[runner]:
            for point, factory in patches:
                surface.wrap(point, factory)
        elif part not in _logged_parts:
            _logged_parts.add(part)
            logger.info("vitbatch: not driving that model runner: %s", report.describe(part))
    return driven


def uninstall_worker_patches() -> None:
    """Restore vLLM's methods (tests)."""
    for runner, (part, patches) in RUNNERS.items():
        if runner == "v1" or surface.check().ok(part):
            for point, _ in patches:
                surface.unwrap(point)


def install_v2_patches() -> bool:
    """Wrap Model Runner V2 alone (tests; the caller checked the engine surface)."""
    for point, factory in worker_v2.PATCHES:
        surface.wrap(point, factory)
    return True


def uninstall_v2_patches() -> None:
    """Restore Model Runner V2's methods (tests)."""
    for point, _ in worker_v2.PATCHES:
        surface.unwrap(point)
