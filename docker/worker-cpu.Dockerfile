# syntax=docker/dockerfile:1.7
# The CPU worker image: the Celery worker with the CPU build of torch. From the repository root:
#   docker build -f docker/worker-cpu.Dockerfile -t fapm-service/worker-cpu:0.1.0 .
# Versions: the base image by tag, torch by TORCH_VERSION (from the PyTorch CPU wheel index, the
# same build pyproject's `cpu` extra pins), everything else by docker/constraints-worker.txt.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY docker/constraints-worker.txt /tmp/constraints.txt
# The dependencies first, from the pins alone: a change to the code rebuilds only the layers below.
RUN pip install --no-cache-dir -r /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# `.` is this repository; torch is already there, the rest is pinned by the constraints file.
RUN pip install --no-cache-dir -c /tmp/constraints.txt '.[worker,mlflow]' \
    && python -c "import torch, worker.celery_app; assert not torch.cuda.is_available()"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_THREADING_LAYER=omp \
    NUMBA_CACHE_DIR=/home/fapm/.cache/numba \
    HF_HUB_CACHE=/home/fapm/.cache/huggingface/hub
# numba's thread-safe OpenMP layer needs the system libgomp (numba's wheel does not bring it).
# Without it numba falls back to its workqueue layer, which aborts the process when two threads
# run parallel kernels at once (the worker's kernel warm-up and a job): NUMBA_THREADING_LAYER=omp
# makes a missing libgomp an error at the first parallel kernel instead of that fallback.
ARG LIBGOMP_VERSION=12.2.0-14+deb12u1
RUN apt-get update \
    && apt-get install -y --no-install-recommends "libgomp1=${LIBGOMP_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 fapm \
    && useradd --system --uid 10001 --gid fapm --home-dir /home/fapm --create-home fapm \
    && install -d -o fapm -g fapm /data /home/fapm/.cache/numba /home/fapm/.cache/huggingface/hub
COPY --from=build /opt/venv /opt/venv
COPY docker/worker_entrypoint.py /opt/fapm/worker_entrypoint.py
USER 10001:10001
WORKDIR /home/fapm
# PID 1 passes SIGTERM to Celery (warm shutdown: the running job finishes) and, if
# WORKER_DRAIN_SECONDS is set, hands the job back to the queue when that runs out.
ENTRYPOINT ["python", "/opt/fapm/worker_entrypoint.py"]
# No -Q: a worker without CUDA consumes the `cpu` queue. One job at a time: a job uses every core.
CMD ["celery", "-A", "worker.celery_app", "worker", "--concurrency", "1", "--hostname", "cpu@%h", "--loglevel", "INFO"]
