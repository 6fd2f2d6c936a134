"""Training speed with PyTorch's fused attention (SDPA) or transformers' eager attention, side by side.

    .venv/bin/python bench/attention_speed.py                                  # short prompt, bf16 autocast
    .venv/bin/python bench/attention_speed.py --long-prompt --batch-size 4     # the app's own system prompt
    .venv/bin/python bench/attention_speed.py --fp32                           # without autocast

Both settings run the product's training step (``answer_only_trainer``'s loss with the shared prompt
beginning once per batch, backward, AdamW) on the same Banking77 batches (bench/shared_prefix_speed.py's),
on two copies of the same seeded LoRA model (all layers, rank 16), loaded with
``attn_implementation="sdpa"`` (transformers' default: on a CPU, PyTorch's flash-attention kernel) or
``"eager"`` (two matmuls and a softmax). Under bf16 autocast the frozen linear weights are stored in
bf16, as `distill train` does. Rounds alternate the settings and flip their order each round; round 1
is a warm-up. Prints training tokens/s (non-padding), the median of the other rounds for each
setting, their ratio, and both settings' losses on the first batch.
Results: bench/RESULTS-distill.md ("Eager attention").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_prefix_speed import batches, first_batch_losses, race_models  # noqa: E402 (puts the project on sys.path)

SETTINGS = ("sdpa", "eager")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-prompt", action="store_true", help="train with the app's own system prompt")
    parser.add_argument("--fp32", action="store_true", help="float32, no bf16 autocast")
    parser.add_argument("--batches", type=int, default=6, help="batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, set_seed

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.train import answer_only_trainer, load_tokenizer, store_frozen_linears_in_bf16

    args = parse(argv)
    base = resolve_base(DEFAULT_BASE)
    data = batches(args, load_tokenizer(base))
    trainer_class = answer_only_trainer(Trainer)
    trainer = trainer_class.__new__(trainer_class)

    models = {}
    for name in SETTINGS:
        set_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base.location, dtype=torch.float32, attn_implementation=name)
        models[name] = model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
        model.train()
        if not args.fp32:
            store_frozen_linears_in_bf16(model)
    print(f"first-batch loss: {first_batch_losses(trainer, models, data[0], bf16=not args.fp32)}", flush=True)

    medians = race_models(trainer, models, data, args.rounds, bf16=not args.fp32)
    print(f"ratio eager / sdpa: {medians['eager'] / medians['sdpa']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
