"""fles1.atomic: outputs appear complete or not at all -- and never replace what is not a regular file."""

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from conftest import ROOT
from fles1.atomic import atomic_write_json


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


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.chmod(secret, 0o600)
    atomic_write_json(str(secret), {"a": 1})
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and json.loads(secret.read_text()) == {"a": 1}


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
