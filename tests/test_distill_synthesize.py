"""``arbitrage distill build --synthesize``: new inputs from the teacher, labelled, train split only.

Pure parts in-process; the simulator (it answers every call with a Banking77 label, so its
generation answers are garbage) for garbage answers, the budget and resume; a real generative
teacher, vLLM (CPU build) serving SmolLM2-135M-Instruct, for the whole pipeline. SmolLM2 is a
weak writer: those tests assert what the pipeline does with its answers, not their quality.
"""

from __future__ import annotations

import csv
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from arbitrage.capture.store import CaptureStore
from arbitrage.errors import ConfigError
from distill.build_command import distill
from distill.dataset import synthesize
from distill.dataset.config import BuildConfig
from distill.dataset.filters import jaccard, normalized_input, shingles
from distill.dataset.source import Example
from tests.test_distill_build import APP_PROMPT, TEACHER_CONFIG, TRAIN_CSV

PATH = "synth-test"
TEACHER_PROMPT = "You are a banking-intent annotator. Reply with the intent name only."
CAPTURED = 40


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Path:
    """A capture store holding 40 Banking77 texts as calls of the path ``synth-test``."""
    with TRAIN_CSV.open(newline="") as stream:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(stream)][::250][:CAPTURED]
    data_dir = tmp_path_factory.mktemp("synth-capture")
    store = CaptureStore(data_dir)
    store.open()
    for n, (text, label) in enumerate(rows):
        store.append("calls", call_record(n, text, label))
    store.close()
    return data_dir


def call_record(n: int, text: str, label: str) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": APP_PROMPT},
                                                 {"role": "user", "content": text}]}
    reply = {"model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": json.dumps({"intent": label})}}]}
    return {"request_id": f"r{n}", "ts": datetime.now(UTC), "path": PATH, "endpoint": "chat.completions",
            "status_code": 200, "served_by": "upstream", "cost_usd": 0.0001, "request": json.dumps(body),
            "response": json.dumps(reply)}


def example(text: str, system: str | None = "Classify.") -> Example:
    return Example("r", ({"role": "user", "content": text},), system, '{"intent": "x"}')


def test_parse_array_is_lenient_about_what_surrounds_it():
    assert synthesize.parse_array('Sure! ```json\n["a", "b"]\n```') == (["a", "b"], None)
    assert synthesize.parse_array('{"inputs": ["a"]}') == (["a"], None)
    assert synthesize.parse_array('["complete one", "complete two", "cut o') == (["complete one", "complete two"],
                                                                                 None)


@pytest.mark.parametrize("answer, problem", [
    ('{"intent": "card_arrival"}', "no JSON array in the answer: '{\"intent\": \"card_arrival\"}'"),
    ("[oops", "no readable JSON array in the answer: '[oops'"),
    ("", "no JSON array in the answer: ''"),
])
def test_parse_array_names_what_it_found_instead(answer, problem):
    assert synthesize.parse_array(answer) == ([], problem)


@pytest.mark.parametrize("item, problem", [
    ("How do I freeze my card?", None), (3, "not a string: '3'"),
    ({"text": "hi"}, "not a string: '{\"text\": \"hi\"}'"),
    ("  ", "empty"), ("x" * 201, "201 characters, more than 200"),
])
def test_items_are_validated_strictly(item, problem):
    assert synthesize.item_problem(item, 200) == problem


def test_generation_calls_are_deterministic_and_differ_per_batch():
    pool = [example(f"captured message number {n} about cards") for n in range(20)]
    cfg = BuildConfig(path="p", data_dir="d", synthesize=7, synthesize_per_call=3, synthesize_shots=4,
                      teacher_model="m", system_prompt_file="f", budget_usd=1)
    first, again = synthesize.plan(pool, cfg, "m"), synthesize.plan(pool, cfg, "m")
    assert first.asked == [3, 3, 1] and [c.key for c in first.calls] == [c.key for c in again.calls]
    assert len({c.key for c in first.calls}) == 3 and len({c.messages[1]["content"] for c in first.calls}) == 3
    assert first.params == {"temperature": 1.0, "max_completion_tokens": 1024} and first.app_prompt == "Classify."


def test_the_batch_index_is_part_of_the_key_even_with_the_same_examples():
    cfg = BuildConfig(path="p", data_dir="d", synthesize=4, synthesize_per_call=2, teacher_model="m",
                      system_prompt_file="f", budget_usd=1)
    calls = synthesize.plan([example("the only captured message")], cfg, "m").calls
    assert calls[0].messages == calls[1].messages and calls[0].key != calls[1].key


def test_new_inputs_near_existing_ones_or_each_other_are_dropped():
    existing = [example("I am still waiting for my new card to arrive"), example("How do I top up my account?")]
    new = [synthesize.synthetic_example(t, "Classify.") for t in (
        "i am still waiting for my new card to arrive", "I am still waiting for my new card to arrive!!",
        "Can I change my PIN at an ATM?", "can I change my PIN at an ATM??", "Why was my transfer declined?")]
    kept, exact, near = synthesize.drop_known(new, existing, 0.8)
    assert [e.input_messages[0]["content"] for e in kept] == ["Can I change my PIN at an ATM?",
                                                               "Why was my transfer declined?"]
    assert (exact, near) == (1, 2) and {e.source for e in kept} == {"synthetic"}


def test_a_path_of_multi_turn_conversations_has_no_examples_to_show():
    turns = Example("r", ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "my card?"}), None, "{}")
    cfg = BuildConfig(path="p", data_dir="d", synthesize=2, teacher_model="m", system_prompt_file="f", budget_usd=1)
    with pytest.raises(ConfigError, match="has none \\(only multi-turn conversations\\)"):
        synthesize.plan([turns], cfg, "m")


@pytest.mark.parametrize("options, message", [
    ({"synthesize": 5}, "--synthesize needs --teacher-model, --system-prompt-file, --budget-usd"),
    ({"synthesize": 0, "teacher_model": "m", "system_prompt_file": "f", "budget_usd": 1},
     "N must be at least 1, got 0"),
    ({"synthesize": 5, "teacher_model": "m", "system_prompt_file": "f", "budget_usd": 1,
      "synthesize_temperature": 0}, "--synthesize-temperature must be more than 0"),
    ({"synthesize": 5, "teacher_model": "m", "system_prompt_file": "f", "budget_usd": 1,
      "synthesize_per_call": 0}, "--synthesize-per-call must be at least 1"),
    ({"teacher_model": "m"}, "only apply with --relabel or --synthesize"),
])
def test_options_are_checked_in_the_config(options, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(path="p", data_dir="d", **options)


@pytest.fixture
def sim_files(sim, tmp_path) -> dict[str, Path]:
    (tmp_path / "teacher.toml").write_text(TEACHER_CONFIG.format(sim=sim.url))
    (tmp_path / "prompt.txt").write_text(TEACHER_PROMPT)
    return {"config": tmp_path / "teacher.toml", "prompt": tmp_path / "prompt.txt"}


@pytest.fixture
def run_sim(captured, sim_files, tmp_path):
    """``distill build --synthesize`` on the captured path with the simulator as the teacher."""
    def invoke(*args: str):
        argv = ["build", PATH, "--data-dir", str(captured), "--datasets-dir", str(tmp_path / "datasets"),
                "--config", str(sim_files["config"]), "--teacher-model", "gpt-4o-mini",
                "--system-prompt-file", str(sim_files["prompt"]), *args]
        return CliRunner().invoke(distill, argv)
    return invoke


def manifest_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads((Path(result.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())


def test_garbage_generation_answers_are_counted_as_rejected(run_sim):
    result = run_sim("--synthesize", "6", "--synthesize-per-call", "3", "--budget-usd", "1")
    synthesis = manifest_of(result)["synthesis"]
    assert {k: synthesis["counts"][k] for k in ("asked", "calls", "calls_paid", "answers_without_array",
                                                "generated", "labelled", "kept")} == {
        "asked": 6, "calls": 2, "calls_paid": 2, "answers_without_array": 2, "generated": 0, "labelled": 0, "kept": 0}
    assert synthesis["first_rejection"].startswith("no JSON array in the answer: '{\"intent\":")
    assert "rejected generation output, e.g.: no JSON array" in result.stderr and "Traceback" not in result.output


def test_garbage_leaves_only_real_examples_in_the_dataset(run_sim):
    folder = Path(run_sim("--synthesize", "3", "--budget-usd", "1").stdout.strip().splitlines()[-1])
    rows = [r for split in ("train", "eval") for r in pq.read_table(folder / f"{split}.parquet").to_pylist()]
    assert len(rows) == CAPTURED and {r["source"] for r in rows} == {"captured"}


def test_synthesis_stops_at_the_budget_and_a_rerun_pays_only_for_the_rest(run_sim):
    small = run_sim("--synthesize", "8", "--synthesize-per-call", "1", "--synthesize-max-tokens", "100",
                    "--budget-usd", "0.0003", "--concurrency", "1")
    first = manifest_of(small)
    rest = manifest_of(run_sim("--synthesize", "8", "--synthesize-per-call", "1", "--synthesize-max-tokens", "100",
                               "--budget-usd", "1"))
    paid = first["synthesis"]["counts"]["calls_paid"]
    assert "budget reached during synthesis" in small.stderr and 0 < paid < 8
    assert first["dollars"]["spent_this_run_usd"] <= 0.0003 and first["synthesis"]["stopped_by_budget"]
    assert (rest["synthesis"]["counts"]["calls_cached"], rest["synthesis"]["counts"]["calls_paid"]) == (paid, 8 - paid)
    cached = rest["synthesis"]["dollars"]["generation_cached_usd"]
    assert cached == pytest.approx(first["dollars"]["spent_this_run_usd"])


def test_relabel_and_synthesize_share_one_budget(run_sim):
    result = run_sim("--relabel", "--synthesize", "4", "--budget-usd", "1")
    manifest, folder = manifest_of(result), Path(result.stdout.strip().splitlines()[-1])
    rows = [r for split in ("train", "eval") for r in pq.read_table(folder / f"{split}.parquet").to_pylist()]
    assert manifest["teacher"]["answers_paid"] == CAPTURED and manifest["synthesis"]["counts"]["calls_paid"] == 1
    assert manifest["dollars"]["spent_this_run_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in rows) + manifest["synthesis"]["dollars"]["generation_spent_usd"])


def test_budget_too_small_for_one_generation_call(run_sim):
    result = run_sim("--synthesize", "5", "--budget-usd", "0.0000001")
    assert result.exit_code == 1 and "cannot pay for a single generation call" in result.output


VLLM_CONFIG = """
[[upstreams]]
name = "local-vllm"
base_url = "{base_url}"
models = ["smollm2"]
max_retries = 1

[prices."smollm2"]
input_per_mtok = 0.15
output_per_mtok = 0.60
"""
LABEL_PROMPT = "Name the banking intent of the customer's message in two or three words. Reply with the words only."
VLLM_ARGS = ["--teacher-model", "smollm2", "--budget-usd", "0.01", "--answer-format", "text", "--max-tokens", "48",
             "--synthesize-per-call", "4", "--synthesize-shots", "3", "--synthesize-max-tokens", "200",
             "--synthesize-temperature", "0.8", "--concurrency", "4"]


@pytest.fixture(scope="module")
def vllm_build(vllm, captured, tmp_path_factory):
    """``distill build --synthesize`` with SmolLM2 on vLLM as the teacher; returns a runner that
    prints how long each build took (``pytest -s``)."""
    tmp = tmp_path_factory.mktemp("synth-vllm")
    (tmp / "vllm.toml").write_text(VLLM_CONFIG.format(base_url=vllm.base_url))
    (tmp / "label.txt").write_text(LABEL_PROMPT)

    def invoke(*args: str) -> tuple[dict, list[dict], list[dict]]:
        argv = ["build", PATH, "--data-dir", str(captured), "--datasets-dir", str(tmp / "datasets"),
                "--config", str(tmp / "vllm.toml"), "--system-prompt-file", str(tmp / "label.txt"), *VLLM_ARGS, *args]
        started = time.monotonic()
        result = CliRunner().invoke(distill, argv)
        seconds = time.monotonic() - started
        print(f"\n{' '.join(args)}: {seconds:.1f} s\n{result.stderr}")
        manifest = manifest_of(result)
        folder = Path(result.stdout.strip().splitlines()[-1])
        rows = {s: pq.read_table(folder / f"{s}.parquet").to_pylist() for s in ("train", "eval")}
        return manifest, rows["train"], rows["eval"]
    return invoke


@pytest.fixture(scope="module")
def structured_runs(vllm_build):
    """A structured-outputs synthesis of 8 inputs, then the same command again."""
    args = ("--synthesize", "8", "--synthesize-structured")
    return vllm_build(*args), vllm_build(*args)


def test_vllm_generation_calls_are_made_and_paid_within_the_budget(structured_runs):
    (manifest, _, _), _ = structured_runs
    counts, dollars = manifest["synthesis"]["counts"], manifest["synthesis"]["dollars"]
    assert (counts["asked"], counts["calls"], counts["calls_paid"]) == (8, 2, 2)
    assert 0 < dollars["generation_spent_usd"] and manifest["dollars"]["spent_this_run_usd"] <= 0.01
    assert manifest["dollars"]["spent_this_run_usd"] == pytest.approx(
        dollars["generation_spent_usd"] + dollars["labelling_spent_usd"])


def test_vllm_inputs_are_parsed_counted_and_deduplicated(structured_runs, captured):
    (manifest, train, _), _ = structured_runs
    counts = manifest["synthesis"]["counts"]
    assert counts["generated"] + counts["items_rejected"] >= 1 and counts["answers_without_array"] == 0
    assert counts["generated"] == (counts["exact_duplicate"] + counts["near_duplicate"] + counts["labelled"]
                                   + counts["not_labelled_budget"] + counts["label_rejected_by_teacher"])
    known = [shingles(normalized_input(json.loads(r["input_messages"]))) for r in train if r["source"] != "synthetic"]
    for row in (r for r in train if r["source"] == "synthetic"):
        assert max(jaccard(shingles(normalized_input(json.loads(row["input_messages"]))), k) for k in known) < 0.8


def test_vllm_synthetic_examples_are_in_train_only(structured_runs):
    (manifest, train, held_out), _ = structured_runs
    synthetic = [r for r in train if r["source"] == "synthetic"]
    assert len(synthetic) == manifest["synthesis"]["counts"]["kept"] == manifest["split"]["synthetic_in_train"]
    assert {r["source"] for r in held_out} == {"captured"} and "train only" in manifest["split"]["synthetic"]
    assert all(r["system_prompt"] == APP_PROMPT and r["request_id"] is None for r in synthetic)


def test_vllm_rerun_pays_nothing_twice(structured_runs):
    (first, train, _), (again, train_again, _) = structured_runs
    assert again["dollars"]["spent_this_run_usd"] == 0 and again["synthesis"]["counts"]["calls_cached"] == 2
    assert again["dollars"]["cached_usd"] == pytest.approx(first["dollars"]["spent_this_run_usd"])
    assert [r for r in train_again if r["source"] == "synthetic"] == [r for r in train if r["source"] == "synthetic"]


def test_vllm_free_text_answers_are_parsed_or_rejected_never_a_crash(vllm_build):
    manifest, train, _ = vllm_build("--synthesize", "4")
    counts = manifest["synthesis"]["counts"]
    assert counts["calls_paid"] == 1 and counts["answers_without_array"] + counts["generated"] + counts[
        "items_rejected"] >= 1
    assert sum(r["source"] == "synthetic" for r in train) == counts["kept"]
