"""Listing a source is lazy and capped: an S3 source lists only its top level when it opens and
its nested objects a page at a time as carry-over consumes them (moto_server, the real protocol;
the list calls are counted at boto3's event hooks), and a local tree of more files than the cap
is carried over up to the cap, with one entry saying the listing stopped."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import boto3

from worker.io.carry_over import LISTING_STOPPED, carry_over
from worker.io.s3 import S3Source
from worker.io.source import MAX_LISTED_FILES, LocalDirSource

NESTED = 1001  # one page of list_objects_v2 (1,000 keys) and a bit


def test_s3_opens_on_its_top_level_and_lists_nested_objects_page_by_page(s3, bucket):
    s3.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="m/1_Pooling/", Body=b"")  # a folder marker: no data
    nested = [f"junk/{i:05d}.txt" for i in range(NESTED)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: s3.put_object(Bucket=bucket, Key=f"m/{n}", Body=b"x"), nested))

    client = boto3.client("s3")
    calls: list[dict] = []
    client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: calls.append(dict(params))
    )
    source = S3Source(f"s3://{bucket}/m/", bucket, "m/", client=client)
    assert len(calls) == 1 and calls[0].get("Delimiter") == "/"  # the top level only
    assert source.files() == ["config.json"]

    first = list(itertools.islice(source.iter_files(), 3))
    assert first == ["config.json", nested[0], nested[1]]  # key order; the marker is no file
    assert len(calls) == 2 and "Delimiter" not in calls[1]  # one page, not the whole prefix

    everything = list(source.iter_files())
    assert sorted(everything) == sorted(["config.json", *nested])
    assert source.size(nested[-1]) == 1
    assert len(calls) == 2 + 2  # both pages this time


def test_a_tree_past_the_cap_is_carried_up_to_it_and_says_so(tmp_path):
    source_dir, out = tmp_path / "ft", tmp_path / "out"
    (source_dir / "logs").mkdir(parents=True)
    out.mkdir()
    (source_dir / "config.json").write_text("{}")
    (source_dir / "tokenizer.json").write_text("{}")
    for i in range(MAX_LISTED_FILES + 10):  # empty files: cheap to make, and all left out
        (source_dir / "logs" / f"{i}.bin").touch()

    result = carry_over(LocalDirSource(source_dir), out)
    stopped = [e for e in result.not_carried if e["name"] == LISTING_STOPPED]
    assert len(stopped) == 1 and "listing stopped" in stopped[0]["reason"]
    # The files looked at before the cap are handled as always: the weights left out, the rest
    # carried; nothing past the cap is listed.
    weights = [e for e in result.not_carried if e["name"].startswith("logs/")]
    assert all(e["reason"].startswith("weights") for e in weights)
    # A folder is listed after its parent's files; the cap counts every entry looked at (the
    # three at the top level included).
    assert result.carried == ["config.json", "tokenizer.json"]
    assert len(weights) == MAX_LISTED_FILES - 3
    assert sorted(p.name for p in out.iterdir()) == sorted(result.carried)
