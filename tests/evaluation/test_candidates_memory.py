"""The candidate builder's process memory: W and F stay mapped on the host, and over the rank
budget no ranking is held, so building candidates of a model costs far less than the 4 bytes per
parameter that holding one method's ranks (the old design, always) takes.

Measured as the process's anonymous resident memory (RssAnon of /proc/self/status): the mapped
inputs are page cache (RssFile), which the kernel can drop; ranks, copies of the inputs and any
other allocation the builder keeps are anonymous. tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import copy
import ctypes
import gc

import pytest
import torch

from tests import memory_sampler
from tests.models import load_state_dict
from worker.engine.pipeline import run_prune
from worker.evaluation.candidates import CandidateBuilder, rank_budget
from worker.spec import JobSpec

CPU = torch.device("cpu")
MIB = 2**20


def rss_anon() -> int:
    """The process's anonymous resident bytes (RssAnon), after a collection and with the C
    heap's free memory given back (else freed blocks stay resident and new ones reuse them
    unseen, both ways blurring what is held)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return memory_sampler.rss_anon()


TENSORS, SHAPE = 48, (512, 512)  # 12.6M parameters, 0.26M per tensor


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[JobSpec, torch.nn.Module]:
    """A bf16 pair of 12.6M parameters in many small tensors, so that its ranks (48 MiB) dwarf
    any one tensor's working memory; the fine-tune a perturbed copy. The returned module is the
    work model candidates go into (its parameters are the checkpoint's tensors, by name)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("memory_pair")
    generator = torch.Generator().manual_seed(0)
    base = {
        f"layers.{i}.weight": torch.randn(SHAPE, generator=generator).to(torch.bfloat16)
        for i in range(TENSORS)
    }
    finetuned = {
        name: (w.float() + 0.01 * torch.randn(SHAPE, generator=generator)).to(torch.bfloat16)
        for name, w in base.items()
    }
    for name, tensors in (("base", base), ("finetuned", finetuned)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"))
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(
        torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False, dtype=torch.bfloat16)
        for _ in range(TENSORS)
    )
    spec = JobSpec(
        base=str(root / "base"),
        finetuned=str(root / "finetuned"),
        output=str(root / "unused"),
        method="fapm",
        sparsity=0.5,
        device="cpu",
    )
    return spec, model


def build_and_write(spec, model, budget: int | None) -> tuple[int, CandidateBuilder]:
    """Extra anonymous memory of a builder that wrote a fapm and a magnitude candidate (the
    builder is still alive when it is measured)."""
    before = rss_anon()
    builder = CandidateBuilder(spec, model, CPU, rank_budget_bytes=budget)
    for method in ("fapm", "magnitude"):
        builder.write(method, 0.5)
    return rss_anon() - before, builder


def test_over_the_budget_the_builder_holds_no_ranks_and_no_copy_of_the_inputs(pair):
    spec, model = pair
    # Warm-up outside the measure: the numba kernel's compilation, torch's thread pools, the
    # allocator's first arenas.
    _, warm = build_and_write(spec, model, 0)
    del warm
    rank_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert rank_bytes > 40 * MIB  # the model is big enough for the ranks to be noticed
    budget = rank_bytes // 3

    extra, builder = build_and_write(spec, model, budget)
    assert builder.mode == "per-tensor" and builder.rank_bytes == rank_bytes
    assert builder.memory()["held_rank_bytes"] == 0 and builder.inputs_mapped
    # The builder keeps W and F of the whole model (twice the model's 24 MiB) yet holds far
    # less than the budget, which one method's ranks alone (the old design) exceed 3 times.
    assert builder.input_bytes > rank_bytes // 2
    assert extra < budget, f"{extra / MIB:.1f} MiB over a budget of {budget / MIB:.1f} MiB"
    del builder

    # The same measure sees the ranks when they are held: it could fail.
    extra, builder = build_and_write(spec, model, None)
    assert builder.mode == "ranks-host"
    assert builder.memory()["held_rank_bytes"] == rank_bytes
    assert extra > budget, f"{extra / MIB:.1f} MiB; the ranks take {rank_bytes / MIB:.1f} MiB"


def test_the_rank_budget_setting(monkeypatch):
    assert rank_budget("8GB") == 8 * 10**9 and rank_budget("512MiB") == 512 * MIB
    assert rank_budget("0") == 0
    assert 0 < rank_budget("25%") <= rank_budget("100%")
    monkeypatch.setenv("FAPM_EVAL_RANK_BUDGET", "3MB")
    assert rank_budget() == 3 * 10**6
    monkeypatch.delenv("FAPM_EVAL_RANK_BUDGET")
    assert rank_budget() > 0  # 25% of the available memory by default
    for bad in ("lots", "150%", "-1GB"):
        with pytest.raises(ValueError, match="FAPM_EVAL_RANK_BUDGET"):
            rank_budget(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_inputs_stay_on_the_host(pair, tmp_path):
    """The old design held W and F (48 MiB here) and the ranks (48 MiB) on the device."""
    spec, model = pair
    cuda = torch.device("cuda")
    spec = spec.model_copy(update={"device": "cuda"})
    work = copy.deepcopy(model).to(cuda)
    out = tmp_path / "out"
    run_prune(JobSpec.model_validate({**spec.model_dump(), "output": str(out)}))
    published = load_state_dict(out)
    for budget, mode, held in ((0, "per-tensor", 0), (None, "ranks-device", 48 * MIB)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(cuda)
        builder = CandidateBuilder(spec, work, cuda, rank_budget_bytes=budget)
        builder.write("fapm", 0.5)  # the spec's method and sparsity
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated(cuda) - before
        assert builder.mode == mode and builder.memory()["held_rank_bytes"] == held
        assert held <= extra < held + 4 * MIB, (mode, extra / MIB)
        for name, param in work.named_parameters():
            assert torch.equal(param.detach().cpu(), published[name]), (mode, name)
        del builder
