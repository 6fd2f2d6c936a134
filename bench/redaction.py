"""Cost of capture redaction per record: ``Redactor.record`` on realistic ``calls`` records.

Three record shapes, each a chat request (system prompt + user message) and its chat.completion:
clean text (the common case: one regex scan per body, nothing parsed), text with one e-mail
address, phone and card number each (parse, redact, re-serialise), and a long clean prompt
(about 8 KB). Prints microseconds per record (median of repeats) and the share of the gateway's
per-request CPU budget at its measured 3,465 requests/s on one core (bench/RESULTS.md).

    .venv/bin/python bench/redaction.py [--repeat 7] [--number 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbitrage.capture.redaction import Redactor  # noqa: E402

SYSTEM = "Classify the banking query into one of 77 intents. Answer JSON like {\"intent\": \"card_arrival\"}."
GATEWAY_US_PER_REQUEST = 1e6 / 3465


def record(user_text: str, system: str = SYSTEM) -> dict:
    request = {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 32,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": user_text}]}
    response = {"id": "chatcmpl-9f8e7d6c5b4a", "object": "chat.completion", "created": 1732540800, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"intent": "card_arrival"}'},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 61, "completion_tokens": 9, "total_tokens": 70}}
    return {"request_id": "0" * 32, "request": orjson.dumps(request).decode(), "response": orjson.dumps(response).decode()}


CASES = {
    "clean (no personal data)": record("I am still waiting on my card, it was sent 12 days ago?"),
    "one e-mail, phone and card": record("I'm jane.doe@example.com, call me on +44 20 7946 0958; my card "
                                         "4242 4242 4242 4242 has not arrived."),
    "long clean prompt (~8 KB)": record("Where is my card? " * 20, system=SYSTEM + " Examples: " + "card_arrival; " * 560),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    redactor = Redactor()
    print(f"| record | bytes | us per record (median of {args.repeat}) | share of a request at 3,465 req/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, rec in CASES.items():
        times = timeit.repeat(lambda: redactor.record("calls", rec), repeat=args.repeat, number=args.number)
        us = statistics.median(times) / args.number * 1e6
        size = len(rec["request"]) + len(rec["response"])
        print(f"| {name} | {size:,} | {us:.1f} | {us / GATEWAY_US_PER_REQUEST:.1%} |")


if __name__ == "__main__":
    main()
