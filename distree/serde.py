"""JSON form of the core values, and atomic file writes.

Every core value is a frozen dataclass that inherits :class:`JsonRecord`; its file carries
``schema_version`` and ``kind`` so a reader can refuse a file from another version with a clear error.
Fields may be scalars, tuples, dicts, ``Optional``s and other ``JsonRecord``s (nested freely).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import json
import os
import shutil
import tempfile
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from distree.errors import DistreeError

SCHEMA_VERSION = 1

T = TypeVar("T", bound="JsonRecord")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or value is None:
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _decode(non_none[0], value) if len(non_none) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _decode_items(args[0], value)
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin is dict:
        key_t, val_t = args
        return {_decode(key_t, k): _decode(val_t, v) for k, v in value.items()}
    if origin is list:
        return list(_decode_items(args[0], value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints, known = _fields_of(tp)
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in known})
    return _decode_scalar(tp, value)


def _decode_scalar(tp: Any, value: Any) -> Any:
    if tp is int and isinstance(value, str):
        return int(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _decode_items(tp: Any, values: list) -> tuple:
    """A homogeneous sequence; scalars without the per-item dispatch (a calibration holds ~275,000 of them: its
    load took 0.8 s, most of it in ``typing`` calls)."""
    if tp is float:
        return tuple(float(v) if type(v) is int else v for v in values)
    if tp in (bool, str):
        return tuple(values)
    if tp is int:
        return tuple(int(v) if isinstance(v, str) else v for v in values)
    return tuple(_decode(tp, v) for v in values)


@functools.lru_cache(maxsize=None)
def _fields_of(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's resolved field types and the fields its constructor takes (``get_type_hints`` is slow)."""
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp) if f.init)


class JsonRecord:
    """Mixin for frozen dataclasses: ``to_dict``/``from_dict`` and ``save``/``load`` with a schema check."""

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _decode(cls, data)

    def save(self, path: str | os.PathLike) -> Path:
        doc = {"schema_version": SCHEMA_VERSION, "kind": type(self).__name__, **self.to_dict()}
        return write_json_atomic(path, doc)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        doc = read_json(path)
        kind = doc.pop("kind", None)
        version = doc.pop("schema_version", None)
        if kind != cls.__name__:
            what = f"is a {kind} file" if kind else "is not a file distree wrote (it has no \"kind\")"
            raise DistreeError(f"{path}: {what}, expected a {cls.__name__} file")
        if version != SCHEMA_VERSION:
            raise DistreeError(
                f"{path}: schema_version {version} is not supported (this distree reads {SCHEMA_VERSION}); "
                "re-create the file with this version of distree"
            )
        try:
            return cls.from_dict(doc)
        except (TypeError, KeyError, ValueError) as exc:
            raise DistreeError(f"{path}: malformed {cls.__name__} file ({exc}); re-create it") from exc


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object (gzip-compressed where the name ends in ``.gz``: a calibration of 5,000 samples and 54
    exits is 10 MB of JSON, 2.4 MB compressed), turning missing/corrupt files into one-line user errors."""
    p = Path(path)
    if not p.is_file():
        raise DistreeError(f"{p}: no such file")
    try:
        data = p.read_bytes()
        doc = json.loads(gzip.decompress(data) if p.suffix == ".gz" else data)
    except (OSError, EOFError) as exc:        # gzip's BadGzipFile is an OSError
        raise DistreeError(f"{p}: not a gzip file ({exc}); a name ending in .gz must hold gzip-compressed JSON") \
            from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistreeError(f"{p}: not valid JSON ({exc}); re-create the file") from exc
    if not isinstance(doc, dict):
        raise DistreeError(f"{p}: expected a JSON object at the top level")
    return doc


def write_json_atomic(path: str | os.PathLike, doc: Any) -> Path:
    """Write JSON through a temp file in the same folder, then rename: never a half-written file; gzip-compressed
    (with no timestamp, so equal documents give equal bytes) where the name ends in ``.gz``."""
    data = (json.dumps(_encode(doc), indent=2, sort_keys=False) + "\n").encode()
    return write_bytes_atomic(path, gzip.compress(data, mtime=0) if Path(path).suffix == ".gz" else data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unwritable(path: str | os.PathLike, directory: bool = False) -> str | None:
    """Why an output at ``path`` (a directory where ``directory``) cannot be written, or None: checked before the
    work that makes it, by creating a temp file in the nearest directory that exists (as the atomic writers below
    will), so that a long compile does not end in "permission denied"."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        return f"{p} is {'a file' if directory else 'a directory'}; give {'a directory' if directory else 'a file'} path"
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a directory; give a path in a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".distree-probe.", dir=folder)
    except OSError as exc:
        return f"cannot create a file in {folder} ({exc.strerror or exc}); give a path in a directory you can write to"
    os.close(fd)
    os.unlink(probe)
    return None


def _cannot_write(path: Path, exc: OSError) -> DistreeError:
    fix = "free some space there or give another path" if exc.errno == errno.ENOSPC else \
        "give a path in a directory you can write to"
    return DistreeError(f"cannot write {path}: {exc.strerror or exc}; {fix}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write through a temp file, then rename; the file gets the usual mode (mkstemp's is 0600). A file system that
    refuses (a read-only folder, a full disk) is a one-line error; nothing is left behind."""
    p = Path(path)
    if p.is_dir():
        raise DistreeError(f"{p} is a directory; give a file path to write to")
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(p, exc) from exc
        raise
    return p


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path``, on failure it is removed."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as exc:
        raise _cannot_write(final, exc) from exc
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
