"""Grouped LoRA ops for vLLM's CPU build: a vLLM general plugin (vLLM loads it in each of its
processes through the ``vllm.general_plugins`` entry point).

vLLM 0.32's CPU LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``) gather every token's adapter
matrices (``weights[indices]``: one copy of each LoRA A and B matrix of a layer per token in the
batch) and then multiply with an einsum. A 30-token prompt copies every LoRA matrix of the model
30 times. Here the tokens are grouped by adapter and each group is one matmul against the
adapter's matrices as they are; with one adapter in the batch (the usual case) that is one plain
matmul. Tokens whose index is -1 (a base-model request, no adapter) get no LoRA delta; the stock
ops apply the last loaded adapter to them (vllm-project/vllm#48421).

The functions keep the stock signatures and output semantics (overwrite or add, slices, padding).
``ARBITRAGE_LORA_OPS=stock`` in vLLM's environment keeps vLLM's own ops. Any other vLLM version
than the one these were written against is left alone, with a warning in vLLM's log.
"""

from __future__ import annotations

import logging
import os

import torch

VLLM_VERSION = "0.32.0"
log = logging.getLogger("vllm.arbitrage_cpu_lora")


def lora_delta(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """``inputs[t] @ weights[indices[t]].T`` for each token t, zero where the index is negative.

    ``weights`` is vLLM's stacked ``[max_loras, (1,) out, in]``; ``indices`` has one entry per row
    of ``inputs``.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    rows = inputs.shape[0]
    first = int(indices[0]) if rows else -1
    if rows and bool((indices == first).all()):
        if first < 0:
            return inputs.new_zeros((rows, weights.shape[1]))
        return inputs @ weights[first].to(dtype).T
    out = inputs.new_zeros((rows, weights.shape[1]))
    for index in torch.unique(indices).tolist():
        if index >= 0:
            group = (indices == index).nonzero().squeeze(1)
            out[group] = inputs[group] @ weights[index].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor),
                scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                      add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                               sgmv_expand_slice)}


def register() -> None:
    """Put the grouped ops in place of the stock ones (vLLM calls this in each of its processes)."""
    if os.environ.get("ARBITRAGE_LORA_OPS", "grouped") == "stock":
        return
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        log.warning("arbitrage: grouped CPU LoRA ops written for vLLM %s, not %s: vLLM's own ops kept",
                    VLLM_VERSION, vllm.__version__)
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (torch_ops, lora_ops, punica_cpu):
        for name, function in OPS.items():
            if hasattr(module, name):
                setattr(module, name, function)
    log.info("arbitrage: grouped CPU LoRA ops in place of vLLM's per-token weight gather")
