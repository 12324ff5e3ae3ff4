"""The vLLM bench's report: each configuration's rounds folded into one row per
(runner, graphs, workload, mode), median and min–max of every figure, the verdict
against native, and the compact table printed at the end.

A round's figure is its fastest timed pass (:func:`round_result`, a
:class:`~vitbatch.bench.report.Result`); a row's figure is the median over rounds
with its range in ``row["range"]``; ``row["rounds"]`` keeps every round.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from vitbatch.bench.common import Spread, percentile, token_mismatches, verdict
from vitbatch.bench.report import Column, Result, format_table
from vitbatch.bench.vllm_child import ChildConfig

FIGURES = (  # per row: median and range over rounds
    "requests_per_s",
    "images_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "encoder_calls",
    "cached_tokens",
    "peak_extra_gib",
    "host_restores",
)


def round_result(mode: str, passes: list[dict]) -> Result:
    """One round of one configuration on one workload: its fastest timed pass."""
    best = min(passes, key=lambda p: p["seconds"])  # steady state: the fastest timed pass
    ttft = [t for p in passes for t in p["ttft"]]
    return Result(
        mode=mode,
        images=best["images"],
        seconds=best["seconds"],
        encoder_calls=best["encoder_calls"],
        peak_bytes=best["peak_extra_bytes"],
        extra={
            "requests": best["requests"],
            "requests_per_s": best["requests"] / best["seconds"],
            "images_per_s": best["images"] / best["seconds"],
            "ttft_p50_ms": None if not ttft else 1000 * percentile(ttft, 0.5),
            "ttft_p99_ms": None if not ttft else 1000 * percentile(ttft, 0.99),
            "cached_tokens": best.get("cached_tokens", 0),
            "peak_extra_gib": None
            if best["peak_extra_bytes"] is None
            else best["peak_extra_bytes"] / 2**30,
            "host_restores": best["host_restores"],
        },
    )


def compare(rounds: list[dict[str, Any]], groups: list[list[ChildConfig]]) -> list[dict]:
    """One row per (runner, graphs, workload, mode): each figure's median and range over
    the rounds that ran, every round's figures, and against native of the same round the
    greedy outputs compared and the verdict on requests/s."""
    rows = []
    for group in groups:
        for name in group[0].workloads:
            native_label = next((c.label for c in group if c.engine == "native"), None)
            per_mode: dict[str, list[dict]] = {}
            for config in group:
                mode = config.label.rsplit("/", 1)[1]
                figures, compared, mismatches = [], 0, 0
                for each in rounds:
                    done = each["results"].get(config.label)
                    if done is None or "error" in done:
                        continue
                    figures.append(round_result(mode, done["workloads"][name]["passes"]).as_dict())
                    native = each["results"].get(native_label) if native_label else None
                    if native and "error" not in native and config.engine != "native":
                        a = native["workloads"][name]["token_ids"]
                        b = done["workloads"][name]["token_ids"]
                        compared += len(a)
                        mismatches += token_mismatches(a, b)
                if not figures:
                    continue
                runner, graphs = config.runner, "on" if config.graphs else "off"
                row: dict[str, Any] = {"runner": runner, "graphs": graphs, "workload": name}
                row.update(mode=mode, engine=config.engine, rounds=figures, range={})
                for key in FIGURES:
                    values = [f[key] for f in figures if f[key] is not None]
                    if values:
                        spread = Spread.of(values)
                        row[key], row["range"][key] = spread.median, [spread.low, spread.high]
                    else:
                        row[key] = None
                if native_label and config.engine != "native":
                    row["prompts_compared"], row["mismatches"] = compared, mismatches
                per_mode[mode] = row
                rows.append(row)
            native_row = per_mode.get("native")
            for row in per_mode.values():
                if native_row is None or row is native_row:
                    continue
                ours, theirs = (
                    Spread.of([f["requests_per_s"] for f in r["rounds"]]) for r in (row, native_row)
                )
                row["speedup"] = ours.median / theirs.median
                # one round has no spread to judge by
                row["verdict"] = verdict(ours, theirs) if len(row["rounds"]) > 1 else "-"
    return rows


COLUMNS = (
    Column("runner", "runner", str.upper),
    Column("workload", "workload"),
    Column("mode", "mode"),
    Column("req/s", "requests_per_s", ".2f"),
    Column("TTFT p50 ms", "ttft_p50_ms", ".0f"),
    Column("enc. calls", "encoder_calls", ".0f"),
    Column("cached tok", "cached_tokens", ".0f"),
    Column("host restores", "host_restores", ".0f"),
    Column("x native", "speedup", lambda x: f"{x:.2f}x"),
    Column("verdict", "verdict"),
    Column("equal", "equal"),
)


def format_rows(rows: list[dict]) -> str:
    """The compact table: median (min–max) over rounds; equal = prompts with native's
    greedy token ids."""
    shown = [
        {**row, "equal": f"{row['prompts_compared'] - row['mismatches']}/{row['prompts_compared']}"}
        if "mismatches" in row
        else row
        for row in rows
    ]
    columns = list(COLUMNS)
    if any(row["graphs"] == "on" for row in rows):
        columns.insert(1, Column("enc. graphs", "graphs"))
    return format_table(shown, columns)


def protocol_line(args, groups, rounds, refused: set[str], started: float) -> str:
    """The line under the table: how the figures were made."""
    skipped = [
        r
        for r in args.runners
        if "eccpu" in args.modes
        and not any(
            c.engine == "eccpu" and c.label not in refused
            for g in groups
            for c in g
            if c.runner == r
        )
    ]
    note = (
        f"; eccpu not run on {', '.join(skipped).upper()} (no EC connector in this vLLM's runner)"
        if skipped
        else ""
    )
    return (
        f"{len(rounds)} round(s), engines alternating, order rotated each round; "
        f"prefix caching {'on' if args.prefix_caching else 'OFF'}; median (min–max) over rounds; "
        f"'same' = ranges overlap{note}; {time.perf_counter() - started:.0f} s in all"
    )


def write_json(args, groups, rounds, refused: set[str], complete: bool, started: float) -> None:
    """The JSON: where it ran, the protocol, the rows, and every round as measured."""
    if not args.json:
        return
    import torch

    from vitbatch.bench.common import DTYPES, run_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or f"Qwen2.5-VL-{args.shape}-shaped, dummy weights"
    header = {**run_environment(model, device, DTYPES[args.dtype]), "argv": sys.argv}
    versions = {out.get("vllm") for r in rounds for out in r["results"].values()} - {None}
    header["vllm"] = versions.pop() if len(versions) == 1 else sorted(versions)
    protocol = {
        "rounds": args.rounds,
        "rounds_done": len(rounds),
        "passes": args.passes,
        "prefix_caching": args.prefix_caching,
        "configurations": [c.label for g in groups for c in g if c.label not in refused],
        "runner_takes_no_ec_connector": sorted(refused),
        "wall_seconds": time.perf_counter() - started,
    }
    rows = compare(rounds, groups)
    payload = {
        "run": header,
        "protocol": protocol,
        "complete": complete,
        "rows": rows,
        "rounds": rounds,
    }
    args.json.write_text(json.dumps(payload, indent=1))
