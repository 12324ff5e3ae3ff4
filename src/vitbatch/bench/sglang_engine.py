"""``vitbatch bench --engine sglang``: SGLang's own multimodal step, natively and with vitbatch.

Each step calls SGLang's real ``mm_schedule.get_embedding_and_mask`` with the
bundled Qwen2.5-VL-shaped vision tower as ``data_embedding_func``. Features start
on the host, where SGLang's scheduler hands them over; after the step the
post-forward copy-back of ``mm_utils.general_mm_embed_routine`` runs
(:func:`offload_after_forward`, reproduced because the routine needs a whole
model forward; ``tests/sglang/test_bench_sglang.py`` guards it against drift in
SGLang's ``prepare_mm_inputs``). Two modes:

- ``sglang-native``: SGLang's ``_get_chunked_prefill_embedding`` as shipped;
- ``vitbatch``: the same function with vitbatch's AROUND hook, installed through
  SGLang's ``HookRegistry`` as the plugin entry point does.

Runs are multi-step (waves of requests, chunked prefill where the workload asks,
images repeated across steps and requests) so SGLang's embedding cache, its
``host_offload_event`` and the pinned host allocator reach steady state. A first
pass runs both modes step by step and compares their outputs on every step; the
timed passes follow, interleaved across modes, each with fresh caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from vitbatch.adapters.sglang import surface
from vitbatch.bench import sgl_kernel_standin
from vitbatch.bench.memory import read_peak, reset_peak
from vitbatch.bench.workload import WORKLOADS, Image, WorkloadSpec, draw_requests

ENGINE_MODES = ("sglang-native", "vitbatch")


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


@dataclass
class EngineResult:
    mode: str
    steps: int
    images: int
    seconds: float
    peak_bytes: int | None
    encoder_calls: int
    d2h_copies: int
    d2h_bytes: int
    d2h_seconds: float
    fallbacks: int = 0
    unsupported: int = 0
    vitbatch_items: int = 0  # items that went through vitbatch's batcher (0 in native mode)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["images_per_second"] = self.images_per_second
        out["mean_step_seconds"] = self.seconds / self.steps if self.steps else 0.0
        return out


# ---------------------------------------------------------------------------
# Workload: waves of requests, cut into scheduler steps
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# SGLang's pieces
# ---------------------------------------------------------------------------


def embedding_func(
    model: torch.nn.Module, grids: dict[int, tuple[int, int, int]], calls: list[int]
) -> Callable:
    """A ``data_embedding_func`` like Qwen2.5-VL's ``get_image_feature``: one tower call
    over the concatenated features of the given items."""
    dtype = next(model.parameters()).dtype

    def embed_images(items: Sequence) -> torch.Tensor:
        calls[0] += 1
        pixel_values = torch.cat([item.feature for item in items]).to(dtype)
        with torch.inference_mode():
            return model(pixel_values, [grids[item.hash] for item in items])

    return embed_images


def offload_after_forward(items: Sequence, device: torch.device) -> tuple[int, int]:
    """The post-forward copy-back of SGLang's ``general_mm_embed_routine``: every
    feature still on the GPU is copied to the host asynchronously, and
    ``mm_schedule.host_offload_event`` is recorded so the next step's host→device
    move waits for it. Returns (copies, bytes)."""
    if device.type != "cuda":  # SGLang offloads only when the input embeddings are on CUDA
        return 0, 0
    stream = torch.cuda.current_stream(device)
    copies = nbytes = 0
    for item in items:
        feature = item.feature
        if isinstance(feature, torch.Tensor) and feature.is_cuda:
            feature.record_stream(stream)
            item.feature = feature.to("cpu", non_blocking=True)
            copies += 1
            nbytes += feature.numel() * feature.element_size()
    if copies:
        if surface.host_offload_event() is None:
            surface.set_host_offload_event(torch.cuda.Event())
        surface.host_offload_event().record(stream)
    return copies, nbytes


def install_hook() -> tuple[Callable, Callable]:
    """SGLang's ``_get_chunked_prefill_embedding`` and the same with vitbatch's hook,
    installed the way the plugin entry point does it."""
    from vitbatch.adapters import sglang as adapter

    original = surface.chunked_prefill_function()
    original = getattr(original, "__wrapped__", original)
    os.environ["VITBATCH_ENABLE"] = "1"
    adapter.register()
    surface.apply_hooks()
    patched = surface.chunked_prefill_function()
    if patched is original:
        raise RuntimeError(
            "vitbatch's hook was not installed on mm_schedule._get_chunked_prefill_embedding"
        )
    surface.set_chunked_prefill_function(original)
    return original, patched


class ModeState:
    """What one mode keeps across the steps of a pass: SGLang's cache (in vitbatch mode
    also vitbatch's device tier) and offload event, vitbatch's adapter state, the engine's
    items of each request."""

    def __init__(self, mode: str, function: Callable, args: argparse.Namespace) -> None:
        from vitbatch.adapters import sglang as adapter

        self.mode = mode
        self.function = function
        self.cache = surface.new_embedding_cache(args.cache_mb * 2**20)
        self.event = None
        self.adapter = (
            adapter.reset_state(
                adapter.Settings(
                    enabled=True,
                    max_patches=args.max_patches,
                    max_items=args.max_items,
                )
            )
            if mode == "vitbatch"
            else None
        )
        self.items: dict[int, list] = {}
        self.calls = [0]
        self.copies = self.bytes = 0
        self.d2h_seconds = 0.0

    def enter(self) -> None:
        from vitbatch.adapters import sglang as adapter

        surface.set_embedding_cache(self.cache)
        surface.set_host_offload_event(self.event)
        surface.set_chunked_prefill_function(self.function)
        if self.adapter is not None and adapter.get_state() is not self.adapter:
            raise RuntimeError("another vitbatch adapter state replaced this mode's")

    def leave(self) -> None:
        self.event = surface.host_offload_event()

    def engine_items(self, request: EngineRequest) -> list:
        items = self.items.get(request.rid)
        if items is None:
            items = []
            for image, run in zip(request.images, request.offsets):
                items.append(surface.image_item(run, image.features, image.hash))
            self.items[request.rid] = items
        return items


def _token_ids(request: EngineRequest, items: Sequence) -> list[int]:
    tokens = [5 + (position % 50) for position in range(request.length)]
    for item in items:
        for start, end in item.offsets:
            tokens[start : end + 1] = item.padding_sequence(end - start + 1)
    return tokens


def run_step(
    state: ModeState,
    step: Sequence[StepSlice],
    requests: dict[int, EngineRequest],
    func: Callable,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One scheduler step for one mode: SGLang's ``get_embedding_and_mask``, then its copy-back."""
    items: list = []
    items_size, prefix, extend, offsets, ids = [0], [], [], [], []
    for part in step:
        request = requests[part.rid]
        own = state.engine_items(request)
        items.extend(own)
        items_size.append(len(items))
        prefix.append(part.start)
        extend.append(part.end - part.start)
        offsets.append(list(request.offsets))
        ids.extend(_token_ids(request, own)[part.start : part.end])
    pads = sorted({value for item in items for value in item.padding_values()})
    input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    placeholder = torch.as_tensor(pads, device=device)
    state.enter()
    try:
        embedding, mask, _ = surface.get_embedding_and_mask(
            func, items, placeholder, input_ids, items_size, prefix, extend, offsets
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        copies, nbytes = offload_after_forward(items, device)
        if copies:
            surface.host_offload_event().synchronize()
        state.d2h_seconds += time.perf_counter() - started
        state.copies += copies
        state.bytes += nbytes
    finally:
        state.leave()
    return embedding, mask


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------


def relative_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float().to(a.device)
    scale = torch.linalg.norm(a).item() or 1.0
    return torch.linalg.norm(a - b).item() / scale


def check_pass(
    functions: dict[str, Callable],
    model: torch.nn.Module,
    grids: dict,
    requests: dict[int, EngineRequest],
    steps: Sequence[Sequence[StepSlice]],
    device: torch.device,
    args: argparse.Namespace,
) -> list[float]:
    """Both modes step by step (each with its own caches); the per-step error of vitbatch vs
    native."""
    native = ModeState("sglang-native", functions["sglang-native"], args)
    ours = ModeState("vitbatch", functions["vitbatch"], args)
    native_func = embedding_func(model, grids, native.calls)
    our_func = embedding_func(model, grids, ours.calls)
    errors = []
    for step in steps:
        reference, reference_mask = run_step(native, step, requests, native_func, device)
        output, mask = run_step(ours, step, requests, our_func, device)
        error = relative_error(reference, output)
        if not torch.equal(reference_mask.cpu(), mask.cpu()):
            error = float("inf")
        errors.append(error)
    return errors


def timed_pass(
    mode: str,
    function: Callable,
    model: torch.nn.Module,
    grids: dict,
    requests: dict[int, EngineRequest],
    steps: Sequence[Sequence[StepSlice]],
    device: torch.device,
    args: argparse.Namespace,
) -> EngineResult:
    state = ModeState(mode, function, args)
    func = embedding_func(model, grids, state.calls)
    reset_peak(device)
    step_seconds = []
    for step in steps:
        started = time.perf_counter()
        run_step(state, step, requests, func, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - started)
    peak = read_peak(device)
    images = sum(len(requests[p.rid].images) for step in steps for p in step if p.start == 0)
    return EngineResult(
        mode=mode,
        steps=len(steps),
        images=images,
        seconds=sum(step_seconds),
        peak_bytes=peak,
        encoder_calls=state.calls[0],
        d2h_copies=state.copies,
        d2h_bytes=state.bytes,
        d2h_seconds=state.d2h_seconds,
        fallbacks=state.adapter.fallbacks if state.adapter else 0,
        unsupported=state.adapter.unsupported if state.adapter else 0,
        vitbatch_items=state.adapter.batcher.totals.items if state.adapter else 0,
        step_seconds=step_seconds,
    )


# ---------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------


def format_table(results: Sequence[EngineResult]) -> str:
    base = next((r for r in results if r.mode == "sglang-native"), results[0])
    header = (
        f"{'mode':<14} {'step ms':>9} {'images/s':>10} {'x native':>9} {'peak MiB':>9} "
        f"{'peak/nat':>9} {'calls':>6} {'D2H':>6} {'D2H MiB':>9} {'D2H ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'n/a':>9}"
        peak_ratio = (
            f"{r.peak_bytes / base.peak_bytes:9.2f}"
            if r.peak_bytes is not None and base.peak_bytes
            else f"{'n/a':>9}"
        )
        lines.append(
            f"{r.mode:<14} {r.seconds / r.steps * 1e3:9.2f} {r.images_per_second:10.1f} "
            f"{r.images_per_second / base.images_per_second:9.2f} {peak} {peak_ratio} "
            f"{r.encoder_calls:6d} "
            f"{r.d2h_copies:6d} {r.d2h_bytes / 2**20:9.1f} {r.d2h_seconds * 1e3:8.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry of ``vitbatch bench --engine sglang``; 0 when every step matched and nothing fell
    back."""
    from vitbatch.bench.main import TOLERANCE, _device_name, device_and_dtype, run_environment
    from vitbatch.encoders.qwen_vision import build_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    standin = sgl_kernel_standin.install_if_missing() if device.type == "cuda" else False
    surface.load_multimodal_modules()  # after the stand-in, if any
    sglang_version = surface.sglang_version()

    torch.manual_seed(args.seed)
    model = build_encoder(args.encoder, device, dtype)
    config = model.config
    original, patched = install_hook()
    functions = {"sglang-native": original, "vitbatch": patched}
    tolerance = TOLERANCE[dtype]
    reports = []
    ok = True

    def write_json(complete: bool) -> None:
        """Written after every workload too, so a run stopped at a time limit keeps its figures."""
        if not args.json:
            return
        environment = {
            "engine": "sglang",
            "complete": complete,
            "sglang": sglang_version,
            "sgl_kernel_standin": standin,
            "sgl_kernel_standin_calls": sgl_kernel_standin.calls(),
            **run_environment(args.encoder, device, dtype),
            "cache_mb": args.cache_mb,
            "steps_min": args.steps,
            "repeat": args.repeat,
            "command": "vitbatch " + " ".join(sys.argv[1:]),
        }
        args.json.write_text(json.dumps({**environment, "workloads": reports}, indent=2))

    try:
        for name in args.workload:
            spec = WORKLOADS[name]
            if args.requests:
                spec = dataclasses.replace(spec, requests=args.requests)
            requests, steps = engine_workload(
                spec,
                patch_size=config.patch_size,
                merge_size=config.spatial_merge_size,
                patch_dim=config.patch_dim,
                min_steps=args.steps,
                seed=args.seed,
            )
            grids = {image.hash: image.grid for r in requests.values() for image in r.images}
            errors = check_pass(functions, model, grids, requests, steps, device, args)
            results: dict[str, EngineResult] = {}
            for _ in range(args.repeat):
                for mode in ENGINE_MODES:  # interleaved: a slow spell of the machine hits both
                    result = timed_pass(
                        mode, functions[mode], model, grids, requests, steps, device, args
                    )
                    if mode not in results or result.seconds < results[mode].seconds:
                        results[mode] = result
            equal = all(e <= tolerance for e in errors)
            fallbacks = results["vitbatch"].fallbacks
            engaged = results["vitbatch"].vitbatch_items > 0  # the hook really served steps
            ok = ok and equal and fallbacks == 0 and engaged
            table = [results[m] for m in ENGINE_MODES]
            images = len({i.hash for r in requests.values() for i in r.images})
            print(
                f"workload {name} (SGLang {sglang_version} get_embedding_and_mask): "
                f"{len(requests)} requests, "
                f"{len(steps)} steps, {images} distinct images; encoder {args.encoder} "
                f"{str(dtype).removeprefix('torch.')} on {_device_name(device)}"
            )
            print(format_table(table))
            print(
                f"outputs equal on every step: {'yes' if equal else 'NO'} (max relative error "
                f"{max(errors):.2e}, tolerance {tolerance:g}); vitbatch fallbacks {fallbacks}, "
                f"steps served natively as unsupported {results['vitbatch'].unsupported}, "
                f"items through vitbatch {results['vitbatch'].vitbatch_items}\n"
            )
            reports.append(
                {
                    "workload": name,
                    "requests": len(requests),
                    "steps": len(steps),
                    "distinct_images": images,
                    "outputs_equal": equal,
                    "vitbatch_engaged": engaged,
                    "max_relative_error": max(errors),
                    "step_relative_error": errors,
                    "results": [r.as_dict() for r in table],
                    "ratios": {
                        "images_per_second": results["vitbatch"].images_per_second
                        / results["sglang-native"].images_per_second,
                        "peak_bytes": (results["vitbatch"].peak_bytes or 0)
                        / results["sglang-native"].peak_bytes
                        if results["sglang-native"].peak_bytes
                        else None,
                    },
                }
            )
            write_json(complete=False)
    finally:
        mm_schedule_restore(original)
    called = sgl_kernel_standin.calls()
    if called:
        ok = False
        print(f"FAILED: sgl_kernel stand-in names were called: {called}", file=sys.stderr)
    write_json(complete=True)
    return 0 if ok else 1


def mm_schedule_restore(original: Callable) -> None:
    surface.set_chunked_prefill_function(original)
