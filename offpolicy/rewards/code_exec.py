"""Sandboxed code-execution reward: run untrusted generated Python against test cases.

`run_code` runs a program in a fresh interpreter (``python -I -S -B``) under resource limits (CPU
seconds, address space, file size, process count, no core dumps) and a wall-clock time-out that kills
everything the program started. On Linux, where the process may create namespaces (as root, or as a
normal user with unprivileged user namespaces), the program also runs in new network, mount, PID and
IPC namespaces: no network interface but a down loopback, the whole filesystem read-only except a
private size-limited tmpfs working directory, its processes killed with it; a root caller's program
runs as uid/gid 65534 (nobody) with ``no_new_privs``. Inside the interpreter an audit hook (PEP 578)
blocks sockets, process creation, ctypes and writes outside the working directory -- the fallback
where namespaces are unavailable, and a second layer where they are. Network access and writes outside
the working directory fail closed: if neither the OS layer nor the audit hook can be applied, the code
is not run (`SandboxError`).

`code_exec_reward` takes the code from a model response (the last ```python block, else the whole
text) and returns the fraction of test cases it passes (stdin/expected-stdout cases or assert snippets).

This is not a security boundary against a determined attacker beyond these limits: kernel bugs, side
channels and reading world-readable files are out of scope, and the audit hook alone can be bypassed
by deliberate code. docs/code_exec.md lists what each layer guarantees.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from offpolicy.rewards import sandbox_helper
from offpolicy.rewards.sandbox_helper import NOBODY

STDERR_BYTES = 4096  # stderr keeps its last this-many bytes
_HELPER = os.path.abspath(sandbox_helper.__file__)  # run as a script, see that module


class ExecResult(NamedTuple):
    """What one `run_code` call observed."""

    ok: bool  # exit status 0 within the limits (and, with ``asserts``, the asserts ran to the end)
    returncode: int  # the program's exit status; -N when killed by signal N
    stdout: str  # the first ``max_stdout_bytes`` bytes (UTF-8, undecodable bytes replaced)
    stderr: str  # the last STDERR_BYTES bytes
    timed_out: bool
    killed_reason: str | None  # None | "timeout" | "cpu" | "memory" | "signal"
    seconds: float  # wall clock, interpreter start-up included
    isolation: tuple[str, ...]  # the layers that were in force, see `isolation_layers`


class SandboxError(RuntimeError):
    """The sandbox could not be set up as asked, so the code did not run (not the code's fault)."""


def run_code(
    code: str,
    *,
    stdin: str = "",
    asserts: str | None = None,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    disk_mb: int = 64,
    max_procs: int = 64,
    max_stdout_bytes: int = 1 << 20,
    allow_network: bool = False,
    allow_subprocess: bool = False,
    audit_hook: bool = True,
    namespaces: bool = True,
    require_namespaces: bool = False,
) -> ExecResult:
    """Run ``code`` as ``__main__`` in a sandboxed interpreter; never raises for what the code does.

    ``asserts``: statements run after ``code`` in its globals (a ``sys.exit(0)`` in ``code`` does not
    skip them); ``ok`` then also requires that they ran to the end. ``cpu_s``: RLIMIT_CPU of the
    program; ``memory_mb``: RLIMIT_AS (virtual memory, so a 2 GB allocation fails even if untouched);
    ``disk_mb``: size of the working directory and RLIMIT_FSIZE (also caps stdout); ``max_procs``:
    RLIMIT_NPROC, counted over all processes of the program's user (as root: over all concurrent
    sandboxes, so keep it above their number). ``audit_hook=False`` leaves only the OS layers (for code
    that needs ctypes, or to test them); ``namespaces=False`` leaves only the audit hook.
    ``require_namespaces``: refuse to run unless the network, mount and PID namespaces and an
    unprivileged uid are all in force.

    Raises `SandboxError` if the sandbox cannot be set up (e.g. nothing blocks the network), ValueError
    for bad limits.
    """
    if not (timeout_s > 0 and cpu_s >= 1 and memory_mb >= 1 and disk_mb >= 1 and max_procs >= 1):
        raise ValueError("timeout_s > 0, cpu_s >= 1, memory_mb >= 1, disk_mb >= 1, max_procs >= 1 required")
    if os.name != "posix":
        raise SandboxError("run_code needs a POSIX system")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="offpolicy_exec_"))
    try:
        if os.geteuid() == 0:  # without a private tmpfs the program (as nobody) writes here directly
            os.chown(workdir, NOBODY, NOBODY)
        cfg = dict(
            workdir=workdir, cpu_s=int(cpu_s), memory_mb=int(memory_mb), disk_mb=int(disk_mb),
            max_procs=int(max_procs), allow_network=allow_network, allow_subprocess=allow_subprocess,
            audit_hook=audit_hook, namespaces=namespaces, require_namespaces=require_namespaces,
        )
        return _run(cfg, code, stdin, asserts, timeout_s, max_stdout_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def isolation_layers() -> tuple[str, ...]:
    """The layers `run_code` applies here with its defaults, e.g. ``("rlimits", "netns", "readonly_fs",
    "pidns", "ipcns", "nobody", "no_new_privs", "audit_hook")`` as root on Linux (runs ``pass`` once)."""
    global _LAYERS
    if _LAYERS is None:
        _LAYERS = run_code("pass").isolation
    return _LAYERS


_LAYERS: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------------------
# Reward


def code_exec_reward(response: str, tests: list | dict | str, *, mode: str = "fraction", **limits) -> float:
    """Fraction of ``tests`` that the code in ``response`` passes (``mode="all"``: 1.0 or 0.0).

    ``tests``: a list of cases, one case, or their JSON text (so it can be a dataset's ground-truth
    string); text that is not JSON is one assert snippet. A case is ``{"stdin": ..., "expected_stdout":
    ...}`` (stdout compared line by line, trailing whitespace and trailing blank lines ignored),
    ``{"assert": "assert f(2) == 4", "stdin": ...}`` or a bare assert string; a dict may have both
    ``assert`` and ``expected_stdout``. Each case runs in its own sandbox; ``limits`` go to `run_code`.
    Returns 0.0 for empty, garbage or crashing code; raises ValueError for malformed ``tests`` and
    `SandboxError` when the sandbox cannot run at all.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"mode must be 'fraction' or 'all', got {mode!r}")
    cases = parse_tests(tests)
    code = extract_code(response) if isinstance(response, str) else ""
    if not code.strip():
        return 0.0
    passed = 0
    for case in cases:
        res = run_code(code, stdin=case.get("stdin", ""), asserts=case.get("assert"), **limits)
        ok = res.ok and ("expected_stdout" not in case or _same_output(res.stdout, case["expected_stdout"]))
        if mode == "all" and not ok:
            return 0.0
        passed += ok
    return passed / len(cases)


_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)


def extract_code(response: str) -> str:
    """The last ```python (or ```py / ```python3) block, else the last fenced block, else the text."""
    blocks = _FENCE.findall(response)
    python = [body for lang, body in blocks if lang.strip().lower() in ("python", "python3", "py")]
    chosen = python or [body for _, body in blocks]
    return chosen[-1] if chosen else response


def parse_tests(tests: list | dict | str) -> list[dict]:
    """Normalise ``tests`` (see `code_exec_reward`) to a non-empty list of case dicts."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            tests = [tests]
    if isinstance(tests, (str, dict)):
        tests = [tests]
    cases = []
    for i, case in enumerate(tests):
        case = {"assert": case} if isinstance(case, str) else case
        if not isinstance(case, dict) or not ({"assert", "expected_stdout"} & case.keys()):
            want = "an assert string or a dict with 'assert' or 'expected_stdout'"
            raise ValueError(f"test {i}: need {want}, got {case!r:.80}")
        bad = [k for k in ("stdin", "expected_stdout", "assert") if k in case and not isinstance(case[k], str)]
        if bad:
            raise ValueError(f"test {i}: {bad[0]!r} must be a string, got {type(case[bad[0]]).__name__}")
        cases.append(case)
    if not cases:
        raise ValueError("no tests")
    return cases


def _same_output(got: str, want: str) -> bool:
    def lines(s):
        return [line.rstrip() for line in s.rstrip().splitlines()]

    return lines(got) == lines(want)


# ---------------------------------------------------------------------------------------------------
# Parent side: start the helper, wait with a deadline, kill what is left, read the results.


def _run(cfg: dict, code: str, stdin: str, asserts: str | None, timeout_s: float, max_stdout: int) -> ExecResult:
    tmp = tempfile.TemporaryFile
    with tmp() as prog, tmp() as inp, tmp() as out, tmp() as err:
        prog.write(json.dumps({"code": code, "asserts": asserts}).encode())
        prog.flush()
        prog.seek(0)
        inp.write(stdin.encode("utf-8", "replace"))
        inp.flush()
        inp.seek(0)
        r, w = os.pipe()
        cfg.update(status_fd=w, program_fd=prog.fileno())
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                [_interpreter(), "-I", "-S", "-B", _HELPER, "--helper", json.dumps(cfg)],
                stdin=inp, stdout=out, stderr=err, cwd=cfg["workdir"], env=_environment(cfg["workdir"]),
                start_new_session=True, pass_fds=(w, prog.fileno()),
            )
        except OSError as e:
            os.close(r)
            raise SandboxError(f"cannot start the sandbox helper: {e}") from e
        finally:
            os.close(w)
        try:
            status, timed_out = _wait(proc, r, t0 + timeout_s)
        finally:
            os.close(r)
        seconds = time.monotonic() - t0
        stdout = _read_head(out, max_stdout)
        stderr = _read_tail(err, STDERR_BYTES)

    if "error" in status:
        raise SandboxError(status["error"][0])
    if "ready" not in status:
        why = "did not start within timeout_s" if timed_out else f"failed to start (helper exit {proc.returncode})"
        raise SandboxError(f"sandbox {why}: {stderr[-500:]}")
    returncode, cpu = proc.returncode, 0.0
    if "exit" in status:
        raw, cpu_text = status["exit"][-1].split()
        returncode, cpu = os.waitstatus_to_exitcode(int(raw)), float(cpu_text)
    sig = -returncode if returncode < 0 else 0
    if timed_out:
        killed = "timeout"
    elif sig in (signal.SIGXCPU, signal.SIGKILL) and cpu >= cfg["cpu_s"] - 0.05:
        killed = "cpu"
    elif "MemoryError" in stderr:
        killed = "memory"
    else:
        killed = "signal" if sig else None
    ok = returncode == 0 and not timed_out and (asserts is None or "passed" in status)
    layers = tuple(status.get("layers", [""])[0].split(","))
    return ExecResult(ok, returncode, stdout, stderr, timed_out, killed, seconds, layers)


def _wait(proc: subprocess.Popen, r: int, deadline: float) -> tuple[dict[str, list[str]], bool]:
    """Collect the helper's status lines until it exits or ``deadline``; then kill its process group
    (and, on time-out, the program, which may have left the group) and reap the helper."""
    chunks: list[bytes] = []
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd (old kernel, not Linux): poll every 20 ms
    watch = [r] + ([pidfd] if pidfd is not None else [])
    timed_out = False
    try:
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(watch, [], [], left if pidfd is not None else min(left, 0.02))
            if r in ready:
                data = os.read(r, 65536)
                if data:
                    chunks.append(data)
                else:
                    watch.remove(r)  # EOF: only the helper's exit is left to wait for
    finally:
        if pidfd is not None:
            os.close(pidfd)
    status = _parse_status(b"".join(chunks))
    if timed_out and "pid" in status and "exit" not in status:
        pid = int(status["pid"][0])
        if _is_child(pid, proc.pid):  # the program may have left the group; its pid is not yet reaped
            _kill(os.kill, pid)
    _kill(os.killpg, proc.pid)  # the helper is unreaped, so its group id is still ours
    proc.wait()
    os.set_blocking(r, False)
    try:
        while data := os.read(r, 65536):
            chunks.append(data)
    except BlockingIOError:
        pass  # a leftover process still holds the pipe; what was written is read
    return _parse_status(b"".join(chunks)), timed_out


def _kill(fn, pid: int) -> None:
    try:
        fn(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse_status(data: bytes) -> dict[str, list[str]]:
    """Status lines by key. With ``asserts`` the program holds the pipe, so it could add lines: the
    helper's ``pid`` comes first and its ``exit`` last, and a forged ``pid`` is checked before use."""
    status: dict[str, list[str]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, rest = line.partition(" ")
        status.setdefault(key, []).append(rest)
    return status


def _is_child(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def _read_head(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit + 1)
    tail = "\n[... truncated]" if len(data) > limit else ""
    return data[:limit].decode("utf-8", "replace") + tail


def _read_tail(f, limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    head = f"[... {size - limit} bytes truncated]\n" if size > limit else ""
    return head + f.read().decode("utf-8", "replace")


def _interpreter() -> str:
    # The base interpreter (-I -S ignores a venv anyway); `_expose` makes it reachable for nobody.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _environment(workdir: str) -> dict[str, str]:
    # Nothing inherited; -I already ignores PYTHON* variables and the user site directory.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
