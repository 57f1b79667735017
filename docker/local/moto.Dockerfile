# The local stack's stand-in for MinIO (docker/compose.local.yml): moto's S3 server. MinIO has no
# server binary in Debian, PyPI or npm, and no registry is reachable where scripts/containers runs.
# moto[s3] and moto_server's web stack only (moto[server] brings every AWS service: 500 MB).
# Not for production: moto keeps every object in memory and checks no credentials.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG MOTO_VERSION=5.2.6
ARG FLASK_VERSION=3.1.3
ARG FLASK_CORS_VERSION=6.0.5
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "moto[s3]==${MOTO_VERSION}" "flask==${FLASK_VERSION}" \
        "flask-cors==${FLASK_CORS_VERSION}"
USER 65534:65534
EXPOSE 9000
CMD ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
