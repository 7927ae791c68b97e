"""The docstring examples run: verbatim where they need nothing, with the hub id as the converted shipped backbone
where they load the model (the project promises docstrings with a runnable example)."""

import doctest
import textwrap

import pytest

import configuration_fles1
import fles1_encoder
import modeling_fles1
from fles1.training import clfr, losses, regularizers

HUB_ID = '"mindoval/fles1-v14"'


def run_examples(docstrings, globs, replace=None):
    """Run the examples of `docstrings` (name -> text) in one namespace, in order; the failures' reports."""
    parser, failures = doctest.DocTestParser(), []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name, text in docstrings.items():
        for old, new in (replace or {}).items():
            text = text.replace(old, new)
        test = parser.get_doctest(text, globs, name, None, 0)  # a copy of globs
        runner.run(test, out=failures.append, clear_globs=False)
        globs = test.globs
    return runner.summarize(verbose=False), "".join(failures)


@pytest.mark.parametrize("module", [configuration_fles1, clfr, losses, regularizers], ids=lambda m: m.__name__)
def test_docstring_examples_run_verbatim(module):
    tests = [test for test in doctest.DocTestFinder().find(module) if test.examples]
    assert tests, f"{module.__name__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    for test in tests:
        runner.run(test, out=failures.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(failures)


def test_model_and_encoder_docstring_examples_run_on_the_shipped_backbone(fles1_checkpoint):
    replace = {HUB_ID: repr(fles1_checkpoint)}
    model_docs = {"FLES1ForMaskedLM": modeling_fles1.FLES1ForMaskedLM.__doc__,
                  "encode_sparse_terms": modeling_fles1.FLES1ForMaskedLM.encode_sparse_terms.__doc__}
    for docs in (model_docs, {"fles1_encoder": fles1_encoder.__doc__}):
        assert all(HUB_ID in text for text in list(docs.values())[:1])
        result, report = run_examples(docs, {}, replace)
        assert result.attempted >= 3 and result.failed == 0, report


def test_trainer_module_example_trains_a_step(tmp_path):
    """fles1.training.trainer's example, verbatim but for one small step into tmp_path (its TrainingArguments were
    a tuple away from running: load_model_for_training returns (model, tokenizer))."""
    from fles1.training import trainer

    example = textwrap.dedent(trainer.__doc__.split("Example::", 1)[1])
    small = example.replace('TrainingArguments("out", per_device_train_batch_size=32)',
                            f'TrainingArguments({str(tmp_path)!r}, per_device_train_batch_size=2, max_steps=1, '
                            'report_to=[], save_strategy="no")')
    assert small != example
    namespace = {}
    exec(compile(small, "fles1.training.trainer example", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
