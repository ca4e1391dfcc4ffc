"""Output paths and atomic output folders.

Every writer goes through here: :func:`check_output_dir` / :func:`check_output_file`
refuse an output that would touch an input, the current directory or a folder merge_fast
did not write, before any merge work; :func:`staged_dir` writes into a hidden temporary
folder on the target's filesystem and moves it into place only when every file is
complete, so an interrupted or failed merge never leaves something that looks like a model
at the target (and SIGTERM is handled like Ctrl-C while it runs). With ``fsync`` (the
default) every file and folder reach the disk before the final move, and the move itself
after it, so a power cut after "done" cannot lose or truncate a merge."""
from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import shutil
import signal
import struct
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from ._errors import MergeError, MergeInterrupted, MergeIOError, config_error, io_error

PathLike = Union[str, "os.PathLike[str]"]

# More threads than this only costs time and memory (each has its own stack and buffers);
# 1024 is far above any core count a merge benefits from.
MAX_THREADS = 1024

# `.NAME.merge-fast-tmp-PID-XXXXXXXX` (staging) and `.NAME.merge-fast-old-PID-XXXXXXXX`
# (a replaced output being deleted); NAME is empty for staging inside a mount point.
_STAGING = re.compile(r"^\.(?P<name>.*?)\.?merge-fast-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.tmp)?$")
_OURS = ("mergekit_config.yml",)


class Terminated(MergeInterrupted):
    """SIGTERM arrived during a merge: the staged output was removed."""

    def __init__(self, signum: int):
        super().__init__(f"merge interrupted by {signal.Signals(signum).name}; no output written")
        self.signum = signum


def check_threads(threads: Any) -> Optional[int]:
    """None (one per core) or an integer in [1, MAX_THREADS]; numpy integers accepted."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or int(threads) < 1:
        raise config_error(f"threads must be a positive integer, got {threads!r}")
    if int(threads) > MAX_THREADS:
        raise config_error(f"threads must be at most {MAX_THREADS}, got {threads}")
    return int(threads)


def _real(p: PathLike, what: str) -> Path:
    s = os.fspath(p)
    if not s.strip():
        raise config_error(f"{what} path is empty")
    return Path(os.path.realpath(s))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _describe(folder: Path, entries: List[str]) -> str:
    shown = ", ".join(sorted(entries)[:5])
    more = f", ... ({len(entries)} entries)" if len(entries) > 5 else ""
    return f"{folder} holds {shown}{more}"


def _guard_inputs(real: Path, out: PathLike, inputs: Iterable[Optional[PathLike]], what: str) -> None:
    try:
        cwd: Optional[Path] = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current directory was deleted: nothing there to protect
        cwd = None
    if cwd is not None and _within(cwd, real):
        raise config_error(f"{what} {out} ({real}) is or contains the current directory {cwd}; "
                          "choose a new folder")
    for i in inputs:
        if i is None or not os.fspath(i):
            continue
        ri = Path(os.path.realpath(os.fspath(i)))
        if ri == real:
            rel = "is"
        elif _within(ri, real):
            rel = "contains"
        elif _within(real, ri):
            rel = "lies inside"
        else:
            continue
        raise config_error(f"{what} {out} ({real}) {rel} the input {i} ({ri}); "
                          "a merge never writes over or into its inputs: choose another output")


def _check_parent(real: Path, out: PathLike) -> None:
    anc = real.parent
    while not os.path.lexists(anc):
        anc = anc.parent
    if not anc.is_dir():
        raise config_error(f"cannot create output {out}: {anc} is a file, not a folder")


def _has_our_metadata(f: Path) -> bool:
    """Whether a safetensors file carries merge_fast's recipe metadata (header only)."""
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                return False
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return False
    return isinstance(meta, dict) and "merge_fast" in meta


def looks_like_merge_output(folder: Path) -> bool:
    """Only files (a merge writes no subfolder), and mergekit's config copy or a safetensors
    file with merge_fast's recipe metadata."""
    entries = [folder / e for e in _entries(folder)]
    if any(e.is_dir() for e in entries):
        return False
    return any(e.name in _OURS for e in entries) or any(
        e.suffix == ".safetensors" and _has_our_metadata(e) for e in entries)


def _entries(folder: Path) -> List[str]:
    """What a folder holds besides our staging folders (and an ext4 mount root's lost+found)."""
    names = [e for e in os.listdir(folder) if not _STAGING.match(e)]
    if "lost+found" in names and os.path.ismount(folder):
        names.remove("lost+found")
    return names


def check_output_dir(out: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, overwrite: bool = False) -> Path:
    """The real path of output folder `out`, after refusing (ConfigError) an output that is,
    contains or lies inside an input or contains the current directory, sits under a file,
    or is an existing non-empty folder that is not a previous merge output or may not be
    replaced (``overwrite`` false). An existing empty folder is fine."""
    real = _real(out, "output")
    _guard_inputs(real, out, inputs, "output")
    if not os.path.lexists(real):
        _check_parent(real, out)
        return real
    if not real.is_dir():
        raise config_error(f"output {out} exists and is not a folder")
    try:
        entries = _entries(real)
    except OSError as e:
        raise io_error(f"cannot list output folder {real}: {e.strerror or e}") from None
    if entries:
        if not overwrite:
            raise config_error(f"output {out} exists and is not empty ({_describe(real, entries)}); "
                              "pass overwrite=True (--overwrite) to replace a previous merge output, "
                              "or choose another folder")
        if not looks_like_merge_output(real):
            raise config_error(f"refusing to replace output {out}: it does not look like a merge "
                              f"output (no mergekit_config.yml, no safetensors with merge_fast metadata, or it "
                              f"has subfolders); {_describe(real, entries)}")
    return real


def check_output_file(out: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """The real path of output file `out`, after refusing one that is an input, lies inside
    an input folder, or is a folder."""
    real = _real(out, "output file")
    _guard_inputs(real, out, inputs, "output file")
    if real.is_dir():
        raise config_error(f"output file {out} is a folder")
    _check_parent(real, out)
    return real


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale(folder: Path, name: str) -> None:
    """Removes `.NAME.merge-fast-tmp-PID-*` leftovers in `folder` whose process is gone
    (a merge killed with SIGKILL cannot clean up after itself), with a warning."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for e in names:
        m = _STAGING.match(e)
        if m is None or m.group("name") != name or _pid_alive(int(m.group("pid"))):
            continue
        p = folder / e
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        warnings.warn(f"merge-fast: removed {p}, left by an interrupted merge (process {m.group('pid')} "
                      "no longer runs)", stacklevel=3)


def _input_files(inputs: Iterable[Optional[PathLike]]) -> Dict[str, int]:
    """Sizes of the input files a merge memory-maps (a folder's *.safetensors)."""
    sizes: Dict[str, int] = {}
    for i in inputs:
        if i is None:
            continue
        p = Path(os.fspath(i))
        try:
            files = [p] if p.is_file() else [f for f in p.iterdir() if f.suffix == ".safetensors"] if p.is_dir() else []
            for f in files:
                sizes[str(f)] = f.stat().st_size
        except OSError:
            continue
    return sizes


def _check_unchanged(sizes: Dict[str, int]) -> None:
    for f, n in sizes.items():
        try:
            now = os.stat(f).st_size
        except OSError:
            now = None
        if now != n:
            raise io_error(f"input {f} changed during the merge (size {n} -> {now}); "
                               "the output was discarded")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a merge runs, SIGTERM raises :class:`Terminated` (as SIGINT raises
    KeyboardInterrupt) so the staged output is removed; only where nobody else handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Holds SIGINT/SIGTERM back during the final moves (a few renames), so they are never
    left half done; a signal that arrived meanwhile is raised again afterwards. (Python
    handlers, not the signal mask: the engine's worker threads would still take the signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: List[int] = []
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for n in got:
            signal.raise_signal(n)


def _io_error(e: OSError, what: str) -> MergeIOError:
    path = f" {e.filename}" if e.filename else ""
    return io_error(f"{what}:{path}: {e.strerror or e}")


@contextlib.contextmanager
def staged_dir(target: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, overwrite: bool = False,
               fsync: bool = True) -> Iterator[Path]:
    """Yields an empty folder on the target's filesystem; on success moves its contents to
    `target` (replacing a previous merge output only with ``overwrite``; fsynced first unless
    ``fsync`` is off). On any error, SIGINT or SIGTERM the staged folder is removed and
    nothing at the target changes.

    Staging is beside the target (one rename at the end), or inside it when the target is a
    mount point (a folder on another filesystem than its parent cannot be renamed)."""
    inputs = list(inputs)
    real = check_output_dir(target, inputs, overwrite=overwrite)
    sizes = _input_files(inputs)
    mount = real.is_dir() and os.path.ismount(real)
    where, name = (real, "") if mount else (real.parent, real.name)
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _io_error(e, f"cannot create the folder for output {target}") from None
    remove_stale(where, name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = where / (f".{name}.merge-fast-tmp-{tag}" if name else f".merge-fast-tmp-{tag}")
    try:
        tmp.mkdir()
    except OSError as e:
        raise _io_error(e, f"cannot write output {target}") from None
    try:
        with _sigterm_raises():
            try:
                yield tmp
            except OSError as e:
                if isinstance(e, MergeError):
                    raise
                raise _io_error(e, f"writing output {target}") from e
            _check_unchanged(sizes)
            if fsync:
                fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        try:
            # Checked again: the target may have changed while the merge ran.
            check_output_dir(target, inputs, overwrite=overwrite)
            (_move_contents if mount else _replace)(tmp, real, tag)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, MergeError):
                raise _io_error(e, f"cannot move the finished merge into {real}; the output was discarded") from None
            raise
    if fsync:
        _fsync_path(real if mount else real.parent)


def fsync_tree(path: Path) -> None:
    """fsyncs every regular file under `path`, then every folder (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                _fsync_path(p)
    for d in reversed(dirs):
        _fsync_path(d)


def _fsync_path(path: "str | Path") -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, target: Path, tag: str) -> None:
    if target.is_dir() and _entries(target):
        # A previous output (checked): moved aside first so the target is never half old, half new.
        old = target.parent / f".{target.name}.merge-fast-old-{tag}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)  # also replaces an empty folder


def _move_contents(tmp: Path, target: Path, tag: str) -> None:
    """Mount-point target: move the previous output's files into a hidden folder, the new
    files into the target, then delete the old ones."""
    old = target / f".merge-fast-old-{tag}"
    old.mkdir()
    for e in _entries(target):
        if e not in (tmp.name, old.name):
            os.rename(target / e, old / e)
    for e in os.listdir(tmp):
        os.rename(tmp / e, target / e)
    tmp.rmdir()
    shutil.rmtree(old, ignore_errors=True)


# "b": mergekit's billions ("5B" is its default shard size); "kb", "gb": bytes with decimal prefixes.
_UNITS = {"": 1, "b": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(size: "int | str") -> int:
    """A ``max_shard_size`` in bytes: an int, '5GB' -> 5_000_000_000 (decimal units, as
    transformers), '1GiB' binary, and mergekit's counts '1000K', '500M', '5B' (billions)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    s = str(size).strip().lower().replace(" ", "")
    num = s.rstrip("kmgtibB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 500MB, 5GB, 1GiB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 500MB, 5GB, 1GiB)")
    return int(value * _UNITS[unit])
