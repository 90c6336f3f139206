"""Batched reflection (``reflect_batch``): the policy backend samples every prompt in one
``generate_text`` call, the HTTP backend sends its requests concurrently, the callable backend
and plain callables answer in order, per-prompt failures keep the other replies, and the
record/replay cache works on batches."""

import http.server
import json
import threading

import pytest

from fst_jax.fast.reflection import (ReflectionConfig, ReflectionError, ReplayMissError, Reply, make_reflection_lm,
                                     reflect_batch)


class FakePolicy:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def generate_text(self, params, pairs, n=1, seed=0, temperature=None, top_p=None, top_k=None,
                      max_new_tokens=None):
        self.calls.append((params, list(pairs), seed, max_new_tokens))
        if self.fail:
            raise RuntimeError("device lost")
        return [[f"```\nreply to {p}\n```"] for _, p in pairs]


def test_policy_backend_samples_all_prompts_in_one_call_seeded_by_the_first():
    gen = FakePolicy()
    lm = make_reflection_lm(ReflectionConfig(backend="policy", policy_context="SYS", max_tokens=32),
                            generator=gen, params_fn=lambda: "P")
    replies = reflect_batch(lm, ["a", "b", "c"], [7, 8, 9])
    assert [r.text for r in replies] == [f"```\nreply to {p}\n```" for p in "abc"]
    assert gen.calls == [("P", [("SYS", "a"), ("SYS", "b"), ("SYS", "c")], 7, 32)]
    assert all(r.tokens > 0 for r in replies)


def test_a_failed_policy_batch_fails_every_prompt_without_raising():
    lm = make_reflection_lm(ReflectionConfig(backend="policy"), generator=FakePolicy(fail=True), params_fn=lambda: None)
    replies = reflect_batch(lm, ["a", "b"], [0, 1])
    assert all(isinstance(r, ReflectionError) and "device lost" in str(r) for r in replies)
    with pytest.raises(ReflectionError, match="device lost"):
        lm("a", 0)


def test_callable_backend_answers_in_order_and_one_failure_keeps_the_others():
    seen = []

    def fn(prompt):
        seen.append(prompt)
        if prompt == "boom":
            raise RuntimeError("bad prompt")
        return prompt.upper()

    lm = make_reflection_lm(ReflectionConfig(backend="callable"), fn=fn)
    out = reflect_batch(lm, ["x", "boom", "y"], [0, 1, 2])
    assert seen == ["x", "boom", "y"]
    assert out[0] == Reply("X", 1 + 1) and isinstance(out[1], ReflectionError) and out[2].text == "Y"


def test_a_plain_callable_is_called_per_prompt_with_its_seed():
    calls = []

    def lm(prompt, seed):
        calls.append((prompt, seed))
        if seed == 2:
            raise ReflectionError("down")
        return Reply(prompt, 1)

    out = reflect_batch(lm, ["p", "q"], [1, 2])
    assert calls == [("p", 1), ("q", 2)] and out[0] == Reply("p", 1) and isinstance(out[1], ReflectionError)


def test_record_then_replay_a_batch(tmp_path):
    path = str(tmp_path / "replies.json")
    record = make_reflection_lm(ReflectionConfig(backend="callable", cache_mode="record", cache_path=path),
                                fn=lambda p: f"r:{p}")
    recorded = reflect_batch(record, ["a", "b"], [0, 1])
    assert len(json.loads((tmp_path / "replies.json").read_text())) == 2
    replay = make_reflection_lm(ReflectionConfig(backend="callable", cache_mode="replay", cache_path=path))
    assert reflect_batch(replay, ["b", "a"], [5, 6]) == [recorded[1], recorded[0]]
    with pytest.raises(ReplayMissError):
        reflect_batch(replay, ["a", "new"], [0, 1])


class BarrierServer(http.server.ThreadingHTTPServer):
    """Every request waits until ``parties`` requests are in flight (a barrier with a timeout);
    served one at a time, the barrier breaks and the request gets a 500."""

    daemon_threads = True

    def __init__(self, parties):
        super().__init__(("127.0.0.1", 0), BarrierHandler)
        self.barrier = threading.Barrier(parties, timeout=10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


class BarrierHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            self.server.barrier.wait()
            reply = {"choices": [{"message": {"content": "answer to " + body["messages"][0]["content"]}}]}
            payload, status = json.dumps(reply).encode(), 200
        except threading.BrokenBarrierError:
            payload, status = b"{}", 500
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def barrier_server():
    server = BarrierServer(3)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_backend_sends_a_batch_concurrently_and_keeps_the_order(barrier_server):
    cfg = ReflectionConfig(backend="openai", url=barrier_server.url, model="m", api_key_env=None, retries=0,
                           timeout_s=30.0, max_concurrency=3)
    replies = reflect_batch(make_reflection_lm(cfg), ["one", "two", "three"], [0, 1, 2])
    assert [r.text for r in replies] == ["answer to one", "answer to two", "answer to three"]
