"""The OpenAI-compatible HTTP backend against a stub server on 127.0.0.1: retries with backoff,
timeouts, 500s and garbage JSON end in a counted, skipped proposal; nothing raises."""

import http.server
import json
import threading
import time

import pytest

from fst_jax.fast import GEPAConfig, GEPAOptimizer, ReflectionConfig, SamplerEvaluator, make_reflection_lm
from fst_jax.fast.reflection import ReflectionError
from fst_jax.tasks import make_task

from fast_fakes import FakeGenerator


class Stub(http.server.ThreadingHTTPServer):
    """Answers request number i with behaviours[i] ("slow", "500", "garbage", "ok"); later ones 500."""

    daemon_threads = True

    def __init__(self, behaviours):
        super().__init__(("127.0.0.1", 0), Handler)
        self.behaviours, self.requests = list(behaviours), []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((body, self.headers.get("Authorization")))
        kind = server.behaviours[len(server.requests) - 1] if len(server.requests) <= len(server.behaviours) else "500"
        if kind == "slow":
            time.sleep(2.5)  # well past the client's timeout
        if kind in ("500", "slow"):
            payload, status = b"{}", 500
        elif kind == "garbage":
            payload, status = b"{not json", 200
        else:
            reply = {"choices": [{"message": {"content": "```\nnew instructions\n```"}}], "usage": {"total_tokens": 77}}
            payload, status = json.dumps(reply).encode(), 200
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client timed out and hung up
            pass


@pytest.fixture
def stub():
    servers = []

    def start(behaviours):
        server = Stub(behaviours)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def http_config(url, **kw):
    kw = {"timeout_s": 1.0, "backoff_s": 0.01, **kw}
    return ReflectionConfig(backend="openai", url=url, model="m", api_key_env="FST_TEST_KEY", **kw)


def test_retries_after_a_500_then_succeeds_with_key_and_usage(stub, monkeypatch):
    monkeypatch.setenv("FST_TEST_KEY", "sekret")
    server = stub(["500", "ok"])
    reply = make_reflection_lm(http_config(server.url, retries=2, timeout_s=10.0))("PROMPT", 4)
    assert reply.text == "```\nnew instructions\n```" and reply.tokens == 77
    assert len(server.requests) == 2
    body, auth = server.requests[-1]
    assert auth == "Bearer sekret"
    assert body["messages"] == [{"role": "user", "content": "PROMPT"}] and body["seed"] == 4 and body["model"] == "m"


def test_timeout_500_and_garbage_exhaust_retries_into_reflection_error(stub):
    server = stub(["slow", "500", "garbage"])
    with pytest.raises(ReflectionError, match="3 attempts"):
        make_reflection_lm(http_config(server.url, retries=2))("PROMPT", 0)
    assert len(server.requests) == 3


def test_unreachable_endpoint_fails_cleanly():
    with pytest.raises(ReflectionError):
        make_reflection_lm(http_config("http://127.0.0.1:9/v1/chat/completions", retries=1))("p", 0)


def test_endpoint_failure_skips_and_counts_the_proposal(stub):
    server = stub(["slow", "500", "garbage"])
    task = make_task("arithmetic")
    anchor = task.examples("train", 6, seed=0)
    config = GEPAConfig(max_proposals=1, reflection=http_config(server.url, retries=2))
    evaluator = SamplerEvaluator(FakeGenerator(anchor), task)
    opt = GEPAOptimizer(config, evaluator, make_reflection_lm(config.reflection), anchor)
    opt.start([{"context": "Answer."}])
    assert opt.run() .startswith("proposals")
    b = opt.budget
    assert (b.proposals, b.skipped, b.skip_reasons, b.reflection_failures, b.reflection_calls) == (
        1, 1, {"reflection_error": 1}, 1, 1)
    assert opt.history[0]["outcome"] == "skipped:reflection_error"
    assert len(opt.population.members) == 1
