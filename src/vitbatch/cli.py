"""``vitbatch`` command line: ``bench``, ``bench-vllm``, ``bench-agree`` and ``info``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitbatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from vitbatch.bench import main as bench

    bench_parser = commands.add_parser(
        "bench",
        help="compare per-request, unbounded and vitbatch encoding "
        "(--engine sglang: SGLang native vs vitbatch)",
    )
    bench.add_arguments(bench_parser)
    from vitbatch.bench import vllm_engine

    vllm_parser = commands.add_parser(
        "bench-vllm",
        help="vLLM end to end: native, vitbatch and vLLM + ECCPUConnector in alternating "
        "rounds (needs vllm; both model runners)",
    )
    vllm_engine.add_arguments(vllm_parser)
    from vitbatch.bench import agree_cost

    agree_parser = commands.add_parser(
        "bench-agree", help="cost of the tensor-parallel agreement per step (CPU, gloo)"
    )
    agree_cost.add_arguments(agree_parser)
    commands.add_parser("info", help="versions, devices, engines, hook implementations, plugins")

    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "bench-vllm":
        return vllm_engine.run(args)
    if args.command == "bench-agree":
        return agree_cost.run(args)
    from vitbatch.info import print_info

    print_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
