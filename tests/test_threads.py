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


def test_governor_gives_up_a_thread_while_another_process_competes(monkeypatch):
    gov = threads.ThreadGovernor(2, every=5)
    set_to = []
    monkeypatch.setattr("torch.set_num_threads", lambda n: set_to.append(n))
    samples = iter([
        (200, 200, 200),    # 5 steps alone: 200 of 200 jiffies busy, all ours -> others 0
        (400, 400, 300),    # a competitor: 100 of the 200 busy jiffies were not ours -> 1 CPU's worth
        (600, 600, 400),    # it goes on (we ran one thread)
        (790, 800, 590),    # gone again: all busy time ours (10 idle jiffies)
    ])
    monkeypatch.setattr(gov, "_sample", lambda: next(samples))
    gov.cpus = {0, 1}
    gov._last = (0, 0, 0)
    assert gov.tick(3) == 2 and set_to == []  # only every 5 steps
    assert gov.tick(5) == 2                   # others = 0
    assert gov.tick(10) == 1 and set_to == [1]  # others = 1.0 of 2 CPUs
    assert gov.tick(15) == 1
    assert gov.tick(20) == 2 and set_to == [1, 2]  # others = 0: back to both
