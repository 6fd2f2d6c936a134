"""Training speed under bf16 autocast with peft casting each LoRA input to the LoRA weights' float32, or not.

    .venv/bin/python bench/lora_input_cast_speed.py

peft's LoRA layers cast their input to the dtype of their weights (float32, for the optimizer) before the
A matrix; under bf16 autocast the A matrix's matmul casts it straight back to bf16. Where the input is
already bf16 (o_proj's and down_proj's, which come out of bf16 matmuls) that is two copies, and two more in
the backward pass, for the same numbers. Both settings run the product's training step
(``answer_only_trainer``'s loss with the shared prompt beginning once per batch, backward, AdamW) under bf16
autocast on the same Banking77 batches (bench/shared_prefix_speed.py's), on two copies of the same seeded
LoRA model set up as `distill train` sets it up under bf16 (frozen linear weights stored in bf16, eager
attention); one of them has peft's input casting off (``skip_lora_input_casts``). Rounds alternate the
settings and flip their order each round; round 1 is a warm-up. Prints both settings' loss and largest
LoRA-gradient difference on the first batch (zero: the matmuls see the same numbers), training tokens/s
(non-padding), the median of the other rounds for each setting and their ratio.
Results: bench/RESULTS-distill.md ("The divergence settled, ...": peft's LoRA input casts).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_prefix_speed import batches, race_models  # noqa: E402 (puts the project on sys.path)

SETTINGS = ("peft casts", "no casts")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.set_defaults(long_prompt=False)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    import torch
    from transformers import Trainer

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.config import TrainConfig
    from distill.training.train import (answer_only_trainer, load_lora_model, load_tokenizer, set_attention,
                                        skip_lora_input_casts, store_frozen_linears_in_bf16)

    args = parse(argv)
    base = resolve_base(DEFAULT_BASE)
    data = batches(args, load_tokenizer(base))
    cfg = TrainConfig(path="banking77/intents")
    trainer_class = answer_only_trainer(Trainer)
    trainer = trainer_class.__new__(trainer_class)
    models = {}
    for name in SETTINGS:
        models[name] = model = load_lora_model(base, cfg)
        model.train()
        store_frozen_linears_in_bf16(model)
        set_attention(model, bf16=True)
        if name == "no casts":
            print(f"peft's input casting off in {skip_lora_input_casts(model)} LoRA layers", flush=True)
    losses, grads = [], []
    for model in models.values():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, dict(data[0]))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    largest = max(float((a - b).abs().max()) for a, b in zip(*grads))
    print(f"first-batch loss: {losses}; largest LoRA-gradient difference {largest:.3g}", flush=True)

    medians = race_models(trainer, models, data, args.rounds, bf16=True)
    print(f"ratio no casts / peft casts: {medians['no casts'] / medians['peft casts']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
