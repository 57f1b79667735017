"""deploy/k8s: every manifest against Kubernetes' schemas (kubernetes-validate, offline, strict),
the ScaledObjects against KEDA's CRD schema (deploy/schemas), and the wiring against the service:
settings names, entry points, probes, grace periods, queue names, Secrets."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import (
    DOCKER,
    K8S,
    OTHER_ENV,
    SCHEMAS,
    all_celery_queues,
    applied_resources,
    celery_queues,
    consumed_queues,
    container_command,
    documents,
    image_command,
    manifest_files,
    pod_spec,
    resources,
    settings_defaults,
    settings_env_names,
)

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NAMESPACE = "fapm"
WORKERS = {"fapm-worker-cpu": "cpu", "fapm-worker-gpu": "gpu"}  # prune workers, KEDA-scaled
WEBHOOKS = "fapm-worker-webhooks"


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        if path.name == "kustomization.yaml":
            continue
        for doc in documents(path):
            out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


CORE = [(i, d) for i, d in kubernetes_documents() if not d["apiVersion"].startswith("keda.sh/")]
KEDA = [(i, d) for i, d in kubernetes_documents() if d["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("ident", "doc"), CORE, ids=[i for i, _ in CORE])
def test_valid_against_kubernetes_schemas(ident: str, doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{ident} (Kubernetes {version}): {error.message} at {list(error.path)}")


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    deployment = copy.deepcopy(resources("Deployment")["fapm-api"])
    pod_spec(deployment)["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(resources("Deployment")["fapm-api"])
    pod_spec(deployment)["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (as `kubectl apply --validate=strict`)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def keda_schema() -> dict:
    return _strict(yaml.safe_load((SCHEMAS / "keda-scaledobject-v1alpha1.yaml").read_text()))


@pytest.mark.parametrize(("ident", "doc"), KEDA, ids=[i for i, _ in KEDA])
def test_scaledobjects_valid_against_the_keda_crd(ident: str, doc: dict) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject"
    jsonschema.Draft7Validator(keda_schema()).validate(doc)
    # metadata is `type: object` in a CRD schema; the API server checks it as ObjectMeta.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(meta, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_keda_schema_rejects_a_broken_scaledobject() -> None:
    (_, good) = KEDA[0]
    validator = jsonschema.Draft7Validator(keda_schema())
    for breakage in (
        lambda d: d["spec"].pop("scaleTargetRef"),
        lambda d: d["spec"].__setitem__("maxReplicaCount", "8"),
        lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("listLength", 1),
        lambda d: d["spec"].__setitem__("minReplicas", 1),
    ):
        bad = copy.deepcopy(good)
        breakage(bad)
        assert list(validator.iter_errors(bad)), bad


def test_kustomization_applies_every_manifest_but_the_example_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in manifest_files()} - {"kustomization.yaml"}
    assert listed == files - {"secrets.example.yaml"}
    assert all(d["kind"] != "Secret" for d in applied_resources()), "no Secret is applied"
    for doc in applied_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    images = {i["name"] for i in kustomization["images"]}
    assert images == {"fapm-service/api", "fapm-service/worker-cpu", "fapm-service/worker-gpu"}


def test_example_secrets_are_placeholders_and_cover_every_reference() -> None:
    example = {d["metadata"]["name"]: d for d in documents(K8S / "secrets.example.yaml")}
    for secret in example.values():
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
    referenced: set[tuple[str, str | None]] = set()
    for doc in applied_resources():
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        spec = pod_spec(doc)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                referenced.add((volume["secret"]["secretName"], None))
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    referenced.add((source["secretRef"]["name"], None))
            # No credentials inline: a secret-looking variable must come from a Secret.
            for env in container.get("env", []):
                if any(w in env["name"] for w in ("PASSWORD", "TOKEN", "SECRET", "_KEYS")):
                    assert "value" not in env or env["name"] == "FAPM_API_KEYS_FILE", env
    for name, key in referenced:
        assert name in example, f"Secret {name} is referenced but not in secrets.example.yaml"
        if key is not None:
            assert key in example[name]["stringData"], f"{name}.{key}"


def _containers(kind: str = "Deployment") -> dict[str, dict]:
    return {name: pod_spec(d)["containers"][0] for name, d in resources(kind).items()}


def _env_names(container: dict) -> set[str]:
    names = {env["name"] for env in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(resources("ConfigMap")[source["configMapRef"]["name"]]["data"])
    return names


def test_every_environment_variable_is_read_by_something() -> None:
    fields = settings_env_names()
    for name, container in _containers().items():
        for var in _env_names(container):
            if var.startswith("FAPM_"):
                assert var in fields, f"{name}: {var} is not a Settings field"
            else:
                assert var in OTHER_ENV, f"{name}: {var} is read by nothing known"
        # Kubernetes expands $(VAR) only from variables defined before it in `env`.
        defined: list[str] = []
        for env in container.get("env", []):
            for used in ("REDIS_PASSWORD",):
                if f"$({used})" in env.get("value", ""):
                    assert used in defined, f"{name}: {env['name']} uses $({used}) before it"
            defined.append(env["name"])


def test_every_fapm_pod_reaches_the_same_redis() -> None:
    for name, container in _containers().items():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["FAPM_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0", name
    assert "redis" in resources("Service")
    assert resources("Service")["redis"]["spec"]["ports"][0]["port"] == 6379


def test_containers_run_the_images_entry_points() -> None:
    containers = _containers()
    api = container_command(containers["fapm-api"], image_command(DOCKER / "api.Dockerfile")[0])
    _, api_cmd = image_command(DOCKER / "api.Dockerfile")
    assert api[: len(api_cmd)] == api_cmd, "the image's command, with extra flags at most"
    consumed: dict[str, set[str]] = {}
    for name, queue in {**WORKERS, WEBHOOKS: "cpu"}.items():
        dockerfile = DOCKER / f"worker-{queue}.Dockerfile"
        entrypoint, cmd = image_command(dockerfile)
        container = containers[name]
        assert "command" not in container, "keep the image's entrypoint (signal handling)"
        assert container["image"].startswith(f"fapm-service/worker-{queue}:")
        assert container["args"][:4] == cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        assert container_command(container, entrypoint)[:2] == ["python", entrypoint[1]]
        consumed[name] = consumed_queues(container["args"])
    # Each Deployment names its queues, and together they consume every queue the service uses.
    assert consumed == {
        "fapm-worker-cpu": {"cpu"},
        "fapm-worker-gpu": {"gpu"},
        WEBHOOKS: {"webhooks"},
    }
    assert set().union(*consumed.values()) == all_celery_queues()
    webhooks = containers[WEBHOOKS]["args"]
    assert webhooks[webhooks.index("--pool") + 1] == "threads"
    for name in WORKERS:
        args = containers[name]["args"]
        assert args[args.index("--concurrency") + 1] == "1", "one job per pod"


def test_api_probes_service_and_pdb() -> None:
    deployment = resources("Deployment")["fapm-api"]
    container = pod_spec(deployment)["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port[container["livenessProbe"]["httpGet"]["port"]] == 8000
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resources("Service")["fapm-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = resources("PodDisruptionBudget")["fapm-api"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FAPM_API_KEYS_FILE"].startswith(mounts["api-keys"] + "/")


def test_grace_periods() -> None:
    deployments = resources("Deployment")
    visibility = int(
        resources("ConfigMap")["fapm-config"]["data"].get(
            "FAPM_VISIBILITY_TIMEOUT_SECONDS", settings_defaults()["visibility_timeout_seconds"]
        )
    )
    api = pod_spec(deployments["fapm-api"])
    assert api["terminationGracePeriodSeconds"] <= 60, "the API: short"
    prestop = int(api["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    command = api["containers"][0]["command"]
    uvicorn_grace = int(command[command.index("--timeout-graceful-shutdown") + 1])
    assert prestop + uvicorn_grace < api["terminationGracePeriodSeconds"]
    for name in [*WORKERS, WEBHOOKS]:
        spec = pod_spec(deployments[name])
        grace = spec["terminationGracePeriodSeconds"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        drain = int(env["WORKER_DRAIN_SECONDS"])
        if name in WORKERS:
            assert grace >= 3600, f"{name}: jobs run for hours; the grace period must let them end"
            assert 60 <= grace - drain <= 900, f"{name}: hand back minutes before the SIGKILL"
        else:
            assert grace <= 120 and 10 <= grace - drain, f"{name}: deliveries take seconds"
        assert grace < visibility, f"{name}: a draining job must not be re-delivered meanwhile"
        assert "livenessProbe" not in spec["containers"][0]


def test_gpu_workers_ask_for_gpus_on_gpu_nodes() -> None:
    spec = pod_spec(resources("Deployment")["fapm-worker-gpu"])
    resources_ = spec["containers"][0]["resources"]
    assert resources_["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    cpu = pod_spec(resources("Deployment")["fapm-worker-cpu"])
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert consumed_queues(spec["containers"][0]["args"]) == {"gpu"}


def test_scaledobjects_scale_each_worker_on_its_celery_queue() -> None:
    scaled = resources("ScaledObject")
    deployments = resources("Deployment")
    redis_service = resources("Service")["redis"]
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == set(WORKERS)
    lists = set()
    for so in scaled.values():
        target = so["spec"]["scaleTargetRef"]
        deployment = deployments[target["name"]]
        container = {c["name"]: c for c in pod_spec(deployment)["containers"]}[
            target["envSourceContainerName"]
        ]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis"
        assert meta["listName"] == WORKERS[target["name"]]
        lists.add(meta["listName"])
        assert int(meta["listLength"]) >= 1
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"redis.{redis_service['metadata']['namespace']}.svc.cluster.local"
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert meta["passwordFromEnv"] in {e["name"] for e in container["env"]}
        assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert lists == set(celery_queues()), "KEDA watches exactly the Celery queues"
    # /readyz needs a live worker heartbeat: the webhooks worker always runs (KEDA leaves it be).
    assert resources("Deployment")[WEBHOOKS]["spec"]["replicas"] >= 1
    assert WEBHOOKS not in {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}


def test_redis_statefulset_persists_with_aof() -> None:
    sts = resources("StatefulSet")["redis"]
    container = pod_spec(sts)["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mount[claim["metadata"]["name"]] == args[args.index("--dir") + 1]
    assert sts["spec"]["serviceName"] in resources("Service")
    assert resources("Service")[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_pods_run_as_non_root() -> None:
    for kind in ("Deployment", "StatefulSet"):
        for name, doc in resources(kind).items():
            spec = pod_spec(doc)
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            for container in spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_shared_data_volume_matches_local_roots() -> None:
    roots = resources("ConfigMap")["fapm-config"]["data"]["FAPM_LOCAL_ROOTS"].split(",")
    pvc = resources("PersistentVolumeClaim")["fapm-data"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, doc in resources("Deployment").items():
        spec = pod_spec(doc)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        for root in roots:
            assert claims[mounts[root]] == "fapm-data", f"{name}: {root}"


def test_manifest_files_are_yaml_documents_with_kind() -> None:
    for path in manifest_files():
        for doc in documents(path):
            assert "kind" in doc and "apiVersion" in doc, path.name
