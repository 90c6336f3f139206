"""The Python sandbox: limits, isolation, and a parent that survives whatever the code does."""

import ast
import json
import os
import socket
import subprocess
import sys

import pytest

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


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (<= 0: unavailable), as the sandbox's child queries it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)


def test_reads_outside_the_interpreter_and_run_directory_are_denied(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    code = ("import json, math, collections, re, itertools, decimal, hashlib, zlib, random\n"
            "open('mine.txt', 'w').write('run dir')\n"
            "mine = open('mine.txt').read()\n"
            "denied = []\n"
            "for path in (%r, '/etc/passwd', %r, '/'):\n"
            "    try:\n"
            "        open(path).read() if os.path.isfile(path) else os.listdir(path)\n"
            "    except PermissionError:\n"
            "        denied.append(path)\n") % (str(secret), str(tmp_path))
    r = run_python("import os\n" + code, capture="denied")
    abi = _landlock_abi()
    if abi < 1:
        assert r.ok and "landlock unavailable: reads unrestricted" in r.isolation, r
        pytest.skip(f"kernel {os.uname().release} has no Landlock: the sandbox cannot restrict reads")
    assert r.ok, r.describe()
    assert ast.literal_eval(r.value_repr) == [str(secret), "/etc/passwd", str(tmp_path), "/"]
    assert f"landlock-read: abi {abi}" in r.isolation
    printed = run_python(f"print(open({str(secret)!r}).read())")
    assert printed.error_type == "PermissionError" and "host secret" not in printed.stdout


def test_run_directory_files_and_stdlib_stay_readable():
    code = ("import json, math, collections, re, itertools, os\n"
            "open('data.json', 'w').write(json.dumps({'k': [1, 2]}))\n"
            "v = (json.load(open('data.json')), sorted(os.listdir('.')), math.comb(5, 2),\n"
            "     collections.Counter('aab')['a'], re.findall('[0-9]', 'a1b2'), list(itertools.islice(itertools.count(), 3)))\n")
    r = run_python(code, capture="v")
    assert r.ok, r.describe()
    assert r.value_repr == "({'k': [1, 2]}, ['data.json'], 10, 2, ['1', '2'], [0, 1, 2])"


def test_isolation_says_reads_are_unrestricted_when_landlock_cannot_be_applied(tmp_path):
    """A parent already under Landlock's maximum of 16 layers: the child cannot add its own."""
    if _landlock_abi() < 1:
        pytest.skip(f"kernel {os.uname().release} has no Landlock (the no-Landlock case is checked above)")
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    script = f"""
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
attr = (ctypes.c_uint64 * 1)(1 << 10)  # handles only MAKE_FIFO: harmless to everything else
for _ in range(16):
    assert libc.syscall(446, libc.syscall(444, ctypes.byref(attr), 8, 0), 0) == 0
from fst_jax.tasks.sandbox import run_python
r = run_python("v = open({str(secret)!r}).read()", capture="v")
print(json.dumps([r.status, r.value_repr, r.isolation]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    status, value, isolation = json.loads(out.stdout.splitlines()[-1])
    assert (status, value) == ("ok", "'host secret'")
    assert "landlock unavailable: reads unrestricted" in isolation
    assert not any(x.startswith("landlock-") for x in isolation)
