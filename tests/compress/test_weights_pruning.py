"""prune "weights" on a two-skill tiny Llama: Wanda agrees with the paper's code, task-aware
calibration keeps the task where general calibration loses it, the output is a dense drop-in
checkpoint, N:M patterns hold, a re-run gives the same bytes, and bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models import load_state_dict
from tests.wanda_reference import wanda_masks
from worker.cli import main
from worker.compress.decoder import UnsupportedArchitecture
from worker.evaluation.errors import EvalDataError
from worker.evaluation.job import run_job_spec
from worker.spec import JobSpec

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weights_job(case, out: Path, method="wanda", mode="general", sparsity=0.5, **extra) -> JobSpec:
    calibration = {"mode": mode, "general": str(case.general), "task": str(case.task),
                   "max_examples": 32}  # fmt: skip
    return JobSpec.model_validate(
        {
            "prune": "weights",
            "model": str(case.finetuned),
            "output": str(out),
            "method": method,
            "sparsity": sparsity,
            **({"calibration": calibration} if method != "magnitude" else {}),
            **extra,
        }
    )


def general_sequences(case, tokenizer) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in case.general.read_text().splitlines()][:32]
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


@pytest.mark.parametrize("sparsity", [0.5, 0.75])  # where int(d*s) and the exact k agree
def test_general_wanda_agrees_with_the_papers_code(dual_case, tmp_path, sparsity):
    from transformers import AutoTokenizer

    out = tmp_path / "wanda"
    run_job_spec(weights_job(dual_case, out, sparsity=sparsity))
    tokenizer = AutoTokenizer.from_pretrained(str(dual_case.finetuned))
    reference = wanda_masks(dual_case.finetuned, general_sequences(dual_case, tokenizer), sparsity)
    before, after = load_state_dict(dual_case.finetuned), load_state_dict(out)
    compared = 0
    for name, expected in reference["masks"].items():
        kept = after[name] != 0
        assert torch.equal(kept | (before[name] == 0), expected | (before[name] == 0)) or _noise(
            reference["scores"][name], kept, expected
        ), name
        # Kept weights are the model's own, bit for bit.
        assert torch.equal(after[name][kept], before[name][kept])
        compared += 1
    assert compared == 2 * len(LINEARS)


def _noise(scores: torch.Tensor, kept: torch.Tensor, expected: torch.Tensor) -> bool:
    """Masks that differ only where a score is within float noise of its row's threshold."""
    differ = kept != expected
    threshold = torch.where(expected, scores, torch.full_like(scores, float("inf"))).amin(1)
    near = (scores - threshold[:, None]).abs() <= 1e-5 * threshold[:, None].abs()
    return bool((near | ~differ).all())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_taskaware_keeps_the_task_that_general_loses_with_less_damage_than_task(
    dual_case, tmp_path, method
):
    measured = {}
    for mode in ("general", "task", "taskaware"):
        job = weights_job(dual_case, tmp_path / mode, method=method, mode=mode, sparsity=0.7,
                          evaluate={"task": str(dual_case.task), "general": str(dual_case.general)})  # fmt: skip
        evaluation = run_job_spec(job).report["evaluation"]
        point = evaluation["points"][0]
        measured[mode] = (point["skill"], point["perplexity"])
    print(f"{method} at 0.7 (skill, perplexity): {measured}")
    assert measured["taskaware"][0] > measured["general"][0]
    assert measured["taskaware"][1] < measured["task"][1]


def test_the_output_is_a_dense_drop_in_checkpoint(dual_case, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    argv = ["compress", "--model", str(dual_case.finetuned), "--out", str(out),
            "--method", "wanda", "--sparsity", "0.5", "--calibration", "taskaware",
            "--calibration-general", str(dual_case.general),
            "--calibration-task", str(dual_case.task), "--calibration-max-examples", "16"]  # fmt: skip
    assert main(argv) == 0
    before, after = load_state_dict(dual_case.finetuned), load_state_dict(out)
    assert {n: (t.dtype, t.shape) for n, t in after.items()} == {
        n: (t.dtype, t.shape) for n, t in before.items()
    }
    for name, tensor in after.items():
        if any(f".{linear}." in name for linear in LINEARS):
            rows, cols = tensor.shape
            # Wanda keeps exactly half of each row.
            assert ((tensor != 0) | (before[name] == 0)).sum(1).tolist() == [cols // 2] * rows
        else:  # embedding, norms, head: untouched
            assert torch.equal(tensor, before[name]), name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["operation"] == "weights" and len(report["layers"]) == 2
    assert report["totals"]["sparsity"] == pytest.approx(0.5)
    channels = report["calibration"]["channels"]
    assert channels["task_exclusive"] > 0 and channels["general_exclusive"] > 0
    for side in ("config.json", "tokenizer.json"):
        assert (out / side).read_bytes() == (dual_case.finetuned / side).read_bytes()
    card = (out / "README.md").read_text()
    assert "task-aware calibration" in card and str(dual_case.task) in card
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "2:4"), ("sparsegpt", "4:8"),
                                                 ("magnitude", "2:4")])  # fmt: skip
def test_an_n_m_pattern_keeps_n_of_every_m(dual_case, tmp_path, method, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    out = tmp_path / method
    run_job_spec(weights_job(dual_case, out, method=method, sparsity=1 - n / m, pattern=pattern))
    after = load_state_dict(out)
    for name, tensor in after.items():
        if any(f".{linear}." in name for linear in LINEARS):
            groups = (tensor != 0).reshape(-1, m).sum(1)
            assert int(groups.max()) <= n and int(groups.min()) >= n - 1, name  # a zero weight
            assert float((groups == n).float().mean()) > 0.99


def test_a_rerun_gives_the_same_bytes(dual_case, tmp_path):
    for name in ("one", "two"):
        run_job_spec(weights_job(dual_case, tmp_path / name, method="sparsegpt", mode="mixed"))
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "model.safetensors").read_bytes()


def test_bad_input_is_refused(dual_case, tmp_path):
    with pytest.raises(ValueError, match=r"sparsity must be 0\.5"):
        weights_job(dual_case, tmp_path / "x", sparsity=0.6, pattern="2:4")
    with pytest.raises(ValueError, match="calibration"):
        JobSpec(prune="weights", model="/m", output="/o", method="wanda")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "w1 w2"}\nnot json\n')
    good = weights_job(dual_case, tmp_path / "y")
    calibration = good.calibration.model_copy(update={"general": str(broken)})
    job = good.model_copy(update={"calibration": calibration})
    with pytest.raises(EvalDataError, match="line 2"):
        run_job_spec(job)
    assert not (tmp_path / "y").exists()


def test_an_encoder_is_not_walked(tmp_path):
    from transformers import BertConfig, BertModel

    from tests.models import write_tokenizer

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)  # fmt: skip
    write_tokenizer(bert, 64)
    job = JobSpec(prune="weights", model=str(bert), output=str(tmp_path / "o"), method="magnitude",
                  sparsity=0.5)  # fmt: skip
    with pytest.raises(UnsupportedArchitecture, match="no list of decoder layers"):
        run_job_spec(job)
    assert not (tmp_path / "o").exists()


def test_cancel_stops_between_layers_and_publishes_nothing(dual_case, tmp_path):
    from worker.errors import JobCancelled

    seen: list = []

    def cancel_after_layer_one() -> bool:
        return any(p.stage == "prune" and p.tensors_done >= 1 for p in seen)

    with pytest.raises(JobCancelled):
        run_job_spec(weights_job(dual_case, tmp_path / "cancelled"), seen.append,
                     cancel_after_layer_one)  # fmt: skip
    assert [p.tensors_done for p in seen if p.stage == "prune"] == [0, 1]
    assert not (tmp_path / "cancelled").exists()
    assert not list(tmp_path.iterdir())  # no staging directory left behind


def test_hidden_states_on_disk_give_the_same_bytes(dual_case, tmp_path, monkeypatch):
    run_job_spec(weights_job(dual_case, tmp_path / "memory"))
    monkeypatch.setenv("FAPM_CALIBRATION_BUDGET", "0")  # nothing fits: both stores on disk
    report = run_job_spec(weights_job(dual_case, tmp_path / "disk")).report
    assert report["calibration"]["hidden_on_disk"] and report["calibration"]["hidden_bytes"] > 0
    assert (tmp_path / "disk" / "model.safetensors").read_bytes() == (
        tmp_path / "memory" / "model.safetensors"
    ).read_bytes()
    assert not list((tmp_path / "disk").glob("fapm-hidden-*"))  # the scratch files are gone
