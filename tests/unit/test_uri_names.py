"""Names inside s3:// and hf:// locations follow their services' own rules (parse_uri refuses the
rest with a ValueError naming the rule): AWS's bucket naming rules, S3 keys without segments that
escape or confuse, huggingface_hub's repo id validator and git's ref-name rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.evaluation.data import split_file_uri
from worker.io.location_names import check_hub_repo_id, check_hub_revision
from worker.io.uri import parse_uri

REPO = Path(__file__).resolve().parents[2]

GOOD_BUCKETS = [
    "abc",
    "models",
    "acme-pruned",
    "fapm-0123456789ab",
    "my.bucket.name",
    "a" * 63,
    "1bucket",
    "bucket1",
    "xn-bucket",  # only "xn--" is reserved
    "s3alias-bucket",
]
BAD_BUCKETS = [
    ("ab", "3 to 63"),
    ("a" * 64, "3 to 63"),
    ("Bucket", "lowercase"),
    ("my_bucket", "lowercase"),
    ("-bucket", "beginning and ending"),
    ("bucket-", "beginning and ending"),
    (".bucket", "beginning and ending"),
    ("bucket.", "beginning and ending"),
    ("my..bucket", "adjacent periods"),
    ("169.254.169.254", "IP address"),
    ("192.168.5.4", "IP address"),
    ("127.0.0.1", "IP address"),
    ("xn--bucket", "prefix 'xn--'"),
    ("sthree-bucket", "prefix 'sthree-'"),
    ("amzn-s3-demo-bucket", "prefix 'amzn-s3-demo-'"),
    ("bucket-s3alias", "suffix '-s3alias'"),
    ("bucket--ol-s3", "suffix '--ol-s3'"),
    ("bucket.mrap", "suffix '.mrap'"),
    ("bucket--x-s3", "suffix '--x-s3'"),
    ("bucket--table-s3", "suffix '--table-s3'"),
    ("user@bucket", "lowercase"),
    ("bucket:9000", "lowercase"),
    ("buck et", "lowercase"),
]


@pytest.mark.parametrize("bucket", GOOD_BUCKETS)
def test_valid_bucket_names_parse(bucket):
    uri = parse_uri(f"s3://{bucket}/prefix/")
    assert (uri.scheme, uri.path) == ("s3", f"{bucket}/prefix/")


@pytest.mark.parametrize(("bucket", "rule"), BAD_BUCKETS)
def test_invalid_bucket_names_are_refused(bucket, rule):
    with pytest.raises(ValueError, match="bucket") as info:
        parse_uri(f"s3://{bucket}/prefix/")
    assert rule in str(info.value)


@pytest.mark.parametrize(
    "key",
    ["", "prefix/", "a/b/c/", "model.safetensors", "a/b.c/d-e_f/", "llama-3.1-8b-sft/", "x" * 1000],
)
def test_ordinary_keys_and_prefixes_parse(key):
    assert parse_uri(f"s3://models/{key}").path == f"models/{key}"


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("../other-tenant/", "'..' is not allowed|.. is not allowed"),
        ("a/../../b/", ".. is not allowed"),
        ("a/./b", ". is not allowed"),
        ("/leading", "empty segment"),
        ("a//b/", "empty segment"),
        ("a/b//", "empty segment"),
        ("a\x00b/", "control"),
        ("a\nb/", "control"),
        ("a\x7fb/", "control"),
        ("a\\..\\b/", "backslash"),
        ("prefix/?versionId=1", "query"),
        ("prefix/#frag", "query"),
        ("k" * 1025, "1024 bytes"),
    ],
)
def test_keys_that_escape_or_confuse_are_refused(key, rule):
    with pytest.raises(ValueError, match=rule):
        parse_uri(f"s3://models/{key}")


# -- Hub repo ids ------------------------------------------------------------------------------

GOOD_REPOS = [
    "org/name",
    "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-v0.3",
    "a/b",
    "_x/y_",
    "Org123/name.with.dots",
    "o/" + "n" * 96,
]
BAD_REPOS = [
    "org/name/extra",
    "name",
    "org/",
    "/name",
    "org/-name",
    "org/name-",
    "org/.name",
    "org/name.",
    "org/na--me",
    "org/na..me",
    "../../etc",
    "org/name.git",
    "org/" + "n" * 97,
    "org/na me",
    "org/caf\u00e9",
    "org/name?x=1",
    "org/name#x",
    "org/na%2fme",
]


@pytest.mark.parametrize("repo", GOOD_REPOS)
def test_valid_repo_ids_parse(repo):
    uri = parse_uri(f"hf://{repo}@main")
    assert (uri.path, uri.revision) == (repo, "main")


@pytest.mark.parametrize("repo", BAD_REPOS)
def test_invalid_repo_ids_are_refused(repo):
    with pytest.raises(ValueError, match="Hub"):
        parse_uri(f"hf://{repo}")


@pytest.mark.parametrize("repo", GOOD_REPOS + BAD_REPOS)
def test_repo_id_rules_agree_with_huggingface_hub(repo):
    """The API image has no huggingface_hub, so its rules are restated: this pins the two."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        hub_ok = repo.count("/") == 1  # we also require the org
    except HFValidationError:
        hub_ok = False
    try:
        check_hub_repo_id(repo)
        ours_ok = True
    except ValueError:
        ours_ok = False
    assert ours_ok == hub_ok


# -- Hub revisions -----------------------------------------------------------------------------

GOOD_REVISIONS = [
    "main",
    "v1",
    "v1.0.2",
    "refs/pr/1",
    "feature/new-tokenizer",
    "release_2024-01",
    "a" * 40,
    "0123456789abcdef0123456789abcdef01234567",
    "caf\u00e9",  # git allows non-ASCII
    "x@y",
]
BAD_REVISIONS = [
    "../../../etc",
    "..",
    "a..b",
    ".hidden",
    "dir/.hidden",
    "main.lock",
    "dir/x.lock/y",
    "main.",
    "/main",
    "main/",
    "a//b",
    "-main",
    "@",
    "main@{1}",
    "ma in",
    "ma~in",
    "ma^in",
    "ma:in",
    "ma?in",
    "ma*in",
    "ma[in",
    "ma\\in",
    "ma\tin",
    "ma\x7fin",
]


@pytest.mark.parametrize("revision", GOOD_REVISIONS)
def test_valid_revisions_parse(revision):
    assert parse_uri(f"hf://org/name@{revision}").revision == revision


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_invalid_revisions_are_refused(revision):
    with pytest.raises(ValueError, match="Hub revision"):
        parse_uri(f"hf://org/name@{revision}")


def test_an_empty_revision_is_refused():
    with pytest.raises(ValueError, match="empty"):
        parse_uri("hf://org/name@")


@pytest.mark.parametrize("revision", GOOD_REVISIONS + BAD_REVISIONS)
def test_revision_rules_agree_with_git_check_ref_format(revision):
    """git itself is the reference (it is on every machine that has this checkout)."""
    git = subprocess.run(
        ["git", "check-ref-format", "--allow-onelevel", revision], capture_output=True
    )
    # Beyond git: a leading '-' reads as an option to tools (git refuses it for branch names).
    git_ok = git.returncode == 0 and not revision.startswith("-")
    try:
        check_hub_revision(revision)
        ours_ok = True
    except ValueError:
        ours_ok = False
    assert ours_ok == git_ok


# -- evaluation set files go through the same checks --------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "s3://169.254.169.254/evals/task.jsonl",
        "s3://evals/../other/task.jsonl",
        "hf://org/name@../x/task.jsonl",
        "hf://org/na--me@main/task.jsonl",
        "hf://org/name@main/..",
    ],
)
def test_evaluation_set_uris_get_the_name_checks(uri):
    with pytest.raises(ValueError):
        split_file_uri(uri)


def test_good_evaluation_set_uris_split():
    assert split_file_uri("s3://acme-evals/sft/task.jsonl") == (
        "s3://acme-evals/sft/",
        "task.jsonl",
    )
    assert split_file_uri("hf://org/name@main/task.jsonl") == ("hf://org/name@main", "task.jsonl")


def test_cli_refuses_a_bad_remote_name_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", "--base", "s3://169.254.169.254/x/",
         "--finetuned", "hf://org/name@../../etc", "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "169.254.169.254" in lines[0] and "IP address" in lines[0]
    assert not (tmp_path / "out").exists()
