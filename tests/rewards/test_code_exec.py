"""Sandbox tests for offpolicy.rewards.code_exec (issue 5, "Code-execution sandbox tests").

Each test runs one or a few ~0.1 s sandboxes; the CPU-limit test burns 1 s of CPU. Tests of a single
OS layer (``audit_hook=False``) skip where that layer is unavailable (no namespaces for this user).
"""

import ast
import os
import time
import uuid
from pathlib import Path

import pytest

from offpolicy.rewards.code_exec import (
    SandboxError,
    code_exec_reward,
    extract_code,
    isolation_layers,
    parse_tests,
    run_code,
)

REPO = Path(__file__).resolve().parents[2]

ADD_IO = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = [{"stdin": "1 2\n", "expected_stdout": "3\n"}, {"stdin": "2 2", "expected_stdout": "4"}]


def _layers() -> set[str]:
    try:
        return set(isolation_layers())
    except SandboxError as e:  # e.g. root with the interpreter where uid 65534 cannot read it
        pytest.skip(f"no sandbox on this machine: {e}")


def _require(*names: str) -> None:
    missing = set(names) - _layers()
    if missing:
        pytest.skip(f"sandbox layers {sorted(missing)} unavailable here (have {sorted(_layers())})")


def _lines(stdout: str) -> dict[str, str]:
    """``name outcome`` lines printed by the probe programs below, as a dict."""
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


# --- rewards ---------------------------------------------------------------------------------------


def test_correct_code_scores_one_wrong_code_zero_partial_the_fraction():
    _layers()
    assert code_exec_reward(ADD_IO, ADD_TESTS) == 1.0
    assert code_exec_reward(ADD_IO.replace("a + b", "a - b"), ADD_TESTS) == 0.0  # -1 != 3, 0 != 4
    assert code_exec_reward(ADD_IO.replace("a + b", "a * b"), ADD_TESTS) == 0.5  # 2 != 3, 4 == 4
    assert code_exec_reward(ADD_IO.replace("a + b", "a * b"), ADD_TESTS, mode="all") == 0.0


def test_assert_tests_from_json_ground_truth():
    _layers()
    solution = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    truth = '["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]'
    assert code_exec_reward(solution, truth) == pytest.approx(2 / 3, abs=1e-12)
    assert code_exec_reward(solution, "assert add(1, 2) == 3") == 1.0  # not JSON: one snippet
    assert code_exec_reward(solution, truth, mode="all") == 0.0


def test_leaving_early_does_not_skip_the_asserts():
    _layers()
    wrong = ["assert add(2, 2) == 5"]
    assert code_exec_reward("import sys\ndef add(a, b): return a + b\nsys.exit(0)", wrong) == 0.0
    assert code_exec_reward("import os\ndef add(a, b): return a + b\nos._exit(0)", wrong) == 0.0
    legit = "import sys\ndef add(a, b): return a + b\ndef main(): return 0\nif __name__ == '__main__': sys.exit(main())"
    assert code_exec_reward(legit, ["assert add(2, 2) == 4"]) == 1.0


@pytest.mark.parametrize(
    "response",
    ["", "   ", "def f(:\n  pass", "\x00\xff garbage ```", "```python\n```", "raise SystemExit(3)", None,
     "print(" * 200],
)
def test_garbage_scores_zero_without_raising(response):
    _layers()
    assert code_exec_reward(response, ADD_TESTS) == 0.0


def test_extract_code_prefers_the_last_python_block():
    text = "```\nnot this\n```\n```python\nfirst\n```\n```py\nsecond\n```\n```text\nnot this either\n```"
    assert extract_code(text) == "second\n"
    assert extract_code("```\nonly fence\n```") == "only fence\n"
    assert extract_code("```python\ntruncated generation") == "truncated generation"
    assert extract_code("print(1)") == "print(1)"


def test_parse_tests_accepts_the_documented_forms_and_rejects_others():
    assert parse_tests("assert f(1)") == [{"assert": "assert f(1)"}]
    assert parse_tests('{"stdin": "1", "expected_stdout": "2"}') == [{"stdin": "1", "expected_stdout": "2"}]
    assert parse_tests(["assert x", {"assert": "assert y", "stdin": "z"}])[1]["stdin"] == "z"
    bad_inputs = [([], "no tests"), ([{"stdin": "1"}], "test 0"), ([3], "test 0"), ([{"assert": 1}], "must be a")]
    for bad, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            parse_tests(bad)


# --- limits ----------------------------------------------------------------------------------------


@pytest.mark.timing
def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    _layers()
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)"
    res = run_code(code, timeout_s=1.0)
    assert (res.ok, res.timed_out, res.killed_reason) == (False, True, "timeout")
    assert 0.9 <= res.seconds < 2.5


@pytest.mark.timing
def test_busy_loop_is_killed_at_the_cpu_limit():
    _layers()
    res = run_code("while True:\n    pass", cpu_s=1, timeout_s=20)
    assert (res.ok, res.timed_out, res.killed_reason) == (False, False, "cpu")
    assert res.seconds < 5  # the 1 s of CPU, not the 20 s wall-clock limit


@pytest.mark.parametrize(
    "code, memory_mb",
    [
        ("x = bytearray(2 * 1024**3)", 256),  # one 2 GB block: refused by RLIMIT_AS without touching it
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))", 96),  # grows until the limit
    ],
)
def test_memory_bomb_fails_with_a_memory_error(code, memory_mb):
    _layers()
    res = run_code(code, memory_mb=memory_mb, timeout_s=10)
    assert (res.ok, res.timed_out, res.killed_reason) == (False, False, "memory")
    assert "MemoryError" in res.stderr


def test_output_is_truncated_and_the_working_directory_removed():
    _layers()
    code = "import os, sys\nprint(os.getcwd())\nprint('x' * 3_000_000)\nsys.stderr.write('e' * 100_000)"
    res = run_code(code, max_stdout_bytes=1000)
    assert res.ok
    assert res.stdout.startswith("/") and res.stdout.endswith("[... truncated]")
    assert len(res.stdout) <= 1000 + len("\n[... truncated]")
    assert res.stderr.startswith("[... 95904 bytes truncated]\n") and res.stderr.endswith("e" * 4096)
    workdir = res.stdout.split("\n", 1)[0]
    assert "offpolicy_exec_" in workdir and not os.path.exists(workdir)


def test_environment_is_minimal_and_unprivileged():
    _layers()
    code = "import os, sys\nprint(sorted(os.environ))\nprint(os.getuid())\nprint(sys.flags.isolated, sys.flags.no_site)"
    res = run_code(code)
    env, uid, flags = res.stdout.splitlines()
    assert set(ast.literal_eval(env)) <= {"PATH", "HOME", "TMPDIR", "LC_ALL"}
    assert int(uid) != 0
    assert flags == "1 1"


# --- network ---------------------------------------------------------------------------------------

NETWORK_PROBE = """
import socket
probes = {
    "connect": lambda: socket.create_connection(("1.1.1.1", 53), timeout=1),
    "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("1.1.1.1", 53)),
    "dns": lambda: socket.getaddrinfo("example.com", 80),
}
for name, probe in probes.items():
    try:
        probe()
        print(name, "succeeded")
    except OSError as e:
        print(name, "failed", type(e).__name__)
try:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    print("bind", "succeeded")
except OSError as e:
    print("bind", "failed", type(e).__name__)
print("interfaces", ",".join(name for _, name in socket.if_nameindex()))
"""


def test_network_sockets_fail():
    _layers()
    res = run_code(NETWORK_PROBE, timeout_s=5)
    got = _lines(res.stdout)
    for name in ("connect", "udp", "dns", "bind"):
        assert got[name].startswith("failed"), (name, got)


def test_network_namespace_alone_has_no_interface_but_loopback():
    _require("netns")
    res = run_code(NETWORK_PROBE, audit_hook=False, timeout_s=5)
    got = _lines(res.stdout)
    for name in ("connect", "udp", "dns"):
        assert got[name].startswith("failed"), (name, got)
    assert got["interfaces"] == "lo"  # a bind succeeds, but in an empty namespace nobody can reach


def test_refuses_to_run_when_nothing_blocks_the_network():
    with pytest.raises(SandboxError, match="network isolation"):
        run_code("print(1)", audit_hook=False, namespaces=False)


# --- filesystem and processes ----------------------------------------------------------------------


@pytest.mark.parametrize("audit_hook", [True, False], ids=["all_layers", "os_layers_only"])
def test_writes_outside_the_working_directory_fail(audit_hook):
    if not audit_hook:
        _require("readonly_fs")
    _layers()
    tag = uuid.uuid4().hex
    targets = [f"/tmp/offpolicy_escape_{tag}", str(REPO / f"offpolicy_escape_{tag}"), f"../offpolicy_escape2_{tag}"]
    code = f"""
import os
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("escaped")
        print(path, "written")
    except OSError as e:
        print(path, "failed", type(e).__name__)
try:
    os.mkdir("/tmp/offpolicy_escape_dir_{tag}")
    print("mkdir", "written")
except OSError as e:
    print("mkdir", "failed")
with open("inside.txt", "w") as f:
    f.write("kept")
print("inside", open("inside.txt").read())
"""
    try:
        res = run_code(code, audit_hook=audit_hook)
        got = _lines(res.stdout)
        assert got["inside"] == "kept", res
        for path in targets + ["mkdir"]:
            assert got[path].startswith("failed"), (path, got)
    finally:
        where_they_would_land = targets[:2] + [f"/tmp/offpolicy_escape2_{tag}", f"/tmp/offpolicy_escape_dir_{tag}"]
        leaked = [p for p in where_they_would_land if os.path.exists(p)]
        for p in leaked:
            os.rmdir(p) if os.path.isdir(p) else os.remove(p)
    assert not leaked


def test_fork_and_subprocess_fail_by_default():
    _layers()
    code = """
import os, subprocess
probes = {"fork": os.fork, "subprocess": lambda: subprocess.run(["true"]), "system": lambda: os.system("true")}
for name, probe in probes.items():
    try:
        probe()
        print(name, "succeeded")
    except OSError as e:
        print(name, "failed")
"""
    got = _lines(run_code(code).stdout)
    assert got == {"fork": "failed", "subprocess": "failed", "system": "failed"}


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            pass  # exited meanwhile
    return pids


def test_fork_bomb_is_contained_and_killed_with_the_program():
    _require("pidns", "nproc")
    code = """
import os, time
print("workdir", os.getcwd(), flush=True)
n = 0
try:
    while True:
        if os.fork() == 0:
            os.setsid()  # leaves the process group: only the PID namespace still holds it
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("stopped", n, e.errno)
"""
    res = run_code(code, allow_subprocess=True, max_procs=16, timeout_s=10)
    got = _lines(res.stdout)
    assert res.ok and int(got["stopped"].split()[0]) < 16, res
    deadline = time.monotonic() + 2.0
    while _processes_mentioning(got["workdir"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(got["workdir"]) == []
