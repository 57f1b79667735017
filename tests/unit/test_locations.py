"""Per-tenant locations (app/core/locations.py), the confinement of a job's local reads
(worker/io/source.py) and what `overwrite` may replace (worker/io/staging.py, publish.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.locations import (
    LocationsFileError,
    check_job_locations,
    location_policy,
    parse_tenant_locations,
    readable_roots,
)
from app.jobs.records import EvaluationRequest, JobRequest
from worker.errors import InvalidLocation, InvalidOutput, OutputExists, OutputNotReplaceable
from worker.io.publish import REPORT_FILE, check_replaceable
from worker.io.source import LocalDirSource, also_readable, confine_local_reads
from worker.io.staging import StagingDir, job_staging_prefix


@pytest.fixture
def roots(tmp_path) -> dict[str, Path]:
    made = {}
    for name in ("acme", "beta", "bases", "shared"):
        made[name] = (tmp_path / name).resolve()
        made[name].mkdir()
    for name in ("bases", "acme", "beta"):
        (made[name] / "model").mkdir()
    return made


@pytest.fixture
def settings(tmp_path, roots) -> Settings:
    table = {
        "tenants": {
            "acme": {
                "read": [str(roots["bases"]), "hf://meta-llama", "s3://shared-bases/"],
                "write": [str(roots["acme"]), "s3://acme-models/pruned/", "hf://Acme"],
            },
            "beta": {"read": ["hf://*"], "write": [f"file://{roots['beta']}", "s3://*"]},
        }
    }
    path = tmp_path / "tenants.yaml"
    path.write_text(json.dumps(table))  # JSON is YAML too
    return Settings(local_roots=[roots["shared"]], tenant_locations_file=path)


def job(**fields) -> JobRequest:
    return JobRequest(**fields)


def problems(request, tenant: str, settings: Settings) -> dict[str, str]:
    return {p.field: p.message for p in check_job_locations(request, tenant, settings)}


def test_a_tenant_reads_its_read_and_write_locations_and_writes_only_its_write_ones(
    settings, roots
):
    ok = job(
        base=str(roots["bases"] / "model"),
        finetuned=str(roots["acme"] / "model"),
        output=str(roots["acme"] / "out"),
    )
    assert problems(ok, "acme", settings) == {}
    into_bases = ok.model_copy(update={"output": str(roots["bases"] / "out")})
    refused = problems(into_bases, "acme", settings)["output"]
    assert "not under an allowed local root" in refused and "tenant acme" in refused
    # Tenant beta can neither read acme's model nor write into acme's root.
    found = problems(ok.model_copy(update={"base": str(roots["acme"] / "model")}), "beta", settings)
    assert set(found) == {"base", "finetuned", "output"}


def test_hub_and_s3_rules(settings):
    base = "hf://meta-llama/Llama-3.1-8B@main"
    public_ft = "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert (
        problems(job(base=base, finetuned=public_ft, output="hf://acme/pruned"), "acme", settings)
        == {}
    )
    # Readable is not writable: acme may start from meta-llama but not publish there.
    assert (
        "may write"
        in problems(
            job(base=base, finetuned=public_ft, output="hf://meta-llama/mine"), "acme", settings
        )["output"]
    )
    assert (
        "may read"
        in problems(
            job(base="hf://mistralai/x", finetuned=public_ft, output="hf://acme/o"),
            "acme",
            settings,
        )["base"]
    )
    s3_ok = job(
        base="s3://shared-bases/b/",
        finetuned="s3://acme-models/pruned/ft/",
        output="s3://acme-models/pruned/out/",
    )
    assert problems(s3_ok, "acme", settings) == {}
    # The configured prefix itself, a parent of it and another prefix of the bucket are refused.
    for output in ("s3://acme-models/pruned/", "s3://acme-models/", "s3://acme-models/other/"):
        assert "output" in problems(s3_ok.model_copy(update={"output": output}), "acme", settings)
    # "s3://*" (beta) lets it write any bucket but never a bare bucket.
    beta = job(base="hf://x/b", finetuned="hf://x/f", output="s3://anything/p/")
    assert problems(beta, "beta", settings) == {}
    assert "output" in problems(
        beta.model_copy(update={"output": "s3://anything"}), "beta", settings
    )


def test_an_output_never_is_a_root_an_ancestor_of_one_or_overlaps_an_input(settings, roots):
    ft = roots["acme"] / "model"
    base = str(roots["bases"] / "model")
    for output, needle in [
        (roots["acme"], "local root itself"),
        (roots["acme"].parent, "not under"),  # above every root: not writable at all
        (ft, "also an input"),
        (ft / "inner", "inside an input"),
    ]:
        found = problems(job(base=base, finetuned=str(ft), output=str(output)), "acme", settings)
        assert needle in found["output"], found
    # A write root that holds another tenant's root: the output may not be that ancestor.
    nested = roots["acme"] / "nested"
    nested.mkdir()
    table = json.loads(settings.tenant_locations_file.read_text())
    table["tenants"]["gamma"] = {"write": [str(nested / "g")]}
    settings.tenant_locations_file.write_text(json.dumps(table))
    (nested / "g").mkdir()
    found = problems(job(base=base, finetuned=str(ft), output=str(nested)), "acme", settings)
    assert "holds the local root" in found["output"]
    # Hub: the same repo on another branch is fine, the same repo and branch is not.
    same = job(base="hf://acme/m@main", finetuned="hf://meta-llama/f", output="hf://acme/m")
    assert "repo and revision" in problems(same, "acme", settings)["output"]
    branch = same.model_copy(update={"output": "hf://acme/m@pruned"})
    assert problems(branch, "acme", settings) == {}
    # S3: an output holding an input's prefix.
    s3 = job(
        base="s3://acme-models/pruned/x/b/",
        finetuned="s3://acme-models/pruned/x/f/",
        output="s3://acme-models/pruned/x/",
    )
    assert "holds an input" in problems(s3, "acme", settings)["output"]


def test_evaluation_sets_and_models_are_inputs(settings, roots):
    task = roots["acme"] / "task.jsonl"
    request = EvaluationRequest(
        base=str(roots["bases"] / "model"),
        model=str(roots["acme"] / "model"),
        evaluate={"task": str(task), "general": "/etc/passwd"},
    )
    found = problems(request, "acme", settings)
    assert set(found) == {"evaluate.general"}
    prune = job(
        base=str(roots["bases"] / "model"),
        finetuned=str(roots["acme"] / "model"),
        output=str(roots["acme"]) + "/sets",
        evaluate={"task": str(roots["acme"] / "sets" / "task.jsonl"), "general": str(task)},
    )
    assert "holds an input" in problems(prune, "acme", settings)["output"]


def test_unknown_tenant_may_use_nothing_and_a_broken_file_is_an_error(settings, roots, tmp_path):
    found = problems(job(base="hf://a/b", finetuned="hf://a/c", output="hf://a/d"), "z", settings)
    assert set(found) == {"base", "finetuned", "output"}
    assert "lists no tenant 'z'" in found["base"]
    assert readable_roots(settings, "z") == ()
    assert set(readable_roots(settings, "acme")) == {roots["bases"], roots["acme"]}
    settings.tenant_locations_file.write_text("tenants: [not, a, mapping]")
    with pytest.raises(LocationsFileError, match="tenants"):
        location_policy(settings)
    missing = Settings(tenant_locations_file=tmp_path / "nope.yaml")
    with pytest.raises(LocationsFileError):
        check_job_locations(
            job(base="hf://a/b", finetuned="hf://a/c", output="hf://a/d"), "z", missing
        )


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("relative/dir", "absolute"),
        ("ftp://x/y", "unknown scheme"),
        ("hf://a/b/c", "hf://org"),
        ("hf://a/b@main", "hf://org"),
        ("s3://", "s3://bucket"),
        (7, "not a location"),
    ],
)
def test_malformed_entries_are_named(entry, needle):
    text = json.dumps({"tenants": {"t": {"read": [entry]}}})
    with pytest.raises(ValueError, match=needle) as raised:
        parse_tenant_locations(text, "f.json")
    assert "tenant 't' read" in str(raised.value)


def test_without_the_file_every_tenant_shares_the_local_roots_and_any_bucket(roots):
    settings = Settings(local_roots=[roots["shared"]])
    (roots["shared"] / "m").mkdir()
    request = job(
        base=str(roots["shared"] / "m"), finetuned="s3://any/f/", output=str(roots["shared"] / "o")
    )
    assert problems(request, "anyone", settings) == {}
    assert (
        "local root itself"
        in problems(
            request.model_copy(update={"output": str(roots["shared"])}), "anyone", settings
        )["output"]
    )


def test_an_output_name_too_long_for_the_file_system_is_refused(settings, roots):
    long = roots["acme"] / ("n" * 256)
    found = problems(
        job(base=str(roots["bases"] / "model"), finetuned="hf://meta-llama/f", output=str(long)),
        "acme",
        settings,
    )
    assert "at most 255" in found["output"]
    with pytest.raises(InvalidOutput, match="at most 255"):
        StagingDir(long, overwrite=False, job_id="j")


def test_staging_names_stay_short_for_a_255_byte_output_name(tmp_path):
    output = tmp_path / ("é" * 127)  # 254 bytes
    staging = StagingDir(output, overwrite=False, job_id="0" * 32)
    assert len(os.fsencode(staging.path.name)) < 200
    assert staging.path.name.startswith(job_staging_prefix(output, "0" * 32))
    (staging.path / "f").write_text("x")
    staging.commit()
    assert (output / "f").read_text() == "x"
    other = StagingDir(tmp_path / ("é" * 126 + "x"), overwrite=False, job_id="0" * 32)
    assert other.path.name.split(".fapm-staging-")[0] != staging.path.name.split(".fapm")[0]


def _published(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / REPORT_FILE).write_text(json.dumps({"format": "fapm-pruning-report/1"}))
    (directory / "model.safetensors").write_bytes(b"old")
    return directory


def test_overwrite_replaces_only_a_model_fapm_published(tmp_path):
    published = _published(tmp_path / "published")
    check_replaceable(published)
    staging = StagingDir(published, overwrite=True)
    (staging.path / "new").write_text("n")
    staging.commit()
    assert sorted(p.name for p in published.iterdir()) == ["new"]

    data = tmp_path / "data"
    data.mkdir()
    (data / "precious.txt").write_text("keep")
    with pytest.raises(OutputNotReplaceable):
        StagingDir(data, overwrite=True)
    with pytest.raises(OutputExists):
        StagingDir(data, overwrite=False)
    # A directory of models (a report at its top notwithstanding) and a symlinked report.
    tree = _published(tmp_path / "tree")
    _published(tree / "inner")
    with pytest.raises(OutputNotReplaceable, match="holds directories"):
        check_replaceable(tree)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / REPORT_FILE).symlink_to(published / "new")
    with pytest.raises(OutputNotReplaceable):
        check_replaceable(linked)
    # What changed while the job ran is checked again at commit: nothing is touched.
    swapped = _published(tmp_path / "swapped")
    staging = StagingDir(swapped, overwrite=True)
    (swapped / REPORT_FILE).write_text("{}")
    with pytest.raises(OutputNotReplaceable):
        staging.commit()
    assert (swapped / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in data.iterdir()) == ["precious.txt"]


def test_a_confined_source_refuses_a_file_that_leads_out_of_the_roots(tmp_path):
    root = (tmp_path / "root").resolve()
    model = root / "model"
    model.mkdir(parents=True)
    (model / "inside.json").write_text("{}")
    (model / "alias.json").symlink_to(model / "inside.json")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (model / "tokenizer_config.json").symlink_to(secret)
    # The CLI (no confinement) reads anything.
    assert LocalDirSource(model).read_file("tokenizer_config.json") == b"outside"
    confine_local_reads([root])
    try:
        source = LocalDirSource(model)
        assert source.read_file("alias.json") == b"{}"  # a symlink inside the roots is fine
        for call in (source.read_file, source.size, source.stat):
            with pytest.raises(InvalidLocation, match=r"tokenizer_config\.json"):
                call("tokenizer_config.json")
        with pytest.raises(InvalidLocation, match=r"tokenizer_config\.json"):
            source.verify_files()
        with pytest.raises(InvalidLocation):
            LocalDirSource(tmp_path)
        with also_readable(tmp_path):  # a copy the job made itself
            assert LocalDirSource(tmp_path).read_file("secret.txt") == b"outside"
        with pytest.raises(InvalidLocation):
            LocalDirSource(tmp_path)
    finally:
        confine_local_reads(None)


def test_a_confined_job_reads_no_evaluation_set_through_a_symlink_out(tmp_path):
    from worker.evaluation.data import read_file

    root = (tmp_path / "root").resolve()
    root.mkdir()
    (root / "task.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    outside = tmp_path / "general.jsonl"
    outside.write_text('{"text": "private"}\n')
    (root / "general.jsonl").symlink_to(outside)
    confine_local_reads([root])
    try:
        assert read_file(str(root / "task.jsonl")).startswith(b'{"prompt"')
        with pytest.raises(InvalidLocation, match=r"general\.jsonl"):
            read_file(str(root / "general.jsonl"))
    finally:
        confine_local_reads(None)
