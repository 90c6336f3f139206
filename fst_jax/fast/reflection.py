"""Reflective mutation: the reflective dataset, the meta-prompt, parsing the reply, LM backends.

A reflection LM is any callable ``lm(prompt, seed) -> Reply``. Backends are built by name from
``REFLECTION_BACKENDS`` (``make_reflection_lm``): "policy" (the policy itself through the sampler),
"openai" (an OpenAI-compatible /v1/chat/completions endpoint, standard library only) and
"callable" (any Python function). ``cache_mode`` "record"/"replay" wraps any of them in a JSON
cache keyed by the prompt's hash. A backend failure raises ``ReflectionError``, which the
optimizer counts and skips; a replay miss raises ``ReplayMissError``, which is a setup error and
propagates.

Several prompts at once (parallel GEPA proposals): ``reflect_batch(lm, prompts, seeds)``. The
built-in backends are ``BatchedLM``s: "policy" samples all prompts in ONE ``generate_text`` call,
"openai" sends the requests concurrently from a thread pool, "callable" calls in order; any other
callable is called in order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from fst_jax import distributed
from fst_jax.registry import register
from fst_jax.config import require, require_in_registry

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """You are revising the instructions (a system prompt) that an assistant reads before it works on a task.

The instructions it used:
```
{current_text}
```

Here are tasks it attempted with those instructions, what it answered, and feedback on each answer:

{examples}

Write a revised version of the instructions that would make the assistant do better on tasks like these.
- Work out from the feedback what went wrong: wrong results, missing steps, the wrong answer format.
- Keep whatever in the current instructions already works.
- Write into the instructions every task-specific fact, rule and format requirement the feedback reveals, because the assistant will not see the feedback.
- State general guidance for this kind of task rather than the answers to these particular examples.
Reply with the revised instructions only, placed between a pair of ``` fences."""

_FENCE = "```"
_TAG_LINE = re.compile(r"^[A-Za-z0-9_+.-]*$")
_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry\b|i can(not|'t)|as an ai\b)", re.IGNORECASE)
_ACK = re.compile(r"(sure|certainly|of course|ok(ay)?|yes|no|done|thanks?( you)?)[.!]*", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(current_text|examples)\}")


class ReflectionError(RuntimeError):
    """A reflection LM call failed (endpoint down, timeout, bad reply); the proposal is skipped."""


class ReplayMissError(LookupError):
    """Replay mode found no recorded reply for a prompt."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """A reflection LM reply and the tokens it cost (prompt + reply; estimated when unknown)."""

    text: str
    tokens: int


@dataclasses.dataclass(frozen=True)
class ReflectionConfig:
    """How proposals are written and parsed.

    ``template`` needs ``{current_text}`` and ``{examples}``. ``max_context_tokens`` caps a new
    text (None: the generator's context limit when it has one); ``overlong`` says whether a longer
    one is truncated or rejected. ``max_output_chars`` clips each generated output shown to the
    reflection LM. HTTP fields apply to "openai" (``max_concurrency``: requests in flight at once
    in a batch); ``temperature``/``top_p``/``top_k`` to "policy" (temperature and ``max_tokens``
    also to "openai").
    """

    backend: str = "policy"
    template: str = DEFAULT_TEMPLATE
    max_context_tokens: int | None = None
    overlong: Literal["truncate", "reject"] = "truncate"
    max_output_chars: int = 2000
    policy_context: str = ""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int = 1024
    url: str = "http://127.0.0.1:8000/v1/chat/completions"
    model: str = ""
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 3
    max_concurrency: int = 8
    backoff_s: float = 1.0
    cache_mode: Literal["off", "record", "replay"] = "off"
    cache_path: str | None = None

    def __post_init__(self):
        require_in_registry(self.backend, REFLECTION_BACKENDS, "reflection backend")
        require("{current_text}" in self.template and "{examples}" in self.template,
                "template must contain {current_text} and {examples}")
        require(self.max_context_tokens is None or self.max_context_tokens > 0, "max_context_tokens must be > 0")
        require(self.max_output_chars > 0, "max_output_chars must be > 0")
        require(self.timeout_s > 0 and self.retries >= 0 and self.backoff_s >= 0,
                "timeout_s > 0, retries >= 0, backoff_s >= 0")
        require(self.max_concurrency >= 1, "max_concurrency must be >= 1")
        require(self.cache_mode == "off" or self.cache_path is not None,
                "cache_path is needed when cache_mode is record or replay")


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for when no tokenizer is at hand."""
    return (len(text) + 3) // 4


# ---------------------------------------------------------------- dataset and meta-prompt

def reflective_record(inputs: str, output: str, feedback: str, max_output_chars: int = 2000) -> dict[str, str]:
    """One entry of the reflective dataset; long outputs are clipped with a marker."""
    if len(output) > max_output_chars:
        output = output[:max_output_chars] + " [...clipped]"
    return {"Inputs": inputs, "Generated Outputs": output, "Feedback": feedback}


def render_meta_prompt(template: str, current_text: str, records: Sequence[Mapping[str, str]]) -> str:
    """Fill ``template`` with the current text and the records, each as a titled block."""
    blocks = []
    for n, rec in enumerate(records, 1):
        parts = [f"[Example {n}]"] + [f"{key}:\n{value}" for key, value in rec.items()]
        blocks.append("\n".join(parts))
    values = {"current_text": current_text, "examples": "\n\n".join(blocks)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# ---------------------------------------------------------------- parsing and guards

def extract_text(reply: str) -> str | None:
    """The proposed text in a reply, or None when the reply is malformed.

    Text between the first and the last ``` fence (a language tag on the opening line is
    dropped; an unclosed fence takes everything after it). Without fences: the whole reply
    stripped, unless it is empty or obviously chat noise (an apology or refusal, a bare
    acknowledgement such as "Sure!", or a preamble ending in a colon with nothing after it).
    """
    first, last = reply.find(_FENCE), reply.rfind(_FENCE)
    if first < 0:
        text = reply.strip()
        if not text or _REFUSAL.match(text) or _ACK.fullmatch(text) or text.endswith(":"):
            return None
        return text
    inner = reply[first + len(_FENCE): last if last > first else len(reply)]
    head, sep, rest = inner.partition("\n")
    if sep and _TAG_LINE.match(head.strip()):
        inner = rest
    return inner.strip()


def truncate_to_tokens(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` with ``count(prefix) <= max_tokens`` (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()


def parse_proposal(reply: str, current_text: str, *, max_tokens: int | None,
                   count: Callable[[str], int] = estimate_tokens,
                   overlong: str = "truncate") -> tuple[str | None, str]:
    """Apply the guards to a reply: ``(new_text, "ok" | "truncated")`` or ``(None, reason)``
    with reason one of "malformed", "empty", "unchanged", "overlong"."""
    text = extract_text(reply)
    if text is None:
        return None, "malformed"
    if not text:
        return None, "empty"
    status = "ok"
    if max_tokens is not None and count(text) > max_tokens:
        if overlong == "reject":
            log.info("reflection: rejected a %d-token text (limit %d)", count(text), max_tokens)
            return None, "overlong"
        log.info("reflection: truncated a %d-token text to %d tokens", count(text), max_tokens)
        text, status = truncate_to_tokens(text, max_tokens, count), "truncated"
        if not text:
            return None, "empty"
    if text == current_text.strip():
        return None, "unchanged"
    return text, status


# ---------------------------------------------------------------- backends

ReflectionLM = Callable[[str, int], Reply]
Outcome = Reply | ReflectionError


class BatchedLM:
    """A reflection LM that also answers many prompts at once.

    ``batch(prompts, seeds)`` returns one ``Reply`` or ``ReflectionError`` per prompt, in order
    (a failure of one prompt does not lose the others' replies); ``lm(prompt, seed)`` is a batch
    of one that raises its error.
    """

    def __init__(self, batch: Callable[[list[str], list[int]], list[Outcome]]):
        self._batch = batch

    def batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Outcome]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return self._batch(list(prompts), list(seeds)) if prompts else []

    def __call__(self, prompt: str, seed: int) -> Reply:
        [out] = self.batch([prompt], [seed])
        if isinstance(out, ReflectionError):
            raise out
        return out


def reflect_batch(lm: ReflectionLM, prompts: Sequence[str], seeds: Sequence[int]) -> list[Outcome]:
    """One ``Reply`` or ``ReflectionError`` per prompt: ``lm.batch`` when ``lm`` has it, else
    ``lm`` called on each prompt in order. Other exceptions (``ReplayMissError``) propagate."""
    batch = getattr(lm, "batch", None)
    if batch is not None:
        return batch(prompts, seeds)
    out: list[Outcome] = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        try:
            out.append(lm(prompt, seed))
        except ReflectionError as e:
            out.append(e)
    return out


REFLECTION_BACKENDS: dict[str, Callable[..., ReflectionLM]] = {}


# Decorator registering a backend factory ``(config, **deps) -> lm(prompt, seed) -> Reply``.
register_backend = functools.partial(register, REFLECTION_BACKENDS)


@register_backend("policy")
def policy_backend(cfg: ReflectionConfig, *, generator: Any, params_fn: Callable[[], Any],
                   count_tokens: Callable[[str], int] | None = None, **_: Any) -> BatchedLM:
    """The policy reflects: each meta-prompt is a user message under ``cfg.policy_context``;
    replies are at most ``cfg.max_tokens`` new tokens. A batch is ONE ``generate_text`` call
    seeded with the first prompt's seed (rows draw from their own keys); if it fails, every
    prompt of the batch fails."""
    count = count_tokens or estimate_tokens

    def batch(prompts: list[str], seeds: list[int]) -> list[Outcome]:
        try:
            out = generator.generate_text(params_fn(), [(cfg.policy_context, p) for p in prompts], n=1,
                                          seed=seeds[0], temperature=cfg.temperature, top_p=cfg.top_p,
                                          top_k=cfg.top_k, max_new_tokens=cfg.max_tokens)
            texts = [group[0] for group in out]
            if len(texts) != len(prompts):
                raise ValueError(f"generator returned {len(texts)} replies for {len(prompts)} prompts")
        except Exception as e:
            error = ReflectionError(f"policy reflection failed: {type(e).__name__}: {e}")
            error.__cause__ = e
            return [error] * len(prompts)
        return [Reply(text, count(p) + count(text)) for p, text in zip(prompts, texts)]

    return BatchedLM(batch)


@register_backend("callable")
def callable_backend(cfg: ReflectionConfig, *, fn: Callable[[str], str], **_: Any) -> BatchedLM:
    """Any function ``fn(prompt) -> reply text``, called on a batch's prompts in order; its
    exceptions become ReflectionError."""

    def one(prompt: str) -> Outcome:
        try:
            text = fn(prompt)
        except Exception as e:
            error = ReflectionError(f"reflection callable raised {type(e).__name__}: {e}")
            error.__cause__ = e
            return error
        if not isinstance(text, str):
            return ReflectionError(f"reflection callable returned {type(text).__name__}, not str")
        return Reply(text, estimate_tokens(prompt) + estimate_tokens(text))

    return BatchedLM(lambda prompts, seeds: [one(p) for p in prompts])


@register_backend("openai")
def openai_backend(cfg: ReflectionConfig, **_: Any) -> BatchedLM:
    """POST to an OpenAI-compatible chat completions URL with timeouts and exponential backoff.

    The API key, if any, is read from the environment variable ``cfg.api_key_env`` at call time.
    After ``1 + cfg.retries`` failed attempts (network error, timeout, non-2xx status, a reply
    without ``choices[0].message.content``) a prompt fails with ReflectionError. A batch sends
    its requests concurrently, at most ``cfg.max_concurrency`` at a time; replies keep the
    prompts' order.
    """

    def attempt(prompt: str, seed: int) -> Reply:
        body = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": seed}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(cfg.url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            data = json.loads(response.read().decode("utf-8"))
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        usage = data.get("usage") or {}
        tokens = usage.get("total_tokens")
        if not isinstance(tokens, int):
            tokens = estimate_tokens(prompt) + estimate_tokens(text)
        return Reply(text, tokens)

    def one(prompt: str, seed: int) -> Outcome:
        error: Exception | None = None
        for n in range(cfg.retries + 1):
            if n:
                time.sleep(cfg.backoff_s * 2 ** (n - 1))
            try:
                return attempt(prompt, seed)
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
                # URLError, timeouts, broken connections, bad JSON, a reply of the wrong shape
                error = e
                log.warning("reflection endpoint attempt %d/%d failed: %s: %s",
                            n + 1, cfg.retries + 1, type(e).__name__, e)
        return ReflectionError(f"reflection endpoint failed after {cfg.retries + 1} attempts: {error}")

    def batch(prompts: list[str], seeds: list[int]) -> list[Outcome]:
        if len(prompts) == 1:
            return [one(prompts[0], seeds[0])]
        workers = min(cfg.max_concurrency, len(prompts))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="reflection") as pool:
            return list(pool.map(one, prompts, seeds))

    return BatchedLM(batch)


class ReplayCache:
    """Record/replay JSON cache around a reflection LM, keyed by the SHA-256 of the prompt.

    "record" calls ``inner`` and writes every reply to ``path`` (atomically; with several
    processes, process 0 alone writes); "replay" only reads ``path`` and raises ReplayMissError
    for an unknown prompt.
    """

    def __init__(self, path: str | Path, mode: str, inner: ReflectionLM | None = None):
        if mode not in ("record", "replay") or (mode == "record" and inner is None):
            raise ValueError("mode must be 'record' (with an inner LM) or 'replay'")
        self.path, self.mode, self.inner = Path(path), mode, inner
        self.entries: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()

    def __call__(self, prompt: str, seed: int) -> Reply:
        [out] = self.batch([prompt], [seed])
        if isinstance(out, ReflectionError):
            raise out
        return out

    def batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Outcome]:
        """Replay looks every prompt up (a miss raises); record asks ``inner`` for the whole
        batch (``reflect_batch``), stores the replies and writes the file once."""
        keys = [self.key(p) for p in prompts]
        if self.mode == "replay":
            for key in keys:
                if key not in self.entries:
                    raise ReplayMissError(f"no recorded reflection reply for prompt hash {key[:16]}... in "
                                          f"{self.path}; record it first with cache_mode='record'")
            return [Reply(**self.entries[key]) for key in keys]
        outs = reflect_batch(self.inner, prompts, seeds)
        replies = {key: dataclasses.asdict(out) for key, out in zip(keys, outs) if isinstance(out, Reply)}
        if not replies:
            return outs
        self.entries.update(replies)
        if not distributed.is_primary():
            return outs
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        return outs


def make_reflection_lm(cfg: ReflectionConfig, **deps: Any) -> ReflectionLM:
    """Build ``cfg.backend`` with ``deps`` (generator/params_fn for "policy", fn for "callable"),
    wrapped in a ReplayCache when ``cfg.cache_mode`` is not "off" (replay needs no backend deps)."""
    if cfg.cache_mode == "replay":
        return ReplayCache(cfg.cache_path, "replay")
    lm = REFLECTION_BACKENDS[cfg.backend](cfg, **deps)
    if cfg.cache_mode == "record":
        return ReplayCache(cfg.cache_path, "record", lm)
    return lm
