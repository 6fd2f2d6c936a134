"""``arbitrage distill eval``: a real adapter (a few real LoRA steps on the SmolLM2 base) served by
the session's real vLLM (CPU build), compared with the teacher's answers.

The task is one the adapter learns in a few steps (every training answer is the same JSON), and
the eval split's teacher answers disagree with it on known examples, so agreement and the
per-example verdicts have exact expected values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from distill.eval_command import evaluate as eval_command
from distill.evaluation import Prediction, disagreements, eval_rows, find_adapter
from tests.conftest import CARD_ARRIVAL, INTENTS_PATH

PATH = INTENTS_PATH
ANSWER = CARD_ARRIVAL


@pytest.fixture(scope="module")
def trained(intents_adapter, tmp_path_factory) -> Path:
    """A copy of the session's data dir with the trained adapter (evals written here stay here)."""
    data_dir = tmp_path_factory.mktemp("eval") / "data"
    shutil.copytree(intents_adapter, data_dir)
    return data_dir


def run_eval(data_dir: Path, *args: str):
    return CliRunner().invoke(eval_command, [PATH, "--data-dir", str(data_dir), *args])


def test_eval_measures_agreement_confidence_and_the_curve(trained, vllm):
    result = run_eval(trained, "--vllm-url", vllm.base_url, "--target", "0.75", "--min-samples", "1")
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((folder / "manifest.json").read_text())
    predictions = pq.read_table(folder / "predictions.parquet").to_pylist()

    assert folder == trained / "evals" / PATH / "v1" / "v1"
    assert (manifest["examples"], manifest["errors"], manifest["comparator"]) == (8, 0, "json")
    assert [p["answer"] for p in predictions] == [ANSWER] * 8, "the adapter learned its one answer"
    assert [p["agreed"] for p in predictions] == [True] * 6 + [False] * 2
    assert manifest["agreement"] == 0.75
    assert all(0 < p["confidence"] <= p["confidence_min"] <= 1 for p in predictions)
    curve = pq.read_table(folder / "curve.parquet").to_pylist()
    assert curve[0]["coverage"] == 1.0 and curve[0]["agreement"] == 0.75
    assert [c["threshold"] for c in curve] == sorted(c["threshold"] for c in curve)
    assert manifest["at_target"]["coverage"] == 1.0
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "75.0% agreement" in result.stderr and "served" in result.stderr
    assert vllm.base_url and f"{PATH}/v1" in _served(vllm)

    # the disagreements, most confident first, with the inputs a person reads them by
    disagreements = pq.read_table(folder / "disagreements.parquet").to_pylist()
    wrong = {p["example_id"]: p for p in predictions if not p["agreed"]}
    inputs = {row["example_id"]: json.loads(row["input_messages"])[-1]["content"]
              for row in eval_rows(find_adapter(trained / "adapters", PATH, None), None)}
    assert manifest["disagreements"] == len(disagreements) == 2 and {d["example_id"] for d in disagreements} == set(wrong)
    assert [d["confidence"] for d in disagreements] == sorted((p["confidence"] for p in wrong.values()), reverse=True)
    assert all(d["input"] == inputs[d["example_id"]] and d["answer"] == ANSWER != d["expected"] for d in disagreements)
    assert "2 answers disagree with the teacher" in result.stderr and "disagreements.parquet" in result.stderr


def test_a_second_eval_is_a_new_version_and_the_adapter_stays_loaded(intents_adapter, vllm, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(intents_adapter, data_dir)
    folders = []
    for _ in range(2):
        result = run_eval(data_dir, "--vllm-url", vllm.base_url, "--max-examples", "2", "--comparator", "exact")
        assert result.exit_code == 0, result.output
        folders.append(Path(result.stdout.strip().splitlines()[-1]))
    assert [f.name for f in folders] == ["v1", "v2"]
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    assert (manifest["examples"], manifest["agreement"]) == (2, 1.0)
    assert manifest["at_target"] is None or manifest["at_target"]["agreement"] >= 0.99
    assert json.loads((folders[0] / "manifest.json").read_text())["examples"] == 2, "the first eval is kept"
    assert f"{PATH}/v1" in _served(vllm)


def _served(vllm) -> list[str]:
    from deploy.vllm import LocalClient

    return [m["id"] for m in LocalClient(vllm.base_url).models()]


# Bad input: clear messages, nothing written


def test_unknown_path_and_version_are_clear_errors(trained, tmp_path):
    result = CliRunner().invoke(eval_command, ["nope", "--data-dir", str(trained)])
    assert result.exit_code == 1 and "no adapter for path 'nope'" in result.output
    assert "train one with `arbitrage distill train nope`" in result.output
    result = run_eval(trained, "--adapter", "v9")
    assert result.exit_code == 1 and "has no adapter v9 (versions: v1)" in result.output
    result = run_eval(trained, "--adapter", "latest")
    assert result.exit_code == 1 and "--adapter must look like v1" in result.output
    result = run_eval(trained, "--target", "1.5")
    assert result.exit_code == 1 and "--target must be more than 0 and at most 1" in result.output


def test_unreachable_vllm_is_a_clear_error_and_writes_nothing(trained):
    before = sorted((trained / "evals").rglob("*")) if (trained / "evals").exists() else []
    result = run_eval(trained, "--vllm-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1 and "no healthy vLLM at http://127.0.0.1:9/v1" in result.output
    assert "Traceback" not in result.output
    after = sorted((trained / "evals").rglob("*")) if (trained / "evals").exists() else []
    assert after == before


def test_corrupt_eval_split_is_a_clear_error(trained, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(trained, data_dir, ignore=shutil.ignore_patterns("evals"))
    manifest_file = data_dir / "adapters" / PATH / "v1" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    dataset = data_dir / "datasets" / PATH / "v1"
    manifest["dataset"]["folder"] = str(dataset)
    manifest_file.write_text(json.dumps(manifest))
    (dataset / "eval.parquet").write_bytes(b"not parquet at all")
    result = run_eval(data_dir, "--vllm-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1 and "cannot read the eval split" in result.output
    assert not (data_dir / "evals").exists()


def test_disagreements_come_most_confident_first_with_their_inputs_as_text():
    rows = [{"example_id": "a", "input_messages": json.dumps([{"role": "user", "content": "where is my card"}])},
            {"example_id": "b", "input_messages": json.dumps(
                [{"role": "user", "content": [{"type": "text", "text": "my card is stuck"}]}])},
            {"example_id": "c", "input_messages": json.dumps([{"role": "user", "content": "hello"}])}]
    predictions = [Prediction("a", "x", "y", confidence=0.5), Prediction("b", "x", "z", confidence=0.9),
                   Prediction("c", "x", "x", confidence=0.99, agreed=True), Prediction("d", "x", None, error="timeout")]
    found = disagreements(predictions, rows)
    assert [(d["example_id"], d["confidence"], d["answer"]) for d in found] == [("b", 0.9, "z"), ("a", 0.5, "y")]
    assert json.loads(found[0]["input"]) == [{"type": "text", "text": "my card is stuck"}]
    assert found[1]["input"] == "where is my card"
