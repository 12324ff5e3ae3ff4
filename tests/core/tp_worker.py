"""One rank of the tensor-parallel agreement test (spawned by test_tensor_parallel.py).

Every rank runs the same random steps through its own VitBatcher; the encoder
plugin does one all-reduce per call on an "encoder" group, like a sharded
vision tower, so any difference in the ranks' call sequences hangs or errors.
Faults hit one rank (the victim) at chosen steps. Writes its outcomes as JSON.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from tests.core import fakes
from tests.core.fakes import HIDDEN, encode_one, features_for
from vitbatch import hookimpl
from vitbatch.core import EmbeddingCache, Item, RequestChunk, Span, VitBatcher, Window
from vitbatch.core.agreement import group_agree
from vitbatch.core.errors import OutOfMemoryError, VitBatchError
from vitbatch.core.planner import Budget
from vitbatch.plugin import make_plugin_manager

SIZES = (2, 3, 5)
HASHES = 32
ORACLE = {(h, n): encode_one(features_for(h, n)) for h in range(HASHES) for n in SIZES}
FAULTS = (
    "capacity",
    "oom-in-call",
    "plugin-raises",
    "restore-fails",
    "evict",
    "bad-output",
    "fewer-items",
)
ROW_BYTES = HIDDEN * 8


class ShardedLikeEncoder:
    """Encodes, then all-reduces a buffer sized by the call (a sharded tower's collective)."""

    def __init__(self, group) -> None:
        self.group = group
        self.fault: str | None = None
        self.calls = 0

    @hookimpl
    def vitbatch_encode_batch(self, items: Sequence[Item]) -> list[torch.Tensor]:
        self.calls += 1
        out = [ORACLE[(item.hash, item.num_tokens)].clone() for item in items]
        shard = torch.zeros(sum(item.num_tokens for item in items) * HIDDEN, dtype=torch.float64)
        dist.all_reduce(shard, group=self.group)  # faults below come after the collective
        if self.fault == "oom-in-call" and len(items) > 1:
            raise OutOfMemoryError("injected: CUDA out of memory inside the call")
        if self.fault == "plugin-raises":
            raise RuntimeError("injected plugin failure")
        if self.fault == "bad-output":
            out[0] = out[0][:-1]
        return out


class FlakyCache(EmbeddingCache):
    fail_restores = False

    def get(self, key):
        if self.fail_restores and key in self.host_keys():
            raise RuntimeError("injected host-tier restore failure")
        return super().get(key)


def steps(seed: int, count: int):
    rng = random.Random(seed)
    for step in range(count):
        chunks = []
        many = rng.random() < 0.1  # more distinct items than agreement 1's header holds
        for request in range(rng.randint(24, 30) if many else rng.randint(1, 4)):
            items, position = [], rng.randint(0, 2)
            for _ in range(rng.randint(1, 3)):
                h, n = rng.randrange(HASHES), rng.choice(SIZES)
                items.append(Item(h, "image", n, (Span(position, n),), features=None))
                position += n + rng.randint(0, 2)
            start = rng.randint(0, position - 1)
            chunks.append(RequestChunk(items, Window(start, position), request))
        fault = rng.choice(FAULTS) if rng.random() < 0.35 else None
        victim = rng.randrange(dist.get_world_size())
        yield step, chunks, fault, victim, rng.random()


def drop_last_item(chunks: list[RequestChunk]) -> list[RequestChunk]:
    """The step without its last item (without its last request, if that had one item)."""
    *rest, last = chunks
    if len(last.items) == 1:
        return rest or chunks
    return [*rest, RequestChunk(list(last.items[:-1]), last.window, last.request_id)]


def oracle_rows(chunk: RequestChunk) -> torch.Tensor | None:
    return fakes.oracle_rows(chunk, lambda h, n: ORACLE[(h, n)])


def main(rank: int, world: int, init_file: str, out_file: str, count: int, agree: bool) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60 if agree else 10),
    )
    encoder_group = dist.new_group(backend="gloo")  # the tower's collectives
    agree_group = dist.new_group(backend="gloo")  # vitbatch's agreement (the engine's CPU group)
    encoder = ShardedLikeEncoder(encoder_group)
    cache = FlakyCache(24 * ROW_BYTES, host_capacity_bytes=40 * ROW_BYTES)
    capacity = {"value": None}
    batcher = VitBatcher(
        Budget(max_cost=10, max_items=3),
        cache,
        make_plugin_manager(load_entry_points=False, plugins=[encoder]),
        hidden_size=HIDDEN,
        agree=group_agree(agree_group) if agree else None,
        capacity=lambda: capacity["value"],
    )
    outcomes, injected, agreements = [], {f: 0 for f in FAULTS}, 0
    for step, chunks, fault, victim, pick in steps(1234, count):
        mine = fault if rank == victim else None
        encoder.fault = mine
        cache.fail_restores = mine == "restore-fails"
        capacity["value"] = 3 if mine == "capacity" else None
        if mine == "fewer-items":  # this rank sees a shorter step (issue 23 D)
            chunks = drop_last_item(chunks)
        if mine == "evict":
            entries = cache.peek_all()
            if entries:
                cache.discard(entries[int(pick * len(entries))][0])
        if mine:
            injected[mine] += 1
        try:
            result = batcher.run_step(chunks)
        except VitBatchError as error:  # the adapter would serve this step natively
            outcomes.append(f"fallback:{type(error).__name__}")
            continue
        except OutOfMemoryError:
            outcomes.append("fallback:OutOfMemoryError")
            continue
        equal = all(
            (got is None and want is None) or (got is not None and torch.equal(got, want))
            for got, want in ((got, oracle_rows(c)) for c, got in zip(chunks, result.embeddings))
        )
        agreements += result.stats.agreements
        outcomes.append("served" if equal else f"WRONG at step {step}")
    served = outcomes.count("served")
    json.dump(
        {
            "rank": rank,
            "outcomes": [
                "fallback" if outcome.startswith("fallback") else outcome for outcome in outcomes
            ],
            "calls": encoder.calls,
            "injected": injected,
            "agreements_per_served_step": agreements / max(1, served),
        },
        open(out_file, "w"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_file, count, mode = sys.argv[1:]
    main(int(rank), int(world), init_file, out_file, int(count), agree=mode == "agree")
