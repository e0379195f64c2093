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

NOBODY = 65534  # the uid/gid a root caller's program runs as
STDERR_BYTES = 4096  # stderr keeps its last this-many bytes

# Linux constants (sched.h, mount.h); os.unshare only exists from Python 3.12.
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x1000, 0x2000, 0x4000, 1 << 18
_ATTR_RDONLY, _ATTR_NOSUID, _ATTR_NODEV, _ATTR_NOEXEC = 1, 2, 4, 8
_AT_RECURSIVE, _SYS_MOUNT_SETATTR = 0x8000, 442  # 442 on every architecture (new-syscall table)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


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
                [_interpreter(), "-I", "-S", "-B", os.path.abspath(__file__), "--helper", json.dumps(cfg)],
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


# ---------------------------------------------------------------------------------------------------
# Helper side (``python -I -S -B code_exec.py --helper CFG``): limits and namespaces, then fork the
# program (pid 1 of the new PID namespace, so everything it starts dies with it) and report its status.


class _Libc:
    """The few libc calls the helper needs, raising OSError like the os module does."""

    def __init__(self):
        import ctypes

        self.c, self.lib = ctypes, ctypes.CDLL(None, use_errno=True)

    def call(self, name: str, *args) -> None:
        if getattr(self.lib, name)(*args) != 0:
            err = self.c.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self.call("unshare", self.c.c_int(flags))

    def mount(self, src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        src_b, target_b, fstype_b, data_b = (s.encode() if s else None for s in (src, target, fstype, data))
        self.call("mount", src_b, target_b, fstype_b, self.c.c_ulong(flags), data_b)

    def mount_setattr(self, path: str, recursive: bool, attr_set: int, attr_clr: int) -> None:
        c = self.c
        attr = (c.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
        flags = c.c_uint(_AT_RECURSIVE if recursive else 0)
        self.call("syscall", c.c_long(_SYS_MOUNT_SETATTR), c.c_int(-100), path.encode(), flags, attr, c.c_size_t(32))

    def prctl(self, option: int, value: int) -> None:
        self.call("prctl", self.c.c_int(option), *(self.c.c_ulong(v) for v in (value, 0, 0, 0)))


def _helper(cfg: dict) -> None:
    import resource

    def say(line: str) -> None:
        os.write(cfg["status_fd"], (line.replace("\n", " ") + "\n").encode())

    try:
        for res, value in (
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_CPU, cfg["cpu_s"]),
            (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
            (resource.RLIMIT_FSIZE, cfg["disk_mb"] << 20),
        ):
            resource.setrlimit(res, (value, value))
        libc, layers = _Libc(), ["rlimits"]
        prefix = os.path.realpath(sys.prefix)
        # e.g. /root (0700) above a pyenv interpreter: nobody could not run it without help
        blocker = _closed_ancestor(prefix) if os.geteuid() == 0 else None
        unshared = _unshare(libc, cfg, blocker, layers)
        if unshared & _CLONE_NEWNS:
            try:
                _private_filesystem(libc, cfg, prefix, blocker if "userns" not in layers else None)
                layers.append("readonly_fs")
            except OSError:
                pass  # e.g. no mount_setattr (Linux < 5.12): the audit hook guards writes alone
        pid = os.fork()
        if pid == 0:
            try:
                _exec_program(libc, cfg, unshared, layers, say)
            except BaseException as e:  # noqa: BLE001 - reported to the parent as a SandboxError
                say(f"error sandbox setup: {e}")
                os._exit(1)
        say(f"pid {pid}")
        _, raw, usage = os.wait4(pid, 0)
        say(f"exit {raw} {usage.ru_utime + usage.ru_stime:.3f}")
    except BaseException as e:  # noqa: BLE001
        say(f"error sandbox setup: {e}")
        os._exit(1)
    os._exit(0)


def _unshare(libc: _Libc, cfg: dict, blocker: str | None, layers: list[str]) -> int:
    """Enter new namespaces; return the CLONE_* flags that took effect (0 if none could)."""
    if not cfg["namespaces"] or not sys.platform.startswith("linux"):
        return 0
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    flags |= 0 if cfg["allow_network"] else _CLONE_NEWNET
    try:
        libc.unshare(flags)
        return flags
    except OSError:  # no CAP_SYS_ADMIN: a user namespace grants it inside
        pass
    if os.geteuid() == 0 and blocker is None:
        _drop_to_nobody(layers)  # first: uid 0 inside a user namespace would keep its capabilities
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        return 0
    try:
        libc.unshare(flags | _CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:  # files can only be created with a mapped owner
                f.write(text)
    except OSError:
        return 0
    layers.append("userns")
    return flags | _CLONE_NEWUSER


def _private_filesystem(libc: _Libc, cfg: dict, prefix: str, blocker: str | None) -> None:
    """In the new mount namespace: empty /tmp, /var/tmp, /dev/shm; a size-limited tmpfs as the
    working directory; everything else read-only and nosuid."""
    workdir = cfg["workdir"]
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):  # other processes' files stay unseen
        if os.path.isdir(shared) and not os.path.islink(shared):
            libc.mount("tmpfs", shared, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    os.makedirs(workdir, exist_ok=True)  # again, if it was under one of them
    libc.mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['disk_mb']}m,mode=0777")
    os.chdir(workdir)  # into the tmpfs
    if blocker and os.path.realpath(sys.executable).startswith(prefix + "/"):
        _expose(libc, prefix, blocker, workdir)
    libc.mount_setattr("/", True, _ATTR_RDONLY | _ATTR_NOSUID, 0)
    libc.mount_setattr(workdir, False, _ATTR_NOSUID | _ATTR_NODEV | _ATTR_NOEXEC, _ATTR_RDONLY)


def _exec_program(libc: _Libc, cfg: dict, unshared: int, layers: list[str], say) -> None:
    """In the forked child: finish the sandbox, check it is enough, exec the bootstrap."""
    import resource

    if unshared & _CLONE_NEWPID:
        layers.append("pidns")
        try:  # a /proc that shows only this namespace's processes
            libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)
        except OSError:
            pass
    layers += [name for flag, name in ((_CLONE_NEWNET, "netns"), (_CLONE_NEWIPC, "ipcns")) if unshared & flag]
    userns = "userns" in layers
    if os.geteuid() == 0 and not userns:
        _drop_to_nobody(layers)
    if "nobody" in layers or userns:  # otherwise it would count all of the caller's processes
        # Set only now, so that in a user namespace it counts the processes in there.
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
        layers.append("nproc")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no_new_privs")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the helper, whatever its process group
    if cfg["audit_hook"]:
        layers.append("audit_hook")  # the bootstrap says "ready" only once it is installed
    _check_fail_closed(cfg, layers)
    exe, stdlib = os.path.realpath(sys.executable), os.path.realpath(os.__file__)
    if not (os.access(exe, os.X_OK) and os.access(stdlib, os.R_OK)):
        raise OSError(f"the interpreter {exe} is not usable by uid {os.getuid()}")
    say("layers " + ",".join(layers))
    keys = ("workdir", "status_fd", "program_fd", "allow_network", "allow_subprocess", "audit_hook")
    os.execv(exe, [exe, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps({k: cfg[k] for k in keys})])


def _drop_to_nobody(layers: list[str]) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    layers.append("nobody")


def _check_fail_closed(cfg: dict, layers: list[str]) -> None:
    have, missing = set(layers), []
    if not cfg["allow_network"] and not {"netns", "audit_hook"} & have:
        missing.append("network isolation (no network namespace and audit_hook=False)")
    if not {"readonly_fs", "audit_hook"} & have:
        missing.append("write confinement (no mount namespace and audit_hook=False)")
    if cfg["require_namespaces"]:
        missing += sorted({"readonly_fs", "pidns"} | (set() if cfg["allow_network"] else {"netns"}) - have)
        if os.geteuid() == 0 and "userns" not in have:
            missing.append("an unprivileged uid")
    if missing:
        raise OSError("cannot provide " + ", ".join(missing))


def _closed_ancestor(path: str) -> str | None:
    """The first directory above ``path`` that others cannot enter."""
    cur = "/"
    for part in path.strip("/").split("/")[:-1]:
        cur = os.path.join(cur, part)
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _expose(libc: _Libc, prefix: str, blocker: str, workdir: str) -> None:
    """Make ``prefix`` (the interpreter's installation) reachable for nobody in this mount namespace:
    cover ``blocker`` with an empty tmpfs (hiding, e.g., root's home) and move ``prefix`` back into it
    at the same path, so compiled-in paths (RUNPATH, sys.prefix) still hold."""
    stage = os.path.join(workdir, ".interpreter")
    os.mkdir(stage)
    libc.mount(prefix, stage, None, _MS_BIND | _MS_REC)
    libc.mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    os.makedirs(prefix)
    libc.mount(stage, prefix, None, _MS_MOVE)
    os.rmdir(stage)


# Runs as ``python -I -S -B -c _BOOTSTRAP CFG`` in the program's process: installs the audit hook, says
# "ready", runs the code (and the asserts). The hook captures every builtin it uses, so that code which
# rebinds builtins or stdlib functions cannot steer it; it still is no match for deliberate attacks.
_BOOTSTRAP = r'''
import json, os, sys

def _guard(root, allow_network, allow_subprocess):
    import posix
    if not allow_subprocess:
        import subprocess, _posixsubprocess  # loaded now; the hook refuses to load a fresh copy
        def _refuse(*args, **kwargs):
            raise PermissionError("sandbox: process creation is blocked")
        _posixsubprocess.fork_exec = _refuse
    str_, bytes_, int_, type_, Denied = str, bytes, int, type, PermissionError
    getcwd, getpid = posix.getcwd, posix.getpid
    prefix = root.rstrip("/") + "/"
    devices = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    write = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    # event -> (positions of paths, positions of dir_fd arguments)
    fs = {"os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
          "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.utime": ((0,), (3,)),
          "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
          "os.rename": ((0, 1), (2, 3)), "shutil.rmtree": ((0,), (1,))}
    always = {"os.link", "os.symlink", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "code.__new__",
              "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
    net = {"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname"}
    proc = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "subprocess.Popen"}
    blocked_imports = {"_ctypes"} | (set() if allow_subprocess else {"_posixsubprocess"})
    denied = frozenset(always | (set() if allow_network else net) | (set() if allow_subprocess else proc))
    watched = denied | frozenset(fs) | {"open", "import", "socket.__new__", "socket.sendmsg", "os.kill", "os.killpg"}

    def inside(path, fd_ok):
        kind = type_(path)
        if kind is int_:
            return fd_ok
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:
            return False  # a PathLike could answer differently the second time
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        path = "/" + "/".join(parts)
        return path in devices or (path + "/").startswith(prefix)

    def hook(event, args):
        if event not in watched:
            return
        if event in denied:
            raise Denied(f"sandbox: {event} is blocked")
        if event == "open":
            if args[2] & write and not inside(args[0], True):
                raise Denied(f"sandbox: writing outside the working directory is blocked: {args[0]!r}")
        elif event in fs:
            paths, dir_fds = fs[event]
            if any(i < len(args) and args[i] is not None for i in dir_fds) or not all(
                inside(args[i], event == "os.truncate") for i in paths if i < len(args)
            ):
                raise Denied(f"sandbox: {event} outside the working directory is blocked")
        elif event == "import":
            if args[0] in blocked_imports:
                raise Denied(f"sandbox: importing {args[0]} is blocked")
        elif event == "socket.__new__":
            if not allow_network and args[1] != 1:  # AF_UNIX stays for socketpair (asyncio)
                raise Denied("sandbox: network sockets are blocked")
        elif event == "socket.sendmsg":
            if not allow_network and args[1] is not None:
                raise Denied("sandbox: socket.sendmsg to an address is blocked")
        elif not allow_subprocess and args[0] != getpid():  # os.kill, os.killpg
            raise Denied(f"sandbox: {event} is blocked")

    sys.addaudithook(hook)

def _main():
    cfg = json.loads(sys.argv[1])
    status, root = cfg["status_fd"], cfg["workdir"]
    with os.fdopen(cfg["program_fd"], "rb") as f:
        program = json.loads(f.read())
    path = os.path.join(root, "main.py")
    with open(path, "w", encoding="utf-8", errors="replace") as f:  # for tracebacks
        f.write(program["code"])
    if cfg["audit_hook"]:
        _guard(root, cfg["allow_network"], cfg["allow_subprocess"])
    os.write(status, b"ready\n")
    code, asserts = program["code"], program["asserts"]
    if asserts is None:
        os.close(status)
    del cfg, program
    sys.argv[:] = [path]
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    compiled = compile(code, path, "exec")
    if asserts is None:
        exec(compiled, namespace)
        return
    try:
        exec(compiled, namespace)
    except SystemExit as e:  # `sys.exit(main())` at the end of a solution must not skip the asserts
        if e.code not in (None, 0):
            raise
    exec(compile(asserts, "<asserts>", "exec"), namespace)
    os.write(status, b"passed\n")

_main()
'''


if __name__ == "__main__" and sys.argv[1:2] == ["--helper"]:
    _helper(json.loads(sys.argv[2]))
