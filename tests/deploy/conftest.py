"""Fixtures for the deployment checks: the real side server, the resolved compose model, rendered
Kubernetes overlays."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.manifests import K8S_DIR, compose_cli, compose_config, kustomize_build


@dataclass
class LiveSideServer:
    """consumer/web/server.py's app on a real port, with the service state a test sets."""

    port: int
    routes: set[tuple[str, str]]
    info: object
    state: object

    def loading(self) -> None:
        """The model is still loading: the process is alive, not ready."""
        self.state.engine = None
        self.state.warmup_time = None
        self.state.ready = self.state.in_group = self.state.stopping = False
        self.state.broker_ok = True
        self.state.last_poll = time.time()

    def ready(self) -> None:
        """Loaded, warmed, in the group, polling."""
        self.state.engine = self.info
        self.state.warmup_time = 0.5
        self.state.ready = self.state.in_group = self.state.broker_ok = True
        self.state.stopping = False
        self.state.last_poll = time.time()

    def stalled(self) -> None:
        """Ready once, but the poll loop has not come round for an hour."""
        self.ready()
        self.state.last_poll = time.time() - 3600

    def get(self, path: str) -> tuple[int, str, str]:
        """Status, content type and body of GET `path`."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read().decode()


@pytest.fixture(scope="session")
def side_server():
    # /metrics reads GPU memory through torch; in the service torch is imported by the model load long
    # before a scrape, here the first scrape would pay for the import on the server's event loop.
    import torch  # noqa: F401

    from consumer.engine.base import EngineInfo
    from consumer.metrics import Metrics
    from consumer.state import ServiceState
    from consumer.web.server import SideServer, build_app
    from devtools.local_kafka import free_port
    from tests.deploy.manifests import settings_for

    port = free_port()
    settings = settings_for({"HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port)})
    info = EngineInfo(
        model="deploy-check",
        adapter=None,
        device="cpu",
        dtype="float32",
        backend="transformers",
        model_load_time=1.0,
        default_batch_size=16,
    )
    state = ServiceState(model="deploy-check")
    app = build_app(settings, state, Metrics())
    routes = {(route.method, route.resource.canonical) for route in app.router.routes()}
    server = SideServer(app, settings.http_host, settings.http_port)
    server.start()
    try:
        yield LiveSideServer(port, routes, info, state)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def compose() -> dict:
    cli = compose_cli()
    if cli is None:
        pytest.fail("neither `docker compose` nor `docker-compose` is installed: run `make deploy-tools`")
    return compose_config(cli)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """kustomize output of each overlay, and of the GPU overlay with the private-CA component."""
    with_ca = tmp_path_factory.mktemp("overlay-kafka-ca")
    (with_ca / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(K8S_DIR / 'overlays' / 'gpu', with_ca)}]\n"
        f"components: [{os.path.relpath(K8S_DIR / 'components' / 'kafka-ca', with_ca)}]\n"
    )
    return {
        "cpu": kustomize_build(K8S_DIR / "overlays" / "cpu"),
        "gpu": kustomize_build(K8S_DIR / "overlays" / "gpu"),
        "gpu+kafka-ca": kustomize_build(Path(with_ca)),
    }
