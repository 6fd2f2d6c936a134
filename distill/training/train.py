"""LoRA training of one call path's dataset version (``arbitrage distill train PATH``)::

    <data_dir>/datasets/PATH/vN/ (train, eval Parquet) + base model
    -> prompts in the base model's chat template, loss on the answer tokens only
    -> transformers' Trainer with a peft LoRA model: bf16 autocast where faster, gradient
       accumulation, evaluation on the eval split, resumable checkpoints
    -> <data_dir>/adapters/PATH/vM/: adapter_config.json + adapter_model.safetensors (vLLM loads
       the folder as it is with --enable-lora), train_config.json, manifest.json

A run works in ``vM.partial/`` (checkpoints in ``vM.partial/checkpoints/``). Re-running after an
interruption resumes from the last checkpoint, provided nothing but the run's length and
reporting changed (``RUN_LENGTH_FIELDS``). The finished adapter is renamed into place, so a
folder named ``vM`` is always complete. One training per path at a time.

transformers' ``Trainer`` rather than TRL's ``SFTTrainer``: the examples are tokenized here (the
prompt exactly as a server renders it, then the answer and the end-of-turn token), which leaves
``SFTTrainer`` nothing to add, while it needs ``datasets`` and computes entropy and token accuracy
on every step.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from arbitrage.errors import ConfigError, TrainingError
from arbitrage.machine import cpu_name
from distill.base import BaseModel, default_models_dir, resolve_base
from distill.training.averaging import WeightAverage
from distill.training.config import ALL_LINEAR, TrainConfig
from distill.training.data import IGNORE_INDEX, ChatEncoder, EncodedSplit, encode_split, read_split
from distill.versions import MANIFEST, choose, versions, write_json
from distill.versions import publish as publish_version

CONFIG_FILE = "train_config.json"
CHECKPOINTS = "checkpoints"
SPEED_CACHE = "bf16-speed.json"
SPEED_BATCH = (4, 128)
"""Examples x tokens of the batch timed in fp32 and bf16 when ``bf16`` is 'auto'."""
HOPELESS = 10
"""A bf16 warm-up step this many times longer than an fp32 step ends its measurement: on a CPU without
bf16 instructions (an AVX2-only AMD EPYC) bf16 trained at 4.6 tokens/s against fp32's 128, and timing
its three steps took over 5 minutes."""
BF16_ATTENTION = "eager"
"""The attention under bf16 autocast: transformers' eager one (two matmuls and a softmax) rather than
PyTorch's fused kernel (SDPA), whose bf16 path on a CPU is slow: a training step with the short prompt ran
1.26x faster with eager attention on a 2-core avx512_bf16 EPYC (bench/step_speed.py), and 1.22x with the app's
long prompt; in float32 SDPA was as fast or faster (1.02-1.08x). Eager attention keeps each layer's
attention probabilities (batch x heads x queries x keys) for the backward pass, which the fused kernel does
not: with the batch's shared prompt beginning computed once (``answer_only_trainer``), the queries are
only the examples' own tokens."""
_PARTIAL = re.compile(r"v(\d+)\.partial")


@dataclass(frozen=True)
class DatasetRef:
    """The dataset version a run trains on."""

    path: str
    version: str
    folder: Path
    manifest_sha256: str

    def facts(self) -> dict[str, Any]:
        return {"path": self.path, "version": self.version, "folder": str(self.folder.resolve()),
                "manifest_sha256": self.manifest_sha256}


@dataclass(frozen=True)
class Run:
    """The working folder of one training run, and the checkpoint it resumes from."""

    number: int
    folder: Path
    checkpoint: str | None


@dataclass
class TrainResult:
    """What a run wrote."""

    folder: Path
    manifest: dict[str, Any]


def train(cfg: TrainConfig, data_dir: Path, command: Sequence[str], *, resume: bool = True,
          models_dir: Path | None = None, callbacks: Sequence[Any] = (), progress: bool = True) -> TrainResult:
    """Train one adapter; user mistakes raise ConfigError before the model is loaded."""
    started = time.perf_counter()
    dataset = find_dataset(Path(data_dir) / "datasets", cfg.path, cfg.dataset_version)
    cfg = replace(cfg, dataset_version=dataset.version)
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    base = resolve_base(cfg.base, models_dir)
    tokenizer = load_tokenizer(base)
    splits = encode_splits(dataset, ChatEncoder(tokenizer), cfg)
    check_lora_layers(cfg, base)
    root = Path(data_dir) / "adapters" / cfg.path
    run = open_run(root, cfg, resume)
    model = load_lora_model(base, cfg)
    precision = choose_precision(cfg, model, base, models_dir / SPEED_CACHE)
    if precision["bf16"]:
        precision["frozen_linear_weights"] = f"bfloat16 ({store_frozen_linears_in_bf16(model)} layers)"
        precision["lora_input_casts"] = f"off ({skip_lora_input_casts(model)} layers)"
        precision["norm_outputs"] = f"bfloat16 ({cast_norm_outputs_once(model)} norms)"
    precision["attention"] = set_attention(model, precision["bf16"], cfg.attention)
    bar, guard = TrainingProgress(enabled=progress), DivergenceGuard()
    average = WeightAverage(cfg.average_from, run.checkpoint)
    trainer = make_trainer(model, tokenizer, splits, cfg, run, precision["bf16"], [bar, guard, average, *callbacks])
    output = trainer.train(resume_from_checkpoint=run.checkpoint)
    if guard.diverged:
        shutil.rmtree(run.folder, ignore_errors=True)
        raise TrainingError(guard.explain(cfg, run.folder))
    losses = {"train_loss": output.training_loss, "eval_loss": final_eval_loss(trainer)}
    averaged = average.apply(trainer.model)
    if averaged:
        losses |= {"eval_loss_last_step": losses["eval_loss"], "eval_loss": final_eval_loss(trainer, again=True),
                   "weight_average": averaged}
    adapter = run.folder / "adapter"
    trainer.model.save_pretrained(adapter)
    cfg.save(adapter / CONFIG_FILE)
    manifest = make_manifest(cfg, base, dataset, splits, trainer.state, run, precision, bar, losses,
                             command, time.perf_counter() - started)
    return publish(run, root, adapter, manifest)


def find_dataset(datasets_root: Path, path: str, wanted: str | None) -> DatasetRef:
    """The dataset version to train on (the latest when ``wanted`` is None)."""
    found = versions(datasets_root / path)
    if not found:
        known = sorted(p.name for p in datasets_root.iterdir() if versions(p)) if datasets_root.is_dir() else []
        hint = f" (paths with datasets: {', '.join(known)})" if known else ""
        raise ConfigError(f"no dataset for path {path!r} in {datasets_root}{hint}: "
                          f"build one with `arbitrage distill build {path}`")
    chosen = choose(found, wanted, "dataset", path)
    folder = datasets_root / path / chosen
    return DatasetRef(path, chosen, folder, _sha256(folder / MANIFEST))


def load_tokenizer(base: BaseModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.location)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of base model {base.name!r}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def encode_splits(dataset: DatasetRef, encoder: ChatEncoder, cfg: TrainConfig) -> dict[str, EncodedSplit]:
    """Train and eval examples; a clear error when no training example fits."""
    splits = {name: encode_split(read_split(dataset.folder, name), encoder, cfg) for name in ("train", "eval")}
    train_split = splits["train"]
    if not train_split.examples:
        reason = (f"all {train_split.too_long} are longer than --max-seq-len {cfg.max_seq_len} tokens"
                  if train_split.too_long else "its train split is empty")
        raise ConfigError(f"dataset {dataset.path} {dataset.version} has no usable training example: {reason}")
    return splits


def open_run(root: Path, cfg: TrainConfig, resume: bool) -> Run:
    """The interrupted run to resume (same config but for its length), else a new one."""
    root.mkdir(parents=True, exist_ok=True)
    partials = _partials(root)
    if resume and partials:
        number = max(partials)
        folder = partials.pop(number)
        saved = _saved_config(folder)
        if saved is not None:
            _check_resumable(cfg, saved, folder)
            cfg.save(folder / CONFIG_FILE)
            return Run(number, folder, _last_checkpoint(folder / CHECKPOINTS))
        partials[number] = folder
    for folder in partials.values():
        shutil.rmtree(folder)
    number = max(versions(root), default=0) + 1
    folder = root / f"v{number}.partial"
    folder.mkdir()
    cfg.save(folder / CONFIG_FILE)
    return Run(number, folder, None)


def _partials(root: Path) -> dict[int, Path]:
    """Unfinished runs; ones whose adapter was published (the clean-up was cut short) are removed."""
    published = set(versions(root))
    found = {int(m[1]): p for p in root.iterdir() if (m := _PARTIAL.fullmatch(p.name))}
    for number in published & found.keys():
        shutil.rmtree(found.pop(number))
    return found


def _saved_config(folder: Path) -> TrainConfig | None:
    try:
        return TrainConfig.load(folder / CONFIG_FILE)
    except (OSError, ValueError, TypeError, ConfigError):
        return None


def _check_resumable(cfg: TrainConfig, saved: TrainConfig, folder: Path) -> None:
    changed = cfg.differences(saved)
    if changed:
        raise ConfigError(f"an interrupted training of {cfg.path!r} in {folder} used other settings "
                          f"({', '.join(f'{n}: {getattr(saved, n)!r}' for n in changed)}): give the same "
                          f"ones to resume it, or --no-resume to discard it and start over")


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def load_lora_model(base: BaseModel, cfg: TrainConfig):
    """The base model in float32 with fresh LoRA layers (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(cfg.seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(base.location, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(f"cannot load base model {base.name!r}: {_first_line(exc)}") from None
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", **_targets(model, cfg))
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA target modules {list(cfg.target_modules)}: {exc}") from None


def check_lora_layers(cfg: TrainConfig, base: BaseModel) -> None:
    """--lora-layers no larger than the base model's decoder layers (read from its config, before a run
    folder is made)."""
    from transformers import AutoConfig

    if cfg.lora_layers is not None:
        layers = AutoConfig.from_pretrained(base.location).num_hidden_layers
        if cfg.lora_layers > layers:
            raise ConfigError(f"--lora-layers {cfg.lora_layers}: the base model has {layers} decoder layers")


def _targets(model, cfg: TrainConfig) -> dict[str, Any]:
    """peft's ``target_modules``, and ``layers_to_transform`` for ``cfg.lora_layers``. peft takes the layers
    only with module names, so there 'all-linear' becomes the names of the linear modules of the decoder
    layers."""
    import torch

    if cfg.lora_layers is None:
        return {"target_modules": cfg.peft_target_modules}
    layers = model.config.num_hidden_layers
    targets = cfg.peft_target_modules
    if targets == ALL_LINEAR:
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and ".layers." in name})
        if not targets:
            raise ConfigError("--lora-layers: no linear modules found in the base model's `layers`; "
                              "name them with --target-modules")
    return {"target_modules": targets, "layers_to_transform": list(range(layers - cfg.lora_layers, layers))}


def choose_precision(cfg: TrainConfig, model, base: BaseModel, cache_file: Path) -> dict[str, Any]:
    """bf16 autocast on or off: as configured, or ('auto') whichever trains faster on this machine."""
    if cfg.bf16 != "auto":
        return {"bf16": cfg.bf16 == "on", "setting": cfg.bf16}
    key = _speed_key(base, cfg)
    cache = _read_json(cache_file)
    if key not in cache:
        speeds = measure_speeds(model, cfg.attention)
        cache[key] = {"tokens_per_s": {name: round(value, 1) for name, value in speeds.items()},
                      "batch": list(SPEED_BATCH), "measured_at": datetime.now(UTC).isoformat()}
        write_json(cache_file, cache)
    speed = cache[key]["tokens_per_s"]
    return {"bf16": speed["bf16"] > speed["fp32"], "setting": "auto", "measured": cache[key], "machine": key}


def measure_speeds(model, attention: str = "auto", rounds: int = 2) -> dict[str, float]:
    """Training tokens/s (forward and backward, no update) on a random batch in fp32 and in bf16 autocast:
    a warm-up step of each, then ``rounds`` rounds of one step of each, alternating so that a busy
    neighbour slows both alike; the best step of each. A bf16 warm-up ``HOPELESS`` times longer than the
    fp32 one ends the measurement with the warm-up speeds. Each precision runs with the attention
    ``set_attention`` gives it for ``attention``."""
    import torch

    loaded = attention_of(model)

    def step(bf16: bool) -> float:
        set_attention(model, bf16, attention, loaded)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - start

    with torch.random.fork_rng():
        ids = torch.randint(0, model.config.vocab_size, SPEED_BATCH)
        warm = {"fp32": step(False), "bf16": step(True)}
        times = {"fp32": [], "bf16": []}
        if warm["bf16"] <= HOPELESS * warm["fp32"]:
            for _ in range(rounds):
                for name in ("fp32", "bf16"):
                    times[name].append(step(name == "bf16"))
        model.zero_grad(set_to_none=True)
    model.set_attn_implementation(loaded)
    tokens = SPEED_BATCH[0] * SPEED_BATCH[1]
    return {name: tokens / min(times[name] or [warm[name]]) for name in times}


def _speed_key(base: BaseModel, cfg: TrainConfig) -> str:
    """What the measured speeds depend on: the machine, torch, the base model, the LoRA layout (which layers
    the backward pass reaches) and the attention each precision runs with."""
    import torch

    layers = "all layers" if cfg.lora_layers is None else f"last {cfg.lora_layers} layers"
    return (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {base.location} | "
            f"LoRA r{cfg.lora_rank} on {','.join(cfg.target_modules)}, {layers} | attention {cfg.attention}, "
            f"{BF16_ATTENTION} under bf16 when auto")


def attention_of(model) -> str:
    """The attention implementation the model runs with."""
    return model.config._attn_implementation


def set_attention(model, bf16: bool, choice: str = "auto", fp32_attention: str | None = None) -> str:
    """Switch the model to the attention ``choice`` names, or for 'auto' to the one that trains fastest in its
    precision (``BF16_ATTENTION`` under bf16, ``fp32_attention`` or the loaded one in float32); returns it."""
    if choice != "auto":
        wanted = choice
    else:
        wanted = BF16_ATTENTION if bf16 else (fp32_attention or attention_of(model))
    if attention_of(model) != wanted:
        model.set_attn_implementation(wanted)
    return attention_of(model)


def store_frozen_linears_in_bf16(model) -> int:
    """Keep the frozen weights of the linear layers in bfloat16 (for bf16 autocast); returns how many.

    Autocast would cast each of them to bfloat16 on every forward pass (it caches casts only of weights that
    train), so the matmuls see the same numbers either way: the loss and gradients do not change, a step
    skips converting about 100M weights, and the weights take half the memory. The speed gain is small:
    1.06x side by side on a 2-core avx512_bf16 EPYC (bench/step_speed.py), within the noise of a whole run.
    The LoRA weights stay float32 for the optimizer, and so do the embeddings and the
    output head (tied to the embeddings in SmolLM2) and the norms, which autocast does not cast: the residual
    stream stays float32.
    """
    import torch

    kept = {id(module.weight) for module in (model.get_input_embeddings(), model.get_output_embeddings())
            if module is not None}
    count = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and id(module.weight) not in kept
                and module.weight.dtype == torch.float32):
            module.weight.data = module.weight.data.to(torch.bfloat16)
            count += 1
    return count


def skip_lora_input_casts(model) -> int:
    """Turn off peft's cast of each LoRA layer's input to its weights' dtype (for bf16 autocast); returns in how
    many layers.

    peft casts the input to float32, the LoRA weights' dtype, and autocast then casts it back to bf16 for
    the A matrix's matmul: for a bf16 input (o_proj's and down_proj's) two copies forward and two backward,
    for the same numbers. Without the cast, autocast alone decides, so the loss and gradients do not change.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for module in layers:
        module.cast_input_dtype_enabled = False
    return len(layers)


PRE_NORM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder layers whose ``input_layernorm`` and ``post_attention_layernorm`` feed only linear layers."""


def cast_norm_outputs_once(model) -> int:
    """Under bf16 autocast, hand the decoder layers' pre-norm outputs on in bfloat16 (a forward hook); returns
    in how many norms (0 for a model type not in ``PRE_NORM_MODEL_TYPES``).

    Each norm's float32 output feeds several linear layers: q, k and v and their LoRA A matrices, or gate and
    up and theirs. Autocast casts it to bf16 for each of them, and the backward pass casts each gradient back:
    six casts where one does. Cast once, the matmuls see the same numbers, so the loss does not change; the
    gradients coming back into the norm are summed in bf16 before the one cast back, which rounds them
    slightly differently.
    """
    import torch

    if model.config.model_type not in PRE_NORM_MODEL_TYPES:
        return 0

    def to_bf16(module, args, output):
        return output.to(torch.bfloat16) if torch.is_autocast_enabled("cpu") else output

    count = 0
    for name, module in model.named_modules():
        if name.endswith(("input_layernorm", "post_attention_layernorm")):
            module.register_forward_hook(to_bf16)
            count += 1
    return count


def final_eval_loss(trainer, again: bool = False) -> float | None:
    """The eval loss of the trained adapter (evaluated now unless the last step already did and not ``again``:
    the weights changed since)."""
    if not trainer.eval_dataset:
        return None
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last["step"] == trainer.state.global_step and not again:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def make_trainer(model, tokenizer, splits: dict[str, EncodedSplit], cfg: TrainConfig, run: Run, bf16: bool,
                 callbacks: list[Any]):
    """transformers' Trainer: padded batches grouped by length, answer-only labels, checkpoints in the run."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    eval_examples = splits["eval"].examples[:cfg.max_eval_examples]
    args = TrainingArguments(
        output_dir=str(run.folder / CHECKPOINTS), use_cpu=True, bf16=bf16, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accumulation, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        eval_strategy="steps" if eval_examples else "no", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        logging_nan_inf_filter=False,
        train_sampling_strategy="group_by_length", include_num_input_tokens_seen="non_padding",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, prediction_loss_only=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = answer_only_trainer(Trainer)(model=model, args=args, train_dataset=splits["train"].examples,
                      eval_dataset=eval_examples or None, data_collator=collator, processing_class=tokenizer,
                      callbacks=callbacks, optimizers=(loraplus_optimizer(model, cfg), None))
    trainer.remove_callback(PrinterCallback)
    return trainer


def loraplus_optimizer(model, cfg: TrainConfig):
    """AdamW with LoRA+'s two learning rates (B matrices at ``cfg.loraplus_ratio`` times A's), or None for the
    Trainer's own AdamW at one learning rate. The Trainer's schedule scales both alike."""
    if cfg.loraplus_ratio is None:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.learning_rate,
                                     loraplus_lr_ratio=cfg.loraplus_ratio, loraplus_weight_decay=cfg.weight_decay)


def answer_only_trainer(trainer_class, share_prefix: bool = True):
    """``trainer_class`` computing only what the answer-only loss needs.

    - **The output head only at the positions the loss is taken on.** The loss falls on the answer
      (about 11 of 46 tokens of a classification example), but the model would project every
      position onto the whole vocabulary (49,152 for SmolLM2): about a fifth of the model's
      arithmetic, and float32 logits for every prompt token. A batch trains about 1.3-1.4x faster
      on a 2-core CPU. The head takes each example's own answer positions (``answer_logits``), not
      every column where some example of the batch has an answer: 1.37x fewer rows on Banking77.
    - **The prompt's shared beginning once per batch** (``share_prefix``). Every example of a path
      starts with the same tokens: the chat template's opening and the system prompt (16 of about
      49 tokens for Banking77 with a short prompt, hundreds with a path's own long one). A causal
      model's states there do not depend on what follows, so they are computed for one example and
      its key/value cache is repeated over the batch; the rest of each example attends to it as
      to its own, and the gradient flows back through it.

    The loss is the same as the full model's, up to float rounding.
    """

    class AnswerOnlyTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = labels[:, 1:]
            rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
            prefix = shared_prefix(inputs["input_ids"], inputs.get("attention_mask"), labels) if share_prefix else 0
            outputs = answer_logits(model, inputs, rows, columns, prefix)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), targets[rows, columns], reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(len(rows), 1))
            return (loss, outputs) if return_outputs else loss

    return AnswerOnlyTrainer


MIN_SHARED_PREFIX = 2
"""Shorter common beginnings are not worth the extra forward pass."""


def shared_prefix(input_ids, attention_mask, labels) -> int:
    """How many leading tokens every example of the batch has in common and computes once (0: none).

    The prefix stops one token before the first answer token of any example, so every logit the loss
    needs comes from the rest of the batch's pass, and it stops at the first padding.
    """
    if input_ids.shape[0] < 2:
        return 0
    common = (input_ids == input_ids[:1]).all(dim=0) & (labels == IGNORE_INDEX).all(dim=0)
    if attention_mask is not None:
        common &= attention_mask.bool().all(dim=0)
    length = int(common.int().cumprod(dim=0).sum()) - 1
    return length if length >= MIN_SHARED_PREFIX else 0


def answer_logits(model, inputs: dict[str, Any], rows, columns, prefix: int = 0):
    """The model's output with logits only at the positions (``rows``, ``columns``), one row each: the output
    head sees only those hidden states (a hook on it picks them), and the model's own forward does the rest,
    so whatever it applies to logits still applies. With ``prefix``, the first ``prefix`` tokens are computed
    once for the batch and their key/value cache repeated over it."""
    if prefix:
        ids = inputs["input_ids"]
        cache = model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(ids.shape[0])
        rest = {key: value for key, value in inputs.items() if key not in ("input_ids", "position_ids")}
        inputs = {"input_ids": ids[:, prefix:], "cache": cache, "use_cache": True, **rest}
    positions = (rows, columns - prefix)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda head, args: (args[0][positions], *args[1:]))
    try:
        return model(**inputs, logits_to_keep=0)
    finally:
        hook.remove()


class DivergenceGuard(TrainerCallback):
    """Stops a run whose training loss diverged (``divergence``): its LoRA weights are wrecked, and training
    on would only spend the time (a rank-32 run at lr 2e-3 went from 0.05 to 7.7 over 80 steps, halfway
    through 1,479). ``train`` then raises ``TrainingError`` and discards the run, whose checkpoints would
    resume into the same state.

    The Trainer logs step 1 (``logging_first_step``), the untrained model's loss, and keeps non-finite
    losses in its logs (``logging_nan_inf_filter`` off, which would otherwise hide them); a resumed run finds
    step 1 in the log history its checkpoint restored.
    """

    def __init__(self) -> None:
        self.diverged: dict[str, Any] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (logs or {}).get("loss") is None or self.diverged is not None or state.global_step <= 1:
            return
        losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
        untrained = next((loss for step, loss in losses if step == 1), None)
        reason = divergence([loss for _, loss in losses[:-1]], losses[-1][1], untrained)
        if reason:
            self.diverged = {"step": state.global_step, "max_steps": state.max_steps, "reason": reason,
                             "recent": losses[-5:]}
            control.should_training_stop = True

    def explain(self, cfg: TrainConfig, folder: Path) -> str:
        """What happened, what was kept, and what to change."""
        d = self.diverged
        recent = ", ".join(f"{step}: {loss:.4g}" for step, loss in d["recent"])
        return (f"training of {cfg.path!r} diverged at step {d['step']} of {d['max_steps']}: {d['reason']} "
                f"(losses logged by step: {recent}). No adapter was published, and the run ({folder.name}) was "
                f"discarded, since its checkpoints would resume into the same state. Train again with a lower "
                f"--lr (this run: {cfg.learning_rate:g}).")


def divergence(earlier: Sequence[float], loss: float, untrained: float | None) -> str | None:
    """Why a logged training loss means the run diverged, or None: it is not a number, or it is twice the
    untrained model's loss or more, or back at the untrained loss after the run had halved it. A healthy run's
    early losses wobble around the untrained one while the learning rate warms up, so nearness alone is not
    enough."""
    if not math.isfinite(loss):
        return f"the training loss became {loss}"
    if untrained is None or not math.isfinite(untrained):
        return None
    if loss >= 2 * untrained:
        return f"the training loss rose to {loss:.4f}, twice the untrained model's {untrained:.4f} or more"
    best = min(earlier, default=untrained)
    if loss >= untrained and best <= untrained / 2:
        return (f"the training loss climbed back to {loss:.4f}, the untrained model's {untrained:.4f} or more, "
                f"after falling to {best:.4f}")
    return None


class TrainingProgress(TrainerCallback):
    """A progress bar on stderr (steps, ETA, loss, training tokens/s); keeps the timing for the manifest.

    Tokens are the non-padding tokens trained on; seconds are those spent in training steps
    (evaluation and checkpoint writing are left out).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.train_seconds = 0.0
        self.tokens = 0
        self._tokens_at_start = 0
        self._step_started = 0.0
        self.last = {}

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds else None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self._tokens_at_start = state.num_input_tokens_seen
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="training",
                        file=sys.stderr, disable=not self.enabled, dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_started
        self.tokens = state.num_input_tokens_seen - self._tokens_at_start
        self.bar.update(state.global_step - self.bar.n)
        self.bar.set_postfix(self._postfix(), refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.last.update({k: v for k, v in (logs or {}).items() if k in ("loss", "eval_loss")})
        if self.bar is not None:
            self.bar.set_postfix(self._postfix())

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    def _postfix(self) -> dict[str, str]:
        shown = {name: f"{value:.4f}" for name, value in self.last.items()}
        if self.tokens_per_s:
            shown["tok/s"] = f"{self.tokens_per_s:.0f}"
        return shown


def make_manifest(cfg: TrainConfig, base: BaseModel, dataset: DatasetRef, splits: dict[str, EncodedSplit], state,
                  run: Run, precision: dict[str, Any], bar: TrainingProgress, losses: dict[str, Any],
                  command: Sequence[str], wall_seconds: float) -> dict[str, Any]:
    """What produced the adapter: base, dataset, prompt handling, config, metrics, time and speed."""
    history = state.log_history
    return {
        "path": cfg.path, "created_at": datetime.now(UTC).isoformat(), "command": shlex.join(command),
        "base": base.facts(), "dataset": {**dataset.facts(), **{n: s.facts() for n, s in splits.items()}},
        "system_prompt": {"mode": "replace" if cfg.drop_system_prompt else "keep",
                          "text": cfg.short_system_prompt},
        "config": cfg.to_dict(), "precision": precision,
        "metrics": {**losses, "global_step": state.global_step, "epoch": state.epoch,
                    "resumed_from_step": _step_of(run.checkpoint),
                    "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
                    "eval_history": [{"step": h["step"], "eval_loss": h["eval_loss"]}
                                     for h in history if "eval_loss" in h]},
        "timing": {"wall_seconds": round(wall_seconds, 2), "train_seconds": round(bar.train_seconds, 2),
                   "tokens_trained": bar.tokens,
                   "tokens_per_s": round(bar.tokens_per_s, 1) if bar.tokens_per_s else None},
        "software": {name: _version(name) for name in ("arbitrage", "torch", "transformers", "peft")},
    }


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def publish(run: Run, root: Path, adapter: Path, manifest: dict[str, Any]) -> TrainResult:
    """Rename the finished adapter to ``vM`` (the next free number if another run took it)."""
    folder, manifest = publish_version(adapter, root, {**manifest, "files": _file_hashes(adapter)}, run.number)
    shutil.rmtree(run.folder, ignore_errors=True)
    return TrainResult(folder, manifest)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
