"""Run untrusted Python in a separate, limited process: ``run_python(code, ...) -> SandboxResult``.

The code runs in a fresh ``python -I -B [-S]`` child with:
- CPU-time (``RLIMIT_CPU``), address-space (``RLIMIT_AS``, ``memory_mb``), file-size
  (``RLIMIT_FSIZE``), open-file and core-dump limits, and a wall-clock timeout after which the
  child's whole process group is killed;
- no network: a new network namespace (``unshare(CLONE_NEWNET)``, as root or in a new user
  namespace) and, on kernels with Landlock ABI >= 4, TCP bind/connect denied by the kernel;
- a fresh temporary working directory (removed afterwards) as the only writable place: Landlock
  denies every file-system write outside it (and outside /dev/null), and every read outside it,
  the interpreter's import path (stdlib, lib-dynload; site-packages only when allowed), the system
  library directories (/lib, /usr/lib, ...), /etc/ld.so.cache, /dev/null and /dev/urandom. The
  code's output may become feedback sent elsewhere: it must not carry host files. Metadata
  (``os.stat``, ``os.path.exists``) is not covered by Landlock. Without Landlock, reads are
  unrestricted and ``isolation`` says so;
- an audit hook (PEP 578) that refuses sockets, writes outside the directory, subprocesses,
  ``fork``/``exec``, signals to other processes and ``ctypes``, with a clear PermissionError.
  It gives the readable error and is the fallback where the kernel layers are unavailable; the
  layers actually applied are reported in ``SandboxResult.isolation``.
The parent never raises because of the child's behaviour: every outcome is a ``SandboxResult``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "crashed"]


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run. ``status``: ok | error (an exception; ``error_*`` say which and where)
    | timeout (CPU or wall limit) | memory (MemoryError under the memory limit) | crashed (killed by
    a signal or no result). ``error_line`` is the 1-based line in the submitted code of the
    innermost frame there; ``value_repr`` is ``repr`` of the ``capture`` global after the run.
    ``isolation`` names the layers applied: netns, landlock-fs (writes), "landlock-read: abi N",
    landlock-net, audit-hook; or "landlock unavailable: reads unrestricted"."""

    status: Status
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    error_type: str | None = None
    error_message: str | None = None
    error_line: int | None = None
    error_source: str | None = None
    value_repr: str | None = None
    isolation: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """One line naming the outcome, e.g. ``ZeroDivisionError: division by zero (line 4: ...)``."""
        if self.status in ("error", "memory") and self.error_type:
            where = f" (line {self.error_line}: {self.error_source})" if self.error_line else ""
            return f"{self.error_type}: {self.error_message}{where}"
        return {"ok": "ran without error", "timeout": "stopped at the time limit",
                "memory": "stopped at the memory limit"}.get(self.status, f"crashed (exit code {self.returncode})")


# The child's program. argv: [-c, settings-json]. Applies the limits, drops into the sandbox and
# runs the code file; writes a JSON verdict to the result fd. Kept free of f-strings for clarity.
_RUNNER = r'''
import json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
work = cfg["work"]
isolation = []
res = os.fdopen(cfg["result_fd"], "w")
def finish(verdict):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    verdict["isolation"] = isolation
    res.write(json.dumps(verdict)); res.flush()
    os._exit(0)
mem = cfg["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
cpu = cfg["cpu_s"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize"], cfg["fsize"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write raises OSError instead
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
    isolation.append("netns")
source = open(cfg["code_path"]).read()  # before Landlock: the code file lies outside the run directory
abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
if abi >= 1:
    READ_FILE, WRITE_FILE = 1 << 2, 1 << 1
    read = (1 << 0) | READ_FILE | (1 << 3)  # EXECUTE | READ_FILE | READ_DIR
    fs = read | WRITE_FILE | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
    if abi >= 2:
        fs |= 1 << 13  # REFER
    truncate = 1 << 14 if abi >= 3 else 0
    fs |= truncate
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: all denied
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    rfd = libc.syscall(444, ctypes.byref(attr), size, 0)
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:  # a library directory this system lacks: nothing to allow
            return True
        if not os.path.isdir(path):  # a file (e.g. a zipped stdlib) takes only file rights
            access &= (1 << 0) | READ_FILE | WRITE_FILE | truncate
        rule = PathBeneath(access, fd)
        ok = libc.syscall(445, rfd, 1, ctypes.byref(rule), 0) == 0
        os.close(fd)
        return ok
    # Readable: the interpreter's import path (stdlib, lib-dynload, site-packages unless -S), the
    # system library directories and the loader's cache (shared libraries of extension modules).
    libraries = [p for p in sys.path if os.path.isabs(p)] + ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
    rules = [(work, fs), ("/dev/null", READ_FILE | WRITE_FILE | truncate), ("/dev/urandom", READ_FILE),
             ("/etc/ld.so.cache", READ_FILE)] + [(p, read) for p in libraries]
    if rfd >= 0 and all(allow(p, a) for p, a in rules):
        if libc.prctl(38, 1, 0, 0, 0) == 0 and libc.syscall(446, rfd, 0) == 0:  # NO_NEW_PRIVS; restrict_self
            isolation += ["landlock-fs", "landlock-read: abi %d" % abi] + (["landlock-net"] if net else [])
if "landlock-fs" not in isolation:
    isolation.append("landlock unavailable: reads unrestricted")
del libc, ctypes
for m in ("ctypes", "ctypes._endian", "_ctypes"):
    sys.modules.pop(m, None)
os.chdir(work)
ROOT = os.path.realpath(work) + os.sep
BANNED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing"}
BANNED_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.startfile"}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
               "os.truncate", "os.utime", "os.rename", "os.replace", "shutil.rmtree", "os.chflags", "os.lchflags"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path):
    if isinstance(path, int):
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return (p + os.sep).startswith(ROOT) or p == "/dev/null"
def hook(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is blocked in the sandbox")
    if event == "import" and args[0].split(".")[0] in BANNED_IMPORTS:
        raise PermissionError("import of %s is blocked in the sandbox" % args[0])
    if event in BANNED_EVENTS:
        raise PermissionError("%s is blocked in the sandbox" % event)
    if event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid()):
        raise PermissionError("signals to other processes are blocked in the sandbox")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        if writing and not inside(path):
            raise PermissionError("writing outside the sandbox directory is blocked: %r" % (path,))
    elif event in PATH_EVENTS:
        for p in args[:2] if event in ("os.rename", "os.replace", "os.symlink", "os.link") else args[:1]:
            if p is not None and not inside(p):
                raise PermissionError("%s outside the sandbox directory is blocked: %r" % (event, p))
sys.addaudithook(hook)
isolation.append("audit-hook")
sys.stdin = open(os.devnull)
sys.argv = ["main.py"]
glb = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(source, "<sandbox>", "exec"), glb)
except SystemExit as e:
    if e.code not in (None, 0):
        finish({"status": "error", "type": "SystemExit", "message": str(e.code), "line": None})
except BaseException as e:
    import traceback
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == "<sandbox>":
            line = frame.lineno
    if isinstance(e, SyntaxError) and e.filename == "<sandbox>":
        line = e.lineno
    status = "memory" if isinstance(e, MemoryError) else "error"
    finish({"status": status, "type": type(e).__name__, "message": str(e)[:1000], "line": line})
value = None
if cfg["capture"] is not None:
    try:
        value = repr(glb[cfg["capture"]])[: cfg["max_repr"]]
    except BaseException as e:
        finish({"status": "error", "type": type(e).__name__, "message": "capture: " + str(e)[:1000], "line": None})
finish({"status": "ok", "value": value})
'''


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, cpu_s: float | None = None,
               max_output_bytes: int = 1 << 16, max_file_bytes: int = 16 << 20, capture: str | None = None,
               allow_site_packages: bool = False) -> SandboxResult:
    """Run ``code`` (a Python script, as ``__main__``) in a sandboxed child; see the module doc.

    ``timeout_s`` is wall-clock; ``cpu_s`` (default: ``timeout_s``) is CPU time; ``memory_mb`` is
    the address-space limit (the interpreter itself takes ~20 MB of it). ``stdout``/``stderr`` keep
    their first ``max_output_bytes``; files the code writes are limited to ``max_file_bytes``.
    ``capture`` names a global whose ``repr`` comes back as ``value_repr``. Without
    ``allow_site_packages`` only the standard library can be imported."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    cpu = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
    with tempfile.TemporaryDirectory(prefix="fst_sandbox_") as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        code_path, out_path, err_path, res_path = (os.path.join(root, n) for n in ("code.py", "out", "err", "res"))
        with open(code_path, "w") as f:
            f.write(code)
        settings = {"work": work, "code_path": code_path, "memory_bytes": memory_mb << 20, "cpu_s": cpu,
                    "fsize": max(max_file_bytes, max_output_bytes), "capture": capture, "max_repr": 100_000}
        flags = ["-I", "-B"] + ([] if allow_site_packages else ["-S"])
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err, open(res_path, "wb") as res:
            settings["result_fd"] = res.fileno()
            proc = subprocess.Popen([sys.executable, *flags, "-c", _RUNNER, json.dumps(settings)], cwd=work,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(res.fileno(),), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        wall = time.perf_counter() - start
        stdout, stderr = _read_head(out_path, max_output_bytes), _read_head(err_path, max_output_bytes)
        try:
            verdict = json.loads(_read_head(res_path, 1 << 20))
        except ValueError:
            verdict = None
    rc = proc.returncode
    common = dict(stdout=stdout, stderr=stderr, returncode=rc, wall_s=wall)
    if not isinstance(verdict, dict) or verdict.get("status") not in ("ok", "error", "memory"):
        cpu_killed = rc in (-signal.SIGXCPU, -signal.SIGKILL) and wall >= min(cpu, timeout_s) * 0.5
        status: Status = "timeout" if timed_out or rc == -signal.SIGXCPU or cpu_killed else "crashed"
        if status == "crashed" and "MemoryError" in stderr:
            status = "memory"
        return SandboxResult(status, **common)
    isolation = tuple(str(x) for x in verdict.get("isolation", ()))
    if verdict["status"] == "ok":
        return SandboxResult("ok", value_repr=verdict.get("value"), isolation=isolation, **common)
    line = verdict.get("line")
    source = None
    if isinstance(line, int) and 1 <= line <= code.count("\n") + 1:
        source = code.splitlines()[line - 1].strip() if code.splitlines() else None
    return SandboxResult(verdict["status"], error_type=str(verdict.get("type")), error_message=str(verdict.get("message")),
                         error_line=line if isinstance(line, int) else None, error_source=source,
                         isolation=isolation, **common)
