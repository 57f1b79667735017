"""Tiny real checkpoints for tests: a Llama base and a fine-tuned copy, and PEFT LoRA adapters.

Everything is built offline from random weights (nothing is downloaded) and saved the way the Hub
stores models: `config.json`, `generation_config.json`, safetensors (sharded with an index when
`shard_size` is small) and a small word-level tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Small enough that every test stays fast on 2 cores: about 29k parameters.
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64
VOCAB = 128

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj", "down_proj")


@dataclass(frozen=True)
class ModelPair:
    """A base checkpoint directory and a fine-tuned one of the same architecture."""

    base: Path
    finetuned: Path
    dtype: torch.dtype
    vocab: int
    extra_vocab: int = 0
    tie_word_embeddings: bool = False

    def shards(self, which: str = "finetuned") -> list[Path]:
        return sorted(Path(getattr(self, which)).glob("*.safetensors"))


@dataclass(frozen=True)
class LoraCase:
    """A base checkpoint and a PEFT LoRA adapter trained (randomized) on top of it."""

    base: Path
    adapter: Path
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


def llama_config(vocab: int = VOCAB, tie_word_embeddings: bool = False, dtype=torch.bfloat16):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=dtype,
    )


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights of a realistic scale (norm weights near 1), a few exact zeros."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(param.shape, generator=generator)
                values[torch.rand(param.shape, generator=generator) < 0.01] = 0.0
            param.copy_(values.to(param.dtype))


def _perturb(
    model: torch.nn.Module, generator: torch.Generator, scale: float, fraction: float
) -> None:
    """Add noise to a random `fraction` of each tensor's entries (the rest keep D == 0 exactly)."""
    with torch.no_grad():
        for _, param in model.named_parameters():
            touched = torch.rand(param.shape, generator=generator) < fraction
            noise = scale * torch.randn(param.shape, generator=generator)
            updated = param.float() + torch.where(touched, noise, torch.zeros_like(noise))
            param.copy_(updated.to(param.dtype))


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level fast tokenizer with `vocab` tokens (w0, w1, ...), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(directory))


def _save(model, directory: Path, shard_size: int | str | None, vocab: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(str(directory), **kwargs)
    if not (directory / "generation_config.json").exists():
        model.generation_config.save_pretrained(str(directory))
    write_tokenizer(directory, vocab)


def make_llama_pair(
    dirs: Path | tuple[Path, Path],
    dtype: torch.dtype = torch.bfloat16,
    vocab: int = VOCAB,
    seed: int = 0,
    shard_size: int | str | None = None,
    finetune_scale: float = 0.01,
    finetune_fraction: float = 0.7,
    tie_word_embeddings: bool = False,
    extra_vocab: int = 0,
) -> ModelPair:
    """Build and save a tiny Llama base and a fine-tuned copy.

    `dirs` is a parent directory (the pair goes to `base/` and `finetuned/` inside it) or a
    (base, finetuned) pair of directories. The fine-tuned model is the base plus noise of
    `finetune_scale` on a random `finetune_fraction` of each tensor's entries; `extra_vocab` rows
    are added to its embeddings (and lm_head) first, as when tokens are added in fine-tuning.
    """
    from transformers import LlamaForCausalLM

    if isinstance(dirs, tuple | list):
        base_dir, ft_dir = (Path(p) for p in dirs)
    else:
        base_dir, ft_dir = Path(dirs) / "base", Path(dirs) / "finetuned"

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module construction draws from the global generator
    config = llama_config(vocab, tie_word_embeddings, dtype)
    model = LlamaForCausalLM(config).to(dtype)
    _randomize(model, generator)
    model.eval()
    _save(model, base_dir, shard_size, vocab)

    if extra_vocab:
        model.resize_token_embeddings(vocab + extra_vocab, mean_resizing=False)
        with torch.no_grad():
            new_rows = 0.02 * torch.randn((extra_vocab, HIDDEN), generator=generator)
            model.get_input_embeddings().weight[vocab:] = new_rows.to(dtype)
            if not tie_word_embeddings:
                out_rows = 0.02 * torch.randn((extra_vocab, HIDDEN), generator=generator)
                model.get_output_embeddings().weight[vocab:] = out_rows.to(dtype)
    _perturb(model, generator, finetune_scale, finetune_fraction)
    _save(model, ft_dir, shard_size, vocab + extra_vocab)
    return ModelPair(
        base=base_dir,
        finetuned=ft_dir,
        dtype=dtype,
        vocab=vocab,
        extra_vocab=extra_vocab,
        tie_word_embeddings=tie_word_embeddings,
    )


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def make_lora_adapter(
    base_dir: Path,
    adapter_dir: Path,
    r: int = 4,
    alpha: float = 8,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LoraCase:
    """Save a PEFT LoRA adapter for the model in `base_dir` with a nonzero update.

    peft initializes lora_B to zero (a no-op adapter); both A and B are randomized here.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_((0.1 * torch.randn(param.shape, generator=generator)).to(param.dtype))
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(adapter_dir))
    return LoraCase(
        base=Path(base_dir),
        adapter=Path(adapter_dir),
        r=r,
        alpha=float(alpha),
        target_modules=tuple(target_modules),
        use_rslora=use_rslora,
    )


def lora_merged_state_dict(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """peft's own `merge_and_unload()` of the adapter into the base: the dense merged weights."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
