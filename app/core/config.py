"""Settings shared by the API and the workers, read from `FAPM_*` environment variables.

One place for every knob, so the API and the workers cannot disagree about, say, the Redis URL or
the visibility timeout. Secrets (API keys, the Hub webhook secret, the sealing keys) live here and
nowhere else; the `repr` of these fields is hidden so they never reach a log line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.sealing import parse_keys


def _split_list(value: object) -> object:
    """`a,b,c` (or `a:b:c` for paths, as $PATH) from the environment; lists pass through."""
    if isinstance(value, str):
        separators = "," if "," in value else ":"
        return [item.strip() for item in value.split(separators) if item.strip()]
    return value


class Settings(BaseSettings):
    # hide_input_in_errors: a setting refused at start is named, never echoed (keys, secrets).
    model_config = SettingsConfigDict(
        env_prefix="FAPM_", env_file=None, extra="ignore", hide_input_in_errors=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding job state, events and the Celery broker.",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="`tenant:key,tenant:key` for small deployments. Prefer api_keys_file.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of `tenant:sha256-hex-of-key` lines (only hashes, no keys).",
    )
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that file:// URIs and bare paths may name (none by default). "
        "Shared by every tenant unless tenant_locations_file is set.",
    )
    tenant_locations_file: Path | None = Field(
        default=None,
        description="YAML or JSON file of the local roots, S3 prefixes and Hub namespaces each "
        "tenant may read and write (app/core/locations.py). Without it all tenants share "
        "local_roots and any bucket or repo: multi-tenant deployments must set it.",
    )
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Webhook hosts allowed over plain http or on private addresses (tests, "
        "in-cluster registries). Everyone else: https to a public address.",
    )
    secrets_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated Fernet keys (Fernet.generate_key()) that seal each job's "
        "webhook URL and signing secret in Redis (app/core/sealing.py). The first seals, all "
        "unseal: rotate by putting a new key first. The API and every worker need the same "
        "keys. Unset: stored in clear.",
    )
    max_active_jobs_per_tenant: int = Field(
        default=20, ge=1, description="Queued plus running jobs a tenant may have at once."
    )
    retry_after_seconds: int = Field(default=30, ge=1, description="Retry-After on a 429.")
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long an Idempotency-Key is remembered."
    )
    job_ttl_seconds: int = Field(
        default=30 * 24 * 3600, ge=60, description="How long finished job records are kept."
    )
    visibility_timeout_seconds: int = Field(
        default=48 * 3600,
        ge=1,
        description="Celery/Redis visibility timeout: an unacknowledged job is re-delivered "
        "after this long. Must exceed the longest job.",
    )
    lease_seconds: int = Field(
        default=60,
        ge=1,
        description="A running job's lease; renewed every lease_seconds/3, so a killed worker's "
        "job can be taken over this long after the worker died.",
    )
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, description="How often a worker writes its heartbeat."
    )
    heartbeat_fresh_seconds: float = Field(
        default=60.0, gt=0, description="A heartbeat older than this means the worker is gone."
    )
    progress_interval_seconds: float = Field(
        default=0.5, gt=0, description="Least time between two progress writes of one job."
    )
    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    webhook_retry_seconds: float = Field(
        default=24 * 3600,
        gt=0,
        description="How long a failing webhook keeps being retried (exponential backoff).",
    )
    webhook_first_retry_seconds: float = Field(
        default=5.0, gt=0, description="Backoff before the first retry; doubles each time."
    )
    hf_webhook_secret: SecretStr | None = Field(
        default=None, description="Shared secret the Hub sends in X-Webhook-Secret."
    )
    hf_webhook_rules_file: Path | None = Field(
        default=None, description="YAML or JSON rules mapping Hub repos to jobs."
    )
    mlflow_webhook_secret: SecretStr | None = Field(
        default=None,
        description="The secret of the MLflow registry webhook (MLflow signs each delivery "
        "with it: X-MLflow-Signature); unset or empty, POST /v1/hooks/mlflow answers 401.",
    )
    mlflow_webhook_rules_file: Path | None = Field(
        default=None, description="YAML or JSON rules mapping MLflow model versions to jobs."
    )
    mlflow_webhook_tolerance_seconds: int = Field(
        default=300,
        ge=1,
        description="An MLflow delivery whose X-MLflow-Timestamp is further than this from now "
        "is refused (401); a delivery id is remembered twice as long, so a replay is refused too.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="The MLflow tracking server the webhook's versions are looked up on "
        "(default: MLFLOW_TRACKING_URI, as MLflow's own clients use; workers register "
        "mlflow:// outputs there).",
    )
    mlflow_artifacts_destination: str | None = Field(
        default=None,
        description="The server's --artifacts-destination (s3://bucket/path or a local path) "
        "when it serves artifacts as mlflow-artifacts:/...: such sources are read from there.",
    )

    # -- API process only (added with the REST API) ------------------------------------------------
    sse_keepalive_seconds: float = Field(
        default=15.0,
        gt=0,
        description="An idle events stream sends a comment line this often, so proxies and "
        "load balancers do not close it.",
    )
    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body the API reads (413 above)."
    )
    queue_route_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How long the API reuses its answer to 'is a GPU worker alive?' when it "
        "routes device=auto jobs (saves two Redis calls per submission).",
    )

    # -- worker process only (added with the worker) -------------------------------------------
    unenqueued_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A job written this long ago but never handed to Celery (the API died in "
        "between) is enqueued by a worker's heartbeat thread.",
    )
    warmup_kernels: bool = Field(
        default=True,
        description="Compile (or load from NUMBA_CACHE_DIR) the fused CPU kernels in the "
        "background when a worker process starts, so the first job does not wait for it "
        "(about a minute on a cold cache).",
    )

    @field_validator("local_roots", "webhook_allow", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("secrets_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        # At start, not at the first job's delivery; the error never quotes a key.
        if value is not None:
            parse_keys(value.get_secret_value())
        return value

    @field_validator("local_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        # Compare against real paths: a root given through a symlink still matches.
        return [Path(root).resolve() for root in roots]


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
