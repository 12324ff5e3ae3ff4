"""One configuration of ``vitbatch bench-vllm``, in its own process: one fresh vLLM
engine (``LLM``, in-process engine core so the counters are readable) runs every
workload and writes its figures as JSON.

The parent (:mod:`vitbatch.bench.vllm_engine`) hands over a :class:`ChildConfig`
(as JSON) and reads back, per workload, the timed passes and the greedy token ids.
Per workload: one warm-up pass, then ``passes`` timed passes (``max_tokens=1``:
prefill throughput), each with images of a fresh seed, then one equality pass
(``max_tokens=8``, greedy) on every phase.

``python -m vitbatch.bench.vllm_child CONFIG.json OUT.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitbatch.bench.vllm_workloads import image, workload

ENGINES = ("native", "vitbatch", "eccpu")


@dataclass(frozen=True)
class ChildConfig:
    """Everything one child needs; the parent writes it, the child reads it back.

    :param engine: ``native`` (vLLM as installed), ``vitbatch``
        (``additional_config={"vitbatch": options}``) or ``eccpu`` (vLLM with its
        own CPU encoder cache, ``ec_transfer_config``).
    :param runner: ``v1`` or ``v2`` (``VLLM_USE_V2_MODEL_RUNNER`` of the child).
    :param options: vitbatch's options (``vitbatch`` only).
    :param ec_transfer: vLLM's ``ec_transfer_config`` (``eccpu`` only).
    :param prefix_caching: vLLM's ``enable_prefix_caching`` (its default: on).
    """

    label: str
    engine: str
    runner: str
    model: str
    dummy: bool
    dtype: str
    workloads: tuple[str, ...]
    passes: int
    scale: float
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int | None
    gpu_memory_utilization: float
    prefix_caching: bool = True
    graphs: bool = False
    graph_budgets: tuple[int, ...] = (2048, 4096, 8192)
    options: dict[str, Any] = field(default_factory=dict)
    ec_transfer: dict[str, Any] | None = None
    profile: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildConfig:
        data = json.loads(text)
        data["workloads"] = tuple(data["workloads"])
        data["graph_budgets"] = tuple(data["graph_budgets"])
        return cls(**data)


# ===========================================================================
# ENGINE TOUCH (vLLM). The only place in the vLLM bench that reaches vLLM or the
# vLLM adapter: through the accessors of ``vitbatch.adapters.vllm.surface``.
# ===========================================================================


@dataclass
class VLLMNames:
    version: str
    llm: Any  # vllm.LLM
    sampling_params: Any  # vllm.SamplingParams
    ec_transfer_config: Any  # vllm.config.ECTransferConfig
    vitbatch_stats: Any  # () -> dict, vitbatch's adapter counters


def vllm_names() -> VLLMNames:
    """vLLM's offline API and vitbatch's counters, through the vLLM adapter's surface."""
    from vitbatch.adapters.vllm import stats, surface

    llm, sampling_params = surface.offline_api()
    config = surface.ec_transfer_config_class()
    return VLLMNames(surface.version() or "?", llm, sampling_params, config, stats)


def v2_runner_takes_ec_connector() -> bool:
    """Whether the installed vLLM's Model Runner V2 takes an EC connector (probed)."""
    from vitbatch.adapters.vllm import surface

    return surface.v2_runner_takes_ec_connector()


def count_encoder_calls(llm: Any) -> dict[str, int]:
    """Count ``embed_multimodal`` calls of the loaded model's class, whatever model it
    is (vLLM's ``LLM.apply_model``; the engine core runs in this process)."""
    counter = {"calls": 0}

    def patch(model: Any) -> str:
        cls = type(model)
        original = cls.embed_multimodal

        def counted(self, *args, **kwargs):
            counter["calls"] += 1
            return original(self, *args, **kwargs)

        cls.embed_multimodal = counted
        return cls.__name__

    llm.apply_model(patch)
    return counter


# ===========================================================================
# The child
# ===========================================================================


def engine_kwargs(config: ChildConfig, names: VLLMNames) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.engine == "vitbatch":
        kwargs["additional_config"] = {"vitbatch": config.options}
    if config.engine == "eccpu":
        kwargs["ec_transfer_config"] = names.ec_transfer_config(**config.ec_transfer)
    if config.graphs:
        kwargs["compilation_config"] = {
            "cudagraph_mm_encoder": True,
            "encoder_cudagraph_token_budgets": list(config.graph_budgets),
            "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64],
        }
    else:
        kwargs["enforce_eager"] = True
    if config.dummy:
        kwargs["load_format"] = "dummy"
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    return kwargs


def child(config: ChildConfig) -> dict[str, Any]:
    import torch

    names = vllm_names()
    started = time.perf_counter()
    llm = names.llm(
        model=config.model,
        dtype=config.dtype,
        seed=0,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        limit_mm_per_prompt={"image": 8, "video": 0},
        enable_prefix_caching=config.prefix_caching,
        disable_log_stats=False,
        gpu_memory_utilization=config.gpu_memory_utilization,
        **engine_kwargs(config, names),
    )
    startup = time.perf_counter() - started
    calls = count_encoder_calls(llm)
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"startup_seconds": startup, "vllm": names.version, "workloads": {}}

    def phases_for(name: str, seed: int) -> list[list[dict]]:
        return [
            [
                {
                    "prompt": r.prompt(),
                    "multi_modal_data": {"image": [image(*i) for i in r.images]},
                }
                for r in phase
            ]
            for phase in workload(name, seed, config.scale)
        ]

    def stats() -> dict[str, Any]:
        return names.vitbatch_stats() if config.engine == "vitbatch" else {}

    def restores(figures: dict[str, Any]) -> int:
        return figures["scheduler"]["host_restores"] if figures else 0

    profiler = None
    if config.profile:  # the timed passes only (engine core runs in this process)
        import cProfile

        profiler = cProfile.Profile()
    prefill = names.sampling_params(temperature=0.0, max_tokens=1)
    for name in config.workloads:
        for phase in phases_for(name, 1):  # warm-up
            llm.generate(phase, prefill, use_tqdm=False)
        passes = []
        for p in range(config.passes):
            *untimed, prompts = phases_for(name, 2 + p)
            for phase in untimed:
                llm.generate(phase, prefill, use_tqdm=False)
            before_calls, before = calls["calls"], stats()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_memory = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            outputs = llm.generate(prompts, prefill, use_tqdm=False)
            if profiler is not None:
                profiler.disable()
            seconds = time.perf_counter() - t0
            ttft = [
                out.metrics.first_token_latency
                for out in outputs
                if getattr(out, "metrics", None) is not None
                and getattr(out.metrics, "first_token_latency", 0)
            ]
            passes.append(
                {
                    "seconds": seconds,
                    "requests": len(prompts),
                    "images": sum(len(p["multi_modal_data"]["image"]) for p in prompts),
                    "ttft": ttft,
                    "encoder_calls": calls["calls"] - before_calls,
                    "cached_tokens": sum(out.num_cached_tokens or 0 for out in outputs),
                    "peak_extra_bytes": (torch.cuda.max_memory_allocated() - base_memory)
                    if cuda
                    else None,
                    "host_restores": restores(stats()) - restores(before),
                }
            )
        greedy = names.sampling_params(temperature=0.0, max_tokens=8)
        token_ids = [
            list(out.outputs[0].token_ids)
            for phase in phases_for(name, 2 + config.passes)
            for out in llm.generate(phase, greedy, use_tqdm=False)
        ]
        results["workloads"][name] = {"passes": passes, "token_ids": token_ids}
        print(f"vitbatch-bench: {config.label} {name} done", file=sys.stderr, flush=True)
    results["vitbatch_stats"] = stats()
    if profiler is not None:
        import io
        import pstats

        for order, top in (("tottime", 30), ("cumulative", 50)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
            results[f"profile_{order}"] = text.getvalue()
    return results


if __name__ == "__main__":
    spec, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.write_text(json.dumps(child(ChildConfig.from_json(spec.read_text()))))
