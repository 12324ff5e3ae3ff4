"""Print ``name==version`` of every distribution that importing SGLang's multimodal
step pulls in here and that the GPU machine lacks (run inside /work/envs/sglang).

Why empirical: sglang's declared requirements are far more than its multimodal
path imports, and the GPU machine has no package index, so the staged wheels are
exactly the distributions whose modules these imports load, minus the machine's
own packages (``--have``: KINDS.md's "Python packages already there" list).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from importlib import metadata

IMPORTS = (
    "sglang.srt.managers.mm_schedule",
    "sglang.srt.managers.mm_utils",
    "sglang.srt.managers.schedule_batch",
    "sglang.srt.mem_cache.multimodal_cache",
    "sglang.srt.plugins.hook_registry",
    "sglang.version",
)
NEVER = {
    "sglang",
    "sgl-kernel",
    "torch",
    "triton",
    "vitbatch",
}  # staged apart, or the machine's own


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: set[str], stop: set[str]) -> set[str]:
    """``roots`` and what they require (markers evaluated here, extras skipped), recursively:
    a module imported lazily on the GPU machine (CUDA-only branches) still finds its needs."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(roots)
    while todo:
        dist = todo.pop()
        if dist in seen or dist in stop:
            continue
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing imports it here either
        seen.add(dist)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            todo.append(canonical(requirement.name))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--have", required=True, help="file with the machine's package names")
    args = parser.parse_args()
    with open(args.have) as handle:
        text = handle.read()
    have = {canonical(n) for n in re.split(r"[,\s]+", text) if n}
    for module in IMPORTS:
        importlib.import_module(module)
    owners = metadata.packages_distributions()
    wanted = set()
    for name in list(sys.modules):
        for dist in owners.get(name.partition(".")[0], []):
            wanted.add(canonical(dist))
    wanted = closure(wanted - have - NEVER, have | NEVER)
    for dist in sorted(wanted):
        print(f"{dist}=={metadata.version(dist)}")


if __name__ == "__main__":
    main()
