# syntax=docker/dockerfile:1.7
# The API image: FastAPI under uvicorn, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t fapm-service/api:0.1.0 .
# Versions: the base image by tag, every Python package by docker/constraints-api.txt.
# No secrets: API keys, Redis password and cloud credentials come from the environment at run time.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY docker/constraints-api.txt /tmp/constraints.txt
# The dependencies first, from the pins alone: a change to the code rebuilds only the layers below.
RUN pip install --no-cache-dir -r /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# `.` is this repository; every dependency is pinned by the constraints file.
RUN pip install --no-cache-dir -c /tmp/constraints.txt '.[api]' \
    && python -c "import app.core.config, worker.celery_app" \
    && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the API image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed non-root user (uid 10001) that owns /data, the default FAPM_LOCAL_ROOTS mount point.
RUN groupadd --system --gid 10001 fapm \
    && useradd --system --uid 10001 --gid fapm --home-dir /home/fapm --create-home fapm \
    && install -d -o fapm -g fapm /data
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/fapm
EXPOSE 8000
# Liveness only: /readyz (Redis and a worker heartbeat) is for the orchestrator's routing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# On SIGTERM uvicorn stops accepting, lets requests (and event streams) end for up to 20 s, exits.
# h11 with the request head capped at 64 KiB (app/api/header_limit.py): httptools has no cap.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "20", "--http", "h11", "--h11-max-incomplete-event-size", "65536"]
