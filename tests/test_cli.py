"""What the CLIs share (fles1/cli.py): SIGTERM unwinds like Ctrl-C, so an interrupted job leaves no staging behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from fles1.cli import sigterm_unwinds

# In one process (the imports cost ~10 s), each CLI's work replaced by: stage a folder with fles1.atomic, then
# receive SIGTERM while it is half-written. Prints {cli: exit code}.
TERMINATED_MID_WRITE = """
import json, os, signal, sys, time
from fles1.atomic import atomic_directory
import convert_fles1, eval_fles1, fles1.evaluation, push_fles1

def work(*args, **kwargs):
    with atomic_directory(os.path.join(sys.argv[1], "result")) as staging:
        open(os.path.join(staging, "half.bin"), "wb").write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

fles1.evaluation.evaluate = convert_fles1.convert = push_fles1.publish = work
codes = {}
for name, main, argv in [
    ("eval_fles1", eval_fles1.main, ["--model", "m", "--data", "d", "--no-cache"]),
    ("convert_fles1", convert_fles1.main, ["src", os.path.join(sys.argv[1], "out")]),
    ("push_fles1", push_fles1.main, ["--model", "m", "--repo-id", "a/b", "--dry-run", "x", "--results", "r.json"]),
]:
    try:
        codes[name] = main(argv)
    except SystemExit as exited:
        codes[name] = exited.code
print(json.dumps(codes))
"""


def test_sigterm_mid_write_leaves_no_staging(tmp_path):
    """SIGTERM (what `timeout`, Slurm and Docker send) killed the CLIs outright: a folder being staged (an engine
    export, a converted checkpoint, a Hub folder) stayed beside its target as .<name>.*.partial, forever."""
    process = subprocess.run([sys.executable, "-c", TERMINATED_MID_WRITE, str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    codes = json.loads(process.stdout.splitlines()[-1])
    assert codes == {"eval_fles1": 143, "convert_fles1": 143, "push_fles1": 143}
    assert os.listdir(tmp_path) == []  # neither a result nor its staging


def test_sigterm_handler_is_restored_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        with sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts it
    assert exited.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
