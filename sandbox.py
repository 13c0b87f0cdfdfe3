"""
sandbox.py — run untrusted Python (model-written code and its tests) in isolation, and prove that
the isolation holds (the hostile probes of `self_check`). Used by eval_code.py and train_code.py.

    python eval_code.py --self-check    # canonical solutions pass, wrong ones fail, every probe is contained

Each program runs in its own network, IPC, UTS, mount and PID namespaces, chrooted (pivot_root) into a
private root: a 64 MiB tmpfs holding /tmp, /var/tmp and /dev/shm, with /usr, /etc and the interpreter
bind-mounted read-only (every mount below them too) and a fresh /proc; as its own uid with CPU-time,
address-space, file-size, process-count and open-file limits, under a seccomp filter that refuses new
namespaces, mounts, keyrings, memfd, SysV IPC and sockets other than Unix, IP and netlink; killed with
everything it started at the wall-clock timeout. It passes only if it ran to its end (a per-run marker).
Needs Linux and root (CAP_SYS_ADMIN), as CI has: otherwise it refuses to run, unless the caller allows
running without isolation.
"""
import os
import resource
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from runs import Refused

SANDBOX_UID0 = 1 << 30  # each run has its own uid: SANDBOX_UID0 + the pid of its outer process (see BOOT)
# The sandbox script, run by a fresh `python -I -B -c BOOT ...` (no preexec_fn, so sandboxes start from threads).
# Three processes:
#   outer   (root, the caller's child): new network, IPC, UTS, mount and PID namespaces; waits for init.
#   init    (root, PID 1 of the new PID namespace): makes a private root (a size-limited tmpfs holding /tmp,
#           /var/tmp and /dev/shm, the system and the interpreter bind-mounted read-only, a fresh /proc),
#           starts the program and exits with its status. When init exits the kernel kills every process left
#           in the namespace (daemons included). At the timeout the caller SIGTERMs the outer, which SIGKILLs
#           init; should the outer die instead, init gets SIGKILL anyway (PR_SET_PDEATHSIG).
#   program (its own uid, rlimits, no_new_privs): the untrusted code.
# Every step is checked: one that fails refuses the run ("refused: ..." on the setup pipe) unless the caller
# passed allow_unisolated. The setup pipe carries only the trusted code's words: it is closed before the program
# runs. NOTE: the pass marker. After the program (and the check appended to it) has run to its end, the sandbox
# copies a per-run secret from the secret pipe to the done pipe; the secret is made after the program text is
# fixed and is never in it, so sys.exit(), exit(), os._exit() or a crash before the end of the check all fail,
# and nothing printed counts. Code written to attack this harness could read the secret pipe itself (it shares
# the process with the check, as it could also return an object whose __eq__ is always True): the marker
# guards against programs that stop early, not against an adversary that knows this file.
BOOT = r"""
import ctypes, os, re, resource, select, signal, sys
path, secret_fd, setup_fd, done_fd, cpu, mem_mb, tmp_mb, uid0 = sys.argv[1], *map(int, sys.argv[2:9])
allow = sys.argv[9] == "1"
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 1 << 14, 1 << 18
missing = []

def need(ok, what, why=None):
    if not ok:
        missing.append(f"{what} ({why or os.strerror(ctypes.get_errno())})")
        if not allow:
            os.write(setup_fd, f"refused: {missing[-1]}\n".encode())
            os._exit(125)
    return ok

def mount(src, dst, fstype=None, flags=0, data=None):
    b = lambda s: None if s is None else s.encode()
    return libc.mount(b(src), b(dst), b(fstype), flags, b(data)) == 0

def mounts_under(top):
    # a remount changes one mount: the recursive bind's submounts (a container's /etc/hosts) each need their own.
    # mountinfo has resolved paths, with octal escapes (\040 is a space) in bytes of any encoding
    top = os.path.realpath(top)
    unescape = lambda b: os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), b))
    with open("/proc/self/mountinfo", "rb") as f:
        points = [unescape(line.split()[4]) for line in f]
    return [m for m in points if m == top or m.startswith(top + "/")]

# seccomp(): per machine, the audit arch, clone, clone3, socket and the syscalls refused with EPERM, in this order:
# unshare setns mount umount2 pivot_root chroot add_key request_key keyctl memfd_create memfd_secret bpf
# perf_event_open userfaultfd io_uring_setup open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr
# shmget semget msgget
SYSCALLS = {"x86_64": (0xC000003E, 56, 435, 41, (272, 308, 165, 166, 155, 161, 248, 249, 250, 319, 447, 321, 298, 323,
                                                 425, 428, 429, 430, 431, 432, 433, 442, 29, 64, 68)),
            "aarch64": (0xC00000B7, 220, 435, 198, (97, 268, 40, 39, 41, 51, 217, 218, 219, 279, 447, 280, 241, 282,
                                                    425, 428, 429, 430, 431, 432, 433, 442, 194, 190, 186))}
SOCKET_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK: each stays in the network namespace

def seccomp():
    # Syscalls the program has no use for and that would undo the isolation: new namespaces (a user namespace
    # makes it root there, able to mount a tmpfs past the size bound), mounts, keyrings (they outlive the run
    # and other uids can read them), memfd and SysV IPC (memory past the address-space limit: a detached shared
    # segment belongs to no process, so no OOM kill frees it), bpf, perf, io_uring.
    # They fail with EPERM; clone3 with ENOSYS, so that the C library falls back to clone, whose flags are checked.
    # socket() only for SOCKET_FAMILIES: AF_VSOCK, for one, reaches the hypervisor past any network namespace.
    arch, clone, clone3, sock, deny = SYSCALLS.get(os.uname().machine, (None,) * 5)
    if arch is None:
        return False
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x50000 | 1, 0x50000 | 38
    NEW_NS = 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00020000 | 0x00000080
    n, F = len(deny), len(SOCKET_FAMILIES)
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL),  # seccomp_data.arch: another ABI is killed
            (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]  # .nr; x32 syscalls (x86_64) killed
    # NOTE: BPF jumps are relative and forward (jt, jf: instructions to skip). After the deny list, in order:
    # clone3 -> ENOSYS; socket: a family of the list -> ALLOW, else EPERM; clone with a namespace flag -> EPERM.
    prog += [(JEQ, n - i + F + 3, 0, k) for i, k in enumerate(deny)]  # to the first EPERM
    prog += [(JEQ, 0, 1, clone3), (RET, 0, 0, ENOSYS), (JEQ, 0, F + 2, sock), (LD, 0, 0, 16)]  # 16: args[0]
    prog += [(JEQ, F - i + 4, 0, fam) for i, fam in enumerate(SOCKET_FAMILIES)]  # to the ALLOW
    prog += [(RET, 0, 0, EPERM), (JEQ, 0, 3, clone), (LD, 0, 0, 16), (JSET, 0, 1, NEW_NS), (RET, 0, 0, EPERM),
             (RET, 0, 0, ALLOW)]
    assert all(jt < 256 and jf < 256 for _, jt, jf, _ in prog)  # one byte each: a longer deny list must not wrap
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    f = (Filter * len(prog))(*[Filter(*x) for x in prog])
    return libc.prctl(22, 2, ctypes.byref(Prog(len(prog), f)), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

def make_root(new):
    # A tmpfs over the run's host directory becomes "/": the host's /tmp, /run, /home, /root, sockets and the
    # repository are not in it; /tmp, /var/tmp and /dev/shm are directories in it, so they are private, vanish
    # with the run and share one size bound
    if not need(mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,nr_inodes=4096,mode=755"),
                "tmpfs root"):
        return False
    for d, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("dev/shm", 0o1777), ("proc", 0o555)):
        os.makedirs(f"{new}/{d}")
        os.chmod(f"{new}/{d}", mode)
    # the system and the interpreter (which may live under /root, unreadable to the program's uid) read-only
    for p in dict.fromkeys(["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", sys.base_prefix, sys.prefix]):
        if os.path.islink(p) and p.count("/") == 1:  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(p), new + p)
        elif os.path.isdir(p):
            os.makedirs(new + p, exist_ok=True)
            if not need(mount(p, new + p, flags=MS_BIND | MS_REC) and (under := mounts_under(new + p)) and all(
                    mount(None, m, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
                    for m in under), f"read-only {p}"):
                return False
    for d in ("null", "zero", "full", "random", "urandom"):
        open(f"{new}/dev/{d}", "w").close()
        if not need(mount("/dev/" + d, f"{new}/dev/{d}", flags=MS_BIND), "/dev/" + d):
            return False
    for d, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, f"{new}/dev/{d}")
    if not need(mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC), "fresh /proc"):
        return False
    os.chdir(new)  # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves no way back
    ok = need(libc.pivot_root(b".", b".") == 0 and libc.umount2(b".", 2) == 0, "pivot_root")  # 2: MNT_DETACH
    os.chdir("/")
    return ok

with open(path, encoding="utf-8") as f:
    src = f.read()
uid = uid0 + os.getpid()  # this run's own uid: pids are unique while the run lasts
root = need(os.geteuid() == 0, "root", "namespaces and a per-run uid need it")
need(libc.unshare(0x40000000) == 0, "network namespace")  # CLONE_NEWNET: empty, not even loopback
need(libc.unshare(0x08000000 | 0x04000000) == 0, "IPC and UTS namespaces")  # CLONE_NEWIPC | CLONE_NEWUTS
mntns = need(libc.unshare(0x00020000) == 0, "mount namespace")  # CLONE_NEWNS
need(libc.unshare(0x20000000) == 0, "PID namespace")  # CLONE_NEWPID: our next child is its PID 1
mntns = mntns and need(mount(None, "/", flags=MS_REC | MS_PRIVATE), "private mounts")  # nothing leaks to the host
lifeline, keep = os.pipe()
init = os.fork()
if init:  # outer: wait for init and pass its status on; SIGTERM (the caller's timeout) kills init, and the kernel
    os.close(lifeline)  # the namespace with it, before our wait returns
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
    os._exit(os.waitstatus_to_exitcode(os.waitpid(init, 0)[1]) % 256)
os.close(keep)
# PR_SET_PDEATHSIG = SIGKILL: the outer's death (killed by the caller) kills init, and with it the namespace
need(libc.prctl(1, 9, 0, 0, 0) == 0, "parent-death signal")
if select.select([lifeline], [], [], 0)[0]:
    os._exit(1)  # the outer died before prctl
os.close(lifeline)
isolated = mntns and make_root(os.path.dirname(path))
prog = "/tmp/program.py" if isolated else path  # unisolated: in the run's host directory
with open(prog, "w", encoding="utf-8") as f:
    f.write(src)
if root and not isolated:
    os.chown(os.path.dirname(prog), uid, uid)
child = os.fork()
if child == 0:  # the program
    for lim, v in ((resource.RLIMIT_AS, mem_mb << 20), (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_NOFILE, 256)):  # NPROC: this run's uid only
        resource.setrlimit(lim, (v, v))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if root:
        os.chown(prog, uid, uid)
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    need(libc.prctl(38, 1, 0, 0, 0) == 0, "no_new_privs")  # PR_SET_NO_NEW_PRIVS: setuid binaries grant nothing
    need(seccomp(), "seccomp filter", None if os.uname().machine in SYSCALLS else f"no table for {os.uname().machine}")
    os.chdir(os.path.dirname(prog))
    os.environ.update(HOME=os.path.dirname(prog), TMPDIR=os.path.dirname(prog))
    os.write(setup_fd, (f"ok without: {'; '.join(missing)}" if missing else "ok").encode() + b"\n")
    os.close(setup_fd)  # from here on, untrusted code
    del ctypes, libc, resource, need, mount, make_root, mounts_under, seccomp, SYSCALLS, SOCKET_FAMILIES, src
    sys.argv = [prog]
    with open(prog, encoding="utf-8") as f:
        code = compile(f.read(), prog, "exec")
    exec(code, {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__})
    for f in (sys.stdout, sys.stderr):  # a program may have closed or replaced them: a pass does not depend on it
        try:
            f.flush()
        except Exception:
            pass
    os.write(done_fd, os.read(secret_fd, 64))  # the pass marker: reached only if the program ran to its end
    os._exit(0)
while True:  # init: reap orphans until the program exits, then exit with its status
    pid, status = os.wait()
    if pid == child:
        os._exit(os.waitstatus_to_exitcode(status) % 256)
"""


WARNED = set()  # the unisolated setups already warned about, so each is printed once per process


def run_sandboxed(program, timeout=10.0, mem_mb=1024, tmp_mb=64, allow_unisolated=False):
    """Run a Python program in the sandbox (BOOT). Returns {"status": passed|failed|timed out, "stderr": its tail,
    "uid": the run's own uid}:
    passed only if the program ran to its end (the pass marker), whatever its exit code. Returns by timeout + ~1 s
    whatever the program started. Raises runs.Refused when the isolation cannot be set up, unless
    allow_unisolated, which runs it with what could be set up and says so loudly on stderr."""
    secret = secrets.token_hex(16).encode()  # made now, after the program text is fixed
    with tempfile.TemporaryDirectory(prefix="relay-sandbox-") as d:
        path = os.path.join(d, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        (secret_r, secret_w), (setup_r, setup_w), (done_r, done_w) = os.pipe(), os.pipe(), os.pipe()
        os.write(secret_w, secret)
        os.close(secret_w)
        args = [path, secret_r, setup_w, done_w, int(timeout) + 1, mem_mb, tmp_mb, SANDBOX_UID0, int(allow_unisolated)]
        deadline = time.monotonic() + timeout
        p = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOT, *map(str, args)], cwd=d,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             pass_fds=(secret_r, setup_w, done_w), start_new_session=True,
                             env={"PATH": "/usr/bin:/bin"})
        for fd in (secret_r, setup_w, done_w):
            os.close(fd)
        fds = [p.stdout.fileno(), p.stderr.fileno(), setup_r, done_r]
        try:
            (_, err, setup, done), finished = drain(fds, deadline)
            if not finished:  # the timeout: the outer kills init and waits for the namespace to die
                os.kill(p.pid, signal.SIGTERM)  # NOTE: not p.terminate(), which may reap p (see below)
                err += drain(fds, time.monotonic() + 1)[0][1]  # what it wrote in its last moments too
        finally:
            os.killpg(p.pid, signal.SIGKILL)  # the rest, if that failed; p is not reaped yet, so its pid is still ours
            p.wait()
            p.stdout.close(), p.stderr.close(), os.close(setup_r), os.close(done_r)
    setup, err = setup.decode("utf-8", "replace").strip(), err.decode("utf-8", "replace")
    if setup.startswith("refused: "):
        raise Refused(f"sandbox refused to run the program: no {setup[9:]}. It needs Linux and root "
                      "(CAP_SYS_ADMIN); allow_unisolated=True (eval_code.py --unsafe-no-isolation) runs "
                      "untrusted code without its isolation, at your own risk")
    if finished and not setup.startswith("ok"):
        raise RuntimeError(f"sandbox failed to start: {err[-2000:]}")
    if setup.startswith("ok without: ") and setup not in WARNED:
        WARNED.add(setup)
        print(f"\n{'!' * 80}\nWARNING: the sandbox runs untrusted code {setup[3:]}\n{'!' * 80}", file=sys.stderr)
    status = ("passed" if p.returncode == 0 and done == secret else "failed") if finished else "timed out"
    return {"status": status, "stderr": err[-2000:], "uid": SANDBOX_UID0 + p.pid}  # (BOOT's uid: its outer's pid)


def drain(fds, deadline, keep=1 << 20):
    """Read pipes until all are closed or the deadline passes; keep the last `keep` bytes of each, so the
    caller's memory stays bounded however much the program writes. Returns (tails, all closed)."""
    bufs, poll = {fd: bytearray() for fd in fds}, select.poll()
    for fd in fds:
        poll.register(fd, select.POLLIN)
    left = len(fds)
    while left and (t := deadline - time.monotonic()) > 0:
        for fd, _ in poll.poll(t * 1000):
            chunk = os.read(fd, 1 << 16)
            bufs[fd] += chunk
            if len(bufs[fd]) > 2 * keep:
                del bufs[fd][:-keep]
            if not chunk:
                poll.unregister(fd)
                left -= 1
    return [bytes(bufs[fd][-keep:]) for fd in fds], left == 0


def self_check(problems, timeout, workers, allow_unisolated=False):
    """Canonical solutions pass, empty and wrong bodies fail, and every hostile probe is contained. Returns
    the counts, "probes" = {probe: [result, contained]} and "ok"."""
    run = lambda prog, t=timeout: run_sandboxed(prog, t, allow_unisolated=allow_unisolated)
    res = {}
    with ThreadPoolExecutor(workers) as ex:
        runs = lambda progs: list(tqdm(ex.map(run, progs), total=len(progs), leave=False))
        canon = [p for p in problems if p.get("canonical_solution")]
        base = lambda p, body: p["prompt"] + body if not p.get("mbpp") else body
        res["canonical_passed"] = sum(r["status"] == "passed" for r in runs(
            [base(p, p["canonical_solution"]) + p["check"] for p in canon]))
        res["canonical_total"] = len(canon)
        res["empty_failed"] = sum(r["status"] != "passed" for r in runs(
            [base(p, "    pass\n") + p["check"] for p in problems]))
        res["wrong_failed"] = sum(r["status"] != "passed" for r in runs(
            [base(p, "    return 0\n") + p["check"] for p in problems]))
    res["total"] = len(problems)
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # the probes' host files are open to every user: only the isolation keeps them safe
        res["probes"] = {name: [result, bool(contained)] for name, result, contained in hostile_probes(run, d)}
    res["ok"] = (res["canonical_passed"] == res["canonical_total"] and res["empty_failed"] == res["total"]
                 and res["wrong_failed"] == res["total"] and all(c for _, c in res["probes"].values()))
    return res


WRONG = "import os, sys\ndef add(a, b):\n    return a - b\n"  # the probes' wrong solution and its check
CHECK = "\nassert add(1, 2) == 3\n"
STDLIB = ("import asyncio, base64, doctest, glob, multiprocessing, queue, shutil, subprocess, sys, threading, "
          "traceback, unittest, zlib\n")
DAEMON = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        {}\n"
          "        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.2)\n")  # {}: what the daemon does first
KILLER = ("import os, time\nend = time.time() + 1.5\nwhile time.time() < end:\n    for pid in [-1] + [int(p) for p in "
          "os.listdir('/proc') if p.isdigit()]:\n        try:\n            os.kill(pid, 9)\n        except OSError:\n"
          "            pass\n")  # SIGKILL to every process it can find
KERNEL = {  # kernel features the seccomp filter denies, each as a libc call that returns -1 when refused
    "a user namespace (root in it, past the tmpfs bound)": "libc.unshare(0x10000000)",
    "a key in the kernel keyring (outlives the run)": "libc.syscall({'aarch64': 217}.get(os.uname().machine, 248), "
                                                      "b'user', b'relay', b'x', 1, -4)",  # add_key
    "memfd (memory past the address-space limit)": "libc.memfd_create(b'x', 0)",
    "SysV shared memory (the same, and no process holds it)": "libc.shmget(0, 1 << 20, 0o1600)",  # IPC_PRIVATE
    "a SysV message queue (kernel memory)": "libc.msgget(0, 0o1600)",
    "a SysV semaphore set": "libc.semget(0, 1, 0o1600)",
    "an AF_VSOCK socket (to the hypervisor, past the network namespace)": "libc.socket(40, 1, 0)",
    "clone into a new user namespace": "libc.syscall({'aarch64': 220}.get(os.uname().machine, 56), "
                                       "0x10000000 | 17, 0, 0, 0, 0)"}  # CLONE_NEWUSER | SIGCHLD
# python -c NO_SYS_ADMIN.format(code): runs code in a python without CAP_SYS_ADMIN (PR_CAPBSET_DROP, then exec)
NO_SYS_ADMIN = ("import ctypes, os, sys\nctypes.CDLL(None).prctl(24, 21, 0, 0, 0)\n"
                "os.execv(sys.executable, [sys.executable, '-c', '''import sandbox\n{}'''])\n")


def hostile_probes(run, d):
    """Yields (probe, result, contained) for each hostile program, with host-side evidence where there is any.
    The probes use _socket, not socket: nothing relies on Python-level patches. d: a host directory for files."""
    exits = {"sys.exit(0)": "sys.exit(0)", "exit()": "exit()", "os._exit(0)": "os._exit(0)",
             "sys.exit(main())": "def main():\n    return 0\nif __name__ == '__main__':\n    sys.exit(main())"}
    for name, code in exits.items():
        r = run(WRONG + code + "\n" + CHECK, 3)
        yield f"{name} before a failing check", r["status"], r["status"] == "failed"
    r = run(STDLIB + "subprocess.run([sys.executable, '-c', 'import json'], check=True)\n"
            "def add(a, b):\n    return a + b\n" + CHECK, 5)
    yield "stdlib imports + subprocess, correct code", r["status"], r["status"] == "passed"
    t = time.time()
    r = run("while True:\n    pass\n", 2)
    yield "infinite loop", f"{r['status']} {time.time() - t:.1f}s", r["status"] == "timed out"
    r = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", 2)
    n = count_sandbox_processes(r["uid"])  # this run's: another evaluation may be running sandboxes now
    yield "fork bomb", f"{r['status']}, {n} left", r["status"] != "passed" and n == 0
    for name, code in [("daemon (double fork, setsid, stdio closed)", DAEMON.format("os.closerange(0, 3)")),
                       ("daemon holding the pipes, program hangs", DAEMON.format("pass") + "time.sleep(60)\n")]:
        t = time.time()
        r = run(code, 2)
        n, dt = count_sandbox_processes(r["uid"], wait=0), time.time() - t
        yield name, f"{r['status']} {dt:.1f}s, {n} left", n == 0 and dt < 2 + 1.5
    with ThreadPoolExecutor(2) as ex:
        victim = ex.submit(run, "import time\ntime.sleep(2)\n", 5)
        time.sleep(0.2)
        ex.submit(run, KILLER, 5).result()
        r = victim.result()
    yield "kill everything from a parallel sandbox", f"other run {r['status']}", r["status"] == "passed"
    r = subprocess.run([sys.executable, "-c", NO_SYS_ADMIN.format("sandbox.run_sandboxed('x = 1')")],
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=120)
    refused = r.returncode != 0 and "refused" in r.stderr and "network namespace" in r.stderr
    yield "no CAP_SYS_ADMIN: no namespaces", "refused (network namespace)" if refused else r.stderr[-40:], refused
    r = run("x = bytearray(64 * 2**30)\n", 5)
    yield "64 GiB allocation", r["status"], r["status"] == "failed" and "MemoryError" in r["stderr"]
    for name, call in KERNEL.items():
        r = run(f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif {call} == -1:\n"
                "    raise OSError(ctypes.get_errno(), 'refused')\n", 3)
        yield name, r["status"], r["status"] == "failed" and "[Errno 1]" in r["stderr"]  # EPERM: the seccomp filter
    tag, victim = secrets.token_hex(4), os.path.join(d, "repository_file.txt")
    with open(victim, "w") as f:
        f.write("keep me")
    os.chmod(victim, 0o666)
    for name, code in [("write a host file", f"open({victim!r}, 'w').write('overwritten')\n"),
                       ("delete a host file", f"import os\nos.remove({victim!r})\n")]:
        r = run(code, 3)
        yield name, r["status"], r["status"] == "failed" and open(victim).read() == "keep me"
    r = run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n", 3)
    yield "signal the caller", r["status"], r["status"] == "failed"
    for name, family, addr in [("TCP to a host listener", socket.AF_INET, ("127.0.0.1", 0)),
                               ("AF_UNIX to a host socket file", socket.AF_UNIX, os.path.join(d, "host.sock")),
                               ("AF_UNIX to a host abstract socket", socket.AF_UNIX, f"\0relay-{tag}")]:
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind(addr)
            if family == socket.AF_UNIX and addr[0] != "\0":
                os.chmod(addr, 0o777)
            server.listen()
            server.setblocking(False)
            r = run(f"import _socket\ns = _socket.socket({int(family)}, _socket.SOCK_STREAM)\n"
                    f"s.connect({server.getsockname()!r})\n", 3)
            try:
                server.accept()
                reached = True
            except BlockingIOError:
                reached = False
        yield name, r["status"] + (", reached the host" if reached else ""), r["status"] == "failed" and not reached
    maxrss, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    r = run("import sys\nb = b'x' * 2**20\nfor _ in range(2048):\n    sys.stdout.buffer.write(b)\n", 3)
    grew, dt = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss) >> 10, time.time() - t  # KiB -> MiB
    yield "2 GiB to stdout", f"{r['status']} {dt:.1f}s, caller +{grew} MiB", grew < 64 and dt < 3 + 1.5
    files = [f"{t}/relay-probe-{tag}" for t in ("/tmp", "/var/tmp", "/dev/shm")]
    r = run(f"for f in {files!r}:\n    open(f, 'w').write('x')\n", 3)
    on_host = [f for f in files if os.path.exists(f)]
    r2 = run(f"import os\nassert not any(map(os.path.exists, {files!r}))\n", 3)
    yield ("/tmp, /var/tmp, /dev/shm private", f"{r['status']}, {len(on_host)} on host, next run {r2['status']}",
           r["status"] == "passed" and not on_host and r2["status"] == "passed")
    r = run(f"for i in range(5):\n    open({files!r}[i % 3] + str(i), 'wb').write(bytes(15 << 20))\n", 5)
    yield "75 MiB into /tmp, /var/tmp, /dev/shm", r["status"], "No space left" in r["stderr"]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"relay-probe-{tag}"]) as host:
        r = run(f"import os\nassert any(b'relay-probe-{tag}' in open(f'/proc/{{p}}/cmdline', 'rb').read()\n"
                f"           for p in os.listdir('/proc') if p.isdigit())\n", 3)
        host.kill()
    yield "read host /proc/*/cmdline", r["status"], r["status"] == "failed" and "AssertionError" in r["stderr"]


def count_sandbox_processes(uid=None, wait=3.0):
    """Live (non-zombie) processes of sandbox uid `uid` (None: of any sandbox, this run's or another's), after
    giving SIGKILL a moment to land."""
    deadline = time.time() + wait
    while True:
        n = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
                owner = int(st["Uid"].split()[1])
                n += (owner == uid if uid else owner >= SANDBOX_UID0) and not st["State"].strip().startswith("Z")
            except (OSError, KeyError):
                pass
        if n == 0 or time.time() > deadline:
            return n
        time.sleep(0.1)
