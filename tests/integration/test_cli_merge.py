"""Merges from the command line: `fapm prune` with repeated --finetuned/--adapter, --with and
--merge-* writes the bytes the same merge as a JobSpec writes through run_prune; `fapm submit`
posts that JobSpec; --spec reads the API body from a file; malformed options exit 2 with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.integration.test_merge_rules import make_finetunes
from tests.models import make_llama_pair, make_lora_adapter
from worker.cli.app import build_parser
from worker.cli.app import main as fapm
from worker.cli.spec_flags import spec_from_args
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 base, two full fine-tunes and a LoRA adapter of it."""
    root = tmp_path_factory.mktemp("cli_merge")
    pair = make_llama_pair(root / "pair", dtype=torch.float32, seed=21)
    fts = make_finetunes(pair.base, root, 2)
    lora = make_lora_adapter(pair.base, root / "lora", seed=3)
    return pair.base, fts, lora.adapter


def _spec(*args: str) -> JobSpec:
    return spec_from_args(build_parser().parse_args(["prune", *args]))


def _weights(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors*"))}


def test_cli_merge_writes_the_jobspec_merge(family, tmp_path, capsys):
    base, (ft0, ft1), adapter = family
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    code = fapm(
        ["prune", "--base", str(base), "--out", str(cli_out), "--sparsity", "0.6",
         "--finetuned", f"file://{ft0}", "--with", "weight=1", "method=magnitude", "sparsity=0.5",
         "--adapter", str(adapter), "--with", "weight=0.7",
         "--finetuned", str(ft1), "--with", "weight=0.8", "method=dare",
         "--merge-rule", "ties", "--merge-lam", "0.9", "--no-merge-normalize", "--seed", "5"]
    )  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {cli_out} (ties merge of 3 inputs: magnitude 0.5 kept "), line
    run_prune(
        JobSpec(
            base=str(base),
            output=str(api_out),
            sparsity=0.6,
            seed=5,
            finetuned=[
                {"model": f"file://{ft0}", "weight": 1.0, "method": "magnitude", "sparsity": 0.5},
                {"model": str(adapter), "adapter": True, "weight": 0.7},
                {"model": str(ft1), "weight": 0.8, "method": "dare"},
            ],
            merge={"rule": "ties", "lam": 0.9, "normalize": False},
        )
    )
    cli, api = _weights(cli_out), _weights(api_out)
    assert cli and cli == api
    report = json.loads((cli_out / "pruning_report.json").read_text())["merge"]
    assert (report["rule"], report["lam"], report["normalize"]) == ("ties", 0.9, False)
    assert [(i["weight"], i["method"], i["sparsity"], i["adapter"]) for i in report["inputs"]] == [
        (1.0, "magnitude", 0.5, False),
        (0.7, "fapm", 0.6, True),
        (0.8, "dare", 0.6, False),
    ]


def test_one_finetuned_or_adapter_stays_a_single_pair():
    assert _spec("--base", "b", "--finetuned", "hf://org/ft@v1", "--out", "o").finetuned == (
        "hf://org/ft@v1"
    )
    spec = _spec("--base", "b", "--adapter", "s3://bucket/lora/", "--out", "o")
    assert (spec.finetuned, spec.adapter) == (None, "s3://bucket/lora/")
    # --with or a --merge-* flag makes a merge, of one input too.
    one = _spec("--base", "b", "--finetuned", "f", "--with", "sparsity=0.5", "--out", "o")
    assert [i.model_dump(exclude_unset=True) for i in one.merge_inputs] == [
        {"model": "f", "sparsity": 0.5}
    ]
    for value in ("true", "false"):
        flagged = _spec(
            "--base", "b", "--finetuned", "f", "--with", f"adapter={value}", "--out", "o"
        )
        assert flagged.adapter is None and flagged.merge_inputs[0].adapter is (value == "true")
    ruled = _spec("--base", "b", "--finetuned", "f", "--merge-rule", "ties", "--out", "o")
    assert ruled.merge_inputs is not None and ruled.merge.rule == "ties"


def test_locations_are_taken_whole_and_values_after_the_first_equals():
    spec = _spec(
        "--base", "b", "--out", "o",
        "--finetuned", "hf://org/math:v2@rev", "--with", "weight=0.5", "method=magnitude",
        "--finetuned", "file:///x:y/", "--with", "adapter=true",
    )  # fmt: skip
    first, second = spec.merge_inputs
    assert (first.model, first.weight, first.method) == ("hf://org/math:v2@rev", 0.5, "magnitude")
    assert (second.model, second.adapter) == ("file:///x:y/", True)
    # A value is everything after the first '=' (a task set's location may hold '=', ':', ',').
    parsed = build_parser().parse_args(
        ["prune", "--finetuned", "f", "--with", "task=s3://b/t=1,2.jsonl", "--out", "o"]
    )
    assert parsed.update_inputs == [{"model": "f", "task": "s3://b/t=1,2.jsonl"}]


def test_a_list_option_is_comma_separated():
    """MergeInput's list fields (nps_weights) take a comma-separated value, as --nps-weights."""
    weights = "1,0.5,1,1,2,1,1,0.25"
    spec = _spec("--base", "b", "--out", "o", "--method", "nps", "--sparsity", "0.9",
                 "--finetuned", "f", "--with", f"nps_weights={weights}", "--finetuned", "g",
                 "--with", "method=magnitude")  # fmt: skip
    first, second = spec.merge_inputs
    assert first.nps_weights == [float(w) for w in weights.split(",")]
    assert (second.method, second.nps_weights) == ("magnitude", None)


def test_spec_file_with_flags_overriding(tmp_path):
    body = {
        "base": "s3://m/base/",
        "output": "s3://m/merged/",
        "finetuned": [{"model": "s3://m/a/", "weight": 0.5}, {"model": "s3://m/b/"}],
        "merge": {"rule": "ties", "lam": 0.5},
        "sparsity": 0.7,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(body))
    assert _spec("--spec", str(path)) == JobSpec.model_validate(body)
    spec = _spec("--spec", str(path), "--merge-lam", "2", "--out", "o2", "--overwrite")
    assert (spec.merge.rule, spec.merge.lam, spec.output, spec.overwrite) == (
        "ties",
        2.0,
        "o2",
        True,
    )
    assert spec.merge_inputs == JobSpec.model_validate(body).merge_inputs
    # --finetuned/--adapter replace the file's update side whole.
    single = _spec("--spec", str(path), "--adapter", "lora", "--merge-rule", "task_arithmetic")
    assert single.adapter is None and [i.model for i in single.merge_inputs] == ["lora"]
    assert single.merge.rule == "task_arithmetic" and single.merge.lam == 0.5


def test_submit_posts_the_merge_jobspec(monkeypatch, capsys):
    """`fapm submit` with the merge flags POSTs the JobSpec's body to a real HTTP server."""
    posted: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            answer = json.dumps({"id": "job-1", "status": "queued", "queue": "cpu"}).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:  # fapm status: the record of the job posted
            record = {"id": "job-1", "status": "queued", "queue": "cpu", "spec": posted[-1]}
            answer = json.dumps(record).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FAPM_API_KEY", "test-key")
        monkeypatch.setenv("FAPM_API_URL", f"http://127.0.0.1:{server.server_port}")
        code = fapm(
            ["submit", "--base", "s3://m/base/", "--out", "s3://m/out/",
             "--finetuned", "s3://m/math/", "--with", "weight=1", "method=magnitude",
             "sparsity=0.8", "--finetuned", "hf://org/code@main", "--with", "weight=0.7",
             "--adapter", "s3://m/chat-lora/", "--merge-rule", "ties", "--merge-lam", "1"]
        )  # fmt: skip
        submitted = capsys.readouterr().out.strip()
        assert fapm(["status", "job-1"]) == 0
        status = capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0 and submitted == "job-1"
    assert (
        "ties merge of 3 inputs: s3://m/base/ + [s3://m/math/, hf://org/code@main, "
        "s3://m/chat-lora/] -> s3://m/out/"
    ) in status
    expected = JobSpec(
        base="s3://m/base/",
        output="s3://m/out/",
        finetuned=[
            {"model": "s3://m/math/", "weight": 1.0, "method": "magnitude", "sparsity": 0.8},
            {"model": "hf://org/code@main", "weight": 0.7},
            {"model": "s3://m/chat-lora/", "adapter": True},
        ],
        merge={"rule": "ties", "lam": 1.0},
    )
    assert len(posted) == 1
    assert JobSpec.model_validate(posted[0]) == expected
    assert posted[0]["finetuned"][2] == {"model": "s3://m/chat-lora/", "adapter": True}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", "--base", "b", "--out", "o", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--with", "weight=1", "--finetuned", "f"], ["--with", "after the --finetuned"]),
        (["--finetuned", "f", "--with", "weight"], ["'weight'", "KEY=VALUE", "sparsity"]),
        (["--finetuned", "f", "--with", "colour=red"], ["unknown key 'colour'", "weight"]),
        (["--finetuned", "f", "--with", "model=g"], ["unknown key 'model'", "--finetuned"]),
        (["--finetuned", "f", "--with", "weight=1", "weight=2"], ["weight given twice"]),
        (["--adapter", "f", "--with", "adapter=false"], ["an adapter already"]),
        (["--finetuned", "f", "--with", "weight=abc"], ["finetuned.0.weight", "valid number"]),
        (["--finetuned", "f", "--finetuned", "g", "--with", "sparsity=1.5"],
         ["finetuned.1.sparsity"]),
        (["--finetuned", "f", "--finetuned", "g", "--merge-rule", "mean"],
         ["--merge-rule", "invalid choice", "ties"]),
        (["--finetuned", "f", "--finetuned", "g", "--merge-lam", "big"], ["merge.lam"]),
        (["--finetuned", "f", "--merge-rule", "nps_fusion", "--merge-normalize"],
         ["normalize: nps_fusion"]),
        (["--spec", "/nonexistent/job.json"], ["--spec /nonexistent/job.json"]),
    ],
)  # fmt: skip
def test_malformed_merge_options_exit_2_with_one_line(args, needles):
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_spec_file_that_is_not_a_job_object(tmp_path):
    for name, text, needle in (
        ("list.json", "[1, 2]", "not a JSON object"),
        ("broken.json", '{"base": ', "not valid JSON"),
        ("deep.json", '{"base": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
    ):
        path = tmp_path / name
        path.write_text(text)
        result = _run("--spec", str(path))
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
