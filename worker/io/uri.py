"""Model URIs: `file://` and bare local paths, `s3://bucket/prefix/`, `hf://org/name[@rev]`, and
`mlflow://<registered model name>` (an output only: a new version of that model in the MLflow
Model Registry at MLFLOW_TRACKING_URI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from worker.errors import UnsupportedFormat
from worker.io.location_names import (
    check_hub_repo_id,
    check_hub_revision,
    check_s3_bucket,
    check_s3_key,
)
from worker.io.source import LocalDirSource, ModelSource

REMOTE_SCHEMES = ("s3", "hf")
# MLflow keeps registered model names in a 256-character column.
MAX_MLFLOW_NAME = 256


def check_mlflow_model_name(name: str) -> None:
    """ValueError unless MLflow accepts `name` as a registered model name (its
    _validate_model_name: not blank, no `/` or `:`, unchanged by normpath), and it has no
    character a URI or a log line would mangle."""
    import posixpath

    if not name.strip():
        raise ValueError("a registered model name must not be blank")
    if len(name) > MAX_MLFLOW_NAME:
        raise ValueError(f"registered model name over {MAX_MLFLOW_NAME} characters")
    bad = [c for c in name if c in "/:?#\\" or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError(f"registered model name {name!r}: no {bad[0]!r} (MLflow's rule and URIs')")
    if posixpath.normpath(name) != name or name.startswith(".."):
        raise ValueError(f"registered model name {name!r} is not a plain name (MLflow's rule)")


@dataclass(frozen=True)
class ModelURI:
    scheme: str  # "file", "s3", "hf" or "mlflow"
    raw: str
    path: str  # local path, "bucket/prefix", "org/name" or the registered model name
    revision: str | None = None

    @property
    def local_path(self) -> Path:
        assert self.scheme == "file"
        return Path(self.path)


def parse_uri(raw: str) -> ModelURI:
    """Parse a model location. Raises ValueError for a malformed one, or for a bucket, key, Hub
    repo id or revision that its service's naming rules refuse (worker/io/location_names.py)."""
    if "://" not in raw:
        return ModelURI("file", raw, raw)
    scheme, _, rest = raw.partition("://")
    scheme = scheme.lower()
    if scheme == "file":
        parsed = urlparse(raw)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{raw}: file:// URIs must name a local path (file:///abs/path)")
        return ModelURI("file", raw, unquote(parsed.path))
    # s3 and hf are split by hand, not by urlparse: it would drop a `?...` or `#...` part and
    # take `user@` or `:port` as parts of a host, so the name checked would not be the one used.
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{raw}: an s3 URI needs a bucket (s3://bucket/prefix/)")
        try:
            check_s3_bucket(bucket)
            check_s3_key(key)
        except ValueError as exc:
            raise ValueError(f"{raw}: {exc}") from None
        return ModelURI("s3", raw, f"{bucket}/{key}")
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"{raw}: a Hub URI is hf://org/name[@revision]")
        try:
            check_hub_repo_id(repo)
            if at:
                check_hub_revision(revision)
        except ValueError as exc:
            raise ValueError(f"{raw}: {exc}") from None
        return ModelURI("hf", raw, repo, revision or None)
    if scheme == "mlflow":
        try:
            check_mlflow_model_name(rest)
        except ValueError as exc:
            raise ValueError(f"{raw}: {exc}") from None
        return ModelURI("mlflow", raw, rest)
    raise ValueError(
        f"{raw}: unsupported scheme {scheme!r} (use a path, file://, s3://, hf:// or mlflow://)"
    )


def open_source(raw: str) -> ModelSource:
    """A ModelSource for a model directory URI."""
    uri = parse_uri(raw)
    if uri.scheme == "file":
        return LocalDirSource(uri.local_path, uri=raw if "://" in raw else None)
    if uri.scheme == "s3":
        from worker.io.s3 import S3Source, split_s3_uri

        bucket, prefix = split_s3_uri(uri.path)
        return S3Source(raw, bucket, prefix)
    if uri.scheme == "hf":
        from worker.io.hub import HubSource

        return HubSource(raw, uri.path, uri.revision)
    raise UnsupportedFormat(
        f"{raw}: no reader for {uri.scheme}:// sources (a registry's versions come in through "
        "POST /v1/hooks/mlflow, resolved to where their files are)"
    )
