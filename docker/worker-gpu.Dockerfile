# syntax=docker/dockerfile:1.7
# The GPU worker image: the Celery worker with the CUDA build of torch and its triton, on the same
# Debian Python base as the other images. From the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t fapm-service/worker-gpu:0.1.0 .
# No CUDA base image is needed: the CUDA torch wheels bring the CUDA runtime libraries they were
# built with (the nvidia-* packages) and torch pins its own triton; the host needs only an NVIDIA
# driver new enough for that CUDA, and the NVIDIA container toolkit to hand it to the container.
# Versions: the base image by tag, torch by TORCH_VERSION from TORCH_INDEX_URL (PyTorch's cu128
# index; PyPI's Linux x86_64 torch is a CUDA build too), the rest by docker/constraints-worker.txt.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
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
# `.` is this repository; torch (and its triton) is already there, the rest is pinned.
RUN pip install --no-cache-dir -c /tmp/constraints.txt '.[worker,gpu,mlflow]' \
    && python -c "import torch, triton, worker.celery_app; assert torch.version.cuda"

FROM ${PYTHON_IMAGE}
# What the NVIDIA container toolkit reads to mount the driver (NVIDIA's CUDA images set the same).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_THREADING_LAYER=omp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NUMBA_CACHE_DIR=/home/fapm/.cache/numba \
    TRITON_CACHE_DIR=/home/fapm/.cache/triton \
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
    && install -d -o fapm -g fapm /data /home/fapm/.cache/numba /home/fapm/.cache/triton \
        /home/fapm/.cache/huggingface/hub
COPY --from=build /opt/venv /opt/venv
COPY docker/worker_entrypoint.py /opt/fapm/worker_entrypoint.py
USER 10001:10001
WORKDIR /home/fapm
ENTRYPOINT ["python", "/opt/fapm/worker_entrypoint.py"]
# -Q gpu: this worker takes only GPU jobs, and refuses to start where no CUDA device is visible.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--hostname", "gpu@%h", "--loglevel", "INFO"]
