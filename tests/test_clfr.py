"""CLFR controller: simulated plant, update direction, state, and the sentence-transformers slot."""

import json
import math
import os
import random
import shutil
import warnings

import pytest

from fles1.training.clfr import CLFRCallback, CLFRController


def simulate(gain, exponent, target=400.0, start_lambda=3e-5, steps=200, noise=0.0, seed=0):
    """Plant: documents' nnz = c * lambda^-exponent, with c chosen so that nnz = 250 at the start lambda."""
    rng = random.Random(seed)
    c = 250.0 * start_lambda**exponent
    controller = CLFRController(start_lambda, target, gain)
    errors = []
    for step in range(steps):
        nnz = c * controller.lambda_d ** -exponent * (1 + noise * rng.uniform(-1, 1))
        errors.append(abs(nnz - target) / target)
        controller.update(nnz, step)
    return controller, errors


@pytest.mark.parametrize("gain", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("exponent", [0.3, 1.0, 1.9])
def test_converges_without_blow_up(gain, exponent):
    controller, errors = simulate(gain, exponent, steps=400)
    assert errors[-1] < 1e-3 * max(1.0, 1 / (gain * exponent)) or errors[-1] < errors[0] * 1e-2
    assert max(errors) <= errors[0] + 1e-12  # never further from the target than at the start
    assert all(math.isfinite(row["lambda_d_after"]) and row["lambda_d_after"] > 0 for row in controller.history)


def test_noisy_plant_settles_near_target():
    controller, errors = simulate(gain=0.1, exponent=0.8, steps=300, noise=0.05)
    assert sum(errors[-50:]) / 50 < 0.05


def test_update_direction_and_formula():
    controller = CLFRController(lambda_d=1e-4, target_nnz=100, gain=0.5)
    assert controller.update(150, step=1) == pytest.approx(1e-4 * math.exp(0.25))  # too dense -> stronger
    before = controller.lambda_d
    assert controller.update(50, step=2) == pytest.approx(before * math.exp(-0.25))  # too sparse -> weaker
    assert controller.update(1e9, step=3) == pytest.approx(before * math.exp(-0.25) * math.e)  # clipped step
    assert [row["step"] for row in controller.history] == [1, 2, 3]
    assert set(controller.history[0]) == {"step", "measured_nnz", "target_nnz", "lambda_d_before", "lambda_d_after"}


@pytest.mark.parametrize("kwargs,message", [
    ({"target_nnz": 0}, "target_nnz must be a finite number > 0"),
    ({"target_nnz": -1}, "target_nnz must be a finite number > 0"),
    ({"target_nnz": True}, "target_nnz must be a finite number > 0"),  # a bool passed as 1
    ({"target_nnz": math.inf}, "target_nnz must be a finite number > 0"),
    ({"gain": 0}, r"gain must be a number in \(0, 1\]"),
    ({"gain": 1.01}, r"gain must be a number in \(0, 1\]"),
    ({"gain": True}, r"gain must be a number in \(0, 1\]"),
    ({"lambda_d": 0}, "lambda_d must be a finite number > 0"),
    ({"max_log_step": "abc"}, r"max_log_step must be a number in \(0, 10\]"),  # was a TypeError from the comparison
    ({"max_log_step": None}, r"max_log_step must be a number in \(0, 10\]"),
    ({"max_log_step": math.inf}, r"max_log_step must be a number in \(0, 10\]"),  # exp() overflowed on a big error
    ({"max_log_step": 1000}, r"max_log_step must be a number in \(0, 10\], got 1000"),  # so did any step above ~709
    ({"max_log_step": math.nan}, r"max_log_step must be a number in \(0, 10\]"),
])
def test_bad_controller_settings(kwargs, message):
    settings = {"lambda_d": 3e-5, "target_nnz": 400, "gain": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        CLFRController(**settings)


@pytest.mark.parametrize("measured", [math.nan, -1, math.inf, "400", None])
def test_a_measurement_that_is_no_count_is_refused(measured):
    """NaN passed the clip as a full step up (min(1, nan) is 1): lambda_d grew by e on no information."""
    controller = CLFRController(3e-5, 400, 0.1)
    with pytest.raises(ValueError, match=r"measured_nnz must be a finite number >= 0"):
        controller.update(measured, step=1)
    assert controller.lambda_d == 3e-5 and controller.history == []


def test_fully_collapsed_documents_are_a_measurement_and_lower_lambda_d():
    """0 non-zeros (every document collapsed) is a valid count, the furthest below the target: refusing it as
    "no count" left lambda_d where it was exactly when it most needs to come down."""
    controller = CLFRController(3e-5, 400, 0.1)
    assert controller.update(0, step=1) == pytest.approx(3e-5 * math.exp(-0.1))  # error -1: a step of gain down
    assert controller.history[0]["measured_nnz"] == 0.0


def test_the_ends_of_the_allowed_settings_are_accepted():
    """gain is in (0, 1] and max_log_step in (0, 10]: gain=1 (the module docstring's stable limit) and a step of
    exactly the cap were refused by an open interval."""
    controller = CLFRController(3e-5, 400, gain=1.0, max_log_step=10.0)
    assert (controller.gain, controller.max_log_step) == (1.0, 10.0)
    assert controller.update(800, step=1) == pytest.approx(3e-5 * math.e)  # error +1, gain 1: a full step of 1


def test_lambda_d_leaving_float_range_is_an_error_naming_the_cause():
    """Steps one way add up: lambda_d became inf (every later loss infinite) or 0, without a word."""
    controller = CLFRController(1e300, 1.0, 1.0, max_log_step=10)
    with pytest.raises(ValueError, match=r"lambda_d left float range \([0-9.e+]+ -> inf\) at step \d+: .*"
                                         r"\(30522\) stay far from target_nnz \(1\)"):
        for step in range(1, 100):
            controller.update(30522, step=step)
    assert math.isfinite(controller.lambda_d)


@pytest.mark.parametrize("interval", [0, True, 2.0])
def test_bad_interval_steps(interval):
    with pytest.raises(ValueError, match="interval_steps must be an int >= 1 or None"):
        CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=interval)


def test_the_default_interval_is_one_epoch_of_optimizer_steps():
    """10 batches at gradient accumulation 4 are 3 optimizer steps an epoch (transformers' count): the interval was
    10 // 4 = 2, so lambda_d moved at steps 2, 4, 6 instead of at each epoch's end."""
    from types import SimpleNamespace

    callback = CLFRCallback(CLFRController(3e-5, 400, 0.1))
    args = SimpleNamespace(gradient_accumulation_steps=4, device="cpu")
    callback.on_train_begin(args, SimpleNamespace(global_step=0), None, train_dataloader=[None] * 10)
    assert callback._interval == 3


def test_a_run_shorter_than_the_interval_warns_that_lambda_stays():
    """A --max-steps run shorter than one epoch never adjusted lambda_d, silently."""
    from types import SimpleNamespace

    callback = CLFRCallback(CLFRController(3e-5, 400, 0.1))
    args = SimpleNamespace(gradient_accumulation_steps=1, device="cpu")
    with pytest.warns(UserWarning, match=r"every 10 optimizer steps and this run has 4: lambda_d stays 3e-05"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=4), None, train_dataloader=[None] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=10), None, train_dataloader=[None] * 10)


def test_the_sentence_transformers_path_does_not_measure_a_nan_batch(tiny_random_checkpoint):
    """SpladeCLFRCallback's recorder counted a diverged batch as 0 non-zeros, pulling lambda_d down."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    from fles1.training.clfr import SpladeCLFRCallback

    model = SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu")
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5,
                      query_regularizer_weight=None)
    callback = SpladeCLFRCallback(loss, target_nnz=400, interval_steps=1)
    loss.document_regularizer.compute_loss_from_embeddings(torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True))
    loss.document_regularizer.compute_loss_from_embeddings(torch.full((2, 3), float("nan"), requires_grad=True))
    assert (callback.nnz_sum, callback.nnz_count) == (2.0, 1)


def test_a_regularizer_shared_by_queries_and_documents_counts_the_documents_only(tiny_random_checkpoint):
    """One FlopsLoss given as both SpladeLoss regularizers: recording it counted each batch's queries as documents."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import FlopsLoss, SparseMultipleNegativesRankingLoss, SpladeLoss

    from fles1.training.clfr import SpladeCLFRCallback

    model = SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu")
    regularizer = FlopsLoss(model)
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5,
                      query_regularizer_weight=5e-5, document_regularizer=regularizer, query_regularizer=regularizer)
    callback = SpladeCLFRCallback(loss, target_nnz=100, interval_steps=1)
    loss([model.tokenize(["what is a cat", "dog food"]), model.tokenize(["a cat is an animal", "dogs eat food"])],
         None)
    assert callback.nnz_count == 2  # the two documents, not the queries too
    assert type(loss.query_regularizer) is FlopsLoss and loss.get_config_dict()["query_regularizer_weight"] == 5e-5


def test_the_sentence_transformers_loss_keeps_its_config_and_clfr_its_weight(tiny_random_checkpoint):
    """The recorder replaced SpladeLoss's FlopsLoss by a module of its own: the saved model card's loss section read
    "document_regularizer": "_NNZRecorder" and lost the threshold. A scheduler listed after CLFR overwrote lambda_d
    unlogged; a query-only loss failed with "lambda_d must be ... got None", a name the user never gave."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    from fles1.training.clfr import SpladeCLFRCallback

    model = SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu")
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=1e-3,
                      query_regularizer_weight=None, document_regularizer_threshold=5)
    config = loss.get_config_dict()
    callback = SpladeCLFRCallback(loss, target_nnz=50, interval_steps=1)
    assert loss.get_config_dict() == config
    loss.document_regularizer_weight = 2.5e-4  # what a warm-up scheduler listed after CLFR writes
    with pytest.warns(UserWarning, match=r"something else set the SpladeLoss's document_regularizer_weight to "
                                         r"0.00025 .*sets it back to its lambda_d 0.001"):
        loss.document_regularizer.compute_loss_from_embeddings(torch.ones(2, 3, requires_grad=True))
    assert loss.document_regularizer_weight == callback.controller.lambda_d == 1e-3
    with pytest.raises(ValueError, match=r"loss.document_regularizer_weight must be a finite number > 0 for CLFR"):
        SpladeCLFRCallback(SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=0,
                                      query_regularizer_weight=5e-5), target_nnz=50)


def test_an_interval_without_training_documents_is_warned_about():
    """A callback bound to another SpladeLoss than the trainer's measured nothing and never adjusted, silently."""
    from types import SimpleNamespace

    callback = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=2)
    callback._interval, callback._device = 2, None
    state, control = SimpleNamespace(global_step=1, stateful_callbacks={}), SimpleNamespace(should_save=False)
    callback.on_step_end(None, state, control)
    state.global_step = 2
    with pytest.warns(UserWarning, match=r"CLFR measured no training documents in the 2 steps up to step 2 .* "
                                         r"lambda_d stays 3e-05"):
        callback.on_step_end(None, state, control)
    assert callback.controller.history == []


def test_each_adjustment_measures_its_own_interval_and_eff_reg_sums_lambda_d():
    """CLFR acts on the documents of the last interval (a running mean since the start would lag), and eff_reg is
    the sum of lambda_d over steps, not the current lambda_d."""
    from types import SimpleNamespace

    callback = CLFRCallback(CLFRController(1.0, 400, gain=1.0), interval_steps=1)
    callback._interval, callback._device = 1, None
    control = SimpleNamespace(should_save=False)
    callback.observe(800.0, 1)
    callback.on_step_end(None, SimpleNamespace(global_step=1, stateful_callbacks={}), control)
    callback.observe(400.0, 1)
    callback.on_step_end(None, SimpleNamespace(global_step=2, stateful_callbacks={}), control)
    assert [entry["measured_nnz"] for entry in callback.controller.history] == [800.0, 400.0]
    assert callback.eff_reg == pytest.approx(1.0 + callback.controller.history[0]["lambda_d_after"])


def test_callback_state_round_trip():
    """Each attribute a resumed run needs comes back (comparing two state_dict()s would miss one neither holds)."""
    import json

    callback = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=3)
    callback._interval = 3
    callback.observe(1000.0, 4)
    callback.controller.update(300, 3)
    callback.eff_reg = 1.5e-4
    restored = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=3)
    restored.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert restored.lambda_d == callback.lambda_d == pytest.approx(3e-5 * math.exp(-0.025))
    assert restored.controller.history == callback.controller.history and len(restored.controller.history) == 1
    assert (restored.nnz_sum, restored.nnz_count, restored.eff_reg) == (1000.0, 4, 1.5e-4)


def test_splade_callback_takes_the_scheduler_slot_and_drives_lambda(tiny_random_checkpoint, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.callbacks import SpladeRegularizerWeightSchedulerCallback
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    from fles1.training.clfr import SpladeCLFRCallback

    model = SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu")
    model.max_seq_length = 16
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5,
                      query_regularizer_weight=None)
    clfr = SpladeCLFRCallback(loss, target_nnz=10, gain=1.0, interval_steps=1)  # random model: ~15k nnz
    data = Dataset.from_dict({"query": [f"query {i}" for i in range(4)], "positive": [f"doc {i}" for i in range(4)]})
    args = SparseEncoderTrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
                                          eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                                   loss=loss, callbacks=[clfr])
    observed = []
    observe = clfr.observe
    clfr.observe = lambda nnz_sum, count: (observed.append(count), observe(nnz_sum, count))
    schedulers = [cb for cb in trainer.callback_handler.callbacks
                  if isinstance(cb, SpladeRegularizerWeightSchedulerCallback)]
    assert schedulers == [clfr]  # no default warm-up scheduler was added next to it
    trainer.train()
    assert observed == [2, 2]  # the two training batches' documents; the evaluation batches are not counted
    training_rows = [row for row in trainer.state.log_history if "loss" in row]
    # each row: the lambda_d its step used, before that step's adjustment
    assert [row["lambda_d"] for row in training_rows] == [h["lambda_d_before"] for h in clfr.controller.history]
    assert all("eff_reg" in row for row in training_rows)  # recorded, not only printed
    assert len(clfr.controller.history) == 2
    assert clfr.controller.history[0]["measured_nnz"] > 1000
    assert loss.document_regularizer_weight == clfr.controller.lambda_d == pytest.approx(3e-5 * math.e**2)
    # a second phase on the same loss: its new callback is the one told the non-zeros (they went to the first's,
    # and the new one never adjusted lambda_d)
    second = SpladeCLFRCallback(loss, target_nnz=10, gain=1.0, interval_steps=1)
    counted = clfr.nnz_count
    trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                                   loss=loss, callbacks=[second])
    trainer.train()
    assert clfr.nnz_count == counted and len(second.controller.history) == 2
    assert loss.document_regularizer_weight == second.controller.lambda_d == pytest.approx(3e-5 * math.e**4)


def test_splade_callback_resumes_from_a_checkpoint_folder_anywhere(tiny_random_checkpoint, tmp_path):
    """sentence-transformers' trainer does not tell callbacks which folder ``train(resume_from_checkpoint=PATH)``
    names: CLFR looked in OUTPUT_DIR/checkpoint-N only ("clfr_state.json: missing") for a checkpoint moved or copied
    elsewhere. Its state now also travels inside the checkpoint's trainer_state.json."""
    from datasets import Dataset
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    from fles1.training.clfr import SpladeCLFRCallback

    data = Dataset.from_dict({"query": [f"query {i}" for i in range(8)], "positive": [f"doc {i}" for i in range(8)]})

    def run(output_dir, resume=None):
        model = SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu")
        model.max_seq_length = 16
        loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5,
                          query_regularizer_weight=None)
        clfr = SpladeCLFRCallback(loss, target_nnz=10, gain=0.5, interval_steps=2)
        args = SparseEncoderTrainingArguments(str(output_dir), per_device_train_batch_size=2, max_steps=4,
                                              report_to="none", save_steps=2, use_cpu=True, seed=3)
        SparseEncoderTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[clfr]).train(
            resume_from_checkpoint=resume)
        return clfr

    straight = run(tmp_path / "straight")
    moved = shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "moved" / "step-2")
    os.remove(moved / "clfr_state.json")  # the copy inside trainer_state.json is what a moved folder resumes from
    resumed = run(tmp_path / "elsewhere", resume=str(moved))
    assert len(straight.controller.history) == 2 and straight.controller.lambda_d != 3e-5
    assert [h["step"] for h in resumed.controller.history] == [2, 4]  # step 2's adjustment came from the checkpoint
    assert resumed.controller.history[0] == straight.controller.history[0]
    assert resumed.controller.lambda_d == pytest.approx(straight.controller.lambda_d, rel=1e-4)
    assert resumed.eff_reg == pytest.approx(straight.eff_reg, rel=1e-4)


def test_a_stale_state_copy_in_the_trainer_state_is_not_restored_over_the_checkpoints_file(tmp_path):
    """The copy inside trainer_state.json can be older than the checkpoint (a save the trainer was not told of in
    advance writes trainer_state.json before on_save): restoring it regardless put back an earlier step's lambda_d,
    sums and eff_reg instead of the checkpoint's own clfr_state.json."""
    from types import SimpleNamespace

    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    saved = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=2)
    saved._interval, saved._device = 2, None
    stateful = {}
    saved.observe(800.0, 4)
    saved.write_state(args, SimpleNamespace(global_step=2, stateful_callbacks=stateful))  # the copy at step 2
    stale = json.loads(json.dumps(stateful))
    saved.controller.update(600, 4)
    saved.eff_reg = 2e-4
    saved.write_state(args, SimpleNamespace(global_step=4, stateful_callbacks={}))  # checkpoint-4's own file
    restored = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=2)
    assert restored.restore(args, SimpleNamespace(global_step=4, stateful_callbacks=stale))
    assert restored.lambda_d == saved.lambda_d != 3e-5 and restored.eff_reg == 2e-4
    assert restored.controller.history == saved.controller.history and len(restored.controller.history) == 1
    # a copy written with the checkpoint (same step) is the one taken, the folder's file aside
    current = {saved.state_key: {"global_step": 4, "state": {**saved.state_dict(), "eff_reg": 5e-4}}}
    assert restored.restore(args, SimpleNamespace(global_step=4, stateful_callbacks=current))
    assert restored.eff_reg == 5e-4


def _clfr_resume_on_rank(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks: an interval of 4 steps, a checkpoint after step 2, then steps 3-4 both uninterrupted
    and resumed from that checkpoint; each rank writes the adjustments it made (spawned by the test below)."""
    import json
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def callback():
        made = CLFRCallback(CLFRController(3e-5, 400, 0.1), interval_steps=4)
        made._interval, made._device = 4, torch.device("cpu")
        return made

    def step(made, number):
        made.observe(100.0 * number + 1000.0 * rank, 4)  # the ranks' documents differ
        made.on_step_end(args, SimpleNamespace(global_step=number, stateful_callbacks={}),
                         SimpleNamespace(should_save=False))

    args = SimpleNamespace(output_dir=folder, should_save=rank == 0)
    uninterrupted = callback()
    for number in (1, 2):
        step(uninterrupted, number)
    uninterrupted.write_state(args, SimpleNamespace(global_step=2, stateful_callbacks={}))  # the checkpoint
    dist.barrier()  # rank 0's file is written before anyone reads it
    resumed = callback()
    assert resumed.load(os.path.join(folder, "checkpoint-2"))
    for number in (3, 4):
        step(uninterrupted, number)
        step(resumed, number)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump({"uninterrupted": uninterrupted.controller.history, "resumed": resumed.controller.history}, handle)
    dist.destroy_process_group()


def test_a_resume_under_ddp_from_the_middle_of_an_interval_makes_the_same_adjustment(tmp_path):
    """The checkpoint held rank 0's non-zero sums since the last adjustment only, and every rank loaded them: the
    resumed run's next adjustment measured other documents than the uninterrupted run's (23.1 vs 25.0)."""
    import json
    import socket

    import torch.multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_clfr_resume_on_rank, args=(port, str(tmp_path)), nprocs=2)
    histories = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = ((100 + 200 + 300 + 400) + (1100 + 1200 + 1300 + 1400)) / 32  # both ranks' 4 x 4 documents
    for history in histories:
        assert history["resumed"] == history["uninterrupted"] == histories[0]["uninterrupted"]
        (adjustment,) = history["uninterrupted"]
        assert adjustment["measured_nnz"] == pytest.approx(expected)
