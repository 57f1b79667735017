"""Where each tenant's jobs may read and write, and the one check of a job's locations.

The API runs `check_job_locations` at submission (a 422 `invalid_location` naming the field) and
the worker runs it again right before the job opens anything (worker/tasks/run_job.py), because
a symlink or a directory can change in between. The worker then confines every local file the job
opens to `readable_roots` (worker/io/source.py).

FAPM_TENANT_LOCATIONS_FILE (YAML or JSON) lists, per tenant, what its jobs may READ (base,
finetuned, adapter, model, evaluate.task, evaluate.general, a merge's finetuned[i].task,
calibration.task, calibration.general, materialize.delta) and WRITE (output):

    tenants:
      acme:
        read:
          - /data/bases                     # a local root
          - s3://shared-bases/              # a whole bucket
          - hf://meta-llama                 # a Hub org or user: every repo in it
          - hf://mistralai/Mistral-7B-v0.3  # one Hub repo
        write:                              # outputs; a tenant may read what it can write
          - /data/acme
          - s3://acme-models/pruned/        # a prefix of a bucket
          - hf://acme
          - mlflow://acme-*                 # MLflow registered models named acme-...

`mlflow://NAME` is one registered model of the MLflow registry at MLFLOW_TRACKING_URI and
`mlflow://PREFIX*` every model whose name starts with PREFIX: an output there registers a new
version of it. `s3://*`, `hf://*` and `mlflow://*` stand for any bucket, Hub repo and registered
model (e.g. `read: [hf://*]` lets a tenant
start from any public base on the Hub without letting it write there). A tenant not in the file
may use no location at all. Without the file, every tenant shares FAPM_LOCAL_ROOTS (read and
write) and any bucket or Hub repo, as a single-tenant deployment wants.

Beyond membership, an output
- never is a configured local root or S3 prefix (of any tenant) or an ancestor of one: publishing
  replaces the output whole (with overwrite) and stages beside it;
- never equals, contains or lies inside an input of the same job (local paths after `..` and
  symlinks, S3 prefixes). A Hub output may be an input's repo on another branch (inputs are read
  at one commit, a commit to another branch does not change it), never the same repo and branch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from app.core.netguard import check_local_output, check_local_uri
from worker.evaluation.data import split_file_uri
from worker.io.uri import check_mlflow_model_name, parse_uri

if TYPE_CHECKING:
    from app.core.config import Settings
    from worker.spec import EvaluationJobSpec, JobSpec

FILE_SETTING = "FAPM_TENANT_LOCATIONS_FILE"
# Model locations a job reads (each kind of job has some of them); evaluation sets are files.
INPUT_FIELDS = ("base", "finetuned", "adapter", "model")
EVALUATION_FIELDS = ("task", "general")
ANY = "*"


@dataclass(frozen=True)
class LocationSet:
    """Local roots (real paths), S3 (bucket, prefix) spaces, Hub namespaces (`org` or
    `org/name`, lower case) and MLflow registered model names (`name`, or `prefix*`);
    `any_s3`/`any_hub`/`any_mlflow` allow every bucket/repo/registered model."""

    local: tuple[Path, ...] = ()
    s3: tuple[tuple[str, str], ...] = ()
    hub: tuple[str, ...] = ()
    any_s3: bool = False
    any_hub: bool = False
    mlflow: tuple[str, ...] = ()
    any_mlflow: bool = False

    def __or__(self, other: LocationSet) -> LocationSet:
        return LocationSet(
            local=tuple(dict.fromkeys(self.local + other.local)),
            s3=tuple(dict.fromkeys(self.s3 + other.s3)),
            hub=tuple(dict.fromkeys(self.hub + other.hub)),
            any_s3=self.any_s3 or other.any_s3,
            any_hub=self.any_hub or other.any_hub,
            mlflow=tuple(dict.fromkeys(self.mlflow + other.mlflow)),
            any_mlflow=self.any_mlflow or other.any_mlflow,
        )

    def s3_space(self, bucket: str, key: str) -> tuple[str, str] | None:
        """The configured (bucket, prefix) that holds `key`, ("*", "") for any_s3, else None."""
        for space_bucket, prefix in self.s3:
            if space_bucket == bucket and key.startswith(prefix):
                return space_bucket, prefix
        return (ANY, "") if self.any_s3 else None

    def holds_repo(self, repo: str) -> bool:
        repo = repo.lower()
        return self.any_hub or repo in self.hub or repo.split("/", 1)[0] in self.hub

    def holds_registered_model(self, name: str) -> bool:
        """An MLflow registered model name (case-sensitive, as MLflow compares them)."""
        return self.any_mlflow or any(
            name.startswith(entry[:-1]) if entry.endswith(ANY) else name == entry
            for entry in self.mlflow
        )


@dataclass(frozen=True)
class TenantLocations:
    read: LocationSet = field(default_factory=LocationSet)
    write: LocationSet = field(default_factory=LocationSet)
    setting: str = "FAPM_LOCAL_ROOTS"  # where these come from, for messages

    @property
    def readable(self) -> LocationSet:
        return self.read | self.write


@dataclass(frozen=True)
class LocationPolicy:
    """Every tenant's locations (`tenants` None: all share `shared`)."""

    shared: TenantLocations
    tenants: dict[str, TenantLocations] | None = None

    def for_tenant(self, tenant: str) -> TenantLocations:
        if self.tenants is None:
            return self.shared
        return self.tenants.get(
            tenant, TenantLocations(setting=f"{FILE_SETTING} lists no tenant {tenant!r}")
        )

    @property
    def all_roots(self) -> tuple[Path, ...]:
        """Every configured local root, of every tenant and FAPM_LOCAL_ROOTS."""
        sets = [self.shared.readable, *(t.readable for t in (self.tenants or {}).values())]
        return tuple(dict.fromkeys(root for s in sets for root in s.local))

    @property
    def all_s3_spaces(self) -> tuple[tuple[str, str], ...]:
        sets = [self.shared.readable, *(t.readable for t in (self.tenants or {}).values())]
        return tuple(dict.fromkeys(space for s in sets for space in s.s3))


@dataclass(frozen=True)
class LocationProblem:
    field: str  # the request field: "output", "evaluate.task", ...
    message: str


# -- the file ----------------------------------------------------------------------------------


def parse_entry(raw: object, where: str) -> LocationSet:
    """One `read`/`write` entry as a LocationSet; ValueError naming `where` if malformed."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{where}: {raw!r} is not a location (a path, s3://... or hf://...)")
    lowered = raw.lower()
    if lowered.startswith("s3://"):
        rest = raw[5:]
        if rest == ANY:
            return LocationSet(any_s3=True)
        bucket, _, prefix = rest.partition("/")
        if not bucket or ANY in rest:
            raise ValueError(f"{where}: {raw!r}: use s3://bucket/, s3://bucket/prefix/ or s3://*")
        prefix = prefix.strip("/")
        return LocationSet(s3=((bucket.lower(), f"{prefix}/" if prefix else ""),))
    if lowered.startswith("hf://"):
        rest = lowered[5:].strip("/")
        if rest == ANY:
            return LocationSet(any_hub=True)
        parts = rest.split("/")
        if not rest or len(parts) > 2 or "@" in rest or ANY in rest or not all(parts):
            raise ValueError(f"{where}: {raw!r}: use hf://org, hf://org/name or hf://*")
        return LocationSet(hub=(rest,))
    if lowered.startswith("mlflow://"):
        rest = raw[9:]
        if rest == ANY:
            return LocationSet(any_mlflow=True)
        try:
            check_mlflow_model_name(rest.removesuffix(ANY) or "x")
        except ValueError as exc:
            raise ValueError(f"{where}: {raw!r}: {exc}") from None
        if ANY in rest.removesuffix(ANY):
            raise ValueError(f"{where}: {raw!r}: use mlflow://NAME, mlflow://PREFIX* or mlflow://*")
        return LocationSet(mlflow=(rest,))
    path = Path(raw[7:] if lowered.startswith("file://") else raw)
    if "://" in raw and not lowered.startswith("file://"):
        raise ValueError(
            f"{where}: {raw!r}: unknown scheme (use a path, s3://, hf:// or mlflow://)"
        )
    if not path.is_absolute():
        raise ValueError(f"{where}: {raw!r}: local roots must be absolute paths")
    return LocationSet(local=(path.resolve(),))


def parse_tenant_locations(text: str, where: str) -> dict[str, TenantLocations]:
    """The tenants of a locations document; ValueError naming the file, tenant and entry."""
    try:
        data = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: not valid YAML/JSON: {exc}") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict):
        raise ValueError(f"{where}: expected `tenants:` mapping each tenant to read/write lists")
    result = {}
    for tenant, entry in tenants.items():
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"read", "write"}:
            raise ValueError(f"{where}: tenant {tenant!r}: expected `read:` and `write:` lists")
        sets = {}
        for access in ("read", "write"):
            items = entry.get(access) or []
            if not isinstance(items, list):
                raise ValueError(f"{where}: tenant {tenant!r}: `{access}` must be a list")
            combined = LocationSet()
            for item in items:
                combined = combined | parse_entry(item, f"{where}: tenant {tenant!r} {access}")
            sets[access] = combined
        result[str(tenant)] = TenantLocations(
            sets["read"], sets["write"], setting=f"{FILE_SETTING}, tenant {tenant}"
        )
    return result


@lru_cache(maxsize=4)
def _load(path: Path, stamp: tuple[int, int], shared_roots: tuple[Path, ...]) -> LocationPolicy:
    shared = _shared(shared_roots)
    return LocationPolicy(shared, parse_tenant_locations(path.read_text(), str(path)))


def _shared(roots: tuple[Path, ...]) -> TenantLocations:
    local = LocationSet(local=roots, any_s3=True, any_hub=True, any_mlflow=True)
    return TenantLocations(local, local)


class LocationsFileError(ValueError):
    """FAPM_TENANT_LOCATIONS_FILE is unreadable or malformed: no job can be checked."""


def location_policy(settings: Settings) -> LocationPolicy:
    """The policy the settings describe; the file is re-read when it changes
    (LocationsFileError if it is unreadable or malformed)."""
    roots = tuple(settings.local_roots)
    path = settings.tenant_locations_file
    if path is None:
        return LocationPolicy(_shared(roots))
    try:
        stat = os.stat(path)
        return _load(Path(path), (stat.st_mtime_ns, stat.st_size), roots)
    except OSError as exc:
        raise LocationsFileError(f"{FILE_SETTING} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise LocationsFileError(str(exc)) from None


def readable_roots(settings: Settings, tenant: str) -> tuple[Path, ...]:
    """The local roots a tenant's job may open files under (its read and write roots)."""
    return location_policy(settings).for_tenant(tenant).readable.local


# -- the check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    """Where a location points, comparable across fields: a real local path, an S3 key or
    prefix (prefixes end in "/"), or a Hub repo and revision."""

    scheme: str
    bucket_or_repo: str = ""
    key: str = ""  # S3 key/prefix, or the Hub revision
    path: Path | None = None


def _s3_place(path: str) -> _Place:
    bucket, _, key = path.partition("/")
    return _Place("s3", bucket.lower(), key)


def _input_place(raw: str, is_file: bool, allowed: TenantLocations) -> _Place:
    """The place an input names, after checking that the tenant may read it (ValueError)."""
    readable = allowed.readable
    directory, name = split_file_uri(raw) if is_file else (raw, "")
    uri = parse_uri(directory)
    if uri.scheme == "file":
        real = check_local_uri(raw, readable.local, allowed.setting)
        return _Place("file", path=real)
    if uri.scheme == "s3":
        place = _s3_place(uri.path)
        key = place.key.strip("/")
        key = f"{key}/{name}" if is_file else (f"{key}/" if key else "")
        if readable.s3_space(place.bucket_or_repo, key) is None:
            raise ValueError(
                f"{raw}: not in an S3 location this tenant may read ({allowed.setting})"
            )
        return _Place("s3", place.bucket_or_repo, key)
    if uri.scheme == "mlflow":
        raise ValueError(
            f"{raw}: mlflow:// is an output; a registry's versions come in through "
            "POST /v1/hooks/mlflow, resolved to where their files are"
        )
    if not readable.holds_repo(uri.path):
        raise ValueError(f"{raw}: not in a Hub namespace this tenant may read ({allowed.setting})")
    return _Place("hf", uri.path.lower(), uri.revision or "main")


def _output_place(raw: str, allowed: TenantLocations, policy: LocationPolicy) -> _Place:
    """The place an output names, after checking that the tenant may write it (ValueError)."""
    writable = allowed.write
    uri = parse_uri(raw)
    if uri.scheme == "file":
        real = check_local_output(raw, writable.local, policy.all_roots, allowed.setting)
        return _Place("file", path=real)
    if uri.scheme == "s3":
        place = _s3_place(uri.path)
        key = place.key.strip("/")
        prefix = f"{key}/" if key else ""
        space = writable.s3_space(place.bucket_or_repo, prefix)
        if space is None:
            raise ValueError(
                f"{raw}: not in an S3 location this tenant may write ({allowed.setting})"
            )
        for bucket, configured in (space, *policy.all_s3_spaces):
            if bucket in (ANY, place.bucket_or_repo) and configured.startswith(prefix):
                raise ValueError(
                    f"{raw}: is a configured S3 location or holds one; name a prefix inside it"
                )
        return _Place("s3", place.bucket_or_repo, prefix)
    if uri.scheme == "mlflow":
        # A new version of the model: nothing of an input's is replaced, so no overlap to check.
        if not writable.holds_registered_model(uri.path):
            raise ValueError(
                f"{raw}: not an MLflow registered model this tenant may write ({allowed.setting})"
            )
        return _Place("mlflow", uri.path)
    if not writable.holds_repo(uri.path):
        raise ValueError(f"{raw}: not in a Hub namespace this tenant may write ({allowed.setting})")
    return _Place("hf", uri.path.lower(), uri.revision or "main")


def _overlap(output: _Place, source: _Place) -> str | None:
    """Why `output` may not be written with `source` as an input of the same job, or None."""
    if output.scheme != source.scheme:
        return None
    if output.scheme == "file":
        assert output.path is not None and source.path is not None
        if output.path == source.path:
            return "is also an input of this job"
        if source.path.is_relative_to(output.path):
            return "holds an input of this job"
        if output.path.is_relative_to(source.path):
            return "lies inside an input of this job"
        return None
    if output.bucket_or_repo != source.bucket_or_repo:
        return None
    if output.scheme == "hf":
        # Inputs are read at one commit; another branch of the same repo leaves it as it was.
        return "is an input's repo and revision" if output.key == source.key else None
    if output.key == source.key:
        return "is also an input of this job"
    if source.key.startswith(output.key):
        return "holds an input of this job"
    source_is_prefix = source.key == "" or source.key.endswith("/")  # else an evaluation file
    if source_is_prefix and output.key.startswith(source.key):
        return "lies inside an input of this job"
    return None


def check_job_locations(
    job: JobSpec | EvaluationJobSpec, tenant: str, settings: Settings
) -> list[LocationProblem]:
    """Every location problem of `job` for `tenant`, one per field (empty: all allowed).

    Model locations must parse (known scheme), inputs lie where the tenant may read, the output
    where it may write, and the output apart from the inputs (module docstring). Local paths are
    resolved (`..`, symlinks) before any comparison. LocationsFileError if the file is broken.
    """
    policy = location_policy(settings)
    allowed = policy.for_tenant(tenant)
    problems: list[LocationProblem] = []
    inputs: list[tuple[str, _Place]] = []
    named = []
    for name in INPUT_FIELDS:
        value = getattr(job, name, None)
        if isinstance(value, list):  # a merge: each fine-tune is an input of its own
            for i, item in enumerate(value):  # with, for evaluate, its own task set
                named += [(f"{name}[{i}].model", item.model, False)]
                named += [(f"{name}[{i}].task", getattr(item, "task", None), True)]
        else:
            named.append((name, value, False))
    evaluate = getattr(job, "evaluate", None)
    if evaluate is not None:
        named += [(f"evaluate.{n}", getattr(evaluate, n), True) for n in EVALUATION_FIELDS]
    calibration = getattr(job, "calibration", None)  # prune "weights": its calibration sets
    if calibration is not None:
        named += [(f"calibration.{n}", getattr(calibration, n), True) for n in EVALUATION_FIELDS]
    materialize = getattr(job, "materialize", None)  # a materialize job reads its delta
    if materialize is not None:
        named.append(("materialize.delta", materialize.delta, False))
    for name, raw, is_file in named:
        if raw is None:
            continue
        try:
            inputs.append((name, _input_place(raw, is_file, allowed)))
        except ValueError as exc:
            problems.append(LocationProblem(name, str(exc)))
    output = getattr(job, "output", None)
    if output is not None:
        try:
            place = _output_place(output, allowed, policy)
        except ValueError as exc:
            problems.append(LocationProblem("output", str(exc)))
        else:
            for name, source in inputs:
                reason = _overlap(place, source)
                if reason is not None:
                    problems.append(LocationProblem("output", f"{output}: {reason} ({name})"))
                    break
    return problems
