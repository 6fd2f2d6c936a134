"""Training speed under bf16 autocast with the frozen linear weights cast on every pass, or stored in bf16.

    .venv/bin/python bench/bf16_weights_speed.py                      # short prompt, LoRA on every layer
    .venv/bin/python bench/bf16_weights_speed.py --lora-layers 10 --rounds 7

Both settings run the product's training step (``answer_only_trainer``'s loss with the shared
prompt beginning once per batch, backward, AdamW) under bf16 autocast on the same Banking77
batches (bench/shared_prefix_speed.py's), on two copies of the same seeded LoRA model; one of them
gets ``store_frozen_linears_in_bf16`` as `distill train` does when it chooses bf16. Rounds alternate
the settings and flip their order each round; round 1 is a warm-up. Prints training tokens/s
(non-padding), the median of the other rounds for each setting, their ratio, and the two
settings' losses on the first batch (equal: the matmuls see the same numbers).
Results: bench/RESULTS-distill.md ("Frozen weights stored in bf16").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_prefix_speed import batches, first_batch_losses, race_models  # noqa: E402 (puts the project on sys.path)

SETTINGS = ("cast on every pass", "stored in bf16")


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-layers", type=int, default=None, help="LoRA in the upper N layers only")
    parser.add_argument("--batches", type=int, default=6, help="batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.set_defaults(long_prompt=False)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from transformers import Trainer

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.config import TrainConfig
    from distill.training.train import (answer_only_trainer, load_lora_model, load_tokenizer,
                                        store_frozen_linears_in_bf16)

    args = parse(argv)
    base = resolve_base(DEFAULT_BASE)
    data = batches(args, load_tokenizer(base))
    cfg = TrainConfig(path="banking77/intents", lora_layers=args.lora_layers)
    trainer_class = answer_only_trainer(Trainer)
    trainer = trainer_class.__new__(trainer_class)
    models = {}
    for name in SETTINGS:
        models[name] = model = load_lora_model(base, cfg)
        model.train()
        if name == "stored in bf16":
            print(f"{store_frozen_linears_in_bf16(model)} linear layers stored in bf16", flush=True)
    print(f"first-batch loss: {first_batch_losses(trainer, models, data[0], bf16=True)}", flush=True)

    medians = race_models(trainer, models, data, args.rounds, bf16=True)
    print(f"ratio stored / cast: {medians['stored in bf16'] / medians['cast on every pass']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
