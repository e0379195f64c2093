"""Thread defaults come from the CPUs the process may use, split so explorer + trainer never exceed them."""

from offpolicy import threads
from offpolicy.threads import available_cpus, thread_split


def test_split_never_oversubscribes():
    assert thread_split("sync", None, None, cpus=4) == (4, 1)
    assert thread_split("async", None, None, cpus=2) == (1, 1)
    assert thread_split("async", None, None, cpus=8) == (4, 4)
    assert thread_split("async", 6, None, cpus=8) == (6, 2)
    assert thread_split("async", None, 3, cpus=8) == (5, 3)
    assert thread_split("async", 2, 2, cpus=2) == (2, 2)  # explicit values win
    assert thread_split("async", None, None, cpus=1) == (1, 1)  # one each at least


def test_available_cpus_takes_the_cgroup_quota_and_the_affinity(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    assert available_cpus() == 1
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert available_cpus() == 4
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3})
    assert available_cpus() == 1


def test_cgroup_v2_file_is_read(monkeypatch, tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("250000 100000\n")
    monkeypatch.setattr(threads, "Path", lambda p: f if p.endswith("cpu.max") else tmp_path / "none")
    assert threads._cgroup_quota() == 2.5
    f.write_text("max 100000\n")
    assert threads._cgroup_quota() is None
