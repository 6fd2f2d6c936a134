"""``arbitrage demo``: the whole loop on real parts (simulator, gateway, SmolLM2 training, vLLM CPU
build), run as a user runs it, asserting on the outcome it records in ``demo.json``.

The end-to-end test starts its own vLLM through the demo (the command as a user runs it) and so
does not use the session ``vllm`` fixture; it takes ``base_folder`` so the base model is prepared
once per session, in ``$ARBITRAGE_MODEL_CACHE`` when set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from arbitrage.demo import QUICK, load_texts, new_run_dir
from distill.base import CACHE_ENV
from tests.processes import ARBITRAGE, ctrl_c_works

END_TO_END_TIMEOUT_S = 20 * 60
"""The quick run takes under 10 minutes on an idle 2-core machine; CI machines are shared."""


def demo(root: Path, *args: str, models_dir: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **({CACHE_ENV: str(models_dir)} if models_dir else {})}
    return subprocess.run(ARBITRAGE + ["demo", "--quick", "--data-dir", str(root), *args], check=False,
                          capture_output=True,
                          text=True, timeout=timeout, env=env)


def results(root: Path) -> dict:
    (run,) = root.glob("run-*")
    return json.loads((run / "demo.json").read_text())


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


def test_quick_texts_are_five_intents_and_the_ramp_never_sees_a_captured_text():
    texts = load_texts(QUICK)
    captured = {text for text, _ in texts.capture}
    assert len(texts.intents) == 5 and len(texts.capture) == QUICK.capture_requests
    assert {label for _, label in texts.capture + texts.fresh} == set(texts.intents)
    assert not captured & {text for text, _ in texts.fresh}
    assert len(texts.fresh) >= QUICK.ramp_requests


def test_every_run_gets_a_fresh_folder(tmp_path):
    assert new_run_dir(tmp_path) != new_run_dir(tmp_path)


def test_capture_and_paths_then_every_server_is_stopped(tmp_path):
    result = demo(tmp_path, "--stop-after", "paths")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = results(tmp_path)
    assert outcome["steps"]["capture"]["records"] == QUICK.capture_requests
    assert outcome["steps"]["paths"]["top"] == "support-intents"
    assert outcome["steps"]["paths"]["verdict"] == "distillable"
    assert "support-intents" in result.stderr and "distillable" in result.stderr
    assert not any(answers(s["url"]) for s in outcome["servers"].values())


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path):
    process = subprocess.Popen(ARBITRAGE + ["demo", "--quick", "--data-dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_works)  # noqa: PLW1509
    try:
        servers = wait_for_servers(tmp_path, ("sim", "gateway"), timeout=60)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            # An impatient user keeps pressing Ctrl-C: no press, during the clean-up or after it, may cut the
            # clean-up short or turn the exit into a traceback.
            process.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # the test failed: stop the demo (SIGTERM cleans up too) before leaving
            process.terminate()
            process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
    assert not any(answers(s["url"]) for s in servers.values())
    assert not any(alive(s["pid"]) for s in servers.values())


def test_the_first_interrupt_raises_once_and_every_later_one_is_ignored_at_the_os_level():
    from arbitrage.demo import _Interrupts

    interrupts = _Interrupts()
    previous = {sig: signal.signal(sig, interrupts) for sig in interrupts.SIGNALS}
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is cut short by it
        assert interrupts.raised
        # Ignored by the OS, not by a Python handler: the interpreter resets those to the default action as it
        # shuts down, and a late press would then kill the exiting demo.
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in interrupts.SIGNALS)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)

        closing = _Interrupts()
        closing.closing = True  # the clean-up has begun: a press is ignored from then on and raises nothing
        signal.signal(signal.SIGINT, closing)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert not closing.raised and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_an_interrupt_inside_code_built_from_a_string_still_exits_with_130(tmp_path):
    # dataclasses and namedtuple build methods with exec() of a string, so an import can run such code; a plain
    # KeyboardInterrupt leaving it makes CPython end a ``python -m`` process by SIGINT even after the demo caught
    # it and cleaned up (seen in CI: a Ctrl-C'd demo ended with -2, not 130).
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import os, signal, sys\n"
        "from arbitrage.demo import _Interrupts\n"
        "signal.signal(signal.SIGINT, _Interrupts())\n"
        "try:\n"
        "    exec('os.kill(os.getpid(), signal.SIGINT)')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    result = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-3000:]


def wait_for_servers(root: Path, names: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            servers = results(root)["servers"]
        except (ValueError, OSError):
            servers = {}
        if all(name in servers for name in names):
            return servers
        time.sleep(0.2)
    raise AssertionError(f"the demo did not start {names} within {timeout} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, models_dir, base_folder) -> tuple[subprocess.CompletedProcess, dict, float]:
    """One whole ``arbitrage demo --quick`` run (time-boxed)."""
    root = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    result = demo(root, models_dir=models_dir, timeout=END_TO_END_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]
    return result, results(root), time.monotonic() - started


def test_quick_demo_captures_distills_trains_and_evaluates(quick_run):
    _, outcome, _ = quick_run
    steps = outcome["steps"]
    assert steps["capture"]["records"] == QUICK.capture_requests
    assert steps["build"]["train"] + steps["build"]["eval"] == QUICK.capture_requests
    assert Path(steps["build"]["folder"], "manifest.json").is_file()
    assert steps["train"]["steps"] == QUICK.train_steps and Path(steps["train"]["folder"], "adapter_config.json").is_file()
    assert steps["eval"]["examples"] == QUICK.eval_examples and 0 <= steps["eval"]["agreement"] <= 1
    assert Path(steps["eval"]["chart"]).is_file()
    assert not any(answers(s["url"]) for s in outcome["servers"].values()), "servers left running"


def test_quick_demo_serves_locally_after_promotion_and_saves_money(quick_run):
    result, outcome, _ = quick_run
    steps = outcome["steps"]
    assert steps["promote"]["route"]["policy"]["mode"] == "shadow"
    assert steps["ramp"]["served_locally"] > 0
    roi = steps["roi"]
    assert roi["served_locally"] > 0 and roi["comparisons"] > 0 and roi["agreement"] is not None
    assert roi["saved_usd"] > 0
    assert Path(roi["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "saved" in result.stderr and "Grafana" in result.stderr


def test_quick_demo_records_its_assumptions_and_time(quick_run):
    result, outcome, seconds = quick_run
    assert outcome["profile"]["name"] == "quick" and "assumptions of this run" in result.stderr
    assert outcome["seconds"] <= seconds


def test_operating_point_and_breakeven_from_the_calls_after_the_last_route_change():
    from datetime import UTC, datetime, timedelta

    from arbitrage.demo import Economics
    from arbitrage.demo_report import breakeven, operating_point

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    calls = [{"ts": t0 + timedelta(seconds=i), "served_by": "local" if i >= 10 and i % 2 else "upstream",
              "before_usd": 0.001, "paid_usd": 0.0 if i >= 10 and i % 2 else 0.001} for i in range(20)]
    changes = [{"ts": t0 + timedelta(seconds=10), "mode_after": "canary", "share_after": 50.0}]
    audits = [{"ts": t0 + timedelta(seconds=12), "cost_usd": 0.001}]
    point = operating_point(calls, audits, changes)
    assert (point["requests"], point["local_share"], point["share"]) == (10, 0.5, 50.0)
    assert point["saved_per_request_usd"] == pytest.approx((5 * 0.001 - 0.001) / 10)
    even = breakeven({"operating_point": point, "one_time_usd": 0.5}, Economics(serving_usd_per_hour=0.1,
                                                                               volume_per_day=10_000))
    assert even["server_pays_off_at_requests_per_hour"] == pytest.approx(0.1 / 0.0004)
    assert even["saved_per_day_usd"] == pytest.approx(10_000 * 0.0004 - 2.4)
    assert even["days"] == pytest.approx(0.5 / (4.0 - 2.4))


def test_no_breakeven_when_the_route_saves_nothing():
    from arbitrage.demo import Economics
    from arbitrage.demo_report import breakeven

    point = {"saved_per_request_usd": -0.0001}
    assert breakeven({"operating_point": point, "one_time_usd": 0.1}, Economics()) is None
    assert breakeven({"operating_point": None, "one_time_usd": 0.1}, Economics()) is None
