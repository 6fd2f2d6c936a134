"""Training speed of `distill train`'s bf16 step against the same step with one of its choices undone, each run in
fresh processes, side by side.

    .venv/bin/python bench/step_speed.py                                   # every setting below
    .venv/bin/python bench/step_speed.py --settings product,sdpa --rounds 7
    .venv/bin/python bench/step_speed.py --long-prompt --batch-size 4     # the app's own system prompt

Settings (each one differs from "product" in one choice):

- product: the step as `distill train` runs it under bf16 autocast: the frozen linear weights stored in bf16
  (``store_frozen_linears_in_bf16``), peft's LoRA input casts off (``skip_lora_input_casts``), the decoder
  layers' norm outputs cast once (``cast_norm_outputs_once``), eager attention (``set_attention``), the output
  head at each example's answer positions (``answer_only_trainer``, the shared prompt beginning once per batch);
- sdpa: PyTorch's fused attention instead of eager;
- weights cast each pass: the frozen linear weights kept in float32, cast by autocast on every pass;
- peft casts: peft casts each LoRA input to float32 (and autocast back to bf16);
- norms per consumer: autocast casts each norm output once per linear layer that reads it;
- columns: the output head at every column where some example of the batch has an answer token (the loss
  before ``answer_logits``, copied here as the reference);
- float32: no autocast (SDPA, as `distill train` runs float32), the same loss;
- float32 eager: the same with eager attention.

Every setting runs the product's training step (loss, backward, AdamW) on the same Banking77 batches, spread
over an epoch grouped by length as `distill train` groups them (bench/shared_prefix_speed.py's
``batches(grouped=True)``), from the same seeded LoRA model (all layers, rank 16). Every run is a fresh process:
it loads its model, runs two warm-up batches and times the others. Races that loaded every model into one
process were biased: the model loaded first ran slower (up to 1.1x; RESULTS "The output head at the answer
rows"), whichever setting it was. A round runs "product" first, last and between every two other settings
(their order reversed every other round), and each other setting is compared with the mean of the product
runs on either side of it: this machine's speed drifts by 10 % and more within minutes, so a ratio of
medians over far-apart runs is not to be trusted.

Prints each setting's first-batch loss and its largest LoRA-gradient difference, relative to the tensor's
largest, from "product" and from "float32" (the LoRA B matrices: A's gradients are 0 while B is at its initial
0); then training tokens/s (non-padding) of every run and each setting's ratio to its neighbouring product
runs, per round and the median.
Results: bench/RESULTS-distill.md ("Every step choice raced in fresh processes").
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_prefix_speed import batches, training_step  # noqa: E402 (puts the project on sys.path)

SETTINGS = ("product", "sdpa", "weights cast each pass", "peft casts", "norms per consumer", "columns", "float32",
            "float32 eager")
WARM_UP_BATCHES = 2


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from: {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--batches", type=int, default=8, help=f"batches per process ({WARM_UP_BATCHES} warm up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-prompt", action="store_true", help="train with the app's own system prompt")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--gradients", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",")]
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    if "product" not in args.settings:
        args.settings.insert(0, "product")
    if args.batches <= WARM_UP_BATCHES:
        parser.error(f"--batches must be more than the {WARM_UP_BATCHES} warm-up batches")
    return args


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


def worker(args) -> dict:
    """One setting in this process: the first batch's loss and LoRA gradients (saved to ``args.gradients`` if
    given), then the timed steps. Returns the numbers as a dict."""
    import torch
    from transformers import Trainer

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.config import TrainConfig
    from distill.training.train import (answer_only_trainer, cast_norm_outputs_once, load_lora_model,
                                        set_attention, skip_lora_input_casts, store_frozen_linears_in_bf16)

    setting = args.worker
    base = resolve_base(DEFAULT_BASE)
    data = torch.load(args.data)
    cfg = TrainConfig(path="banking77/intents")
    model = load_lora_model(base, cfg)
    model.train()
    bf16 = not setting.startswith("float32")
    if bf16:  # as distill train's train() sets the model up, less the setting's one choice
        if setting != "weights cast each pass":
            store_frozen_linears_in_bf16(model)
        if setting != "peft casts":
            skip_lora_input_casts(model)
        if setting != "norms per consumer":
            cast_norm_outputs_once(model)
    attention = set_attention(model, bf16, {"sdpa": "sdpa", "float32 eager": "eager"}.get(setting, "auto"))
    trainer_class = columns_trainer(Trainer) if setting == "columns" else answer_only_trainer(Trainer)
    trainer = trainer_class.__new__(trainer_class)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = trainer.compute_loss(model, dict(data[0]))
    loss.backward()
    if args.gradients:
        torch.save({"loss": loss.item(), "gradients": {n: p.grad for n, p in model.named_parameters()
                                                       if p.grad is not None}}, args.gradients)
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    step = training_step(trainer, model, optimizer, bf16)
    for batch in data[:WARM_UP_BATCHES]:
        step(batch)
    timed = data[WARM_UP_BATCHES:]
    started = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - started
    tokens = sum(int(batch["attention_mask"].sum()) for batch in timed)
    return {"setting": setting, "attention": attention, "tokens_per_s": tokens / seconds}


def run_worker(args, setting: str, gradients: Path | None) -> dict:
    command = [sys.executable, __file__, "--worker", setting, "--data", args.data]
    command += ["--gradients", str(gradients)] if gradients else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {setting!r} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_difference(got: dict, want: dict) -> float:
    return max(float((got[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in want.items())


def print_first_batch(settings: list[str], saved: dict[str, Path]) -> None:
    import torch

    first = {name: torch.load(saved[name]) for name in (*settings, "float32")}
    for name in settings:
        gradients = first[name]["gradients"]
        print(f"{name:24s} first-batch loss {first[name]['loss']:.6f}; largest LoRA-gradient difference from "
              f"product {largest_difference(gradients, first['product']['gradients']):.2e}, "
              f"from float32 {largest_difference(gradients, first['float32']['gradients']):.2e}", flush=True)


def bracketed(settings: list[str], round_: int) -> list[str]:
    """One round's processes: "product" first, last and between every two other settings, which come in the
    settings' order, reversed every other round."""
    others = [name for name in settings if name != "product"]
    order = ["product"]
    for name in others[::-1] if round_ % 2 else others:
        order += [name, "product"]
    return order


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    import torch

    from distill.base import DEFAULT_BASE, resolve_base
    from distill.training.train import load_tokenizer

    speeds: dict[str, list[float]] = {name: [] for name in args.settings}
    ratios: dict[str, list[float]] = {name: [] for name in args.settings if name != "product"}
    with tempfile.TemporaryDirectory() as folder:
        saved = {name: Path(folder, f"{i}.pt") for i, name in enumerate(SETTINGS)}
        args.data = str(Path(folder, "batches.pt"))  # encoded once here, read by every run
        data = batches(args, load_tokenizer(resolve_base(DEFAULT_BASE)), grouped=True)
        torch.save([dict(batch) for batch in data], args.data)
        for round_ in range(args.rounds):
            order = bracketed(args.settings, round_)
            results = []
            for i, name in enumerate(order):
                result = run_worker(args, name, saved[name] if round_ == 0 and name not in order[:i] else None)
                results.append(result["tokens_per_s"])
                speeds[name].append(result["tokens_per_s"])
                print(f"round {round_ + 1} {name} ({result['attention']}): {result['tokens_per_s']:.0f} tokens/s",
                      flush=True)
            for i in range(1, len(order), 2):  # each other setting against the product runs on either side
                ratios[order[i]].append((results[i - 1] + results[i + 1]) / 2 / results[i])
            if round_ == 0:
                if "float32" not in args.settings:
                    run_worker(args, "float32", saved["float32"])  # the exact gradients, untimed
                print_first_batch(args.settings, saved)
    print(f"{'product':24s} runs {[round(v) for v in speeds['product']]} median "
          f"{statistics.median(speeds['product']):.0f} tokens/s")
    for name, values in ratios.items():
        print(f"{name:24s} runs {[round(v) for v in speeds[name]]} median {statistics.median(speeds[name]):.0f} "
              f"tokens/s; product / {name}, against the product runs on either side: rounds "
              f"{[round(r, 2) for r in values]}, median {statistics.median(values):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
