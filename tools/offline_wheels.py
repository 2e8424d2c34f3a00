"""Wheels for running the benchmarks on a GPU machine that has PyTorch but no package index.

Ray's wheel is ~76 MiB, mostly a Java jar (31 MiB) that Python never loads. This script downloads Ray
(pinned to the project's version, for the target Python) and the pure-Python packages a bare PyTorch image
tends to lack, and writes a *slim* Ray wheel without ``ray/jars``, RLlib, Serve, Ray LLM and the dashboard's
web client (none used by sophon-ray), with a RECORD that matches. ``bench/gpu.sh`` installs a folder made
here with ``pip install --no-index --no-deps --target`` when ``import ray`` fails.

Usage: ``python tools/offline_wheels.py --python-version 3.12 --out .whl`` (needs pip's index once, here).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# Ray, and what Ray, Tune and Train import that a PyTorch CUDA image lacks (checked against the H200 image's
# package list), at the versions pinned in constraints.txt (the ones the test suite runs with)
PACKAGES = ["ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX", "pydantic",
            "pydantic_core", "annotated-types", "typing-inspection"]
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64"]


def pinned(packages: list[str], constraints: Path = CONSTRAINTS) -> list[str]:
    """``name==version`` for each package, from the project's constraints file."""
    pins = dict(line.strip().split("==", 1) for line in constraints.read_text().splitlines() if "==" in line)
    norm = {k.lower().replace("_", "-"): f"{k}=={v}" for k, v in pins.items()}
    missing = [p for p in packages if p.lower().replace("_", "-") not in norm]
    if missing:
        raise SystemExit(f"{constraints}: no pin for {missing}; add them or edit PACKAGES")
    return [norm[p.lower().replace("_", "-")] for p in packages]


def download(packages: list[str], python_version: str, dest: Path) -> None:
    """Binary wheels for ``packages`` (no dependencies) for CPython ``python_version`` on x86-64 Linux."""
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platform_args,
                    "-d", str(dest), *packages], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path) -> tuple[int, int]:
    """Rewrite ``wheel`` in place without the ``DROP`` trees; returns (bytes before, bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename.startswith(DROP) or info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data)  # keeps external_attr: raylet and gcs_server stay executable
            lines.append(_record_line(info.filename, data))
        lines.append(f"{record_name},,")
        dst.writestr(src.getinfo(record_name), "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="folder for the wheels (default .whl)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    download(pinned(PACKAGES), args.python_version, args.out)
    ray_wheel = next(args.out.glob("ray-*.whl"))
    before, after = slim(ray_wheel)
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{ray_wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB; {args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
