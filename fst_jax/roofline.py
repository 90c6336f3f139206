"""FLOPs and bytes of the project's programs by formula, and their roofline times.

XLA's ``cost_analysis()`` counts the body of a loop once (the layer scan, the micro-batch loop,
the decode while-loop), so the FLOPs of a compiled program are counted here from its shapes:
a forward pass over ``rows x queries`` tokens, each attending to ``keys`` positions, costs
``2 x tokens x (matmul weights of the layers)`` plus ``4 x tokens x keys x layers x heads x
head_dim`` for the attention scores and their weighted sum (dense: the model computes every
score and masks), plus ``2 x vocab x hidden`` per position whose logits are computed. A train
step is 3 such passes (forward, backward twice the forward), one more with ``model.remat``
(the backward recomputes the forward) and one more with a KL reference pass (``kl.beta > 0``).
Bytes have floors: every argument read and every output written once; a decode step reads
the weights and the whole KV cache once.

``roofline_seconds(flops, bytes, peak_flops, bandwidth) = max(flops / peak_flops,
bytes / bandwidth)``: a lower bound on the time of a program, not a measurement.
"""

from __future__ import annotations

from fst_jax.models.configs import ModelConfig


def layer_matmul_params(m: ModelConfig) -> int:
    """Weights one token multiplies by in one layer (q, k, v, o and the gated MLP)."""
    D, F = m.hidden_size, m.intermediate_size
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return D * q + 2 * D * kv + q * D + 3 * D * F


def forward_flops(m: ModelConfig, rows: int, queries: int, keys: int, logit_positions: int) -> float:
    """FLOPs of one forward pass of ``rows x queries`` tokens attending to ``keys`` positions
    each, with logits at ``logit_positions`` positions (see the module doc)."""
    tokens = rows * queries
    per_layer = 2 * layer_matmul_params(m) + 4 * keys * m.num_heads * m.head_dim
    return float(tokens * m.num_layers * per_layer + 2 * logit_positions * m.vocab_size * m.hidden_size)


def train_passes(m: ModelConfig, kl_beta: float) -> int:
    """Forward-pass equivalents of one train step: 3, +1 with remat, +1 with a KL reference."""
    return 3 + int(m.remat) + int(kl_beta > 0)


def train_step_flops(m: ModelConfig, kl_beta: float, rows: int, seq: int) -> float:
    """FLOPs of one train step on ``rows x seq`` tokens (logits at every position)."""
    return train_passes(m, kl_beta) * forward_flops(m, rows, seq, seq, rows * seq)


def model_flops(num_params: int, tokens: int) -> float:
    """The conventional ``6 x params x tokens`` of training (for model-FLOPs utilisation)."""
    return 6.0 * num_params * tokens


def prefill_flops(m: ModelConfig, contexts: int, prompts: int, context_tokens: int,
                  task_tokens: int) -> float:
    """FLOPs of a shared prefill: each of ``contexts`` contexts once, then its ``prompts`` tasks
    attending to context and task, with logits at each task's last position."""
    rows = contexts * prompts
    return (forward_flops(m, contexts, context_tokens, context_tokens, 0)
            + forward_flops(m, rows, task_tokens, context_tokens + task_tokens, rows))


def decode_step_flops(m: ModelConfig, rows: int, keys: int) -> float:
    """FLOPs of one decode step: ``rows`` new tokens attending to a ``keys``-position cache."""
    return forward_flops(m, rows, 1, keys, rows)


def kv_cache_bytes(m: ModelConfig, positions: int) -> int:
    """Bytes of keys and values for ``positions`` cached positions over all layers."""
    import numpy as np

    return 2 * m.num_layers * positions * m.num_kv_heads * m.head_dim * np.dtype(m.dtype).itemsize


def roofline_seconds(flops: float, bytes_: float, peak_flops: float, bandwidth: float) -> float:
    """``max(flops / peak_flops, bytes / bandwidth)``: compute- or memory-bound lower bound."""
    return max(flops / peak_flops, bytes_ / bandwidth)
