"""The Python sandbox: limits, isolation, and a parent that survives whatever the code does."""

import os
import socket

from fst_jax.tasks.sandbox import run_python


def test_returns_captured_value_and_output():
    r = run_python("x = sum(range(5))\nprint('hello')", capture="x")
    assert r.ok and r.value_repr == "10" and r.stdout == "hello\n"


def test_exception_reports_type_message_and_line():
    r = run_python("def f(a):\n    return 1 // a\n\nf(0)\n")
    assert (r.status, r.error_type, r.error_line, r.error_source) == ("error", "ZeroDivisionError", 2, "return 1 // a")
    assert "ZeroDivisionError" in r.describe() and "line 2" in r.describe()


def test_infinite_loop_is_stopped_at_the_time_limit():
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and r.wall_s < 30  # bound only proves it was stopped


def test_sleeping_code_is_stopped_by_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert r.status == "timeout" and r.wall_s < 30


def test_memory_bomb_is_stopped_at_the_memory_limit():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n", memory_mb=128, timeout_s=20)
    assert r.status == "memory"


def test_socket_is_blocked():
    with socket.socket() as server:  # a listener on this machine: the sandbox must not reach it
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        r = run_python(code)
        server.settimeout(0.5)
        try:
            conn, _ = server.accept()
            conn.close()
            reached = True
        except OSError:
            reached = False
    assert r.status == "error" and not reached


def test_write_outside_its_directory_is_blocked_and_inside_is_allowed(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert r.status == "error" and r.error_type == "PermissionError" and not target.exists()
    r = run_python("import os\nfd = os.open(%r, os.O_WRONLY | os.O_CREAT)" % str(target))
    assert r.status == "error" and not target.exists()
    inside = run_python("open('note.txt', 'w').write('hi')\nv = open('note.txt').read()", capture="v")
    assert inside.ok and inside.value_repr == "'hi'"


def test_subprocesses_and_ctypes_are_blocked():
    assert run_python("import os\nos.system('touch /tmp/should_not_exist')").status == "error"
    assert run_python("import ctypes").status == "error"
    assert not os.path.exists("/tmp/should_not_exist")


def test_crash_and_syntax_error_are_results_not_exceptions():
    assert run_python("import os\nos.abort()").status in ("crashed", "error")
    r = run_python("def f(:\n  pass")
    assert r.status == "error" and r.error_type == "SyntaxError" and r.error_line == 1


def test_parent_survives_and_leaves_no_temp_directory():
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    for code in ("while True: pass", "x = 'a' * 10 ** 10", "import sys\nsys.exit(3)"):
        run_python(code, timeout_s=1.0, memory_mb=64)
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not {d for d in after - before if d.startswith("fst_sandbox_")}
    assert run_python("y = 1", capture="y").value_repr == "1"
