"""`magnitude` agrees with mergekit `ties` (one model, density = 1 - s, normalize: false).

Where they can differ, and why the data here avoids it:
- mergekit keeps k = int(density * n) by a full, unstable argsort; we keep floor(density * n + 0.5)
  with ties to the lower index. Every tensor here has density * n integral, and the float32 noise
  leaves no ties at the threshold, so both keep the same entries. (On bf16 data, where |D| ties are
  common, mergekit's unstable sort picks arbitrary ties and the masks differ there.)
- mergekit writes W + mask * (F - W) computed in float32, which can differ from F in the last bit;
  we select F exactly. So values are compared to float32 rounding and kept sets exactly.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.models import load_state_dict
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_magnitude_matches_mergekit_ties(fp32_pair, tmp_path, sparsity):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    density = 1 - sparsity
    base, ft = load_state_dict(fp32_pair.base), load_state_dict(fp32_pair.finetuned)
    assert all((density * t.numel()).is_integer() for t in ft.values())

    config = MergeConfiguration.model_validate(
        yaml.safe_load(
            f"""
            merge_method: ties
            base_model: {fp32_pair.base}
            models:
              - model: {fp32_pair.finetuned}
                parameters: {{weight: 1.0, density: {density}}}
            parameters: {{normalize: false}}
            dtype: float32
            """
        )
    )
    mergekit_out = tmp_path / "mergekit"
    run_merge(config, str(mergekit_out), MergeOptions(copy_tokenizer=False, quiet=True))
    ours_out = tmp_path / "ours"
    run_prune(JobSpec(base=str(fp32_pair.base), finetuned=str(fp32_pair.finetuned),
                      output=str(ours_out), method="magnitude", sparsity=sparsity))  # fmt: skip

    theirs, ours = load_state_dict(mergekit_out), load_state_dict(ours_out)
    assert set(theirs) == set(ours)
    compared = 0
    for name, w in base.items():
        d = ft[name] - w
        ours_kept = ours[name] != w
        theirs_kept = theirs[name] != w
        # An update too small to change W in float32 is invisible in either output.
        visible = (w + d) != w
        assert torch.equal(ours_kept & visible, theirs_kept & visible), name
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-6, atol=1e-8)
        compared += int(ours_kept.sum())
    assert compared > 0
