"""The layer-streaming bound: pruning a model many layers deep holds about one layer (in
float32) plus the calibration hidden states, not the model. Measured in a fresh process as the
peak of its anonymous memory (RssAnon, sampled; mapped checkpoint pages are file-backed and the
kernel can drop them) above what it held before the job."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tests.eval_models import write_jsonl
from tests.models import write_tokenizer

REPO = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, INTERMEDIATE, VOCAB = 24, 512, 1536, 256

MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers.models.llama.modeling_llama  # imported before the baseline
    from tests.memory_sampler import PeakAnon
    from worker.spec import JobSpec
    from worker.evaluation.job import run_job_spec

    spec = JobSpec.model_validate_json(sys.argv[1])
    with PeakAnon() as memory:
        report = run_job_spec(spec).report
    print(json.dumps({"growth": memory.growth, "hidden": report["calibration"]["hidden_bytes"]}))
    """
)


def test_peak_memory_is_about_one_layer_not_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    model_dir = tmp_path / "deep"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    write_tokenizer(model_dir, VOCAB)
    general = write_jsonl(
        tmp_path / "general.jsonl",
        [{"text": " ".join(f"w{(7 * i + j) % 200}" for j in range(40))} for i in range(16)],
    )
    spec = {"prune": "weights", "model": str(model_dir), "output": str(tmp_path / "out"),
            "method": "wanda", "sparsity": 0.5,
            "calibration": {"mode": "general", "general": str(general)}}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(spec)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"},
        cwd=REPO,  # where `tests` imports from
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4  # float32
    model_f32 = LAYERS * per_layer
    growth = measured["growth"]
    print(f"peak anon growth {growth / 2**20:.1f} MiB; one layer {per_layer / 2**20:.1f} MiB, "
          f"hidden states {measured['hidden'] / 2**20:.2f} MiB, model {model_f32 / 2**20:.0f} MiB")  # fmt: skip
    # A layer, its scores and masks, its bf16 copy for the writer, the tokenizer and the model
    # classes transformers builds: a few layers' worth (78 MiB measured with 12 and with 24
    # layers), far below the model's 312 MiB; the margin covers the allocator's variation.
    assert growth < 6 * per_layer + measured["hidden"] + 32 * 2**20
    assert growth < model_f32 / 2.5
