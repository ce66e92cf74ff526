"""The container images, without a container engine.

hadolint lints both Dockerfiles, and each Dockerfile's install steps (the RUN lines under an
`# install step` comment) run verbatim in a fresh virtual environment, so a broken dependency line
fails here before an image build does. The build is replayed on a temporary directory: COPY takes
the sources through .dockerignore as Docker does, WORKDIR moves, and each install step runs with
`sh -c` (Docker's shell), VIRTUAL_ENV naming the fresh environment (the image's /opt/venv) and the
Makefile's uv (the image's version) on PATH. Both install from uv.lock (tests/test_environment.py);
the trainer gets the same torch wheel as the image (PyPI's, with its CUDA libraries), which runs on
a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"
INSTALL_STEP = "# install step"
# `make setup` installs the Makefile's uv into the virtual environment that runs the tests.
UV = Path(sys.executable).with_name("uv")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    install_step: bool


def parse(dockerfile: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: str | None = None
    marked = False
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        # Docker drops comment and empty lines, also in the middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            marked |= pending is None and stripped == INSTALL_STEP
            continue
        text = stripped if pending is None else f"{pending} {stripped}"
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        pending = None
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), marked))
        marked = False
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    start = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[start:]


def last(instructions: list[Instruction], keyword: str) -> str:
    return [i.arguments for i in instructions if i.keyword == keyword][-1]


def install_command(instruction: Instruction) -> str:
    """An install step's shell command, without RUN's flags (--mount=...)."""
    return re.sub(r"^(--\S+\s+)*", "", instruction.arguments)


def dockerignore() -> Callable[[str], bool]:
    """Whether .dockerignore leaves a path (relative to the context) out of the build context.

    Docker's rule: the last pattern that matches the path or one of its parent directories
    decides, `!` patterns letting the path in; `*` and `?` stay within a path component, `**`
    spans any number of them.
    """
    globs = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.removeprefix("!").strip("/")
            tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
            regex = re.compile("".join(globs.get(t, re.escape(t)) for t in tokens))
            patterns.append((regex, line.startswith("!")))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for regex, exception in patterns:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not exception
        return excluded

    return ignored


def copy(
    arguments: str, root: Path, workdir: PurePosixPath, ignored: Callable[[str], bool]
) -> None:
    """COPY from the build context: a directory's contents, or files into a directory (`dir/`)."""
    *sources, destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
    target = root / PurePosixPath(workdir, destination).relative_to("/")
    for source in sources:
        path = REPO / source
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        files = [f for f in files if f.exists() and not ignored(f.relative_to(REPO).as_posix())]
        assert files, f"COPY {source}: not in the build context (missing, or in .dockerignore)"
        for file in files:
            if path.is_dir():
                into = target / file.relative_to(path)
            else:
                into = target / file.name if destination.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, into)


def install(dockerfile: Path, tmp_path: Path) -> Path:
    """Replays the Dockerfile's COPY, WORKDIR and install steps; returns the virtual environment.

    The image's filesystem is `root`; everything else a build does (the base image, uv, the user)
    is no concern of the install steps.
    """
    venv, root = tmp_path / "venv", tmp_path / "root"
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{UV.parent}:{os.environ['PATH']}"}
    ignored = dockerignore()
    workdir = PurePosixPath("/")
    for instruction in parse(dockerfile):
        if instruction.keyword == "FROM":
            workdir = PurePosixPath("/")
        elif instruction.keyword == "WORKDIR":
            workdir = PurePosixPath(workdir, instruction.arguments)
        elif instruction.keyword == "COPY" and "--from=" not in instruction.arguments:
            copy(instruction.arguments, root, workdir, ignored)
        elif instruction.install_step:
            cwd = root / workdir.relative_to("/")
            cwd.mkdir(parents=True, exist_ok=True)
            command = install_command(instruction)
            subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, check=True)
    return venv


def run_in(venv: Path, *argv: str, cwd: Path) -> str:
    """Runs a command with the environment's bin first on PATH, as the image's PATH has it.

    Returns its stdout; its stderr goes to pytest's capture, shown when the test fails.
    """
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout


def installed(venv: Path) -> dict[str, str]:
    """Distribution name -> version in the environment."""
    python = venv / "bin" / "python"
    freeze = subprocess.run(
        [UV, "pip", "freeze", "--python", python], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return dict(line.split("==") for line in freeze.splitlines() if "==" in line)


def pin(extra: str, name: str) -> str:
    """The version pyproject.toml pins `name` to in an extra."""
    (version,) = (
        r.removeprefix(f"{name}==")
        for r in PYPROJECT["project"]["optional-dependencies"][extra]
        if r.startswith(f"{name}==")
    )
    return version


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} := (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match[1].strip()


@pytest.fixture(scope="session")
def hadolint() -> str:
    script = REPO / "tests" / "tools" / "hadolint.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([script], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.splitlines()[-1]


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_hadolint_finds_no_warning(hadolint: str, dockerfile: Path) -> None:
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", dockerfile],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    # hadolint only objects to a last USER of root, not to an image without USER; Kubernetes'
    # runAsNonRoot can check only a numeric one.
    uid = last(final_stage(parse(dockerfile)), "USER").split(":")[0]
    assert uid.isdigit() and int(uid) > 0, uid


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_image_agrees_with_makefile_and_pyproject(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.findall(r"\buv==(\S+)", text) == [makefile_variable("UV_VERSION")]
    version = PYPROJECT["project"]["version"]
    assert f'org.opencontainers.image.version="{version}"' in text


def test_operator_deployment_runs_the_image_as_built() -> None:
    deployment = yaml.safe_load((REPO / "manifests" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image = final_stage(parse(OPERATOR))
    # The Deployment gives args only: the image's ENTRYPOINT is the command.
    assert "command" not in container
    assert json.loads(last(image, "ENTRYPOINT")) == ["chatflow-operator"]
    assert str(pod["securityContext"]["runAsUser"]) == last(image, "USER").split(":")[0]
    exposed = sorted(int(port) for port in last(image, "EXPOSE").split())
    assert sorted(port["containerPort"] for port in container["ports"]) == exposed


def test_operator_image_installs_without_torch(tmp_path: Path) -> None:
    venv = install(OPERATOR, tmp_path)
    subprocess.run([UV, "pip", "check", "--python", venv / "bin" / "python"], check=True)
    heavy = [name for name in installed(venv) if name == "torch" or name.startswith("nvidia-")]
    assert not heavy, f"the operator image would install {heavy}"
    entrypoint = json.loads(last(final_stage(parse(OPERATOR)), "ENTRYPOINT"))
    crd = yaml.safe_load(run_in(venv, *entrypoint, "crd", cwd=tmp_path))
    assert crd["kind"] == "CustomResourceDefinition"


@pytest.mark.slow
def test_trainer_image_installs_and_runs_its_default_command(tmp_path: Path) -> None:
    venv = install(TRAINER, tmp_path)
    subprocess.run([UV, "pip", "check", "--python", venv / "bin" / "python"], check=True)
    versions = installed(venv)
    for name in ("torch", "deepspeed"):
        assert versions[name] == pin("trainer", name)
    run_in(venv, "python", "-c", "import deepspeed, chatflow.train.loop", cwd=tmp_path)
    # `docker run` of the image: torchrun starts one trainer process, which prints its usage.
    image = final_stage(parse(TRAINER))
    command = json.loads(last(image, "ENTRYPOINT")) + json.loads(last(image, "CMD"))
    assert "--cache-dir" in run_in(venv, *command, cwd=tmp_path)
