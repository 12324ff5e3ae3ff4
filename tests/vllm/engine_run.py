"""Run one vLLM engine over the test workload and write what it did as JSON.

Run as a subprocess by the end-to-end test (one fresh process per engine, so the
two runs share no process state)::

    python tests/vllm/engine_run.py MODEL_DIR OUT.json MODE

(MODE: native, vitbatch, vitbatch-failing, vitbatch-mp, vitbatch-ec or vitbatch-prefetch.)

``vitbatch-failing`` registers a vitbatch encoder plugin that raises, to show
that vLLM then runs its native path and still answers every request.
``vitbatch-mp`` runs the model in a separate worker process (vLLM's ``mp``
executor), where vitbatch must switch itself on from the step metadata alone;
prefetch is on there (the orders, inputs included, are pickled to the worker),
and the worker's counters come back through the metrics snapshot directory.
``vitbatch-ec`` adds one of vLLM's own EC connectors (``ECExampleConnector``,
which runs on CPU; ``ECCPUConnector`` needs Model Runner V2), before which
vitbatch's host tier steps aside.
``vitbatch-prefetch`` switches encoder prefetch on and records each step's
prefetch orders, consumes and scheduled encoder inputs; after the workload it
resets the encoder cache and runs it again with every prefetch call failing,
then aborts waiting requests whose images were prefetched.

The workload has three phases, each one ``LLM.generate`` call:

1. eight prompts with 1-3 images each, mixed sizes, some images shared between
   prompts (all sent at once, so their images meet in the same steps);
2. fillers with new images that push phase 1's embeddings out of vLLM's small
   encoder cache (``max_num_batched_tokens`` bounds it);
3. phase-1 prompts sent again: their images were evicted, so vLLM re-encodes
   them natively while vitbatch restores them from its host tier.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_qwen2vl import image_tokens, prompt_for

MAX_NUM_BATCHED_TOKENS = 256  # also vLLM's encoder cache size, in embeddings
VITBATCH_OPTIONS = {
    "max_batch_patches": 256,  # patches (4 per embedding): forces several encoder calls per step
    "max_batch_items": 8,
    "host_cache_embeds": 2048,
}

# name -> (width, height); tokens = (w/28) * (h/28)
IMAGES = {
    "A": (56, 56),
    "B": (112, 84),
    "C": (168, 112),
    "D": (224, 168),
    "E": (224, 224),
    "F": (112, 56),
    "G": (84, 140),
    "H": (224, 224),
    "I": (196, 224),
    "J": (224, 196),
    "K": (168, 168),
    "N": (196, 112),
    # prefetch mode only: requests aborted while they wait
    "P": (224, 224),
    "Q": (224, 196),
    "R": (196, 224),
    "S": (224, 168),
    "T": (168, 224),
    "U": (196, 196),
}
ABORTED = [["P"], ["Q"], ["R"], ["S"], ["T"], ["U"]]
PREFETCH_OPTIONS = {**VITBATCH_OPTIONS, "prefetch": True}
#: Two requests run at a time, so most of each phase waits: prefetch's case.
PREFETCH_MAX_NUM_SEQS = 2
PHASES = [
    [["A", "B"], ["C"], ["D", "A", "F"], ["B", "G"], ["E"], ["A", "C", "G"], ["F", "D"], ["B"]],
    [["H"], ["I"], ["J"], ["K"], ["N"]],
    [["A", "B"], ["D", "A", "F"], ["E"]],
]


def make_image(name: str):
    import numpy as np
    from PIL import Image

    width, height = IMAGES[name]
    rng = np.random.default_rng(ord(name))
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def count_scheduled_encoder_inputs() -> dict[str, int]:
    """Test instrumentation: how many encoder inputs vLLM's scheduler sent to the workers.

    Counted on the scheduler's output (in-process engine core only), so it is the
    same for both model runners. Natively every one of them is encoded.
    """
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.schedule
    counter = {"items": 0, "hashes": []}

    def counting(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        counter["items"] += sum(len(ids) for ids in output.scheduled_encoder_inputs.values())
        counter["hashes"].append(
            [
                self.requests[rid].mm_features[i].identifier
                for rid, ids in output.scheduled_encoder_inputs.items()
                for i in ids
            ]
        )
        return output

    Scheduler.schedule = counting
    return counter


def record_prefetch_steps() -> list[dict]:
    """Test instrumentation: each step's prefetch orders and consumes, as the manager ships them."""
    from vitbatch.adapters.vllm.scheduler import VitBatchEncoderCacheManager as Manager

    original = Manager.get_manager_metadata
    steps: list[dict] = []

    def recording(self):
        metadata = original(self)
        steps.append(
            {
                "orders": [order.mm_hash for order in metadata.prefetch],
                "consume": list(metadata.prefetch_consume),
                "release": list(metadata.prefetch_release),
            }
        )
        return metadata

    Manager.get_manager_metadata = recording
    return steps


def generate_phases(llm, params, images) -> list:
    phases = []
    for phase in PHASES:
        requests = [
            {
                "prompt": prompt_for(len(names)),
                "multi_modal_data": {"image": [images[n] for n in names]},
            }
            for names in phase
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        phases.append(
            [
                {
                    "images": names,
                    "token_ids": list(out.outputs[0].token_ids),
                    "prompt_len": len(out.prompt_token_ids),
                }
                for names, out in zip(phase, outputs)
            ]
        )
    return phases


def prefetch_passes(llm, params, images, steps: list[dict], scheduled: dict) -> dict:
    """After the workload: again with failing prefetches, then aborts of waiting requests."""
    from vitbatch.adapters.vllm import scheduler, stats, surface, worker_state

    clean = {"stats": stats(), "steps": list(steps), "scheduled": list(scheduled["hashes"])}
    engine_core = llm.llm_engine.engine_core.engine_core
    engine_core.reset_encoder_cache()  # every image is new again: prefetched again

    def failing(runner, mm_kwargs):
        raise RuntimeError("injected prefetch failure")

    original = surface.v1_encode_eagerly
    surface.v1_encode_eagerly = failing
    try:
        faulty = generate_phases(llm, params, images)
    finally:
        surface.v1_encode_eagerly = original
    faulty_stats = stats()
    # Aborts: six one-image requests; after one step the last ones wait (with their
    # images prefetched); abort three of those, let the others finish.
    engine = llm.llm_engine
    for index, names in enumerate(ABORTED):
        prompt = {"prompt": prompt_for(1), "multi_modal_data": {"image": [images[names[0]]]}}
        engine.add_request(f"abort-{index}", prompt, params)
    engine.step()
    before_abort = stats()
    engine.abort_request([f"abort-{index}" for index in (3, 4, 5)])
    while engine.has_unfinished_requests():
        engine.step()
    managers = list(scheduler.managers)
    return {
        "clean": clean,
        "faulty_phases": faulty,
        "faulty_stats": faulty_stats,
        "before_abort": before_abort,
        "after_abort": stats(),
        "ledger_keys": sum(len(m.prefetch.ledger) for m in managers if m.prefetch is not None),
        "pool_entries": sum(
            len(s.prefetch) for s in list(worker_state.states) if s.prefetch is not None
        ),
    }


def run(model: str, mode: str, scratch: Path) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if mode == "vitbatch-failing":
        from vitbatch import hookimpl
        from vitbatch.plugin import get_plugin_manager

        class Broken:
            @hookimpl(tryfirst=True)
            def vitbatch_encode_batch(self, items):
                raise RuntimeError("deliberately broken encoder plugin")

        get_plugin_manager().register(Broken(), name="broken-test-plugin")
    if mode.startswith("vitbatch"):
        # The switch every supported vLLM has (0.26+); test_manager covers --ec-manager-config.
        kwargs["additional_config"] = {"vitbatch": VITBATCH_OPTIONS}
    steps = None
    if mode == "vitbatch-prefetch":
        kwargs["additional_config"] = {"vitbatch": PREFETCH_OPTIONS}
        steps = record_prefetch_steps()
    if mode == "vitbatch-mp":
        kwargs["distributed_executor_backend"] = "mp"
        kwargs["additional_config"] = {"vitbatch": PREFETCH_OPTIONS}
        kwargs["max_num_seqs"] = PREFETCH_MAX_NUM_SEQS
        (scratch / "mp-metrics").mkdir(exist_ok=True)
        os.environ["VITBATCH_METRICS_DIR"] = str(scratch / "mp-metrics")  # the worker inherits it
    if mode == "vitbatch-ec":
        from vllm.config import ECTransferConfig

        kwargs["ec_transfer_config"] = ECTransferConfig(
            ec_connector="ECExampleConnector",
            ec_role="ec_both",
            ec_connector_extra_config={"shared_storage_path": str(scratch / "ec-storage")},
        )
    if mode == "vitbatch-prefetch":
        kwargs["max_num_seqs"] = PREFETCH_MAX_NUM_SEQS
    counted = ("native", "vitbatch", "vitbatch-prefetch")
    scheduled = count_scheduled_encoder_inputs() if mode in counted else None
    started = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=kwargs.pop("max_num_seqs", 8),
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        limit_mm_per_prompt={"image": 3, "video": 0},  # no video: cache size = image budget
        seed=0,
        **kwargs,
    )
    init_seconds = time.perf_counter() - started
    images = {name: make_image(name) for name in IMAGES}
    params = SamplingParams(temperature=0.0, max_tokens=8)
    started = time.perf_counter()
    phases = generate_phases(llm, params, images)
    result = {
        "mode": mode,
        "init_seconds": init_seconds,
        "generate_seconds": time.perf_counter() - started,
        "phases": phases,
        "image_tokens": {name: image_tokens(*size) for name, size in IMAGES.items()},
        "scheduled_encoder_inputs": scheduled["items"] if scheduled else None,
    }
    if steps is not None:
        result["prefetch"] = prefetch_passes(llm, params, images, steps, scheduled)
    if mode == "vitbatch-mp":
        from vitbatch.metrics import read_snapshots

        result["worker_counters"] = [
            s["counters"] for s in read_snapshots(str(scratch / "mp-metrics"))
        ]
    if mode in (
        "vitbatch",
        "vitbatch-failing",
        "vitbatch-ec",
        "vitbatch-prefetch",
    ):  # in-process worker: its counters are readable here
        from vitbatch.adapters.vllm import stats

        result["stats"] = stats()
    return result


def main() -> None:
    model, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    Path(out).write_text(json.dumps(run(model, mode, Path(out).parent), indent=1, default=str))


if __name__ == "__main__":
    main()
