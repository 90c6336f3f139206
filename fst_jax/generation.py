"""The generation interface: what rollouts, evaluation and the GEPA rounds sample through.

``fst_jax.sampling.Sampler`` implements both protocols; a fork may plug in another engine that
keeps these contracts. ``params`` is always the policy's weights as an ``nnx.State`` of
``graphdef`` (the weights being trained), so any engine is handed the current slow weights at
every call.

- ``TextGenerator``: texts in, texts out (GEPA's candidate scoring, the evaluation's grading);
- ``Generator``: also token-level requests (rollouts build train batches from their tokens and
  log-probs; the exact KL evaluation re-reads its samples' tokens), with the tokenizer, the
  sampling config (its prompt buckets lay out the train batch) and the mesh the weights live on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh

    from fst_jax.models.tokenizer import PromptTokenizer
    from fst_jax.sampling import PromptBatch, Samples, SamplingConfig


Knob = Any  # float | int | None, or a sequence of n of them: one per sample index (None: default)


class TextGenerator(Protocol):
    def generate_text(self, params: Any, pairs: Sequence[tuple[str, str]], n: int = 1, seed: int = 0,
                      temperature: Knob = None, top_p: Knob = None, top_k: Knob = None,
                      max_new_tokens: int | None = None,
                      prompt_ids: Sequence[int] | None = None) -> list[list[str]]:
        """``n`` completions for each (context, user message) pair, in order; ``None`` knobs take
        the generator's defaults, a sequence of ``n`` sets each sample index's own (a greedy
        sample and tempered ones of a prompt in one request); ``prompt_ids`` (one per pair) name
        each pair's random draws, so they do not depend on the request."""
        ...


@runtime_checkable
class Generator(TextGenerator, Protocol):
    tokenizer: PromptTokenizer  # pad_id, context encoding and counting
    config: SamplingConfig  # default knobs, prompt_buckets, max_new_tokens
    graphdef: nnx.GraphDef  # the structure ``params`` follow
    mesh: Mesh | None
    params: nnx.State  # the weights it was built with (the base model)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> PromptBatch:
        """(context, task) pairs as left-padded prompt rows in one of ``config.prompt_buckets``."""
        ...

    def generate(self, params: Any, prompts: PromptBatch, n: int = 1, seed: int = 0,
                 temperature: Knob = None, top_p: Knob = None, top_k: Knob = None,
                 max_new_tokens: int | None = None,
                 prompt_ids: Sequence[int] | None = None) -> Samples:
        """``n`` samples of each prompt row (row ``r`` continues prompt ``r // n``): tokens,
        their log-probs under ``log_softmax(logits / T)``, masks, lengths."""
        ...

    def generate_many(self, params: Any, pairs: Sequence[tuple[str, str]], n: int = 1, seed: int = 0,
                      temperature: Knob = None, top_p: Knob = None, top_k: Knob = None,
                      max_new_tokens: int | None = None,
                      prompt_ids: Sequence[int] | None = None) -> list[Samples]:
        """``generate_text``'s request as token-level ``Samples``, one per chunk of consecutive
        pairs the engine ran together (in order; together they cover every pair once)."""
        ...

    def decode_row(self, samples: Samples, row: int) -> str:
        """One row's completion text, special tokens removed."""
        ...
