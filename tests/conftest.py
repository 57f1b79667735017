"""Session-wide fixtures: tiny real checkpoints built once per test session (see tests/models.py).

transformers and peft are imported only when a fixture is first used, so pure unit tests stay
fast. Fixtures hand out directories; tests must not modify them (copy them first if needed).
"""

from __future__ import annotations

import pytest
import torch

from tests.models import LoraCase, ModelPair, make_llama_pair, make_lora_adapter


@pytest.fixture(scope="session", autouse=True)
def _digest_cache_of_this_session(tmp_path_factory):
    """Input digests that jobs remember (worker/io/digest_cache.py) go to a directory of this
    session, for this process and the workers it starts, not to the user's ~/.cache."""
    import os

    previous = os.environ.get("FAPM_DIGEST_CACHE")
    os.environ["FAPM_DIGEST_CACHE"] = str(tmp_path_factory.mktemp("digest-cache"))
    yield
    if previous is None:
        os.environ.pop("FAPM_DIGEST_CACHE", None)
    else:
        os.environ["FAPM_DIGEST_CACHE"] = previous


# Each tensor of the tiny model is at most 128 x 32 entries (8 KiB in bf16), so a 12 KB shard
# limit splits the bf16 checkpoint into several shards (6 with the default sizes).
SMALL_SHARD_SIZE = "12KB"


@pytest.fixture(scope="session")
def bf16_pair(tmp_path_factory) -> ModelPair:
    return make_llama_pair(tmp_path_factory.mktemp("bf16_pair"), dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def fp16_pair(tmp_path_factory) -> ModelPair:
    return make_llama_pair(tmp_path_factory.mktemp("fp16_pair"), dtype=torch.float16, seed=2)


@pytest.fixture(scope="session")
def fp32_pair(tmp_path_factory) -> ModelPair:
    return make_llama_pair(tmp_path_factory.mktemp("fp32_pair"), dtype=torch.float32, seed=3)


@pytest.fixture(scope="session")
def sharded_pair(tmp_path_factory) -> ModelPair:
    pair = make_llama_pair(
        tmp_path_factory.mktemp("sharded_pair"),
        dtype=torch.bfloat16,
        seed=4,
        shard_size=SMALL_SHARD_SIZE,
    )
    assert len(pair.shards("base")) >= 3 and len(pair.shards("finetuned")) >= 3
    return pair


@pytest.fixture(scope="session")
def tied_pair(tmp_path_factory) -> ModelPair:
    """tie_word_embeddings: lm_head.weight is not stored, only model.embed_tokens.weight."""
    return make_llama_pair(
        tmp_path_factory.mktemp("tied_pair"),
        dtype=torch.bfloat16,
        seed=5,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def added_vocab_pair(tmp_path_factory) -> ModelPair:
    """The fine-tuned model has 8 more vocabulary rows in embed_tokens and lm_head."""
    return make_llama_pair(
        tmp_path_factory.mktemp("added_vocab_pair"),
        dtype=torch.bfloat16,
        seed=6,
        extra_vocab=8,
    )


@pytest.fixture(scope="session")
def lora_fp32(tmp_path_factory, fp32_pair) -> LoraCase:
    """A rank-4 LoRA adapter (alpha 8) on q_proj, v_proj and down_proj of the fp32 base.

    `tests.models.lora_merged_state_dict(case.base, case.adapter)` gives peft's own merge.
    """
    return make_lora_adapter(
        fp32_pair.base, tmp_path_factory.mktemp("lora_fp32") / "adapter", r=4, alpha=8, seed=7
    )
