"""FLES1Encoder: the seed snippet, outputs, thresholds and every bad input of the issue."""

import itertools
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fles1_encoder import CheckpointError, FLES1Encoder, SparseEncoderMismatchWarning


@pytest.fixture(scope="module")
def encoder(tiny_random_checkpoint):
    return FLES1Encoder.from_pretrained(tiny_random_checkpoint)


@pytest.fixture(scope="module")
def shipped(fles1_checkpoint):
    return FLES1Encoder.from_pretrained(fles1_checkpoint)


def test_encoder_seed_snippet_runs_verbatim(fles1_checkpoint):
    dir = fles1_checkpoint  # noqa: A001 -- the snippet's name for the hub id
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(dir)
    sparse = encoder.encode("What is machine learning?")        # {'machine': 1.39, 'learning': 1.08, ...}
    vectors = encoder.encode_batch(["query 1", "query 2"], batch_size=32)
    ids, weights = encoder.encode_to_ids("What is machine learning?")

    assert list(sparse)[:2] == ["machine", "learning"]  # the shipped SPLADE model's top terms
    assert list(sparse.values()) == sorted(sparse.values(), reverse=True) and min(sparse.values()) >= 0.3
    assert len(vectors) == 2 and all(isinstance(vector, dict) and vector for vector in vectors)
    assert encoder.decode(ids, weights) == sparse


def test_encoder_save_pretrained_loads_back_through_every_loader(fles1_checkpoint, tmp_path, monkeypatch):
    """The encoder had no save: a threshold chosen on it, or a config edit, could not be kept with the weights."""
    import doctest
    import warnings

    from sentence_transformers import SparseEncoder
    from transformers import AutoModelForMaskedLM

    encoder = FLES1Encoder.from_pretrained(fles1_checkpoint, threshold=0.5)
    encoder.model.config.query_max_length = 12  # a config edit, followed by the encoder and saved
    query = "what are the effects of vitamin d supplements on bone density in older women with osteoporosis"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparseEncoderMismatchWarning)  # its sentence-transformers files agree
        saved = encoder.save_pretrained(str(tmp_path / "saved"))
        loaded = FLES1Encoder.from_pretrained(saved)
    files = set(os.listdir(saved))
    assert {"config.json", "configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py", "model.safetensors",
            "tokenizer.json", "modules.json", "sentence_bert_config.json", "LICENSE"} <= files
    config = json.loads(Path(saved, "config.json").read_text())
    assert config["inference_threshold"] == 0.5 and config["query_max_length"] == 12
    assert "AutoModel" in config["auto_map"]
    assert "local_files_only" not in json.loads(Path(saved, "tokenizer_config.json").read_text())
    assert loaded.threshold == 0.5 and loaded.max_lengths["query"] == 12
    assert loaded.encode(query, kind="query") == pytest.approx(encoder.encode(query, kind="query"), abs=1e-6)

    ids = loaded.tokenizer(query, truncation=True, max_length=12, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 12
    reference = loaded.encode_batch([query], kind="query", threshold=0.0, output="torch").to_dense()[0]
    by_sentence_transformers = SparseEncoder(saved, trust_remote_code=True, device="cpu").encode_query(
        query, convert_to_tensor=True).to_dense()
    by_transformers = AutoModelForMaskedLM.from_pretrained(saved, trust_remote_code=True).eval()
    with torch.no_grad():
        assert (by_sentence_transformers - reference).abs().max().item() <= 1e-5  # cut at 12 tokens too
        assert (by_transformers.encode_sparse(ids).sparse_embeddings[0] - reference).abs().max().item() <= 1e-5

    monkeypatch.chdir(tmp_path)  # the docstring's example saves into the working folder
    example = doctest.DocTestParser().get_doctest(
        FLES1Encoder.save_pretrained.__doc__, {"FLES1Encoder": FLES1Encoder, "dir": fles1_checkpoint}, "save", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(example)
    assert runner.summarize(verbose=False) == (0, 3)


@pytest.mark.parametrize("interrupted", ["weights", "tokenizer", "sentence-transformers", "Ctrl-C moving in",
                                         "failure moving in"])
@pytest.mark.parametrize("saver", ["encoder", "save_checkpoint"])
def test_an_interrupted_save_over_a_checkpoint_never_mixes_two_models(tiny_random_checkpoint, tmp_path, monkeypatch,
                                                                      interrupted, saver):
    """Saving over an earlier checkpoint wrote into it file by file: interrupted, the folder loaded silently with
    the new config (threshold) beside the old weights or tokenizer. Now it holds the earlier checkpoint whole until
    the new one is complete; a Ctrl-C while files are moved in lands once they all are, and a failure meanwhile leaves
    no config.json (loaders refuse it). Nothing is left behind: no staging folder, no copy of it in transformers'
    modules cache (sentence-transformers loads the staging folder as remote code)."""
    import signal

    import sentence_transformers
    from transformers.dynamic_module_utils import TRANSFORMERS_DYNAMIC_MODULE_NAME, _sanitize_module_name
    from transformers.utils import HF_MODULES_CACHE

    import fles1_encoder
    from fles1.checkpoint import save_checkpoint

    first = FLES1Encoder.from_pretrained(tiny_random_checkpoint, threshold=0.5)
    folder = first.save_pretrained(str(tmp_path / "saved"))
    (tmp_path / "saved" / "notes.txt").write_text("mine")  # another file there stays
    second = FLES1Encoder.from_pretrained(tiny_random_checkpoint, threshold=0.9)
    with torch.no_grad():
        second.model.cls.predictions.bias.add_(1.0)  # another model: every weight differs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    moves, replace = [], os.replace
    if interrupted == "weights":
        import transformers.modeling_utils

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", interrupt)
    elif interrupted == "tokenizer":
        monkeypatch.setattr(type(second.tokenizer), "save_pretrained", interrupt)
    elif interrupted == "sentence-transformers":  # once it has loaded the staging folder (its remote code)
        monkeypatch.setattr(sentence_transformers.SparseEncoder, "save_pretrained", interrupt)
    else:  # at the third file moved from the staging folder into the folder

        def replace_then_interrupt(source, target):
            if fles1_encoder.SAVE_STAGING_PREFIX in source and fles1_encoder.SAVE_STAGING_PREFIX not in target:
                moves.append(target)
                if len(moves) == 3:
                    if interrupted == "failure moving in":
                        raise OSError(28, "No space left on device")
                    # a real Ctrl-C, to this thread: os.kill may hand it to another thread, which a loaded
                    # machine ran after the moves (the suite under load: "DID NOT RAISE")
                    signal.raise_signal(signal.SIGINT)
            return replace(source, target)

        monkeypatch.setattr(fles1_encoder.os, "replace", replace_then_interrupt)
    with pytest.raises(OSError if interrupted == "failure moving in" else KeyboardInterrupt):
        if saver == "encoder":
            second.save_pretrained(folder)
        else:
            save_checkpoint(second.model, second.tokenizer, folder)
    monkeypatch.undo()
    names = os.listdir(folder)
    assert "notes.txt" in names and not [name for name in names if name.startswith(".fles1-save.")]  # no staging left
    cache = os.path.join(HF_MODULES_CACHE, TRANSFORMERS_DYNAMIC_MODULE_NAME)
    ours = _sanitize_module_name(f"{fles1_encoder.SAVE_STAGING_PREFIX}{fles1_encoder._writer()}.{os.getpid()}.")
    assert not [name for name in os.listdir(cache) if name.startswith(ours)]
    if interrupted == "failure moving in":  # half moved: not loadable, and the loaders say why
        assert len(moves) == 3 and "config.json" not in names
        with pytest.raises(CheckpointError, match="config.json"):
            FLES1Encoder.from_pretrained(folder)
        return
    if interrupted == "Ctrl-C moving in":  # held back until every file was in place: the new checkpoint, whole
        assert len(moves) > 3
        expected = second
    else:  # the earlier checkpoint, whole
        expected = first
    reloaded = FLES1Encoder.from_pretrained(folder)
    # save_checkpoint saves the model's config, whose threshold is its own (the encoder's is the encoder's save's)
    threshold = second.config.inference_threshold if expected is second and saver != "encoder" else expected.threshold
    assert reloaded.threshold == threshold
    assert torch.equal(reloaded.model.cls.predictions.bias, expected.model.cls.predictions.bias)
    second.save_pretrained(folder)  # and a save that completes replaces it
    reloaded = FLES1Encoder.from_pretrained(folder)
    assert reloaded.threshold == 0.9 and "notes.txt" in os.listdir(folder)
    assert torch.equal(reloaded.model.cls.predictions.bias, second.model.cls.predictions.bias)


@pytest.mark.parametrize("variant", [None, "v2"])
def test_a_sharded_save_over_an_unsharded_one_loads_the_new_weights(tiny_random_checkpoint, tmp_path, variant):
    """transformers removes an earlier save's stale shards only: a sharded save over model.safetensors left it
    there, and the loaders read it first -- the earlier weights, silently. The reverse left a stale index. (A first
    fix told files rewritten by their timestamps: on a filesystem of 1-second timestamps a second sharded save within
    the second removed its own index.)"""
    from modeling_fles1 import FLES1ForMaskedLM

    folder = tmp_path / "model"
    model = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint)
    # another variant's file stays through every save below (unsharded: transformers' own clean-up of stale shards
    # takes any model*-0000i-of-0000n file, another variant's too)
    other = "v3" if variant is None else None
    model.save_pretrained(folder, variant=other)
    kept = {name: (folder / name).read_bytes() for name in os.listdir(folder) if "safetensors" in name}
    suffix = f".{variant}" if variant else ""

    def saved_weights():
        names = {name for name in os.listdir(folder) if "safetensors" in name and name not in kept}
        loaded = FLES1ForMaskedLM.from_pretrained(folder, variant=variant).cls.predictions.bias
        return names, torch.equal(loaded, model.cls.predictions.bias)

    model.save_pretrained(folder, variant=variant)
    for shard_size in ("300KB", "300KB", None):  # sharded over unsharded, sharded again, unsharded over sharded
        with torch.no_grad():
            model.cls.predictions.bias.add_(1.0)
        model.save_pretrained(folder, variant=variant, **({"max_shard_size": shard_size} if shard_size else {}))
        names, new_weights = saved_weights()
        if shard_size:
            assert f"model.safetensors.index{suffix}.json" in names and f"model{suffix}.safetensors" not in names
            assert len(names) > 2
        else:
            assert names == {f"model{suffix}.safetensors"}
        assert new_weights
    assert all((folder / name).read_bytes() == content for name, content in kept.items())
    # a folder holding both layouts already (a plain transformers save made it): a FLES-1 save tidies it either way
    from transformers import BertForMaskedLM

    for shard_size in ("300KB", None):
        BertForMaskedLM.save_pretrained(model, folder, variant=variant)
        BertForMaskedLM.save_pretrained(model, folder, variant=variant, max_shard_size="300KB")
        assert {f"model{suffix}.safetensors", f"model.safetensors.index{suffix}.json"} <= set(os.listdir(folder))
        with torch.no_grad():
            model.cls.predictions.bias.add_(1.0)
        model.save_pretrained(folder, variant=variant, **({"max_shard_size": shard_size} if shard_size else {}))
        names, new_weights = saved_weights()
        assert new_weights and (f"model{suffix}.safetensors" in names) != bool(shard_size)
        assert (f"model.safetensors.index{suffix}.json" in names) == bool(shard_size)
    # the encoder's save over a sharded folder likewise
    FLES1Encoder.from_pretrained(tiny_random_checkpoint).save_pretrained(str(tmp_path / "encoder"))
    model.save_pretrained(tmp_path / "encoder", max_shard_size="300KB")
    FLES1Encoder.from_pretrained(tiny_random_checkpoint).save_pretrained(str(tmp_path / "encoder"))
    assert not [name for name in os.listdir(tmp_path / "encoder") if "index" in name or "-of-" in name]


def test_a_model_save_on_a_rank_that_writes_nothing_leaves_the_folder_alone(tiny_random_checkpoint, tmp_path,
                                                                              monkeypatch):
    """A first fix of stale weight files set an earlier save's weights aside during the save, taking
    ``is_main_process`` from the keywords only: passed positionally (or on a torch.distributed rank other than 0) the
    save wrote nothing and the earlier weights were deleted."""
    from modeling_fles1 import FLES1ForMaskedLM

    folder = tmp_path / "model"
    model = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint)
    model.save_pretrained(folder, max_shard_size="300KB")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    model.save_pretrained(folder, False)  # is_main_process=False, positionally
    if hasattr(model, "should_save_on_this_rank"):
        monkeypatch.setattr(type(model), "should_save_on_this_rank", lambda self, main: False)  # rank 1 of torchrun
        model.save_pretrained(folder)
        monkeypatch.undo()
    after = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    assert before.items() <= after.items()  # nothing removed (transformers 5.9 writes the weights there anyway)


def test_a_checkpoint_folder_is_written_by_whichever_rank_saves_it(backbone_dir, tmp_path, monkeypatch):
    """transformers writes a model on rank 0 only once a process group is up: under torchrun every rank converts a
    plain BERT backbone into a scratch folder of its own, and rank 1's was left without config.json and weights --
    DDP training from a BERT backbone failed on every run ("Unrecognized model ... Should have a model_type key")."""
    from fles1.checkpoint import convert
    from modeling_fles1 import FLES1ForMaskedLM

    if hasattr(FLES1ForMaskedLM, "should_save_on_this_rank"):  # transformers with the rank gate: rank 1 of torchrun
        monkeypatch.setattr(FLES1ForMaskedLM, "should_save_on_this_rank", lambda self, main: False)
    folder = convert(backbone_dir, str(tmp_path / "rank1"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(folder))
    encoder = FLES1Encoder.from_pretrained(folder)
    encoder.save_pretrained(str(tmp_path / "again"))
    assert FLES1Encoder.from_pretrained(str(tmp_path / "again")).encode("vitamin d") == encoder.encode("vitamin d")
    model = FLES1ForMaskedLM.from_pretrained(folder)
    model.save_pretrained(str(tmp_path / "plain"))  # transformers' own save keeps its gate
    assert "model.safetensors" not in os.listdir(tmp_path / "plain") or not hasattr(model, "should_save_on_this_rank")


def test_a_sigterm_while_files_move_in_ends_the_process_after_the_save_and_its_clean_up(tiny_random_checkpoint,
                                                                                         tmp_path):
    """A SIGTERM with its default action (a job scheduler's stop) during the moves ended the process before the staging
    folder and its copy in transformers' modules cache were removed: held back until both are gone."""
    import signal
    import subprocess

    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import fles1_encoder
from fles1_encoder import FLES1Encoder
move = fles1_encoder._move_staged_into
def terminated_meanwhile(staging, folder):
    signal.raise_signal(signal.SIGTERM)  # to this thread (os.kill may pick another, run late on a loaded machine)
    move(staging, folder)
fles1_encoder._move_staged_into = terminated_meanwhile
FLES1Encoder.from_pretrained({tiny_random_checkpoint!r}).save_pretrained({str(tmp_path / "saved")!r})
print("not reached")
"""
    modules = tmp_path / "modules"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == -signal.SIGTERM and "not reached" not in done.stdout, done.stderr
    assert FLES1Encoder.from_pretrained(str(tmp_path / "saved")).threshold == 0.3  # complete
    assert not [name for name in os.listdir(tmp_path / "saved") if name.startswith(".")]
    assert not [name for name in os.listdir(modules / "transformers_modules") if "fles1_hyphen_save" in name]


def test_a_save_sweeps_the_staging_folder_of_a_killed_save_only(tiny_random_checkpoint, tmp_path):
    """A save killed outright leaves its staging folder in the folder: the next save removes it -- only where its
    writer is dead and of this host and pid namespace (another container's live save kept its own)."""
    import subprocess

    import fles1_encoder

    folder = tmp_path / "saved"
    folder.mkdir()
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid names no process now
    prefix = f"{fles1_encoder.SAVE_STAGING_PREFIX}{fles1_encoder._writer()}"
    left = folder / f"{prefix}.{finished.pid}.x1.partial"
    alive = folder / f"{prefix}.{os.getppid()}.x2.partial"
    elsewhere = folder / f"{fles1_encoder.SAVE_STAGING_PREFIX}otherhost_ns1.{finished.pid}.x3.partial"
    for staging in (left, alive, elsewhere):
        staging.mkdir()
    FLES1Encoder.from_pretrained(tiny_random_checkpoint).save_pretrained(str(folder))
    assert not left.exists() and alive.exists() and elsewhere.exists()
    assert "_ns" in prefix


def test_an_encoder_save_ships_the_encoder_file_of_the_code_running(tiny_random_checkpoint, tmp_path):
    """A model imported from this project, loaded from a folder with older code files, was saved with this
    project's modeling and configuration files but the folder's older fles1_encoder.py: a mismatched pair."""
    from modeling_fles1 import FLES1ForMaskedLM

    old = tmp_path / "old"
    shutil.copytree(tiny_random_checkpoint, old)
    for name in ("configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py"):
        with open(old / name, "a") as handle:
            handle.write("# OLD COPY\n")
    here = Path(__file__).resolve().parents[1] / "fles1_encoder.py"
    FLES1ForMaskedLM.from_pretrained(old).save_pretrained(tmp_path / "saved")  # this project's modeling_fles1
    assert (tmp_path / "saved" / "fles1_encoder.py").read_bytes() == here.read_bytes()
    assert (tmp_path / "saved" / "modeling_fles1.py").read_bytes() == (here.parent / "modeling_fles1.py").read_bytes()
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(old, trust_remote_code=True).save_pretrained(tmp_path / "remote")
    for name in ("modeling_fles1.py", "fles1_encoder.py"):  # remote code: the folder's own files, all of them
        assert (tmp_path / "remote" / name).read_text().endswith("# OLD COPY\n")


def test_a_saved_folder_cuts_tokenizer_json_where_its_config_does_and_reads_for_all(tiny_random_checkpoint, tmp_path):
    """tokenizer.json kept the truncation the last call before the save left on the tokenizer (training's cut, the
    source's 512): Rust tooling reading it cut elsewhere than the config says. And the encoder's save left its
    weights 0600 (transformers' save), unreadable to the other users of a shared machine beside 0644 files."""
    from tokenizers import Tokenizer

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    encoder.tokenizer("a text " * 100, truncation=True, max_length=7)  # leaves the backend cutting at 7
    assert encoder.tokenizer.backend_tokenizer.truncation["max_length"] == 7
    length = encoder.tokenizer.model_max_length
    folder = encoder.save_pretrained(str(tmp_path / "saved"))
    assert Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).truncation["max_length"] == 48
    assert encoder.tokenizer.model_max_length == length  # the encoder's own tokenizer keeps its setting
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(os.path.join(folder, name)).st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_readme_usage_snippet_runs_and_shows_what_it_prints(fles1_checkpoint):
    """The README's Python block, with the hub id as the converted shipped backbone; it once used an undefined
    `documents`. Its comment's weights (splade-tiny) are what encode returns, to the shown decimals."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert snippet.count('"mindoval/fles1-v14"') == 4
    namespace = {}
    exec(snippet.replace('"mindoval/fles1-v14"', repr(fles1_checkpoint)), namespace)  # noqa: S102 -- our README
    shown = re.search(r"encoder\.encode\(\"What is machine learning\?\"\)\s+# \{(.*?), \.\.\.\}",
                      snippet).group(1)
    expected = {term.strip("'"): float(weight) for term, weight in (item.split(": ") for item in shown.split(", "))}
    got = namespace["encoder"].encode("What is machine learning?")
    assert list(got)[:len(expected)] == list(expected)
    assert all(round(got[term], 2) == weight for term, weight in expected.items()), (got, expected)
    assert type(namespace["mlm"]) is type(namespace["model"]) and namespace["matrix"].shape == (2, 30522)
    assert namespace["st"].encode_query(["What is machine learning?"]).shape[-1] == 30522


def test_a_folder_without_sentence_transformers_lengths_or_padding_left_is_warned_about(fles1_checkpoint, backbone_dir,
                                                                                          tmp_path):
    """A sentence_bert_config.json without query_length (a SparseEncoder built from a plain save_pretrained, then
    saved) cuts queries at max_seq_length, 256; a tokenizer padding on the left shifts BERT's positions in
    SparseEncoder's batches (1.0 apart from FLES1Encoder): both silent. convert and saves write right padding."""
    from sentence_transformers import SparseEncoder

    from fles1.checkpoint import convert

    folder = tmp_path / "lengthless"
    shutil.copytree(fles1_checkpoint, folder)
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {key: value for key, value in settings.items() if key != "query_length"}))
    with pytest.warns(SparseEncoderMismatchWarning, match=r"encode_query at 256 tokens \(no query_length in "
                                                          r"sentence_bert_config\.json: its max_seq_length\), "
                                                          r"config\.json query_max_length 64"):
        FLES1Encoder.from_pretrained(str(folder))
    long_query = " ".join(["vitamin d deficiency and bone health"] * 20)
    st = SparseEncoder(str(folder), trust_remote_code=True, device="cpu")
    assert (st.encode_query([long_query], convert_to_tensor=True).to_dense() - FLES1Encoder.from_pretrained(
        fles1_checkpoint).encode_batch([long_query], kind="query", threshold=0, output="torch").to_dense()).abs().max() > 1e-3
    # a source padding on the left: convert writes right padding, a folder padding left warns
    source = tmp_path / "left-source"
    shutil.copytree(backbone_dir, source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))
    converted = convert(str(source), str(tmp_path / "converted"))
    assert json.loads(open(os.path.join(converted, "tokenizer_config.json")).read()).get("padding_side") == "right"
    left = tmp_path / "left"
    shutil.copytree(fles1_checkpoint, left)
    tokenizer_config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))
    with pytest.warns(SparseEncoderMismatchWarning, match=r"pads batches on the left \(tokenizer_config\.json "
                                                          r"padding_side\)"):
        encoder = FLES1Encoder.from_pretrained(str(left))
    encoder.save_pretrained(str(tmp_path / "resaved"))
    assert json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())["padding_side"] == "right"


def test_a_folder_whose_sentence_transformers_files_cut_elsewhere_is_warned_about(fles1_checkpoint, tmp_path):
    """`model[0].query_length = 32; model.save(out)` changed sentence_bert_config.json only: SparseEncoder cut queries
    at 32, FLES1Encoder at 64, and their query vectors differed by up to 1.65 -- silently."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the converted folder agrees with itself
        FLES1Encoder.from_pretrained(fles1_checkpoint)
    folder = tmp_path / "edited"
    shutil.copytree(fles1_checkpoint, folder)
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**settings, "query_length": 32}))
    with pytest.warns(UserWarning, match=r"sentence-transformers cuts in encode_query at 32 tokens "
                                         r"\(sentence_bert_config\.json query_length\), config\.json "
                                         r"query_max_length 64 .*different vectors") as caught:
        encoder = FLES1Encoder.from_pretrained(str(folder))
    assert encoder.max_lengths["query"] == 64
    assert {warning.filename for warning in caught} == {__file__}  # the caller's line
    with warnings.catch_warnings():  # the caller's own length (as a hub load already was): it said config.json's
        warnings.simplefilter("error")  # 64 was used, where the encoder cut at 32 as sentence-transformers does
        encoder = FLES1Encoder.from_pretrained(str(folder), query_max_length=32)
    assert encoder.max_lengths["query"] == 32
    for options in ({"inference_threshold": 0.5}, {"document_max_length": 256}, {"attn_implementation": "eager"}):
        with pytest.warns(SparseEncoderMismatchWarning, match=r"encode_query at 32 tokens"):  # any option given
            FLES1Encoder.from_pretrained(str(folder), **options)  # skipped the whole check


def test_a_sentence_transformers_max_seq_length_saved_with_the_folder_is_warned_about(fles1_checkpoint, tmp_path):
    """`model.max_seq_length = 32; model.save(out)` moved only the tokenizer's model_max_length: SparseEncoder's
    encode() then cut documents at 32 tokens, FLES1Encoder at 256 (vectors up to 0.59 apart) -- silently."""
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(fles1_checkpoint, trust_remote_code=True, device="cpu")
    model.max_seq_length = 32
    model.save_pretrained(str(tmp_path / "st"))
    with pytest.warns(UserWarning, match=r"sentence-transformers cuts in encode \(no task\) at 32 tokens "
                                         r"\(tokenizer_config\.json model_max_length: its max_seq_length\), "
                                         r"config\.json document_max_length 256"):
        encoder = FLES1Encoder.from_pretrained(str(tmp_path / "st"))
    assert encoder.max_lengths["document"] == 256


@pytest.mark.parametrize("options, says", [
    ({"prompts": {"query": "query: ", "document": "passage: "}},
     r"says: encode_query prepends 'query: '; encode_document prepends 'passage: '"),
    ({"prompts": {"query": "", "document": "", "task": "hello: "}, "default_prompt_name": "task"},
     r"says: encode \(no task\) prepends 'hello: '\."),
    ({"max_active_dims": 4}, r"says: every vector keeps its top 4 terms \(max_active_dims\)"),
])
def test_sentence_transformers_prompts_and_pruning_saved_with_the_folder_are_warned_about(options, says,
                                                                                         fles1_checkpoint, tmp_path):
    """`SparseEncoder(folder, prompts=...)` or `max_active_dims=4`, saved: every later SparseEncoder load prepends
    the prompt or keeps 4 terms, FLES1Encoder neither -- query vectors 2.2 apart (or 4 terms vs 18), silently."""
    from sentence_transformers import SparseEncoder

    SparseEncoder(fles1_checkpoint, trust_remote_code=True, device="cpu", **options).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    if "max_active_dims" in options and "max_active_dims" not in saved:  # sentence-transformers 6.0 neither saves
        saved["max_active_dims"] = options["max_active_dims"]  # nor reads it: as a later version saves it
        (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"config_sentence_transformers\.json " + says + r".* different vectors"):
        FLES1Encoder.from_pretrained(str(tmp_path))
    snapshot = _hub_cache_with(str(tmp_path), tmp_path / "cache")  # and by hub id, from the cache
    for lengths in ({}, {"query_max_length": 16}):  # the caller's own lengths skip the length check only
        with pytest.warns(SparseEncoderMismatchWarning, match=r"config_sentence_transformers\.json " + says) as caught:
            FLES1Encoder.from_pretrained("me/fles1", device="cpu", cache_dir=str(tmp_path / "cache"), **lengths)
        assert {warning.filename for warning in caught} == {__file__}  # the caller's line
    assert os.path.isdir(snapshot)


def test_a_folder_whose_sparse_encoder_pools_otherwise_is_warned_about(fles1_checkpoint, tmp_path):
    """A SparseEncoder saved with SpladePooling("sum") sums on every later load, FLES1Encoder max-pools: document
    vectors 7.3 apart, silently (convert refused such a source; a folder loaded)."""
    from sentence_transformers import SparseEncoder

    folder = tmp_path / "summed"
    shutil.copytree(fles1_checkpoint, folder)
    pooling = folder / "1_SpladePooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_strategy": "sum"}))
    says = (r"summed: sentence-transformers' 1_SpladePooling/config\.json: its SpladePooling pools with "
            r"pooling_strategy='sum', activation_function='relu': FLES-1 encodes with 'max' and 'relu' .* different "
            r"vectors")
    with pytest.warns(SparseEncoderMismatchWarning, match=says) as caught:
        encoder = FLES1Encoder.from_pretrained(str(folder))
    assert {warning.filename for warning in caught} == {__file__}
    texts = ["vitamin d and breast cancer risk in older women"]
    summed = SparseEncoder(str(folder), trust_remote_code=True, device="cpu").encode_document(
        texts, convert_to_tensor=True).to_dense()
    assert (summed - encoder.encode_batch(texts, threshold=0.0, output="torch").to_dense()).abs().max().item() > 0.1
    _hub_cache_with(str(folder), tmp_path / "cache")  # and by hub id, from the cache
    with pytest.warns(SparseEncoderMismatchWarning, match=r"1_SpladePooling/config\.json: its SpladePooling pools"):
        FLES1Encoder.from_pretrained("me/fles1", device="cpu", cache_dir=str(tmp_path / "cache"))


def test_the_prompts_warning_names_only_what_sentence_transformers_prepends(fles1_checkpoint, tmp_path):
    """A hand-written config without "query" / "document" prompts (or one from an older sentence-transformers):
    sentence-transformers adds them empty and uses them for encode_query / encode_document, the default prompt only
    for encode() without a task -- the warning named 'q: ' and 'p: ' for both methods, which prepend nothing."""
    from sentence_transformers import SparseEncoder

    folder = tmp_path / "hand-written"
    shutil.copytree(fles1_checkpoint, folder)
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    settings.update(prompts={"q": "q: ", "passage": "p: "}, default_prompt_name="q")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    with pytest.warns(UserWarning, match=r"json says: encode \(no task\) prepends 'q: '\. FLES1Encoder") as caught:
        encoder = FLES1Encoder.from_pretrained(str(folder))
    assert {warning.filename for warning in caught} == {__file__}  # the caller's line, not the library's
    st = SparseEncoder(str(folder), trust_remote_code=True, device="cpu")
    texts = ["vitamin d and breast cancer"]
    for kind, encode in (("query", st.encode_query), ("document", st.encode_document)):
        ours = encoder.encode_batch(texts, kind=kind, threshold=0.0, output="torch").to_dense()
        assert (encode(texts, convert_to_tensor=True).to_dense() - ours).abs().max().item() <= 1e-5


def test_encoder_emoji_and_non_english(shipped):
    for text in ("🚀🔥", "日本語のテキスト", "Brustkrebs und Vitamin D", "¿qué dice la evidencia? naïve café"):
        vector = shipped.encode(text)
        assert vector and all(weight >= 0.3 for weight in vector.values())


def test_encoder_blank_and_empty_inputs(encoder):
    assert encoder.encode("") == {}
    assert encoder.encode("  \n\t ") == {}
    assert encoder.encode_to_ids("") == ([], [])
    assert encoder.encode_batch([]) == []
    assert encoder.encode_to_csr([]).shape == (0, encoder.config.vocab_size)
    mixed = encoder.encode_batch(["", "heart disease", " "])
    assert mixed[0] == {} and mixed[2] == {} and mixed[1] == encoder.encode("heart disease")


@pytest.mark.parametrize("tokenless", ["\u200b", "\u200b\u200d \ufeff", "\x00\x01"])
def test_encoder_text_without_tokens_is_blank(encoder, tokenless):
    """Not whitespace to str.strip(), but nothing to the tokenizer: only [CLS] [SEP] would reach the model."""
    assert tokenless.strip() and encoder._tokenize([tokenless], "document")[0] == [101, 102]
    assert encoder.encode(tokenless) == {} and encoder.encode_to_ids(tokenless, kind="query") == ([], [])
    mixed = encoder.encode_batch([tokenless, "heart disease", tokenless], output="ids")
    assert len(mixed[0][0]) == len(mixed[2][0]) == 0 and len(mixed[1][0]) > 0
    assert encoder.encode_batch([tokenless]) == [{}] and encoder.encode_to_csr([tokenless]).nnz == 0


@pytest.mark.parametrize("bad", [None, b"bytes", 42, 3.5, ["nested"]])
def test_encoder_non_str_in_batch_names_the_index(encoder, bad):
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        encoder.encode_batch(["fine", "also fine", bad, "fine"])
    with pytest.raises(TypeError):
        encoder.encode(bad)


def test_encoder_lone_surrogate_names_the_text_and_character(encoder):
    """json.loads turns a broken escape ("\\ud83d" without its pair) into a str that no tokenizer takes."""
    broken = json.loads('"caf\\u00e9 \\ud83d emoji"')
    with pytest.raises(ValueError, match=r"^texts\[1\] holds a lone surrogate '\\ud83d' at character 5"):
        encoder.encode_batch(["fine", broken, "fine"])
    with pytest.raises(ValueError, match=r"^text holds a lone surrogate"):
        encoder.encode(broken, kind="query")
    repaired = broken.encode("utf-8", "replace").decode()  # the repair the message suggests
    assert encoder.encode_batch([repaired]) == [encoder.encode(repaired)]


def test_encoder_single_string_is_not_a_batch(encoder):
    with pytest.raises(TypeError, match="encode\\(\\)"):
        encoder.encode_batch("one text")


def test_encoder_overlong_text_is_truncated_at_configured_max_length(encoder):
    words = [f"word{i % 7}" if i % 2 else "cell" for i in range(600)]
    tokens = encoder.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    for kind in ("document", "query"):
        limit = encoder.max_lengths[kind] - 2  # [CLS] and [SEP] count
        prefix = encoder.tokenizer.decode(tokens[:limit])
        assert encoder.tokenizer(prefix, add_special_tokens=False)["input_ids"] == tokens[:limit]
        assert encoder.encode(" ".join(words), kind=kind, threshold=0) == encoder.encode(prefix, kind=kind, threshold=0)
        assert encoder.encode(" ".join(words), kind=kind, threshold=0) != encoder.encode(
            encoder.tokenizer.decode(tokens[: limit - 3]), kind=kind, threshold=0
        )


def test_encoder_negative_threshold_is_rejected(tiny_random_checkpoint, encoder):
    with pytest.raises(ValueError, match="threshold"):
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, threshold=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        encoder.encode("heart", threshold=-1)
    with pytest.raises(ValueError, match="threshold"):
        encoder.encode_batch(["heart"], threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):  # a bool is an int to Python, not a threshold
        encoder.encode("heart", threshold=True)
    # an int past float range is above every weight, as inf is (an OverflowError)
    assert encoder.encode("heart", threshold=10 ** 400) == encoder.encode("heart", threshold=math.inf) == {}


def test_forced_int8_screening_of_a_half_precision_model_says_why_not(encoder):
    """encode_sparse(screening=True) on a float16 / bfloat16 model was a RuntimeError about m1 and m2's dtypes."""
    import copy

    batch = encoder.tokenizer(["vitamin d"], return_tensors="pt")
    for dtype in (torch.float16, torch.bfloat16):
        model = copy.deepcopy(encoder.model).to(dtype)
        with torch.inference_mode(), pytest.raises(ValueError, match=r"screening=True bounds a float32 model's logits; "
                                                                     rf"this model computes in {str(dtype)[6:]}"):
            model.encode_sparse(**batch, screening=True)
        with torch.inference_mode():  # the default screens where it can
            assert model.encode_sparse(**batch).sparse_embeddings.shape[-1] == encoder.model.config.vocab_size


def test_encoder_bad_kind_and_output_list_the_choices(encoder):
    with pytest.raises(ValueError, match=r"\['document', 'query'\]"):
        encoder.encode("heart", kind="passage")
    with pytest.raises(ValueError, match=r"\['dict', 'ids', 'csr', 'torch'\]"):
        encoder.encode_batch(["heart"], output="numpy")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode_batch(["heart"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):  # a bool is an int to Python, not a batch size
        encoder.encode_batch(["heart"], batch_size=True)


def test_encoder_runs_no_code_of_the_checkpoint_unless_trusted(tiny_random_checkpoint, backbone_dir, tmp_path):
    """FLES1Encoder loaded every checkpoint with trust_remote_code=True: eval_fles1.py --model someone/fles1-ft (or a
    folder) ran that repo's modeling_fles1.py and tokenizer code. Beside this project's classes it uses them."""
    import modeling_fles1

    folder = shutil.copytree(tiny_random_checkpoint, tmp_path / "checkpoint")
    ran = tmp_path / "ran"
    ran.mkdir()
    source = (folder / "modeling_fles1.py").read_text()
    (folder / "modeling_fles1.py").write_text(f"open({str(ran / 'modeling')!r}, 'w').close()\n{source}")
    (folder / "own_tokenizer.py").write_text(  # a subclass: loading registers the class as remote code, for good
        f"open({str(ran / 'tokenizer')!r}, 'w').close()\nfrom transformers import BertTokenizerFast\n"
        "class OwnTokenizer(BertTokenizerFast):\n    pass\n")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**settings, "auto_map": {"AutoTokenizer": [None, "own_tokenizer.OwnTokenizer"]}}))
    reference = FLES1Encoder.from_pretrained(tiny_random_checkpoint).encode("vitamin d deficiency", threshold=0)
    encoder = FLES1Encoder.from_pretrained(str(folder))
    assert type(encoder.model) is modeling_fles1.FLES1ForMaskedLM and not os.listdir(ran)
    assert encoder.encode("vitamin d deficiency", threshold=0) == reference
    trusted = FLES1Encoder.from_pretrained(str(folder), trust_remote_code=True)  # asked for: the folder's code
    assert sorted(os.listdir(ran)) == ["modeling", "tokenizer"]
    assert type(trusted.model).__module__.startswith("transformers_modules.")
    with pytest.raises(CheckpointError, match=r"config\.json has model_type 'bert', not a FLES-1 model"):
        FLES1Encoder.from_pretrained(backbone_dir)  # a BERT checkpoint, not converted


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_encoder_missing_or_corrupt_file_names_the_file(tiny_random_checkpoint, tmp_path, name, damage):
    folder = shutil.copytree(tiny_random_checkpoint, tmp_path / "checkpoint")
    if damage == "missing":
        os.remove(folder / name)
    else:
        (folder / name).write_bytes(b"\x00{not json, not safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        FLES1Encoder.from_pretrained(str(folder))


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_weights_lacking_tensors_of_the_configs_model_are_named_not_started_at_random(tiny_random_checkpoint,
                                                                                        tmp_path, trust_remote_code):
    """config.json with more layers than the weights (or a file missing a layer's tensors) loaded: transformers
    started the missing weights at random (a log line), so the vectors were wrong and changed from load to load."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_random_checkpoint, tmp_path / "checkpoint")
    settings = json.loads((folder / "config.json").read_text())
    deeper = {**settings, "num_hidden_layers": settings["num_hidden_layers"] + 1}
    (folder / "config.json").write_text(json.dumps(deeper))
    layer = settings["num_hidden_layers"]
    with pytest.raises(CheckpointError, match=rf"checkpoint: its weights \(model\.safetensors\) lack 16 tensor\(s\) "
                                              rf"config\.json's model has \(bert\.encoder\.layer\.{layer}\."):
        FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    (folder / "config.json").write_text(json.dumps(settings))
    tensors = load_file(folder / "model.safetensors")
    save_file({name: tensor for name, tensor in tensors.items() if "layer.0." not in name},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lack 16 tensor\(s\) .*\(bert\.encoder\.layer\.0\."):
        FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_weights_the_configs_model_has_no_place_for_are_named_not_dropped(tiny_random_checkpoint, tmp_path,
                                                                          trust_remote_code):
    """config.json with fewer layers than the weights loaded silently (transformers dropped the extra layer: other
    vectors); tensors of other shapes were transformers' RuntimeError naming no file; a caller's setting that
    does either is its own SettingError, convert refuses both."""
    from fles1.checkpoint import convert
    from fles1_encoder import SettingError

    folder = shutil.copytree(tiny_random_checkpoint, tmp_path / "checkpoint")
    settings = json.loads((folder / "config.json").read_text())
    last = settings["num_hidden_layers"] - 1
    (folder / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": last}))
    with pytest.raises(CheckpointError, match=rf"checkpoint: its weights \(model\.safetensors\) hold 16 tensor\(s\) "
                                              rf"config\.json's model has no place for \(bert\.encoder\.layer\.{last}\."):
        FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with pytest.raises(ValueError, match=rf"config\.json does not describe its weights: they hold 16 tensor\(s\) "
                                         rf"config\.json's model has no place for \(bert\.encoder\.layer\.{last}\."):
        convert(str(folder), str(tmp_path / "converted"))
    narrower = settings["intermediate_size"] // 2
    (folder / "config.json").write_text(json.dumps({**settings, "intermediate_size": narrower}))
    with pytest.raises(CheckpointError, match=rf"hold {3 * settings['num_hidden_layers']} tensor\(s\) of other "
                                              rf"shapes than config\.json's model's \(bert\.encoder\.layer\.\d\..*: "
                                              rf"\(.*\) in the file, \(.*{narrower}.*\) in the model"):
        FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with pytest.raises(ValueError, match=r"config\.json does not describe its weights: they hold \d+ tensor\(s\) of "
                                         r"other shapes than config\.json's model's \(bert\.encoder\.layer\.0\.intermediate"):
        convert(str(folder), str(tmp_path / "converted"))
    assert not (tmp_path / "converted").exists()
    for options, how in (({"num_hidden_layers": last}, "hold 16 tensor"), ({"vocab_size": 100}, r"hold 2 tensor\(s\) of other shapes")):
        with pytest.raises(SettingError, match=rf"with {next(iter(options))}={next(iter(options.values()))}, "
                                               rf".*'s weights \(model\.safetensors\) {how}"):
            FLES1Encoder.from_pretrained(tiny_random_checkpoint, trust_remote_code=trust_remote_code,
                                         query_max_length=8, **options)  # (only the shaping setting is named)
    # a damaged folder is not blamed on a setting that shapes nothing (it was a SettingError naming it)
    (folder / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": last}))
    with pytest.raises(CheckpointError, match=r"hold 16 tensor\(s\) config\.json's model has no place for"):
        FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code, query_max_length=8)
    # the buffers BERT builds itself, which older files hold, are no misfit
    from safetensors.torch import load_file, save_file

    (folder / "config.json").write_text(json.dumps(settings))
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "bert.embeddings.token_type_ids": torch.zeros(1, settings["max_position_embeddings"],
                                                                         dtype=torch.long)},
              folder / "model.safetensors", metadata={"format": "pt"})
    assert FLES1Encoder.from_pretrained(str(folder), trust_remote_code=trust_remote_code).encode("vitamin d") == \
        FLES1Encoder.from_pretrained(tiny_random_checkpoint).encode("vitamin d")
    convert(str(folder), str(tmp_path / "converted"))


def test_a_config_of_the_wrong_shape_names_config_json_and_a_bad_setting_is_the_callers(tiny_random_checkpoint,
                                                                                         tmp_path):
    """A config.json holding a list was an AttributeError, a setting of the wrong type a raw huggingface_hub
    validation error; a bad setting passed to from_pretrained was a CheckpointError ("could not load the FLES-1
    model"), as if the folder were broken."""
    from fles1_encoder import SettingError

    folder = shutil.copytree(tiny_random_checkpoint, tmp_path / "checkpoint")
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object of settings \(a list\)"):
        FLES1Encoder.from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**settings, "hidden_size": "abc"}))
    with pytest.raises(CheckpointError, match=r"checkpoint: config\.json: Validation error for field 'hidden_size'"):
        FLES1Encoder.from_pretrained(str(folder))
    for options, message in (({"inference_threshold": -1}, "inference_threshold must be a number >= 0"),
                             ({"query_max_length": 600}, "query_max_length=600 exceeds max_position_embeddings"),
                             ({"pooling": "mean"}, r"pooling='mean' is not supported; choose one of \['max'\]"),
                             ({"dtype": torch.int8}, r"dtype=torch\.int8 is not a floating-point dtype"),
                             ({"dtype": "int8"}, r"dtype='int8' is not a floating-point dtype"),
                             ({"dtype": "torch.int8"}, r"dtype='torch\.int8' is not a floating-point dtype"),
                             ({"torch_dtype": "float33"}, r"torch_dtype='float33' is not a floating-point dtype"),
                             ({"dtype": np.int8}, r"dtype=<class 'numpy\.int8'> is not a floating-point dtype")):
        with pytest.raises(SettingError, match=message) as error:
            FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", **options)
        assert isinstance(error.value, ValueError) and not isinstance(error.value, OSError)
    # the spellings that name a float dtype load in it ("torch.float16" and numpy's were blamed on the folder), and
    # numpy numbers are settings like Python's (a JSON TypeError while transformers logged the config)
    for dtype in ("torch.float16", np.float16, torch.float16):
        assert FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", dtype=dtype).model.dtype == \
            torch.float16
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", query_max_length=np.int64(20),
                                           inference_threshold=np.float32(0.5))
    assert (encoder.max_lengths["query"], encoder.threshold) == (20, 0.5)
    assert type(encoder.model.config.query_max_length) is int


def test_encoder_loads_sharded_safetensors_and_names_a_missing_shard(tiny_random_checkpoint, tmp_path):
    """A folder saved with ``save_pretrained(..., max_shard_size=...)`` loads in transformers and
    sentence-transformers; FLES1Encoder refused it ("model.safetensors: missing")."""
    from conftest import sharded_copy
    from fles1.evaluation import model_fingerprint

    folder = Path(sharded_copy(tiny_random_checkpoint, tmp_path / "sharded"))
    shards = sorted(name for name in os.listdir(folder) if name.startswith("model-"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    texts = ["statins and breast cancer", "vitamin d"]
    expected = FLES1Encoder.from_pretrained(tiny_random_checkpoint).encode_batch(texts, threshold=0)
    assert FLES1Encoder.from_pretrained(str(folder)).encode_batch(texts, threshold=0) == expected
    assert model_fingerprint(str(folder)) != model_fingerprint(tiny_random_checkpoint)
    os.remove(folder / shards[1])
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: missing \(listed in .*model\.safetensors\.index\.json\)"):
        FLES1Encoder.from_pretrained(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        FLES1Encoder.from_pretrained(str(folder))


def test_encoder_missing_folder_is_named_not_called_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no-such-checkpoint"), "./no-such-checkpoint", "../no-such-checkpoint"):
        with pytest.raises(CheckpointError, match=f"^{re.escape(path)}: no such folder$"):
            FLES1Encoder.from_pretrained(path)
    (tmp_path / "weights.safetensors").write_bytes(b"")  # a file given where the folder goes
    with pytest.raises(CheckpointError, match=r": a file, not a folder$"):
        FLES1Encoder.from_pretrained(str(tmp_path / "weights.safetensors"))


def test_an_unreachable_hub_id_is_one_error_line(monkeypatch, tmp_path):
    """Offline, transformers' message ran over two lines, and so did every CLI's 'error:' line."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"^someone/fles1-nowhere: could not load the FLES-1 model \(") as error:
        FLES1Encoder.from_pretrained("someone/fles1-nowhere", device="cpu")
    assert "\n" not in str(error.value)


def test_encoder_decode_refuses_ids_outside_the_vocabulary(encoder):
    assert encoder.decode(np.array([0, encoder.config.vocab_size - 1])) == [encoder._vocab[0], encoder._vocab[-1]]
    assert encoder.decode(torch.tensor([5]), torch.tensor([0.5])) == {encoder._vocab[5]: 0.5}
    last = encoder.config.vocab_size - 1
    for ids, message in (([3, -1], rf"ids\[1\]=-1 is not a vocabulary id \(0\.\.{last}\)"),
                         ([last + 1], rf"ids\[0\]={last + 1} is not a vocabulary id")):
        with pytest.raises(ValueError, match=message):
            encoder.decode(ids)
    with pytest.raises(TypeError, match=r"ids\[0\] is float, expected an int"):
        encoder.decode([2.7])
    for flag in (True, np.bool_(False)):  # True decoded as id 1, '[unused0]'
        with pytest.raises(TypeError, match=r"ids\[1\] is (bool|bool_), expected an int"):
            encoder.decode([5, flag])
    with pytest.raises(ValueError, match=r"ids and weights differ in length \(2 vs 1\)"):
        encoder.decode([1, 2], [0.5])
    with pytest.raises(ValueError, match=r"ids and weights differ in length \(1 vs 2\)"):  # a weight left over
        encoder.decode([5], [0.1, 0.2])
    # the same id twice with weights: one would silently replace the other in the dict
    with pytest.raises(ValueError, match=r"ids\[2\] repeats ids\[0\] \('\[unused4\]'\): one weight per term"):
        encoder.decode([5, 7, 5], [1.0, 0.5, 2.0])
    assert encoder.decode([5, 7, 5]) == [encoder._vocab[5], encoder._vocab[7], encoder._vocab[5]]  # terms: no dict


def test_encoder_dtype_and_projection_dtype_options(tiny_random_checkpoint):
    """dtype="auto" went to the config and failed as torch.auto; projection_dtype took anything (torch.int8 gave
    wrong vectors, "bfloat16" failed at the first encode as a device string)."""
    for options, remote in itertools.product(({"dtype": "auto"}, {"dtype": "bfloat16"}, {"dtype": torch.float16},
                                              {"torch_dtype": "auto"}, {"torch_dtype": torch.bfloat16}), (None, True)):
        loaded = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", trust_remote_code=remote, **options)
        wanted = next(iter(options.values()))
        expected = {"auto": torch.float32, "bfloat16": torch.bfloat16}.get(wanted, wanted)
        assert loaded.model.dtype == expected and f"dtype={str(expected)[6:]}," in repr(loaded)
        assert loaded.encode("aspirin and the heart") == loaded.encode_batch(["aspirin and the heart"])[0]
    by_name = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", projection_dtype="bfloat16")
    assert by_name.projection_dtype is torch.bfloat16 and "projection_dtype=bfloat16)" in repr(by_name)
    choices = r"choose None \(the model's dtype\) or one of \['float32', 'bfloat16', 'float16', 'float64'\]"
    with pytest.raises(ValueError, match=r"projection_dtype=torch.int8 is not supported; " + choices):
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", projection_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"projection_dtype='cuda' is not supported"):
        by_name.projection_dtype = "cuda"
    assert by_name.projection_dtype is torch.bfloat16  # unchanged by the refused setting


def test_encoder_checks_its_projection_dtype_for_a_model_whose_code_predates_the_check(tiny_random_checkpoint,
                                                                                     monkeypatch):
    """A checkpoint whose modeling code predates `projection_dtype_of` (the Hub's older revisions) takes torch
    dtypes only and checks nothing: the name "bfloat16" failed at the first encode as a device string, torch.int8
    gave every text the same function words."""
    import modeling_fles1

    loaded = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    monkeypatch.setattr(modeling_fles1, "projection_dtype_of", lambda value: value)  # the old code's (no) check
    loaded.projection_dtype = "bfloat16"
    assert loaded.projection_dtype is torch.bfloat16 and loaded.encode("aspirin and the heart")
    for bad in (torch.int8, "int8", "cpu", 3):
        with pytest.raises(ValueError, match=r"projection_dtype=.* is not supported; choose None"):
            loaded.projection_dtype = bad
    assert loaded.projection_dtype is torch.bfloat16


def test_encoder_threshold_semantics(encoder, tiny_random_checkpoint):
    text = "aspirin lowers the risk of heart attacks in older adults"
    everything = encoder.encode(text, threshold=0.0)
    assert encoder.threshold == encoder.config.inference_threshold == 0.3
    assert everything and min(everything.values()) > 0
    cut = sorted(everything.values())[len(everything) // 2]
    kept = encoder.encode(text, threshold=cut)
    assert kept == {term: weight for term, weight in everything.items() if weight >= cut}
    assert encoder.encode(text) == {term: weight for term, weight in everything.items() if weight >= 0.3}
    assert FLES1Encoder.from_pretrained(tiny_random_checkpoint, threshold=cut).encode(text) == kept
    # the batch paths keep a weight equal to the threshold too (their cut is their own weight: the single-text
    # path's values may differ from the batch's in the last bits)
    batch_all = encoder.encode_batch([text], threshold=0.0)[0]
    cut = sorted(batch_all.values())[len(batch_all) // 2]
    batch_kept = {term: weight for term, weight in batch_all.items() if weight >= cut}
    assert encoder.encode_batch([text], threshold=cut)[0] == batch_kept and cut in batch_kept.values()
    assert encoder.encode_to_csr([text], threshold=cut).nnz == len(batch_kept)
    assert len(encoder.encode_batch([text], threshold=cut, output="ids")[0][0]) == len(batch_kept)


def test_encoder_follows_config_edits_made_after_it_was_built(tiny_random_checkpoint, tmp_path):
    """config.query_max_length / inference_threshold edited on a live encoder's model were ignored: the live encoder,
    a new one on the same model and the saved folder (save_pretrained writes the edit) gave three different results."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    given = FLES1Encoder(encoder.model, encoder.tokenizer, threshold=0.0)  # a threshold given stays the encoder's
    long_query = " ".join(f"word{i % 13} cell" for i in range(200))
    before = encoder.encode(long_query, kind="query", threshold=0)
    encoder.config.query_max_length, encoder.config.inference_threshold = 8, 0.9
    assert encoder.max_lengths["query"] == 8 and encoder.threshold == 0.9
    assert encoder.encode(long_query, kind="query", threshold=0) != before
    fresh = FLES1Encoder(encoder.model, encoder.tokenizer)
    for kind in ("query", "document"):
        assert encoder.encode(long_query, kind=kind) == fresh.encode(long_query, kind=kind)
        assert encoder.encode_batch([long_query], kind=kind) == fresh.encode_batch([long_query], kind=kind)
    encoder.model.save_pretrained(tmp_path / "edited")
    encoder.tokenizer.save_pretrained(tmp_path / "edited")
    reloaded = FLES1Encoder.from_pretrained(str(tmp_path / "edited"))
    assert reloaded.max_lengths == encoder.max_lengths and reloaded.threshold == encoder.threshold == 0.9
    assert given.threshold == 0.0 and given.max_lengths["query"] == 8
    encoder.threshold = 0.1  # assigned: the encoder's own from now on
    encoder.config.inference_threshold = 0.5
    assert encoder.threshold == 0.1
    encoder.config.query_max_length = 2  # checked when it is used, naming the setting
    with pytest.raises(ValueError, match=r"config\.query_max_length must be an int >= 3"):
        encoder.encode("heart", kind="query")
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        encoder.threshold = -1


@pytest.mark.parametrize("threshold", [1e-46, 5e-324])
def test_encoder_tiny_positive_threshold_keeps_no_zeros_on_any_path(encoder, threshold):
    """A positive threshold that is 0 in float32 became `weights >= 0` on the batch paths: every one of the
    30,522 entries kept (explicit zeros in the CSR), while encode() kept the positive ones."""
    text = "heart disease and diet"
    positive = encoder.encode(text, threshold=0)
    assert encoder.encode(text, threshold=threshold) == positive
    assert encoder.encode_batch([text], threshold=threshold) == encoder.encode_batch([text], threshold=0)
    assert len(encoder.encode_batch([text], threshold=threshold, output="ids")[0][0]) == len(positive)
    matrix = encoder.encode_to_csr([text], threshold=threshold)
    assert matrix.nnz == len(positive) and (matrix.data > 0).all()


def test_encoder_batch_refuses_mappings_and_frames(encoder):
    """Iterating a {doc_id: text} dict or a DataFrame yields its keys / column names: vectors of the wrong texts."""
    import pandas  # a dependency of datasets
    with pytest.raises(TypeError, match=r"dict; pass its texts, e\.g\. list\(mapping\.values\(\)\)"):
        encoder.encode_batch({"doc1": "heart disease"})
    frame = pandas.DataFrame({"text": ["heart disease", "diet"]})
    with pytest.raises(TypeError, match="DataFrame"):
        encoder.encode_to_csr(frame)
    assert encoder.encode_batch(frame["text"]) == encoder.encode_batch(["heart disease", "diet"])


def test_encoder_matrix_rows_land_where_their_texts_are_across_batches(encoder, monkeypatch):
    """The matrix is written straight from each batch (texts sorted by length inside a window, blanks skipped):
    every row must be its own text's, as the per-text (ids, weights) give it."""
    import fles1_encoder

    monkeypatch.setattr(fles1_encoder, "SORT_WINDOW_TEXTS", 7)  # several windows
    words = "heart disease diet vitamin deficiency older adults statin cholesterol cancer tea".split()
    texts = [" ".join(words[: (i * 5) % 11 + 1]) if i % 6 else "  " for i in range(23)]
    pairs = encoder.encode_batch(texts, batch_size=3, output="ids")
    for output in ("csr", "torch"):
        matrix = encoder.encode_batch(texts, batch_size=3, output=output)
        dense = matrix.toarray() if output == "csr" else matrix.to_dense().numpy()
        expected = np.zeros_like(dense)
        for row, (ids, weights) in enumerate(pairs):
            expected[row, ids] = weights
        assert np.array_equal(dense, expected) and (expected[::6] == 0).all() and (expected[1] > 0).any()
    matrix = encoder.encode_to_csr(texts, batch_size=3)
    assert matrix.has_sorted_indices and matrix.nnz == sum(len(ids) for ids, _ in pairs)


def test_encoder_ids_csr_torch_and_decode_agree(encoder):
    texts = ["heart disease and diet", "", "vitamin d deficiency in older adults", "🚀"]
    dicts = encoder.encode_batch(texts)  # one batch everywhere: padding may move weights by ~1e-7
    pairs = encoder.encode_batch(texts, output="ids")
    matrix = encoder.encode_to_csr(texts)
    dense_torch = encoder.encode_batch(texts, output="torch").to_dense()
    assert matrix.shape == tuple(dense_torch.shape) == (4, encoder.config.vocab_size)
    assert matrix.dtype == np.float32 and matrix.has_sorted_indices
    assert np.array_equal(matrix.toarray(), dense_torch.numpy())
    # a valid CSR tensor: its rows' ids were in weight order, and torch ops that assume sorted ones (mul) gave
    # wrong values
    sparse = encoder.encode_batch(texts, output="torch")
    torch.sparse_csr_tensor(sparse.crow_indices(), sparse.col_indices(), sparse.values(), size=sparse.shape,
                            check_invariants=True)
    assert torch.equal(sparse.mul(dense_torch).to_dense(), dense_torch * dense_torch)
    for row, (text, vector, (ids, weights)) in enumerate(zip(texts, dicts, pairs)):
        assert encoder.decode(ids, weights) == vector
        assert encoder.decode(ids) == list(vector)
        assert list(weights) == sorted(weights, reverse=True)
        single_ids, single_weights = encoder.encode_to_ids(text)  # batch padding may move weights by ~1e-7
        assert encoder.decode(single_ids, single_weights) == encoder.encode(text)
        assert {encoder.decode([i])[0]: w for i, w in zip(matrix[row].indices, matrix[row].data)} == vector
    assert matrix[1].nnz == 0
    assert encoder.encode_queries(texts) == encoder.encode_batch(texts, kind="query")
    assert encoder.encode_documents(texts) == dicts


def test_encoder_batching_does_not_change_vectors(encoder):
    texts = [f"{'long ' * (i * 5)}text number {i}" for i in range(9)]
    alone = torch.stack([encoder.encode_batch([t], output="torch").to_dense()[0] for t in texts])
    for batch_size in (1, 4, 32):
        batched = encoder.encode_batch(texts, batch_size=batch_size, output="torch").to_dense()
        assert (batched - alone).abs().max().item() <= 1e-5



def test_encoder_large_inputs_go_in_windows_with_bounded_tokenizer_calls(encoder, monkeypatch):
    import fles1_encoder

    texts = [f"{'long ' * (i % 7 * 5)}text number {i}" for i in range(23)]
    texts[4], texts[11], texts[17] = "", "\u200b", "  "  # blank, no tokens, blank: empty vectors, in place
    expected = encoder.encode_batch(texts, batch_size=4, output="torch").to_dense()
    backend = encoder._rust_tokenizer("document")
    calls = []

    class CountingTokenizer:  # the encoder's own Rust tokenizer, each call's size recorded
        def encode_batch(self, batch):
            calls.append(len(batch))
            return backend.encode_batch(batch)

    monkeypatch.setattr(fles1_encoder, "SORT_WINDOW_TEXTS", 6)
    monkeypatch.setattr(fles1_encoder, "TOKENIZE_CHUNK_TEXTS", 4)
    monkeypatch.setattr(encoder, "_rust_tokenizer", lambda kind: CountingTokenizer())
    windowed = encoder.encode_batch(texts, batch_size=4, output="torch").to_dense()
    # the 21 non-blank texts (the zero-width space too), windows of 6 (6+6+6+3), at most a chunk of 4 per call
    assert calls == [4, 2, 4, 2, 4, 2, 3]
    assert windowed[[4, 11, 17]].count_nonzero() == 0 and windowed.count_nonzero(dim=1).gt(0).sum() == 20
    assert (windowed - expected).abs().max().item() <= 1e-5  # other batch partners: same vectors

def test_encoder_tokenizes_like_the_wrapper_without_reconfiguring_it(shipped, fles1_checkpoint):
    from transformers import AutoTokenizer

    texts = ["heart " * 300 + "cancer " * 300, "What is machine learning?", "🚀 naïve café Brustkrebs"]
    for side in ("right", "left"):
        tokenizer = AutoTokenizer.from_pretrained(fles1_checkpoint, trust_remote_code=True, truncation_side=side)
        encoder = FLES1Encoder(shipped.model, tokenizer)
        tokenizer.backend_tokenizer.enable_truncation(7)  # the user's own setting on the shared tokenizer
        before = tokenizer.backend_tokenizer.truncation
        for kind in ("document", "query", "document"):
            ours = encoder._tokenize(texts, kind)
            assert [encoder._token_ids_one(text, kind) for text in texts] == ours
            assert encoder.encode(texts[0], kind=kind)
            assert tokenizer.backend_tokenizer.truncation == before  # never re-configured by the encoder
            expected = tokenizer(texts, truncation=True, max_length=encoder.max_lengths[kind])["input_ids"]
            assert ours == expected and len(ours[0]) == encoder.max_lengths[kind]
            tokenizer.backend_tokenizer.enable_truncation(7)  # the wrapper re-configured it: back to the user's
        kept = tokenizer.convert_ids_to_tokens(ours[0][1:-1])
        assert set(kept) == {"heart" if side == "right" else "cancer"}


def test_encoder_progress_bar_for_long_inputs(encoder, capsys):
    encoder.encode_batch(["heart"] * 3, show_progress_bar=True)
    assert "Encoding documents" in capsys.readouterr().err


def test_encoder_single_text_path_matches_the_batch_path(shipped):
    texts = ["What is machine learning?", "statins " * 300, "🚀 naïve café Brustkrebs", "a"]
    shipped.encode_batch(texts)  # documents first: the query truncation must not depend on what ran before
    for kind in ("query", "document"):
        for text in texts:
            assert shipped._token_ids_one(text, kind) == shipped._tokenize([text], kind)[0]
        batch = shipped.encode_batch(texts, kind=kind, threshold=0.0, batch_size=1)
        for text, expected in zip(texts, batch):
            single = shipped.encode(text, kind=kind, threshold=0.0)
            assert list(single) == list(expected)  # same terms in the same order
            assert max(abs(single[t] - expected[t]) for t in single) <= 1e-6


def test_encoder_single_text_path_on_a_checkpoint_without_encode_sparse_terms(tiny_random_checkpoint, monkeypatch):
    """A checkpoint saved before `encode_sparse_terms` existed ships a modeling_fles1.py without it (the remote
    code is the checkpoint's): single texts then take the dense vector, with the same terms and weights."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    text = "aspirin lowers the risk of heart attacks"
    expected = encoder.encode(text, threshold=0.0)
    monkeypatch.delattr(type(encoder.model), "encode_sparse_terms")
    single = encoder.encode(text, threshold=0.0)
    assert expected and list(single) == list(expected)
    assert max(abs(single[t] - expected[t]) for t in single) <= 1e-6
    assert encoder.encode_to_ids("") == ([], [])


@pytest.mark.parametrize("device", ["cuda:99", "banana"])  # no 100th GPU on any machine this runs on
def test_encoder_unusable_device_is_a_clear_error(tiny_random_checkpoint, device):
    with pytest.raises(ValueError, match=f"device={device!r}"):
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device=device)


def test_encoder_device_error_is_one_line_naming_the_devices_there(tiny_random_checkpoint, monkeypatch):
    """On the H200, cuda:99 raised CUDA's four-line 'invalid device ordinal' advice: the CLIs print the error's
    last line, which said only 'Compile with TORCH_USE_CUDA_DSA...'. Seen here through a stand-in for CUDA."""
    from fles1_encoder import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as error:
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cuda:2")
    assert str(error.value) == "device='cuda:2' is not usable here: this machine has 2 CUDA devices (cuda:0 to cuda:1)"

    def failing_empty(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported\n"
                           "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
    monkeypatch.setattr(torch, "empty", failing_empty)
    with pytest.raises(ValueError) as error:
        _resolve_device("cuda:1")
    assert str(error.value) == "device='cuda:1' is not usable here: CUDA error: out of memory"


def test_encoder_follows_added_tokens_and_a_resized_vocabulary(tiny_random_checkpoint):
    """Tokens added after the first encode were ignored (the encoder's tokenizer copies and id -> term list were
    built then), and an id of the resized vocabulary raised IndexError."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    encoder.encode("a first text builds the caches")
    assert encoder.tokenizer.add_tokens(["covid19"]) == 1
    encoder.model.resize_token_embeddings(len(encoder.tokenizer))
    new_id = len(encoder.tokenizer) - 1
    assert new_id in encoder._token_ids_one("covid19 vaccine trials", "document")
    assert encoder.decode([new_id]) == ["covid19"]
    one = encoder.encode("covid19 vaccine trials", threshold=0.0)
    assert one == pytest.approx(encoder.encode_batch(["covid19 vaccine trials"], threshold=0.0)[0], abs=1e-5)
    assert encoder.encode_to_csr(["covid19"]).shape == (1, new_id + 1)
    with torch.no_grad():  # make the new term fire: its decoder row along a hidden state of the text
        ids = torch.tensor([encoder._token_ids_one("covid19", "document")], device=encoder.model.device)
        state = encoder.model._hidden_states(ids, None, None)[0].mean(dim=0)
        encoder.model.cls.predictions.decoder.weight[new_id] = state / state.norm() * 2
    assert "covid19" in encoder.encode("covid19", threshold=0.0)


def test_encoder_refuses_a_tokenizer_past_the_vocabulary_and_lengths_past_the_positions(tiny_random_checkpoint,
                                                                                         tmp_path):
    """A model resized below its tokenizer loaded, then every text holding a high id raised a bare IndexError (and
    lost the whole batch); a config edited to a max length past the position embeddings failed inside BERT."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_random_checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_checkpoint)
    model.resize_token_embeddings(30000)
    with pytest.raises(ValueError, match="the tokenizer has 30522 tokens for a vocabulary of 30000 rows"):
        FLES1Encoder(model, tokenizer)
    model.resize_token_embeddings(30522)
    encoder = FLES1Encoder(model, tokenizer)
    encoder.tokenizer.add_tokens(["covid19"])  # and no resize
    with pytest.raises(ValueError, match="the tokenizer has 30523 tokens for a vocabulary of 30522 rows"):
        encoder.encode("covid19")
    model.config.query_max_length = 1000
    with pytest.raises(ValueError, match=r"config.query_max_length=1000 exceeds max_position_embeddings=512"):
        FLES1Encoder(model, AutoTokenizer.from_pretrained(tiny_random_checkpoint))


def test_encoder_encodes_in_eval_mode_and_leaves_a_training_model_training(tiny_random_checkpoint):
    """A model put back in training (an encoder evaluating between training steps) gave dropout-noisy vectors,
    different on every call; and wrapping a training model in an encoder switched its dropout off for good."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    texts = ["statins lower ldl cholesterol", "vitamin d and breast cancer risk in older women"]
    expected = encoder.encode(texts[1], threshold=0.0), encoder.encode_batch(texts, threshold=0.0)
    encoder.model.train()
    for _ in range(2):
        single, batch = encoder.encode(texts[1], threshold=0.0), encoder.encode_batch(texts, threshold=0.0)
        assert single == pytest.approx(expected[0], abs=1e-6) and list(single) == list(expected[0])
        assert all(got == pytest.approx(want, abs=1e-6) for got, want in zip(batch, expected[1]))
        assert encoder.model.training
    rewrapped = FLES1Encoder(encoder.model, encoder.tokenizer)
    assert encoder.model.training and rewrapped.encode(texts[1], threshold=0.0) == pytest.approx(expected[0], abs=1e-6)


def test_encoder_runs_a_model_that_accelerate_offloads(tiny_random_checkpoint):
    """cpu_offload leaves every weight on the meta device between forwards: the encoder sent its inputs there (its
    device was the embeddings' meta), and nothing could be computed."""
    from accelerate import cpu_offload

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    texts = ["statins lower ldl cholesterol", "vitamin d and breast cancer risk in older women"]
    # 1e-3: no weight within the paths' float32 differences (~1e-6) of the cut
    expected = encoder.encode(texts[1], threshold=1e-3), encoder.encode_batch(texts, threshold=1e-3)
    offloaded = FLES1Encoder(cpu_offload(encoder.model, execution_device=torch.device("cpu")), encoder.tokenizer)
    assert offloaded.model.bert.embeddings.word_embeddings.weight.is_meta and offloaded.device == torch.device("cpu")
    single, batch = offloaded.encode(texts[1], threshold=1e-3), offloaded.encode_batch(texts, threshold=1e-3)
    assert single == pytest.approx(expected[0], abs=1e-5) and set(single) == set(expected[0])
    assert all(got == pytest.approx(want, abs=1e-5) for got, want in zip(batch, expected[1]))


def test_encoder_switches_dropout_off_when_only_a_submodule_is_training(tiny_random_checkpoint):
    """``model.eval(); model.bert.train()``: the encoder and the trace looked at the root's flag only, so every call
    ran dropout (other vectors each time) and the trace built meanwhile failed its check and stayed off."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    encoder.model.clear_caches()
    texts = ["statins lower ldl cholesterol", "vitamin d and breast cancer risk in older women"]
    expected = encoder.encode(texts[1], threshold=0.0), encoder.encode_batch(texts, threshold=0.0)
    encoder.model.clear_caches()  # the trace is built below, with the submodule training
    encoder.model.eval()
    encoder.model.bert.encoder.train()
    for _ in range(2):
        single, batch = encoder.encode(texts[1], threshold=0.0), encoder.encode_batch(texts, threshold=0.0)
        assert single == pytest.approx(expected[0], abs=1e-6) and list(single) == list(expected[0])
        assert all(got == pytest.approx(want, abs=1e-6) for got, want in zip(batch, expected[1]))
        assert encoder.model.bert.encoder.training and not encoder.model.training  # modes as they were
    assert encoder.model.__dict__["_fles1_traced_hidden_states"][1] is not None  # the trace is on


def test_encoder_keeps_a_training_model_in_eval_mode_while_threads_encode(tiny_random_checkpoint):
    """Each call restored train() on exit, switching dropout back on under other threads still encoding; and
    train() reset submodules the user had put in eval mode."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    texts = ["statin use and breast cancer survival in a large cohort of women"] * 8
    expected = encoder.encode_batch(texts, batch_size=2)
    encoder.model.train()
    encoder.model.bert.embeddings.eval()  # e.g. frozen embeddings
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encoder.encode_batch(texts, batch_size=2), range(24)))
    assert all(result == expected for result in results)
    assert encoder.model.training and encoder.model.bert.encoder.training
    assert not encoder.model.bert.embeddings.training and not encoder.model.bert.embeddings.dropout.training


@pytest.mark.parametrize("target, mode", [("model", False), ("embeddings", False), ("model", True)])
def test_encoder_keeps_a_mode_set_by_another_thread_while_it_encodes(tiny_random_checkpoint, target, mode):
    """The flags saved when an encode of a training model began were put back when it returned: a model.eval()
    called meanwhile was undone, leaving dropout on for everything else using the model."""
    import threading

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    model, text = encoder.model, "statin use and breast cancer survival"
    module = model if target == "model" else model.bert.embeddings
    expected = encoder.encode(text, threshold=0.0)
    inside, go = threading.Event(), threading.Event()

    def hold(*_):  # keeps the encode in flight while the main thread changes the mode
        inside.set()
        assert go.wait(30)

    model.train()
    handle = model.bert.encoder.register_forward_pre_hook(hold)
    results = []
    worker = threading.Thread(target=lambda: results.append(encoder.encode(text, threshold=0.0)))
    worker.start()
    try:
        assert inside.wait(30)
        assert (module.train() if mode else module.eval()) is module  # as nn.Module.train returns
        in_flight_dropout = model.dropout_active()
    finally:
        go.set()
        worker.join(30)
        handle.remove()
    assert not in_flight_dropout  # the encode in flight keeps dropout off
    assert results == [expected]
    assert all(child.training == mode for child in module.modules())
    if target == "embeddings":  # the rest still training
        assert model.training and model.bert.encoder.training
    assert not any("train" in vars(child) for child in model.modules())  # the stand-ins are gone
    model.train()
    assert model.dropout_active()  # nn.Module.train again


class FrozenDropout(torch.nn.Module):
    """A submodule that stays in eval mode whatever train() asks (module level: a model holding it pickles)."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def train(self, mode=True):
        return super().train(False)


def test_encoder_mode_changes_meanwhile_go_through_each_modules_own_train_and_spare_copies(tiny_random_checkpoint):
    """The stand-ins for train() while an encode runs wrote flags straight into the subtree, so a class's own
    train() (a frozen submodule that stays in eval) never ran; and a copy or pickle of the model taken meanwhile kept
    a stand-in whose train() did nothing, for good."""
    import copy
    import pickle
    import threading

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    model = encoder.model
    model.frozen = FrozenDropout()
    model.train()
    assert not model.frozen.training and not model.frozen.drop.training
    copies = []

    def meanwhile(*_):  # inside the encode: copies of the model, then a train() for the replay
        handle.remove()  # not copied with the model (a local function does not pickle)
        if not copies:
            copies.extend([copy.deepcopy(model), pickle.loads(pickle.dumps(model))])
            assert b"TrainWhileEncoding" not in pickle.dumps(model)  # no fles1_encoder object in a saved model
            model.train()

    handle = model.bert.encoder.register_forward_pre_hook(meanwhile)
    thread = threading.Thread(target=encoder.encode, args=("statin use and breast cancer survival",))
    thread.start()
    thread.join(30)
    assert len(copies) == 2
    assert model.training and model.bert.encoder.training and model.dropout_active()
    assert not model.frozen.training and not model.frozen.drop.training  # its own train() ran
    for copied in copies:  # taken in eval mode; their train() is the class's
        assert not copied.dropout_active()
        copied.train()
        assert copied.dropout_active() and copied.bert.encoder.layer[0].attention.self.dropout.training
        assert not copied.frozen.training
        copied.eval()
        assert not copied.dropout_active()
    # a copy's class train, bound in its dict, was taken for "a train of its own": no stand-in, and an eval() during
    # the copy's own encode was undone again
    copied = copies[0]
    copied.train()
    copy_encoder = FLES1Encoder(copied, encoder.tokenizer)

    def evaluate_meanwhile(*_):
        copy_handle.remove()
        copied.eval()

    copy_handle = copied.bert.encoder.register_forward_pre_hook(evaluate_meanwhile)
    copy_encoder.encode("statin use and breast cancer survival")
    assert not copied.dropout_active() and not any("train" in vars(module) for module in copied.modules())


def test_encoder_follows_a_model_assigned_to_it(tiny_random_checkpoint):
    """``encoder.model = other`` (a server swapping in new weights) encoded with the first model's threshold and
    max lengths, and reported its dtype and device."""
    from modeling_fles1 import FLES1ForMaskedLM

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    text = " ".join(["statins lower ldl cholesterol in older adults"] * 4)
    encoder.encode(text, kind="query")
    other = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint, inference_threshold=0.05, query_max_length=8)
    encoder.model = other.eval().double()
    assert "dtype=float64" in repr(encoder)  # at once, before anything syncs the encoder
    assert encoder.config is other.config and encoder.threshold == 0.05 and encoder.max_lengths["query"] == 8
    fresh = FLES1Encoder(other, encoder.tokenizer)
    assert encoder.encode(text, kind="query") == fresh.encode(text, kind="query")
    assert encoder.encode_to_ids(text, kind="query") == fresh.encode_to_ids(text, kind="query")


def test_encoder_follows_a_truncation_side_set_after_first_use(shipped):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped.config.name_or_path, trust_remote_code=True)
    encoder = FLES1Encoder(shipped.model, tokenizer)
    text = "heart " * 100 + "cancer"
    assert "cancer" not in encoder.encode(text, kind="query", threshold=0.0)  # cut at 64 tokens from the right
    tokenizer.truncation_side = "left"
    assert "cancer" in encoder.encode(text, kind="query", threshold=0.0)
    assert "cancer" in encoder.encode_batch([text], kind="query", threshold=0.0)[0]
    encoder.tokenizer = AutoTokenizer.from_pretrained(shipped.config.name_or_path, trust_remote_code=True)
    assert "cancer" not in encoder.encode(text, kind="query", threshold=0.0)  # a replaced tokenizer is followed


def test_encoder_takes_numpy_scalars_for_threshold_and_batch_size(encoder):
    text = "aspirin lowers the risk of heart attacks"
    expected = encoder.encode(text, threshold=0.3)
    assert encoder.encode(text, threshold=np.float32(0.3)) == expected
    batch = encoder.encode_batch([text] * 3, batch_size=2, threshold=0.3)
    assert encoder.encode_batch([text] * 3, batch_size=np.int64(2), threshold=np.float32(0.3)) == batch
    for bad in (np.bool_(True), True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            encoder.encode_batch([text], batch_size=bad)
        with pytest.raises(ValueError, match="threshold must be a number >= 0"):
            encoder.encode(text, threshold=bad)


def test_encoder_nan_model_output_is_an_error_not_an_empty_vector(tiny_random_checkpoint):
    """NaN weights fail every threshold comparison: a diverged checkpoint encoded every text to {} (or to int8
    estimates), which an index takes silently."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    with torch.no_grad():
        encoder.model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^text: the model's output is NaN"):
        encoder.encode("statins lower ldl cholesterol")
    with pytest.raises(FloatingPointError, match=r"^texts\[1\]: the model's output is NaN"):
        encoder.encode_batch(["", "statins lower ldl cholesterol"])
    assert encoder.encode_batch(["", " "]) == [{}, {}]  # blank texts never reach the model


def test_encoder_infinite_model_output_is_an_error(tiny_random_checkpoint):
    """An inf output bias (or a half-precision overflow) encoded to {'[PAD]': inf, ...}: an index's scores then
    become inf, or NaN where a query weight is 0."""
    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    with torch.no_grad():
        encoder.model.cls.predictions.bias[1000] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^text: the model's output is NaN or infinite"):
        encoder.encode("statins lower ldl cholesterol")
    with pytest.raises(FloatingPointError, match=r"^texts\[0\]: the model's output is NaN or infinite"):
        encoder.encode_batch(["statins lower ldl cholesterol", "vitamin d"], output="csr")


def test_encoder_shadowed_by_another_folders_model_files_refuses_rather_than_run_the_checkpoints(
        tiny_random_checkpoint, tmp_path, monkeypatch):
    """With another folder's configuration_fles1 imported first, the encoder fell back to the checkpoint's own code,
    silently."""
    import fles1_encoder

    other = shutil.copytree(tiny_random_checkpoint, tmp_path / "other")
    monkeypatch.setitem(sys.modules, "configuration_fles1", type(sys)("configuration_fles1"))
    sys.modules["configuration_fles1"].__file__ = str(other / "configuration_fles1.py")
    with pytest.raises(CheckpointError, match=r"configuration_fles1 is imported from .*other/configuration_fles1\.py, "
                                              r"not from beside .*fles1_encoder\.py; pass trust_remote_code=True"):
        fles1_encoder.FLES1Encoder.from_pretrained(tiny_random_checkpoint)


def _hub_cache_with(checkpoint: str, cache, repo_id: str = "me/fles1", subfolder: str = "") -> str:
    """`checkpoint` as huggingface_hub caches a download of `repo_id` (main), optionally under `subfolder`."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoint, snapshot / subfolder)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    return str(snapshot / subfolder)


def test_a_hub_checkpoint_gets_the_length_check_a_folder_gets(fles1_checkpoint, tmp_path):
    """The same files warned loaded from a folder and were silent loaded by hub id."""
    snapshot = _hub_cache_with(fles1_checkpoint, tmp_path / "cache")
    settings = json.loads(open(os.path.join(snapshot, "sentence_bert_config.json")).read())
    with open(os.path.join(snapshot, "sentence_bert_config.json"), "w") as handle:
        json.dump({**settings, "query_length": 16}, handle)
    with pytest.warns(UserWarning, match=r"sentence-transformers cuts in encode_query at 16 tokens"):
        FLES1Encoder.from_pretrained("me/fles1", device="cpu", cache_dir=str(tmp_path / "cache"))
    import warnings

    with warnings.catch_warnings():  # the caller's own length: its choice, not the checkpoint's mismatch
        warnings.simplefilter("error")
        FLES1Encoder.from_pretrained("me/fles1", device="cpu", cache_dir=str(tmp_path / "cache"), query_max_length=16)


def test_a_checkpoint_loaded_from_a_subfolder_saves_that_subfolders_companion_files(fles1_checkpoint, tmp_path):
    """Its LICENSE and fles1_encoder.py were looked up at the repo's root: not saved, or another checkpoint's."""
    from modeling_fles1 import FLES1ForMaskedLM

    for where, kwargs in (("folder", {}), ("hub", {"cache_dir": str(tmp_path / "cache")})):
        if where == "folder":
            shutil.copytree(fles1_checkpoint, tmp_path / "repo" / "fles1")
            source, folder = str(tmp_path / "repo"), tmp_path / "repo" / "fles1"
        else:
            source, folder = "me/fles1", Path(_hub_cache_with(fles1_checkpoint, tmp_path / "cache", subfolder="fles1"))
        (folder / "LICENSE").write_text(f"the {where} subfolder's license")
        model = FLES1ForMaskedLM.from_pretrained(source, subfolder="fles1", **kwargs)
        model.save_pretrained(str(tmp_path / f"saved-{where}"))
        assert (tmp_path / f"saved-{where}" / "LICENSE").read_text() == f"the {where} subfolder's license"
        # a subfolder without one: the repo root's license covers it
        (folder.parent / "LICENSE").write_text(f"the {where} root's license")
        os.remove(folder / "LICENSE")
        model = FLES1ForMaskedLM.from_pretrained(source, subfolder="fles1", **kwargs)
        model.save_pretrained(str(tmp_path / f"saved-root-{where}"))
        assert (tmp_path / f"saved-root-{where}" / "LICENSE").read_text() == f"the {where} root's license"
