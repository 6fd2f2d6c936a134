"""LoRA training speed on this CPU, settings side by side: which layers get LoRA, and bf16 autocast.

    .venv/bin/python bench/lora_layers_speed.py fp32 top15 top10       # fp32; LoRA on all / top 15 / top 10 layers
    .venv/bin/python bench/lora_layers_speed.py fp32 amp               # fp32 against bf16 autocast

Each setting trains 6 batches of 16 Banking77 training texts (the distillation benchmark's prompt:
short system prompt, label-only JSON answer, loss on the answer, output head on answer positions
only) with AdamW, rank 16 on every linear layer of the chosen layers; three rounds, alternating
settings, and the median of rounds 2-3 (round 1 warms up). A setting's name holds its options:
"amp" (bf16 autocast), "bf16w" (frozen weights stored in bf16), "top15"/"top10" (LoRA on the upper
layers only, so the backward pass stops there); any other name ("fp32") is the plain setting.
Prints training tokens/s (non-padding). On 2026-12-03's AVX2-only AMD EPYC, "amp" and "bf16w" did
not finish their rounds in 10 minutes (bf16 matmuls run 6x slower than fp32 there): not measured.
Results: bench/RESULTS-distill.md ("Training speed on an AVX2-only CPU").
"""
import csv, json, random, sys, time, statistics
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_banking77 import DATA, SHORT_PROMPT  # noqa: E402 (also puts the project on sys.path)
from distill.base import DEFAULT_BASE, resolve_base  # noqa: E402
from distill.training.data import ChatEncoder  # noqa: E402

BASE = resolve_base(DEFAULT_BASE).location
tok = AutoTokenizer.from_pretrained(BASE)
encoder = ChatEncoder(tok)
rows = list(csv.DictReader(open(DATA / "train.csv")))
random.seed(0); random.shuffle(rows)
def enc(r):
    e = encoder.encode([{"role": "system", "content": SHORT_PROMPT}, {"role": "user", "content": r["text"]}],
                       json.dumps({"intent": r["category"]}))
    return e["input_ids"], e["labels"]
ex = [enc(r) for r in rows[:16 * 6]]
print("mean tokens", statistics.mean(len(e[0]) for e in ex))
def batches():
    for i in range(0, len(ex), 16):
        b = ex[i:i+16]; n = max(len(e[0]) for e in b)
        ids = torch.tensor([e[0] + [tok.pad_token_id] * (n - len(e[0])) for e in b])
        lab = torch.tensor([e[1] + [-100] * (n - len(e[1])) for e in b])
        att = torch.tensor([[1] * len(e[0]) + [0] * (n - len(e[0])) for e in b])
        yield ids, att, lab, sum(len(e[0]) for e in b)

def make(variant):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bf16w" in variant else torch.float32
    m = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype)
    layers = list(range(15, 30)) if "top15" in variant else (list(range(20, 30)) if "top10" in variant else None)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], layers_to_transform=layers, task_type="CAUSAL_LM")
    m = get_peft_model(m, cfg)
    if "bf16w" in variant:
        for p in m.parameters():
            if p.requires_grad: p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    return m, opt

def step(m, opt, ids, att, lab, variant):
    targets = lab[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="amp" in variant):
        out = m(input_ids=ids, attention_mask=att, logits_to_keep=keep)
    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

variants = sys.argv[1:]
models = {v: make(v) for v in variants}
res = {v: [] for v in variants}
for rnd in range(3):
    for v in variants:
        m, opt = models[v]
        toks = 0; t = time.perf_counter()
        for ids, att, lab, n in batches():
            step(m, opt, ids, att, lab, v); toks += n
        res[v].append(toks / (time.perf_counter() - t)); print(v, rnd, round(res[v][-1]), flush=True)
for v in variants:
    print(f"{v:20s} tok/s rounds {[round(x) for x in res[v]]} median {statistics.median(res[v][1:]):.0f}")
