"""Training speed with and without computing the batch's shared prompt beginning once, side by side.

    .venv/bin/python bench/shared_prefix_speed.py                      # short prompt, LoRA on every layer
    .venv/bin/python bench/shared_prefix_speed.py --long-prompt        # the app's own system prompt
    .venv/bin/python bench/shared_prefix_speed.py --lora-layers 10

Both settings run the product's training step (``answer_only_trainer``'s loss, backward, AdamW) on
the same Banking77 batches, collated as ``make_trainer`` does (16 training texts each, the
distillation benchmark's prompt), on two copies of the same seeded LoRA model. Rounds alternate the
settings and flip their order each round; round 1 is a warm-up. Prints training tokens/s
(non-padding, the prefix counted in every example as the Trainer counts it), the median of the
other rounds for each setting, their ratio, and the largest difference between the two settings'
losses on the first batch. Results: bench/RESULTS-distill.md ("Shared prompt beginning").
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_banking77 import DATA, SHORT_PROMPT, app_system_prompt  # noqa: E402 (puts the project on sys.path)

SETTINGS = {"once per batch": True, "once per example": False}


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-prompt", action="store_true", help="train with the app's own system prompt")
    parser.add_argument("--lora-layers", type=int, default=None, help="LoRA in the upper N layers only")
    parser.add_argument("--batches", type=int, default=6, help="batches per setting and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def batches(args, tokenizer, grouped: bool = False) -> list[dict]:
    """``args.batches`` batches of ``args.batch_size`` training texts: the first ones after a seeded shuffle, or
    (``grouped``) batches spread over an epoch of all of them grouped by length as `distill train` groups them
    (transformers' ``LengthGroupedSampler``, seed 0)."""
    from transformers import DataCollatorForSeq2Seq

    from distill.training.data import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    prompt = app_system_prompt() if args.long_prompt else SHORT_PROMPT
    rows = list(csv.DictReader(open(DATA / "train.csv")))
    random.Random(0).shuffle(rows)
    rows = rows if grouped else rows[:args.batch_size * args.batches]
    examples = [encoder.encode([{"role": "system", "content": prompt}, {"role": "user", "content": row["text"]}],
                               json.dumps({"intent": row["category"]}))
                for row in rows]
    if grouped:
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(args.batch_size, lengths=[len(e["input_ids"]) for e in examples],
                                          generator=torch.Generator().manual_seed(0)))
        every = len(order) // args.batch_size // args.batches
        examples = [examples[i] for b in range(args.batches)
                    for i in order[b * every * args.batch_size:][:args.batch_size]]
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return [collate(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]


def training_step(trainer, model, optimizer, bf16: bool = False) -> Callable[[dict], None]:
    """The product's training step on one batch: ``trainer``'s answer-only loss (under bf16 autocast if
    ``bf16``), backward, the optimizer's update."""
    import torch

    def one(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return one


def race(steps: dict[str, Callable[[dict], None]], data: list[dict], rounds: int) -> dict[str, float]:
    """Training tokens/s of each setting's step over ``data``: rounds alternate the settings and flip their
    order each round; prints every round; returns the median of rounds 2 on (round 1 warms up)."""
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_ in range(rounds):
        for name in order:
            tokens, started = 0, time.perf_counter()
            for batch in data:
                steps[name](batch)
                tokens += int(batch["attention_mask"].sum())
            speeds[name].append(tokens / (time.perf_counter() - started))
            print(f"round {round_ + 1} {name}: {speeds[name][-1]:.0f} tokens/s", flush=True)
        order.reverse()
    medians = {name: statistics.median(values[1:] or values) for name, values in speeds.items()}
    for name, value in medians.items():
        print(f"{name:20s} rounds {[round(v) for v in speeds[name]]} median {value:.0f} tokens/s")
    return medians


def main(argv: list[str]) -> int:
    import torch
    from transformers import Trainer

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.config import TrainConfig
    from distill.training.train import answer_only_trainer, load_lora_model, load_tokenizer, shared_prefix

    args = parse(argv)
    base = resolve_base(DEFAULT_BASE)
    tokenizer = load_tokenizer(base)
    data = batches(args, tokenizer)
    first = data[0]
    print(f"{len(data)} batches of {args.batch_size}; first batch: {first['input_ids'].shape[1]} columns, "
          f"shared beginning {shared_prefix(first['input_ids'], first['attention_mask'], first['labels'])} tokens; "
          f"mean example {statistics.mean(int(b['attention_mask'].sum()) for b in data) / args.batch_size:.1f} tokens",
          flush=True)
    cfg = TrainConfig(path="banking77/intents", lora_layers=args.lora_layers, learning_rate=1e-3)
    steppers = {}
    for name, share in SETTINGS.items():
        model = load_lora_model(base, cfg)
        model.train()
        trainer_class = answer_only_trainer(Trainer, share_prefix=share)
        trainer = trainer_class.__new__(trainer_class)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
        steppers[name] = (model, trainer, optimizer)
    with torch.no_grad():
        losses = [float(t.compute_loss(m, dict(first))) for m, t, _ in steppers.values()]
    print(f"first-batch loss: {losses}, largest difference {max(losses) - min(losses):.2e}", flush=True)

    medians = race({name: training_step(trainer, model, optimizer) for name, (model, trainer, optimizer)
                    in steppers.items()}, data, args.rounds)
    print(f"ratio once per batch / once per example: {medians['once per batch'] / medians['once per example']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
