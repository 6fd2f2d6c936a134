"""Speculative decoding from the answers a server gave before: a vLLM proposer
(``--speculative-config '{"method": "custom_class", "model": "arbitrage_vllm_answers.AnswerProposer", ...}'``).

A distilled path answers from a small set: ``{"intent": "card_arrival"}`` and its 76 siblings. On a
CPU each answer token costs one pass over the model's weights (memory-bound: about 120 ms a token
for SmolLM2-135M in float32 on 2 AVX2 cores), so a 14-token answer is mostly waiting for passes that
only repeat what earlier answers said. This proposer keeps a trie of the answer tokens it has seen
and drafts the most frequent continuation of the answer so far; vLLM checks the whole draft in one
pass and keeps the tokens the model itself would have produced. Greedy answers and their log-probs
are the model's own (verification computes them from the same logits); a draft that is wrong
costs only the longer pass. The answer starts after the chat template's last assistant header.

The trie learns from every running request, across adapters (answers of different paths rarely share
more than their first tokens), and stops growing at ``MAX_NODES``; it lives in the worker's memory
and starts empty at each vLLM start.
"""

from __future__ import annotations

import numpy as np

MAX_NODES = 200_000
ASSISTANT_HEADER = "<|im_start|>assistant\n"
"""What opens the answer in a ChatML chat template (SmolLM2, Qwen); with another template nothing is drafted."""


class AnswerTrie:
    """Answer token sequences seen so far, with how often each token followed each prefix."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.root: dict[int, list] = {}  # token -> [count, children]
        self.nodes = 0
        self.max_nodes = max_nodes

    def observe(self, answer: list[int], new: int) -> dict[int, list] | None:
        """Walk ``answer`` (creating what is missing, while there is room), counting its last ``new``
        tokens as seen once more; return the node after it (None if the trie is full and it is not there)."""
        node = self.root
        first_new = len(answer) - new
        for position, token in enumerate(answer):
            child = node.get(token)
            if child is None:
                if self.nodes >= self.max_nodes:
                    return None
                child = node[token] = [0, {}]
                self.nodes += 1
            if position >= first_new:
                child[0] += 1
            node = child[1]
        return node

    @staticmethod
    def draft(node: dict[int, list] | None, limit: int) -> list[int]:
        """The most frequent path below ``node``, at most ``limit`` tokens."""
        tokens: list[int] = []
        while node and len(tokens) < limit:
            token, (_, children) = max(node.items(), key=lambda item: item[1][0])
            tokens.append(token)
            node = children
        return tokens


def answer_start(context: np.ndarray, header: list[int]) -> int | None:
    """Index of the first answer token: just after the last ``header`` in ``context``."""
    if not header:
        return None
    for position in np.nonzero(context == header[0])[0][::-1]:
        if context[position:position + len(header)].tolist() == header:
            return int(position) + len(header)
    return None


class AnswerProposer:
    """vLLM's ``custom_class`` proposer interface (vLLM 0.32): ``propose`` gets, per running request,
    the tokens sampled in the last step and the request's tokens so far, and returns drafts."""

    def __init__(self, vllm_config) -> None:
        from transformers import AutoTokenizer

        self.limit = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        chatml = "<|im_start|>" in tokenizer.get_vocab()
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False) if chatml else []
        self.trie = AnswerTrie()

    def load_model(self, *args, **kwargs) -> None:
        """Nothing to load: the drafts come from the trie."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None, **kwargs) -> list[list[int]]:
        drafts = []
        for row, sampled in enumerate(sampled_token_ids):
            length = int(num_tokens_no_spec[row])
            start = answer_start(token_ids_cpu[row, :length], self.header) if sampled and length < self.max_model_len else None
            if start is None:
                drafts.append([])
                continue
            node = self.trie.observe(token_ids_cpu[row, start:length].tolist(), len(sampled))
            drafts.append(self.trie.draft(node, min(self.limit, self.max_model_len - length)))
        return drafts
