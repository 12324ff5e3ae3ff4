"""Repack sglang-kernel's wheel without what a Hopper server on triton attention never loads.

The 0.4.5 wheel is 383 MB, 340 MB of it the FA3 library (``sgl_kernel/flash_ops.abi3.so``,
1.1 GB unpacked); the rest of the size is the Blackwell build of the common ops
(``sm100/``) and the InfLLM-V2 extension (loaded lazily). Without them the wheel is 18 MB:
one transfer to the GPU machine instead of seven. ``sgl_kernel.flash_attn`` imports
``flash_ops`` at import time, so a stand-in module takes its place: importing works, and any
FA3 call fails loudly (its torch ops are never registered). Servers staged this way must run
``--attention-backend triton --mm-attention-backend triton_attn`` (scripts/stage_sglang_gpu.sh
prints the command).

Usage: python3 scripts/slim_sglang_kernel.py IN.whl OUT_DIR   (writes OUT_DIR/<same name>)
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

LEFT_OUT = ("sgl_kernel/flash_ops.", "sgl_kernel/sm100/", "sgl_kernel/infllm_ops")
STAND_IN = "sgl_kernel/flash_ops.py"
STAND_IN_TEXT = (
    '"""Stand-in for the FA3 library left out by vitbatch\'s scripts/slim_sglang_kernel.py:\n'
    'importing works; FA3 calls fail (their torch ops are not registered)."""\n'
).encode()


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(source: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [n for n in zin.namelist() if not n.startswith(LEFT_OUT)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name == record:
                continue
            data = zin.read(name)
            zout.writestr(zin.getinfo(name), data)
            lines.append(record_line(name, data))
        zout.writestr(STAND_IN, STAND_IN_TEXT)
        lines.append(record_line(STAND_IN, STAND_IN_TEXT))
        lines.append(f"{record},,")
        zout.writestr(record, "\n".join(lines) + "\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(slim(Path(sys.argv[1]), Path(sys.argv[2])))
