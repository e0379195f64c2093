"""The sandbox helper of :mod:`offpolicy.rewards.code_exec`, run as a script:
``python -I -S -B sandbox_helper.py --helper CFG``.

It applies the resource limits and (where the process may) new network, mount, PID and IPC
namespaces, a read-only filesystem with a private tmpfs working directory, uid/gid nobody and
``no_new_privs``, then forks the program (pid 1 of the new PID namespace, so everything it starts dies
with it) under the PEP 578 audit hook, and reports its status on a pipe. Standard library only: ``-I``
keeps the package off ``sys.path``. docs/code_exec.md lists what each layer guarantees.
"""

from __future__ import annotations

import json
import os
import signal
import sys

NOBODY = 65534  # the uid/gid a root caller's program runs as

# Linux constants (sched.h, mount.h); os.unshare only exists from Python 3.12.
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x1000, 0x2000, 0x4000, 1 << 18
_ATTR_RDONLY, _ATTR_NOSUID, _ATTR_NODEV, _ATTR_NOEXEC = 1, 2, 4, 8
_AT_RECURSIVE, _SYS_MOUNT_SETATTR = 0x8000, 442  # 442 on every architecture (new-syscall table)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


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
