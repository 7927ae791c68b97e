"""End-to-end training runs on the tiny random checkpoint: outputs, crash handling, SIGKILL + resume, DDP."""

import copy
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from fles1.training.recipe import load_recipe
from fles1.training.run import HISTORY_KEYS, TrainingSetupError, train
from fles1.training.trainer import FLES1Trainer
from fles1_encoder import FLES1Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(ROOT, "recipes", "fles1-tiny-nfcorpus.yaml")


@pytest.fixture(scope="module")
def sparse_tiny(tiny_random_checkpoint, tmp_path_factory):
    """The tiny random model with a negative output bias: a few hundred active terms per text, like a trained
    SPLADE model, instead of ~29k (which makes every step dense and slow)."""
    from transformers import AutoTokenizer

    from fles1.checkpoint import save_checkpoint
    from modeling_fles1 import FLES1ForMaskedLM

    model = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint)
    with torch.no_grad():
        model.cls.predictions.bias.fill_(-0.35)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_checkpoint)
    return save_checkpoint(model, tokenizer, str(tmp_path_factory.mktemp("fles1-sparse-tiny")))


def tiny_overrides(model_dir, data_dir, **extra):
    return {
        "model.path": model_dir, "data.source": data_dir, "model.query_max_length": 12,
        "model.document_max_length": 24, "training.per_device_train_batch_size": 4, "training.logging_steps": 1,
        "training.save_steps": 2, "training.save_total_limit": None, "clfr.interval_steps": 2,
        "clfr.target_nnz_d": 50, "clfr.gain": 0.5, "training.disable_tqdm": True, **extra,
    }


def test_short_run_writes_checkpoint_log_and_plots(sparse_tiny, msmarco_toy_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    out = str(tmp_path / "run")
    log = train(recipe, out, max_steps=4)
    on_disk = json.load(open(os.path.join(out, "training_log.json")))
    assert on_disk == json.loads(json.dumps(log))
    assert set(on_disk) == {"recipe", "seed", "global_step", "train_runtime_s", "history", "clfr", "crashes", "eval",
                            "model_fingerprint"}
    # the model it saved, as eval's results name it: the card pairs a log with its results by it
    from fles1.evaluation import model_fingerprint

    assert on_disk["model_fingerprint"] == model_fingerprint(out)
    assert on_disk["global_step"] == 4 and [row["step"] for row in on_disk["history"]] == [1, 2, 3, 4]
    # the card takes paths that were local at training time for what they are, wherever it is written
    assert on_disk["recipe"]["resolved"]["local_paths"] == ["model.path", "data.source"]
    # what a torchrun of N processes trained: the recipe's per-device batch alone did not say
    assert (on_disk["recipe"]["resolved"]["world_size"], on_disk["recipe"]["resolved"]["global_batch_size"]) == (1, 4)
    assert all(set(row) == set(HISTORY_KEYS) and row["nnz_doc"] > 0 for row in on_disk["history"])
    assert set(on_disk["crashes"]) == {"non_finite_loss", "non_finite_grad", "loss_spike", "nnz_collapse", "total"}
    assert [row["step"] for row in on_disk["clfr"]] == [2, 4]
    # the model starts far denser than 50 non-zeros: lambda_d goes up at each adjustment
    assert all(row["lambda_d_after"] > row["lambda_d_before"] for row in on_disk["clfr"])
    # each row shows the lambda_d its step trained with: an adjustment shows from the next step on
    rows = {row["step"]: row for row in on_disk["history"]}
    assert [rows[step]["lambda_d"] for step in (2, 3, 4)] == [on_disk["clfr"][0]["lambda_d_before"],
                                                               on_disk["clfr"][0]["lambda_d_after"],
                                                               on_disk["clfr"][1]["lambda_d_before"]]
    for name in ("loss.png", "nnz.png", "lambda_d.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    # the lambda_d plot shows the last step's adjustment too (no history row trains with it)
    from fles1.training.plots import plot_series

    label, xs, ys, _ = plot_series(on_disk)["lambda_d.png"][1][-1]
    assert label.startswith("CLFR adjustment") and xs == [2, 4]
    assert ys == [row["lambda_d_after"] for row in on_disk["clfr"]]
    assert ys[-1] not in {row["lambda_d"] for row in rows.values()}
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(out)
    trained = load_file(os.path.join(out, "model.safetensors"))
    start = load_file(os.path.join(sparse_tiny, "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert isinstance(encoder.encode("a query about cells", kind="query"), dict)



def test_logged_loss_parts_add_up_to_the_loss_under_gradient_accumulation(sparse_tiny, msmarco_toy_dir, tmp_path):
    """The parts were averaged per micro-batch, transformers' loss per optimizer step: in an epoch's short last step
    (100 rows, batches of 8, 2 per step: step 7 has one) loss_contrastive came out above the loss itself."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{
        "training.per_device_train_batch_size": 8, "training.gradient_accumulation_steps": 2,
        "training.logging_steps": 2, "training.save_steps": 100, "clfr.interval_steps": 100}))
    history = train(recipe, str(tmp_path / "run"), max_steps=8)["history"]
    assert [row["step"] for row in history] == [2, 4, 6, 8]
    for row in history:
        parts = row["loss_contrastive"] + row["loss_reg_d"] + row["loss_reg_q"] + row["loss_anticollapse"]
        assert parts == pytest.approx(row["loss"], rel=1e-5), row
    # the logged loss is the log window's (it survives a resume): per optimizer step, as transformers' own
    from fles1.training.run import build_trainer

    trainer = build_trainer(recipe, str(tmp_path / "again"), max_steps=8)
    output = trainer.train()
    rows = [row for row in trainer.state.log_history if "loss_contrastive" in row]
    assert [row["loss"] for row in rows] == [row["loss"] for row in history]
    assert sum(row["loss"] for row in rows) / len(rows) == pytest.approx(output.training_loss, rel=1e-5)


def test_failing_dev_evaluation_keeps_the_training_log_and_plots(sparse_tiny, msmarco_toy_dir, tmp_path, monkeypatch):
    import fles1.training.run as run

    def broken(output_dir, recipe, skipped=None):
        raise MemoryError("the dev corpus did not fit")

    monkeypatch.setattr(run, "evaluate_dev", broken)
    out = str(tmp_path / "run")
    with pytest.raises(MemoryError):
        train(load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir)), out, max_steps=2, eval_dev=True)
    on_disk = json.load(open(os.path.join(out, "training_log.json")))  # written before the evaluation started
    assert on_disk["global_step"] == 2 and on_disk["eval"] == {}
    assert all(os.path.isfile(os.path.join(out, name)) for name in ("loss.png", "nnz.png", "lambda_d.png"))

class NaNOnStep2(FLES1Trainer):
    """Injects non-finite query vectors (hence a NaN loss) into the second optimizer step."""

    def encode(self, model, query, documents):
        queries, docs = super().encode(model, query, documents)
        if self.state.global_step == 1:
            queries = queries * float("nan")
        return queries, docs


def test_non_finite_loss_is_skipped_counted_and_training_continues(sparse_tiny, msmarco_toy_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    out = str(tmp_path / "nan")
    log = train(recipe, out, max_steps=4, trainer_class=NaNOnStep2)
    assert log["crashes"]["non_finite_loss"] == 1 and log["crashes"]["total"] >= 1
    assert log["global_step"] == 4

    def no_bare_nan(name):
        raise ValueError(f"training_log.json holds a bare {name}")

    with open(os.path.join(out, "training_log.json")) as handle:  # strict JSON: NaN is null
        on_disk = json.loads(handle.read(), parse_constant=no_bare_nan)
    rows = {row["step"]: row for row in on_disk["history"]}
    # the NaN step's loss is logged as what it was (transformers would show the window's finite mean, here 0.0)
    assert rows[2]["loss"] is None and rows[1]["loss"] > 0 and rows[3]["loss"] > 0
    # CLFR's measurement over steps 1-2 leaves the NaN batch out: it is step 1's documents alone
    assert on_disk["clfr"][0]["measured_nnz"] == pytest.approx(rows[1]["nnz_doc"], rel=1e-12)
    # the skipped step left the weights exactly as checkpoint-2's predecessor: compare step 1 -> step 2 states
    weights = {step: load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors")) for step in (2, 4)}
    assert all(torch.isfinite(t).all() for t in weights[4].values())
    assert any(not torch.equal(weights[2][k], weights[4][k]) for k in weights[2])  # steps 3-4 did update


class InfOnStep2(FLES1Trainer):
    """An infinite (not NaN) regularizer, hence an infinite loss, in the second optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain = self.regularizer
        self.regularizer = lambda vectors: plain(vectors) * (float("inf") if self.state.global_step == 1 else 1.0)


def test_an_infinite_loss_step_is_logged_as_nan_like_a_nan_step(sparse_tiny, msmarco_toy_dir, tmp_path):
    """A NaN batch makes its row NaN by itself, an inf batch does not: without the non-finite count's override the
    row of a skipped inf step showed loss inf, as if it had trained (only NaN says the window diverged)."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    log = train(recipe, str(tmp_path / "inf"), max_steps=3, trainer_class=InfOnStep2)
    assert log["crashes"]["non_finite_loss"] == 1 and log["global_step"] == 3
    rows = {row["step"]: row for row in log["history"]}
    assert rows[2]["loss_reg_d"] == float("inf")  # the injected step: its parts as they were
    assert math.isnan(rows[2]["loss"]) and math.isfinite(rows[1]["loss"]) and math.isfinite(rows[3]["loss"])


def test_with_clfr_off_eff_reg_is_the_fixed_lambda_d_summed_over_steps(sparse_tiny, msmarco_toy_dir, tmp_path):
    """eff_reg is the sum of lambda_d over the optimizer steps so far (CLFR's callback sums it; with CLFR off the
    trainer multiplies): logging the bare lambda_d made a CLFR-off run's eff_reg flat, so runs compared on it
    disagreed by a factor of the step."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{
        "clfr.enabled": False, "loss.lambda_d": 0.002}))
    log = train(recipe, str(tmp_path / "off"), max_steps=3)
    assert [row["step"] for row in log["history"]] == [1, 2, 3] and log["clfr"] == []
    for row in log["history"]:
        assert row["lambda_d"] == 0.002 and row["eff_reg"] == pytest.approx(0.002 * row["step"], rel=1e-12), row


def test_evaluation_batches_leave_clfr_crashes_and_the_log_window_alone(sparse_tiny, msmarco_toy_dir, tmp_path):
    """Trainer's evaluation loss goes through compute_loss too: its batches counted as training non-zeros for
    CLFR, as losses for the crash monitor and in the logged window."""
    from fles1.training.run import build_trainer

    trainer = build_trainer(load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir)), str(tmp_path))
    # on the model's device, as the Trainer prepares every batch before compute_loss
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
    assert trainer.clfr.nnz_count == 0 and trainer.crash_monitor._nnz_count == 0 and not trainer.log_window.sums
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert trainer.clfr.nnz_count == 4 * 8 and trainer.crash_monitor._nnz_count == 4 * 8 and trainer.log_window.sums


@pytest.mark.parametrize("regularizer", ["flops", "l1_flops"])
def test_the_recipes_loss_settings_reach_every_loss_part(sparse_tiny, msmarco_toy_dir, tmp_path, regularizer):
    """Each part recomputed from the batch's vectors with the recipe's values: a trainer that kept tau at 0.05, ran
    L1 FLOPS for 'flops', regularized the queries instead of the documents, or dropped the anti-collapse settings
    passed every other test."""
    from fles1.training.losses import info_nce
    from fles1.training.regularizers import anti_collapse, get_regularizer
    from fles1.training.run import build_trainer

    settings = {"loss.temperature": 0.7, "loss.regularizer": regularizer, "loss.lambda_d": 0.002,
                "loss.lambda_q": 0.003, "loss.anticollapse_weight": 0.5, "loss.anticollapse_min_mass": 1e4,
                "clfr.enabled": False}
    trainer = build_trainer(load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **settings)),
                            str(tmp_path))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(trainer.model, batch)
    torch.manual_seed(0)  # the same dropout masks
    regularize = get_regularizer(regularizer)
    with torch.no_grad():
        queries, documents = trainer.encode(trainer.model, batch["query"], batch["documents"])
        expected = {
            "loss_contrastive": info_nce(queries, documents, documents.shape[0] // queries.shape[0], 0.7),
            "loss_reg_d": 0.002 * regularize(documents),
            "loss_reg_q": 0.003 * regularize(queries),
            "loss_anticollapse": 0.5 * anti_collapse(documents, 1e4),
        }
    assert float(expected["loss_anticollapse"]) > 0 and float(expected["loss_reg_d"]) != float(expected["loss_reg_q"])
    for name, value in expected.items():
        assert trainer.log_window.sums[name] == pytest.approx(float(value), rel=1e-5), name
    assert loss.item() == pytest.approx(float(sum(expected.values())), rel=1e-5)


def test_the_false_negative_mask_reaches_the_contrastive_loss(sparse_tiny, msmarco_toy_dir, tmp_path):
    """Dropping the batch's mask in compute_loss passed every test (the collator and info_nce were tested apart):
    data.mask_false_negatives would have masked nothing."""
    from fles1.training.losses import info_nce
    from fles1.training.run import build_trainer

    trainer = build_trainer(load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir,
                                                                     **{"clfr.enabled": False})), str(tmp_path))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()  # (the log window counts training batches only)
    rows, group_size = len(batch["query"]["input_ids"]), len(batch["documents"]["input_ids"]) // 4
    mask = torch.zeros(rows, rows * group_size, dtype=torch.bool)
    mask[0, group_size] = True  # query 0's score against query 1's positive: a judged-relevant document
    torch.manual_seed(0)
    trainer.compute_loss(trainer.model, {**batch, "false_negatives": mask})
    torch.manual_seed(0)  # the same dropout masks
    with torch.no_grad():
        queries, documents = trainer.encode(trainer.model, batch["query"], batch["documents"])
    masked = float(info_nce(queries, documents, group_size, trainer.temperature, mask))
    assert masked != pytest.approx(float(info_nce(queries, documents, group_size, trainer.temperature)), rel=1e-6)
    assert trainer.log_window.sums["loss_contrastive"] == pytest.approx(masked, rel=1e-5)


class _InterruptedWhileSaving(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt  # after transformers' save and rotation, before the FLES-1 callbacks' on_save


class InterruptedWhileSavingStep4(FLES1Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, callbacks=[_InterruptedWhileSaving()], **kwargs)


class InterruptedAtTheStart(FLES1Trainer):
    def train(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_interrupted_save_with_save_total_limit_still_resumes(sparse_tiny, msmarco_toy_dir, tmp_path):
    """save_total_limit=1: transformers deletes checkpoint-2 as soon as checkpoint-4's trainer_state.json is
    written; the CLFR and crash states came after (on_save), so a kill there left nothing to resume."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir,
                                                     **{"training.save_total_limit": 1}))
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out, max_steps=6, trainer_class=InterruptedWhileSavingStep4)
    assert sorted(os.listdir(out)) == ["checkpoint-4"]
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as handle:
        seconds_to_step_4 = json.load(handle)["stateful_callbacks"]["fles1/train_runtime_s"]["seconds"]
    with pytest.warns(UserWarning, match=r"--trace-nnz: the trace holds only this process.s steps \(after .*checkpoint-4\)"):
        log = train(recipe, out, resume_from_checkpoint=True, max_steps=6, trace_nnz=True)
    assert log["global_step"] == 6 and [row["step"] for row in log["clfr"]] == [2, 4, 6]
    with open(os.path.join(out, "nnz_trace_rank0.json")) as handle:
        assert sorted({row["step"] for row in json.load(handle)}) == [5, 6]
    # the runtime counts steps 1-4 (the interrupted process) and 5-6, not only the resumed process's
    assert 0 < seconds_to_step_4 < log["train_runtime_s"]


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(sparse_tiny, msmarco_toy_dir, tmp_path):
    """A fresh run in a used folder kept the old run's checkpoints (which --resume then picked up: another run's
    weights) and its plots beside the new log."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    out = str(tmp_path / "run")
    train(recipe, out, max_steps=4)
    with pytest.raises(TrainingSetupError, match=r"holds an earlier run \(checkpoint-2, checkpoint-4, lambda_d.png, "
                                                 r"loss.png, \.\.\.\); .*--resume continues it, --overwrite"):
        train(recipe, out, max_steps=2)
    with pytest.raises(TrainingSetupError, match="choose one"):
        train(recipe, out, resume_from_checkpoint=True, overwrite=True)
    # fine-tuning a checkpoint of the folder's run into it with --overwrite: the checkpoint would be deleted after
    # loading (its license file then missing from every save)
    with pytest.raises(TrainingSetupError, match=r"model\.path=.*checkpoint-4' is inside output_dir's earlier run "
                                                 r"\(checkpoint-4\), which --overwrite removes"):
        train({**recipe, "model": {**recipe["model"], "path": os.path.join(out, "checkpoint-4")}}, out, max_steps=2,
              overwrite=True)
    # the output folder itself named to --resume is --resume (it was "another run's checkpoint": --overwrite)
    with pytest.raises(TrainingSetupError, match="choose one"):
        train(recipe, out, resume_from_checkpoint=out, overwrite=True)
    with pytest.raises(TrainingSetupError, match=r"checkpoint-4: it is at step 4 and this run ends at step 4"):
        train(recipe, out, resume_from_checkpoint=out, max_steps=4)
    # a mistyped checkpoint is not "another run's checkpoint" (whose advice, --overwrite, removes the folder's run)
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-44: no such folder$"):
        train(recipe, out, resume_from_checkpoint=os.path.join(out, "checkpoint-44"), max_steps=6)
    # an overwrite interrupted before its first checkpoint: the old run's checkpoints, log and plots are gone, its
    # model still loads (it had left config.json and the tokenizer without weights)
    finished = load_file(os.path.join(out, "model.safetensors"))
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out, max_steps=2, overwrite=True, trainer_class=InterruptedAtTheStart)
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint-") or name.endswith((".png", "log.json"))]
    encoder = FLES1Encoder.from_pretrained(out)
    assert all(torch.equal(tensor, encoder.model.state_dict()[name]) for name, tensor in finished.items())
    # no checkpoint to resume: the refusal says --overwrite (not "--resume continues it", which had nothing to continue)
    with pytest.raises(TrainingSetupError, match=r"holds an earlier run's model \(model.safetensors\) and no checkpoint "
                                                 r"to resume .*: --overwrite replaces it"):
        train(recipe, out, max_steps=2)
    log = train(recipe, out, max_steps=2, overwrite=True)
    assert log["global_step"] == 2 and not os.path.exists(os.path.join(out, "checkpoint-4"))
    assert json.load(open(os.path.join(out, "training_log.json")))["global_step"] == 2
    # a sharded model counts as one (its shards were replaced without --overwrite)
    sharded = tmp_path / "sharded"
    FLES1Encoder.from_pretrained(sparse_tiny).model.save_pretrained(str(sharded), max_shard_size="300KB")
    shards = sorted(name for name in os.listdir(sharded) if name.startswith("model"))
    assert "model.safetensors.index.json" in shards
    with pytest.raises(TrainingSetupError, match=rf"holds an earlier run's model \({shards[0]}, "):
        train(recipe, str(sharded), max_steps=2)
    assert sorted(name for name in os.listdir(sharded) if name.startswith("model")) == shards


def test_an_output_dir_in_use_by_another_run_is_refused(sparse_tiny, msmarco_toy_dir, tmp_path):
    """Two runs started into one new folder both found it empty, wrote their checkpoints, weights and logs over each
    other's, and both exited 0: the folder is held by the run using it."""
    import fcntl

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    out = tmp_path / "run"
    out.mkdir()
    other_run = os.open(out, os.O_RDONLY)  # the lock another training process holds
    try:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingSetupError, match=r"output_dir .*run is in use by another training run"):
            train(recipe, str(out), max_steps=1)
        assert os.listdir(out) == []
    finally:
        os.close(other_run)
    assert train(recipe, str(out), max_steps=1)["global_step"] == 1  # released: the folder is free again
    # a folder the run made and wrote nothing into is removed when setup fails
    with pytest.raises(TrainingSetupError):
        train(load_recipe(TINY_RECIPE, tiny_overrides(str(tmp_path / "no-model"), msmarco_toy_dir)),
              str(tmp_path / "fresh"), max_steps=1)
    assert not os.path.exists(tmp_path / "fresh")


def test_clfr_leaving_float_range_mid_run_is_one_error_naming_what_stays(sparse_tiny, msmarco_toy_dir, tmp_path,
                                                                         monkeypatch):
    """The controller's error escaped trainer.train(): a traceback and exit 1 from the CLI (which prints a
    TrainingSetupError as one line, exit 2), maybe hours into the run."""
    from fles1.training.clfr import CLFRController, CLFRDiverged

    def diverge(self, measured_nnz, step):
        raise CLFRDiverged(f"lambda_d left float range (1e+308 -> inf) at step {step}: ...")

    monkeypatch.setattr(CLFRController, "update", diverge)
    out = str(tmp_path / "run")
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"clfr.interval_steps": 1}))
    with pytest.raises(TrainingSetupError, match=r"^CLFR: lambda_d left float range \(1e\+308 -> inf\) at step 1: "
                                                 rf"\.\.\.; the checkpoints so far stay in {re.escape(out)}\."):
        train(recipe, out, max_steps=2)


def test_a_batch_larger_than_the_data_fails_before_the_model_loads(msmarco_toy_dir, tmp_path, monkeypatch):
    """It was found by FLES1Trainer, after the model (bert-base: seconds to minutes) had loaded."""
    import fles1.training.run as run

    def no_model(path):
        raise AssertionError("the model was loaded before the batch size was checked")

    monkeypatch.setattr(run, "load_model_for_training", no_model)
    recipe = load_recipe(TINY_RECIPE, {"model.path": "m", "data.source": msmarco_toy_dir, "data.max_examples": 3})
    with pytest.raises(TrainingSetupError, match=r"batch size 32 x 1 rank\(s\) is larger than the dataset \(3 exa"):
        train(recipe, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def _listing(folder):
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}


def test_resuming_another_runs_checkpoint_into_a_used_folder_needs_overwrite(sparse_tiny, msmarco_toy_dir, tmp_path):
    """--resume PATH of run A with an --output-dir holding run B replaced B's log, weights and plots and rotated its
    checkpoints away: a mix of two runs."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    first, used = str(tmp_path / "first"), tmp_path / "used"
    train(recipe, first, max_steps=2)
    (used / "checkpoint-9").mkdir(parents=True)  # what an earlier run leaves, as far as the check looks
    (used / "training_log.json").write_text("{}")
    (used / "notes.txt").write_text("not the run's")
    before = _listing(used)
    checkpoint = os.path.join(first, "checkpoint-2")
    with pytest.raises(TrainingSetupError, match=r"output_dir .*used holds an earlier run \(checkpoint-9, "
                                                 r"training_log.json\); --resume .*first/checkpoint-2 is another "
                                                 r"run's checkpoint.*--overwrite replaces the folder's run"):
        train(recipe, str(used), resume_from_checkpoint=checkpoint, max_steps=4)
    assert _listing(used) == before
    # --overwrite: the folder's run goes, the continuation of the other run takes its place
    log = train(recipe, str(used), resume_from_checkpoint=checkpoint, max_steps=4, overwrite=True)
    assert log["global_step"] == 4 and [row["step"] for row in log["clfr"]] == [2, 4]
    assert sorted(name for name in os.listdir(used) if name.startswith("checkpoint-")) == ["checkpoint-4"]
    assert (used / "notes.txt").exists() and os.path.isdir(checkpoint)
    # its own checkpoint: --overwrite would remove what it continues from
    with pytest.raises(TrainingSetupError, match="choose one"):
        train(recipe, str(used), resume_from_checkpoint=str(used / "checkpoint-4"), max_steps=6, overwrite=True)
    assert (used / "checkpoint-4" / "trainer_state.json").exists()


def test_resume_refuses_a_finished_run_and_another_models_checkpoint(sparse_tiny, msmarco_toy_dir, tmp_path):
    """A finished run resumed trained one step more (global step past max_steps); one resumed with a lower
    --max-steps trained nothing but logged a global step past it; another model size's checkpoint was a
    size-mismatch RuntimeError traceback inside trainer.train(), leaving an empty output folder."""
    from transformers import AutoTokenizer

    from configuration_fles1 import FLES1Config
    from fles1.checkpoint import save_checkpoint
    from modeling_fles1 import FLES1ForMaskedLM

    # 8 examples, batch 4, 2 epochs: the schedule ends at step 4 without any max_steps
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"data.max_examples": 8}))
    out = str(tmp_path / "run")
    assert train(recipe, out)["global_step"] == 4
    before = _listing(out)
    for max_steps, message in ((None, "it is at step 4 and this run ends at step 4"),
                               (3, "it is at step 4 and this run ends at step 3")):
        with pytest.raises(TrainingSetupError, match=rf"cannot resume from .*checkpoint-4: {message} .*nothing to "
                                                     "train; a larger --max-steps continues it"):
            train(recipe, out, resume_from_checkpoint=True, max_steps=max_steps)
    assert _listing(out) == before

    wider = FLES1ForMaskedLM(FLES1Config(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=512))
    other_model = save_checkpoint(wider, AutoTokenizer.from_pretrained(sparse_tiny), str(tmp_path / "other-model"))
    other = load_recipe(TINY_RECIPE, tiny_overrides(other_model, msmarco_toy_dir))
    fresh = tmp_path / "fresh"
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-2: its weights do not fit "
                                                 r"model\.path='.*other-model' \(\d+ tensors differ, e.g. "
                                                 r"\S+: \[\d+(, \d+)?\] there, \[\d+(, \d+)?\] here\)"):
        train(other, str(fresh), resume_from_checkpoint=os.path.join(out, "checkpoint-2"), max_steps=6)
    assert not fresh.exists()


class _OpensAFile:
    """A pickle that runs code when loaded: it would create `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_resume_loads_no_pickled_weights_or_objects(sparse_tiny, msmarco_toy_dir, tmp_path):
    """A checkpoint holding pytorch_model.bin instead of model.safetensors resumed from the pickle (transformers'
    fallback), silently; an optimizer.pt holding objects was a 30-line UnpicklingError traceback whose advice
    (weights_only=False) would have run them."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir))
    out = tmp_path / "run"
    train(recipe, str(out), max_steps=2)
    checkpoint = out / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    torch.save(weights, checkpoint / "pytorch_model.bin")
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-2: not a complete training "
                                                 r"checkpoint folder \(no model\.safetensors -- weights are resumed "
                                                 r"from safetensors only"):
        train(recipe, str(out), resume_from_checkpoint=str(checkpoint), max_steps=4)
    os.remove(checkpoint / "pytorch_model.bin")
    save_file(weights, checkpoint / "model.safetensors")
    marker = tmp_path / "the-pickle-ran"
    torch.save({"state": _OpensAFile(str(marker))}, checkpoint / "optimizer.pt")
    with pytest.raises(TrainingSetupError) as error:
        train(recipe, str(out), resume_from_checkpoint=str(checkpoint), max_steps=4)
    assert re.match(r"cannot resume from .*checkpoint-2: one of its files \(optimizer\.pt, scheduler\.pt, "
                    r"rng_state\*\.pth\) holds more than tensors and plain values, and is not loaded \(.*open",
                    str(error.value)), str(error.value)
    assert "weights_only" not in str(error.value) and not marker.exists()
    os.remove(checkpoint / "optimizer.pt")  # pruned: transformers resumed without it (and the schedule), exit 0
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-2: not a complete training "
                                                 r"checkpoint folder \(no optimizer\.pt\); a resume restores"):
        train(recipe, str(out), resume_from_checkpoint=str(checkpoint), max_steps=4)


def test_a_run_killed_while_finishing_is_finished_by_resume(sparse_tiny, msmarco_toy_dir, tmp_path):
    """Killed after its last checkpoint, while writing the final folder, log or plots: --resume refused it ("at step
    4 and this run ends at step 4: nothing to train"), and the run could never get its log, plots or card files."""
    from safetensors.torch import load_file

    # a one-epoch CLFR interval (the recipes' default): the finished log said null, resolved at train begin only
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"data.max_examples": 8,
                                                                                      "clfr.interval_steps": None}))
    out = tmp_path / "run"
    finished = train(recipe, str(out))
    assert finished["global_step"] == 4 and finished["recipe"]["resolved"]["clfr_interval_steps"] == 2
    # what a kill during save_model leaves: the final folder's later files, the plots and the log never written
    for name in ("training_log.json", "loss.png", "nnz.png", "lambda_d.png", "modules.json",
                 "sentence_bert_config.json"):
        (out / name).unlink()
    shutil.rmtree(out / "1_SpladePooling")
    (out / "model.safetensors").write_bytes(b"cut short")
    resumed = train(recipe, str(out), resume_from_checkpoint=True)
    assert resumed["finished_from"] == str(out / "checkpoint-4")
    for key in ("global_step", "history", "clfr", "crashes", "recipe", "seed"):
        assert resumed[key] == finished[key], key
    assert json.load(open(out / "training_log.json")) == json.loads(json.dumps(resumed))
    assert {"loss.png", "nnz.png", "lambda_d.png", "modules.json", "sentence_bert_config.json"} <= set(os.listdir(out))
    weights, saved = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in weights)
    before = _listing(out)
    with pytest.raises(TrainingSetupError, match="it is at step 4 and this run ends at step 4"):  # finished now
        train(recipe, str(out), resume_from_checkpoint=True)
    with pytest.raises(TrainingSetupError, match="it is at step 4 and this run ends at step 4"):  # another folder
        train(recipe, str(tmp_path / "elsewhere"), resume_from_checkpoint=str(out / "checkpoint-4"))
    assert _listing(out) == before


def test_a_log_row_spanning_the_resumed_checkpoint_matches_the_uninterrupted_run(sparse_tiny, msmarco_toy_dir,
                                                                                   tmp_path):
    """Rows every 3 steps, checkpoints every 2: the row at step 6 covers steps 4-6. Resumed from checkpoint-4 it
    covered steps 5-6 only (loss, its parts and NNZ alike), with nothing in the row to say so."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"training.logging_steps": 3}))
    full = train(recipe, str(tmp_path / "full"), max_steps=6)
    assert [row["step"] for row in full["history"]] == [3, 6]
    checkpoint = str(tmp_path / "full" / "checkpoint-4")
    resumed = train(recipe, str(tmp_path / "resumed"), resume_from_checkpoint=checkpoint, max_steps=6)
    assert resumed["history"] == full["history"]
    # a checkpoint at a logging step holds an empty window (the row took it), in its file and its trainer-state copy
    six = str(tmp_path / "full" / "checkpoint-6")
    state = json.load(open(os.path.join(six, "trainer_state.json")))["stateful_callbacks"]["fles1/log_window.json"]
    for saved in (json.load(open(os.path.join(six, "log_window.json"))), state["state"]):
        assert not any(saved.values())  # {} or zeros
    assert json.load(open(os.path.join(checkpoint, "log_window.json")))["steps"] == 1.0  # step 4 of the 4-6 row
    # rows per epoch: the epoch's row is logged after its last step's checkpoint, and takes the window then
    epochs = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{
        "data.max_examples": 8, "training.logging_strategy": "epoch", "training.num_train_epochs": 2}))
    full = train(epochs, str(tmp_path / "epochs"))
    resumed = train(epochs, str(tmp_path / "epochs-resumed"),
                    resume_from_checkpoint=str(tmp_path / "epochs" / "checkpoint-2"))
    # (the epoch-1 row itself was logged after checkpoint-2's trainer state was written: transformers' history
    # resumed from there lacks it)
    assert [row["step"] for row in full["history"]] == [2, 4] and resumed["history"] == full["history"][1:]
    row = full["history"][1]
    assert row["loss"] == pytest.approx(row["loss_contrastive"] + row["loss_reg_d"] + row["loss_reg_q"]
                                        + row["loss_anticollapse"], rel=1e-6)
    # a checkpoint written before the window was saved resumes too, from an empty window
    os.remove(os.path.join(checkpoint, "log_window.json"))
    state_path = os.path.join(checkpoint, "trainer_state.json")
    state = json.load(open(state_path))
    del state["stateful_callbacks"]["fles1/log_window.json"]
    json.dump(state, open(state_path, "w"))
    older = train(recipe, str(tmp_path / "older"), resume_from_checkpoint=checkpoint, max_steps=6)
    assert [row["step"] for row in older["history"]] == [3, 6] and older["history"][1] != full["history"][1]


class CountingRowSteps(FLES1Trainer):
    """Records how many steps each log row averages (its window's step count)."""

    row_steps: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        take = self.log_window.take

        def counted(device=None):
            totals = take(device)
            CountingRowSteps.row_steps.append(totals["steps"])
            return totals

        self.log_window.take = counted


def test_under_epoch_logging_a_mid_epoch_checkpoint_keeps_its_window(sparse_tiny, msmarco_toy_dir, tmp_path):
    """With rows per epoch only an epoch's last checkpoint hands its window to the row that follows it: a checkpoint
    saved inside an epoch (3 steps an epoch, saves every 2) kept an empty window too, so a run resumed from
    checkpoint-4 logged an epoch-2 row over steps 5-6 instead of 4-6. (Counted, not compared with the full run's
    row: transformers 5.9 draws another order for the rest of a later epoch resumed mid-way.)"""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{
        "data.max_examples": 12, "training.logging_strategy": "epoch", "training.num_train_epochs": 2}))
    CountingRowSteps.row_steps = []
    full = train(recipe, str(tmp_path / "full"), trainer_class=CountingRowSteps)
    assert [row["step"] for row in full["history"]] == [3, 6] and CountingRowSteps.row_steps == [3.0, 3.0]
    checkpoint = str(tmp_path / "full" / "checkpoint-4")
    assert json.load(open(os.path.join(checkpoint, "log_window.json")))["steps"] == 1.0  # step 4 of the 4-6 row
    CountingRowSteps.row_steps = []
    resumed = train(recipe, str(tmp_path / "resumed"), resume_from_checkpoint=checkpoint, trainer_class=CountingRowSteps)
    assert [row["step"] for row in resumed["history"]] == [3, 6] and CountingRowSteps.row_steps == [3.0]


def test_resume_refuses_a_save_only_model_checkpoint_and_takes_gradient_checkpointing(sparse_tiny, msmarco_toy_dir,
                                                                                       tmp_path):
    """A save_only_model checkpoint holds no optimizer, scheduler or RNG state: the resume restarted them (step 3
    at the first step's learning rate) and exited 0. Gradient checkpointing, a memory-only setting, was refused."""
    base = tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"data.max_examples": 8})
    only_model = load_recipe(TINY_RECIPE, {**base, "training.save_only_model": True})
    out = str(tmp_path / "only-model")
    train(only_model, out, max_steps=2)
    assert not os.path.exists(os.path.join(out, "checkpoint-2", "optimizer.pt"))
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-2: its run saved with "
                                                 r"training.save_only_model, so it holds no optimizer"):
        train(only_model, str(tmp_path / "continued"), resume_from_checkpoint=os.path.join(out, "checkpoint-2"),
              max_steps=4)
    full = str(tmp_path / "full")
    train(load_recipe(TINY_RECIPE, base), full, max_steps=2)
    lighter = load_recipe(TINY_RECIPE, {**base, "training.gradient_checkpointing": True})
    with pytest.warns(UserWarning, match="run was scheduled for 2 steps and this one ends at step 4"):
        assert train(lighter, full, resume_from_checkpoint=True, max_steps=4)["global_step"] == 4


def test_resume_refuses_a_changed_recipe_and_takes_a_later_end(sparse_tiny, msmarco_toy_dir, tmp_path, monkeypatch):
    """A resume with --set training.learning_rate=1e-3 loss.temperature=1.0 ran: the learning rate never applied
    (the scheduler came back from the checkpoint), the temperature applied from the resumed step on, and the log
    and the card recorded both for the whole run."""
    shutil.copytree(msmarco_toy_dir, tmp_path / "data" / "toy")
    monkeypatch.chdir(tmp_path / "data")
    base = tiny_overrides(sparse_tiny, "toy", **{"data.max_examples": 8})  # a path relative to this folder
    out = str(tmp_path / "run")
    train(load_recipe(TINY_RECIPE, base), out, max_steps=2)
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["stateful_callbacks"]["fles1/recipe"]["recipe"]["loss"]["temperature"] == 0.05
    before = _listing(out)
    changed = load_recipe(TINY_RECIPE, {**base, "training.learning_rate": 1e-3, "loss.temperature": 1.0})
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*checkpoint-2: the recipe differs from the one "
                                                 r"its run was started with \(loss\.temperature 0\.05 -> 1\.0; "
                                                 r"training\.learning_rate 2e-05 -> 0\.001\)"):
        train(changed, out, resume_from_checkpoint=True, max_steps=4)
    assert _listing(out) == before
    # when the run ends and how it logs may change; the same data named from another folder is the same data; a
    # training key written out at TrainingArguments' default changes nothing
    monkeypatch.chdir(tmp_path)
    later = load_recipe(TINY_RECIPE, {**base, "data.source": os.path.join("data", "toy"), "training.logging_steps": 2,
                                      "training.num_train_epochs": 3, "training.adam_beta1": 0.9,
                                      "training.save_strategy": "steps"})
    # a run scheduled for 2 steps continued to 4: step 3 trains at the checkpoint's last learning rate (0 at the end
    # of the linear decay), then a 4-step schedule: neither run's, silently
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # (transformers 5.9's remove_handler asserts the opposite)
    library_logger.addHandler(handler)
    try:
        with pytest.warns(UserWarning, match=r"checkpoint-2's run was scheduled for 2 steps and this one ends at step "
                                             r"4: the learning rate resumes from the checkpoint's \(step 3 trains at "
                                             r"it\) and then follows a linear schedule over 4 steps"):
            assert train(later, out, resume_from_checkpoint=True, max_steps=4)["global_step"] == 4
    finally:
        library_logger.removeHandler(handler)
    # the checkpoint holds the tied decoder once: transformers warned of "missing keys" on every resume
    assert not [record for record in records if "missing keys" in record.getMessage()], records
    history = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))["log_history"]
    assert [row["learning_rate"] for row in history if "learning_rate" in row][2] == 0.0  # what the warning says
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))
    assert state["stateful_callbacks"]["fles1/recipe"]["recipe"]["training"]["logging_steps"] == 1  # the run's
    # a checkpoint from before runs recorded their recipe is not compared
    del state["stateful_callbacks"]["fles1/recipe"]
    json.dump(state, open(os.path.join(out, "checkpoint-4", "trainer_state.json"), "w"))
    changed = load_recipe(TINY_RECIPE, {**base, "data.source": os.path.join("data", "toy"), "loss.temperature": 1.0})
    assert train(changed, out, resume_from_checkpoint=True, max_steps=5)["global_step"] == 5


def test_nan_step_leaves_weights_untouched(sparse_tiny, msmarco_toy_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir,
                                                     **{"training.save_steps": 1}))
    out = str(tmp_path / "nan1")
    train(recipe, out, max_steps=2, trainer_class=NaNOnStep2)
    before = load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))
    after = load_file(os.path.join(out, "checkpoint-2", "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)



# callback states as the callbacks write them (resolve_resume reads what their load_state_dict needs)
SAVED_STATES = {"crash_state.json": {"counts": {"loss_spike": 0}, "recent_losses": [1.5], "events": []},
                "clfr_state.json": {"lambda_d": 3e-5, "history": [], "interval_steps": 2, "nnz_sum": 0.0,
                                    "nnz_count": 0.0, "eff_reg": 6e-5}}


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    from fles1.training.trainer import resolve_resume

    out = tmp_path / "run"
    contents = {2: ["model.safetensors", "trainer_state.json", "crash_state.json", "clfr_state.json"],
                4: ["model.safetensors", "trainer_state.json", "crash_state.json"],  # killed before the CLFR state
                6: ["model.safetensors"],  # killed while saving the optimizer
                8: ["model.safetensors", "trainer_state.json", "crash_state.json", "clfr_state.json"]}
    for step, names in contents.items():
        (out / f"checkpoint-{step}").mkdir(parents=True)
        for name in names:
            (out / f"checkpoint-{step}" / name).write_text(json.dumps(SAVED_STATES.get(name, {"global_step": step})))
        save_file({"weight": torch.zeros(1)}, out / f"checkpoint-{step}" / "model.safetensors")
    # transformers writes trainer_state.json in place: killed mid-write (a bare JSON error stopped --resume)
    (out / "checkpoint-8" / "trainer_state.json").write_text('{"best_global_step": null, "best_metric')
    with pytest.warns(UserWarning) as caught:
        assert resolve_resume(True, str(out), ["crash_state.json", "clfr_state.json"]) == str(out / "checkpoint-2")
    assert [str(w.message).split(" is incomplete")[0] for w in caught] == [
        str(out / f"checkpoint-{step}") for step in (8, 6, 4)]
    assert "no readable trainer_state.json: interrupted while saving" in str(caught[0].message)
    assert "no clfr_state.json: interrupted while saving" in str(caught[2].message)
    shutil.rmtree(out / "checkpoint-8")
    with pytest.warns(UserWarning, match="checkpoint-6 is incomplete"):  # CLFR off: checkpoint-4 is complete
        assert resolve_resume(True, str(out), ["crash_state.json"]) == str(out / "checkpoint-4")
    with pytest.raises(ValueError, match=r"checkpoint-4: not a complete training checkpoint folder \(no "
                                         r"clfr_state.json\)$"):
        resolve_resume(str(out / "checkpoint-4"), str(out), ["crash_state.json", "clfr_state.json"])
    # a state file or config.json that does not parse, or a trainer state without its step: a traceback (exit 1)
    # inside train(), and --resume took that checkpoint rather than the one before
    (out / "checkpoint-4" / "clfr_state.json").write_text(json.dumps(SAVED_STATES["clfr_state.json"]))
    # ... or that parses but lacks what the callback reads (hand-edited): a KeyError inside train()
    without_lambda = {key: value for key, value in SAVED_STATES["clfr_state.json"].items() if key != "lambda_d"}
    for name, text in (("crash_state.json", '{"counts": {"non_fin'), ("config.json", '{"model_type": "fl'),
                       ("log_window.json", '{"loss": 1.'), ("clfr_state.json", json.dumps(without_lambda)),
                       ("clfr_state.json", json.dumps({**SAVED_STATES["clfr_state.json"], "lambda_d": "3e-5"})),
                       ("crash_state.json", json.dumps({**SAVED_STATES["crash_state.json"], "counts": [0]})),
                       ("log_window.json", '{"loss": "1.5"}'),
                       ("trainer_state.json", "[]"), ("trainer_state.json", '{"global_step": "4"}'),
                       ("clfr_state.json", "\udcff")):
        path = out / "checkpoint-4" / name
        kept = path.read_text() if path.exists() else None
        path.write_text(text, errors="surrogateescape")
        with pytest.warns(UserWarning, match=rf"checkpoint-4 is incomplete \(no readable {re.escape(name)}: "):
            assert resolve_resume(True, str(out), ["crash_state.json", "clfr_state.json"]) == str(out / "checkpoint-2")
        if kept is None:
            path.unlink()
        else:
            path.write_text(kept)
    assert resolve_resume(True, str(out), ["crash_state.json", "clfr_state.json"]) == str(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-2" / "clfr_state.json").unlink()
    with pytest.raises(ValueError, match="nothing to resume: no checkpoint-\\* folder in .* is complete .*; start the "
                                         "run again \\(train_fles1.py --overwrite replaces the folder\\)"):
        resolve_resume(True, str(out), ["crash_state.json", "clfr_state.json"])


def test_resume_wants_the_optimizer_scheduler_and_rng_states_whole(tmp_path):
    """A checkpoint without optimizer.pt or scheduler.pt (pruned to save disk: twice the model) resumed, exit 0:
    transformers then skips both -- AdamW's moments and the learning-rate schedule started over (step 5 at 2e-5
    instead of 6.7e-6) -- and without rng_state.pth the data order; one cut short was a traceback from
    torch.load (exit 1), a cut model.safetensors one from safetensors."""
    from fles1.training.trainer import resolve_resume

    out = tmp_path / "run"
    whole = ["trainer_state.json", "crash_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"]
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in whole:
            if name.endswith((".pt", ".pth")):
                torch.save({"step": step}, folder / name)
            else:
                (folder / name).write_text(json.dumps(SAVED_STATES.get(name, {"global_step": step})))
        save_file({"weight": torch.zeros(4)}, folder / "model.safetensors")
    newest = out / "checkpoint-4"
    assert resolve_resume(True, str(out), ["crash_state.json"], optimizer_state=True) == str(newest)
    for damage, says in (("optimizer.pt", "no optimizer.pt"), ("scheduler.pt", "no scheduler.pt"),
                         ("rng_state.pth", "no rng_state.pth"), ("optimizer.pt cut", "no readable optimizer.pt"),
                         ("model.safetensors cut", "no readable model.safetensors"),
                         # torch.load checks no CRC: garbled tensor data resumed, exit 0, NaN weights
                         ("optimizer.pt garbled", "no readable optimizer.pt"),
                         ("scheduler.pt garbled", "no readable scheduler.pt"),
                         ("rng_state.pth garbled", "no readable rng_state.pth")):
        name = damage.split()[0]
        kept = (newest / name).read_bytes()
        if damage.endswith("cut"):
            (newest / name).write_bytes(kept[: len(kept) // 2])
        elif damage.endswith("garbled"):
            with zipfile.ZipFile(newest / name) as archive:  # inside the first member's data (its pickle)
                offset = archive.infolist()[0].header_offset
            name_length, extra_length = struct.unpack("<HH", kept[offset + 26:offset + 30])  # its local header
            start = offset + 30 + name_length + extra_length
            (newest / name).write_bytes(kept[:start + 4] + bytes(255 - b for b in kept[start + 4:start + 8])
                                        + kept[start + 8:])
        else:
            (newest / name).unlink()
        with pytest.raises(ValueError) as error:
            resolve_resume(str(newest), str(out), ["crash_state.json"], optimizer_state=True)
        assert f"cannot resume from {newest}: not a complete training checkpoint folder ({says})" in str(error.value)
        # the states alone missing: the weights are whole, a new run can start from them
        assert ("start a new run from its weights (--model" in str(error.value)) == ("model" not in damage)
        with pytest.warns(UserWarning, match=f"checkpoint-4 is incomplete \\({says}: interrupted while saving, or a "
                                             "file removed since\\); resuming from .*checkpoint-2"):
            assert resolve_resume(True, str(out), ["crash_state.json"], optimizer_state=True) == str(out / "checkpoint-2")
        (newest / name).write_bytes(kept)
    # saved without CRCs (torch.serialization.set_crc32_options(False)): torch loads it, so does the check
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"step": 4, "state": torch.arange(8.0)}, newest / "optimizer.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert resolve_resume(str(newest), str(out), ["crash_state.json"], optimizer_state=True) == str(newest)
    # a DDP run's, one per rank: another set than this run's (a run of 2 resumed on 1 or 4 processes, a kill between
    # two ranks' saves) resumes with check_resumable's warning (the optimizer and schedule restored, not each RNG)
    (newest / "rng_state.pth").rename(newest / "rng_state_0.pth")
    for world_size in (1, 2, 4):
        assert resolve_resume(True, str(out), ["crash_state.json"], True, world_size) == str(newest)
    (newest / "rng_state_0.pth").unlink()
    with pytest.raises(ValueError, match=r"\(no rng_state_0\.pth / rng_state_1\.pth\); a resume restores"):
        resolve_resume(str(newest), str(out), ["crash_state.json"], optimizer_state=True, world_size=2)
    for name in ("optimizer.pt", "scheduler.pt"):  # save_only_model: weights only, by design
        (newest / name).unlink()
    assert resolve_resume(str(newest), str(out), ["crash_state.json"]) == str(newest)


def test_a_resume_on_another_number_of_processes_warns_that_the_rng_states_do_not_come_back(sparse_tiny,
                                                                                            msmarco_toy_dir, tmp_path):
    """A DDP run's checkpoint (rng_state_0.pth, ...) resumed on one process: transformers restores the optimizer and
    schedule and skips the RNG with an info line -- a resume that does not continue the run exactly, silently."""
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **{"data.max_examples": 8}))
    out = tmp_path / "run"
    train(recipe, str(out), max_steps=2)
    (out / "checkpoint-2" / "rng_state.pth").rename(out / "checkpoint-2" / "rng_state_0.pth")
    with pytest.warns(UserWarning, match=r"checkpoint-2 holds the RNG states rng_state_0\.pth and this run of 1 "
                                         r"process\(es\) needs rng_state\.pth: the optimizer and schedule resume"):
        assert train(recipe, str(out), resume_from_checkpoint=True, max_steps=3)["global_step"] == 3
    # a two-process run's checkpoint: each step's global batch halves (the log records one size for the whole run)
    train(recipe, str(tmp_path / "two"), max_steps=2)
    for rank in (0, 1):
        shutil.copy(tmp_path / "two" / "checkpoint-2" / "rng_state.pth", tmp_path / "two" / "checkpoint-2" /
                    f"rng_state_{rank}.pth")
    (tmp_path / "two" / "checkpoint-2" / "rng_state.pth").unlink()
    with pytest.warns(UserWarning, match=r"needs rng_state\.pth: .*\. Each step now trains 4 queries instead of 8 "
                                         r"\(with their documents: in-batch negatives"):
        train(recipe, str(tmp_path / "two"), resume_from_checkpoint=True, max_steps=3)

# The CPU, even on a GPU machine (CUDA_VISIBLE_DEVICES=""): bitwise-equal results are a CPU property.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def _cli(out, recipe_path, *extra, device_env=CPU_ONLY):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **device_env}
    return [sys.executable, os.path.join(ROOT, "train_fles1.py"), "--recipe", recipe_path, "--output-dir", out,
            *extra], env


def _run(command, env):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("device", [
    "cpu",
    # On CUDA the sparse backward's index_add_ sums with atomics in no fixed order: bitwise-equal only with
    # TrainingArguments' full_determinism (torch's deterministic algorithms).
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_sigkill_and_resume_matches_uninterrupted_run(sparse_tiny, msmarco_toy_dir, tmp_path, device):
    recipe_path = str(tmp_path / "recipe.yaml")
    extra = {"training.full_determinism": True} if device == "cuda" else {}
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir, **extra))
    device_env = CPU_ONLY if device == "cpu" else {}
    with open(recipe_path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    steps = "12"
    # uninterrupted reference
    full = str(tmp_path / "full")
    _run(*_cli(full, recipe_path, "--max-steps", steps, device_env=device_env))
    # killed run: SIGKILL as soon as the step-4 checkpoint is complete (transformers writes trainer_state.json last)
    killed = str(tmp_path / "killed")
    command, env = _cli(killed, recipe_path, "--max-steps", steps, device_env=device_env)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed, "checkpoint-4", "trainer_state.json")
    deadline = time.time() + 240
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(killed, "training_log.json"))
    # later checkpoints stay as the kill left them (complete, or half-written: skipped), plus one cut off right
    # after the model was written: --resume picks the newest complete one by itself
    os.makedirs(os.path.join(killed, "checkpoint-99"))
    shutil.copy(os.path.join(killed, "checkpoint-4", "model.safetensors"), os.path.join(killed, "checkpoint-99"))
    _run(*_cli(killed, recipe_path, "--max-steps", steps, "--resume", device_env=device_env))

    reference, resumed = (load_file(os.path.join(d, "model.safetensors")) for d in (full, killed))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    states = [json.load(open(os.path.join(d, f"checkpoint-{steps}", "clfr_state.json"))) for d in (full, killed)]
    assert states[0] == states[1]
    logs = [json.load(open(os.path.join(d, "training_log.json"))) for d in (full, killed)]
    assert logs[0]["clfr"] == logs[1]["clfr"] and logs[0]["crashes"] == logs[1]["crashes"]
    assert [row["step"] for row in logs[0]["history"]] == list(range(1, int(steps) + 1))
    assert logs[0]["history"] == logs[1]["history"]  # every logged number: losses, lambda_d, eff_reg, NNZ


def test_torchrun_two_ranks_log_the_global_nnz(sparse_tiny, msmarco_toy_dir, tmp_path):
    """Rows every 2 steps, a checkpoint at step 3 inside a row's window: the window's sums (each rank's) travel with
    it, and a two-rank resume from it logs what the uninterrupted run logged (the window's reduce once hung: the
    ranks reduced lists of different lengths)."""
    recipe_path = str(tmp_path / "recipe.yaml")
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(sparse_tiny, msmarco_toy_dir,
                                                     **{"training.save_steps": 3, "training.logging_steps": 2}))
    with open(recipe_path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    out = str(tmp_path / "ddp")
    # two ranks on one machine: gloo on the CPU, also where there is a GPU (NCCL refuses two ranks on one GPU)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CPU_ONLY}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train_fles1.py"), "--recipe", recipe_path, "--max-steps", "4"]
    _run(command + ["--output-dir", out, "--trace-nnz"], env)
    log = json.load(open(os.path.join(out, "training_log.json")))
    traces = [json.load(open(os.path.join(out, f"nnz_trace_rank{rank}.json"))) for rank in (0, 1)]
    assert traces[0] != traces[1]  # the ranks saw different documents
    assert all(t["ddp"] for trace in traces for t in trace)  # the model ran under DistributedDataParallel
    assert [row["step"] for row in log["history"]] == [2, 4]
    for row in log["history"]:
        local = [t for trace in traces for t in trace if row["step"] - 2 < t["step"] <= row["step"]]
        assert len(local) == 4
        expected = sum(t["nnz_sum"] for t in local) / sum(t["count"] for t in local)
        assert row["nnz_doc"] == pytest.approx(expected, rel=1e-12)
    resumed = str(tmp_path / "resumed")
    _run(command + ["--output-dir", resumed, "--resume", os.path.join(out, "checkpoint-3")], env)
    assert json.load(open(os.path.join(resumed, "training_log.json")))["history"] == log["history"]
    for adjustment in log["clfr"]:  # the controller acted on the global mean of its interval
        local = [t for trace in traces for t in trace if adjustment["step"] - 2 < t["step"] <= adjustment["step"]]
        expected = sum(t["nnz_sum"] for t in local) / sum(t["count"] for t in local)
        assert adjustment["measured_nnz"] == pytest.approx(expected, rel=1e-12)


def _mini_beir(data, queries=8, documents=12, shared_positive=False):
    """A BEIR folder: query qi judged relevant to di (and, with ``shared_positive``, all to d0 as well)."""
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": f"title {i}", "text": f"document {i} about cells and vitamin"}) + "\n"
        for i in range(documents)))
    (data / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"vitamin topic {i}"}) + "\n" for i in range(queries)))
    for split in ("train", "dev"):
        rows = [f"q{i}\td{i}\t1\n" for i in range(queries)]
        rows += [f"q{i}\td0\t1\n" for i in range(1, queries)] * (split == "train" and shared_positive)
        (data / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return str(data)


def test_torchrun_two_ranks_train_the_one_process_global_batch(sparse_tiny, tmp_path):
    """In-batch negatives were each rank's own: 2 ranks x batch 2 logged InfoNCE 13.8 where 1 process x batch 4
    logged 22.5 on the same vectors. Every rank's documents now enter every query's denominator (and the
    false-negative mask, and the regularizers), so loss, its parts and the gradient match one process. Ranks with
    different batch sizes (accelerate's even_batches off, an epoch's last batch) crashed the gather."""
    model = tmp_path / "no-dropout"
    shutil.copytree(sparse_tiny, model)
    config = json.load(open(model / "config.json"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the same vectors in both runs
    (model / "config.json").write_text(json.dumps(config))
    data = _mini_beir(tmp_path / "beir", shared_positive=True)
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(str(model), data, **{
        "data.max_examples": 4, "data.num_negatives": 2, "data.mask_false_negatives": True,
        "training.save_steps": 100, "loss.lambda_d": 1e-2, "loss.lambda_q": 1e-2, "training.optim": "sgd",
        "training.learning_rate": 1.0}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CPU_ONLY}
    rows, weights = {}, {}
    uneven = {"data.max_examples": 7, "training.num_train_epochs": 1,  # step 2: rank 0 holds 2 examples, rank 1 one
              "training.accelerator_config": {"even_batches": False}}
    for name, ranks, batch, overrides in (("one", 1, 4, {}), ("two", 2, 2, {}), ("uneven", 2, 2, uneven)):
        run_recipe = copy.deepcopy(recipe)
        for dotted, value in {"training.per_device_train_batch_size": batch, **overrides}.items():
            section, key = dotted.split(".")
            run_recipe[section][key] = value
        recipe_path = str(tmp_path / f"recipe-{name}.yaml")
        with open(recipe_path, "w") as handle:
            yaml.safe_dump(run_recipe, handle)
        out = str(tmp_path / name)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] * (ranks > 1)
        _run([sys.executable, *launcher, os.path.join(ROOT, "train_fles1.py"), "--recipe", recipe_path,
              "--output-dir", out] + ["--max-steps", "1"] * (name != "uneven"), env)
        rows[name] = json.load(open(os.path.join(out, "training_log.json")))["history"]
        weights[name] = load_file(os.path.join(out, "model.safetensors"))
    assert [row["step"] for row in rows["uneven"]] == [1, 2]
    one, two = rows["one"][0], rows["two"][0]
    assert one["nnz_doc"] == pytest.approx(two["nnz_doc"], rel=1e-6)  # the same 4 examples, the same vectors
    for key in ("loss", "loss_contrastive", "loss_reg_d", "loss_reg_q", "loss_anticollapse"):
        assert one[key] == pytest.approx(two[key], rel=1e-5), key
    # one SGD step (w - lr * g): the same gradient, far from the start
    start = load_file(os.path.join(model, "model.safetensors"))
    moved = max((weights["one"][name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3
    assert max((weights["one"][name] - weights["two"][name]).abs().max().item() for name in start) <= 1e-4 * moved


def assert_bad_input(capsys, message, argv):
    """train_fles1.py refuses `argv` as every CLI refuses bad input: one "error: ..." line, exit status 2."""
    import train_fles1

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        train_fles1.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # after any loading progress bars
    assert re.search(message, line), line


def test_cli_on_beir_folder_with_dev_eval(sparse_tiny, tmp_path, capsys):
    data = tmp_path / "mini-beir"
    _mini_beir(data)
    import train_fles1

    out = str(tmp_path / "out")
    train_fles1.main(["--recipe", TINY_RECIPE, "--output-dir", out, "--model", sparse_tiny, "--data", str(data),
                      "--max-steps", "2", "--eval-dev", "--set", "training.per_device_train_batch_size=4",
                      "--set", "model.document_max_length=24", "--set", "training.save_steps=100",
                      "--set", "loss.lambda_d=1e-3"])
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert log["global_step"] == 2 and log["recipe"]["loss"]["lambda_d"] == 1e-3
    assert log["eval"]["split"] == "dev" and 0.0 <= log["eval"]["ndcg@10"] <= 1.0
    # bad dev data fails at setup, with its file and line, not after training
    with open(data / "qrels" / "dev.tsv", "a") as handle:
        handle.write("q1\td1\tnot-a-grade\n")
    fresh = str(tmp_path / "fresh")
    assert_bad_input(capsys, r"^error: .*dev\.tsv:10: ",
                     ["--recipe", TINY_RECIPE, "--output-dir", fresh, "--model", sparse_tiny, "--data", str(data),
                      "--max-steps", "2", "--eval-dev", "--set", "training.per_device_train_batch_size=4"])
    assert not os.path.exists(os.path.join(fresh, "checkpoint-2"))
    assert_bad_input(capsys, r"clfr\.gain must be a number in \(0, 1\]",
                     ["--recipe", TINY_RECIPE, "--output-dir", out, "--set", "clfr.gain=2"])
    # setup problems are one error line before any step, not a traceback
    fresh = str(tmp_path / "fresh")
    for argv, message in (
        (["--model", str(tmp_path / "no-model"), "--data", str(data), "--set", "training.per_device_train_batch_size=4"],
         r"^error: model\.path='.*no-model': no such folder$"),
        (["--model", sparse_tiny, "--data", str(tmp_path / "no-data")], r"^error: .*no-data: not a BEIR folder"),
        (["--model", sparse_tiny, "--data", str(data), "--set", "training.per_device_train_batch_size=4",
          "--set", "model.document_max_length=4096"],
         r"^error: document_max_length=4096 exceeds max_position_embeddings"),
        (["--model", sparse_tiny, "--data", str(data), "--set", "training.per_device_train_batch_size=4",
          "--set", "model.query_max_length=1"], r"^error: model\.query_max_length must be an int >= 3"),
    ):
        assert_bad_input(capsys, message, ["--recipe", TINY_RECIPE, "--output-dir", fresh, *argv])
    assert_bad_input(capsys, r"^error: --recipe .*no-recipe\.yaml: no such file; the shipped recipes: .*fles1-v14\.yaml$",
                     ["--recipe", str(tmp_path / "no-recipe.yaml"), "--output-dir", fresh])
    assert_bad_input(capsys, "^error: --set expects SECTION.KEY=VALUE, got 'lr'",
                     ["--recipe", TINY_RECIPE, "--output-dir", fresh, "--set", "lr"])
    # YAML that does not parse was a traceback (exit status 1); the regularizer's error named no recipe key
    (tmp_path / "bad.yaml").write_text("model:\n  path: [x\n")
    assert_bad_input(capsys, r"^error: .*bad\.yaml: not valid YAML at line 3, column 1: expected ',' or ']'",
                     ["--recipe", str(tmp_path / "bad.yaml"), "--output-dir", fresh])
    assert_bad_input(capsys, r"^error: --set 'model\.path=\[x': the value is not valid YAML at line 1, column 3",
                     ["--recipe", TINY_RECIPE, "--output-dir", fresh, "--set", "model.path=[x"])
    assert_bad_input(capsys, r"^error: loss\.regularizer='l2' is not supported; choose one of \['flops', 'l1_flops'\]$",
                     ["--recipe", TINY_RECIPE, "--output-dir", fresh, "--set", "loss.regularizer=l2"])
    common = ["--recipe", TINY_RECIPE, "--model", sparse_tiny, "--data", str(data)]
    assert_bad_input(capsys, r"^error: nothing to resume: .*fresh holds no checkpoint-\* folder",
                     [*common, "--output-dir", fresh, "--resume"])
    assert_bad_input(capsys, r"^error: cannot resume from .*no-ckpt: no such folder$",
                     [*common, "--output-dir", fresh, "--resume", str(tmp_path / "no-ckpt")])
    (tmp_path / "afile").write_text("a file where the output folder should go")
    assert_bad_input(capsys, r"^error: output_dir .*afile/out: cannot be written, .*afile is a file$",
                     [*common, "--output-dir", str(tmp_path / "afile" / "out")])  # before loading, not at step 1
    assert not os.path.exists(os.path.join(fresh, "training_log.json"))
