"""Atomic, durable file writes: the one helper behind every file a user cares about (LoRAs,
checkpoints, latent caches, datasets, manifests, images).

A file is written to a temp file in the same folder (same file system), flushed and fsynced,
then moved over the target with one `os.replace`, and the folder is fsynced. A crash, a full
disk or any error leaves either the old file or the new one, never half of one; the temp file
is removed and the error (an `OSError` with its errno: ENOSPC stays ENOSPC) names the target.
Files get the mode a plain `open` would give (0666 & ~umask, e.g. 0644), folders 0777 & ~umask:
a ComfyUI / A1111 service running as another user can read them.
`append_bytes` does the same for a JSONL append: on error the file is truncated back to its
previous length. `replace_dir` moves a finished temp folder over a folder (old one removed
only after the new one is in place).
"""
from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def named_error(e: BaseException, path: os.PathLike | str, doing: str = "writing") -> OSError:
    """`e` as an OSError that names `path` (errno kept; a safetensors I/O error's `os error N` parsed)."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno_mod.EIO
    reason = getattr(e, "strerror", None) or str(e)
    return OSError(code, f"{doing} {path} failed: {reason}; the previous file (if any) is unchanged")


def fsync_dir(d: os.PathLike | str) -> None:
    """fsync a folder so a rename in it is durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read from /proc on Linux, else set-and-restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: os.PathLike | str, mode: int) -> None:
    """Give a mkstemp / mkdtemp result (0600 / 0700) the mode a plain `open` / `mkdir` would: `mode & ~umask`."""
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temp path next to `path` (same suffix, so PIL / matplotlib pick the format) for the
    caller to write; on success it is fsynced and moved onto `path`; on error removed, and an
    OSError re-raised naming `path` (other exceptions re-raised as they are)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _chmod_default(tmp, 0o666)  # after the writer (some writers replace the file): readable as the umask allows
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError) and str(path) not in str(e):
            raise named_error(e, path) from e
        raise
    fsync_dir(path.parent)


def write_durable(path: os.PathLike | str, data: bytes) -> None:
    """Write + fsync `data` to `path` in place (for files inside a temp folder that is renamed later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        write_durable(tmp, data)
    return Path(path)


def write_text(path: os.PathLike | str, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def copy_file(src: os.PathLike | str, dst: os.PathLike | str) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def save_safetensors(path: os.PathLike | str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` through `atomic_path` (tensors must be contiguous, unshared)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:  # SafetensorError("... I/O error: ... (os error 28) ..."): an OSError
            if not isinstance(e, OSError) and "os error" in str(e):
                raise named_error(e, path) from e
            raise
    return Path(path)


def save_item(path: os.PathLike | str, tensors: dict, metadata: dict[str, str]) -> None:
    """One tensor item (a latent-cache or ddspo-prepare item) by `save_safetensors`; the tensors are
    copied to contiguous CPU tensors first: rows of one batch tensor are views of one storage, which
    safetensors refuses."""
    import torch

    save_safetensors(path, {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                            for k, v in tensors.items()}, metadata)


def append_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Append `data` durably in ONE write on an O_APPEND descriptor (concurrent appenders never
    interleave inside it), then fsync; on error the file is cut back to its previous length and the
    OSError names `path` (the lines already there are never lost or torn)."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno_mod.EIO, f"short write ({n} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            if size is None:
                path.unlink()
            else:
                os.truncate(path, size)
        raise named_error(e, path, "appending to") from e


def replace_dir(tmp: os.PathLike | str, out: os.PathLike | str) -> Path:
    """Move the finished folder `tmp` onto `out`; an existing `out` is moved aside first and removed
    only once `tmp` is in place (on error it is moved back)."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    try:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
    except OSError as e:
        raise named_error(e, out, "replacing folder") from e
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: os.PathLike | str) -> Iterator[Path]:
    """Yield a temp folder next to `out` to fill; on success it replaces `out` (`replace_dir`), on
    error it is removed and `out` is unchanged."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _chmod_default(tmp, 0o777)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and str(out) not in str(e):
            raise named_error(e, out) from e
        raise
