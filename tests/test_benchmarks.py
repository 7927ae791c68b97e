"""The benchmark scripts' argument handling: a model, data folder, device or --output that will not do is one error
line before the run (the runs themselves are measurements, not tests)."""

import importlib.util
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_line(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["bench_encode", "bench_train"])
def test_a_device_or_output_that_will_not_do_is_refused_before_the_run(script, tmp_path, capsys):
    """bench_train ran on the CPU for any --device and labelled its JSON with it; both wrote --output only after the
    whole run (a path under a file: a traceback, the numbers lost)."""
    main = load(script).main
    assert error_line(main, ["--device", "cuda:99"], capsys).startswith("error: device='cuda:99' is not usable here")
    # meta tensors hold no data: bench_encode failed in a traceback, bench_train ran on the CPU labelled "meta"
    assert error_line(main, ["--device", "meta"], capsys) == \
        "error: device='meta' is not usable here: meta tensors hold no data"
    (tmp_path / "a-file").write_text("x")
    output = str(tmp_path / "a-file" / "bench.json")
    assert error_line(main, ["--output", output], capsys) == \
        f"error: --output {output}: cannot be written, {tmp_path / 'a-file'} is a file"
    # an unset $OUT: the whole run, then no JSON and exit 0
    assert error_line(main, ["--output", ""], capsys) == "error: --output is empty: name a file"
    if script == "bench_encode":  # the shipped backbone, converted, was timed instead
        assert error_line(main, ["--model", ""], capsys).startswith("error: --model is empty: name a FLES-1 folder")
    else:  # "error: : Repo id must use alphanumeric chars"
        assert error_line(main, ["--model", ""], capsys).startswith("error: --model is empty: name a folder")
    # an unset $DATA: datasets' IndexError for the hub id "" (a traceback in bench_encode and eval_fles1.py)
    assert error_line(main, ["--data", ""], capsys).startswith(
        "error: --data is empty" if script == "bench_train" else "error: '': empty; name a BEIR folder")


def test_bench_train_refuses_a_gpu_its_trainers_would_not_run_on(monkeypatch):
    """transformers' Trainer runs on the current CUDA device whatever --device says: the JSON named another."""
    trainer_device = load("bench_train").trainer_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    trainer_device(torch.device("cuda"))
    trainer_device(torch.device("cuda:0"))
    with pytest.raises(ValueError, match=r"--device cuda:1: the trainers run on cuda:0, the current device; pick "
                                         "another GPU with CUDA_VISIBLE_DEVICES"):
        trainer_device(torch.device("cuda:1"))
    with pytest.raises(ValueError, match="--device xpu: the trainers run on cpu, cuda or mps"):
        trainer_device(torch.device("xpu"))


def test_bench_encode_waits_for_the_device_it_times(monkeypatch):
    """torch.cuda.synchronize() waits on the current device: --device cuda:1 stopped the clock with its kernels
    still queued, and mps was never waited for."""
    synchronize, waited = load("bench_encode").synchronize, []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    for device in ("cuda:1", "mps", "cpu"):
        synchronize(torch.device(device))
    assert waited == [("cuda", torch.device("cuda:1")), ("mps", None)]


def test_a_model_or_data_folder_that_will_not_do_is_one_error_line(backbone_dir, tmp_path, capsys):
    """Each was a traceback (CheckpointError, BEIRDataError, FileNotFoundError without the path)."""
    encode, train = load("bench_encode").main, load("bench_train").main
    missing = str(tmp_path / "missing")
    assert error_line(encode, ["--model", missing], capsys).startswith(f"error: {missing}")
    assert error_line(encode, ["--model", backbone_dir], capsys).startswith(f"error: {backbone_dir}")  # plain BERT
    assert error_line(encode, ["--data", missing], capsys).startswith(f"error: {missing}")
    assert error_line(train, ["--data", missing], capsys).startswith(f"error: {missing}")
    # exit status 2 like every other bad input (was 1: raised as SystemExit("error: ..."))
    assert error_line(train, ["--model", missing, "--batch-size", "1", "--steps", "1"], capsys) == \
        f"error: {missing}: no such folder"
    assert "examples, but" in error_line(train, ["--batch-size", "100000", "--steps", "1"], capsys)


def _summarize_module(tmp_path):
    """experiments/summarize.py reading and writing a copy of the committed results under tmp_path."""
    shutil.copytree(os.path.join(ROOT, "results", "runs"), tmp_path / "results" / "runs")
    shutil.copytree(os.path.join(ROOT, "results", "gpu-h200-2026-11-26", "runs"),
                    tmp_path / "results" / "gpu-h200-2026-11-26" / "runs")
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(ROOT, "experiments", "summarize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ROOT, module.RUNS = str(tmp_path), str(tmp_path / "results" / "runs")
    return module


def test_summarize_names_a_broken_result_file_and_writes_nothing(tmp_path, capsys):
    """A truncated eval JSON was a bare JSONDecodeError naming no file, after the five plots had been rewritten;
    --help regenerated everything (no argument parser)."""
    summarize = _summarize_module(tmp_path)
    with pytest.raises(SystemExit) as exited:
        summarize.main(["--help"])
    assert exited.value.code == 0 and not (tmp_path / "results" / "STUDY.md").exists()
    broken = tmp_path / "results" / "runs" / "fnmask-seed1" / "eval_test.json"
    broken.write_text(broken.read_text()[:200])
    assert summarize.main([]) == 2
    assert "error: results/runs/fnmask-seed1/eval_test.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "results" / "plots").exists() and not (tmp_path / "results" / "STUDY.md").exists()
    shutil.copyfile(os.path.join(ROOT, "results", "runs", "fnmask-seed1", "eval_test.json"), broken)
    # valid JSON of another shape was a KeyError / TypeError traceback (exit 1) -- for a file only the plots read
    # (a selected seed's training log), after two of the plots had been rewritten
    log = tmp_path / "results" / "runs" / "probe-bm25pos-tau1-seed1" / "training_log.json"
    log.write_text(json.dumps({key: value for key, value in json.loads(log.read_text()).items() if key != "recipe"}))
    assert summarize.main([]) == 2
    assert capsys.readouterr().err == ("error: results/runs/probe-bm25pos-tau1-seed1/training_log.json: recipe "
                                       "missing or not an object\n")
    assert not (tmp_path / "results" / "plots").exists() and not (tmp_path / "results" / "STUDY.md").exists()
    for change, problem in ((lambda values: values["recipe"].update(clfr=None), "recipe.clfr is not an object"),
                            (lambda values: values["recipe"]["clfr"].pop("target_nnz_d"),
                             "recipe.clfr is enabled without a numeric target_nnz_d")):
        values = json.loads(open(os.path.join(ROOT, "results", "runs", "probe-bm25pos-tau1-seed1",
                                              "training_log.json")).read())
        change(values)
        log.write_text(json.dumps(values))
        assert summarize.main([]) == 2  # an AttributeError, and a KeyError after two plots
        assert capsys.readouterr().err == f"error: results/runs/probe-bm25pos-tau1-seed1/training_log.json: {problem}\n"
        assert not (tmp_path / "results" / "plots").exists()
    shutil.copyfile(os.path.join(ROOT, "results", "runs", "probe-bm25pos-tau1-seed1", "training_log.json"), log)
    values = json.loads(broken.read_text())
    del values["datasets"]["nfcorpus"]["metrics"]["nnz_query"]
    values["datasets"]["nfcorpus"]["metrics"]["ndcg@10"] = None
    broken.write_text(json.dumps(values))
    assert summarize.main([]) == 2
    assert capsys.readouterr().err == ("error: results/runs/fnmask-seed1/eval_test.json: datasets.nfcorpus.metrics: "
                                       "ndcg@10, nnz_query missing or not a number\n")
    broken.write_text("[]")
    assert summarize.main([]) == 2 and "eval_test.json: not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "results" / "plots").exists() and not (tmp_path / "results" / "STUDY.md").exists()


def test_summarize_regenerates_the_committed_study_and_counts_the_dev_seeds_it_averages(tmp_path, capsys):
    """The mean row said "3 seeds" while its dev cell averaged the two seeds that had an eval_dev.json."""
    summarize = _summarize_module(tmp_path)
    assert summarize.main([]) == 0
    with open(os.path.join(ROOT, "results", "STUDY.md"), encoding="utf-8") as committed:
        assert (tmp_path / "results" / "STUDY.md").read_text(encoding="utf-8") == committed.read()
    os.remove(tmp_path / "results" / "runs" / "fnmask-seed1" / "eval_dev.json")
    assert summarize.main([]) == 0
    (row,) = [line for line in (tmp_path / "results" / "STUDY.md").read_text(encoding="utf-8").splitlines()
              if line.startswith("| mean ± std (3 seeds) | 0.25")]
    assert row.split(" | ")[1].endswith("(2 seeds)")
