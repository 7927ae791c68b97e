"""Model card generation: every number comes from a result file, metadata parses with huggingface_hub."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from conftest import MSMARCO_TOY
from fles1.card import MISSING, CardInputError, build_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_eval(path, model_path="outputs/seed1", fingerprint="fp-seed1", datasets=None, bm25=True, production=True):
    """A synthetic eval JSON in the shared format (values chosen so no two coincide)."""
    datasets = datasets or {"nfcorpus": 0.31234567}
    payload = {
        "model": {"path": model_path, "fingerprint": fingerprint},
        "threshold": 0.3, "query_max_length": 64, "document_max_length": 256,
        "environment": {"packages": {"torch": "2.13.0", "pytrec_eval": "0.5"}, "device": "cpu", "python": "3.11.9"},
        "datasets": {},
    }
    for index, (name, ndcg) in enumerate(datasets.items()):
        payload["datasets"][name] = {
            "split": "test", "num_queries": 323 + index, "num_docs": 3633 + index, "data_fingerprint": f"data-{name}",
            "metrics": {"ndcg@10": ndcg, "mrr@10": ndcg + 0.2011, "recall@100": ndcg - 0.0412,
                        "map@100": ndcg - 0.1723, "recall@1000": ndcg + 0.3377, "nnz_doc": 187.25 + index,
                        "nnz_query": 14.75 + index},
            "bm25": {"library": "bm25s", "metrics": {"ndcg@10": 0.31771, "mrr@10": 0.51234, "recall@100": 0.24561,
                                                     "map@100": 0.14321, "recall@1000": 0.57654}} if bm25 else None,
            "production": {"docs_per_second": 123.4, "query_latency_ms_p50": 0.87, "query_latency_ms_p95": 1.93,
                           "index_bytes_per_1k_docs": 312345, "index_ratio_to_dense_768": 0.1017}
            if production else None,
        }
    with open(path, "w") as handle:
        json.dump(payload, handle)
    return str(path)


def make_training_log(path, seed=1, crashes=(0, 2, 1, 0)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    total = sum(crashes)
    payload = {
        "recipe": {"model_name_or_path": "bert-base-uncased", "learning_rate": 2e-5, "per_device_train_batch_size": 32,
                   "num_train_epochs": 2, "temperature": 0.05, "lambda_d": 3e-5,
                   "data": {"source": "../shared/data/nfcorpus", "split": "train"},
                   "clfr": {"target_nnz_d": 400, "gain": 0.1, "interval_steps": 6250}},
        "seed": seed, "global_step": 12500, "train_runtime_s": 2589.5,
        "history": [{"step": 10, "epoch": 0.1, "loss": 2.5, "loss_contrastive": 2.4, "loss_reg_d": 0.1,
                     "loss_reg_q": 0.0, "loss_anticollapse": 0.0, "lambda_d": 3e-5, "lambda_q": 0.0,
                     "nnz_doc": 612.5, "nnz_query": 40.5, "eff_reg": 3e-4},
                    {"step": 12500, "epoch": 2.0, "loss": 0.4321, "loss_contrastive": 0.41, "loss_reg_d": 0.02,
                     "loss_reg_q": 0.0, "loss_anticollapse": 0.0012, "lambda_d": 4.1e-5, "lambda_q": 0.0,
                     "nnz_doc": 402.5, "nnz_query": 31.5, "eff_reg": 0.45}],
        "clfr": [{"step": 6250, "measured_nnz": 480.0, "target_nnz": 400, "lambda_d_before": 3e-5,
                  "lambda_d_after": 3.6e-5},
                 {"step": 12500, "measured_nnz": 402.5, "target_nnz": 400, "lambda_d_before": 3.6e-5,
                  "lambda_d_after": 3.61e-5}],
        "crashes": dict(zip(("non_finite_loss", "non_finite_grad", "loss_spike", "nnz_collapse"), crashes),
                        total=total),
    }
    with open(path, "w") as handle:
        json.dump(payload, handle)
    return str(path)


def card_from(tmp_path, results, logs=(), **kwargs):
    path = tmp_path / "README.md"
    build_card(results, logs, **kwargs).save(str(path))
    return ModelCard.load(str(path))  # parse back with the Hub's card tools


def table_row(text, first_cells, section=None):
    """The cells of the Markdown table row that starts with the given cells (within a '## section')."""
    if section:
        text = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    prefix = "| " + " | ".join(first_cells) + " |"
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # an escaped pipe is in a cell


def test_metadata_parses_and_model_index_equals_result_file(tmp_path):
    results = make_eval(tmp_path / "eval.json", datasets={"nfcorpus": 0.30587123, "scifact": 0.6123456789})
    log = make_training_log(tmp_path / "run" / "training_log.json")
    card = card_from(tmp_path, [results], [log])
    with open(results) as handle:
        expected = json.load(handle)["datasets"]
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "sentence-transformers" and data.pipeline_tag == "feature-extraction"
    assert {"sparse-retrieval", "splade", "sentence-transformers", "sparse-encoder"} <= set(data.tags)
    assert data.base_model == "bert-base-uncased"  # the recipe's backbone
    assert data.datasets == ["BeIR/nfcorpus", "BeIR/scifact"]
    assert data.model_name == "fles1-v14"
    seen = set()
    for result in data.eval_results:
        key = result.metric_type.replace("_at_", "@")
        assert result.metric_value == expected[result.dataset_name]["metrics"][key]
        assert result.dataset_split == "test" and result.task_type == "text-retrieval"
        seen.add((result.dataset_name, key))
    assert seen == {(name, key) for name in expected for key in expected[name]["metrics"]}  # one per dataset+metric
    # every table cell is the results file's number in its own column (a card showing BM25's numbers as the model's,
    # or the production columns in another order, passed before)
    def metrics(values):
        return [f"{values[key]:.4f}" for key in ("ndcg@10", "mrr@10", "recall@100", "map@100", "recall@1000")]

    for name, entry in expected.items():
        m = entry["metrics"]
        assert table_row(card.text, [name, "test"], "Metrics at") == [name, "test", *metrics(m),
                                                                      f"{m['nnz_doc']:.1f}", f"{m['nnz_query']:.1f}"]
        assert table_row(card.text, [name, "FLES-1"], "Baselines")[2:] == metrics(m)
        assert table_row(card.text, [name, "BM25 (bm25s)"], "Baselines")[2:] == metrics(entry["bm25"]["metrics"])
        assert table_row(card.text, [name], "Production") == [name, "123.4", "0.87", "1.93", "0.312", "0.102×"]
    # the front matter is plain YAML too
    front = yaml.safe_load(card.content.split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.30587123


def test_numbers_no_file_holds_render_as_missing(tmp_path):
    results = make_eval(tmp_path / "eval.json", bm25=False, production=False)
    with open(results) as handle:
        payload = json.load(handle)
    del payload["datasets"]["nfcorpus"]["metrics"]["map@100"]
    del payload["environment"]
    with open(results, "w") as handle:
        json.dump(payload, handle)
    card = card_from(tmp_path, [results])
    assert "map_at_100" not in {r.metric_type for r in card.data.eval_results}
    assert table_row(card.text, ["nfcorpus", "test"], "Metrics at")[5] == MISSING  # MAP@100 column of the headline table
    assert table_row(card.text, ["nfcorpus", "BM25 (not run in this evaluation)"])[2:] == [MISSING] * 5
    assert table_row(card.text, ["nfcorpus"] + [MISSING] * 5)
    assert "training details are —" in card.text
    assert "Device: —" in card.text
    assert "123.4" not in card.text and "0.3177" not in card.text  # no production/BM25 numbers from elsewhere


def test_several_runs_per_seed_table_and_mean_std(tmp_path):
    seed_dirs = [tmp_path / f"seed{seed}" for seed in (11, 22, 33)]
    ndcgs = [0.3111, 0.3222, 0.2999]
    results = [make_eval(tmp_path / f"eval{i}.json", model_path=str(folder), fingerprint=f"fp{i}",
                         datasets={"nfcorpus": ndcg}) for i, (folder, ndcg) in enumerate(zip(seed_dirs, ndcgs))]
    # a second file for the published model: another dataset, merged into its cross-domain table
    results.insert(1, make_eval(tmp_path / "eval0_scifact.json", model_path=str(seed_dirs[0]), fingerprint="fp0",
                                datasets={"scifact": 0.6543}))
    logs = [make_training_log(folder / "training_log.json", seed=seed, crashes=(seed % 2, 0, 1, 0))
            for folder, seed in zip(seed_dirs, (11, 22, 33))]
    card = card_from(tmp_path, results, logs[::-1])  # log order does not matter: paired by model folder
    assert [row[1] for row in (table_row(card.text, [label]) for label in ("published", "run 2", "run 3"))] == \
        ["11", "22", "33"]
    mean_row = table_row(card.text, ["mean ± std (n=3)"])
    import statistics

    assert mean_row[3] == f"{statistics.mean(ndcgs):.4f} ± {statistics.stdev(ndcgs):.4f}"
    # model-index and headline: the published run only, both of its datasets
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("nfcorpus", "ndcg_at_10")] == ndcgs[0] and values[("scifact", "ndcg_at_10")] == 0.6543
    # the card called every dataset zero-shot, the training corpus too (trained on nfcorpus train, tested on test)
    assert table_row(card.text, ["scifact", "zero-shot", "test", "323"], "Per-dataset results")
    assert table_row(card.text, ["nfcorpus", "in-domain", "test", "323"], "Per-dataset results")
    from fles1.card import training_corpora

    assert training_corpora({"data.source": "../data/msmarco/triples.train.small.tsv"}) is None  # names no corpus
    assert training_corpora({"data.source": MSMARCO_TOY}) is None  # a folder of triples (triplets/raw.tsv) neither
    assert training_corpora({"data.source": "/data/beir/nfcorpus-v1.0"}) == {"nfcorpus-v1.0"}  # a dot, not a file
    assert training_corpora({"data.source": "BeIR/nfcorpus"}) == {"nfcorpus"} and training_corpora({}) is None
    for seed, crashes in ((11, "1 | 0 | 1 | 0 | 2"), (22, "0 | 0 | 1 | 0 | 1")):
        assert f"| {seed} | 12500 | 2590 | 0.4321 | 402.5 | 31.5 | {crashes} |" in card.text


def test_a_dataset_scored_on_the_split_it_was_trained_on_is_said_and_warned():
    """Trained on a dataset's test split and scored on it, the card said "in-domain ... on another split"."""
    import warnings

    from fles1.card import Run, cross_domain_section

    entry = {"split": "test", "num_queries": 5, "num_docs": 40, "metrics": {"ndcg@10": 0.9}}
    run = Run(key="k", model_path=None, header={}, datasets={"d3": entry, "other": {**entry}})
    with pytest.warns(UserWarning, match=r"d3: scored on its 'test' split, the split the recipe trained on"):
        section = cross_domain_section(run, {"d3"}, "test")
    assert "| d3 | in-domain, **trained on this split** | test |" in section and "| other | zero-shot | test |" in section
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained on train, scored on test: in-domain, nothing to warn about
        assert "| d3 | in-domain | test |" in cross_domain_section(run, {"d3"}, "train")


def test_recipe_file_and_plots(tmp_path):
    results = make_eval(tmp_path / "eval.json")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base_model: google-bert/bert-base-uncased\nlearning_rate: 2.0e-5\n"
                      "clfr:\n  target_nnz_d: 400\n  gain: 0.1\n  interval_steps: 6250\n")
    card = card_from(tmp_path, [results], recipe=str(recipe), plots=["plots/lambda_d.png"])
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert "| `clfr.target_nnz_d` | 400 |" in card.text and "| `clfr.gain` | 0.1 |" in card.text
    assert "![plots/lambda_d.png](plots/lambda_d.png)" in card.text
    assert 'trust_remote_code=True' in card.text and 'hf_hub_download("mindoval/fles1-v14", "fles1_encoder.py")' \
        in card.text


def test_bad_result_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CardInputError, match="broken.json: not valid JSON"):
        build_card([str(broken)])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model": {}}))
    with pytest.raises(CardInputError, match="wrong.json: no 'datasets'"):
        build_card([str(wrong)])
    with pytest.raises(CardInputError, match="missing.json: eval results file not found"):
        build_card([str(tmp_path / "missing.json")])
    with pytest.raises(CardInputError, match="at least one eval results JSON"):
        build_card([])


def test_one_split_per_dataset_and_the_error_names_both(tmp_path):
    test = make_eval(tmp_path / "eval_test.json")
    payload = json.load(open(test))
    payload["datasets"]["nfcorpus"]["split"] = "dev"
    dev = tmp_path / "eval_dev.json"
    dev.write_text(json.dumps(payload))
    with pytest.raises(CardInputError, match=rf"eval_dev\.json: dataset 'nfcorpus' of model 'fp-seed1' is already in "
                                             rf".*eval_test\.json \(split 'dev' here, 'test' there\); the card shows one"):
        build_card([test, str(dev)])


def test_generate_card_cli(tmp_path):
    results = make_eval(tmp_path / "eval.json")
    log = make_training_log(tmp_path / "run" / "training_log.json")
    out = tmp_path / "card.md"
    process = subprocess.run([sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"), "--results",
                              results, "--training-log", log, "--output", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    card = ModelCard.load(str(out))
    assert card.data.eval_results[0].metric_value == 0.31234567
    process = subprocess.run([sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"), "--results",
                              str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and "nope.json: eval results file not found" in process.stderr
    process = subprocess.run([sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"), "--results",
                              results, "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and f"error: --output {tmp_path}: exists and is a folder" in process.stderr
    # an existing file (the project's own README.md, say) is replaced only when asked
    out.write_text("someone's README\n")
    command = [sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"), "--results", results,
               "--output", str(out)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and f"error: --output {out} exists; pass --overwrite" in process.stderr
    assert out.read_text() == "someone's README\n"
    process = subprocess.run(command + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert ModelCard.load(str(out)).data.eval_results[0].metric_value == 0.31234567
    # never its own input, even with --overwrite: the only results file became Markdown
    for option, path in (("--results", results), ("--training-log", log)):
        kept = open(path).read()
        process = subprocess.run([*command[:-1], path, "--overwrite", "--training-log", log],
                                 capture_output=True, text=True, timeout=120)
        assert process.returncode == 2 and f"error: --output {path} is a file {option} reads" in process.stderr
        assert open(path).read() == kept
    # an unreadable input: one line, exit 2 (a PermissionError traceback); root reads chmod 000 files, so: a folder
    process = subprocess.run([*command[:3], str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and f"error: {tmp_path}: cannot read the eval results file (Is a directory)" \
        in process.stderr, process.stderr


def test_runs_pair_with_logs_beside_their_results_and_must_share_the_setting(tmp_path):
    """results/runs/<run>/ holds eval_test.json and training_log.json side by side, while the eval JSON names the
    model folder outputs/<run>: those logs never paired (Seed —). Files at other thresholds were shown under the
    first file's, and a run without the compared dataset dropped out of the table the text still counted."""
    results, logs = [], []
    for seed in (0, 1, 2):
        folder = tmp_path / "runs" / f"seed{seed}"
        folder.mkdir(parents=True)
        results.append(make_eval(folder / "eval_test.json", model_path=f"outputs/seed{seed}", fingerprint=f"fp{seed}",
                                 datasets={"nfcorpus": 0.3 + seed / 100}))
        logs.append(make_training_log(folder / "training_log.json", seed=seed))
    card = card_from(tmp_path, results, logs)
    assert [table_row(card.text, [label])[1] for label in ("published", "run 2", "run 3")] == ["0", "1", "2"]
    assert "The spread over 3 runs" in card.text

    with open(results[2]) as handle:
        payload = json.load(handle)
    at_zero = tmp_path / "at-zero.json"
    at_zero.write_text(json.dumps({**payload, "threshold": 0.0}))
    with pytest.raises(CardInputError, match=r"at-zero\.json: threshold 0\.0, but .*eval_test\.json has 0\.3"):
        build_card(results[:2] + [str(at_zero)])
    same_model = make_eval(tmp_path / "scifact.json", model_path="outputs/seed0", fingerprint="fp0",
                           datasets={"scifact": 0.6})
    at_zero.write_text(json.dumps({**json.load(open(same_model)), "threshold": 0.0}))
    with pytest.raises(CardInputError, match=r"at-zero\.json: threshold 0\.0"):  # the published model's own files
        build_card(results[:1] + [str(at_zero)])
    other_dataset = make_eval(tmp_path / "other.json", model_path="outputs/x", fingerprint="fpx",
                              datasets={"scifact": 0.6})
    with pytest.raises(CardInputError, match=r"other\.json: no nfcorpus result, the dataset the reproducibility"):
        build_card(results + [other_dataset])


def test_further_runs_on_another_split_refused(tmp_path):
    """The reproducibility table averaged one run's test NDCG@10 with another's dev NDCG@10, no split shown."""
    test = make_eval(tmp_path / "seed0_test.json", model_path="outputs/seed0", fingerprint="fp0")
    dev = make_eval(tmp_path / "seed1_dev.json", model_path="outputs/seed1", fingerprint="fp1")
    payload = json.load(open(dev))
    payload["datasets"]["nfcorpus"]["split"] = "dev"
    open(dev, "w").write(json.dumps(payload))
    with pytest.raises(CardInputError, match=r"seed1_dev\.json: nfcorpus split 'dev', but the published run's "
                                             r"\(.*seed0_test\.json\) is 'test'"):
        build_card([test, dev])


def test_a_recipe_file_must_be_the_one_the_log_was_trained_with(tmp_path):
    """The documented command passed the recipe YAML beside a log of a run trained with --set overrides: the card's
    recipe table showed the file's values, its CLFR table the run's."""
    results = make_eval(tmp_path / "eval.json")
    log = make_training_log(tmp_path / "run" / "training_log.json")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 2.0e-5\ntemperature: 1.0\nclfr:\n  target_nnz_d: 400\n  gain: 0.5\n")
    with pytest.raises(CardInputError, match=r"recipe\.yaml: not the recipe .*training_log\.json was trained with: "
                                             r"temperature \(1\.0 here, 0\.05 there\); clfr\.gain \(0\.5 here, 0\.1"):
        build_card([results], [log], str(recipe))
    recipe.write_text("learning_rate: 2.0e-5\ntemperature: 0.05\nclfr:\n  target_nnz_d: 400\n")  # same values
    assert "| `temperature` | 0.05 |" in card_from(tmp_path, [results], [log], recipe=str(recipe)).text
    # another seed's log beside a published run without one: its seed differs, and the file is the card's recipe
    other = make_eval(tmp_path / "seed2.json", model_path="outputs/seed2", fingerprint="fp2")
    seed2_log = make_training_log(tmp_path / "seed2" / "training_log.json", seed=2)
    with open(seed2_log) as handle:
        payload = json.load(handle)
    payload["recipe"]["seed"] = 2
    with open(seed2_log, "w") as handle:
        json.dump(payload, handle)
    recipe.write_text("seed: 0\ntemperature: 0.05\n")
    card = card_from(tmp_path, [results, other], [seed2_log], recipe=str(recipe))
    assert "| `seed` | 0 |" in card.text


def test_logs_pair_with_the_model_their_folder_holds_wherever_it_was_evaluated(tmp_path, fles1_checkpoint):
    """An eval JSON's model path is relative to where eval_fles1.py ran: from another directory the published
    model's own training log did not pair (Seed —)."""
    from fles1.evaluation import model_fingerprint

    model = tmp_path / "models" / "published"
    os.makedirs(model)
    for name in ("model.safetensors", "config.json"):
        os.symlink(os.path.join(fles1_checkpoint, name), model / name)
    published = make_eval(tmp_path / "eval.json", model_path="published", fingerprint=model_fingerprint(str(model)))
    other = make_eval(tmp_path / "b.json", model_path="elsewhere/seed1", fingerprint="fp1")
    log = make_training_log(model / "training_log.json", seed=5)
    card = card_from(tmp_path, [published, other], [log])
    assert table_row(card.text, ["published"])[1] == "5"


def test_odd_file_names_keep_links_and_tables_intact(tmp_path):
    results = make_eval(tmp_path / "eval|test.json")
    other = make_eval(tmp_path / "other.json", model_path="outputs/x", fingerprint="fpx")
    card = card_from(tmp_path, [results, other], plots=["plots/my loss (v2).png"])
    assert "![plots/my loss (v2).png](plots/my%20loss%20%28v2%29.png)" in card.text
    (row,) = [line for line in card.text.splitlines() if line.startswith("| published |")]
    assert "`eval\\|test.json`" in row and len(re.split(r"(?<!\\)\|", row.strip("|"))) == 8  # one cell


def test_result_files_of_the_same_name_are_told_apart(tmp_path):
    """results/runs/<run>/eval_test.json per seed: every row and the headline's source read 'eval_test.json'."""
    for seed in (0, 1):
        (tmp_path / "runs" / f"seed{seed}").mkdir(parents=True)
    seeds = [make_eval(tmp_path / "runs" / f"seed{seed}" / "eval_test.json", model_path=f"outputs/seed{seed}",
                       fingerprint=f"fp{seed}") for seed in (0, 1)]
    text = card_from(tmp_path, seeds).content
    assert "`seed0/eval_test.json`" in text and "`seed1/eval_test.json`" in text
    from fles1.card import distinct_names

    assert distinct_names(["a/x/e.json", "b/x/e.json", "c/f.json"]) == {"a/x/e.json": "a/x/e.json",
                                                                         "b/x/e.json": "b/x/e.json", "c/f.json": "f.json"}
    assert distinct_names(["same.json", "same.json"]) == {"same.json": "same.json"}


def test_recipe_max_lengths_are_marked_as_training_truncation(tmp_path):
    """The recipe table listed model.document_max_length 128 under a card whose top says documents are cut at 256:
    the recipe's lengths cut the training texts only, the saved config keeps the model's own."""
    results = make_eval(tmp_path / "eval.json")  # the model encodes at 64 / 256
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  query_max_length: 32\n  document_max_length: 128\nlearning_rate: 2.0e-5\n")
    text = card_from(tmp_path, [results], recipe=str(recipe)).text
    assert "| `model.document_max_length` | 128 |" in text
    assert ("`model.query_max_length` and `model.document_max_length` cut the training texts only; the model "
            "encodes queries at 64 and documents at 256 tokens (config.json).") in text
    recipe.write_text("model:\n  query_max_length: null\n  document_max_length: 128\n")  # null: the config's lengths
    text = card_from(tmp_path, [results], recipe=str(recipe)).text
    assert "`model.document_max_length` cut the training texts only" in text
    recipe.write_text("learning_rate: 2.0e-5\n")
    assert "cut the training texts" not in card_from(tmp_path, [results], recipe=str(recipe)).text


def test_odd_dataset_names_and_splits_keep_tables_and_the_rerun_command_intact(tmp_path):
    """A dataset folder named `tiny|pipe*star` split its table rows (every number a column off) and reached the
    rerun command unquoted (a shell pipe); datasets on two splits got `--split —`."""
    odd = "tiny|pipe*star`tick`"
    results = make_eval(tmp_path / "eval.json", datasets={odd: 0.31234567, "nfcorpus": 0.2911})
    payload = json.loads(open(results).read())
    payload["datasets"]["nfcorpus"]["split"] = "dev"
    (tmp_path / "eval.json").write_text(json.dumps(payload))
    text = card_from(tmp_path, [results]).text
    escaped = "tiny\\|pipe\\*star\\`tick\\`"
    row = table_row(text, [escaped, "test"], "Metrics at")
    assert len(row) == 2 + 5 + 2 and row[2] == "0.3123"  # Dataset, Split, the metrics, the NNZs: nothing shifted
    assert table_row(text, [escaped, "BM25 (bm25s)"])[2] == "0.3177"
    assert ("python eval_fles1.py --model mindoval/fles1-v14 --data 'tiny|pipe*star`tick`' --split test "
            "--threshold 0.3 --output results_test.json") in text
    assert ("python eval_fles1.py --model mindoval/fles1-v14 --data BeIR/nfcorpus --split dev --threshold 0.3 "
            "--output results_dev.json") in text
    with pytest.raises(CardInputError, match=r"base model '\.\./shared/models/splade-tiny' is not a Hub model id"):
        build_card([results], base_model="../shared/models/splade-tiny")


def test_logs_given_through_links_pair_with_their_runs_and_the_recipe_is_the_published_runs(tmp_path):
    """Links to the seeds' logs paired with no run (their own folder was looked up, not the target's): every Seed
    cell was '—' and the card showed the last-given seed's recipe as the published model's."""
    results, logs = [], []
    (tmp_path / "links").mkdir()
    for seed in (0, 1, 2):
        os.makedirs(tmp_path / f"seed{seed}")
        results.append(make_eval(tmp_path / f"seed{seed}" / "eval.json", model_path=f"outputs/seed{seed}",
                                 fingerprint=f"fp-seed{seed}"))
        logs.append(make_training_log(tmp_path / f"seed{seed}" / "training_log.json", seed=seed))
        log = json.loads(open(logs[-1]).read())
        log["recipe"]["seed"] = seed  # each seed's recipe differs by it, as train_fles1.py's do
        (tmp_path / f"seed{seed}" / "training_log.json").write_text(json.dumps(log))
        os.symlink(logs[-1], tmp_path / "links" / f"log{seed}.json")
    linked = [str(tmp_path / "links" / f"log{seed}.json") for seed in (2, 0, 1)]
    text = card_from(tmp_path, results, linked).text
    assert [table_row(text, [label], "Reproducibility")[1] for label in ("published", "run 2", "run 3")] == \
        ["0", "1", "2"]
    assert "| `seed` | 0 |" in text
    # unpaired logs of other seeds never lend the published run their recipe
    text = card_from(tmp_path, [results[0]], [linked[0], linked[2]]).text
    assert "| `seed` |" not in text


def test_a_log_paired_with_another_run_never_lends_the_published_model_its_recipe(tmp_path):
    """The published model (an untrained backbone) had no log, run 2 had one: the card showed run 2's recipe and
    CLFR settings as the published model's own."""
    os.makedirs(tmp_path / "base")
    os.makedirs(tmp_path / "seed1")
    results = [make_eval(tmp_path / "base" / "eval.json", model_path="outputs/base", fingerprint="fp-base"),
               make_eval(tmp_path / "seed1" / "eval.json")]
    log = make_training_log(tmp_path / "seed1" / "training_log.json")
    text = card_from(tmp_path, results, [log]).text
    assert table_row(text, ["run 2"], "Reproducibility")[1] == "1"  # paired with run 2
    assert "| `clfr.target_nnz_d` |" not in text and "| `learning_rate` |" not in text
    # a lone log paired with no run is still taken as the published run's
    alone = make_training_log(tmp_path / "elsewhere" / "training_log.json")
    with pytest.warns(UserWarning, match=r"records no model fingerprint .* taken as the log of the one model "
                                         r"evaluated \(fp-base\)"):
        assert "| `learning_rate` | 2e-05 |" in card_from(tmp_path, [results[0]], [alone]).text


def test_a_log_recording_its_model_pairs_by_it_and_another_models_log_is_never_the_published_ones(tmp_path):
    """A lone log was taken as the published model's whatever it trained: another run's 60 steps, loss and NNZ
    were shown as the untrained backbone's training. train_fles1.py records the model it saved."""
    results = [make_eval(tmp_path / "base.json", model_path="outputs/base", fingerprint="fp-base")]
    log = make_training_log(tmp_path / "elsewhere" / "training_log.json", seed=7)
    payload = json.loads(open(log).read())
    payload["model_fingerprint"] = "fp-other"  # another model's: its own row, never the published model's
    open(log, "w").write(json.dumps(payload))
    with pytest.warns(UserWarning, match=r"training_log\.json: a training log of model fp-other, which no results file "
                                         r"evaluates: shown marked as another run"):
        text = card_from(tmp_path, results, [log]).text
    assert table_row(text, ["published"], "Reproducibility")[1] == MISSING  # no seed: no log of its own
    assert "| `learning_rate` |" not in text and "| `clfr.target_nnz_d` |" not in text  # not its recipe
    # shown as the other run it is, marked so in each table (its rows read as the published model's training)
    assert "| 7 † | 12500 |" in text and "| 7 † | 2 |" in text
    assert text.count("† `training_log.json` records model fp-other: a run of a model no results file on this card "
                      "evaluates, not the published model's training.") >= 2
    payload["model_fingerprint"] = "fp-base"
    open(log, "w").write(json.dumps(payload))
    results.append(make_eval(tmp_path / "seed1.json", model_path="outputs/seed1", fingerprint="fp-seed1"))
    text = card_from(tmp_path, results, [log]).text  # paired by it, though neither folder is beside it
    assert table_row(text, ["published"], "Reproducibility")[1] == "7"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(model="x"), r"model is str, expected an object"),
    (lambda d: d.update(environment="x"), r"environment is str, expected an object"),
    (lambda d: d["environment"].update(packages=["torch"]), r"environment\.packages is list, expected dict"),
    (lambda d: d["datasets"]["nfcorpus"].update(bm25="x"), r"datasets\.nfcorpus\.bm25 is str, expected an object"),
    (lambda d: d["datasets"]["nfcorpus"]["bm25"].update(metrics=[1]), r"datasets\.nfcorpus\.bm25\.metrics is list"),
    (lambda d: d["datasets"]["nfcorpus"].update(production=[1]), r"datasets\.nfcorpus\.production is list"),
    (lambda d: d["datasets"]["nfcorpus"].update(split=["a"]), r"datasets\.nfcorpus\.split is \['a'\], expected"),
    (lambda d: d["datasets"]["nfcorpus"].update(split=None), r"datasets\.nfcorpus\.split is None, expected"),
    (lambda d: d["datasets"]["nfcorpus"].update(num_docs=True), r"datasets\.nfcorpus\.num_docs is bool, expected int"),
])
def test_an_eval_file_of_the_wrong_shape_is_named_not_a_traceback(tmp_path, edit, message):
    """A hand-edited value of the wrong type was an AttributeError / TypeError deep in the card (push: exit 1, which
    its docstring keeps for the Hub)."""
    path = make_eval(tmp_path / "eval.json")
    payload = json.loads(open(path).read())
    edit(payload)
    open(path, "w").write(json.dumps(payload))
    with pytest.raises(CardInputError, match=rf"eval\.json: {message}"):
        build_card([path])


@pytest.mark.parametrize("key, value, message", [
    ("recipe", [1], "recipe is list, expected dict"), ("history", {}, None), ("history", [1], r"history\[0\] is int"),
    ("clfr", {"a": 1}, "clfr is dict, expected list"), ("crashes", [1], "crashes is list, expected dict"),
])
def test_a_training_log_of_the_wrong_shape_is_named_not_a_traceback(tmp_path, key, value, message):
    results = [make_eval(tmp_path / "eval.json")]
    log = make_training_log(tmp_path / "run" / "training_log.json")
    payload = json.loads(open(log).read())
    payload[key] = value
    open(log, "w").write(json.dumps(payload))
    with pytest.raises(CardInputError, match=rf"training_log\.json: {message or 'history is dict, expected list'}"):
        build_card(results, [log])


def test_runs_on_other_data_never_share_the_reproducibility_table(tmp_path):
    """A 60-document subset's run was averaged with full nfcorpus's in the mean and std: only the dataset's name
    and split were compared."""
    results = [make_eval(tmp_path / "a.json", model_path="outputs/a", fingerprint="fp-a"),
               make_eval(tmp_path / "b.json", model_path="outputs/b", fingerprint="fp-b")]
    assert "mean ± std (n=2)" in card_from(tmp_path, results).text
    for key, value in (("num_docs", 60), ("num_queries", 8)):
        payload = json.loads(open(results[1]).read())
        original = payload["datasets"]["nfcorpus"][key]
        payload["datasets"]["nfcorpus"][key] = value
        open(results[1], "w").write(json.dumps(payload))
        with pytest.raises(CardInputError, match=rf"b\.json: nfcorpus {key} {value!r}, but the published run's "
                                                 rf"\(.*a\.json\) is {original!r}: evaluated on other data"):
            build_card(results)
        payload["datasets"]["nfcorpus"][key] = original
        open(results[1], "w").write(json.dumps(payload))
    # other bytes, the same size: a CRLF or gzipped copy (or the hub dataset) reads the same data -- said, not refused
    payload["datasets"]["nfcorpus"]["data_fingerprint"] = "data-crlf-copy"
    open(results[1], "w").write(json.dumps(payload))
    with pytest.warns(UserWarning, match=r"b\.json: nfcorpus was evaluated on files other than the published run's "
                                         r"\(data fingerprint data-crlf-copy vs data-nfcorpus\) of the same size"):
        assert "mean ± std (n=2)" in card_from(tmp_path, results).text


@pytest.mark.parametrize("table, key", [("metrics", "ndcg@10"), ("production", "docs_per_second"),
                                        ("bm25.metrics", "recall@100")])
def test_non_finite_numbers_are_refused_naming_file_and_metric(tmp_path, table, key):
    """NaN and inf went onto the card's tables and into model-index (`value: .nan`) without a word."""
    path = make_eval(tmp_path / "eval.json")
    payload = json.loads(open(path).read())
    entry = payload["datasets"]["nfcorpus"]
    (entry["bm25"]["metrics"] if table == "bm25.metrics" else entry[table])[key] = float("nan")
    with open(path, "w") as handle:
        json.dump(payload, handle)  # json writes NaN, and reads it back
    with pytest.raises(CardInputError, match=rf"eval.json: datasets.nfcorpus.{re.escape(table)}.{key} is nan"):
        build_card([path])


def test_template_names_the_card_does_not_fill_are_refused(tmp_path):
    """A typo in model_card/template.md rendered as empty text: the card shipped with a hole."""
    from fles1.card import TEMPLATE_PATH

    template = tmp_path / "template.md"
    template.write_text(open(TEMPLATE_PATH).read() + "\nLicence: {{ licence_typo }}\n")
    path = make_eval(tmp_path / "eval.json")
    with pytest.raises(CardInputError, match=r"template.md: licence_typo is not filled by the card \(it fills: .*"
                                             r"repo_id"):
        build_card([path], template_path=str(template))
    template.write_text("{% for x in plots %}{{ x.url }}{{ loop.index }}{% endfor %}{{ range(2) | list }}\n")
    assert build_card([path], template_path=str(template))  # loop variables and Jinja's globals are fine
    template.write_text("{% if %}\n")
    with pytest.raises(CardInputError, match=r"template.md:1: not a valid Jinja template"):
        build_card([path], template_path=str(template))


def test_an_invalid_repo_id_is_refused_by_the_card_too(tmp_path):
    path = make_eval(tmp_path / "eval.json")
    with pytest.raises(CardInputError, match=r"repo id 'bad id//x' is not a Hub repo id"):
        build_card([path], repo_id="bad id//x")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"), "--results", path,
                             "--repo-id", "bad id//x", "--output", str(tmp_path / "card.md")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "error: repo id 'bad id//x' is not a Hub repo id" in result.stderr
    assert not (tmp_path / "card.md").exists()


def test_the_cards_python_snippets_run_on_a_checkpoint_and_give_the_tables_vectors(tmp_path, fles1_checkpoint,
                                                                                    monkeypatch):
    """Each of the card's Python blocks, in order, with the repo id as a converted checkpoint folder. SparseEncoder
    returned its vectors before the threshold while the card said weights below it are dropped (46 % more document
    terms than the tables count): the card now shows the cut, which must give FLES1Encoder's vectors."""
    import re

    import huggingface_hub
    import torch

    from fles1_encoder import FLES1Encoder
    from conftest import ROOT

    card = card_from(tmp_path, [make_eval(tmp_path / "eval.json")])
    blocks = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert len(blocks) == 4 and all('"mindoval/fles1-v14"' in block for i, block in enumerate(blocks) if i != 2)
    # hf_hub_download fetches fles1_encoder.py alone; here: the project's own file
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: os.path.join(ROOT, "fles1_encoder.py"))
    namespace = {}
    for number, block in enumerate(blocks):
        exec(block.replace('"mindoval/fles1-v14"', repr(fles1_checkpoint)), namespace)  # noqa: S102 -- our card
        if number == 2:  # the threshold block: SparseEncoder's vectors, cut as the tables' are
            cut = torch.as_tensor(namespace["queries"])
            expected = FLES1Encoder.from_pretrained(fles1_checkpoint, device="cpu").encode_batch(
                ["What is machine learning?"], kind="query", output="torch").to_dense()
            assert torch.equal(cut > 0, expected > 0) and torch.allclose(cut, expected, atol=1e-5)
            assert cut[cut > 0].min() >= 0.3
    assert namespace["vectors"].shape == (1, 30522)


def test_production_rows_say_what_they_were_measured_on(tmp_path):
    """Files of one model merged into one card: the card named the first file's device over every production row,
    and never the batch size docs/s depends on; a cached docs/s did not say whose run measured it."""
    first = json.loads(open(make_eval(tmp_path / "a.json")).read())
    second = json.loads(open(make_eval(tmp_path / "b.json", datasets={"scifact": 0.6})).read())
    first["environment"]["device"] = "cpu (2 cores, 2 torch threads)"
    first["datasets"]["nfcorpus"]["production"].update(docs_per_second_batch_size=32)
    second["environment"]["device"] = "cuda:0 (NVIDIA H200)"
    second["datasets"]["scifact"]["production"].update(
        docs_per_second_batch_size=8, docs_per_second_from_cache=True, docs_per_second_device="cuda:0 (NVIDIA H100)",
        docs_per_second_encoded_at="2026-11-20T10:00:00Z")
    for path, payload in ((tmp_path / "a.json", first), (tmp_path / "b.json", second)):
        path.write_text(json.dumps(payload))
    card = card_from(tmp_path, [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "Measured by `eval_fles1.py` on the device in each row:" in card.text
    assert table_row(card.text, ["nfcorpus"], "Production") == [
        "nfcorpus", "123.4", "32", "0.87", "1.93", "0.312", "0.102×", "cpu (2 cores, 2 torch threads)"]
    assert table_row(card.text, ["scifact"], "Production") == [
        "scifact", "123.4*", "8", "0.87", "1.93", "0.312", "0.102×", "cuda:0 (NVIDIA H200)"]
    assert ("\\* Docs/s of the earlier run that encoded the corpus (the vectors came from the cache): scifact "
            "(cuda:0 (NVIDIA H100), 2026-11-20T10:00:00Z).") in card.text
    # one device: named once above the table, no column
    alone = card_from(tmp_path, [str(tmp_path / "a.json")])
    assert "on cpu (2 cores, 2 torch threads):" in alone.text
    assert table_row(alone.text, ["nfcorpus"], "Production")[-1] == "0.102×"


def test_the_license_is_a_hub_id_the_card_states(tmp_path):
    results = make_eval(tmp_path / "eval.json")
    card = card_from(tmp_path, [results], license="mit")
    assert card.data.license == "mit" and "mit, the license of the backbone checkpoint" in card.text
    with pytest.raises(CardInputError, match=r"license 'Apache 2' is not a Hub license id"):
        build_card([results], license="Apache 2")


def test_local_paths_never_become_hub_ids_wherever_the_card_is_written(tmp_path, monkeypatch):
    """Judged from the card writer's folder, a training run's `outputs/bb` (and a published log's path cut to
    `backbone`) became the card's base_model with a huggingface.co link, its triples file a dataset; a local
    evaluation folder was listed as a Hub dataset and rerun by its bare name."""
    monkeypatch.chdir(tmp_path)  # none of the paths exists here
    results = make_eval(tmp_path / "eval.json", datasets={"nfsmall": 0.3, "nfcorpus": 0.31})
    payload = json.loads(open(results).read())
    for entry in payload["datasets"].values():
        entry["data_source"] = "local folder"
    payload["datasets"]["nfcorpus"]["num_docs"] = 3633  # BeIR/nfcorpus's corpus
    open(results, "w").write(json.dumps(payload))
    log = make_training_log(tmp_path / "outputs" / "seed1" / "training_log.json")
    recorded = json.loads(open(log).read())
    del recorded["recipe"]["model_name_or_path"]
    recorded["recipe"].update(model={"path": "outputs/bb"}, data={"source": "outputs/train.tsv", "split": "train"},
                              resolved={"local_paths": ["model.path", "data.source"]})
    open(log, "w").write(json.dumps(recorded))
    card = card_from(tmp_path, [results], [log])
    assert card.data.base_model is None and "huggingface.co/outputs" not in card.text
    assert card.data.datasets == ["BeIR/nfcorpus"]  # a local copy of a BEIR dataset stands for it; nfsmall is no id
    rerun = card.text.split("```bash\n")[1].split("```")[0]
    assert rerun.startswith("# nfsmall: a local BEIR folder, not on the Hub (data fingerprint data-nfsmall): give its "
                            "path as --data\n")
    # a local folder of a BEIR name holding another corpus (a subset) is not BeIR/<name>: it was declared so, and
    # rerun with --data BeIR/nfcorpus, which cannot give its numbers
    payload["datasets"]["nfcorpus"]["num_docs"] = 721
    subset = tmp_path / "eval_subset.json"
    subset.write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match=r"nfcorpus: a local folder of 721 documents \(BeIR/nfcorpus has 3,633\): "
                                         r"shown as a local dataset"):
        card = card_from(tmp_path, [str(subset)], [log])
    assert card.data.datasets is None or "BeIR/nfcorpus" not in card.data.datasets
    assert {result.dataset_type for result in card.data.eval_results} == {"nfsmall", "nfcorpus"}
    rerun = card.text.split("```bash\n")[1].split("```")[0]
    assert "# nfcorpus: a local BEIR folder of 721 documents (BeIR/nfcorpus has 3,633), not on the Hub" in rerun
    assert "--data nfsmall nfcorpus --split test" in rerun
    # recorded as Hub ids: taken as such even where a folder of that name exists
    recorded["recipe"].update(model={"path": "google-bert/bert-base-uncased"},
                              data={"source": "BeIR/scifact", "split": "train"}, resolved={"local_paths": []})
    open(log, "w").write(json.dumps(recorded))
    os.makedirs(tmp_path / "google-bert" / "bert-base-uncased")
    card = card_from(tmp_path, [results], [log])
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.datasets == ["BeIR/nfcorpus", "BeIR/scifact"]


def test_the_card_refuses_an_owner_less_repo_id_and_a_bad_revision(tmp_path):
    """generate_card.py wrote snippets loading "bad" (push_fles1.py refused such an id) and a revision git cannot
    create."""
    results = make_eval(tmp_path / "eval.json")
    with pytest.raises(CardInputError, match=r"repo id 'bad' names no owner"):
        build_card([results], repo_id="bad")
    with pytest.raises(CardInputError, match=r"revision 'bad branch\.\.' is not a branch name git can create"):
        build_card([results], revision="bad branch..")
    assert 'revision="release/v1.0"' in build_card([results], revision="release/v1.0").text


def test_publishable_redacts_secrets_not_tokenizer_settings():
    from fles1.card import publishable

    token = "hf_" + "Q7x" * 12
    assert publishable({"pad_token": "[PAD]", "cls_token": "[CLS]", "max_tokens": 5, "hub_token": "abc",
                        "training": {"token": "abc", "api_key": "k"}, "note": f"pushed with {token} to https://u:p@h/x"}) \
        == {"pad_token": "[PAD]", "cls_token": "[CLS]", "max_tokens": 5, "hub_token": "<redacted>",
            "training": {"token": "<redacted>", "api_key": "<redacted>"},
            "note": "pushed with <redacted> to https://<redacted>@h/x"}


@pytest.mark.parametrize("key", ["hub_token", "training.hub_token", "token", "x.token", "hf_token", "auth_token",
                                 "refresh_token", "bearer_token", "api_key", "wandb.api-key", "apikey", "password",
                                 "db.passwd", "secret", "aws.secret", "client_secret", "aws_secret_access_key",
                                 "access_key", "credentials", "credential"])
def test_every_secret_key_is_redacted(key):
    from fles1.card import publishable

    assert publishable({key: "s3cr3t"}) == {key: "<redacted>"}


@pytest.mark.parametrize("key", ["pad_token", "cls_token", "tokens", "max_tokens", "chunk_tokens", "tokenizer",
                                 "secret_sauce_ratio", "keyword"])
def test_settings_named_like_secrets_are_kept(key):
    from fles1.card import publishable

    assert publishable({key: "[PAD]"}) == {key: "[PAD]"}


def table_under(text, header_start):
    """The rows of the Markdown table whose header line starts with `header_start` cells, as {header: cell}."""
    lines = text.splitlines()
    prefix = "| " + " | ".join(header_start) + " |"
    (start,) = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # noqa: E731
    header, rows = split(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = split(line)
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


def test_every_cell_of_the_per_dataset_production_and_clfr_tables_is_its_headers_number(tmp_path):
    """Only the leading cells of these rows were checked: a Recall@1000 under "Recall@100", BM25's MRR@10 under
    "BM25 NDCG@10", the query count under "Docs", p50 and p95 swapped, the first CLFR update's numbers as the
    last, a crash total without NNZ collapses or the dev metrics under other headers all passed."""
    results = make_eval(tmp_path / "eval.json", datasets={"nfcorpus": 0.31234567, "scifact": 0.6123})
    with open(results) as handle:
        expected = json.load(handle)["datasets"]
    log = make_training_log(tmp_path / "run" / "training_log.json", crashes=(0, 2, 1, 3))
    with open(log) as handle:
        payload = json.load(handle)
    payload["eval"] = dev = {"split": "dev", "ndcg@10": 0.2891, "mrr@10": 0.4512, "recall@100": 0.2233,
                             "map@100": 0.1234, "recall@1000": 0.5678, "nnz_doc": 140.25, "nnz_query": 9.5}
    with open(log, "w") as handle:
        json.dump(payload, handle)
    card = card_from(tmp_path, [results], [log])
    per_dataset = table_under(card.text, ["Dataset", "Training data"])
    assert per_dataset == [
        {"Dataset": name, "Training data": "in-domain" if name == "nfcorpus" else "zero-shot", "Split": "test",
         "Queries": str(entry["num_queries"]), "Docs": str(entry["num_docs"]),
         "NDCG@10": f"{entry['metrics']['ndcg@10']:.4f}", "Recall@100": f"{entry['metrics']['recall@100']:.4f}",
         "BM25 NDCG@10": f"{entry['bm25']['metrics']['ndcg@10']:.4f}", "NNZ doc": f"{entry['metrics']['nnz_doc']:.1f}"}
        for name, entry in expected.items()]
    assert table_under(card.text, ["Dataset", "Docs/s"])[0] == {
        "Dataset": "nfcorpus", "Docs/s": "123.4", "Query p50 (ms)": "0.87", "Query p95 (ms)": "1.93",
        "Index MB / 1k docs": "0.312", "Index size vs dense-768": "0.102×"}
    # the training log's CLFR updates: 3e-5 -> 3.6e-5 first, 3.6e-5 -> 3.61e-5 last (measured 402.5 of 400)
    assert table_under(card.text, ["Seed", "Adjustments"]) == [
        {"Seed": "1", "Adjustments": "2", "λ_d first": "3e-05", "λ_d last": "3.61e-05", "NNZ measured (last)": "402.5",
         "Target NNZ": "400.0"}]
    assert table_under(card.text, ["Seed", "Steps"]) == [
        {"Seed": "1", "Steps": "12500", "Runtime (s)": "2590", "Final loss": "0.4321", "Final NNZ doc": "402.5",
         "Final NNZ query": "31.5", "Non-finite loss": "0", "Non-finite grad": "2", "Loss spike": "1",
         "NNZ collapse": "3", "Total": "6"}]
    assert table_under(card.text, ["Seed", "Split"]) == [
        {"Seed": "1", "Split": "dev", "NDCG@10": "0.2891", "MRR@10": "0.4512", "Recall@100": "0.2233",
         "MAP@100": "0.1234", "Recall@1000": "0.5678", "NNZ doc": f"{dev['nnz_doc']:.1f}", "NNZ query": "9.5"}]


def test_one_model_evaluated_from_two_folders_is_one_run(tmp_path):
    """Results files are grouped by the model's fingerprint: the same weights evaluated from a copy (another path)
    must merge into the published run, not appear as a second seed beside it (a spread of 0 over 'two runs')."""
    results = [make_eval(tmp_path / "nf.json", model_path="outputs/run", fingerprint="fp-a"),
               make_eval(tmp_path / "sf.json", model_path="/mnt/copy/run", fingerprint="fp-a",
                         datasets={"scifact": 0.6})]
    card = card_from(tmp_path, results)
    assert "One run: no spread across seeds is reported." in card.text and "mean ± std" not in card.text
    assert {r.dataset_name for r in card.data.eval_results} == {"nfcorpus", "scifact"}
    # two models at one path (a folder trained again) are two runs, never merged
    again = [make_eval(tmp_path / "first.json", model_path="outputs/run", fingerprint="fp-a"),
             make_eval(tmp_path / "second.json", model_path="outputs/run", fingerprint="fp-b",
                       datasets={"nfcorpus": 0.29})]
    assert table_row(card_from(tmp_path, again).text, ["mean ± std (n=2)"])


def test_the_committed_card_is_what_the_template_writes_from_the_committed_results(tmp_path):
    """results/model_card/README.md (the card as push publishes it) kept a paragraph the template had since changed:
    regenerated from the committed result files, it equals the committed card but for the paths push rewrites."""
    runs = [os.path.join(ROOT, "results", "runs", f"probe-bm25pos-tau1-seed{seed}") for seed in range(3)]
    plots = [os.path.join(runs[0], f"{name}.png") for name in ("loss", "nnz", "lambda_d")] + [
        os.path.join(ROOT, "results", "plots", f"{name}_nnz.png")
        for name in ("seeds", "clfr_vs_fixed", "l1_vs_squared", "exploration", "gpu_full_schedule")]
    out = tmp_path / "card.md"
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, "model_card", "generate_card.py"),
         "--results", *[os.path.join(run, "eval_test.json") for run in runs],
         "--training-log", *[os.path.join(run, "training_log.json") for run in runs],
         "--plots", *plots, "--studies", os.path.join(ROOT, "results", "STUDY.md"), "--output", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert process.returncode == 0, process.stderr

    def without_paths(card: str) -> list[str]:  # push names the result files and plots by their Hub paths
        card = re.sub(r"`[^`\n]*eval_test\.json`", "`RESULTS`", card)
        return re.sub(r"!\[[^\]\n]*\]\([^)\n]*\)", "![PLOT](PLOT)", card).splitlines()

    committed = open(os.path.join(ROOT, "results", "model_card", "README.md"), encoding="utf-8").read()
    assert without_paths(committed) == without_paths(out.read_text(encoding="utf-8"))
