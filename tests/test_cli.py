"""What the CLIs share (fles1/cli.py): Ctrl-C and SIGTERM end a CLI with one line and leave no staging behind."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT
from fles1.cli import interrupts_exit

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
        with interrupts_exit():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts it
    assert exited.value.code == 143 and signal.getsignal(signal.SIGTERM) is before


# Each CLI's work replaced by: stage a folder, then receive SIGINT (Ctrl-C) or SIGTERM half-way. Prints {cli: exit
# code}; stderr must hold one short line per CLI, no traceback.
INTERRUPTED_MID_WRITE = """
import json, os, signal, sys, time
# as in a terminal: a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, "benchmarks")
from fles1.atomic import atomic_directory
import bench_encode, convert_fles1, eval_fles1, fles1.evaluation, fles1.training.run, push_fles1, train_fles1

def work(*args, **kwargs):
    with atomic_directory(os.path.join(sys.argv[1], "result")) as staging:
        open(os.path.join(staging, "half.bin"), "wb").write(b"x" * 1000)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(30)

fles1.evaluation.evaluate = convert_fles1.convert = push_fles1.publish = fles1.training.run.train = work
bench_encode.convert = work
codes = {}
for name, main, argv in [
    ("eval_fles1", eval_fles1.main, ["--model", "m", "--data", "d", "--no-cache"]),
    ("convert_fles1", convert_fles1.main, ["src", os.path.join(sys.argv[1], "out")]),
    ("push_fles1", push_fles1.main, ["--model", "m", "--repo-id", "a/b", "--dry-run", "x", "--results", "r.json"]),
    ("train_fles1", train_fles1.main, ["--recipe", "recipes/fles1-tiny-nfcorpus.yaml", "--output-dir",
                                       os.path.join(sys.argv[1], "run")]),
    ("bench_encode", bench_encode.main, ["--device", "cpu"]),
]:
    try:
        codes[name] = main(argv)
    except SystemExit as exited:
        codes[name] = exited.code
print(json.dumps(codes))
"""


@pytest.mark.parametrize("signal_name, code, line", [("SIGINT", 130, "interrupted"),
                                                     ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_an_interrupted_cli_says_so_in_one_line_and_leaves_nothing(tmp_path, signal_name, code, line):
    """Ctrl-C printed a 20-70 line traceback from every CLI; bench_encode left its 18 MB converted backbone in /tmp
    on SIGTERM, and train and bench_encode died outright on it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.run([sys.executable, "-c", INTERRUPTED_MID_WRITE, str(tmp_path / "out"), signal_name],
                             cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "TMPDIR": str(scratch)})
    assert process.returncode == 0, process.stderr[-2000:]
    codes = json.loads(process.stdout.splitlines()[-1])
    assert codes == dict.fromkeys(["eval_fles1", "convert_fles1", "push_fles1", "train_fles1", "bench_encode"], code)
    assert "Traceback" not in process.stderr
    assert [text for text in process.stderr.splitlines() if text == line] == [line] * 5, process.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []  # no result, no staging
    assert [name for name in os.listdir(scratch) if name.startswith("fles1-")] == []  # bench_encode's scratch too


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    """/proc passes os.access for root: convert loaded the model, then blamed the *source* for the output it could not
    write; eval ran the whole evaluation, then died with a traceback and exit 1, its results lost."""
    import convert_fles1
    import eval_fles1

    from fles1.atomic import require_writable

    with pytest.raises(ValueError, match=r"--output /proc/fles1-x: cannot be written"):
        require_writable("/proc/fles1-x", "--output")
    assert convert_fles1.main(["no-such-source", "/proc/fles1-x"]) == 2
    assert "error: OUT /proc/fles1-x: cannot be written" in capsys.readouterr().err
    assert eval_fles1.main(["--model", "m", "--data", "d", "--output", "/proc/fles1-x"]) == 2
    assert "error: --output /proc/fles1-x: cannot be written" in capsys.readouterr().err


def test_eval_reports_an_output_that_fails_at_write_time_in_one_line(tmp_path, monkeypatch, capsys):
    """A write failing after the work (a full disk) was a traceback and exit 1; the tables are printed first."""
    import errno

    import eval_fles1
    import fles1.evaluation

    results = {"threshold": 0.3, "document_max_length": 256, "environment": {"device": "cpu"}, "datasets": {}}
    monkeypatch.setattr(fles1.evaluation, "evaluate", lambda *args, **kwargs: results)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fles1.evaluation, "write_results", full_disk)
    assert eval_fles1.main(["--model", "m", "--data", "d", "--output", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "Retrieval (test split" in captured.out
    assert f"error: --output {tmp_path / 'r.json'}: cannot be written (No space left on device)" in captured.err


def test_an_error_line_never_shows_the_hub_token(monkeypatch, capsys):
    """A mirror or proxy echoing the Authorization header into its error text put the token on eval's error line
    (push redacted it; the other CLIs print through bad_input)."""
    from fles1.cli import bad_input

    monkeypatch.setenv("HF_TOKEN", "hf_probeSECRET0123456789")
    assert bad_input("BeIR/x: 401 bad token Bearer hf_probeSECRET0123456789") == 2
    assert capsys.readouterr().err == "error: BeIR/x: 401 bad token Bearer <token>\n"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert bad_input("no token anywhere") == 2 and capsys.readouterr().err == "error: no token anywhere\n"


@pytest.mark.parametrize("flags, named", [(["--target-nnz-d", "120"], "--target-nnz-d"),
                                          (["--clfr-interval-steps", "5"], "--clfr-interval-steps"),
                                          # the same settings through --set were dropped silently
                                          (["--set", "clfr.target_nnz_d=100"], "--set clfr.target_nnz_d"),
                                          (["--set", "clfr.gain=0.5"], "--set clfr.gain")])
def test_clfr_flags_with_clfr_off_warn_that_they_do_nothing(tmp_path, monkeypatch, flags, named):
    """They were dropped without a word: the run trained at a fixed lambda_d that the command line looked to steer."""
    import fles1.training.run
    import train_fles1

    trained = []
    monkeypatch.setattr(fles1.training.run, "train", lambda recipe, *args, **kwargs: trained.append(recipe))
    argv = ["--recipe", "recipes/fles1-tiny-nfcorpus.yaml", "--output-dir", str(tmp_path / "run"),
            "--set", "clfr.enabled=false", *flags]
    with pytest.warns(UserWarning, match=rf"^{named} steer CLFR, which this recipe turns off \(clfr.enabled: false\): "
                                         r"lambda_d stays 3e-05"):
        train_fles1.main(argv)
    assert len(trained) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with CLFR on, the same flag is what it says
        train_fles1.main(argv[:4] + flags)


def test_train_names_the_shipped_recipes_and_an_empty_output_dir(tiny_random_checkpoint, tmp_path, monkeypatch, capsys):
    """`--recipe fles1-v14` said "[Errno 2] No such file or directory: 'fles1-v14'"; `--output-dir ""` (an unset
    $OUT) loaded the model, then blamed model.path for os.makedirs('')."""
    import train_fles1

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        train_fles1.main(["--recipe", "fles1-v14", "--output-dir", str(tmp_path / "run")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("error: --recipe fles1-v14: no such file; the shipped recipes: "
                                       "recipes/fles1-tiny-nfcorpus.yaml, recipes/fles1-v14.yaml\n")
    with pytest.raises(SystemExit) as exited:
        train_fles1.main(["--recipe", "recipes/fles1-tiny-nfcorpus.yaml", "--output-dir", "",
                          "--model", tiny_random_checkpoint])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: output_dir is empty: name a folder\n"


def test_a_mistyped_source_name_says_no_folder_is_there_in_one_line(tmp_path, monkeypatch, capsys):
    """`convert_fles1.py nonexist OUT` (and training's model.path) printed transformers' two-line "couldn't connect
    to huggingface.co" message, never saying that no folder of that name exists."""
    import convert_fles1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert convert_fles1.main(["no-such-source", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: no-such-source: no local folder of that name, and could not "
                                               "load it from the Hugging Face Hub (")
    assert not (tmp_path / "out").exists()
