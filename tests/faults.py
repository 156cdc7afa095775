"""Faults to inject under a running service: storage that turns read-only or fills up, and a
PostgreSQL role that loses its connections or its login. Helpers of tests/test_database_faults.py.

Why a FUSE file system for "read-only": a mount cannot be remounted read-only while a process
has a file open for writing on it (the kernel answers EBUSY), and a running service's SQLite
keeps its database, -wal and -shm files open read-write for good. ext4's own switch to
read-only on an error (errors=remount-ro) can happen under open files, but it cannot be undone
without unmounting. So `SwitchableFs` is a small passthrough FUSE file system, served from a
thread of the test process, with a switch: while it is read-only every write, create, rename,
delete, truncate and read-write open answers EROFS, through file descriptors opened before as
well, as a disk gone read-only does; switched back, everything works again.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.config import async_database_url
from tests.conftest import query_database

# Mounts ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {fstype} on {target}: {os.strerror(code)}")


def unmount(target: Path) -> None:
    """Unmount, lazily if something still holds it open (it goes once that lets go)."""
    if _libc.umount2(str(target).encode(), 0) != 0 and ctypes.get_errno() != errno.EINVAL:
        _libc.umount2(str(target).encode(), _MNT_DETACH)


def cannot_mount(fuse: bool = False) -> str | None:
    """Why this process cannot make the mounts these faults need, or None."""
    if os.geteuid() != 0:
        return "storage fault tests mount file systems: they must run as root"
    if fuse and not os.path.exists("/dev/fuse"):
        return "storage fault tests need /dev/fuse (the fuse kernel module) for a disk that turns read-only"
    return None


@contextmanager
def killed_on_exit(service) -> Iterator[None]:
    """Whatever happens, the service process is gone on exit: before its files' mount goes."""
    try:
        yield
    finally:
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
            service.process.wait()


@contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "4m") on `target`, unmounted afterwards whatever happens."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("myflix-test", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=0755")
    try:
        yield target
    finally:
        unmount(target)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system of `directory` with zeros until it says ENOSPC."""
    path = directory / name
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        # A last partial block, so that not even a small write fits.
        for size in (4096, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return path


# A passthrough FUSE file system with a read-only switch ------------------------------------

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
_ENTRY = struct.Struct("<QQQQII")  # fuse_entry_out before its attr
_ATTR_OUT = struct.Struct("<QII")  # fuse_attr_out before its attr
_OPEN_OUT = struct.Struct("<QIi")
_READ_IN = struct.Struct("<QQIIQII")  # also fuse_write_in
_KSTATFS = struct.Struct("<QQQQQIIII24x")
_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")

_LOOKUP, _FORGET, _GETATTR, _SETATTR, _MKDIR, _UNLINK, _RMDIR, _RENAME = 1, 2, 3, 4, 9, 10, 11, 12
_OPEN, _READ, _WRITE, _STATFS, _RELEASE, _FSYNC, _FLUSH, _INIT = 14, 15, 16, 17, 18, 20, 25, 26
_OPENDIR, _READDIR, _RELEASEDIR, _FSYNCDIR, _ACCESS, _CREATE, _INTERRUPT = 27, 28, 29, 30, 34, 35, 36
_DESTROY, _BATCH_FORGET, _FALLOCATE, _RENAME2 = 38, 42, 43, 45
_NO_REPLY = {_FORGET, _BATCH_FORGET, _INTERRUPT}

_FATTR_MODE, _FATTR_UID, _FATTR_GID, _FATTR_SIZE, _FATTR_ATIME, _FATTR_MTIME = 1, 2, 4, 8, 16, 32
_FATTR_FH, _FATTR_ATIME_NOW, _FATTR_MTIME_NOW = 64, 128, 256
_FUSE_ASYNC_READ, _FUSE_BIG_WRITES = 1, 32
_MAX_WRITE = 1 << 17
_WRITING_OPS = {_SETATTR, _MKDIR, _UNLINK, _RMDIR, _RENAME, _RENAME2, _WRITE, _CREATE, _FALLOCATE}


class _Reply(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _name(data: bytes) -> str:
    return os.fsdecode(data.split(b"\0", 1)[0])


class SwitchableFs:
    """Mirror `backing` on `mountpoint`; `read_only = True` makes every write fail with EROFS.

    Use as a context manager: it mounts on enter, and unmounts and stops on exit. Stop the
    processes using it first (the mount is detached lazily if something still holds it).
    """

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.read_only = False
        self.refused_writes = 0  # writes answered EROFS: proof that the fault was felt
        self._paths: dict[int, str] = {1: ""}  # nodeid -> path relative to backing
        self._ids: dict[str, int] = {"": 1}
        self._next_id = 2
        self._dirs: dict[int, list[tuple[str, int, int]]] = {}
        self._next_dir = 1
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    # Mount and serve ----------------------------------------------------------------------

    def __enter__(self) -> SwitchableFs:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR)
        try:
            _mount(
                "myflix-test",
                self.mountpoint,
                "fuse.myflix-test",
                _MS_NOSUID | _MS_NODEV,
                f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other",
            )
        except BaseException:
            os.close(self._fd)
            raise
        self._thread = threading.Thread(target=self._serve, name="switchable-fs", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.read_only = False
        unmount(self.mountpoint)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _serve(self) -> None:
        buffer_size = _MAX_WRITE + 64 * 1024
        while True:
            try:
                request = os.read(self._fd, buffer_size)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            length, opcode, unique, nodeid, *_ = _IN_HEADER.unpack_from(request)
            body = request[_IN_HEADER.size : length]
            try:
                payload, code = self._handle(opcode, nodeid, body), 0
            except _Reply as reply:
                payload, code = b"", reply.code
            except OSError as exc:
                payload, code = b"", exc.errno or errno.EIO
            except Exception:  # a bug here must not hang the service's syscalls
                payload, code = b"", errno.EIO
            if opcode in _NO_REPLY:
                continue
            try:
                os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -code, unique) + payload)
            except OSError:
                pass  # the request was interrupted meanwhile

    # Requests -----------------------------------------------------------------------------

    def _real(self, nodeid: int, name: str | None = None) -> str:
        try:
            relative = self._paths[nodeid]
        except KeyError:
            raise _Reply(errno.ESTALE) from None
        if name is not None:
            relative = f"{relative}/{name}" if relative else name
        return relative

    def _on_disk(self, relative: str) -> str:
        return os.path.join(self.backing, relative) if relative else str(self.backing)

    def _attr(self, st: os.stat_result) -> bytes:
        return _ATTR.pack(
            st.st_ino,
            st.st_size,
            st.st_blocks,
            int(st.st_atime),
            int(st.st_mtime),
            int(st.st_ctime),
            st.st_atime_ns % 10**9,
            st.st_mtime_ns % 10**9,
            st.st_ctime_ns % 10**9,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            4096,
            0,
        )

    def _entry(self, relative: str) -> bytes:
        st = os.lstat(self._on_disk(relative))
        nodeid = self._ids.get(relative)
        if nodeid is None:
            nodeid = self._ids[relative] = self._next_id
            self._paths[nodeid] = relative
            self._next_id += 1
        return _ENTRY.pack(nodeid, 0, 0, 0, 0, 0) + self._attr(st)

    def _forget_path(self, relative: str) -> None:
        nodeid = self._ids.pop(relative, None)
        if nodeid is not None:
            self._paths.pop(nodeid, None)

    def _handle(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        if opcode in _WRITING_OPS and self.read_only:
            self.refused_writes += 1
            raise _Reply(errno.EROFS)
        if opcode == _INIT:
            major, minor, max_readahead, _flags = struct.unpack_from("<IIII", body)
            if major != 7:
                raise _Reply(errno.EPROTO)
            return struct.pack(
                "<IIIIHHIIHHIIH22x",
                7,
                min(minor, 31),
                max_readahead,
                _FUSE_ASYNC_READ | _FUSE_BIG_WRITES,
                16,
                12,
                _MAX_WRITE,
                1,
                0,
                0,
                0,
                0,
                0,
            )
        if opcode == _LOOKUP:
            return self._entry(self._real(nodeid, _name(body)))
        if opcode == _GETATTR:
            flags, _, fh = struct.unpack_from("<IIQ", body)
            st = os.fstat(fh) if flags & 1 else os.lstat(self._on_disk(self._real(nodeid)))
            return _ATTR_OUT.pack(0, 0, 0) + self._attr(st)
        if opcode == _SETATTR:
            return self._setattr(nodeid, body)
        if opcode in (_OPEN, _OPENDIR):
            flags = struct.unpack_from("<I", body)[0]
            path = self._on_disk(self._real(nodeid))
            if opcode == _OPENDIR:
                entries = [(".", 0, stat.S_IFDIR), ("..", 0, stat.S_IFDIR)] + [
                    (entry.name, entry.inode(), stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode))
                    for entry in os.scandir(path)
                ]
                handle, self._next_dir = self._next_dir, self._next_dir + 1
                self._dirs[handle] = entries
                return _OPEN_OUT.pack(handle, 0, 0)
            if flags & os.O_ACCMODE != os.O_RDONLY and self.read_only:
                self.refused_writes += 1
                raise _Reply(errno.EROFS)
            fd = os.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY))
            return _OPEN_OUT.pack(fd, 0, 0)
        if opcode == _CREATE:
            flags, mode, umask, _ = struct.unpack_from("<IIII", body)
            relative = self._real(nodeid, _name(body[16:]))
            fd = os.open(self._on_disk(relative), flags | os.O_CREAT, mode & ~umask & 0o7777)
            return self._entry(relative) + _OPEN_OUT.pack(fd, 0, 0)
        if opcode == _READ:
            fh, offset, size, *_ = _READ_IN.unpack_from(body)
            return os.pread(fh, size, offset)
        if opcode == _WRITE:
            fh, offset, size, *_ = _READ_IN.unpack_from(body)
            data = body[_READ_IN.size : _READ_IN.size + size]
            return struct.pack("<II", os.pwrite(fh, data, offset), 0)
        if opcode == _RELEASE:
            os.close(struct.unpack_from("<Q", body)[0])
            return b""
        if opcode == _RELEASEDIR:
            self._dirs.pop(struct.unpack_from("<Q", body)[0], None)
            return b""
        if opcode == _READDIR:
            return self._readdir(body)
        if opcode in (_FLUSH, _FSYNCDIR):
            return b""
        if opcode == _FSYNC:
            fh = struct.unpack_from("<Q", body)[0]
            if not self.read_only:
                os.fsync(fh)
            return b""
        if opcode == _MKDIR:
            mode, umask = struct.unpack_from("<II", body)
            relative = self._real(nodeid, _name(body[8:]))
            os.mkdir(self._on_disk(relative), mode & ~umask & 0o7777)
            return self._entry(relative)
        if opcode in (_UNLINK, _RMDIR):
            relative = self._real(nodeid, _name(body))
            (os.unlink if opcode == _UNLINK else os.rmdir)(self._on_disk(relative))
            self._forget_path(relative)
            return b""
        if opcode in (_RENAME, _RENAME2):
            newdir = struct.unpack_from("<Q", body)[0]
            names = body[8 if opcode == _RENAME else 16 :].split(b"\0")
            if opcode == _RENAME2 and struct.unpack_from("<I", body, 8)[0]:
                raise _Reply(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not needed here
            old, new = self._real(nodeid, os.fsdecode(names[0])), self._real(newdir, os.fsdecode(names[1]))
            os.rename(self._on_disk(old), self._on_disk(new))
            self._forget_path(new)
            moved = self._ids.pop(old, None)
            if moved is not None:
                self._ids[new], self._paths[moved] = moved, new
            return b""
        if opcode == _STATFS:
            vfs = os.statvfs(self.backing)
            return _KSTATFS.pack(
                vfs.f_blocks,
                vfs.f_bfree,
                vfs.f_bavail,
                vfs.f_files,
                vfs.f_ffree,
                vfs.f_bsize,
                vfs.f_namemax,
                vfs.f_frsize,
                0,
            )
        if opcode == _ACCESS:
            mask = struct.unpack_from("<I", body)[0]
            if mask & os.W_OK and self.read_only:
                raise _Reply(errno.EROFS)
            if not os.access(self._on_disk(self._real(nodeid)), mask):
                raise _Reply(errno.EACCES)
            return b""
        if opcode == _FALLOCATE:
            fh, offset, length, mode = struct.unpack_from("<QQQI", body)
            if mode:
                raise _Reply(errno.EOPNOTSUPP)
            os.posix_fallocate(fh, offset, length)
            return b""
        raise _Reply(errno.ENOSYS)

    def _setattr(self, nodeid: int, body: bytes) -> bytes:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec, mode, _, uid, gid, _) = (
            _SETATTR_IN.unpack_from(body)
        )
        path = self._on_disk(self._real(nodeid))
        target = fh if valid & _FATTR_FH else path
        if valid & _FATTR_SIZE:
            (os.ftruncate if valid & _FATTR_FH else os.truncate)(target, size)
        if valid & _FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (_FATTR_UID | _FATTR_GID):
            os.chown(target, uid if valid & _FATTR_UID else -1, gid if valid & _FATTR_GID else -1)
        if valid & (_FATTR_ATIME_NOW | _FATTR_MTIME_NOW):
            os.utime(target)
        elif valid & (_FATTR_ATIME | _FATTR_MTIME):
            current = os.stat(target)
            os.utime(
                target,
                ns=(
                    atime * 10**9 + atimensec if valid & _FATTR_ATIME else current.st_atime_ns,
                    mtime * 10**9 + mtimensec if valid & _FATTR_MTIME else current.st_mtime_ns,
                ),
            )
        st = os.fstat(fh) if valid & _FATTR_FH else os.lstat(path)
        return _ATTR_OUT.pack(0, 0, 0) + self._attr(st)

    def _readdir(self, body: bytes) -> bytes:
        fh, offset, size, *_ = _READ_IN.unpack_from(body)
        out = bytearray()
        entries = self._dirs.get(fh, [])
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            encoded = os.fsencode(name)
            record = struct.pack("<QQII", ino or 1, index + 1, len(encoded), kind >> 12) + encoded
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)


# A PostgreSQL role and database of the test's own ------------------------------------------


class PgSandbox:
    """A login role and a database it owns, made by the superuser of `admin_url` and dropped
    afterwards; the faults are done to that role only, never to the server's settings."""

    def __init__(self, admin_url: str, name: str) -> None:
        self.admin = make_url(async_database_url(admin_url))
        self.role = self.database = name
        self.service_url = self.admin.set(
            drivername="postgresql", username=name, password=None, database=name
        ).render_as_string(hide_password=False)
        self.root_url = self.admin.set(database=name).render_as_string(hide_password=False)

    def run_as_admin(self, *statements: str) -> list[list[tuple]]:
        async def run() -> list[list[tuple]]:
            engine = create_async_engine(self.admin, isolation_level="AUTOCOMMIT")
            try:
                async with engine.connect() as connection:
                    results = []
                    for statement in statements:
                        result = await connection.execute(text(statement))
                        results.append([tuple(row) for row in result] if result.returns_rows else [])
                    return results
            finally:
                await engine.dispose()

        return asyncio.run(run())

    def query(self, sql: str) -> list[tuple]:
        """Read the sandbox database as the superuser (whatever the role may do meanwhile)."""
        return query_database(self.root_url, sql)

    def create(self) -> PgSandbox:
        self.drop()
        self.run_as_admin(f'CREATE ROLE "{self.role}" LOGIN', f'CREATE DATABASE "{self.database}" OWNER "{self.role}"')
        return self

    def drop(self) -> None:
        self.run_as_admin(
            f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)', f'DROP ROLE IF EXISTS "{self.role}"'
        )

    def terminate_sessions(self) -> int:
        """End every session of the role, so that its pools must connect again."""
        rows = self.run_as_admin(
            f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE usename = '{self.role}'"
        )
        return rows[0][0][0]

    def sessions(self) -> int:
        return self.run_as_admin(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{self.role}'")[0][0][0]

    def connection_limit(self, limit: int) -> None:
        self.run_as_admin(f'ALTER ROLE "{self.role}" CONNECTION LIMIT {limit}')

    def login(self, allowed: bool) -> None:
        self.run_as_admin(f'ALTER ROLE "{self.role}" {"LOGIN" if allowed else "NOLOGIN"}')


# Watching a service over HTTP ---------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP exchange: when it was sent and answered (monotonic), and how."""

    started: float
    ended: float
    status: int | None  # None: no answer (see `error`)
    error: str | None = None
    body: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def exchange(client: httpx.Client, method: str, url: str, timeout: float, **kwargs) -> Answer:
    started = time.monotonic()
    try:
        response = client.request(method, url, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        return Answer(started, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
    return Answer(started, time.monotonic(), response.status_code, body=response.text[:500])


class Poller:
    """Send one request again and again from a thread (each once the last has answered, at
    least `every` seconds apart) and keep every answer, until stopped."""

    def __init__(self, base_url: str, method: str, url: str, every: float = 0.1, timeout: float = 10, **kwargs):
        self.answers: list[Answer] = []
        self._client = httpx.Client(base_url=base_url)
        self._request = (method, url, timeout, kwargs)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._client.close()

    def _run(self) -> None:
        method, url, timeout, kwargs = self._request
        while not self._stop.is_set():
            started = time.monotonic()
            self.answers.append(exchange(self._client, method, url, timeout, **kwargs))
            self._stop.wait(max(0.0, self._every - (time.monotonic() - started)))

    def between(self, start: float, end: float) -> list[Answer]:
        """The answers that arrived between these two instants."""
        return [a for a in list(self.answers) if start <= a.ended <= end]


@dataclass
class StreamEvent:
    event: str
    data: dict
    id: str | None


@dataclass
class Connection:
    """One GET of a stream: its status, its events, whether it asked for a `retry:`."""

    status: int | None
    events: list[StreamEvent] = field(default_factory=list)
    retry_ms: int | None = None
    error: str | None = None


@dataclass
class FollowedStream:
    job_id: str
    connections: list[Connection] = field(default_factory=list)

    @property
    def events(self) -> list[StreamEvent]:
        return [event for connection in self.connections for event in connection.events]

    @property
    def last(self) -> StreamEvent | None:
        events = self.events
        return events[-1] if events else None

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.event == "done"

    def early_ends_without_retry(self) -> list[Connection]:
        """Connections that ended (or broke) before the end of the job without asking the client
        to come back with `retry:`."""
        return [
            c
            for c in self.connections
            if c.status == 200
            and c.retry_ms is None
            and c.error != "given up by the test"
            and not (c.events and c.events[-1].event in ("done", "error"))
        ]


def _sse(lines: Iterator[str], connection: Connection) -> Iterator[StreamEvent]:
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield StreamEvent(
                    fields.get("event", ["message"])[-1],
                    json.loads("\n".join(fields["data"])),
                    fields.get("id", [None])[-1] or None,
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "retry" and value.isdigit():
                connection.retry_ms = int(value)
            else:
                fields.setdefault(name, []).append(value)


def follow_stream(
    base_url: str,
    token: str,
    job_id: str,
    deadline: float,
    stop: threading.Event | None = None,
    headers: dict[str, str] | None = None,
    into: FollowedStream | None = None,
) -> FollowedStream:
    """Read a job's stream over HTTP to its `done` (or `error`), as EventSource would: when a
    stream ends early, come back after its `retry:` (or half a second) with Last-Event-ID.
    Gives up at `deadline` or when `stop` is set. Keepalives are not kept."""
    stop = stop or threading.Event()
    followed = into or FollowedStream(job_id)

    def over() -> bool:
        return stop.is_set() or time.monotonic() >= deadline

    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=20)) as client:
        while not over():
            request_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
            last = followed.last
            if last is not None and last.id is not None:
                request_headers["Last-Event-ID"] = last.id
            connection = Connection(status=None)
            followed.connections.append(connection)
            try:
                with client.stream("GET", f"/api/generate/{job_id}/stream", headers=request_headers) as response:
                    connection.status = response.status_code
                    if response.status_code != 200:
                        connection.error = response.read().decode(errors="replace")[:300]
                        if response.status_code != 503:
                            return followed  # not an answer this contract allows: stop here
                    else:
                        for event in _sse(response.iter_lines(), connection):
                            if event.event != "keepalive":
                                connection.events.append(event)
                            if event.event in ("done", "error"):
                                return followed
                            if over():
                                connection.error = "given up by the test"
                                return followed
            except (httpx.HTTPError, ValueError) as exc:
                connection.error = f"{type(exc).__name__}: {exc}"
            # EventSource's reconnection delay: the server's `retry:`, else its default.
            stop.wait(min((connection.retry_ms or 500) / 1000, 3.0))
    return followed


def contiguous(ids: list[int]) -> bool:
    return ids == list(range(1, len(ids) + 1))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
