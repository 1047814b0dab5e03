"""Atomic outputs: every file or folder wsicodec writes appears complete or not at all.

    with atomic_output(final, overwrite=False) as tmp:   # tmp: a unique partial name beside final
        write(tmp)                                       # a file or a folder
    # on success: fsync'd, renamed onto final (a no-overwrite finish fails if final appeared meanwhile)
    # on any exception, KeyboardInterrupt included: tmp removed, final untouched

    atomic_write_bytes(path, data, overwrite=True) / atomic_write_text(...)
    disk_bytes(path) -> int          # bytes a file or folder takes (sum of its files)
    check_output_path(path)          # WsicodecError: a name over 255 bytes, a device/FIFO/socket, inside a Zarr store
    partial_name(final, tag) -> Path # ".<name>.<tag>-<host>-<pid>-<token>", shortened to fit NAME_MAX
    remove_stale_partials(final)     # leftovers of this host's dead writers only

Partial names carry host, pid and a random token so writers on a shared volume (other hosts, other PID
namespaces) never pick the same name; a stale partial is removed only when it is provably dead: same host
and its pid gone.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsicodec.errors import OutputExistsError, WsicodecError

NAME_MAX = 255
_HOST = "".join(ch if ch.isalnum() or ch == "-" else "_" for ch in socket.gethostname())[:32] or "host"


def _partial_stem(final: Path, tag: str) -> str:
    """'.<name>', shortened with a digest of the name when the partial name would pass NAME_MAX."""
    longest_suffix = len(f".{tag}-{_HOST}-{'9' * 10}-{'f' * 8}".encode())
    stem = f".{final.name}"
    room = NAME_MAX - longest_suffix
    if len(stem.encode()) > room:
        digest = hashlib.sha1(final.name.encode()).hexdigest()[:10]
        stem = stem.encode()[: room - 11].decode(errors="ignore") + "~" + digest
    return stem


def partial_name(final: Path, tag: str = "partial") -> Path:
    """A hidden, unique sibling name for writing ``final``; fits the filesystem's 255-byte name limit."""
    return final.with_name(f"{_partial_stem(final, tag)}.{tag}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _partial_owner(final: Path, candidate: Path, tag: str) -> tuple[str, int] | None:
    """(host, pid) of a partial name made by :func:`partial_name` for ``final``, else None."""
    prefix = f"{_partial_stem(final, tag)}.{tag}-"
    if not candidate.name.startswith(prefix):
        return None
    parts = candidate.name[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def check_name_length(path: str | os.PathLike) -> None:
    """Refuse a path with a name (any component) longer than the filesystem's 255 bytes, in one line."""
    for part in Path(path).parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise WsicodecError(f"the name {part[:24]}…{part[-8:]} is {n} bytes long; a file or folder name may "
                                f"have at most {NAME_MAX} bytes")


def _special_kind(mode: int) -> str | None:
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None


def _refuse_special(path: Path) -> None:
    try:
        st = os.stat(path)  # follows links: a link to /dev/null is a device too
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise WsicodecError(f"cannot use {path} as an output: {exc.strerror or exc}") from None
    kind = _special_kind(st.st_mode)
    if kind is not None:
        raise WsicodecError(f"{path} is a {kind}; wsicodec writes only regular files and folders, never replaces "
                            "anything else")


def zarr_store_around(path: Path) -> Path | None:
    """The nearest folder above ``path`` that is a Zarr store (holds a zarr.json), or None."""
    p = Path(path).absolute()
    try:
        p = p.parent.resolve() / p.name  # through symbolic links into a store, too
    except (OSError, RuntimeError):
        pass
    for parent in p.parents:
        try:
            if (parent / "zarr.json").is_file():
                return parent
        except OSError:
            continue
    return None


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse, in one line, an output that could never be written safely: a name over 255 bytes, an existing
    device node, FIFO or socket (or a link to one), or a path inside a Zarr store such as a .pzarr container."""
    path = Path(path)
    check_name_length(path)
    _refuse_special(path)
    store = zarr_store_around(path)
    if store is not None:
        raise WsicodecError(f"output {path} lies inside the .pzarr container (Zarr store) {store}; choose a path "
                            "outside it")


def remove_stale_partials(final: Path, tag: str = "partial") -> list[Path]:
    """Delete partials of ``final`` left by dead writers on this host; never another host's."""
    removed: list[Path] = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        owner = _partial_owner(final, p, tag)
        if owner is None:
            continue
        host, pid = owner
        if host == _HOST and pid != os.getpid() and not _pid_alive(pid):
            remove_path(p)
            removed.append(p)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file or folder if present; never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def fsync_path(path: Path) -> None:
    """Flush one file or directory entry to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fsync_path(p)


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes a file, or all files under a folder, take (apparent sizes)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def commit(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Move a finished ``tmp`` onto ``final``; see the module docstring for the rules."""
    _refuse_special(final)  # a FIFO or device that appeared while writing is never replaced
    fsync_tree(tmp)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{final} already exists; pass --overwrite to replace it")
        if (final.is_dir() and not final.is_symlink()) or tmp.is_dir():
            # a folder cannot be replaced atomically (nor a file by a folder): old aside, new in, old
            # removed, so a complete output is at (or beside) final at every moment
            old = partial_name(final, "old")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            remove_path(old)
        else:
            os.replace(tmp, final)
    elif tmp.is_dir():
        os.replace(tmp, final)
    else:
        # link() fails if final appeared since we looked: a no-overwrite finish never replaces a rival's output
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise OutputExistsError(f"{final} appeared while writing it; not replaced") from None
        except OSError:  # filesystems without hard links
            os.replace(tmp, final)
        else:
            os.unlink(tmp)
    fsync_path(final.parent)


@contextmanager
def atomic_output(final: str | os.PathLike, *, overwrite: bool = True, tag: str = "partial") -> Iterator[Path]:
    """Yield a partial path to write; rename it onto ``final`` only when the block succeeds."""
    final = Path(final)
    check_output_path(final)
    remove_stale_partials(final, tag)
    tmp = partial_name(final, tag)
    try:
        yield tmp
        commit(tmp, final, overwrite=overwrite)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
