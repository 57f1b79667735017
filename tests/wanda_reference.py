"""An independent Wanda, transcribed from the paper's code (locuslab/wanda `lib/prune.py`,
`lib/layerwrapper.py`, as RESEARCH-methods-wave2.md section 3.5 quotes it), for the tests: the
whole model loaded by transformers in float32, a catcher on layer 0, per-layer hooks keeping the
running `scaler_row`, per-row stable sort and prune of the lowest `int(d_in * s)` scores, and a
re-forward through the pruned layer. It shares no code with worker/compress/."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _Stop(Exception):
    pass


def wanda_masks(model_dir: Path, sequences: list[list[int]], sparsity: float) -> dict:
    """{checkpoint name of each decoder Linear's weight: keep mask (bool)} and the scores."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    inps: list[torch.Tensor] = []
    kws: list[dict] = []
    first = layers[0]

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.attention_type = getattr(module, "attention_type", None)

        def forward(self, x, *args, **kwargs):
            inps.append(x)
            kws.append(kwargs)
            raise _Stop

    layers[0] = Catcher(first)
    with torch.no_grad():
        for ids in sequences:
            try:
                model(torch.tensor([ids]), use_cache=False)
            except _Stop:
                pass
    layers[0] = first
    masks, scores = {}, {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            scaler = {n: torch.zeros(m.in_features) for n, m in subset.items()}
            nsamples = dict.fromkeys(subset, 0)

            def add_batch(name, scaler=scaler, nsamples=nsamples):
                def hook(_module, inp, _out):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).t().type(torch.float32)
                    tmp = 1
                    scaler[name] *= nsamples[name] / (nsamples[name] + tmp)
                    nsamples[name] += tmp
                    scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / nsamples[name]

                return hook

            handles = [subset[n].register_forward_hook(add_batch(n)) for n in subset]
            for j in range(len(inps)):
                layer(inps[j], **kws[j])
            for h in handles:
                h.remove()
            for name, module in subset.items():
                w = module.weight.data
                metric = torch.abs(w) * torch.sqrt(scaler[name].reshape((1, -1)))
                pruned = torch.zeros_like(metric, dtype=torch.bool)
                order = torch.sort(metric, dim=-1, stable=True)[1]
                pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
                w[pruned] = 0
                masks[f"model.layers.{i}.{name}.weight"] = ~pruned
                scores[f"model.layers.{i}.{name}.weight"] = metric
            for j in range(len(inps)):
                out = layer(inps[j], **kws[j])
                inps[j] = out[0] if isinstance(out, tuple) else out
    return {"masks": masks, "scores": scores}
