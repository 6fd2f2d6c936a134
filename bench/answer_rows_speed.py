"""Training speed with the output head at each example's answer positions, and with the norms' outputs cast once.

    .venv/bin/python bench/answer_rows_speed.py

Three settings run the product's training step (the answer-only loss with the shared prompt beginning once
per batch, backward, AdamW) under bf16 autocast on the same Banking77 batches, spread over an epoch grouped by
length as `distill train` groups them (bench/shared_prefix_speed.py's ``batches(grouped=True)``),
on three copies of the same seeded LoRA model set up as `distill train` sets it up under bf16 (frozen linear
weights stored in bf16, peft's LoRA input casts off, eager attention):

- "columns": the output head at every column where some example of the batch has an answer token (the loss
  before ``answer_logits``, copied here as the reference);
- "answer rows": the product's loss, the head at each example's own answer positions only;
- "rows + norms": the same, and ``cast_norm_outputs_once``: the decoder layers' norm outputs go on in bf16.

Rounds alternate the settings and flip their order each round; round 1 is a warm-up. Prints each setting's
loss and largest LoRA-gradient difference from "columns" and from float32 without autocast on the first batch
(the LoRA B matrices: A's gradients are 0 while B is at its initial 0), training tokens/s
(non-padding), the median of the other rounds for each setting and the ratios to "columns". The models are
loaded one after the other in one process; the one loaded first ran slower (RESULTS), so run it both ways
(``--reverse``).
Results: bench/RESULTS-distill.md ("The output head at the answer rows").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_prefix_speed import batches, race, training_step  # noqa: E402 (puts the project on sys.path)

SETTINGS = ("columns", "answer rows", "rows + norms")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reverse", action="store_true",
                        help="load the models in reverse order (the first one loaded ran slower here)")
    parser.set_defaults(long_prompt=False)
    return parser.parse_args(argv)


def columns_trainer(trainer_class):
    """The answer-only loss as it was before ``answer_logits``: logits at the union of the answer columns."""
    from distill.training.data import IGNORE_INDEX
    from distill.training.train import shared_prefix

    class ColumnsTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = labels[:, 1:]
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
            prefix = shared_prefix(inputs["input_ids"], inputs.get("attention_mask"), labels)
            ids = inputs.pop("input_ids")
            cache = model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1).cache
            cache.batch_repeat_interleave(ids.shape[0])
            outputs = model(input_ids=ids[:, prefix:], cache=cache, use_cache=True, logits_to_keep=keep - prefix,
                            **inputs)
            targets = targets[:, keep]
            loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            return loss / (targets != IGNORE_INDEX).sum().clamp(min=1)

    return ColumnsTrainer


def main(argv: list[str]) -> int:
    import torch
    from transformers import Trainer

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.config import TrainConfig
    from distill.training.train import (answer_only_trainer, cast_norm_outputs_once, load_lora_model, load_tokenizer,
                                        set_attention, skip_lora_input_casts, store_frozen_linears_in_bf16)

    args = parse(argv)
    base = resolve_base(DEFAULT_BASE)
    data = batches(args, load_tokenizer(base), grouped=True)
    cfg = TrainConfig(path="banking77/intents")
    steps, losses, grads = {}, {}, {}
    for name in SETTINGS[::-1] if args.reverse else SETTINGS:
        model = load_lora_model(base, cfg)
        model.train()
        store_frozen_linears_in_bf16(model)
        skip_lora_input_casts(model)
        set_attention(model, bf16=True)
        if name == "rows + norms":
            print(f"norms cast once: {cast_norm_outputs_once(model)}")
        trainer_class = columns_trainer(Trainer) if name == "columns" else answer_only_trainer(Trainer)
        trainer = trainer_class.__new__(trainer_class)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, dict(data[0]))
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
        steps[name] = training_step(trainer, model, optimizer, bf16=True)
    reference = load_lora_model(base, cfg)  # float32 throughout, no autocast: the exact gradients
    set_attention(reference, bf16=False)
    reference.train()
    product = answer_only_trainer(Trainer)
    product.__new__(product).compute_loss(reference, dict(data[0])).backward()
    exact = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    def largest_difference(got: dict, want: dict) -> float:
        return max(float((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in want.items())

    for name in SETTINGS:
        print(f"{name:14s} first-batch loss {losses[name]:.6f}; largest LoRA-gradient difference, relative to the "
              f"tensor's largest: from columns {largest_difference(grads[name], grads['columns']):.2e}, "
              f"from float32 {largest_difference(grads[name], exact):.2e}")
    medians = race({name: steps[name] for name in SETTINGS}, data, args.rounds)
    for name in SETTINGS[1:]:
        print(f"ratio {name} / columns: {medians[name] / medians['columns']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
