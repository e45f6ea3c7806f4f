"""The wheels hold every tracked file of the packages: `pip install .` (not editable) once shipped
caopd without caopd/engines/, which the editable installs the other tests use could not notice.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked(folder: str) -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.endswith(("pyproject.toml", ".gitignore"))]


def wheel_names(source: Path, tmp_path: Path) -> set[str]:
    out = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def copy_tracked(tmp_path: Path) -> Path:
    """The tracked files alone (a build in the checkout would leave build/ and *.egg-info behind)."""
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    return source


def test_the_project_wheel_holds_every_tracked_file_of_caopd_and_caopd_kernels(tmp_path):
    expected = {*tracked("caopd"), *(name.replace("kernels/", "caopd_kernels/", 1) for name in tracked("kernels"))}
    missing = sorted(expected - wheel_names(copy_tracked(tmp_path), tmp_path))
    assert not missing, f"not in the wheel: {missing}"


def test_the_kernels_wheel_holds_every_kernel_file(tmp_path):
    expected = {name.replace("kernels/", "caopd_kernels/", 1) for name in tracked("kernels")}
    missing = sorted(expected - wheel_names(copy_tracked(tmp_path) / "kernels", tmp_path))
    assert not missing, f"not in the caopd-kernels wheel: {missing}"
