"""What makes vLLM's CPU build fast here (bench/vllm_cpu.py measures it): the grouped LoRA ops
(deploy/vllm_cpu_lora, a vLLM plugin) against vLLM's own, run in vLLM's environment (.venv-vllm);
the plugin at work in the session's real vLLM; the server's environment (preloaded libraries,
reserved cores) and the dtype it serves in; answers drafted from the answers given before
(speculative decoding with deploy/vllm_cpu_lora/arbitrage_vllm_answers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

import deploy.vllm
from arbitrage.config import LocalSettings, load_config
from arbitrage.errors import ConfigError
from arbitrage.machine import cpu_flags, cpu_name
from deploy.vllm import LocalClient, LocalServer, free_port, vllm_python
from tests.conftest import INTENTS_PATH, INTENTS_PROMPT, banking77

COMPARE = r"""
import json, torch
import vllm.lora.ops.torch_ops.lora_ops as stock
import arbitrage_vllm_cpu_lora as grouped

torch.manual_seed(0)
tokens, hidden, rank, out_features, loras = 7, 24, 4, 40, 3
cases = {"one adapter": torch.full((tokens,), 1), "two adapters": torch.tensor([0, 2, 2, 0, 1, 2, 0]),
         "some without adapter": torch.tensor([1, -1, 1, -1, -1, 1, 1]), "none": torch.full((tokens,), -1)}
result = {}
for dtype in (torch.float32, torch.bfloat16):
    a = torch.randn(loras, 1, rank, hidden, dtype=dtype)
    b = torch.randn(loras, 1, out_features, rank, dtype=dtype)
    x = torch.randn(tokens, hidden, dtype=dtype)
    h = torch.randn(tokens, rank, dtype=dtype)
    for case, idx in cases.items():
        valid = idx >= 0
        diffs = {}
        # op -> (call, output width, the columns it writes, whether it adds to them)
        for name, (run, width, cols, adds) in {
            "shrink": (lambda ops, o: ops.bgmv_shrink(x, a, o, idx, 0.5), rank, slice(0, rank), False),
            "expand": (lambda ops, o: ops.bgmv_expand(h, b, o, idx, True), out_features, slice(None), True),
            "expand overwrite": (lambda ops, o: ops.bgmv_expand(h, b, o, idx, False), out_features, slice(None), False),
            "expand slice": (lambda ops, o: ops.bgmv_expand_slice(h, b, o, idx, 8, out_features, True),
                             out_features + 16, slice(8, 8 + out_features), True),
        }.items():
            base = torch.randn(tokens, width, dtype=dtype)
            mine, theirs = base.clone(), base.clone()
            run(grouped, mine)
            run(stock, theirs)
            without = mine[~valid][:, cols]
            expected = base[~valid][:, cols] if adds else torch.zeros_like(without)
            diffs[name] = {"with adapter": float((mine[valid] - theirs[valid]).abs().max()) if valid.any() else 0.0,
                           "no delta without adapter": bool((without == expected).all())}
        result[f"{dtype} {case}"] = diffs
# the prefill form (sgmv): lora index per sequence, sequences of 3, 1 and 3 tokens
lens, seq_idx = torch.tensor([3, 1, 3]), torch.tensor([2, -1, 0])
x, a = torch.randn(7, 24), torch.randn(3, 1, 4, 24)
mine, theirs = torch.zeros(7, 4), torch.zeros(7, 4)
grouped.sgmv_shrink(x, a, mine, None, lens, seq_idx, 3, 3, 7, 1.0)
stock.sgmv_shrink(x, a, theirs, None, lens, seq_idx, 3, 3, 7, 1.0)
keep = torch.tensor([True, True, True, False, True, True, True])
result["sgmv"] = {"shrink": {"with adapter": float((mine[keep] - theirs[keep]).abs().max()),
                             "no delta without adapter": bool((mine[3] == 0).all())}}
print(json.dumps(result))
"""


def test_grouped_ops_match_vllms_own_and_leave_base_tokens_alone():
    env = {**os.environ, "ARBITRAGE_LORA_OPS": "stock"}
    out = subprocess.run([vllm_python(LocalSettings()), "-c", COMPARE], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result) == 9
    for case, ops in result.items():
        tolerance = 0.1 if "bfloat16" in case else 1e-4  # bf16: one rounding step of values near 10
        for name, diff in ops.items():
            assert diff["with adapter"] <= tolerance, (case, name, diff)
            assert diff["no delta without adapter"], (case, name, "a token without adapter got a LoRA delta")


def test_the_session_vllm_runs_with_the_grouped_ops(vllm):
    log = vllm.log_path.read_text(errors="replace")
    assert "arbitrage: grouped CPU LoRA ops in place of vLLM's per-token weight gather" in log


@pytest.fixture
def cpu_only(monkeypatch, tmp_path):
    """A machine without GPU, a vLLM environment with Intel OpenMP, and an LD_PRELOAD of its own."""
    monkeypatch.setattr(deploy.vllm, "has_gpu", lambda: False)
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    python = tmp_path / "venv" / "bin" / "python"
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    return str(python)


def environment(python: str, **settings) -> dict[str, str]:
    return LocalServer(LocalSettings(python=python, **settings), "base", Path("/nonexistent")).environment()


def test_openmp_and_tcmalloc_are_preloaded_before_the_users_own(cpu_only):
    preload = environment(cpu_only)["LD_PRELOAD"].split(":")
    assert preload[0] == str(Path(cpu_only).parent.parent / "lib" / "libiomp5.so")
    assert "libtcmalloc_minimal.so.4" in preload[1], "scripts/install installs Debian libtcmalloc-minimal4"
    assert preload[-1] == "/opt/mine.so"
    assert environment(cpu_only, preload=False)["LD_PRELOAD"] == "/opt/mine.so"


def test_reserved_cores(cpu_only, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert environment(cpu_only)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0", "a small machine keeps no core back"
    assert environment(cpu_only, reserved_cpus=1)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in environment(cpu_only), "a large one: vLLM's default"
    with pytest.raises(ValueError, match="local.reserved_cpus must be 0 or more, got -1"):
        LocalSettings(reserved_cpus=-1)


def command(**settings) -> list[str]:
    return LocalServer(LocalSettings(python="python", **settings), "base", Path("/nonexistent")).command()


def test_float32_is_served_on_a_cpu_without_bfloat16_instructions(monkeypatch, tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    cpu = {"gpu": False}
    assert deploy.vllm.served_dtype(LocalSettings(), flags=cpu_flags(avx2), **cpu) == "float32"
    assert deploy.vllm.served_dtype(LocalSettings(), flags=cpu_flags(amx), **cpu) is None
    assert deploy.vllm.served_dtype(LocalSettings(), flags=cpu_flags(arm), **cpu) is None
    assert deploy.vllm.served_dtype(LocalSettings(), gpu=True, flags=set()) is None, "a GPU: vLLM's own choice"
    assert deploy.vllm.served_dtype(LocalSettings(dtype="bfloat16"), flags=cpu_flags(avx2),
                                    **cpu) == "bfloat16", "a configured dtype is used as it is"
    assert cpu_flags(tmp_path / "missing") == set()
    assert cpu_name(avx2) == "AMD EPYC"

    monkeypatch.setattr(deploy.vllm, "has_gpu", lambda: False)
    monkeypatch.setattr(deploy.vllm, "cpu_flags", lambda: {"avx2"})
    cmd = command()
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    cmd = command(extra_args=["--dtype", "bfloat16"])
    assert cmd[-2:] == ["--dtype", "bfloat16"], "the user's own arguments come last, so vLLM takes them"
    monkeypatch.setattr(deploy.vllm, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert "--dtype" not in command()


def test_a_dtype_vllm_does_not_serve_is_a_config_error(tmp_path):
    config = tmp_path / "arbitrage.toml"
    config.write_text('[local]\ndtype = "int8"\n')
    with pytest.raises(ConfigError, match=r"local\.dtype"):
        load_config(config)


# The answer proposer (deploy/vllm_cpu_lora/arbitrage_vllm_answers.py) is plain Python over numpy arrays:
# its logic is tested here, its work inside vLLM below.
sys.path.insert(0, str(Path(__file__).parent.parent / "deploy" / "vllm_cpu_lora"))
import arbitrage_vllm_answers as answers


def test_answers_are_drafted_from_the_most_frequent_answer_given_before():
    trie = answers.AnswerTrie()
    assert trie.draft(trie.observe([5], 1), 8) == [], "nothing seen: nothing drafted"
    for answer in ([5, 6, 7, 9], [5, 6, 8, 9], [5, 6, 8, 9]):
        for end in range(2, len(answer) + 1):  # one token a step, as vLLM reports them
            trie.observe(answer[:end], 1)
    assert trie.draft(trie.observe([5], 1), 8) == [6, 8, 9], "the most frequent continuation"
    assert trie.draft(trie.observe([5, 6], 1), 1) == [8], "at most the draft limit"
    assert trie.draft(trie.observe([5, 6, 7], 1), 8) == [9], "the rest of the answer so far"
    assert trie.draft(trie.observe([4], 1), 8) == [], "an answer never seen"


def test_tokens_drafted_and_then_accepted_are_counted_once():
    trie = answers.AnswerTrie()
    trie.observe([5, 6], 2)
    trie.observe([5, 6, 7, 8], 2)  # a step that accepted a draft: two new tokens
    assert [trie.root[5][0], trie.root[5][1][6][0], trie.root[5][1][6][1][7][0]] == [1, 1, 1]


def test_a_full_trie_stops_growing_but_still_drafts_what_it_holds():
    trie = answers.AnswerTrie(max_nodes=3)
    trie.observe([1, 2, 3], 3)
    assert trie.observe([1, 2, 3, 4], 1) is None and trie.nodes == 3
    assert trie.observe([7], 1) is None, "no room for a new answer"
    assert trie.draft(trie.observe([1], 1), 8) == [2, 3]


def test_the_answer_starts_after_the_last_assistant_header():
    header = [1, 9, 2]
    context = np.array([1, 9, 2, 40, 1, 4, 1, 9, 2, 50, 51])
    assert answers.answer_start(context, header) == 9
    assert answers.answer_start(np.array([1, 9, 3, 50]), header) is None
    assert answers.answer_start(context, []) is None, "a template the proposer does not know: no drafts"


def test_answers_are_drafted_without_a_gpu_and_not_with_one(monkeypatch):
    monkeypatch.setattr(deploy.vllm, "has_gpu", lambda: False)
    cmd = command()
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {"method": "custom_class", "model": "arbitrage_vllm_answers.AnswerProposer",
                    "num_speculative_tokens": 8}
    cmd = command(draft_tokens=4)
    assert json.loads(cmd[cmd.index("--speculative-config") + 1])["num_speculative_tokens"] == 4
    assert "--speculative-config" not in command(draft_answers=False)
    monkeypatch.setattr(deploy.vllm, "has_gpu", lambda: True)
    assert "--speculative-config" not in command(), "a GPU: vLLM's own decoding (the plugin is CPU-only)"
    assert "--speculative-config" in command(draft_answers=True)
    with pytest.raises(ValueError, match="draft_tokens must be at least 1"):
        LocalSettings(draft_tokens=0)


def ask_twice(base_url: str, model: str, texts: list[str]) -> list[dict]:
    """Each text's answer and per-token log-probs, asked twice in a row (the second time, a drafting
    server has seen the answer)."""
    out = []
    for text in texts + texts:
        reply = httpx.post(f"{base_url}/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 24, "temperature": 0, "logprobs": True,
            "messages": [{"role": "system", "content": INTENTS_PROMPT}, {"role": "user", "content": text}]})
        reply.raise_for_status()
        choice = reply.json()["choices"][0]
        out.append({"answer": choice["message"]["content"],
                    "logprobs": [t["logprob"] for t in choice["logprobs"]["content"]]})
    return out


def test_drafted_answers_and_their_log_probs_are_the_models_own(vllm, intents_adapter, tmp_path):
    """The session's vLLM drafts answers (the default without a GPU); a second one that does not must give
    the same answers and log-probs, and the first must have accepted drafted tokens."""
    assert "Loaded custom proposer class 'arbitrage_vllm_answers.AnswerProposer'" in vllm.log_path.read_text(
        errors="replace")
    folder = intents_adapter / "adapters" / INTENTS_PATH / "v1"
    texts = banking77("card_arrival", every=20)[:3] + banking77(other_than="card_arrival", every=900)[:3]
    plain = LocalServer(msgspec.structs.replace(vllm.settings, draft_answers=False), vllm.base_location,
                        tmp_path / "plain", port=free_port())
    plain.start()
    try:
        results = {}
        for name, server in {"drafting": vllm, "plain": plain}.items():
            client = LocalClient(server.base_url)
            try:
                client.load_adapter("drafts", folder)
                results[name] = ask_twice(server.base_url, "drafts", texts)
            finally:
                client.unload_adapter("drafts")
                client.close()
        assert "Loaded custom proposer class" not in plain.log_path.read_text(errors="replace")
        metrics = httpx.get(vllm.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    finally:
        plain.stop()
    assert [r["answer"] for r in results["drafting"]] == [r["answer"] for r in results["plain"]]
    for drafted, own in zip(results["drafting"], results["plain"], strict=True):
        assert len(drafted["logprobs"]) == len(own["logprobs"]), (drafted, own)
        assert max(abs(a - b) for a, b in zip(drafted["logprobs"], own["logprobs"], strict=True)) < 2e-3
    accepted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("vllm:spec_decode_num_accepted_tokens_total"))
    assert accepted > 0, "repeated answers were drafted and the model accepted the drafts"
