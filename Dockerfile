# syntax=docker/dockerfile:1
#
# The diagram consumer as a container: `python -m consumer run`, configured from the environment.
#
#   docker build -t diagram-consumer:cpu .                                # CPU: python slim + CPU torch
#   docker build --build-arg VARIANT=cuda -t diagram-consumer:cuda .      # GPU: NVIDIA CUDA base + CUDA torch
#   docker build --build-arg MODEL_SOURCE=baked -t diagram-consumer:cpu-baked .   # air-gapped: model inside
#
# At run time the LoRA adapter is mounted read-only at /app/models/weights (ADAPTER_PATH) and the
# Hugging Face cache lives on a volume at /app/cache/huggingface (HF_HOME): the base model downloads
# there on first start, with progress in the logs, and later starts reuse it. With MODEL_SOURCE=baked
# the model is downloaded at build time instead (an HF token, if needed, goes in as a build secret:
# `--secret id=hf_token,env=HF_TOKEN`) and the container never contacts the hub (HF_HUB_OFFLINE=1).

ARG VARIANT=cpu
ARG MODEL_SOURCE=hub
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# PyPI's torch 2.14.1 wheels carry their own CUDA 13.0 user-space libraries (cuBLAS, cuDNN, ...), so
# the CUDA base only needs to say which driver it requires: NVIDIA's small `base` flavour, not the
# multi-gigabyte `runtime` one that would ship a second copy of the same libraries.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
# Where torch comes from: PyTorch's CPU wheels (the same version without 2 GB of CUDA libraries) for
# the CPU image; PyPI itself, whose Linux wheels are the CUDA build, for the CUDA image.
ARG CPU_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CUDA_TORCH_INDEX_URL=

# -- the two bases: a Python interpreter at the same path in the build and the runtime stage --------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# -- build: a virtualenv with the project's pinned dependencies, then the project itself -----------
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG CPU_TORCH_INDEX_URL
ARG CUDA_TORCH_INDEX_URL
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, read from pyproject.toml, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && if [ "$VARIANT" = cpu ]; then index="$CPU_TORCH_INDEX_URL"; else index="$CUDA_TORCH_INDEX_URL"; fi \
    && pip install ${index:+--extra-index-url "$index"} -r /tmp/requirements.txt
# (With the CPU index as an extra index, `torch==2.14.1` matches both 2.14.1 on PyPI and 2.14.1+cpu;
# pip takes the +cpu build because a local version label sorts higher.)
COPY consumer ./consumer
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps .

# -- runtime: the virtualenv on a clean base, as a non-root user ---------------------------------
FROM base-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="diagram-consumer" \
      org.opencontainers.image.description="Kafka consumer turning diagram images into text with Qwen3-VL + LoRA"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin app \
    && mkdir -p /app/models/weights /app/cache/huggingface \
    && chown -R 10001:10001 /app/cache
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/app/cache/huggingface
WORKDIR /app
# The adapter: mount it read-only (`-v $PWD/weights:/app/models/weights:ro`); empty means base model.
# The Hugging Face cache: a named volume keeps the downloaded model across restarts.
VOLUME ["/app/models/weights", "/app/cache/huggingface"]
USER 10001:10001
EXPOSE 8002
# Liveness: the side server answers 503 on /health/live when the poll loop stops making progress.
# The start period covers a first start that downloads the model (several GB).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HTTP_PORT', '8002') + '/health/live', timeout=4)"]
# tini as PID 1 forwards SIGTERM, so a stop during model loading ends the process at once; after
# loading, the service finishes in-flight work within SHUTDOWN_TIMEOUT.
ENTRYPOINT ["tini", "--", "python", "-m", "consumer"]
CMD ["run"]

# -- model source: downloaded on first start (hub) or inside the image (baked) ---------------------
FROM runtime AS model-hub

FROM builder AS model-download
ARG BASE_MODEL_ID=Qwen/Qwen3-VL-2B-Instruct
ARG BASE_MODEL_REVISION=main
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
    \
    HF_HOME=/opt/huggingface python -c "import os; from huggingface_hub import snapshot_download; print(snapshot_download(os.environ['BASE_MODEL_ID'], revision=os.environ['BASE_MODEL_REVISION']))"

FROM runtime AS model-baked
ARG BASE_MODEL_ID=Qwen/Qwen3-VL-2B-Instruct
COPY --from=model-download --chown=10001:10001 /opt/huggingface /opt/huggingface
# Outside the cache volume, so a mounted (empty) cache cannot hide it; the hub is never asked.
ENV HF_HOME=/opt/huggingface HF_HUB_OFFLINE=1 BASE_MODEL_ID=${BASE_MODEL_ID}

FROM model-${MODEL_SOURCE}
