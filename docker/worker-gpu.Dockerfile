# syntax=docker/dockerfile:1.7
# The GPU worker image: the Celery worker with the CUDA build of torch and triton, on NVIDIA's CUDA
# runtime image. From the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t fapm-service/worker-gpu:0.1.0 .
# Python 3.11 (the project's only version) is not Ubuntu 24.04's, so uv installs a standalone
# CPython build into /opt/python in the build stage, and the runtime stage copies it with the venv.
# Versions: base images by tag, CPython by PYTHON_VERSION, torch by TORCH_VERSION from the PyTorch
# CUDA wheel index TORCH_INDEX_URL (it brings its CUDA libraries and pins its own triton), the
# rest by docker/constraints-worker.txt. The host needs an NVIDIA driver new enough for that CUDA.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION=3.11.14
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
RUN uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY docker/constraints-worker.txt /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# `.` is this repository; torch (and its triton) is already there, the rest is pinned.
RUN uv pip install -c /tmp/constraints.txt '.[worker,gpu]' \
    && python -c "import torch, triton, worker.celery_app; assert torch.version.cuda"

FROM ${CUDA_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/home/fapm/.cache/numba \
    TRITON_CACHE_DIR=/home/fapm/.cache/triton \
    HF_HUB_CACHE=/home/fapm/.cache/huggingface/hub
# Ubuntu's image has a user 1000 (ubuntu); ours is 10001 as in the other images.
RUN groupadd --system --gid 10001 fapm \
    && useradd --system --uid 10001 --gid fapm --home-dir /home/fapm --create-home fapm \
    && install -d -o fapm -g fapm /data /home/fapm/.cache/numba /home/fapm/.cache/triton \
        /home/fapm/.cache/huggingface/hub
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY docker/worker_entrypoint.py /opt/fapm/worker_entrypoint.py
USER 10001:10001
WORKDIR /home/fapm
ENTRYPOINT ["python", "/opt/fapm/worker_entrypoint.py"]
# -Q gpu: this worker takes only GPU jobs, and refuses to start where no CUDA device is visible.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--hostname", "gpu@%h", "--loglevel", "INFO"]
