"""The Dockerfile and .dockerignore, checked without a Docker engine: parsed by Docker's own parser,
linted by hadolint, every variant's image config followed through its stages, the health check run
against the real side server, and the package built from exactly the files the build context holds."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO_ROOT, Dockerfile, DockerIgnore, project_dependencies, settings_for

VARIANTS = [{"VARIANT": variant, "MODEL_SOURCE": source} for variant in ("cpu", "cuda") for source in ("hub", "baked")]
INIT_WRAPPERS = (["tini", "--"], ["/usr/bin/tini", "--"])


def variant_id(args: dict[str, str]) -> str:
    return f"{args['VARIANT']}-{args['MODEL_SOURCE']}"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile()


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_variant_builds_on_the_intended_base(dockerfile):
    # The CPU image on Python's slim image, the CUDA image on NVIDIA's; both through the same stages.
    assert dockerfile.chain({"VARIANT": "cpu"})[0].startswith("python:")
    assert dockerfile.chain({"VARIANT": "cuda"})[0].startswith("nvidia/cuda:")
    for args in VARIANTS:
        assert "runtime" in dockerfile.image_config(args).bases


@pytest.mark.parametrize("args", VARIANTS, ids=variant_id)
def test_image_runs_the_service_as_non_root(dockerfile, args):
    config = dockerfile.image_config(args)
    argv = config.argv
    for wrapper in INIT_WRAPPERS:
        if argv[: len(wrapper)] == wrapper:
            argv = argv[len(wrapper) :]
    assert argv == ["python", "-m", "consumer", "run"]
    assert config.user is not None and config.user.split(":")[0] not in ("0", "root")


def test_the_images_command_exists():
    result = subprocess.run([sys.executable, "-m", "consumer", "run", "--help"], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args", VARIANTS, ids=variant_id)
def test_image_environment_holds_only_real_settings(dockerfile, args):
    config = dockerfile.image_config(args)
    settings = settings_for(config.env)
    # The adapter directory is a volume: an empty one means the base model alone, a mount replaces it.
    assert str(settings.adapter_path) in config.volumes
    assert config.exposed == [str(settings.http_port)]
    if args["MODEL_SOURCE"] == "hub":
        # The model downloads into a volume, so a restart does not download it again.
        assert config.env["HF_HOME"] in config.volumes
    else:
        # Baked in, outside every volume (a mounted empty cache must not hide it), and offline.
        assert config.env.get("HF_HUB_OFFLINE") == "1"
        assert not any(config.env["HF_HOME"].startswith(volume) for volume in config.volumes)


@pytest.mark.parametrize("args", VARIANTS, ids=variant_id)
def test_healthcheck_follows_liveness_on_the_real_side_server(dockerfile, args, side_server):
    healthcheck = dockerfile.image_config(args).healthcheck
    assert healthcheck is not None and healthcheck.json and healthcheck.value[0] == "CMD"
    argv = list(healthcheck.value[1:])
    assert argv[0] == "python"
    default_port = re.search(r"os\.environ\.get\('HTTP_PORT', '(\d+)'\)", " ".join(argv))
    assert default_port and int(default_port.group(1)) == settings_for({}).http_port

    def run() -> int:
        env = {"HTTP_PORT": str(side_server.port)}
        return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode

    # Healthy while the model loads (the process is alive), unhealthy once the poll loop stalls.
    side_server.loading()
    assert run() == 0
    side_server.stalled()
    assert run() != 0
    side_server.ready()
    assert run() == 0


def _builder_runs(dockerfile: Dockerfile) -> list[str]:
    return [" ".join(c.value) for c in dockerfile.stage("builder").commands if c.cmd.upper() == "RUN"]


def test_dependencies_come_from_pyproject(dockerfile, tmp_path):
    runs = _builder_runs(dockerfile)
    generator = next(run for run in runs if "pyproject.toml" in run)
    words = shlex.split(generator)
    code, output = words[words.index("-c") + 1], words[words.index(">") + 1]
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    listed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert listed.stdout.split("\n")[:-1] == project_dependencies()
    # Every pip install installs that list or the project itself: no second list of packages to drift.
    installs = [segment for run in runs for segment in re.split(r"&&|;", run) if "pip install" in segment]
    assert installs
    for segment in installs:
        words = shlex.split(re.sub(r"\$\{[^}]*\}", "", segment.split("pip install", 1)[1]))
        targets = [w for i, w in enumerate(words) if not w.startswith("-") and (i == 0 or words[i - 1] != "-r")]
        requirement_files = [words[i + 1] for i, w in enumerate(words) if w == "-r"]
        assert targets in ([], ["."]) and requirement_files in ([], [output]), segment
        assert targets or requirement_files, segment


def test_build_context_holds_what_the_build_copies_and_builds_the_package(dockerfile, tmp_path):
    ignore = DockerIgnore()
    sources = [
        source
        for command in dockerfile.stage("builder").commands
        if command.cmd.upper() == "COPY" and not any(flag.startswith("--from") for flag in command.flags)
        for source in command.value[:-1]
    ]
    assert "pyproject.toml" in sources
    context = tmp_path / "context"
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if not ignore.excluded(str(f.relative_to(REPO_ROOT)))]
        assert kept, f"COPY {source}: .dockerignore keeps it out of the build context"
        for file in kept:
            (context / file.relative_to(REPO_ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, context / file.relative_to(REPO_ROOT))
    # What `pip install --no-deps .` does in the builder: build the wheel with the project's backend.
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(wheels)!r})"],
        cwd=context,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "consumer").rglob("*.py")}
    assert modules <= names, f"missing from the image's package: {sorted(modules - names)}"


@pytest.mark.parametrize(
    "path",
    [
        "weights/adapter_model.safetensors",
        "weights/adapter_config.json",
        ".venv/bin/python",
        ".kafka/libs/kafka_2.13-4.1.2.jar",
        ".demo/broker/data/meta.properties",
        ".tools/bin/kustomize",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        "tests/conftest.py",
        "consumer/__pycache__/settings.cpython-311.pyc",
        ".env",
    ],
)
def test_dockerignore_keeps_weights_caches_and_venvs_out(path):
    assert DockerIgnore().excluded(path)


def test_dockerignore_keeps_the_package_in():
    ignore = DockerIgnore()
    assert not ignore.excluded("consumer/__main__.py")
    assert not ignore.excluded("consumer/engine/qwen.py")
    assert not ignore.excluded("pyproject.toml")
