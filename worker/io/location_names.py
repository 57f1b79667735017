"""Names inside remote locations, checked by the rules of the service that owns them.

A URI's shape is not enough: `s3://169.254.169.254/x` names an address, not a bucket, and
`hf://org/name@../../../etc` puts a path where a revision belongs (revisions end up in cache
paths and API URLs). Each check raises ValueError with a message that says which rule failed;
parse_uri (worker/io/uri.py) runs them, so the API refuses such a location at submission (422).

- S3 bucket names: AWS's rules for general purpose buckets
  (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
- S3 keys and prefixes: no `.`/`..` or empty segments, control characters, backslashes, `?` or
  `#`, which some tools resolve, strip or split on (so the object written would not be the one
  named); at most 1,024 bytes.
- Hub repo ids: huggingface_hub's `validate_repo_id` (the API image does not install
  huggingface_hub, so its rules are restated here; tests/unit/test_uri_names.py checks that the
  two agree), with the org required.
- Hub revisions: a 40-hex commit or a ref name by `git check-ref-format`'s rules.
"""

from __future__ import annotations

import ipaddress
import re

S3_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")
S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
S3_MAX_KEY_BYTES = 1024
# Backslashes are path separators to some tools; `?` and `#` read as a URI's query and fragment.
_S3_KEY_CONFUSING = set("\\?#")

# huggingface_hub's REPO_ID_REGEX for one part: ASCII letters, digits, '_', '-', '.', 1 to 96
# characters, beginning and ending with a letter, digit or '_' (its `\b`).
HUB_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# Characters git refuses anywhere in a ref name (besides control characters).
_REF_FORBIDDEN = set(" ~^:?*[\\")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def check_s3_bucket(bucket: str) -> None:
    """Raise ValueError unless `bucket` is a valid S3 (general purpose) bucket name."""
    rule = "S3 bucket names are 3 to 63 lowercase letters, digits, '.' and '-'"
    if not 3 <= len(bucket) <= 63:
        raise ValueError(f"bucket {bucket!r}: {rule}")
    if not S3_BUCKET_CHARS.fullmatch(bucket):
        raise ValueError(f"bucket {bucket!r}: {rule}, beginning and ending with a letter or digit")
    if ".." in bucket:
        raise ValueError(f"bucket {bucket!r}: S3 bucket names have no two adjacent periods")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        pass
    else:
        raise ValueError(f"bucket {bucket!r}: an IP address is not an S3 bucket name")
    for prefix in S3_RESERVED_PREFIXES:
        if bucket.startswith(prefix):
            raise ValueError(f"bucket {bucket!r}: the prefix {prefix!r} is reserved by S3")
    for suffix in S3_RESERVED_SUFFIXES:
        if bucket.endswith(suffix):
            raise ValueError(f"bucket {bucket!r}: the suffix {suffix!r} is reserved by S3")


def check_s3_key(key: str) -> None:
    """Raise ValueError for an S3 key or prefix (`a/b/`, or '' for the whole bucket) that has a
    `.`, `..` or empty segment, a control character, a backslash, `?` or `#`, or is over 1,024
    bytes."""
    if not key:
        return
    if _has_control(key) or any(c in _S3_KEY_CONFUSING for c in key):
        raise ValueError(
            f"S3 key {key!r}: no control characters, backslashes, '?' or '#' (a URI's query or "
            "fragment is not part of an S3 location)"
        )
    if len(key.encode("utf-8", "surrogatepass")) > S3_MAX_KEY_BYTES:
        raise ValueError(f"S3 key: at most {S3_MAX_KEY_BYTES} bytes")
    segments = key.removesuffix("/").split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            shown = segment or "an empty segment ('//')"
            raise ValueError(f"S3 key {key!r}: {shown} is not allowed as a path segment")


def check_hub_repo_id(repo: str) -> None:
    """Raise ValueError unless `repo` is `org/name` by huggingface_hub's rules."""
    parts = repo.split("/")
    if len(parts) != 2:
        raise ValueError(f"Hub repo {repo!r}: a Hub repo id is org/name")
    if not all(HUB_REPO_PART.fullmatch(part) for part in parts):
        raise ValueError(
            f"Hub repo {repo!r}: org and name are 1 to 96 ASCII letters, digits, '-', '_' or "
            "'.', not beginning or ending with '-' or '.'"
        )
    if "--" in repo or ".." in repo:
        raise ValueError(f"Hub repo {repo!r}: no '--' or '..'")
    if repo.endswith(".git"):
        raise ValueError(f"Hub repo {repo!r}: must not end with '.git'")


def check_hub_revision(revision: str) -> None:
    """Raise ValueError unless `revision` is a commit SHA or a branch/tag name that
    `git check-ref-format` accepts (one level allowed, as `main`), and does not begin with '-'."""
    if COMMIT_SHA.fullmatch(revision):
        return
    problem = None
    if not revision:
        problem = "is empty"
    elif _has_control(revision) or any(c in _REF_FORBIDDEN for c in revision):
        problem = "has a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in revision or "@{" in revision or revision == "@":
        problem = "has '..' or '@{' (or is '@')"
    elif revision.startswith(("-", "/")) or revision.endswith(("/", ".")) or "//" in revision:
        problem = "begins with '-' or '/', ends with '/' or '.', or has '//'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        problem = "has a part that begins with '.' or ends with '.lock'"
    if problem:
        raise ValueError(f"Hub revision {revision!r} {problem}: use a branch, tag or 40-hex commit")


def check_file_name(name: str) -> None:
    """Raise ValueError unless `name` is a plain file name (a file at the top of a Hub repo):
    not `.` or `..`, no control characters or backslashes."""
    if name in (".", "..") or _has_control(name) or "\\" in name:
        raise ValueError(f"file name {name!r}: not '.' or '..', no control characters or '\\'")
