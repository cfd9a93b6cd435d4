"""The deployment files read the way their own tools read them, for tests/deploy.

- Dockerfile: Docker's own parser (the `dockerfile` package wraps BuildKit's Go parser), with the
  stage chain a build would follow for given build arguments.
- .dockerignore: Docker's matching rules (last matching pattern wins, `!` re-includes, a pattern
  that matches a directory matches everything below it, `**` spans directories).
- docker-compose.yml: whatever `docker compose config` (or Debian's `docker-compose config`) prints.
- Kubernetes: `kustomize build` output, checked against the Kubernetes API schemas shipped in
  kubernetes-validate and against the CRDs that KEDA and the Prometheus operator publish in their Go
  modules (fetched by `make deploy-tools`).
- Environment variables: real settings of consumer/settings.py (values parsed by Settings), real
  librdkafka properties (librdkafka itself is asked), or variables huggingface_hub reads.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = REPO_ROOT / ".tools"
KUSTOMIZE = TOOLS / "bin" / "kustomize"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37"
MAKE_HINT = "run `make deploy-tools` (the Makefile fetches it)"

# Variables that are not settings of this service but are read by the runtime under it.
PROCESS_VARIABLES = {
    "PATH": "the shell's search path (the image puts its virtualenv first)",
    "PYTHONUNBUFFERED": "Python: log lines reach `docker logs` as they are written",
    "PYTHONDONTWRITEBYTECODE": "Python: no .pyc files written beside read-only code",
    "OMP_NUM_THREADS": "OpenMP, hence torch's CPU thread pool",
}


# -- environment variables -----------------------------------------------------------------------
def _hub_variables() -> set[str]:
    import huggingface_hub.constants

    return set(re.findall(r"\"(HF_[A-Z0-9_]+)\"", inspect.getsource(huggingface_hub.constants)))


def is_known_variable(name: str) -> bool:
    """A setting, a KAFKA_* librdkafka passthrough (checked by `settings_for`), a variable that
    huggingface_hub reads, or one of PROCESS_VARIABLES."""
    from consumer.settings import Settings

    if name.lower() in Settings.model_fields and name.lower() != "kafka_extra":
        return True
    if name.upper().startswith("KAFKA_"):
        return True
    return name in _hub_variables() or name in PROCESS_VARIABLES


@contextlib.contextmanager
def _without_settings_in_environ() -> Iterator[None]:
    """pydantic-settings also reads os.environ; the test process's own variables must not leak in."""
    from consumer.settings import Settings

    saved = {
        key: value
        for key, value in os.environ.items()
        if key.lower() in Settings.model_fields or key.upper().startswith("KAFKA_")
    }
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def settings_for(env: Mapping[str, str | None]):
    """The Settings a process started with exactly `env` gets.

    Fails on a name that is no setting (nothing would read it), on a value Settings rejects, and on
    a KAFKA_* property or value that librdkafka rejects. None values (compose pass-through of an
    unset variable) count as absent.
    """
    from consumer.settings import Settings

    unknown = sorted(name for name in env if not is_known_variable(name))
    assert not unknown, f"not a setting, librdkafka property or Hugging Face variable: {unknown}"
    values = {key: str(value) for key, value in env.items() if value is not None}
    with _without_settings_in_environ():
        settings = Settings.from_environ(values)
    check_librdkafka_accepts(settings)
    return settings


def check_librdkafka_accepts(settings) -> None:
    """Create (and close) a real consumer and producer with the service's librdkafka config.

    librdkafka rejects unknown properties and bad values at creation. Files it opens at creation
    (CA, certificate, key) are taken from certifi's bundle, since the manifests name paths inside the
    container; the bootstrap address is a closed local port, so nothing leaves this machine.
    """
    import certifi
    from confluent_kafka import Consumer, Producer

    def local(config: dict[str, Any]) -> dict[str, Any]:
        config = {**config, "bootstrap.servers": "127.0.0.1:9"}
        for key in config:
            if key.endswith(".location") and key.startswith("ssl.ca"):
                config[key] = certifi.where()
        return config

    Consumer(local(settings.consumer_config())).close()
    Producer(local(settings.producer_config())).flush(0)


# -- Dockerfile ----------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str | None
    base: str
    commands: list[Any]


@dataclass
class ImageConfig:
    """What `docker inspect` would show of the image a build with some build arguments produces."""

    bases: list[str]
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str | None = None
    healthcheck: Any = None
    exposed: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.cmd


class Dockerfile:
    def __init__(self, path: Path = REPO_ROOT / "Dockerfile") -> None:
        import dockerfile

        self.path = path
        self.commands = list(dockerfile.parse_file(str(path)))  # raises on a syntax error
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for command in self.commands:
            kind = command.cmd.upper()
            if kind == "FROM":
                name = command.value[2] if len(command.value) > 2 and command.value[1].upper() == "AS" else None
                self.stages.append(Stage(name, command.value[0], []))
            elif not self.stages and kind == "ARG":
                key, _, default = command.value[0].partition("=")
                self.global_args[key] = default
            else:
                self.stages[-1].commands.append(command)

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def chain(self, build_args: Mapping[str, str] | None = None) -> list[Stage | str]:
        """The final stage and the stages (or external image) it builds on, base first."""
        args = {**self.global_args, **(build_args or {})}

        def expand(text: str) -> str:
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)

        names = {stage.name: stage for stage in self.stages if stage.name}
        chain: list[Stage | str] = [self.stages[-1]]
        while True:
            base = expand(chain[0].base)
            if base not in names:
                return [base, *chain]
            chain.insert(0, names[base])

    def image_config(self, build_args: Mapping[str, str] | None = None) -> ImageConfig:
        chain = self.chain(build_args)
        config = ImageConfig(bases=[chain[0]] + [stage.name or "<final>" for stage in chain[1:]])
        for stage in chain[1:]:
            for command in stage.commands:
                kind, value = command.cmd.upper(), list(command.value)
                if kind == "ENV":
                    config.env.update(dict(zip(value[::2], value[1::2], strict=False)))
                elif kind == "ENTRYPOINT":
                    config.entrypoint, config.cmd = value, []  # Docker resets CMD with ENTRYPOINT
                elif kind == "CMD":
                    config.cmd = value
                elif kind == "USER":
                    config.user = value[0]
                elif kind == "HEALTHCHECK":
                    config.healthcheck = command
                elif kind == "EXPOSE":
                    config.exposed += value
                elif kind == "VOLUME":
                    config.volumes += value
        return config


class DockerIgnore:
    """Docker's .dockerignore rules (moby patternmatcher), for the paths a test asks about."""

    def __init__(self, path: Path = REPO_ROOT / ".dockerignore") -> None:
        self.patterns: list[tuple[bool, re.Pattern[str]]] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.patterns.append((negated, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def excluded(self, relative_path: str) -> bool:
        parts = relative_path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, regex in self.patterns:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not negated
        return excluded


def project_dependencies() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


# -- compose -------------------------------------------------------------------------------------
def compose_cli() -> list[str] | None:
    """`docker compose` when the plugin is there, else Debian's `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(cli: list[str], compose_file: Path = REPO_ROOT / "docker-compose.yml") -> dict:
    """The resolved compose model, every profile enabled (anchors, merges, paths and variables done).

    Runs in a clean environment so the reader's own BASE_MODEL_ID or HF_TOKEN do not leak in.
    """
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "COMPOSE_PROFILES": "cpu,gpu"}
    result = subprocess.run(
        [*cli, "-f", str(compose_file), "--project-directory", str(REPO_ROOT), "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{' '.join(cli)} config rejected {compose_file.name}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    bind: bool


def mounts(service: dict) -> list[Mount]:
    """A service's volumes, from either CLI's output (short strings or long mappings)."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found.append(Mount(source, target, "ro" in (mode[0].split(",") if mode else []), source.startswith("/")))
        else:
            found.append(
                Mount(volume["source"], volume["target"], bool(volume.get("read_only")), volume.get("type") == "bind")
            )
    return found


def host_path(service: dict, container_path: str) -> Path | None:
    """Where a path inside the service's container comes from on the host (bind mounts only)."""
    for mount in sorted(mounts(service), key=lambda m: -len(m.target)):
        if mount.bind and (container_path == mount.target or container_path.startswith(mount.target.rstrip("/") + "/")):
            return Path(mount.source) / os.path.relpath(container_path, mount.target)
    return None


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


def duration_seconds(text: str | int | float) -> float:
    """A compose duration (`45s`, `1m30s`, `500ms`, or plain seconds) in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# -- Kubernetes ----------------------------------------------------------------------------------
CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): TOOLS / "keda" / "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): TOOLS
    / "prometheus-operator"
    / "monitoring.coreos.com_podmonitors.yaml",
}
PROMETHEUS_SCALER_SOURCE = TOOLS / "keda" / "prometheus_scaler.go"


def kustomize_build(directory: Path) -> list[dict]:
    assert KUSTOMIZE.exists(), f"kustomize is missing at {KUSTOMIZE}: {MAKE_HINT}"
    result = subprocess.run([str(KUSTOMIZE), "build", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply` with server-side field validation does: every object
    schema that lists its properties and does not keep unknown fields gets additionalProperties false."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    path = CRD_FILES[(api_version, kind)]
    assert path.exists(), f"the {kind} CRD is missing at {path}: {MAKE_HINT}"
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _strict(entry["schema"]["openAPIV3Schema"])
    # The API server fills these in; the CRD leaves metadata open.
    schema["properties"].setdefault("metadata", {"type": "object"})
    return schema


def validate_k8s(doc: dict) -> None:
    """Raise on a manifest the API server (Kubernetes KUBERNETES_VERSION, strict field validation)
    or the installed CRD would reject."""
    import jsonschema
    import kubernetes_validate

    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@dataclass(frozen=True)
class ScalerParameter:
    name: str
    orders: frozenset[str]
    enum: frozenset[str] | None


def scaler_parameters(source: Path = PROMETHEUS_SCALER_SOURCE) -> dict[str, ScalerParameter]:
    """The parameters a KEDA scaler reads, from the `keda:"..."` tags of its source."""
    assert source.exists(), f"KEDA's scaler source is missing at {source}: {MAKE_HINT}"
    parameters = {}
    for tag in re.findall(r'keda:"([^"]+)"', source.read_text()):
        options = dict(part.strip().split("=", 1) if "=" in part else (part.strip(), "") for part in tag.split(","))
        if "name" not in options:
            continue  # an embedded struct (the scaler's authentication), not a trigger parameter
        enum = frozenset(options["enum"].split(";")) if "enum" in options else None
        parameters[options["name"]] = ScalerParameter(options["name"], frozenset(options["order"].split(";")), enum)
    assert parameters, f"no keda tags found in {source}"
    return parameters


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container_environment(docs: list[dict], container: dict, secret_value: str = "secret") -> dict[str, str]:
    """The environment a container starts with: envFrom ConfigMaps, then env (secrets as stand-ins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = secret_value
        else:
            raise AssertionError(f"unexpected env source {variable}")
    return env


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert matches, f"container {container['name']} has no port named {port!r}"
    return matches[0]


def selector_matches(selector: dict, labels: dict) -> bool:
    match_labels = selector.get("matchLabels", selector)
    return bool(match_labels) and all(labels.get(key) == value for key, value in match_labels.items())
