"""``arbitrage distill build``: a real gateway and simulator capture a path; the simulator is the
teacher. The command runs in-process (click's runner), and once as a process for Ctrl-C."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from arbitrage.capture.store import CaptureStore
from distill.build_command import distill
from tests.processes import ctrl_c_works, simulator

PATH = "build-test"
APP_PROMPT = "Classify the customer's message into one banking intent. Answer in JSON."
TEACHER_PROMPT = "You are a meticulous banking-intent annotator. Reply with exactly {\"intent\": \"<label>\"}."
TEACHER_CONFIG = """
[[upstreams]]
name = "sim"
base_url = "{sim}/v1"
models = ["gpt-*", "recover-*"]
max_retries = 2

[[upstreams]]
name = "limited"
base_url = "{sim}/v1"
models = ["error-*"]
max_retries = 1

[prices."recover-2:gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

[prices."error-429:gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60
"""
TRAIN_CSV = Path(__file__).parent.parent / "simulator" / "data" / "banking77" / "train.csv"


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, str]]:
    """40 (text, label) pairs spread over the training set: distinct, and not near each other."""
    with TRAIN_CSV.open(newline="") as stream:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(stream)]
    return rows[::250][:40]


@pytest.fixture(scope="module")
def captured(gw, texts) -> Path:
    """The gateway's store, with the 40 texts sent as the path ``build-test``."""
    client = gw.client()
    for text, _ in texts:
        client.chat.completions.create(model="gpt-4o-mini", extra_headers={"X-Arbitrage-Path": PATH}, messages=[
            {"role": "system", "content": APP_PROMPT}, {"role": "user", "content": text}])
    return gw.data_dir


@pytest.fixture
def teacher_files(sim, tmp_path) -> dict[str, Path]:
    (tmp_path / "teacher.toml").write_text(TEACHER_CONFIG.format(sim=sim.url))
    (tmp_path / "prompt.txt").write_text(TEACHER_PROMPT)
    return {"config": tmp_path / "teacher.toml", "prompt": tmp_path / "prompt.txt"}


@pytest.fixture
def run(captured, teacher_files, tmp_path):
    """Run ``distill build`` on the capture; returns click's result."""
    def invoke(*args: str, data_dir: Path = captured, path: str = PATH):
        argv = ["build", path, "--data-dir", str(data_dir), "--datasets-dir", str(tmp_path / "datasets"),
                "--config", str(teacher_files["config"]), *args]
        return CliRunner().invoke(distill, argv)
    return invoke


def relabel(teacher_files, budget: str = "1", model: str = "gpt-4o-mini") -> list[str]:
    return ["--relabel", "--teacher-model", model, "--system-prompt-file", str(teacher_files["prompt"]),
            "--budget-usd", budget]


def built(result) -> tuple[dict, list[dict], list[dict]]:
    """(manifest, train rows, eval rows) of a successful build."""
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    rows = {split: pq.read_table(folder / f"{split}.parquet").to_pylist() for split in ("train", "eval")}
    return json.loads((folder / "manifest.json").read_text()), rows["train"], rows["eval"]


def test_captured_answers_become_a_versioned_dataset(run):
    manifest, train, held_out = built(run())
    assert manifest["version"] == "v1" and manifest["sources"]["answers"] == "captured"
    assert manifest["filters"]["captured_calls"] == 40 and manifest["filters"]["kept"] == 40
    assert len(train) + len(held_out) == 40 and {r["system_prompt"] for r in train} == {APP_PROMPT}
    assert all("intent" in json.loads(r["answer"]) for r in train + held_out)
    assert built(run())[0]["version"] == "v2"


def test_split_is_deterministic_and_never_shares_an_input(run):
    _, train, held_out = built(run("--eval-fraction", "0.3"))
    _, train_again, _ = built(run("--eval-fraction", "0.3"))
    assert held_out and not {r["input_messages"] for r in train} & {r["input_messages"] for r in held_out}
    assert [r["example_id"] for r in train] == [r["example_id"] for r in train_again]


def test_relabel_records_teacher_prompt_and_dollars(run, teacher_files, texts):
    manifest, train, held_out = built(run(*relabel(teacher_files)))
    teacher, dollars = manifest["teacher"], manifest["dollars"]
    assert teacher["model"] == "gpt-4o-mini" and teacher["answers_paid"] == 40 and teacher["answers_cached"] == 0
    assert teacher["system_prompt_sha256"] == hashlib.sha256(TEACHER_PROMPT.encode()).hexdigest()
    assert dollars["spent_this_run_usd"] > 0
    assert sum(r["cost_usd"] for r in train + held_out) == pytest.approx(dollars["spent_this_run_usd"])
    assert "--relabel" in manifest["command"] and {r["source"] for r in train} == {"relabel"}
    assert {json.loads(r["answer"])["intent"] for r in train + held_out} == {label for _, label in texts}


def test_rerun_pays_nothing_twice(run, teacher_files):
    first, _, _ = built(run(*relabel(teacher_files)))
    second, _, _ = built(run(*relabel(teacher_files)))
    assert second["teacher"]["answers_paid"] == 0 and second["teacher"]["answers_cached"] == 40
    assert second["dollars"]["spent_this_run_usd"] == 0
    assert second["dollars"]["cached_usd"] == pytest.approx(first["dollars"]["spent_this_run_usd"])


def test_budget_stops_early_then_a_rerun_pays_only_for_the_rest(run, teacher_files):
    small = run(*relabel(teacher_files, budget="0.0004"))
    first, train, held_out = built(small)
    rest, _, _ = built(run(*relabel(teacher_files, budget="1")))
    assert "budget reached" in small.stderr and 0 < first["teacher"]["answers_paid"] < 40
    assert first["dollars"]["spent_this_run_usd"] <= 0.0004 and len(train) + len(held_out) < 40
    assert rest["teacher"]["answers_cached"] == first["teacher"]["answers_paid"]
    assert rest["teacher"]["answers_paid"] == 40 - first["teacher"]["answers_paid"]
    assert rest["dollars"]["cached_usd"] == pytest.approx(first["dollars"]["spent_this_run_usd"])


def test_budget_too_small_for_one_call(run, teacher_files):
    result = run(*relabel(teacher_files, budget="0.00000001"))
    assert result.exit_code == 1 and "cannot pay for a single teacher call" in result.output


def test_answers_outside_the_schema_are_dropped(run, teacher_files, texts, tmp_path):
    allowed = sorted({label for _, label in texts[:20]})
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["intent"],
                                  "properties": {"intent": {"enum": allowed}}}))
    manifest, train, held_out = built(run(*relabel(teacher_files), "--json-schema", str(schema)))
    outside = sum(label not in allowed for _, label in texts)
    assert manifest["filters"]["schema_mismatch"] == outside and len(train) + len(held_out) == 40 - outside


def test_export_openai_jsonl(run, teacher_files):
    result = run(*relabel(teacher_files), "--export", "openai-jsonl")
    folder = Path(result.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(lines) == built(result)[0]["split"]["train"]
    assert {tuple(m["role"] for m in line["messages"]) for line in lines} == {("system", "user", "assistant")}
    assert lines[0]["messages"][0]["content"] == APP_PROMPT and json.loads(lines[0]["messages"][-1]["content"])


def test_teacher_503s_are_retried(run, teacher_files):
    manifest, _, _ = built(run(*relabel(teacher_files, model="recover-2:gpt-4o-mini"), "--max-examples", "3"))
    assert manifest["teacher"]["answers_paid"] == 3 and manifest["filters"]["over_max_examples"] == 37


def test_teacher_that_keeps_failing_stops_with_a_clear_error(run, teacher_files, tmp_path):
    result = run(*relabel(teacher_files, model="error-429:gpt-4o-mini"), "--max-examples", "2")
    assert result.exit_code == 1 and "answered 429" in result.output and "resumes" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "datasets" / PATH / "v1").exists()


def call_record(n: int, text: str, message: dict, finish: str = "stop", **request) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": APP_PROMPT},
                                                 {"role": "user", "content": text}], **request}
    reply = {"model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": finish, "message": {
        "role": "assistant", "content": None, **message}}]}
    return {"request_id": f"r{n}", "ts": datetime.now(UTC), "path": "crafted", "endpoint": "chat.completions",
            "status_code": 200, "served_by": "upstream", "cost_usd": 0.0001, "request": json.dumps(body),
            "response": json.dumps(reply)}


CARD = {"content": '{"intent": "card_arrival"}'}
CRAFTED = [
    ("I am still waiting on my card?", CARD, {}),
    ("  i am STILL waiting on my card? ", CARD, {}),  # exact duplicate
    ("Is there a reason my new card hasn't arrived?", CARD, {}),
    ("Is there a reason my new card hasn't arrived yet?", CARD, {}),  # near duplicate
    ("How do I top up my account?", {"content": "top_up_by_card"}, {}),  # not JSON
    ("Tell me how to rob a bank.", {"content": "I'm sorry, but I can't help with that."}, {}),  # refusal
    ("Tell me how to forge a cheque.", {"refusal": "I can't help with that."}, {}),  # refusal field
    ("What is my balance?", {"content": '{"intent": "balance"}'}, {"tools": [{"type": "function"}]}),  # unsupported
    ("Why was my card declined?", {"content": '{"intent": "card_'}, {"finish": "length"}),  # truncated
    ("Why was my transfer declined?", {"content": '{"intent": "declined_transfer"}'}, {}),
]


def test_filters_on_a_crafted_capture(run, tmp_path):
    store = CaptureStore(tmp_path / "crafted")
    store.open()
    for n, (text, message, request) in enumerate(CRAFTED):
        store.append("calls", call_record(n, text, message, **request))
    store.close()
    manifest, train, held_out = built(run(data_dir=tmp_path / "crafted", path="crafted"))
    assert {k: v for k, v in manifest["filters"].items() if v} == {
        "captured_calls": 10, "unsupported": 1, "exact_duplicate": 1, "near_duplicate": 1, "invalid_json": 1,
        "refusal": 2, "truncated": 1, "kept": 3}


RELABEL = ["--relabel", "--teacher-model", "gpt-4o-mini", "--system-prompt-file", "{prompt}", "--budget-usd", "1"]


@pytest.mark.parametrize("path, args, message", [
    ("nowhere", [], "no captured chat completions for path 'nowhere' in"),
    (PATH, RELABEL[:3] + RELABEL[5:], "--relabel needs --system-prompt-file"),
    (PATH, RELABEL[:4] + ["missing.txt"] + RELABEL[5:], "system prompt file not found: missing.txt"),
    (PATH, RELABEL[:2] + ["claude-3-haiku"] + RELABEL[3:], "no upstream in the config serves teacher model"),
    (PATH, RELABEL[:-1] + ["0"], "--budget-usd must be more than 0"),
    (PATH, ["--json-schema", "{schema}"], "is not a valid JSON schema"),
    (PATH, ["--teacher-model", "gpt-4o-mini"], "only apply with --relabel"),
    (PATH, ["--eval-fraction", "1"], "--eval-fraction must be at least 0 and less than 1"),
])
def test_user_mistakes_get_one_line_errors(run, teacher_files, tmp_path, path, args, message):
    (tmp_path / "bad.json").write_text('{"type": 12}')
    places = {"prompt": str(teacher_files["prompt"]), "schema": str(tmp_path / "bad.json")}
    result = run(*(arg.format(**places) for arg in args), path=path)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def paced_sim(tmp_path_factory):
    """A simulator answering after 300 ms, so a build can be interrupted half-way."""
    process = simulator(tmp_path_factory.mktemp("paced"), "--latency-ms", "300", "--latency-sigma", "0").start()
    yield process
    process.stop()


def build_process(captured: Path, sim_url: str, teacher_files, tmp_path: Path) -> list[str]:
    (tmp_path / "paced.toml").write_text(TEACHER_CONFIG.format(sim=sim_url))
    return [sys.executable, "-m", "distill.build_command", "build", PATH, "--data-dir", str(captured),
            "--datasets-dir", str(tmp_path / "datasets"), "--config", str(tmp_path / "paced.toml"),
            *relabel(teacher_files), "--concurrency", "1", "--max-examples", "8"]


def interrupt_after_answers(args: list[str], cache: Path, answers: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_works)  # noqa: PLW1509
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (cache.exists() and cache.read_text().count("\n") >= answers):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def test_ctrl_c_keeps_paid_answers_and_a_rerun_resumes(captured, paced_sim, teacher_files, tmp_path):
    args = build_process(captured, paced_sim.url, teacher_files, tmp_path)
    cache = tmp_path / "datasets" / PATH / "cache" / "teacher-answers.jsonl"
    stopped = interrupt_after_answers(args, cache, 2)
    paid = cache.read_text().count("\n")
    assert stopped.returncode == 130 and "resumes without paying" in stopped.stderr and 2 <= paid < 8
    assert not (tmp_path / "datasets" / PATH / "v1").exists()
    manifest = json.loads((Path(subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip())
                           / "manifest.json").read_text())
    assert (manifest["teacher"]["answers_cached"], manifest["teacher"]["answers_paid"]) == (paid, 8 - paid)
