"""Meta-prompt rendering, reply parsing and guards, callable and record/replay backends."""

import json

import pytest

from fst_jax import distributed
from fst_jax.config import ConfigError
from fst_jax.fast.reflection import (DEFAULT_TEMPLATE, ReflectionConfig, ReflectionError, ReplayMissError,
                                     extract_text, make_reflection_lm, parse_proposal, reflective_record,
                                     render_meta_prompt, truncate_to_tokens)


def test_meta_prompt_holds_current_text_and_every_record():
    records = [reflective_record("What is 2+2?", "5", "Wrong: 4"), reflective_record("3*3?", "9", "Correct")]
    prompt = render_meta_prompt(DEFAULT_TEMPLATE, "Be brief.", records)
    assert "```\nBe brief.\n```" in prompt
    for text in ("[Example 1]", "[Example 2]", "Inputs:\nWhat is 2+2?", "Generated Outputs:\n5", "Feedback:\nWrong: 4"):
        assert text in prompt
    assert "{examples}" not in prompt and "{current_text}" not in prompt


def test_placeholders_inside_the_filled_in_text_are_left_alone():
    records = [reflective_record("say {current_text}", "{examples}", "ok")]
    prompt = render_meta_prompt("A {current_text} B {examples}", "keep {examples}", records)
    assert prompt.startswith("A keep {examples} B [Example 1]") and "say {current_text}" in prompt


def test_long_outputs_are_clipped_in_records():
    assert reflective_record("q", "x" * 50, "f", max_output_chars=10)["Generated Outputs"] == "x" * 10 + " [...clipped]"


@pytest.mark.parametrize("reply, expect", [
    ("Sure!\n```\nNew text\n```\nHope it helps", "New text"),
    ("```markdown\nLine 1\n```\nmiddle\n```\nLine 2\n```", "Line 1\n```\nmiddle\n```\nLine 2"),
    ("```\nunclosed fence text", "unclosed fence text"),
    ("  Always end with #### <number>.  ", "Always end with #### <number>."),
    ("I'm sorry, I cannot help with that.", None),
    ("Here is the improved instruction:", None),
    ("Sure!", None),
    ("   ", None),
    ("``````", ""),
])
def test_extract_text_between_first_and_last_fence_with_fallback(reply, expect):
    assert extract_text(reply) == expect


def test_guards_reject_empty_unchanged_and_malformed():
    assert parse_proposal("```\n\n```", "old", max_tokens=None) == (None, "empty")
    assert parse_proposal("```\nold\n```", "old\n", max_tokens=None) == (None, "unchanged")
    assert parse_proposal("Sorry, no.", "old", max_tokens=None) == (None, "malformed")
    assert parse_proposal("```\nnew\n```", "old", max_tokens=None) == ("new", "ok")


def test_overlong_text_is_truncated_or_rejected_per_config():
    count = lambda s: len(s.split())  # noqa: E731  (one token per word)
    reply = "```\n" + " ".join(f"w{i}" for i in range(10)) + "\n```"
    assert parse_proposal(reply, "old", max_tokens=4, count=count, overlong="reject") == (None, "overlong")
    assert parse_proposal(reply, "old", max_tokens=4, count=count) == ("w0 w1 w2 w3", "truncated")
    assert truncate_to_tokens("abcdef", 2, len) == "ab"


def test_config_validates_backend_template_and_cache():
    with pytest.raises(ConfigError, match="registered"):
        ReflectionConfig(backend="nope")
    with pytest.raises(ConfigError, match="current_text"):
        ReflectionConfig(template="no placeholders")
    with pytest.raises(ConfigError, match="cache_path"):
        ReflectionConfig(cache_mode="replay")


def test_callable_backend_wraps_errors_and_counts_tokens():
    lm = make_reflection_lm(ReflectionConfig(backend="callable"), fn=lambda p: "```\nx\n```")
    reply = lm("p" * 40, 0)
    assert reply.text == "```\nx\n```" and reply.tokens == 10 + 3

    def broken(prompt):
        raise RuntimeError("down")

    with pytest.raises(ReflectionError, match="down"):
        make_reflection_lm(ReflectionConfig(backend="callable"), fn=broken)("p", 0)


def test_record_then_replay_returns_the_recorded_reply_and_misses_raise(tmp_path):
    path = tmp_path / "replies.json"
    calls = []
    record = make_reflection_lm(ReflectionConfig(backend="callable", cache_mode="record", cache_path=str(path)),
                                fn=lambda p: calls.append(p) or f"reply to {p}")
    assert record("hello", 0).text == "reply to hello"
    assert len(json.loads(path.read_text())) == 1
    replay = make_reflection_lm(ReflectionConfig(backend="callable", cache_mode="replay", cache_path=str(path)))
    assert replay("hello", 5).text == "reply to hello" and calls == ["hello"]
    with pytest.raises(ReplayMissError, match="record it first"):
        replay("other prompt", 0)


def test_record_mode_writes_its_cache_file_on_process_0_only(tmp_path, monkeypatch):
    path = tmp_path / "replies.json"
    cfg = ReflectionConfig(backend="callable", cache_mode="record", cache_path=str(path))
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    other = make_reflection_lm(cfg, fn=lambda p: f"reply to {p}")
    assert other("hello", 0).text == "reply to hello" and not path.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(distributed, "is_primary", lambda: True)
    primary = make_reflection_lm(cfg, fn=lambda p: f"reply to {p}")
    assert primary("hello", 0).text == "reply to hello" and list(json.loads(path.read_text())) == [primary.key("hello")]


class FakePolicy:
    def __init__(self):
        self.seen = []

    def generate_text(self, params, pairs, n=1, seed=0, temperature=None, top_p=None, top_k=None,
                      max_new_tokens=None):
        self.seen.append((params, list(pairs), n, seed, temperature, top_p, top_k, max_new_tokens))
        return [["```\nimproved\n```"] for _ in pairs]


def test_policy_backend_sends_the_meta_prompt_as_user_message_under_default_context():
    gen = FakePolicy()
    cfg = ReflectionConfig(backend="policy")
    lm = make_reflection_lm(cfg, generator=gen, params_fn=lambda: "P7")
    assert lm("META", 3).text == "```\nimproved\n```"
    assert gen.seen == [("P7", [("", "META")], 1, 3, 0.6, 0.95, 20, 1024)]
