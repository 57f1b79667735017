"""Looking up MLflow model versions and where their files are, over MLflow's REST API.

The API resolves the version an MLflow webhook names to a location the workers read (s3:// or a
local path) with the calls MlflowClient makes (`model-versions/get`, `get-download-uri`,
`runs/get`, `logged-models/{id}`), over httpx: the API image needs no `mlflow` package for it.
Credentials are MLflow's own environment: MLFLOW_TRACKING_TOKEN (bearer) or
MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (basic).

The registry resolves a `runs:/` or `models:/` source to its storage location when the version
is created (`get-download-uri` answers it); anything still indirect is followed here, a few steps
at most. `mlflow-artifacts:/PATH` (a server that proxies artifacts) is read from the server's
artifacts destination when the deployment names it (FAPM_MLFLOW_ARTIFACTS_DESTINATION).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import httpx

_API = "/api/2.0/mlflow"
_MAX_HOPS = 4


class MlflowLookupError(Exception):
    """A lookup failed: `status` 404 (no such version, run or model), 401/403 (the server
    refused our credentials), 502 (unreachable or an unexpected answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    source: str
    run_id: str | None
    status: str  # READY, PENDING_REGISTRATION or FAILED_REGISTRATION
    tags: dict[str, str] = field(default_factory=dict)


def tracking_uri(configured: str | None = None) -> str | None:
    """The tracking server: the setting, else MLFLOW_TRACKING_URI (http(s) servers only)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def _auth() -> httpx.Auth | None:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return _Bearer(token)
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    return httpx.BasicAuth(user, password or "") if user else None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class MlflowRest:
    """The few read calls the webhook needs, against one tracking server."""

    def __init__(self, server: str, timeout: float = 10.0) -> None:
        if urlparse(server).scheme not in ("http", "https"):
            raise MlflowLookupError(502, f"{server}: the MLflow tracking URI must be http(s)://")
        self.server = server.rstrip("/")
        self.client = httpx.Client(timeout=timeout, auth=_auth())

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str, **params: str) -> dict:
        where = f"{self.server}{_API}{path}"
        try:
            response = self.client.get(where, params=params)
        except httpx.HTTPError as exc:
            raise MlflowLookupError(502, f"MLflow at {self.server} unreachable: {exc}") from exc
        if response.status_code in (401, 403):
            raise MlflowLookupError(response.status_code, f"MLflow refused {path}: check the token")
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code == 404 or body.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            raise MlflowLookupError(404, body.get("message") or f"{path}: not found in MLflow")
        if response.status_code != 200 or not isinstance(body, dict):
            raise MlflowLookupError(
                502, f"MLflow answered {response.status_code} to {path}: {response.text[:200]}"
            )
        return body

    def model_version(self, name: str, version: str) -> ModelVersion:
        raw = self._get("/model-versions/get", name=name, version=version).get("model_version")
        if not isinstance(raw, dict):
            raise MlflowLookupError(502, f"MLflow gave no model_version for {name}/{version}")
        return ModelVersion(
            name=str(raw.get("name", name)),
            version=str(raw.get("version", version)),
            source=str(raw.get("source") or ""),
            run_id=raw.get("run_id") or None,
            status=str(raw.get("status") or "READY"),
            tags={str(t.get("key")): str(t.get("value", "")) for t in raw.get("tags") or []},
        )

    def download_uri(self, name: str, version: str) -> str:
        """Where the version's files are, as the registry resolved its source."""
        body = self._get("/model-versions/get-download-uri", name=name, version=version)
        return str(body.get("artifact_uri") or "")

    def resolve(self, uri: str) -> str:
        """Follow `runs:/`, `models:/NAME/VERSION`, `models:/NAME@ALIAS` and `models:/MODEL_ID`
        to an artifact location that names storage (s3://, file://, a path, mlflow-artifacts:/)."""
        for _ in range(_MAX_HOPS):
            parsed = urlparse(uri)
            if parsed.scheme == "runs":
                run_id, _, path = parsed.path.lstrip("/").partition("/")
                info = self._get("/runs/get", run_id=run_id).get("run", {}).get("info", {})
                uri = _join(str(info.get("artifact_uri") or ""), path)
            elif parsed.scheme == "models":
                uri = self._model_uri(parsed.path.lstrip("/"))
            else:
                return uri
            if not uri:
                break
        raise MlflowLookupError(502, f"could not resolve {uri!r} to a storage location")

    def _model_uri(self, rest: str) -> str:
        head, slash, tail = rest.partition("/")
        if "@" in head:  # models:/NAME@ALIAS[/path]
            name, _, alias = head.partition("@")
            raw = self._get("/registered-models/alias", name=name, alias=alias)
            version = str((raw.get("model_version") or {}).get("version", ""))
            return _join(self.download_uri(name, version), tail)
        if slash and tail.split("/", 1)[0].isdigit():  # models:/NAME/VERSION[/path]
            version, _, path = tail.partition("/")
            return _join(self.download_uri(head, version), path)
        # models:/MODEL_ID[/path]: an MLflow 3 logged model
        model = self._get(f"/logged-models/{head}").get("model", {}).get("info", {})
        return _join(str(model.get("artifact_uri") or ""), tail)


def _join(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/{path.strip('/')}" if base and path.strip("/") else base


def storage_location(uri: str, artifacts_destination: str | None) -> str:
    """The location a worker reads for a resolved artifact URI: `s3://bucket/prefix/` or an
    absolute local path; ValueError for anything a worker has no reader for."""
    parsed = urlparse(uri)
    if parsed.scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise ValueError(
                f"{uri}: the MLflow server proxies its artifacts; set "
                "FAPM_MLFLOW_ARTIFACTS_DESTINATION to its --artifacts-destination to read them"
            )
        return storage_location(_join(artifacts_destination, unquote(parsed.path)), None)
    if parsed.scheme == "s3":
        return uri.rstrip("/") + "/"
    if parsed.scheme == "file":
        return unquote(parsed.path).rstrip("/") or "/"
    if not parsed.scheme and uri.startswith("/"):
        return uri.rstrip("/") or "/"
    raise ValueError(
        f"{uri}: no reader for {parsed.scheme or 'relative'} locations (s3:// or a path)"
    )
