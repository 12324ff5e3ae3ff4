"""Synthetic serving workloads: requests with images, laid out as token sequences
and cut into chunked-prefill steps.

Why synthetic: the benchmark must run on a fresh machine without downloads, and
what matters for the encoder is the *shape* of the traffic (how many images per
step, their sizes, repeats, chunk boundaries), not pixel content.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitbatch.core import Item, RequestChunk, Span, Window


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload.

    :param requests: number of concurrent requests.
    :param images_per_request: inclusive range of images per request.
    :param sizes: square image sides in pixels to draw from.
    :param repeat_fraction: chance that an image is a repeat of an earlier one
        (same content hash and size), as with a popular image or a resent one.
    :param chunk_tokens: prefill chunk per request per step; ``0`` for whole
        prompts in one step.
    """

    requests: int
    images_per_request: tuple[int, int]
    sizes: tuple[int, ...]
    repeat_fraction: float = 0.0
    chunk_tokens: int = 0


WORKLOADS: dict[str, WorkloadSpec] = {
    # CPU default: mixed sizes, repeats, chunk windows that cut through images.
    "default": WorkloadSpec(
        32, (1, 4), (112, 224, 336, 448), repeat_fraction=0.2, chunk_tokens=256
    ),
    # The GPU workloads of the performance issue (whole prompts, host features).
    "small": WorkloadSpec(64, (1, 1), (448,)),
    "tiny": WorkloadSpec(64, (2, 2), (224,)),
    "mixed": WorkloadSpec(32, (1, 4), (224, 448, 672, 896, 1120)),
    "large": WorkloadSpec(8, (1, 1), (1344,)),
    # mixed, prefilled in chunks of 2048 tokens per request and step (SGLang's default chunk size
    # is larger per batch; per request this cuts the larger images across steps).
    "mixed-chunked": WorkloadSpec(32, (1, 4), (224, 448, 672, 896, 1120), chunk_tokens=2048),
}


@dataclass(frozen=True)
class Image:
    """One image as the engine's processor would hand it over."""

    hash: int
    size: int
    grid: tuple[int, int, int]
    num_tokens: int
    features: torch.Tensor


@dataclass(frozen=True)
class Request:
    images: tuple[Image, ...]
    spans: tuple[Span, ...]
    length: int


def draw_requests(
    spec: WorkloadSpec,
    *,
    patch_size: int,
    merge_size: int,
    patch_dim: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Request]:
    """Draw the requests of ``spec``; features are host tensors ``[patches, patch_dim]``."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    drawn: list[Image] = []
    requests = []
    for _ in range(spec.requests):
        position = rng.randint(8, 32)  # system prompt / text before the first image
        images, spans = [], []
        for _ in range(rng.randint(*spec.images_per_request)):
            if drawn and rng.random() < spec.repeat_fraction:
                image = rng.choice(drawn)
            else:
                size = rng.choice(spec.sizes)
                side = size // patch_size
                grid = (1, side, side)
                patches = side * side
                features = torch.randn(patches, patch_dim, generator=generator).to(dtype)
                image = Image(len(drawn), size, grid, patches // (merge_size**2), features)
                drawn.append(image)
            images.append(image)
            spans.append(Span(position, image.num_tokens))
            position += image.num_tokens + rng.randint(2, 12)
        requests.append(Request(tuple(images), tuple(spans), position + rng.randint(4, 24)))
    return requests


def request_items(request: Request, modality: str = "image") -> list[Item]:
    """Core items of one request (built once, reused by every step and mode)."""
    patches_per_token = None
    items = []
    for image, span in zip(request.images, request.spans):
        patches_per_token = image.features.shape[0] // image.num_tokens
        items.append(
            Item(
                hash=image.hash,
                modality=modality,
                num_tokens=image.num_tokens,
                spans=(span,),
                features=image.features,
                cost=image.num_tokens * patches_per_token,
                payload=image,
            )
        )
    return items


def chunked_steps(requests: Sequence[Request], chunk_tokens: int) -> list[list[RequestChunk]]:
    """The scheduler steps of a chunked prefill of all requests started together."""
    items = [request_items(r) for r in requests]
    if chunk_tokens <= 0:
        return [
            [
                RequestChunk(its, Window(0, r.length), i)
                for i, (r, its) in enumerate(zip(requests, items))
            ]
        ]
    steps = []
    start = 0
    while any(start < r.length for r in requests):
        steps.append(
            [
                RequestChunk(its, Window(start, min(start + chunk_tokens, r.length)), i)
                for i, (r, its) in enumerate(zip(requests, items))
                if start < r.length
            ]
        )
        start += chunk_tokens
    return steps
