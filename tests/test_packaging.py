"""The wheel installs one top-level package, ``vtr``, with every source package of the repo inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {
    "vtr": "vtr",
    "adapters": "vtr/adapters",
    "kernels": "vtr/kernels",
    "video": "vtr/video",
    "demos": "vtr/demos",
}


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("vtr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vtr"}, f"only `vtr` may be installed at the top level, got {sorted(tops)}"
    expected = set()
    for src, dst in MAPPING.items():
        for init in (ROOT / src).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                expected.add(f"{dst}/{init.parent.relative_to(ROOT / src).as_posix()}/__init__.py".replace("/./", "/"))
    missing = sorted(e for e in expected if e not in names)
    assert not missing, f"packages missing from the wheel: {missing}"
    assert "vtr/py.typed" in names
