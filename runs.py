"""
runs.py — what every script checks before it starts work: flags matched by their whole name (argparser),
numeric flags in range (argparse `type=` functions, so a bad value is a usage error naming its flag), an
output directory that belongs to this run alone (a lock, and no new run over an earlier run's checkpoint),
Ctrl-C ending a training loop at a step (StopOnInterrupt), bad input (InputError), a refusal (Refused) or
a missing or existing file ending a run with one line (run_cli), an output file checked before any work
(check_out_file), a file written whole or not at all (written_whole), an npz cache of generated data
(cached); the CPU's name and the GPU's busy time that benchmarks print beside their figures. No command
of its own.
"""
import argparse
import atexit
import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import zipfile
import zlib

import numpy as np


# ---------------------------------------------------------------------------------------------
# command-line value checks

ENVIRONMENT_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class InputError(ValueError):
    """Bad input, with a message that names it and where it is (`file:line: reason`, a checkpoint's
    mismatching fields, a prompt too long for the model). A ValueError, so callers of the library catch it
    as one; scripts print it as one line (run_cli)."""


class Refused(RuntimeError):
    """A run that cannot go on here, and says what would let it: an out-dir a live run holds, a sandbox this
    machine cannot build. Printed as one line by run_cli."""


def run_cli(main):
    """A script's entry point: an InputError, a Refused, or a file that is missing, in the way or not
    readable, ends the run with its message and exit status 1, no traceback; Ctrl-C with its message
    (or "interrupted") and death by SIGINT; any other error keeps its traceback (it may be a bug)."""
    try:
        main()
    except ENVIRONMENT_ERRORS + (InputError, Refused) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: what was saved and how to go on, if the run says; then die of
        print(str(e) or "interrupted", file=sys.stderr)  # SIGINT, so that a calling shell loop or script stops too
        for lock in HELD_LOCKS:  # (atexit does not run for a death by signal)
            release_lock(lock)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each flag's default after its help."""


def argparser(doc, show_defaults=False, **kw):
    """A script's parser. NOTE: flags are matched by their whole name, not by prefix (argparse's default):
    `--check` would otherwise be read as `--checkpoint`, and `--max-step` as `--max-steps`."""
    fmt = HelpFormatter if show_defaults else argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(description=doc, formatter_class=fmt, allow_abbrev=False, **kw)


def _number(s, parse, ok, need):
    """parse(s) if it parses and ok(value), else a usage error saying what was needed."""
    try:
        v = parse(s)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"need {need}, got {s!r}")
    return v


def finite_float(s):
    return _number(s, float, math.isfinite, "a finite number")


def nonneg_float(s):
    return _number(s, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def positive_float(s):
    return _number(s, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def unit_float(s):
    """A probability or fraction in [0, 1]."""
    return _number(s, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def unit_floats(s):
    """A comma-separated list of numbers in [0, 1], e.g. a threshold sweep "0.5,0.7,0.9"."""
    return [unit_float(v) for v in s.split(",")]


def nonneg_int(s):
    return _number(s, int, lambda v: v >= 0, "an integer >= 0")


def given_flags(p, argv, dests):
    """The flags (dests) the command line sets itself, not a default or a preset: argparse fills in a default
    only where the namespace it parses into lacks the attribute, so every one starts as a marker."""
    unset = object()
    ns = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {k for k, v in vars(ns).items() if v is not unset}


def seed_int(s):  # what every generator here takes (torch's stops at 2^64; a script may derive seeds from it)
    return _number(s, int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")


def positive_int(s):
    return _number(s, int, lambda v: v >= 1, "an integer >= 1")


# ---------------------------------------------------------------------------------------------
# the output directory of a run

def make_out_dir(out_dir):
    """--out-dir, made if missing; an empty name or a file there is named as such (not an errno message)."""
    if not out_dir:
        raise InputError("--out-dir: empty")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out-dir {out_dir} is a file: give a directory")
    os.makedirs(out_dir, exist_ok=True)


def claim_out_dir(out_dir, resume, overwrite, ckpt="ckpt.pt", also=()):
    """Make OUT_DIR this run's before any work: refuse it while another live run holds it (the lock
    file OUT_DIR/.lock holds the owner's pid; a dead owner's lock is taken over), and refuse to start
    a new run over OUT_DIR/ckpt without --resume or --overwrite. The lock goes at exit. A process may
    claim its own directory again (main() called twice). also: other outputs of a run (e.g. the
    exported hf/ directory) that a new run must not replace either. Returns the lock file's path."""
    make_out_dir(out_dir)
    lock = os.path.join(out_dir, ".lock")
    take_lock(lock)
    path = os.path.join(out_dir, ckpt)
    if resume and not os.path.isfile(path):
        release_lock(lock)
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (check --out-dir)")
    held = [p for p in (path, *(os.path.join(out_dir, a) for a in also)) if os.path.exists(p)]
    if not resume and not overwrite and held:
        release_lock(lock)
        raise FileExistsError(f"{held[0]} exists: pass --resume to continue that run, or --overwrite to start "
                              f"a new run that replaces it (or choose another --out-dir)")
    atexit.register(release_lock, lock)
    HELD_LOCKS.append(lock)
    return lock


HELD_LOCKS = []  # this process's out-dir locks: released at exit, or by run_cli before it dies of Ctrl-C


def check_out_file(flag, path, overwrite=False, makes_dirs=False):
    """A file the run will write, checked before any work: not a directory, its directory there (unless the
    run makes it: makes_dirs), and not an existing file unless overwrite. A run whose results could not be
    written at its end would lose them."""
    if not path:
        raise InputError(f"{flag}: empty")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise IsADirectoryError(f"{flag} {path} is a directory: give a file name")
    parent = os.path.dirname(path)
    up = parent
    while up and not os.path.exists(up):  # the first of its directories that exists
        up = os.path.dirname(up)
    if up and not os.path.isdir(up):
        raise NotADirectoryError(f"{flag} {path}: {up} is not a directory")
    if up != parent and not makes_dirs:  # (a run that makes them makes the missing ones)
        raise FileNotFoundError(f"{flag} {path}: no directory {parent}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} exists: pass --overwrite to replace it")


@contextlib.contextmanager
def written_whole(path, suffix=".tmp"):
    """A temporary name beside `path` (path + suffix) to write to, renamed over `path` at the end: an error, a
    full disk or a kill leaves the previous file (if any) as it was; an error leaves no temporary file either,
    and the next write reuses a killed one's name (a checkpoint's can be large). Two processes that may write
    one file at once give suffixes of their own (cached)."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def read_json(path, what="an object"):
    """A checkpoint's JSON file (config, tokenizer, shard index) -> the dict in it; one error naming the
    file and what is wrong (not UTF-8, not JSON, not an object) instead of a parser's traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(obj), "null")
        raise InputError(f"{path}: expected {what}, found a JSON {kind}")
    return obj


def cached(path, make, compress=True):
    """The arrays of the npz at `path` (a damaged one names itself), or make()'s, saved atomically first (a unique
    temporary name: two runs may build the same file at once)."""
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise InputError(f"{path}: damaged cache file ({type(e).__name__}: {e}); delete it and it is made "
                             f"again") from None
    data = make()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with written_whole(path, f".{os.getpid()}.tmp.npz") as tmp:  # two runs may build one set (.npz: savez adds it)
        (np.savez_compressed if compress else np.savez)(tmp, **data)
    return data


def lock_text():
    return f"{os.getpid()} {socket.gethostname()}"  # the host: a pid means nothing on another machine


def take_lock(lock):
    """Create `lock` holding our pid and host, or raise naming the live process that holds it. A lock
    of a dead pid on this host is stale and taken over; one from another host (a shared filesystem)
    cannot be checked, so it counts as live. The lock appears with its text in it (written aside, then
    linked into place), so a crash never leaves an empty one (an empty one counts as stale)."""
    tmp = f"{lock}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(lock_text() + "\n")
    try:
        while True:
            if create_lock(lock, tmp):
                return
            text = read_lock(lock)
            if text is None:  # its owner just released it
                continue
            if text == lock_text():
                return
            if not stale(text):
                raise Refused(f"{os.path.dirname(lock) or '.'} is in use by another run (pid {text}, lock "
                              f"file {lock}): wait for it or choose another --out-dir; delete {lock} only if "
                              f"no run uses it") from None
            import fcntl  # NOTE: POSIX; only here, where a dead run's lock is taken over
            guard = os.open(os.path.dirname(lock) or ".", os.O_RDONLY)  # the out-dir itself: no file left behind
            try:  # one taker at a time, so none removes a lock just taken; a taker holds it for microseconds
                for _ in range(100):
                    try:
                        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(0.05)
                else:
                    raise Refused(f"{lock} is stale (pid {text} is dead), but something has held a lock on "
                                  f"{os.path.dirname(lock) or '.'} for 5 s: delete {lock} if no run uses the "
                                  "directory") from None
                if read_lock(lock) == text:
                    os.remove(lock)
            finally:
                os.close(guard)
    finally:
        os.remove(tmp)


def create_lock(lock, tmp):
    """Link `tmp` (our text) to `lock`: True if we made it, False if it exists (one run wins)."""
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem (some FUSE and network ones): create, then write
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(lock_text() + "\n")
        return True


def read_lock(lock):
    try:
        with open(lock) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def stale(text):
    """A lock of this host whose process is dead (or an empty one, which older code could leave)."""
    pid, _, host = text.partition(" ")
    return host in ("", socket.gethostname()) and not (pid.isdigit() and pid_alive(int(pid)))


def pid_alive(pid):
    """NOTE: POSIX (signal 0 checks a process exists without touching it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def release_lock(lock):
    """Remove `lock` if it is still ours (a forked child or a taker-over must not remove it)."""
    try:
        with open(lock) as f:
            if f.read().strip() == lock_text():
                os.remove(lock)
    except FileNotFoundError:
        pass


class StopOnInterrupt:
    """`with StopOnInterrupt() as stop:` a training loop that checks `if stop:` at each step: Ctrl-C
    (SIGINT) asks it to stop there, with a checkpoint, instead of losing the steps since the last one; a
    second Ctrl-C interrupts at once, as usual. Outside the main thread (no signals there) it never stops.
    NOTE: `timeout -s INT` signals the process, then its group: a second SIGINT within a second is the same one."""

    def __enter__(self):
        self.asked, self.previous = None, None  # asked: the time of the first Ctrl-C
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum, frame):
        if self.asked is not None and time.monotonic() - self.asked > 1.0:
            raise KeyboardInterrupt
        self.asked = self.asked or time.monotonic()

    def __bool__(self):
        return self.asked is not None

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    @staticmethod
    def exit(step, ckpt_path, overwrite):
        """End the run after the loop stopped on Ctrl-C and saved, saying how to go on (run_cli prints it)."""
        raise Interrupted(f"interrupted at step {step}: {ckpt_path} saved", how_to_continue(overwrite))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that ended a run once its work was saved: `saved` says what, the message adds how to go on
    (a script that drives the run, such as bench/compare_objectives.py, has its own way on)."""

    def __init__(self, saved, way_on):
        super().__init__(f"{saved}; {way_on}")
        self.saved = saved


def stop_reason(args, interrupted, secs, steps):
    """Why a training loop stops before --max-steps, `secs` seconds and `steps` steps into this invocation,
    or None. Each saves a checkpoint; --time-limit then evaluates, --stop-after is a pause (no evaluation).
    When both come due at one step, --time-limit wins: the run is evaluated."""
    if interrupted:
        return "Ctrl-C"
    if args.time_limit and secs > 60 * args.time_limit:
        return "--time-limit"
    if args.stop_after and steps >= args.stop_after:
        return "--stop-after"
    return None


def how_to_continue(overwrite):
    return f"the same command with --resume {'in place of --overwrite ' if overwrite else ''}continues"


# ---------------------------------------------------------------------------------------------
# the machine a figure was measured on

def cpu_info(cpuinfo="/proc/cpuinfo"):
    """(model name, bf16 units) of the first core in /proc/cpuinfo: the units, a list of AMX and
    AVX512-BF16, decide bf16 speed. ('unknown', None) where there is no such file (not Linux)."""
    if not os.path.exists(cpuinfo):
        return "unknown", None
    info = {}
    for line in open(cpuinfo):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    return info.get("model name", "unknown"), [u for f, u in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))
                                                if f in flags]


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and bf16 units: CPU figures mean little without them (a VM often masks the model)."""
    name, bf16 = cpu_info(cpuinfo)
    return name if bf16 is None else f"{name} ({', '.join(bf16) or 'no bf16 hardware'})"


def kernel_ms(prof):
    """Milliseconds the GPU spent in kernels under a torch.profiler run (kernel events only: an op's
    own row also counts the kernels it launched)."""
    return sum(e.self_device_time_total for e in prof.events() if e.device_type.name == "CUDA") / 1e3
