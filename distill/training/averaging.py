"""Stochastic weight averaging of the LoRA weights over a run's last part (``distill train --average-from``).

With it, the adapter published is the mean of the trainable weights after every optimizer step past
``average_from`` x the run's steps, instead of the weights after the last step. The mean is updated with
torch's own SWA update (``torch.optim.swa_utils.get_swa_multi_avg_fn``) and is written into every
checkpoint, so a resumed run carries it on.

On Banking77 (2.4 epochs, rank 16, linear decay; bench/RESULTS-distill.md "Weight averaging") the mean over
the last 45 % of the steps agreed with the teacher as often as the last step's weights (within 0.2 point) in
three runs, and its `joint` confidence ranked the answers better: 2.4-5.0 points more coverage at 99 %
agreement (the `min` confidence: -0.5 to +3.9).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

AVERAGE_FILE = "weight_average.safetensors"
"""The running mean in a checkpoint folder, with the steps it covers in its metadata."""


def trainable(model) -> dict[str, Any]:
    """The model's trainable parameters (the LoRA weights) by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class WeightAverage(TrainerCallback):
    """The running mean of the trainable weights after each step past ``average_from`` x the run's steps
    (nothing when ``average_from`` is None); ``resume_from``: the checkpoint the run resumes from."""

    def __init__(self, average_from: float | None, resume_from: str | None = None) -> None:
        self.average_from = average_from
        self.resume_from = resume_from
        self.mean: dict[str, Any] | None = None
        self.steps = 0
        self.first_step: int | None = None
        self.last_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        saved = Path(self.resume_from) / AVERAGE_FILE if self.resume_from else None
        if self.average_from is None or saved is None or not saved.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(saved), framework="pt") as stored:
            facts = stored.metadata()
            self.mean = {name: stored.get_tensor(name) for name in stored.keys()}
        self.steps, self.first_step, self.last_step = (int(facts[k]) for k in ("steps", "first_step", "last_step"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.average_from is None or state.global_step <= self.average_from * state.max_steps:
            return
        weights = trainable(model)
        if self.mean is None:
            self.mean = {name: p.detach().float().clone() for name, p in weights.items()}
            self.first_step = state.global_step
        else:
            from torch.optim.swa_utils import get_swa_multi_avg_fn

            get_swa_multi_avg_fn()(list(self.mean.values()), [weights[name].detach() for name in self.mean],
                                   self.steps)
        self.steps += 1
        self.last_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self.mean is None:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_file(self.mean, str(folder / AVERAGE_FILE), metadata={
            "steps": str(self.steps), "first_step": str(self.first_step), "last_step": str(self.last_step)})

    def apply(self, model) -> dict[str, int] | None:
        """Put the mean into ``model``'s trainable weights; the steps it covers, or None (no averaging)."""
        if self.mean is None:
            return None
        import torch

        weights = trainable(model)
        with torch.no_grad():
            for name, mean in self.mean.items():
                weights[name].copy_(mean)
        return {"first_step": self.first_step, "last_step": self.last_step, "steps": self.steps}
