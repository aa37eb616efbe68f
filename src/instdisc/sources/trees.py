"""File trees: a folder, a zip or a tar (plain, gzip, bzip2 or xz) listed once and then read as
relative POSIX paths, without extracting anything to disk.

`_open_archive` picks the archive format; `_DirTree` walks a folder. A tree's ``read_many``
reads members in the order that is cheapest for its storage (file order in a zip or a tar), and
``items`` gives the picklable per-index byte sources that a `FileImageSet` reads from (handles
are opened lazily in each process, so DataLoader workers can use them). A damaged archive raises
`DataError` instead of being read in part: tarfile stops quietly at a corrupt header, so the
end-of-archive marker is checked explicitly.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import posixpath
import stat
import sys
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from instdisc.errors import DataError

_FULL_HASH_LIMIT = 256 * 2**20  # files up to this size are fingerprinted by their full sha256
_EDGE_HASH_BYTES = 8 * 2**20
_TAR_BUFFER_LIMIT = 512 * 2**20  # member bytes kept while listing a compressed tar


def _norm_member(name: str) -> str:
    """Normalise an archive member name to a relative POSIX path ('' for the root)."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    name = posixpath.normpath(name.lstrip("/"))
    return "" if name == "." else name


def _file_digest(path: Path) -> str:
    """Content fingerprint of a file: full sha256, or a sampled one for very large files."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        # Hashing 150 GB on every open is not an option; size + mtime + both ends catch
        # replaced or re-downloaded archives in practice.
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f.read(_EDGE_HASH_BYTES))
        f.seek(st.st_size - _EDGE_HASH_BYTES)
        h.update(f.read(_EDGE_HASH_BYTES))
    return "sampled-sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# Byte sources for FileImageSet (picklable; handles are opened lazily per process)
# --------------------------------------------------------------------------------------------


class _Items:
    """Bytes of the i-th image of a FileImageSet, and a human-readable location for errors."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def display(self, i: int) -> str:
        raise NotImplementedError


class _DirItems(_Items):
    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.names = str(root), names

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.names[i]), "rb") as f:
            return f.read()

    def display(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


class _ZipItems(_Items):
    def __init__(self, path: Path, members: list[str]) -> None:
        self.path, self.members = str(path), members
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.members)

    def read(self, i: int) -> bytes:
        if self._zf is None or self._pid != os.getpid():  # a forked worker needs its own handle
            self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
        try:
            return self._zf.read(self.members[i])
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as e:
            raise OSError(str(e)) from None

    def display(self, i: int) -> str:
        return f"{self.path}:{self.members[i]}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zf": None, "_pid": -1}


class _TarItems(_Items):
    """Members of an *uncompressed* tar, read with pread at their data offsets."""

    def __init__(
        self, path: Path, names: list[str], offsets: np.ndarray, sizes: np.ndarray
    ) -> None:
        self.path, self.names = str(path), names
        self.offsets, self.sizes = offsets, sizes
        self._fd = -1
        self._pid = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> bytes:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = (
                os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)),
                os.getpid(),
            )
        off, size = int(self.offsets[i]), int(self.sizes[i])
        if hasattr(os, "pread"):
            data = os.pread(self._fd, size, off)
        else:  # Windows: no pread; serialise seek+read
            with self._lock:
                os.lseek(self._fd, off, os.SEEK_SET)
                data = os.read(self._fd, size)
        if len(data) != size:
            raise OSError("member is truncated (archive shorter than its index says)")
        return data

    def display(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_fd": -1, "_pid": -1}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Trees: a uniform view of a directory, a zip or a tar as relative POSIX paths
# --------------------------------------------------------------------------------------------

# read_many yields (name, data, None) or (name, None, reason)
_ReadResult = tuple[str, "bytes | None", "str | None"]


class _Tree:
    """A listed file tree. ``files`` maps relative POSIX paths to sizes (-1 = unknown)."""

    path: Path
    files: dict[str, int]
    dirs: set[str]
    problems: dict[str, str]  # member -> reason it can never be read (links, broken symlinks)
    random_access: bool = True
    is_archive: bool = False

    def display(self, name: str) -> str:
        raise NotImplementedError

    def fingerprint(self, names: Iterable[str]) -> str:
        raise NotImplementedError

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        raise NotImplementedError

    def items(self, names: list[str]) -> _Items:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DirTree(_Tree):
    """A directory, walked once (hidden entries skipped, symlinks followed, loops cut)."""

    def __init__(self, root: Path) -> None:
        self.path = root
        self.files, self.dirs, self.problems = {}, set(), {}
        self._mtimes: dict[str, int] = {}
        seen = {os.path.realpath(root)}
        stack: list[tuple[str, str]] = [("", str(root))]
        while stack:
            rel, p = stack.pop()
            try:
                entries = list(os.scandir(p))
            except OSError as e:
                raise DataError(
                    f"cannot list the folder {p} ({e.strerror or e}). Check that it exists and that "
                    "you may read it."
                ) from None
            for e in entries:
                if e.name.startswith(".") or e.name == "__MACOSX":
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    is_dir = e.is_dir()  # follows symlinks, like ImageFolder
                except OSError:
                    is_dir = False
                if is_dir:
                    real = os.path.realpath(e.path)
                    if real in seen:  # a symlink loop (or the same folder twice)
                        continue
                    seen.add(real)
                    self.dirs.add(r)
                    stack.append((r, e.path))
                    continue
                try:
                    st = e.stat()
                    self.files[r], self._mtimes[r] = st.st_size, st.st_mtime_ns
                except OSError:
                    self.files[r], self._mtimes[r] = -1, 0
                    self.problems[r] = "unreadable (broken link or no permission)"
                    continue
                if not stat.S_ISREG(st.st_mode):
                    # A FIFO, socket or device named x.png: opening it would block forever (or
                    # read an endless stream). Never opened, always reported.
                    self.problems[r] = "not a regular file (a pipe, socket or device)"

    def display(self, name: str) -> str:
        return str(self.path / name) if name else str(self.path)

    def fingerprint(self, names: Iterable[str]) -> str:
        h = hashlib.sha256()
        for n in names:
            h.update(
                f"{n}\0{self.files.get(n)}\0{self._mtimes.get(n)}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
        return "dir:" + h.hexdigest()

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        for n in names:
            try:
                with open(self.path / n, "rb") as f:
                    yield n, f.read(), None
            except OSError as e:
                yield n, None, f"unreadable ({e.strerror or e})"

    def items(self, names: list[str]) -> _Items:
        return _DirItems(self.path, names)


class _ArchiveTree(_Tree):
    """A tree inside one archive file: members are named ``archive:member``, and the archive's
    content digest (computed once, or given by the caller) fingerprints every selection of it."""

    is_archive = True
    _digest: str | None

    def display(self, name: str) -> str:
        return f"{self.path}:{name}" if name else str(self.path)

    def fingerprint(self, names: Iterable[str]) -> str:
        if self._digest is None:
            self._digest = _file_digest(self.path)
        return self._digest


class _ZipTree(_ArchiveTree):
    """A zip archive (central directory listed once; members read in file order)."""

    def __init__(self, path: Path, digest: str | None = None) -> None:
        self.path, self._digest = path, digest
        self.files, self.dirs, self.problems = {}, set(), {}
        self._orig: dict[str, str] = {}
        self._offset: dict[str, int] = {}
        try:
            self._zf = zipfile.ZipFile(path)
            infos = self._zf.infolist()
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            OSError,
            ValueError,
            EOFError,
            NotImplementedError,
        ) as e:
            raise DataError(
                f"{path} is not a readable zip archive ({type(e).__name__}: {e}). Check that the file "
                "was copied completely (compare its size or checksum with the original)."
            ) from None
        for info in infos:
            n = _norm_member(info.filename)
            if not n:
                continue
            if info.is_dir():
                self.dirs.add(n)
                continue
            self.files[n], self._orig[n], self._offset[n] = (
                info.file_size,
                info.filename,
                info.header_offset,
            )
        _add_parent_dirs(self.files, self.dirs)

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        for n in sorted(names, key=lambda m: self._offset.get(m, -1)):  # sequential disk access
            if n not in self._orig:
                yield n, None, "missing from the archive"
                continue
            try:
                yield n, self._zf.read(self._orig[n]), None
            except (
                zipfile.BadZipFile,
                RuntimeError,
                NotImplementedError,
                zlib.error,
                EOFError,
                OSError,
                ValueError,
            ) as e:
                reason = (
                    "corrupt (bad CRC)" if "CRC" in str(e) else f"unreadable ({type(e).__name__})"
                )
                yield n, None, reason

    def items(self, names: list[str]) -> _Items:
        return _ZipItems(self.path, [self._orig[n] for n in names])

    def close(self) -> None:
        self._zf.close()


class _TrackingReader:
    """File wrapper that remembers the last 512-byte block read, so that after tarfile stops we
    can tell a proper end-of-archive marker from a corrupt header or a truncated file (tarfile
    itself treats all three as "the end" and would silently drop the rest of the archive)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name = f, name
        self.last_pos, self.last_block = -1, b""

    def read(self, n: int = -1) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if n == tarfile.BLOCKSIZE:
            self.last_pos, self.last_block = pos, data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _open_decompressed(path: Path) -> tuple[BinaryIO, bool]:
    """Open a (possibly gzip/bzip2/xz-compressed) file by its magic bytes -> (stream, compressed)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb"), True
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb"), True
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb"), True
    return open(path, "rb"), False


_ARCHIVE_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    ValueError,
    UnicodeError,
    NotImplementedError,
    OverflowError,
)


class _TarTree(_ArchiveTree):
    """A tar archive, listed in one pass.

    For a compressed tar the member bytes are kept while listing (up to 512 MiB), because a
    compressed stream cannot be read at random: a second pass would decompress everything again.
    """

    def __init__(self, path: Path, digest: str | None = None, progress: bool = False) -> None:
        self.path, self._digest = path, digest
        self.files, self.dirs, self.problems = {}, set(), {}
        self._offsets: dict[str, int] = {}
        self._buffer: dict[str, bytes] | None = {}
        self._buffered_bytes = 0
        try:
            stream, self.compressed = _open_decompressed(path)
        except OSError as e:
            raise DataError(f"cannot open {path} ({e.strerror or e}).") from None
        self.random_access = not self.compressed
        try:
            with stream:
                self._list(stream, progress)
        except DataError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise DataError(
                f"{path} is not a readable tar archive ({type(e).__name__}: {e}). If it was "
                "downloaded or copied, it may be incomplete: compare its size or checksum with the "
                "original. Supported archives: .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz and .zip."
            ) from None
        _add_parent_dirs(self.files, self.dirs)

    def _list(self, stream: BinaryIO, progress: bool) -> None:
        tracker = _TrackingReader(stream, str(self.path))
        tf = tarfile.open(fileobj=tracker, mode="r:")  # type: ignore[call-overload]
        if progress and self.path.stat().st_size > _FULL_HASH_LIMIT:
            print(f"instdisc: listing {self.path} ...", file=sys.stderr, flush=True)
        for m in tf:
            n = _norm_member(m.name)
            if not n:
                continue
            if m.isdir():
                self.dirs.add(n)
                continue
            if not m.isreg():
                # Links and devices are not followed; an image-named one is reported, not dropped.
                self.files[n] = -1
                self.problems[n] = "link or special member (not supported inside archives)"
                continue
            self.files[n], self._offsets[n] = m.size, m.offset_data
            self.problems.pop(n, None)
            if self.compressed and self._buffer is not None:
                if self._buffered_bytes + m.size > _TAR_BUFFER_LIMIT:
                    self._buffer = None  # too big to hold: read again by streaming if needed
                else:
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    data = fobj.read()
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name} is truncated")
                    self._buffer[n] = data
                    self._buffered_bytes += m.size
        # tarfile stops quietly at a bad header or at EOF; only a zero block is a real end.
        if tracker.last_pos != tf.offset or len(tracker.last_block) < tarfile.BLOCKSIZE:
            raise DataError(
                f"{self.path} ends without the tar end-of-archive marker: the file is truncated "
                f"(it stops after {len(self.files)} members). Copy or download it again."
            )
        if tracker.last_block.count(0) != tarfile.BLOCKSIZE:
            raise DataError(
                f"{self.path} has a corrupt tar header at byte {tf.offset} (after {len(self.files)} "
                "members); the rest of the archive cannot be read. Copy or download it again."
            )
        if self.compressed:  # read to the end so gzip/bz2/xz verify their checksum and length
            while stream.read(2**20):
                pass

    def read_many(self, names: Sequence[str]) -> Iterator[_ReadResult]:
        wanted = list(names)
        if self._buffer is not None and all(n in self._buffer for n in wanted):
            for n in wanted:
                yield n, self._buffer[n], None
            return
        missing = [n for n in wanted if n not in self._offsets]
        for n in missing:
            yield n, None, "missing from the archive"
        order = sorted((n for n in wanted if n in self._offsets), key=self._offsets.__getitem__)
        if not self.compressed:
            with open(self.path, "rb") as f:
                for n in order:
                    f.seek(self._offsets[n])
                    data = f.read(self.files[n])
                    yield (n, data, None) if len(data) == self.files[n] else (n, None, "truncated")
            return
        # compressed and not buffered: one streaming pass, stopping after the last wanted member
        todo = set(order)
        try:
            stream, _ = _open_decompressed(self.path)
            with stream, tarfile.open(fileobj=stream, mode="r:") as tf:  # type: ignore[call-overload]
                for m in tf:
                    n = _norm_member(m.name)
                    if n in todo and m.isreg():
                        fobj = tf.extractfile(m)
                        assert fobj is not None
                        todo.discard(n)
                        yield n, fobj.read(), None
                        if not todo:
                            break
        except _ARCHIVE_ERRORS as e:
            for n in sorted(todo):
                yield n, None, f"unreadable ({type(e).__name__})"
            todo.clear()
        for n in sorted(todo):
            yield n, None, "missing from the archive"

    def items(self, names: list[str]) -> _Items:
        if self.compressed:
            raise DataError(
                f"{self.path} holds large images in a compressed tar, which cannot be read at "
                "random without decompressing it again for every image. Decompress it once "
                "(e.g. `gunzip -k FILE.tar.gz`, which keeps it a single .tar file) or extract it, and "
                "pass that instead -- or pass stream=False to decode everything into the array "
                "cache (only sensible if it fits in memory/disk)."
            )
        return _TarItems(
            self.path,
            names,
            np.array([self._offsets[n] for n in names], dtype=np.int64),
            np.array([self.files[n] for n in names], dtype=np.int64),
        )


def _add_parent_dirs(files: dict[str, int], dirs: set[str]) -> None:
    for n in list(files):
        parts = n.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:k]))


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")


def _open_archive(path: Path, digest: str | None, progress: bool) -> _Tree:
    """List an archive file, choosing the format by extension (or by content otherwise)."""
    low = path.name.lower()
    if low.endswith(".zip"):
        return _ZipTree(path, digest)
    if low.endswith(_TAR_SUFFIXES):
        return _TarTree(path, digest, progress)
    try:
        if zipfile.is_zipfile(path):
            return _ZipTree(path, digest)
        with open(path, "rb") as f:
            head = f.read(512 * 2)
        stream_is_tar = len(head) >= 512 and head[257:262] == b"ustar"
        if (
            stream_is_tar
            or head[:2] == b"\x1f\x8b"
            or head[:3] == b"BZh"
            or head[:6] == b"\xfd7zXZ\x00"
        ):
            return _TarTree(path, digest, progress)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}).") from None
    raise DataError(
        f"{path} is a file but not a supported source: expected a folder, a .tar/.tar.gz/.tgz/.zip "
        "archive of an image folder, or one of digits, synthetic[:N], cifar10, cifar100."
    )
