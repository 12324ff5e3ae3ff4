"""The SGLang bench's traffic: waves of requests as SGLang's scheduler holds them,
cut into scheduler steps (chunked prefill where the workload asks).

Engine-free: requests, their inclusive image offsets, and the slices each step
prefills; :mod:`vitbatch.bench.sglang_engine` turns them into SGLang's items.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from vitbatch.bench.workload import Image, WorkloadSpec, draw_requests


@dataclass(frozen=True)
class EngineRequest:
    """One request as SGLang's scheduler holds it: images, inclusive offsets, token ids."""

    rid: int
    images: tuple[Image, ...]
    offsets: tuple[tuple[int, int], ...]
    length: int


@dataclass(frozen=True)
class StepSlice:
    """The part of one request a step prefills: ``[start, end)``."""

    rid: int
    start: int
    end: int


def engine_workload(
    spec: WorkloadSpec,
    *,
    patch_size: int,
    merge_size: int,
    patch_dim: int,
    min_steps: int,
    seed: int = 0,
    cross_repeat: float = 0.25,
) -> tuple[dict[int, EngineRequest], list[list[StepSlice]]]:
    """Waves of ``spec``'s requests until there are ``min_steps`` steps.

    Each image is, with chance ``cross_repeat``, one drawn earlier (in this wave or
    a previous one), so repeats cross both requests and steps. Hashes are unique
    per distinct image across waves.
    """
    rng = random.Random(seed)
    pool: list[Image] = []
    requests: dict[int, EngineRequest] = {}
    steps: list[list[StepSlice]] = []
    wave = 0
    while len(steps) < min_steps:
        drawn = draw_requests(
            spec,
            patch_size=patch_size,
            merge_size=merge_size,
            patch_dim=patch_dim,
            seed=seed + wave,
        )
        wave_requests = []
        for request in drawn:
            images = []
            for image in request.images:
                if pool and rng.random() < cross_repeat:
                    images.append(rng.choice(pool))
                    continue
                fresh = dataclasses.replace(image, hash=len(pool) + 1)
                pool.append(fresh)
                images.append(fresh)
            position = rng.randint(8, 32)
            offsets = []
            for image in images:
                offsets.append((position, position + image.num_tokens - 1))
                position += image.num_tokens + rng.randint(2, 12)
            rid = len(requests)
            requests[rid] = EngineRequest(
                rid, tuple(images), tuple(offsets), position + rng.randint(4, 24)
            )
            wave_requests.append(requests[rid])
        chunk = spec.chunk_tokens if spec.chunk_tokens > 0 else max(r.length for r in wave_requests)
        for index in range(math.ceil(max(r.length for r in wave_requests) / chunk)):
            start = index * chunk
            steps.append(
                [
                    StepSlice(r.rid, start, min(start + chunk, r.length))
                    for r in wave_requests
                    if start < r.length
                ]
            )
        wave += 1
    return requests, steps
