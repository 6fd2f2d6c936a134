"""Saves the LoRA weights every few steps of an `arbitrage distill train` run, for bench/tail_averages.py.

    ARB_SNAPSHOT_DIR=bench/.work/snapshots/NAME [ARB_SNAPSHOT_FROM=0.2] [ARB_SNAPSHOT_EVERY=25] \\
    PYTHONPATH=bench/snapshot_hook .venv/bin/python bench/distill_banking77.py --epochs 2.4 ...

Python imports ``sitecustomize`` from the path at start-up, so the training subprocess the benchmark starts
picks this up (any other process does nothing here). It adds one callback to the run's Trainer: after every
``ARB_SNAPSHOT_EVERY``-th step from ``ARB_SNAPSHOT_FROM`` x the run's steps on, and after the last step, the
adapter's weights as peft saves them go to ``ARB_SNAPSHOT_DIR/step-NNNNN.safetensors`` (float32, about 20 MB
each for rank 16 on every layer of SmolLM2-135M). The callback runs after the product's own, and before
``--average-from`` (if given) replaces the weights, so the last snapshot is the last step's weights.
"""
import os
import sys

_DIR = os.environ.get("ARB_SNAPSHOT_DIR")
if _DIR and "distill" in sys.argv and "train" in sys.argv:
    from pathlib import Path

    from transformers import TrainerCallback

    import distill.training.train as _train

    EVERY = int(os.environ.get("ARB_SNAPSHOT_EVERY", "25"))
    FROM = float(os.environ.get("ARB_SNAPSHOT_FROM", "0.4"))

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if (step >= FROM * state.max_steps and step % EVERY == 0) or step == state.max_steps:
                from peft import get_peft_model_state_dict
                from safetensors.torch import save_file

                weights = {k: v.detach().float().clone().contiguous()
                           for k, v in get_peft_model_state_dict(model).items()}
                Path(_DIR).mkdir(parents=True, exist_ok=True)
                save_file(weights, str(Path(_DIR) / f"step-{step:05d}.safetensors"))

    _make_trainer = _train.make_trainer

    def make_trainer(model, tokenizer, splits, cfg, run, bf16, callbacks):
        return _make_trainer(model, tokenizer, splits, cfg, run, bf16, [*callbacks, Snapshots()])

    _train.make_trainer = make_trainer
