"""Examples shown in the OpenAPI document (and checked against the models by the tests)."""

from __future__ import annotations

from typing import Any

JOB_ID = "0192f1a3c4d5a1b2c3d4e5f6a7b8c9d0"

JOB_REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "hub_to_s3": {
        "summary": "Fine-tuned model on the Hub, result to S3, webhook when done",
        "value": {
            "base": "hf://meta-llama/Llama-3.1-8B@main",
            "finetuned": "hf://acme/llama-3.1-8b-sft@3f2a9c1",
            "output": "s3://acme-pruned/llama-3.1-8b-sft/",
            "method": "fapm",
            "sparsity": 0.9,
            "webhook": {
                "url": "https://ci.acme.example/hooks/fapm",
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            },
            "labels": {"team": "nlp", "run": "2026-10-01"},
        },
    },
    "local_adapter": {
        "summary": "LoRA adapter on local disk (under FAPM_LOCAL_ROOTS)",
        "value": {
            "base": "file:///models/llama-3.1-8b",
            "adapter": "file:///models/adapters/sft-lora",
            "output": "file:///models/pruned/sft-lora-90",
            "method": "magnitude",
            "sparsity": 0.9,
            "device": "cpu",
        },
    },
    "nps_search": {
        "summary": "NPS: search the task vector's band weights on your sets (arXiv 2505.18713)",
        "value": {
            "base": "hf://meta-llama/Llama-3.1-8B@main",
            "finetuned": "s3://acme-models/llama-3.1-8b-sft/",
            "output": "s3://acme-pruned/llama-3.1-8b-sft-nps/",
            "method": "nps",
            "sparsity": 0.9,
            "nps": {"bands": 8, "generations": 20, "objective": "balanced", "seed": 0},
            "evaluate": {
                "task": "s3://acme-evals/sft/task.jsonl",
                "general": "s3://acme-evals/general.jsonl",
                "max_examples": 200,
            },
        },
    },
}

_SPEC = {
    "base": "hf://meta-llama/Llama-3.1-8B@main",
    "finetuned": "hf://acme/llama-3.1-8b-sft@3f2a9c1",
    "adapter": None,
    "output": "s3://acme-pruned/llama-3.1-8b-sft/",
    "method": "fapm",
    "sparsity": 0.9,
    "alpha": 1.0,
    "gamma": 0.01,
    "scale": 1.0,
    "seed": 0,
    "exclude": None,
    "scope": "tensor",
    "shard_size": 5000000000,
    "device": "auto",
    "dtype": "keep",
    "kernel": "auto",
    "overwrite": False,
}

QUEUED_RECORD: dict[str, Any] = {
    "id": JOB_ID,
    "status": "queued",
    "queue": "gpu",
    "spec": _SPEC,
    "labels": {"team": "nlp"},
    "progress": {
        "stage": "queued",
        "tensors_done": 0,
        "tensors_total": 0,
        "bytes_done": 0,
        "bytes_total": 0,
        "fraction": 0.0,
        "eta_seconds": None,
    },
    "result": None,
    "error": None,
    "webhook": {"url": "https://ci.acme.example/hooks/fapm", "signed": True, "deliveries": []},
    "cancel_requested": False,
    "attempts": 0,
    "created_at": "2026-10-01T12:00:00.000000Z",
    "started_at": None,
    "finished_at": None,
}

RUNNING_RECORD: dict[str, Any] = {
    **QUEUED_RECORD,
    "status": "running",
    "attempts": 1,
    "started_at": "2026-10-01T12:00:02.000000Z",
    "progress": {
        "stage": "prune",
        "tensors_done": 118,
        "tensors_total": 291,
        "bytes_done": 6442450944,
        "bytes_total": 16060522496,
        "fraction": 0.41,
        "eta_seconds": 63.5,
    },
}

SUCCEEDED_RECORD: dict[str, Any] = {
    **QUEUED_RECORD,
    "status": "succeeded",
    "attempts": 1,
    "started_at": "2026-10-01T12:00:02.000000Z",
    "finished_at": "2026-10-01T12:01:50.000000Z",
    "progress": {
        "stage": "done",
        "tensors_done": 291,
        "tensors_total": 291,
        "bytes_done": 16060522496,
        "bytes_total": 16060522496,
        "fraction": 1.0,
        "eta_seconds": 0.0,
    },
    "result": {
        "output": "s3://acme-pruned/llama-3.1-8b-sft/",
        "report": {"tensors": 291, "kept_fraction": 0.1, "shards": 4, "seconds": 108.0},
    },
    "webhook": {
        "url": "https://ci.acme.example/hooks/fapm",
        "signed": True,
        "deliveries": [
            {
                "attempt": 1,
                "at": "2026-10-01T12:01:50.300000Z",
                "status_code": 200,
                "error": None,
                "delivered": True,
                "next_attempt_at": None,
            }
        ],
    },
}

FAILED_RECORD: dict[str, Any] = {
    **QUEUED_RECORD,
    "status": "failed",
    "attempts": 1,
    "started_at": "2026-10-01T12:00:02.000000Z",
    "finished_at": "2026-10-01T12:00:03.000000Z",
    "error": {
        "code": "source_not_found",
        "message": "hf://acme/llama-3.1-8b-sft@3f2a9c1: no such revision",
    },
}

CANCELLED_RECORD: dict[str, Any] = {
    **QUEUED_RECORD,
    "status": "cancelled",
    "finished_at": "2026-10-01T12:00:01.000000Z",
    "error": {"code": "cancelled", "message": "cancelled before it started"},
}

SSE_EXAMPLE = (
    "id: 1727784000000-0\n"
    "event: state\n"
    'data: {"at":"2026-10-01T12:00:00+00:00","status":"queued"}\n\n'
    "id: 1727784002000-0\n"
    "event: state\n"
    'data: {"at":"2026-10-01T12:00:02+00:00","status":"running"}\n\n'
    "id: 1727784003000-0\n"
    "event: progress\n"
    'data: {"bytes_done":6442450944,"bytes_total":16060522496,"eta_seconds":63.5,'
    '"fraction":0.41,"stage":"prune","tensors_done":118,"tensors_total":291}\n\n'
    ": keep-alive\n\n"
    "id: 1727784110000-0\n"
    "event: state\n"
    'data: {"at":"2026-10-01T12:01:50+00:00","result":{"output":"s3://acme-pruned/'
    'llama-3.1-8b-sft/","report":{"shards":4}},"status":"succeeded"}\n\n'
)

EVALUATION_REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "pruned_vs_base": {
        "summary": "Measure a pruned model against its base and fine-tuned reference",
        "value": {
            "base": "hf://meta-llama/Llama-3.1-8B@main",
            "model": "s3://acme-pruned/llama-3.1-8b-sft/",
            "finetuned": "hf://acme/llama-3.1-8b-sft@3f2a9c1",
            "evaluate": {
                "task": "s3://acme-evals/sft/task.jsonl",
                "general": "s3://acme-evals/general.jsonl",
                "max_examples": 500,
            },
            "labels": {"team": "nlp"},
        },
    },
}
