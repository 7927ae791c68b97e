"""Atomic output: write to a temporary file (or folder) beside the target, then ``os.replace`` it into place, so an
interrupted run never leaves a partial file that looks complete.

A temporary is named ``.<target>.<writer>.<random>.tmp`` (a folder: ``....partial``), the writer being
``<host>_ns<pid namespace>_pid<pid>`` (a valid module name once transformers sanitizes it, as it does when loading
remote code from the folder). Ctrl-C and SIGTERM remove it; a process killed outright (``kill -9``, the
out-of-memory killer) cannot, so the next write of the same target removes the temporaries of the dead processes
of its own host and pid namespace. A live writer's, another host's (a shared file system) or another container's
(its pids are not visible from here) are left alone."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """``with atomic_open("results.json") as handle: ...`` -- the file appears only if the block succeeds. A link
    is followed (its target is replaced, the link stays); a target that is not a regular file (``/dev/null``,
    ``/dev/stdout``, a pipe) is written to directly: renaming a file over it would replace the device itself."""
    if (os.path.exists(path) and not os.path.isfile(path)) or _through_a_descriptor(path):
        # append: opening /proc/self/fd/1 for writing truncates the file a shell redirected to, even with >>
        with open(path, mode.replace("w", "a"), encoding=None if "b" in mode else encoding) as handle:
            yield handle
        return
    path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_dead_writers_temporaries(path)
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.isfile(path):
            shutil.copymode(path, temporary)  # a replaced file keeps its permissions
        else:
            _permissions_of_a_new(temporary, 0o666)  # mkstemp creates 0600
        os.replace(temporary, path)
        _fsync(directory)  # the rename itself, on disk
    except BaseException:  # KeyboardInterrupt included: never leave the temporary behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _fsync(path: str) -> None:
    """A file's or folder's (its entries: a rename into it) writes on disk. One that cannot be opened for it (a
    folder on Windows, a file its writer made unreadable) is left to the file system."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path) or not os.access(path, os.R_OK):
            return
        raise
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _through_a_descriptor(path: str) -> bool:
    """Whether ``path`` is, or links through, an open file descriptor (/dev/stdout -> /proc/self/fd/1, /dev/fd/N):
    behind it a pipe (resolving to no real path) or the file a shell redirected to, which must be written through
    the descriptor, never replaced. (/dev/shm/results.json is a plain file and is written atomically.)"""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if current.startswith(("/proc/", "/dev/fd/")):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return False


def atomic_write_json(path: str, value, indent: int | None = 2, **dump_options) -> None:
    """``value`` as a JSON file (newline-terminated) that appears only once complete."""
    with atomic_open(path) as handle:
        json.dump(value, handle, indent=indent, **dump_options)
        handle.write("\n")


def require_new_folder(path: str, replace: bool = False, hint: str = "") -> None:
    """What `atomic_directory` will write into: nothing there, an empty folder, or (``replace``) any folder.
    Callers with expensive work before it check first, so the error comes before the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    if os.path.isdir(path) and path_within(os.getcwd(), path):  # e.g. ".": it cannot be renamed into place
        raise NotADirectoryError(f"{path}: is the current folder or holds it, which a complete folder cannot be "
                                 "moved into; name a new folder (e.g. ./fles1)")
    if not replace and os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path}: exists and is not empty{hint}")
    ancestor = _nearest_existing(os.path.abspath(path))
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(f"{path}: cannot be created, {ancestor} is a file")


def require_writable(path: str, what: str, folder: bool = False) -> None:
    """Fail before the work, not after it: ``path`` (a file, or with ``folder`` a folder) can be written, i.e. its
    nearest existing ancestor is a folder a file can be created in -- tried with a temporary file, removed at once
    (permission bits alone pass root everywhere, /proc and read-only mounts included). ``what`` names the option in
    the error."""
    if not path:  # abspath("") is the working folder: an unset $OUT passed, and failed later, blamed elsewhere
        raise ValueError(f"{what} is empty: name a {'folder' if folder else 'file'}")
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{what} {path}: exists and is {'not ' if folder else ''}a folder")
    ancestor = path if folder and os.path.isdir(path) else _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(ancestor):
        raise ValueError(f"{what} {path}: cannot be written, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot be written, {ancestor} is not writable")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".fles1-write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot be written in {ancestor} ({error.strerror})") from None


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False):
    """``with atomic_directory("out") as staging: <fill staging>`` -- ``out`` appears, complete, only if the block
    succeeds (``out`` must not exist or be empty, unless ``replace``: then the old folder is removed only after the
    new one is complete). The staging folder sits beside it, so the rename is atomic."""
    require_new_folder(path, replace)
    path = os.path.abspath(path)  # "out/." is "out": renaming "." fails
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_writers_temporaries(path)
    staging = tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".partial", dir=parent)
    try:
        yield staging
        _permissions_of_a_new(staging, 0o777)  # mkdtemp creates 0700
        plain_file_permissions(staging)
        # on disk before the rename: after a power loss the folder is there complete, or not at all (the writers --
        # safetensors, transformers -- leave their files to the page cache)
        for folder, _, names in os.walk(staging):
            for name in names:
                if os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name)):
                    _fsync(os.path.join(folder, name))
            _fsync(folder)
        retired = None
        try:
            if replace and os.path.isdir(path) and os.listdir(path):
                retired = f"{staging}.old"  # interrupted between the two renames: the old folder survives here
                os.rename(path, retired)
            elif os.path.isdir(path):
                os.rmdir(path)  # fails unless empty: an existing result is never replaced
            os.replace(staging, path)
        except OSError as error:
            if retired and not os.path.exists(path):  # the old folder back where it was
                os.rename(retired, path)
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # another process put its folder there since the start (two jobs to one output): theirs stays
            raise FileExistsError(f"{path}: exists and is not empty (written meanwhile by another process); "
                                  "nothing of this run was put there") from None
        _fsync(parent)  # the rename itself, on disk
        if retired:
            shutil.rmtree(retired, ignore_errors=True)
        _remove_dead_writers_temporaries(path, retired=True)  # a dead writer's retired folder: `path` is in place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_directory(name: str):
    """``with scratch_directory("fles1-validate") as scratch: ...`` -- a private folder in the system's temporary
    folder, removed when the block ends. One a process killed outright left there (a converted model, a whole Hub
    folder) is removed by the next use of the same ``name`` on this host and pid namespace, as `atomic_directory`
    sweeps its staging folders."""
    target = os.path.join(tempfile.gettempdir(), name)
    _remove_dead_writers_temporaries(target)
    scratch = tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".partial", dir=tempfile.gettempdir())
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _writer() -> str:
    """This process's host and pid namespace: where its pid means this process (containers sharing the host's
    name have namespaces of their own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return f"{socket.gethostname()}_ns{namespace}_pid"


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.{_writer()}{os.getpid()}."


def is_staging_folder(path: str) -> bool:
    """Whether `path` is an `atomic_directory` staging folder (a name no later run reuses)."""
    name = os.path.basename(os.path.normpath(path))
    return name.startswith(".") and name.endswith(".partial") and "_pid" in name


def _remove_dead_writers_temporaries(path: str, retired: bool = False) -> None:
    """Remove what writers of `path` in this host and pid namespace left when killed outright; with `retired`
    (only once a new result is in place) also a retired folder (``.partial.old``: the previous result, moved aside
    just before its replacement was renamed in -- the only copy if that rename never happened)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    kinds = "tmp|partial|partial\\.old" if retired else "tmp|partial"
    pattern = re.compile(re.escape(f".{os.path.basename(path)}.{_writer()}") + rf"(\d+)\.[^./]+\.({kinds})")
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if not match or _alive(int(match.group(1))):
            continue
        temporary = os.path.join(parent, name)
        with contextlib.suppress(OSError):  # another writer swept it first
            shutil.rmtree(temporary) if os.path.isdir(temporary) and not os.path.islink(temporary) \
                else os.remove(temporary)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def plain_file_permissions(folder: str, names: list[str] | None = None) -> None:
    """Give the 0600 files in `folder` (what mkstemp and safetensors' save_file create) the permissions a plainly
    created file has: weights the other users of a shared machine could not read, next to files they could. Only
    `names` (in `folder`) when given: a folder the caller did not create may hold files private on purpose."""
    files = [os.path.join(folder, name) for name in names] if names is not None else \
        [os.path.join(parent, name) for parent, _, found in os.walk(folder) for name in found]
    for file in files:
        if os.path.isfile(file) and not os.path.islink(file) and os.stat(file).st_mode & 0o777 == 0o600:
            _permissions_of_a_new(file, 0o666)


def path_within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _permissions_of_a_new(path: str, mode: int) -> None:
    """Give a temporary the permissions a plainly created file or folder would have (``mode`` minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
