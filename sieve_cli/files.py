"""Generic file helpers: content hashes, JSON written atomically and read with a one-line error, appends
that never follow a symlink."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, WorkspaceError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: a crash leaves the old file or the
    new one, never half; a symlink at `path` is replaced, never written through."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `path` to write (by any writer: torch.save, safetensors, savefig),
    renamed onto `path` when the block ends without error, removed otherwise.

    The one way sieve writes a file: the temporary is created exclusively (a planted symlink can never
    be at its name), given the umask's mode (safetensors' writer makes 0600), and the rename replaces a
    symlink at `path` instead of writing through it.
    """
    path = Path(path)
    make_dir(path.parent)
    remove_abandoned_temporaries(path)
    # the pid in the name tells a later writer whether this one is still alive
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_abandoned_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` (`.NAME.PID.XXXXXXXX.tmp`) whose writer is gone: a kill between
    `atomic_path`'s temporary and its rename leaves one each time. Names are compared literally (never as a
    glob); a live writer's, a folder's or another file's are left alone."""
    for entry in os.scandir(path.parent):
        pid = temporary_owner(entry.name, path.name)
        if pid is not None and pid != os.getpid() and not pid_alive(pid) and not entry.is_dir(follow_symlinks=False):
            remove_path(Path(entry.path))  # a link is unlinked, never followed


def temporary_owner(entry: str, name: str) -> int | None:
    """The pid in `entry` when it is one of `atomic_path`'s temporaries of the file `name`, else None."""
    head, tail = f".{name}.", ".tmp"
    if not (entry.startswith(head) and entry.endswith(tail)) or len(entry) <= len(head) + len(tail):
        return None
    pid, _, random = entry[len(head):-len(tail)].partition(".")
    return int(pid) if pid.isdigit() and random and "." not in random else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, through `atomic_path` (no write through a link, the umask's mode)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def remove_path(path: Path) -> None:
    """Delete `path` whatever it is, never what a link points to: a link or a file is unlinked, a
    folder removed with everything in it (links inside it unlinked, not followed); missing is fine."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def make_dir(path: Path) -> Path:
    """`path` as a real folder (created with its parents if missing); a symlink there is refused."""
    path = Path(path)
    if path.is_symlink():
        raise WorkspaceError(f"{path} is a symlink; sieve does not write through links: delete it and rerun")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(path: Path) -> Path:
    """An empty real folder at `path`: whatever was there (a link, a file, a folder) is removed first."""
    remove_path(path)
    Path(path).mkdir(parents=True)
    return Path(path)


def check_inside(root: Path, path: Path, what: str) -> Path:
    """`path`, after checking that it lies inside `root` (a workspace, an output folder) with no symlink
    at it or on the way from `root`, so nothing read, written or deleted there can reach outside."""
    path = Path(path)
    root = Path(root)
    lexical = Path(os.path.normpath(path if path.is_absolute() else Path.cwd() / path))
    # reached through a link above the root (the user's own, e.g. /tmp -> /private/tmp): check below it
    above = next((a for a in [lexical, *lexical.parents][::-1] if a == root or a.resolve() == root), None)
    if above is None:
        raise WorkspaceError(f"{path} leads outside the {what} {root} (to {path.resolve()}); "
                             f"a {what} path must stay inside it: remove the link or fix the name")
    relative = lexical.relative_to(above)
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise WorkspaceError(f"{current} is a symlink (to {os.readlink(current)}); sieve does not read or write "
                                 f"through links in a {what}: delete it and rerun")
    return path


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(exc: BaseException) -> bool:
    """An out-of-space error, also as the libraries that wrap it report it (safetensors, zarr, pyarrow)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        words = str(exc)  # safetensors and zarr report the OS error in their own words
        if any(w in words for w in ("No space left on device", "StorageFull", "File too large", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_no_follow(path: Path, flags: int) -> int:
    """os.open that refuses a symlink as the last component, so a write never lands on the link's target."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WorkspaceError(f"{path} is a symlink; sieve does not write through links: delete it and rerun") from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (created if missing), never through a symlink."""
    fd = open_no_follow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_jsonl(path: Path, rebuild: str) -> list:
    """The records of a JSON-lines log; a partial last line (a run killed mid-write) is cut off the file.

    Any other damaged line is one error naming the file.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records, good = [], 0
    for number, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) - 1:  # no newline after it: the write was cut short
                with open(open_no_follow(path, os.O_WRONLY), "wb") as f:
                    f.truncate(good)
                return records
            raise InputError(f"{path} line {number + 1} is not valid JSON; rerun `{rebuild}` to rebuild it") from None
        good += len(line) + 1
    return records


def read_json(path: Path, rebuild: str | None = None) -> Any:
    """The JSON in `path`; a damaged or unreadable file is one line naming it and, if known, what rebuilds it."""
    fix = f"rerun `{rebuild}` to rebuild it" if rebuild else "delete it or rerun the stage that wrote it with --force"
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} is missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); {fix}") from None
