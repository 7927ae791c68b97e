"""fles1.atomic: outputs appear complete or not at all -- and never replace what is not a regular file."""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from fles1.atomic import atomic_directory, atomic_write_json


def test_a_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    atomic_write_json(str(tmp_path / "link.json"), {"a": 1})
    assert os.path.islink(tmp_path / "link.json") and json.loads((tmp_path / "real.json").read_text()) == {"a": 1}


def test_a_pipe_or_device_receives_the_data_and_stays(tmp_path):
    """--output /dev/stdout (a link to a pipe or terminal) or /dev/null: a temporary file renamed over it replaced
    the device itself (as root, /dev/null became a regular file)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    atomic_write_json(str(fifo), {"a": 1})
    reader.join(timeout=30)
    assert json.loads(received[0]) == {"a": 1} and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]  # no temporary left beside it


def test_a_write_failing_halfway_leaves_nothing(tmp_path):
    (tmp_path / "out.json").write_text('{"earlier": true}')
    with pytest.raises(TypeError):  # json.dump fails after writing the first key
        atomic_write_json(str(tmp_path / "out.json"), {"a": 1, "b": object()})
    assert os.listdir(tmp_path) == ["out.json"] and json.loads((tmp_path / "out.json").read_text()) == {"earlier": True}


WRITE_TO_STDOUT = ("import sys; from fles1.atomic import atomic_write_json; print('before', flush=True); "
                   "atomic_write_json('/dev/stdout', {'a': 1}); print('after')")


def test_dev_stdout_is_written_through_a_pipe_or_a_redirect(tmp_path):
    """/dev/stdout resolves through /proc/self/fd/1: into a pipe it was a FileNotFoundError (no real path), into a
    file a shell redirected to (even with >>) that file was replaced, losing what was written before."""
    piped = subprocess.run([sys.executable, "-c", WRITE_TO_STDOUT], cwd=ROOT, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    first, rest = piped.stdout.split("\n", 1)
    assert first == "before" and json.loads(rest.rsplit("after", 1)[0]) == {"a": 1}
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    with open(log, "a") as handle:  # python ... >> log.txt
        assert subprocess.run([sys.executable, "-c", WRITE_TO_STDOUT], cwd=ROOT, stdout=handle).returncode == 0
    lines = log.read_text().splitlines()
    assert lines[:2] == ["earlier line", "before"] and lines[-1] == "after"


@pytest.mark.parametrize("mode", [0o600, 0o640])  # 0o600 is also what mkstemp creates: only 0o640 shows a copy
def test_a_replaced_file_keeps_its_permissions(tmp_path, mode):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.chmod(secret, mode)
    atomic_write_json(str(secret), {"a": 1})
    assert stat.S_IMODE(os.stat(secret).st_mode) == mode and json.loads(secret.read_text()) == {"a": 1}


def test_only_descriptors_are_written_through(tmp_path):
    """Every /dev and /proc path was appended to: a results file in /dev/shm got each run's JSON after the last."""
    from fles1.atomic import _through_a_descriptor

    os.symlink("/proc/self/fd/1", tmp_path / "out-link")
    os.symlink(tmp_path / "plain.json", tmp_path / "plain-link")
    assert _through_a_descriptor(str(tmp_path / "out-link")) and _through_a_descriptor("/dev/stdout")
    assert not _through_a_descriptor(str(tmp_path / "plain-link")) and not _through_a_descriptor("/dev/shm/r.json")
    for value in ({"run": 1}, {"run": 2}):
        atomic_write_json(str(tmp_path / "plain-link"), value)
    assert json.loads((tmp_path / "plain.json").read_text()) == {"run": 2}


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from fles1.atomic import atomic_directory, atomic_open
with atomic_directory({folder!r}, replace=True) as staging, atomic_open({file!r}) as handle:
    open(os.path.join(staging, "model.safetensors"), "w").write("half")
    handle.write('{{"partial": ')
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_nothing_else(tmp_path):
    """kill -9 (or the out-of-memory killer) left each run's staging folder -- a whole checkpoint -- and temporary
    files for good: no later run removed them."""
    from fles1.atomic import atomic_directory, atomic_open

    folder, file = str(tmp_path / "out"), str(tmp_path / "results.json")
    script = KILLED_MID_WRITE.format(root=ROOT, folder=folder, file=file)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9
    left = sorted(name for name in os.listdir(tmp_path))
    assert len(left) == 2 and all(name.startswith((".out.", ".results.json.")) for name in left), left
    from fles1.atomic import _writer

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    host, _, _ = _writer().partition("_ns")
    kept = [tmp_path / f".out.elsewhere_ns1_pid{dead_pid}.abcdefgh.partial",  # a shared file system: maybe live
            tmp_path / f".out.{host}_ns1_pid{dead_pid}.abcdefgh.partial"]  # another container: its pid is not ours
    for folder_left in kept:
        folder_left.mkdir()
    with atomic_open(file) as handle, atomic_directory(folder) as staging:
        live = [name for name in os.listdir(tmp_path) if name.startswith(".") and tmp_path / name not in kept]
        assert len(live) == 2 and os.path.basename(staging) in live  # this writer's own
        handle.write("{}")
        open(os.path.join(staging, "model.safetensors"), "w").write("whole")
    assert sorted(os.listdir(tmp_path)) == sorted([path.name for path in kept] + ["out", "results.json"])


def test_a_retired_result_is_kept_until_its_replacement_is_in_place(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the old one is the only result --
    also while an empty folder (mkdir -p) stands at the target and the next write fails."""
    from fles1.atomic import _writer, atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    retired = tmp_path / f".out.{_writer()}{int(dead.stdout)}.abcdefgh.partial.old"
    retired.mkdir()
    (retired / "model.safetensors").write_text("the old result")
    with atomic_directory(str(tmp_path / "other")):
        pass
    assert retired.is_dir()  # another target's write leaves it
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt), atomic_directory(str(tmp_path / "out"), replace=True):
        assert retired.is_dir()
        raise KeyboardInterrupt
    assert retired.is_dir() and (retired / "model.safetensors").read_text() == "the old result"
    with atomic_directory(str(tmp_path / "out"), replace=True):
        assert retired.is_dir()  # no new result in place yet
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]


def test_files_in_a_written_folder_get_a_plain_files_permissions(tmp_path):
    """safetensors' save_file (like mkstemp) creates 0600 files: a checkpoint's weights were unreadable to the other
    users of a shared machine while every other file in it was not."""
    import torch
    from safetensors.torch import save_file

    from fles1.atomic import atomic_directory

    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / "out")) as staging:
            save_file({"weight": torch.zeros(2)}, os.path.join(staging, "model.safetensors"))
            os.makedirs(os.path.join(staging, "sub"))
            save_file({"weight": torch.zeros(2)}, os.path.join(staging, "sub", "more.safetensors"))
    finally:
        os.umask(umask)
    for name in ("model.safetensors", os.path.join("sub", "more.safetensors")):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name
    # only 0600 files: a script made executable (0755) or one private to its group (0640) keeps its mode
    with atomic_directory(str(tmp_path / "kept")) as staging:
        for name, mode in (("run.sh", 0o755), ("notes", 0o640)):
            open(os.path.join(staging, name), "w").close()
            os.chmod(os.path.join(staging, name), mode)
    assert {name: stat.S_IMODE(os.stat(tmp_path / "kept" / name).st_mode) for name in ("run.sh", "notes")} == \
        {"run.sh": 0o755, "notes": 0o640}


def test_a_live_writer_of_another_user_is_not_swept(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: that writer is alive, and its
    temporary folder (a checkpoint being written) must stay."""
    from fles1.atomic import _writer, atomic_directory

    others = 999_999  # another user's writer: os.kill is patched to answer as for one
    left = tmp_path / f".out.{_writer()}{others}.abcdefgh.partial"
    left.mkdir()
    real_kill = os.kill

    def kill(pid, signal):
        if pid == others:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, signal)

    monkeypatch.setattr(os, "kill", kill)
    with atomic_directory(str(tmp_path / "out")):
        pass
    assert left.is_dir()


def test_a_staging_folder_is_a_valid_module_name_once_transformers_sanitizes_it(tmp_path):
    """Writing a checkpoint loads its staging folder as remote code; a name with '@' made transformers warn four
    times per convert that the module name is not a valid Python identifier."""
    from fles1.atomic import atomic_directory, is_staging_folder

    with atomic_directory(str(tmp_path / "fles1-tiny")) as staging:
        name = os.path.basename(staging)
        assert is_staging_folder(staging)
        assert name.replace(".", "_dot_").replace("-", "_hyphen_").isidentifier(), name  # transformers' rule
    assert not is_staging_folder(str(tmp_path / "fles1-tiny"))


def test_a_folder_written_meanwhile_by_another_process_is_kept_and_named(tmp_path):
    """Two jobs to one new output folder: the later one ended with "OSError: Directory not empty" (a traceback, and
    exit 1, push's code for a Hub failure; convert blamed its source model)."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match=r"out: exists and is not empty \(written meanwhile by another "
                                              r"process\); nothing of this run was put there"):
        with atomic_directory(str(out)) as staging:
            (Path(staging) / "mine.txt").write_text("mine")
            out.mkdir()  # the other job's folder lands first
            (out / "theirs.txt").write_text("theirs")
    assert os.listdir(out) == ["theirs.txt"]
    assert [name for name in os.listdir(tmp_path) if name != "out"] == []  # this run's staging folder is gone


def record_syncs_and_renames(monkeypatch, fact: str) -> list:
    """The os.fsync and os.replace calls from now on, in order: ("fsync", the synced file's os.fstat `fact`) and
    ("replace", the target's name)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", getattr(os.fstat(descriptor), fact)))
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", os.path.basename(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_file_is_on_disk_in_full_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Without the flush and fsync before os.replace a power loss could leave results.json renamed into place but
    empty or cut short -- the partial file atomic output exists to prevent."""
    from fles1.atomic import atomic_open

    events = record_syncs_and_renames(monkeypatch, "st_size")  # the size the kernel holds when it is synced
    text = "x" * 100_000 + "\n"
    with atomic_open(str(tmp_path / "results.json")) as handle:
        handle.write(text[:-1])
        handle.write(text[-1])  # a short last write stays in Python's buffer until a flush
    assert events[:2] == [("fsync", len(text)), ("replace", "results.json")], events
    assert (tmp_path / "results.json").read_text() == text


def test_an_interrupted_write_leaves_no_temporary_and_the_earlier_file(tmp_path):
    """Ctrl-C inside the block: only an Exception-based cleanup left '.results.json.<writer>.tmp' behind for good."""
    from fles1.atomic import atomic_open

    (tmp_path / "results.json").write_text('{"earlier": true}')
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(str(tmp_path / "results.json")) as handle:
            handle.write('{"partial": ')
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["results.json"]
    assert json.loads((tmp_path / "results.json").read_text()) == {"earlier": True}


def test_a_new_file_gets_a_plain_files_permissions(tmp_path):
    """mkstemp creates 0600: results, run files and exports were unreadable to the other users of a shared machine."""
    umask = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "new.json"), {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o644


def test_a_replacement_that_cannot_be_renamed_in_puts_the_old_folder_back(tmp_path, monkeypatch):
    """--overwrite moves the old result aside before renaming the new one in: when that rename fails the old
    folder must be back at its place, not left under a hidden '.partial.old' name (the only copy of the model)."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the old result")
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(target) == "out":
            raise OSError(errno.EACCES, "Permission denied")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Permission denied"):
        with atomic_directory(str(out), replace=True) as staging:
            (Path(staging) / "model.safetensors").write_text("the new result")
    assert (out / "model.safetensors").read_text() == "the old result"
    assert os.listdir(tmp_path) == ["out"]  # neither the staging folder nor a retired copy is left


def test_a_replaced_folder_leaves_no_copy_of_the_old_one_behind(tmp_path):
    """--overwrite moves the old result aside (.out.<writer>.partial.old) and must delete it once the new one is in
    place: left there, every overwrite kept a hidden copy of a whole checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the old result")
    with atomic_directory(str(out), replace=True) as staging:
        (Path(staging) / "model.safetensors").write_text("the new result")
    assert os.listdir(tmp_path) == ["out"] and (out / "model.safetensors").read_text() == "the new result"


def test_a_folder_that_is_not_empty_is_refused_before_the_work(tmp_path):
    """Callers check the output first (train, convert) so that a run is not lost at its end: a non-empty folder
    must be refused by require_new_folder, and by atomic_directory before its block runs."""
    from fles1.atomic import require_new_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier result")
    with pytest.raises(FileExistsError, match="out: exists and is not empty; pass --overwrite"):
        require_new_folder(str(out), hint="; pass --overwrite")
    entered = []
    with pytest.raises(FileExistsError, match="exists and is not empty$"):
        with atomic_directory(str(out)):
            entered.append(True)
    assert not entered and os.listdir(out) == ["model.safetensors"]


def test_a_folder_is_on_disk_in_full_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """atomic_directory renamed the staging folder in with its files (written by safetensors, transformers) still
    in the page cache only: after a power loss the checkpoint folder could be there with files cut short."""
    events = record_syncs_and_renames(monkeypatch, "st_ino")
    out = tmp_path / "out"
    with atomic_directory(str(out)) as staging:
        (Path(staging) / "model.safetensors").write_bytes(b"w" * 10_000)
        (Path(staging) / "1_SpladePooling").mkdir()
        (Path(staging) / "1_SpladePooling" / "config.json").write_text("{}")
    synced_before = {inode for kind, inode in events[:events.index(("replace", "out"))] if kind == "fsync"}
    for path in (out / "model.safetensors", out / "1_SpladePooling" / "config.json", out / "1_SpladePooling", out):
        assert os.stat(path).st_ino in synced_before, path  # the files and the folders' entries
    assert ("fsync", os.stat(tmp_path).st_ino) in events[events.index(("replace", "out")):]  # then the rename


def test_a_renamed_file_is_synced_in_its_folder(tmp_path, monkeypatch):
    """atomic_open synced the file, not the rename: after a power loss the folder could still name the old file."""
    events = record_syncs_and_renames(monkeypatch, "st_ino")
    atomic_write_json(str(tmp_path / "results.json"), {"a": 1})
    assert events[-1] == ("fsync", os.stat(tmp_path).st_ino)
    assert ("fsync", os.stat(tmp_path / "results.json").st_ino) in events
