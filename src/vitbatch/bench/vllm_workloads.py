"""The vLLM bench's traffic, named for what it is; deterministic per seed.

A workload is a list of phases (one ``LLM.generate`` call each); the last phase
is the timed one. ``n`` is 64 x ``--scale`` requests.

* ``fresh`` - n requests, 1-4 images each, 224-1120 px sides; no image repeats.
* ``conversation`` - multi-turn: 3n/4 first turns (own system prompt, 2 images
  each), n/2 fillers whose images push the first turns' embeddings out of vLLM's
  encoder cache; timed: the same conversations one turn later, i.e. the same
  prefix and images sent again with an answer and a new user turn appended.
  With prefix caching on, vLLM's KV cache holds the images' tokens and the
  encoder is not asked.
* ``reask`` - as ``conversation`` up to the fillers; timed: the same images under
  NEW prefixes (another system prompt and other user words), after vLLM's encoder
  cache evicted them: the prefix cache cannot help, the images need encoding
  (vLLM) or come back from a host tier (vitbatch, ECCPUConnector).
* ``popular`` - n prompts, each with its own system prompt and 2 images drawn from
  a pool of n/16: most images were seen by an earlier request of the same phase.
* ``video`` - n/2 requests of 8 frames each (images), a quarter of each request's
  frames shared with the other requests.

Engine-free; :mod:`vitbatch.bench.vllm_child` turns requests into prompts and images.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKLOADS = ("fresh", "conversation", "reask", "popular", "video")


@dataclass(frozen=True)
class Request:
    """One prompt: its images as (width, height, content seed), its user words, the
    system prompt before them, and later user turns of the same conversation."""

    images: tuple[tuple[int, int, int], ...]
    words: str = "describe the images"
    system: str = ""
    follow_ups: tuple[str, ...] = ()

    def prompt(self) -> str:
        from vitbatch.bench.qwen_vl_model import prompt

        return prompt(len(self.images), self.words, self.system, self.follow_ups)


def _side(rng, low: int, high: int) -> int:
    return int(rng.integers(low // 28, high // 28 + 1)) * 28


def _words(rng, count: int) -> str:
    """Words the generated model's tokenizer knows (w0..w199): a prefix of its own."""
    return " ".join(f"w{int(i)}" for i in rng.integers(0, 200, count))


def workload(name: str, seed: int, scale: float = 1.0) -> list[list[Request]]:
    """The phases of one pass (the last is timed); image contents are unique to ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = seed * 1_000_000
    n = max(2, round(64 * scale))
    if name == "fresh":
        return [
            [
                Request(
                    tuple(
                        (_side(rng, 224, 1120), _side(rng, 224, 1120), base + 10 * r + i)
                        for i in range(int(rng.integers(1, 5)))
                    )
                )
                for r in range(n)
            ]
        ]
    if name == "video":
        shared = [(448, 448, base + 900_000 + i) for i in range(2)]  # a quarter of 8 frames
        return [
            [
                Request(
                    tuple(shared + [(448, 448, base + 8 * r + i) for i in range(6)]),
                    "describe the frames",
                )
                for r in range(max(2, n // 2))
            ]
        ]
    if name in ("conversation", "reask"):
        first = [
            Request(tuple((672, 672, base + 2 * r + i) for i in range(2)), system=_words(rng, 24))
            for r in range(max(2, n * 3 // 4))
        ]
        fillers = [
            Request(((896, 896, base + 500_000 + r),), system=_words(rng, 24))
            for r in range(max(2, n // 2))
        ]
        if name == "conversation":
            later = [
                Request(r.images, r.words, r.system, ("compare the images turn",)) for r in first
            ]
        else:
            later = [
                Request(r.images, "compare the images turn " + _words(rng, 4), _words(rng, 24))
                for r in first
            ]
        return [first + fillers, later]
    if name == "popular":
        pool = [(672, 672, base + 700_000 + i) for i in range(max(2, n // 16))]
        prompts = []
        for _ in range(n):
            picks = rng.choice(len(pool), size=2, replace=False)
            prompts.append(
                Request(tuple(pool[int(i)] for i in picks), "compare the images", _words(rng, 24))
            )
        return [prompts]
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def image(width: int, height: int, content: int):
    """The PIL image of one (width, height, content seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(content)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
