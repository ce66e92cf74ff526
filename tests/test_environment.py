"""The locked environment: uv.lock is what `make`, CI and both images install, for every platform.

A dependency that floats breaks new users first (an unpinned transformers release once broke both
README commands on fresh machines while warm ones stayed green), so every install is `uv sync
--locked` of the one lock, and the lock must hold a distribution of every package the images
install on each platform an image is built for.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = tomllib.loads((REPO / "uv.lock").read_text())
MAKEFILE = (REPO / "Makefile").read_text()
DOCKERFILES = [REPO / "operator" / "Dockerfile", REPO / "trainer_image" / "Dockerfile"]

# The images' platforms: their base, python:3.11-slim, is built for both.
PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}


def locked_packages() -> dict[tuple[str, str], dict]:
    """(name, version) -> the lock's entry: a package may be locked at two versions (forks)."""
    return {(canonicalize_name(p["name"]), p["version"]): p for p in LOCK["package"]}


def test_lock_matches_pyproject() -> None:
    # What `make setup` checks first; offline, since the lock must answer it alone.
    done = subprocess.run(
        [UV, "lock", "--check", "--offline"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_one_uv_version_everywhere() -> None:
    version = re.search(r"^UV_VERSION := (\S+)$", MAKEFILE, re.MULTILINE)[1]
    assert PYPROJECT["tool"]["uv"]["required-version"] == f"=={version}"
    assert f"uv=={version}" in PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert ("uv", version) in locked_packages()


def test_every_install_is_a_locked_sync() -> None:
    syncs = re.findall(r"\buv (?:sync|pip install)\b[^\n]*", MAKEFILE)
    syncs += [
        line
        for dockerfile in DOCKERFILES
        for line in re.findall(r"\buv (?:sync|pip install)\b[^\n]*", dockerfile.read_text())
    ]
    assert syncs
    for command in syncs:
        assert command.startswith("uv sync --active --locked"), command


def _wheel_fits(filename: str, tags: set[Tag]) -> bool:
    return any(tag in tags for tag in parse_wheel_filename(filename)[3])


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("extras", [["trainer", "example"], ["operator"]], ids=["trainer", "op"])
def test_lock_has_a_distribution_of_every_image_package(platform: str, extras: list[str]) -> None:
    """Each package an image installs has a wheel for its platform, or an sdist, in the lock."""
    machine = PLATFORMS[platform]
    environment = {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
        "os_name": "posix",
        "python_version": "3.11",
        "python_full_version": "3.11.17",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    # Every manylinux tag up to the base image's glibc (Debian trixie: 2.41) is compatible.
    glibc = [f"manylinux_2_{minor}_{machine}" for minor in range(41, 4, -1)]
    legacy = {"manylinux_2_5": "manylinux1", "manylinux_2_12": "manylinux2010"}
    glibc += [f"{legacy[k]}_{machine}" for k in legacy] + [f"manylinux2014_{machine}", "any"]
    tags = set(cpython_tags((3, 11), platforms=glibc))
    tags |= {Tag(f"py3{minor}", "none", p) for minor in ["", *map(str, range(12))] for p in glibc}
    tags |= {Tag("py2.py3", "none", "any"), Tag("cp311", "abi3", "any")}
    tags |= {Tag(f"cp3{m}", "abi3", p) for m in range(2, 12) for p in glibc}

    exported = subprocess.run(
        [UV, "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header"]
        + [f"--extra={extra}" for extra in extras],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    packages = locked_packages()
    missing = []
    for line in exported.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        name, version = requirement.strip().split("==")
        package = packages[canonicalize_name(name), version]
        wheels = [w["url"].rsplit("/", 1)[1] for w in package.get("wheels", [])]
        if "sdist" not in package and not any(_wheel_fits(w, tags) for w in wheels):
            missing.append(f"{name}=={version}")
    assert not missing, f"uv.lock has no {platform} distribution of {missing}"
