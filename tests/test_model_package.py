"""The FLES-1 checkpoint folder: layout, the three loaders agreeing, save/load, conversion, the sparse projection."""

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from configuration_fles1 import FLES1Config
from modeling_fles1 import FLES1ForMaskedLM

LONG_DOCUMENT = "Statins lower LDL cholesterol and reduce cardiovascular risk in adults with diabetes. " * 40
TEXTS = [
    "What is machine learning?",
    LONG_DOCUMENT,
    "Vitamin D und Brustkrebs: ¿qué dice la evidencia? 日本語のテキスト 🚀🔥 naïve café",
    "a",
    "diet",
]


def naive_sparse(model, features):
    """SPLADE's definition on the full (batch x length x vocab) logits: max_t log(1 + ReLU(logit)), padding masked."""
    logits = model(**features).logits
    mask = features["attention_mask"].bool().unsqueeze(-1)
    return torch.log1p(torch.relu(logits)).masked_fill(~mask, 0).amax(dim=1)


def test_model_checkpoint_folder_layout(fles1_checkpoint):
    files = set(os.listdir(fles1_checkpoint))
    for name in ("config.json", "configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json"):
        assert name in files, name
    config = json.load(open(os.path.join(fles1_checkpoint, "config.json")))
    assert config["model_type"] == "fles1"
    assert config["architectures"] == ["FLES1ForMaskedLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fles1.FLES1Config",
        "AutoModel": "modeling_fles1.FLES1ForMaskedLM",
        "AutoModelForMaskedLM": "modeling_fles1.FLES1ForMaskedLM",
    }
    assert (config["inference_threshold"], config["query_max_length"], config["document_max_length"]) == (0.3, 64, 256)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    # converted offline (HF_HUB_OFFLINE=1), yet the shipped tokenizer settings do not carry that machine's flag
    tokenizer_config = json.load(open(os.path.join(fles1_checkpoint, "tokenizer_config.json")))
    assert not {"local_files_only", "is_local"} & set(tokenizer_config) and tokenizer_config["model_max_length"] == 256


def test_checkpoints_carry_the_backbones_license_files(fles1_checkpoint, backbone_dir, tmp_path):
    """Converted and trained folders (and so the Hub repo) held no LICENSE, though the card puts the weights under
    Apache-2.0, which asks a redistribution to include it."""
    from transformers import AutoTokenizer

    from fles1.checkpoint import save_checkpoint
    from fles1.training.run import load_model_for_training

    license_text = open(os.path.join(backbone_dir, "LICENSE"), "rb").read()
    assert open(os.path.join(fles1_checkpoint, "LICENSE"), "rb").read() == license_text  # convert_fles1.py
    model = FLES1ForMaskedLM.from_pretrained(fles1_checkpoint)  # a trained model saves from where it was loaded
    save_checkpoint(model, AutoTokenizer.from_pretrained(fles1_checkpoint), str(tmp_path / "trained"))
    assert open(tmp_path / "trained" / "LICENSE", "rb").read() == license_text
    model, _ = load_model_for_training(backbone_dir)  # a BERT backbone, converted on the fly into a temporary
    assert model.name_or_path == backbone_dir


def test_a_hub_backbones_license_files_come_from_the_hub_cache(backbone_dir, tmp_path, monkeypatch):
    """Only a local folder's were copied: recipes/fles1-v14.yaml trains from google-bert/bert-base-uncased."""
    import huggingface_hub.constants

    from fles1.checkpoint import copy_license_files

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--backbone" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "LICENSE").write_bytes(open(os.path.join(backbone_dir, "LICENSE"), "rb").read())
    (cache / "models--org--backbone" / "refs").mkdir()
    (cache / "models--org--backbone" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # offline: the cache answers
    (tmp_path / "out").mkdir()
    assert copy_license_files("org/backbone", str(tmp_path / "out")) == ["LICENSE"]
    assert (tmp_path / "out" / "LICENSE").read_bytes() == (snapshot / "LICENSE").read_bytes()
    with pytest.warns(UserWarning, match=r"org/elsewhere: its license files could not be fetched"):
        assert copy_license_files("org/elsewhere", str(tmp_path / "out")) == []


def test_model_three_loaders_agree_on_shipped_backbone(fles1_checkpoint):
    from sentence_transformers import SparseEncoder
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from fles1_encoder import FLES1Encoder

    tokenizer = AutoTokenizer.from_pretrained(fles1_checkpoint, trust_remote_code=True)
    assert len(tokenizer(LONG_DOCUMENT)["input_ids"]) > 256  # the long text really gets truncated
    encoder = FLES1Encoder.from_pretrained(fles1_checkpoint, threshold=0.0)
    st = SparseEncoder(fles1_checkpoint, trust_remote_code=True)
    # FLES1Encoder and SparseEncoder take a GPU where there is one: the transformers models follow them there
    device = encoder.device
    assert st.device.type == device.type
    masked_lm = AutoModelForMaskedLM.from_pretrained(fles1_checkpoint, trust_remote_code=True).eval().to(device)
    auto_model = AutoModel.from_pretrained(fles1_checkpoint, trust_remote_code=True).eval().to(device)
    assert type(auto_model).__name__ == type(masked_lm).__name__ == "FLES1ForMaskedLM"

    for kind, max_length in (("query", 64), ("document", 256)):
        features = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        assert not features["attention_mask"].all()  # the batch is padded
        features = features.to(device)
        with torch.inference_mode():
            reference = naive_sparse(masked_lm, features)
            via_auto_model = auto_model.encode_sparse(**features).sparse_embeddings
        st_encode = st.encode_query if kind == "query" else st.encode_document
        via_st = st_encode(TEXTS, convert_to_tensor=True).to_dense().float()
        via_encoder = encoder.encode_batch(TEXTS, kind=kind, output="torch").to_dense()
        one_by_one = torch.stack([encoder.encode_batch([text], kind=kind, output="torch").to_dense()[0] for text in TEXTS])
        assert (reference > 0).sum(dim=1).min() > 0
        for vectors in (via_auto_model, via_st, via_encoder, one_by_one):
            assert vectors.shape == reference.shape
            assert (vectors.to(device) - reference).abs().max().item() <= 1e-5


def test_sentence_transformers_training_cuts_queries_at_64_given_the_readmes_router_mapping(fles1_checkpoint):
    """What the README tells sentence-transformers trainers: without router_mapping every column is a document."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.data_collator import SparseEncoderDataCollator

    model = SparseEncoder(fles1_checkpoint, trust_remote_code=True)
    row = {"query": "apple " * 300, "positive": "pear " * 300, "negative": "fig"}
    lengths = {}
    for mapping in (None, {"query": "query", "positive": "document", "negative": "document"}):
        collator = SparseEncoderDataCollator(preprocess_fn=model.preprocess, router_mapping=mapping or {})
        batch = collator([row])
        lengths[mapping is not None] = (batch["query_input_ids"].shape[1], batch["positive_input_ids"].shape[1])
    assert lengths == {False: (256, 256), True: (64, 256)}


def test_model_sparse_ir_evaluator_runs_on_sparse_encoder(fles1_checkpoint, nfcorpus_dir):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    from fles1.beir import load_beir

    data = load_beir(nfcorpus_dir, "test")
    query_ids = sorted(data.qrels)[:4]
    relevant = {qid: {did for did, rel in data.qrels[qid].items() if rel > 0 and did in data.corpus} for qid in query_ids}
    doc_ids = sorted({did for dids in relevant.values() for did in dids})[:40] + sorted(data.corpus)[:20]
    corpus = {did: data.document_text(did) for did in doc_ids}
    relevant = {qid: dids & set(corpus) for qid, dids in relevant.items()}
    evaluator = SparseInformationRetrievalEvaluator(
        queries={qid: data.queries[qid] for qid in query_ids}, corpus=corpus, relevant_docs=relevant,
        name="tiny", show_progress_bar=False, batch_size=16,
    )
    metrics = evaluator(SparseEncoder(fles1_checkpoint, trust_remote_code=True))
    ndcg = [value for key, value in metrics.items() if key.endswith("ndcg@10")]
    assert ndcg and 0 < ndcg[0] <= 1


def test_model_save_load_round_trip(tiny_random_checkpoint, tmp_path):
    from fles1.checkpoint import HUB_CODE_FILES, save_checkpoint
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, threshold=0.0)
    encoder.model.config.inference_threshold = 0.05
    encoder.model.config.query_max_length = 12
    save_checkpoint(encoder.model, encoder.tokenizer, str(tmp_path / "copy"))
    reloaded = FLES1Encoder.from_pretrained(str(tmp_path / "copy"))
    config = json.load(open(tmp_path / "copy" / "config.json"))
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    assert all((tmp_path / "copy" / name).is_file() for name in HUB_CODE_FILES)
    assert (reloaded.threshold, reloaded.max_lengths["query"], reloaded.max_lengths["document"]) == (0.05, 12, 48)
    for kind, texts in (("document", TEXTS), ("query", TEXTS[:1])):  # TEXTS[0] fits either query length
        before = encoder.encode_batch(texts, kind=kind, output="torch").to_dense()
        after = reloaded.encode_batch(texts, kind=kind, threshold=0.0, output="torch").to_dense()
        assert torch.equal(before, after)


def test_saves_through_transformers_and_sentence_transformers_keep_the_encoder_file(tiny_random_checkpoint, tmp_path):
    """transformers copies only the code it imports: a folder saved by AutoModel or by sentence-transformers
    lacked fles1_encoder.py, the file the README has users fetch from the Hub repo."""
    from sentence_transformers import SparseEncoder
    from transformers import AutoModelForMaskedLM

    shipped = (Path(tiny_random_checkpoint) / "fles1_encoder.py").read_bytes()
    model = AutoModelForMaskedLM.from_pretrained(tiny_random_checkpoint, trust_remote_code=True)  # remote code
    model.save_pretrained(tmp_path / "auto")
    SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu").save_pretrained(str(tmp_path / "st"))
    for folder in ("auto", "st"):
        assert (tmp_path / folder / "fles1_encoder.py").read_bytes() == shipped
    model.save_pretrained(tmp_path / "auto")  # again, onto itself's folder: nothing breaks
    AutoModelForMaskedLM.from_pretrained(tmp_path / "auto", trust_remote_code=True).save_pretrained(tmp_path / "auto")
    assert (tmp_path / "auto" / "fles1_encoder.py").read_bytes() == shipped


def test_saves_of_a_model_loaded_by_hub_id_keep_the_encoder_and_license_files(tiny_random_checkpoint, tmp_path,
                                                                               monkeypatch):
    """Loaded by hub id (the README's usage), a model saved by transformers or sentence-transformers -- a fine-tune
    about to be pushed -- lacked fles1_encoder.py (looked up only in a local folder, then in transformers' module
    cache, which holds the modeling files alone) and, from any source, the license files."""
    import huggingface_hub.constants
    from sentence_transformers import SparseEncoder
    from transformers import AutoModelForMaskedLM

    import hashlib

    cache = tmp_path / "hub"
    # a commit per code version: transformers keeps a hub repo's remote code per commit, and would run another
    # version's modeling_fles1.py copied there by an earlier run
    commit = hashlib.sha1(b"".join(open(os.path.join(tiny_random_checkpoint, name), "rb").read()
                                   for name in ("modeling_fles1.py", "configuration_fles1.py"))).hexdigest()
    snapshot = cache / "models--org--fles1" / "snapshots" / commit
    shutil.copytree(tiny_random_checkpoint, snapshot)
    encoder_file = (snapshot / "fles1_encoder.py").read_bytes() + b"# the repo's own copy\n"
    (snapshot / "fles1_encoder.py").write_bytes(encoder_file)
    (snapshot / "LICENSE").write_text("Apache License 2.0 (the repo's)\n")
    (cache / "models--org--fles1" / "refs").mkdir()
    (cache / "models--org--fles1" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    later = cache / "models--org--fles1" / "snapshots" / ("f" * 40)  # main moved on: a pinned load saves its own
    shutil.copytree(snapshot, later)
    (later / "LICENSE").write_text("a later revision's\n")
    (cache / "models--org--fles1" / "refs" / "main").write_text("f" * 40)
    AutoModelForMaskedLM.from_pretrained("org/fles1", revision=commit, trust_remote_code=True).save_pretrained(
        tmp_path / "pinned")
    assert (tmp_path / "pinned" / "LICENSE").read_text() == "Apache License 2.0 (the repo's)\n"
    (cache / "models--org--fles1" / "refs" / "main").write_text(commit)
    AutoModelForMaskedLM.from_pretrained("org/fles1", trust_remote_code=True).save_pretrained(tmp_path / "auto")
    SparseEncoder("org/fles1", trust_remote_code=True, device="cpu").save_pretrained(str(tmp_path / "st"))
    for folder in ("auto", "st"):
        assert (tmp_path / folder / "fles1_encoder.py").read_bytes() == encoder_file
        assert (tmp_path / folder / "LICENSE").read_text() == "Apache License 2.0 (the repo's)\n"
    # a local folder's license files too, and a license already in the target folder is not replaced
    local = tmp_path / "local"
    shutil.copytree(snapshot, local)
    (local / "NOTICE").write_text("notice\n")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "LICENSE").write_text("the fine-tuner's own\n")
    SparseEncoder(str(local), trust_remote_code=True, device="cpu").save_pretrained(str(tmp_path / "own"))
    assert (tmp_path / "own" / "NOTICE").read_text() == "notice\n"
    assert (tmp_path / "own" / "LICENSE").read_text() == "the fine-tuner's own\n"


def test_model_convert_leaves_no_code_copy_and_weights_others_can_read(tiny_random_checkpoint, tmp_path):
    """Writing the sentence-transformers files loads the staging folder as remote code: transformers copied the code
    into its modules cache under the staging folder's random name, one orphaned copy per convert (75 in a day
    here). And safetensors writes 0600: a trained model's weights were unreadable to other users next to 0644
    files."""
    from transformers import AutoTokenizer
    from transformers.utils import HF_MODULES_CACHE

    from fles1.checkpoint import convert, save_checkpoint

    cache = os.path.join(HF_MODULES_CACHE, "transformers_modules")
    before = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    umask = os.umask(0o022)
    try:
        out = convert(tiny_random_checkpoint, str(tmp_path / "converted"))
        model = FLES1ForMaskedLM.from_pretrained(out)  # a training save: straight into its folder
        (tmp_path / "checkpoint-2" / "notes").mkdir(parents=True)  # --output-dir . or ~: files private on purpose
        (tmp_path / "checkpoint-2" / "notes" / ".env").write_text("TOKEN=...")
        os.chmod(tmp_path / "checkpoint-2" / "notes" / ".env", 0o600)
        save_checkpoint(model, AutoTokenizer.from_pretrained(out), str(tmp_path / "checkpoint-2"))
    finally:
        os.umask(umask)
    left = sorted((set(os.listdir(cache)) if os.path.isdir(cache) else set()) - before)
    assert not [name for name in left if "partial" in name], left
    for folder in ("converted", "checkpoint-2"):
        modes = {name: oct(os.stat(tmp_path / folder / name).st_mode & 0o777) for name in os.listdir(tmp_path / folder)
                 if os.path.isfile(tmp_path / folder / name)}
        assert set(modes.values()) == {"0o644"}, (folder, modes)
    assert os.stat(tmp_path / "checkpoint-2" / "notes" / ".env").st_mode & 0o777 == 0o600


def test_model_convert_writes_float32_and_says_so_for_a_bf16_source(tiny_random_checkpoint, tmp_path):
    """A bf16 source became float32 weights (twice its size) without a word."""
    from safetensors import safe_open
    from transformers import BertTokenizerFast

    from fles1.checkpoint import convert, save_checkpoint

    source = str(tmp_path / "bf16")
    save_checkpoint(FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint, dtype=torch.bfloat16),
                    BertTokenizerFast.from_pretrained(tiny_random_checkpoint), source)
    with pytest.warns(UserWarning, match=r"bf16: weights are bfloat16; the FLES-1 folder holds them in float32"):
        out = convert(source, str(tmp_path / "converted"))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 source: nothing to say
        convert(out, str(tmp_path / "again"))
    wide = str(tmp_path / "float64")  # rounded, and half the size: not "twice"
    save_checkpoint(FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint, dtype=torch.float64),
                    BertTokenizerFast.from_pretrained(tiny_random_checkpoint), wide)
    with pytest.warns(UserWarning, match=r"weights are float64; the FLES-1 folder holds them in float32 \(half the "
                                         r"size, rounded to float32\)"):
        convert(wide, str(tmp_path / "from-float64"))


def test_model_convert_cli_sets_sparse_settings(backbone_dir, tmp_path):
    import convert_fles1
    from fles1_encoder import FLES1Encoder

    out = str(tmp_path / "converted")
    convert_fles1.main([backbone_dir, out, "--threshold", "0.5", "--query-max-length", "32"])
    encoder = FLES1Encoder.from_pretrained(out)
    assert (encoder.threshold, encoder.max_lengths["query"], encoder.max_lengths["document"]) == (0.5, 32, 256)
    assert min(encoder.encode("statins and cholesterol").values()) >= 0.5


def test_model_convert_a_fles1_folder_changes_its_settings_without_remote_code(fles1_checkpoint, tmp_path, capsys):
    """A FLES-1 source went through AutoModelForMaskedLM, whose auto_map made it remote code: transformers asked
    whether to run it (and, without a terminal, refused). OUT under a file failed only after the load."""
    import convert_fles1
    from fles1_encoder import FLES1Encoder

    out, again = str(tmp_path / "strict"), str(tmp_path / "again")
    assert convert_fles1.main([fles1_checkpoint, out, "--threshold", "0.5"]) == 0, capsys.readouterr().err
    assert convert_fles1.main([out, again]) == 0, capsys.readouterr().err  # no option: the source's settings stay
    text = "statins and cholesterol in older adults"
    reference = FLES1Encoder.from_pretrained(fles1_checkpoint).encode(text, threshold=0.0)
    for folder in (out, again):
        encoder = FLES1Encoder.from_pretrained(folder)
        assert encoder.threshold == 0.5 and encoder.encode(text, threshold=0.0) == reference
    (tmp_path / "a-file").write_text("x")
    assert convert_fles1.main([fles1_checkpoint, str(tmp_path / "a-file" / "out")]) == 2
    assert f"error: {tmp_path / 'a-file' / 'out'}: cannot be created, {tmp_path / 'a-file'} is a file" \
        in capsys.readouterr().err


@pytest.mark.parametrize("name, value, message", [
    ("inference_threshold", -1.0, "inference_threshold must be a number >= 0, got -1.0"),
    ("query_max_length", 10000, "query_max_length=10000 exceeds max_position_embeddings=512"),
    ("pooling", "mean", r"pooling='mean' is not supported; choose one of \['max'\]"),
])
def test_model_save_refuses_a_setting_edited_past_what_loading_takes(tiny_random_checkpoint, tmp_path, name, value,
                                                                     message):
    """save_pretrained wrote it, and from_pretrained then refused the folder."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_random_checkpoint, trust_remote_code=True)
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists() or not os.listdir(tmp_path / "saved")  # not even the code files


def test_model_save_takes_numpy_settings_as_loading_does(tiny_random_checkpoint, tmp_path):
    """A numpy int passed the check, then json.dump failed without naming the setting."""
    import numpy as np
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_random_checkpoint, trust_remote_code=True)
    model.config.query_max_length, model.config.inference_threshold = np.int64(32), np.float32(0.25)
    model.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["query_max_length"], saved["inference_threshold"]) == (32, 0.25)


def test_model_config_rejects_bad_settings():
    for threshold in (-0.1, float("nan"), "0.3", None, True):  # NaN was written into config.json as {"__float__": "NaN"}
        with pytest.raises(ValueError, match=f"inference_threshold must be a number >= 0, got {threshold!r}"):
            FLES1Config(inference_threshold=threshold)
    with pytest.raises(ValueError, match=r"\['max'\]"):
        FLES1Config(pooling="mean")
    with pytest.raises(ValueError, match=r"\['log1p_relu'\]"):
        FLES1Config(activation="relu")
    with pytest.raises(ValueError, match="query_max_length"):
        FLES1Config(query_max_length=2)
    with pytest.raises(ValueError, match="document_max_length=1024 exceeds max_position_embeddings=512"):
        FLES1Config(document_max_length=1024)
    assert FLES1Config(document_max_length=1024, max_position_embeddings=1024).document_max_length == 1024
    small = FLES1Config(max_position_embeddings=128)  # the defaults (64, 256) are capped, not an error
    assert (small.query_max_length, small.document_max_length) == (64, 128)
    assert FLES1Config().to_dict()["document_max_length"] == 256
    import numpy as np  # numpy scalars (a sweep's values) are numbers; config.json gets plain ones

    numpy_config = FLES1Config(inference_threshold=np.float32(0.5), query_max_length=np.int64(32))
    assert json.loads(numpy_config.to_json_string())["query_max_length"] == 32
    assert type(numpy_config.inference_threshold) is float and type(numpy_config.query_max_length) is int


def test_model_convert_cli_bad_source_or_setting_is_one_error_line(backbone_dir, tmp_path, capsys):
    import convert_fles1

    assert convert_fles1.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert convert_fles1.main([backbone_dir, str(tmp_path / "out"), "--document-max-length", "4096"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors[0] == f"error: {tmp_path / 'missing'}: no such folder"
    assert errors[1] == f"error: {backbone_dir}: document_max_length=4096 exceeds max_position_embeddings=512"
    assert not (tmp_path / "out").exists()  # nothing half-written
    for option, value in (("--threshold", "nan"), ("--threshold", "-1"), ("--query-max-length", "2")):
        with pytest.raises(SystemExit) as exit_info:  # a usage error naming the option, before any loading
            convert_fles1.main([backbone_dir, str(tmp_path / "out"), option, value])
        assert exit_info.value.code == 2 and f"{option}: must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, message", [
    ([], "its config.json is not a JSON object of settings"),
    ("hidden_size", "config.json: Validation error for field 'hidden_size'"),
])
def test_model_convert_a_source_config_of_the_wrong_shape_is_one_error_line(backbone_dir, tmp_path, capsys, config,
                                                                              message):
    """A config.json holding a list was "no config.json at its root"; a setting of the wrong type
    ("hidden_size": "abc") a 44-line traceback and exit 1."""
    import convert_fles1

    source = tmp_path / "source"
    shutil.copytree(backbone_dir, source)
    settings = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config if isinstance(config, list) else {**settings, config: "abc"}))
    assert convert_fles1.main([str(source), str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith(f"error: {source}: {message}") and "Traceback" not in "".join(errors)
    assert not (tmp_path / "out").exists()


def test_model_convert_refuses_a_bert_without_its_masked_lm_head(backbone_dir, tmp_path, capsys):
    """transformers initialises a missing head at random: a BertModel became a 'checkpoint' whose vocabulary
    projection was noise, with no error."""
    import convert_fles1
    from transformers import AutoTokenizer, BertModel

    source = tmp_path / "bert-without-head"
    BertModel.from_pretrained(backbone_dir).save_pretrained(source)
    AutoTokenizer.from_pretrained(backbone_dir).save_pretrained(source)
    assert convert_fles1.main([str(source), str(tmp_path / "out")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert error and error[0].startswith(f"error: {source}: not a BERT masked-LM checkpoint: its weights lack "
                                         "cls.predictions.bias")
    assert not (tmp_path / "out").exists()


def _tiny_bert_source(folder, backbone_dir, vocab_size=30522, tokenizer=True):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    BertForMaskedLM(config).save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(backbone_dir).save_pretrained(folder)
    return str(folder)


def test_convert_refuses_the_current_folder_before_loading_and_takes_out_spelled_with_a_dot(backbone_dir, tmp_path,
                                                                                           monkeypatch, capsys):
    """OUT "." ran the whole conversion, then failed renaming "." ("[Errno 22] Invalid argument", blamed on the
    source; with --overwrite it would have renamed the current folder away); "out/." failed the same way, though it
    names a folder that can be written."""
    import convert_fles1

    source = _tiny_bert_source(tmp_path / "src", backbone_dir)
    converter = convert_fles1.convert
    monkeypatch.setattr(convert_fles1, "convert", lambda *args, **kwargs: pytest.fail("loaded before OUT was refused"))
    (tmp_path / "here" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here" / "sub")
    for out, flags in ((".", []), (".", ["--overwrite"]), ("..", ["--overwrite"]), (str(tmp_path), ["--overwrite"])):
        assert convert_fles1.main([source, out, *flags]) == 2
        assert f"error: {out}: is the current folder or holds it" in capsys.readouterr().err
    monkeypatch.setattr(convert_fles1, "convert", converter)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert convert_fles1.main([source, "empty/."]) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "empty" / "model.safetensors") and os.path.isdir(tmp_path / "here" / "sub")


def test_model_convert_refuses_sources_that_would_convert_into_another_model(backbone_dir, tmp_path, capsys):
    """Each converted silently, or failed with a message about something else: a folder without tokenizer files
    (every word [UNK] after), a tokenizer larger than the vocabulary (IndexError while encoding), a SPLADE folder
    pooling by sum (other vectors), DistilBERT ("activation='gelu' is not supported"), .bin weights ("no file named
    model.safetensors"), and OUT = SRC with --overwrite (deleted the source's other files)."""
    import convert_fles1
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    no_tokenizer = _tiny_bert_source(tmp_path / "no-tokenizer", backbone_dir, tokenizer=False)
    small = _tiny_bert_source(tmp_path / "small-vocab", backbone_dir, vocab_size=29522)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
                          ).save_pretrained(tmp_path / "distilbert")
    bin_only = _tiny_bert_source(tmp_path / "bin-only", backbone_dir)
    state = {name: tensor.contiguous() for name, tensor in
             FLES1ForMaskedLM.from_pretrained(bin_only).state_dict().items()}  # any weights: only the file matters
    torch.save(state, os.path.join(bin_only, "pytorch_model.bin"))
    os.remove(os.path.join(bin_only, "model.safetensors"))
    summed = tmp_path / "splade-sum"
    SparseEncoder(modules=[MLMTransformer(_tiny_bert_source(tmp_path / "mlm", backbone_dir)),
                           SpladePooling(pooling_strategy="sum")]).save_pretrained(str(summed))
    same = _tiny_bert_source(tmp_path / "same", backbone_dir)
    (tmp_path / "same" / "README.md").write_text("keep me\n")
    # a tokenizer that is code of its own: AutoTokenizer(trust_remote_code=True) imported it, silently
    own_code = _tiny_bert_source(tmp_path / "own-code", backbone_dir)
    marker = tmp_path / "the-source-code-ran"
    (tmp_path / "own-code" / "own_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertTokenizerFast\n"
        "class OwnTokenizer(BertTokenizerFast):\n    pass\n")
    settings = json.loads((tmp_path / "own-code" / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": [None, "own_tokenizer.OwnTokenizer"]}, tokenizer_class="OwnTokenizer")
    (tmp_path / "own-code" / "tokenizer_config.json").write_text(json.dumps(settings))
    no_config = tmp_path / "no-config"  # e.g. a parent folder, or a sentence-transformers Router model
    no_config.mkdir()
    (no_config / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                         "type": "sentence_transformers.models.Router"}]))
    expected = {
        own_code: r"tokenizer is code of its own \(tokenizer_config.json: auto_map AutoTokenizer \[None, "
                  r"'own_tokenizer.OwnTokenizer'\]\), which FLES-1 never runs: it tokenizes",
        str(no_config): "no config.json at its root: .* sentence-transformers Router model",
        no_tokenizer: "tokenizer has only .* tokens for a vocabulary of 30522 rows: no tokenizer files",
        small: "tokenizer has 30522 tokens for a vocabulary of 29522 rows",
        str(tmp_path / "distilbert"): "model_type 'distilbert' is not supported: FLES-1 converts BERT",
        bin_only: r"no safetensors weights \(found pytorch_model.bin\): weights are loaded from safetensors only",
        str(summed): "SpladePooling pools with pooling_strategy='sum', activation_function='relu': FLES-1 encodes with 'max' and 'relu'",
    }
    for source, message in expected.items():
        assert convert_fles1.main([source, str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert re.search(f"error: {re.escape(source)}: (its )?{message}", error), error
        assert not (tmp_path / "out").exists()
    assert not marker.exists()
    assert convert_fles1.main([same, same, "--overwrite"]) == 2
    assert "is the source or holds it" in capsys.readouterr().err
    # without --overwrite too: "exists and is not empty (--overwrite replaces it)" pointed to a flag then refused
    assert convert_fles1.main([same, same]) == 2
    assert "is the source or holds it" in capsys.readouterr().err
    from fles1.checkpoint import convert

    with pytest.raises(ValueError, match="is the source or holds it"):
        convert(same, same)
    assert (tmp_path / "same" / "README.md").read_text() == "keep me\n"
    assert convert_fles1.main([same, str(tmp_path), "--overwrite"]) == 2  # a folder holding the source
    assert os.path.isfile(os.path.join(same, "model.safetensors"))


def test_model_convert_a_padded_vocabulary_names_its_wordless_rows(backbone_dir, tmp_path):
    """Rows past the tokenizer's tokens (a vocabulary padded to a multiple of 64) all decoded to None: a dict
    merged them under one key, and decode() returned None for an id it should name."""
    from fles1.checkpoint import convert
    from fles1_encoder import FLES1Encoder

    from sentence_transformers import SparseEncoder

    from fles1.evaluation import evaluate

    source = _tiny_bert_source(tmp_path / "padded", backbone_dir, vocab_size=30528)
    with pytest.warns(UserWarning, match="the last 6 rows name no word"):
        convert(source, str(tmp_path / "out"))
    encoder = FLES1Encoder.from_pretrained(str(tmp_path / "out"))
    assert encoder.decode([30521, 30527]) == ["##～", "[vocab_30527]"]
    vector = encoder.encode("heart disease", threshold=0)
    ids, weights = encoder.encode_to_ids("heart disease", threshold=0)
    assert len(vector) == len(ids)  # one entry per active row, none merged
    st = SparseEncoder(str(tmp_path / "out"), trust_remote_code=True, device="cpu")  # named alike there too
    assert st.tokenizer.convert_ids_to_tokens([30527]) == ["[vocab_30527]"]
    # engine exports named the rows None: "empty token: rank_features keys must be non-empty"
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"heart disease {i}"}) + "\n"
                                               for i in range(3)))
    (data / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "heart"}) + "\n")
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    evaluate(str(tmp_path / "out"), [str(data)], threshold=0, cache_dir=None, bm25=False, production=False,
             export_dir=str(tmp_path / "export"))
    assert (tmp_path / "export" / "beir" / "elasticsearch" / "mapping.json").is_file()


def test_model_convert_cli_never_overwrites_by_accident(backbone_dir, tmp_path, capsys, monkeypatch):
    import convert_fles1
    from fles1 import checkpoint
    from fles1_encoder import FLES1Encoder

    out = tmp_path / "trained"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone's trained weights")
    (tmp_path / "a-file").write_text("x")
    assert convert_fles1.main([backbone_dir, str(out)]) == 2
    assert convert_fles1.main([backbone_dir, str(tmp_path / "a-file")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {out}: exists and is not empty (--overwrite / overwrite=True replaces it)",
                      f"error: {tmp_path / 'a-file'}: exists and is not a folder"]
    assert (out / "model.safetensors").read_bytes() == b"someone's trained weights"

    # interrupted while writing: the old folder stays as it was, no staging folder is left behind
    def interrupted(model, tokenizer, folder, **options):
        (Path(folder) / "config.json").write_text("{")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", interrupted)
        with pytest.raises(SystemExit) as exited:  # Ctrl-C: "interrupted", exit status 130
            convert_fles1.main([backbone_dir, str(out), "--overwrite"])
    assert exited.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "interrupted"
    assert sorted(os.listdir(tmp_path)) == ["a-file", "trained"]
    assert os.listdir(out) == ["model.safetensors"]

    assert convert_fles1.main([backbone_dir, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a-file", "trained"]  # the old folder is gone, not kept beside
    assert FLES1Encoder.from_pretrained(str(out)).encode("statins and cholesterol")


def tiny_model(vocab_size=9000, seed=0, bias_mean=-2.0):
    """Random 1-layer model and a padded batch of 3 texts (11, 7 and 3 tokens). ``bias_mean`` -2 leaves ~10% of the
    vocabulary positive (int8 screening recomputes those); +4 makes most of it positive (its dense fallback)."""
    torch.manual_seed(seed)
    config = FLES1Config(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
    model = FLES1ForMaskedLM(config).eval()
    with torch.no_grad():  # a trained-like spread of logits: some strongly positive, most negative
        model.cls.predictions.bias.normal_(bias_mean, 1.5)
        # [PAD]'s embedding row starts at exactly 0 (padding_idx): its logit then ties across all tokens, where autograd's
        # amax splits the gradient and the sparse backward gives it to one token (both valid subgradients).
        model.bert.embeddings.word_embeddings.weight[0].normal_(0.0, 0.02)
    input_ids = torch.randint(5, vocab_size, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


@pytest.mark.parametrize("screening", [True, False])  # forced: the default depends on the CPU
def test_model_encode_sparse_gradient_matches_naive_dense(screening, monkeypatch):
    import modeling_fles1

    monkeypatch.setattr(modeling_fles1._MaxPooledProjection, "screening", screening)
    model, features = tiny_model()
    parameters = [p for p in model.parameters() if p.requires_grad]
    # Small upstream gradients keep the summed parameter gradients O(1), where float32 rounding is below 1e-5.
    upstream = torch.rand(3, model.config.vocab_size) * 0.01

    reference = naive_sparse(model, features)
    (reference * upstream).sum().backward()
    expected = [p.grad.clone() for p in parameters]
    model.zero_grad()

    sparse = model.encode_sparse(**features).sparse_embeddings
    (sparse * upstream).sum().backward()
    assert (reference > 0).sum() > 10 and (reference == 0).sum() > 10  # both sides of the ReLU are exercised
    assert (sparse - reference).abs().max().item() <= 1e-5
    for parameter, grad in zip(parameters, expected):
        assert parameter.grad is not None
        assert (parameter.grad - grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bias_mean", [-2.0, 4.0])  # 4.0: most entries can be positive -> screening's dense pass
def test_model_screened_training_forward_keeps_values_and_arg_max(bias_mean):
    """The backward needs the forward's max and arg-max; screening must not change either."""
    from modeling_fles1 import _MaxPooledProjection

    model, features = tiny_model(bias_mean=bias_mean)
    with torch.no_grad():
        hidden = model.cls.predictions.transform(model.bert(**features).last_hidden_state)
        hidden = torch.where(features["attention_mask"].unsqueeze(-1).bool(), hidden, hidden[:, :1])  # as encode_sparse
    weight, bias = model.cls.predictions.decoder.weight.detach(), model.cls.predictions.bias.detach()
    values = torch.empty(3, weight.shape[0])
    argmax = torch.zeros(3, weight.shape[0], dtype=torch.int32)
    _MaxPooledProjection._screened_forward(hidden, weight, bias, values, argmax)
    expected_values, expected_argmax = (hidden @ weight.t()).max(dim=1)
    positive = expected_values + bias > 0
    assert positive.float().mean() > (0.5 if bias_mean > 0 else 0.01)
    assert (values - (expected_values + bias))[positive].abs().max().item() <= 1e-5
    assert (values[~positive] <= 0).all()  # screened-out entries keep a non-positive estimate
    top2 = (hidden @ weight.t()).topk(2, dim=1).values
    clear = positive & (top2[:, 0] - top2[:, 1] > 1e-4)  # near-ties may flip with float summation order
    rows = torch.arange(3).unsqueeze(1).expand_as(argmax)
    chosen, expected = hidden[rows, argmax.long()], hidden[rows, expected_argmax]
    assert clear.sum() > 0.5 * positive.sum()
    assert torch.equal(chosen[clear], expected[clear])  # the same token (or an identical padding copy)


def _screen_edge_case(length: int, spread: float):
    """A decoder (rows of two norms), `length` token states with an outlier, their float32 max logits, and biases
    that put every max logit within 1e-5 of 0 (about half above): (weight, states, maxima, bias)."""
    torch.manual_seed(0)
    weight = torch.randn(4096, 128) * 0.05
    weight[::7] *= 4
    states = torch.randn(length, 128) * spread
    states[0, 0] = 12 * spread
    maxima = (states @ weight.t()).amax(dim=0)
    return weight, states, maxima, -maxima + torch.empty(4096).uniform_(-1e-5, 1e-5)


@pytest.mark.parametrize("length, spread", [(1, 1.0), (9, 2.0), (40, 1.0), (70, 5.0)])  # 70 tokens: three tiles
def test_int8_screen_keeps_every_entry_that_float32_makes_positive(length, spread):
    """The screen's bound at its edge: the biases put every float32 max logit within 1e-5 of 0, about half of them
    above, while the int8 estimates are off by up to ~1. Any error term missing from the bound (int8 rows, u8
    states, an outlier that coarsens the step, rows of different norms) would drop positive entries."""
    import modeling_fles1

    assert modeling_fles1.int8_screening_available(), "needs oneDNN int8 with exact integer sums (x86 VNNI/AMX)"
    weight, states, maxima, bias = _screen_edge_case(length, spread)
    estimate, candidates = modeling_fles1._screen(states, modeling_fles1._int8_screen(weight, bias))
    positive = torch.nonzero(maxima + bias > 0).squeeze(1)
    assert 1500 < positive.numel() < 2500 and (estimate - maxima - bias).abs().max() > 0.1
    assert torch.isin(positive, candidates).all()
    far = modeling_fles1._screen(states, modeling_fles1._int8_screen(weight, -maxima - 2 * spread))[1]
    assert far.numel() == 0  # and the bound is not vacuous


def test_int8_screening_probe_says_no_without_onednn_and_encoding_still_works(monkeypatch):
    import modeling_fles1

    modeling_fles1.int8_screening_available.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert modeling_fles1.int8_screening_available() is False
        model, _ = tiny_model()
        input_ids = torch.randint(5, 9000, (1, 7))
        with torch.inference_mode():
            ids, weights = model.encode_sparse_terms(input_ids)
            dense = model.encode_sparse(input_ids=input_ids).sparse_embeddings[0]
        assert "int8-screen" not in model.__dict__.get("_fles1_decoder_cache", {})  # the float32 path ran
        assert torch.equal(ids, dense.nonzero().squeeze(1)) and len(ids) > 10
    finally:
        modeling_fles1.int8_screening_available.cache_clear()


def _worst_case_row_and_state(error_source):
    """One int8 row and one token state on which `_screen`'s estimate is off by nearly the bound's error term for
    ``error_source``."""
    torch.manual_seed(3)
    scale = 2.0**-7
    if error_source == "row":  # an outlier coarsens the row's int8 grid; the state follows the rounding errors' signs
        row = torch.randn(128) * 0.3 * scale
        row[0] = 127 * scale
        state = torch.where(row - torch.round(row / scale) * scale >= 0, 0.5, -0.5)  # on the u8 grid: exact
    else:  # an exact int8 row; the state sits just inside half a u8 step off the grid, along the row's signs
        row = torch.randint(-127, 128, (128,)).float() * scale
        row[0] = 127 * scale
        step = 2.0**-6
        state = (torch.randint(-100, 101, (128,)).float() + 0.499 * torch.sign(row)) * step
        state[0] = 127 * step  # sets the step
    return row, state


@pytest.mark.parametrize("error_source", ["row", "state"])
def test_int8_screen_bound_holds_where_the_int8_error_is_largest(error_source):
    """The float32 logit is a hair above 0 while the int8 estimate is well below it: only a full error term in the
    bound keeps the entry (half of either term would drop it)."""
    import modeling_fles1

    row, state = _worst_case_row_and_state(error_source)
    weight = torch.cat([row[None], torch.randn(255, 128) * 2.0**-7])
    bias = torch.full((256,), -100.0)
    bias[0] = -(state.double() @ row.double()).item() + 1e-5 * (state.norm() * row.norm()).item()
    estimate, candidates = modeling_fles1._screen(state[None], modeling_fles1._int8_screen(weight, bias))
    assert (state @ row + bias[0]).item() > 0 and estimate[0].item() < -0.05
    assert 0 in candidates.tolist()


HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("length, spread", [(1, 1.0), (9, 2.0), (70, 5.0)])  # 70 tokens: three tiles
def test_half_screen_keeps_every_entry_that_float32_makes_positive(dtype, length, spread):
    """The bf16/fp16 screen's bound at its edge, as the int8 one's: every float32 max logit within 1e-5 of 0, about
    half above, the half-precision estimates off by far more."""
    import modeling_fles1

    assert modeling_fles1.half_screening_available(dtype), "this CPU's half-precision projection sums in float32"
    weight, states, maxima, bias = _screen_edge_case(length, spread)
    estimate, candidates = modeling_fles1._half_screen_pass(states, modeling_fles1._half_screen(weight, bias, dtype))
    positive = torch.nonzero(maxima + bias > 0).squeeze(1)
    assert 1500 < positive.numel() < 2500 and (estimate - maxima - bias).abs().max() > 1e-3
    assert torch.isin(positive, candidates).all()
    far_screen = modeling_fles1._half_screen(weight, -maxima - 0.5 * spread, dtype)
    far = modeling_fles1._half_screen_pass(states, far_screen)[1]
    assert far.numel() == 0  # and the bound is not vacuous


def _half_worst_case(dtype, error_source):
    """A state and a row on which the half-precision estimate of their product is off by nearly one of
    `_half_screen`'s error terms: every element of the state (or row) just inside half a step off the grid, its
    rounding error's sign along the other vector while the product itself cancels to 0 -- or exact inputs whose
    product lands just inside half an output step above a grid point."""
    eps = torch.finfo(dtype).eps
    if error_source == "output":
        state, row = torch.ones(128), torch.zeros(128)
        row[0], row[1] = 8.0, 0.97 * 8 * eps / 2  # 8 + that rounds down to 8 in the kernel's output
        return state, row
    torch.manual_seed(3)
    signs = torch.randint(0, 2, (128,)).float() * 2 - 1
    balanced = torch.tensor([1.0, -1.0]).repeat(64)[torch.randperm(128)]
    off_grid = signs * (1.5 + 0.499 * eps * balanced)  # rounds to +-1.5, error 0.499 eps along `balanced`
    exact = signs * balanced
    return (exact, off_grid * 2.0**-4) if error_source == "row" else (off_grid, exact * 2.0**-4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("error_source", ["row", "state", "output"])
def test_half_screen_bound_holds_where_the_rounding_error_is_largest(dtype, error_source):
    """The float32 logit is a hair above 0 while the estimate is below it by nearly one error term of the bound
    (|h - h~| |w|, |h~| |w - w~| or the output's rounding): half of that term would drop the entry."""
    import modeling_fles1

    state, row = _half_worst_case(dtype, error_source)
    logit = (state.double() @ row.double()).item()
    weight = torch.cat([row[None], torch.randn(255, 128) * 2.0**-7])
    bias = torch.full((256,), -100.0)
    bias[0] = -logit + 1e-3 * abs(logit) * torch.finfo(dtype).eps
    screen = modeling_fles1._half_screen(weight, bias, dtype)
    estimate, candidates = modeling_fles1._half_screen_pass(state[None], screen)
    error = {"output": 8 * torch.finfo(dtype).eps / 2, "row": 128 * 0.499 * torch.finfo(dtype).eps * 2.0**-4}
    assert (state @ row + bias[0]).item() > 0 and estimate[0].item() < -0.9 * error.get(error_source, error["row"])
    assert 0 in candidates.tolist()


def test_half_screen_bound_holds_for_an_fp16_output_below_the_smallest_normal():
    """Below 2^-14 fp16's steps are a fixed 2^-24 (a kernel may also flush them): the output rounding there is no
    fraction of the value. Exact fp16 inputs whose float32 logit (~1.48 x 2^-24) is a hair above 0 after the bias,
    while the rounded output, 2^-24, leaves the estimate below 0: the entry was dropped (found by a probe)."""
    import modeling_fles1

    state, row = torch.zeros(128), torch.zeros(128)
    state[0], row[0] = 1.5 * 2.0**-12, 2027 * 2.0**-23  # both exact in fp16
    weight = torch.cat([row[None], torch.randn(255, 128) * 2.0**-7])
    bias = torch.full((256,), -100.0)
    bias[0] = -(2.0**-24) - 2.0**-33
    estimate, candidates = modeling_fles1._half_screen_pass(state[None],
                                                       modeling_fles1._half_screen(weight, bias, torch.float16))
    assert (state @ row + bias[0]).item() > 0 and estimate[0].item() < 0
    assert 0 in candidates.tolist()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_model_half_screen_says_nothing_when_fp16_overflows(dtype):
    """A logit past fp16's 65,504 (inf in the kernel's output) is recomputed in float32, without a numpy
    'invalid value' warning from the screen's arithmetic on it (found by a probe)."""
    model, features = tiny_model()
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(1e6)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = model.encode_sparse(**features, screening=False).sparse_embeddings
        screened = model.encode_sparse(**features, projection_dtype=dtype).sparse_embeddings
    assert torch.isfinite(reference).all() and (reference > 10).any()
    assert torch.allclose(screened, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_dtype", HALF_DTYPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_model_in_half_precision_projects_in_half_precision_unscreened(model_dtype, dtype):
    """The screen bounds float32 states only: a bf16/fp16 model's own states, projected in either half dtype, take
    the plain projection (screening them crashed: float32 rows against half-precision states)."""
    model, features = tiny_model()
    model.to(model_dtype)
    with torch.inference_mode():
        plain = model.encode_sparse(**features, projection_dtype=dtype, screening=False).sparse_embeddings
        default = model.encode_sparse(**features, projection_dtype=dtype).sparse_embeddings
        terms = model.encode_sparse_terms(features["input_ids"][:1], projection_dtype=dtype)
    assert torch.equal(default, plain) and (plain > 0).sum() > 10
    assert not any(name.startswith("half-screen-") for name in model.__dict__.get("_fles1_decoder_cache", {}))
    assert torch.equal(terms[0], plain[0].nonzero().squeeze(1))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_screen_stays_off_under_cpu_autocast_and_flushes_subnormals(dtype):
    """Under CPU autocast the float32 recompute would run in bf16: no exact result to promise, so no screen (as
    for int8). The rounded states and rows have no subnormals, which some kernels read as zero."""
    import modeling_fles1

    cpu = torch.device("cpu")
    assert modeling_fles1._half_screens_by_default(cpu, torch.float32, dtype, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not modeling_fles1._half_screens_by_default(cpu, torch.float32, dtype, 128)
    tiny = torch.finfo(dtype).tiny
    rounded = modeling_fles1._rounded(torch.tensor([tiny / 4, -tiny / 2, tiny, 1.0]), dtype)
    assert rounded.dtype == dtype and rounded.tolist() == [0.0, 0.0, tiny, 1.0]
    given = torch.tensor([tiny / 4, 1.0], dtype=dtype)  # already in the dtype: a copy, the caller's left alone
    assert modeling_fles1._rounded(given, dtype).tolist() == [0.0, 1.0] and given[0] == tiny / 4


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_screening_probe_says_no_to_half_precision_sums_and_encoding_still_works(dtype, monkeypatch):
    """The bound assumes float32 sums of the half-precision products; a kernel summing in the half dtype breaks it
    (the probe's 2^-10 is lost against partial sums near 1), and the projection then runs unscreened."""
    import modeling_fles1

    def running_sum(states, rows, packed):  # a half-precision accumulator, one product at a time
        total = torch.zeros((states.shape[0], rows.shape[0]), dtype=rows.dtype)
        for i in range(rows.shape[1]):
            total = total + states[:, i : i + 1] * rows[:, i]
        return total.amax(dim=0)

    probe = modeling_fles1.half_screening_available
    probe.cache_clear()
    monkeypatch.setattr(modeling_fles1, "_max_over_tokens", running_sum)
    try:
        assert probe(dtype) is False
        monkeypatch.undo()
        assert probe(dtype) is False  # cached: probed once per process
        probe.cache_clear()
        assert probe(dtype) is True and probe(torch.float32) is False
        assert probe(dtype, 16) is True and probe(dtype, 769) is True and probe(dtype, 3) is False  # any hidden size
        monkeypatch.setattr(modeling_fles1, "half_screening_available", lambda dtype, hidden_size: False)
        model, features = tiny_model()
        with torch.inference_mode():
            rounded = model.encode_sparse(**features, projection_dtype=dtype).sparse_embeddings
            reference = naive_sparse(model, features)
        assert f"half-screen-{dtype}" not in model.__dict__.get("_fles1_decoder_cache", {})
        assert 0 < (rounded - reference).abs().max().item() < 0.1
    finally:
        probe.cache_clear()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_model_half_projection_gives_float32_vectors_on_cpu_and_rounds_them_unscreened(dtype):
    """A bf16/fp16 projection at CPU inference rounded every logit (bf16: 2e-2 on the shipped model, and top-10
    rankings changed on 35 of 200 nfcorpus queries); screened, it gives float32's vectors. screening=False keeps
    the plain rounded projection."""
    model, features = tiny_model()
    with torch.inference_mode():
        reference = naive_sparse(model, features)
        screened = model.encode_sparse(**features, projection_dtype=dtype)
        terms = model.encode_sparse_terms(features["input_ids"][:1], projection_dtype=dtype)
        rounded = model.encode_sparse(**features, projection_dtype=dtype, screening=False).sparse_embeddings
    assert f"half-screen-{dtype}" in model._fles1_decoder_cache
    assert (reference > 0).sum() > 10
    assert (screened.sparse_embeddings - reference).abs().max().item() <= 1e-5
    positive = reference > 0
    assert (torch.log1p(screened.max_logits[positive]) - reference[positive]).abs().max().item() <= 1e-5
    assert torch.equal(terms[0], reference[0].nonzero().squeeze(1))
    assert (terms[1] - reference[0][terms[0]]).abs().max().item() <= 1e-5
    assert 0 < (rounded - reference).abs().max().item() < 0.1


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("where", ["decoder-row", "backbone", "beyond-fp16"])
def test_model_half_screen_passes_non_finite_values_through_like_float32(dtype, where):
    """NaN in the weights, or a decoder weight fp16 cannot hold (65,504): nothing can be bounded, and the screen
    hands every entry to float32, which gives the reference's NaN (or the large entry's true value)."""
    model, features = tiny_model()
    with torch.no_grad():
        if where == "decoder-row":  # a vocabulary entry no text uses
            model.cls.predictions.decoder.weight[8999] = float("nan")
        elif where == "backbone":
            model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
        else:  # in fp16 +-inf: the rounded logit is inf - inf wherever the two states' signs agree
            model.cls.predictions.decoder.weight[8999, :2] = torch.tensor([1e5, -1e5])
    with torch.inference_mode():
        reference = model.encode_sparse(**features, screening=False).sparse_embeddings
        screened = model.encode_sparse(**features, projection_dtype=dtype).sparse_embeddings
    expected = {"decoder-row": 1, "backbone": reference.shape[1], "beyond-fp16": 0}[where]
    assert reference.isnan().any(dim=0).sum().item() == expected
    assert torch.allclose(screened, reference, atol=1e-5, equal_nan=True)
    if where == "beyond-fp16":
        assert torch.isfinite(reference).all() and reference[:, 8999].max() > 5  # log1p of a logit beyond 100


@pytest.mark.parametrize("packed", [True, False])  # False: torch builds without oneDNN take a plain matmul
@pytest.mark.parametrize("tile_tokens", [None, 4])  # 4: several token tiles per text
@pytest.mark.parametrize("options", [
    {"screening": True}, {"screening": False}, {"chunk_tokens": 8}, {"projection_dtype": torch.float32},
    {"projection_dtype": torch.bfloat16}, {"projection_dtype": torch.float16},
])
@pytest.mark.parametrize("bias_mean", [-2.0, 4.0])
def test_model_inference_projection_paths_match_naive(options, tile_tokens, packed, bias_mean, monkeypatch):
    import modeling_fles1

    if tile_tokens:
        monkeypatch.setattr(modeling_fles1, "CPU_TILE_TOKENS", tile_tokens)
    if not packed:
        monkeypatch.setattr(modeling_fles1, "_pack_for_onednn", lambda rows: None)
    model, features = tiny_model(bias_mean=bias_mean)
    with torch.inference_mode():
        reference = naive_sparse(model, features)
        output = model.encode_sparse(**features, **options)
    cache = getattr(model, "_fles1_decoder_cache", {})
    if packed and options == {"screening": False} and torch.backends.mkldnn.is_available():
        layouts = [entry[-1][1] for name, entry in cache.items() if name.startswith("weight-")]
        assert layouts and all(layout is not None for layout in layouts)  # the packed oneDNN path ran
    if options == {"screening": True}:
        assert "int8-screen" in cache  # the screened path ran
    if options.get("projection_dtype") in HALF_DTYPES:
        assert f"half-screen-{options['projection_dtype']}" in cache  # the half-precision screen ran
    assert (reference > 0).sum() > 10
    assert (output.sparse_embeddings - reference).abs().max().item() <= 1e-5
    positive = reference > 0  # max_logits is exact wherever the weight is non-zero
    assert (torch.log1p(output.max_logits[positive]) - reference[positive]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("path", ["cpu-screened", "cpu-float32", "batched", "autograd-screened", "autograd-float32"])
def test_model_left_padding_and_rows_attending_nothing_on_every_path(path, monkeypatch):
    """Padding copied position 0 into the max: under left padding a [PAD] token (batched and training paths, 0.07
    off). A row whose mask is all zeros crashed the CPU path (a zero-size reduction) and got a term on the batched
    one; like sentence-transformers' pooling, it is the empty vector on every path."""
    import modeling_fles1

    model, features = tiny_model()
    left = {name: value.clone() for name, value in features.items()}
    for row, mask in enumerate(features["attention_mask"]):  # the same texts, their padding moved to the front
        for name in left:
            left[name][row] = features[name][row].roll(int((mask == 0).sum()))
    left = {name: torch.cat([value, value[:1]]) for name, value in left.items()}
    left["attention_mask"][-1] = 0  # a fourth row that attends to nothing
    options = {"cpu-screened": {"screening": True}, "cpu-float32": {"screening": False},
               "batched": {"chunk_tokens": 8}}.get(path, {})
    if path.startswith("autograd"):
        monkeypatch.setattr(modeling_fles1._MaxPooledProjection, "screening", path.endswith("screened"))
    with torch.no_grad():
        reference = naive_sparse(model, left)
    assert left["attention_mask"][1, 0] == 0 and (reference[:3] > 0).sum() > 10 and not reference[3].any()
    with torch.set_grad_enabled(path.startswith("autograd")):
        sparse = model.encode_sparse(**left, **options).sparse_embeddings
    assert (sparse - reference).abs().max().item() <= 1e-5
    # left padding shifts BERT's positions; position_ids counted over the attended tokens give the right-padded
    # vectors back (encode_sparse had no position_ids to pass)
    with torch.no_grad():
        right = naive_sparse(model, features)
        positions = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
        unshifted = model.encode_sparse(**left, position_ids=positions, **options).sparse_embeddings
    assert (sparse[:3] - right).abs().max().item() > 1e-3
    assert (unshifted[:3] - right).abs().max().item() <= 1e-5 and not unshifted[3].any()
    if path.startswith("autograd"):
        sparse.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("screening", [True, False])  # forced: the default depends on the CPU
@pytest.mark.parametrize("bias_mean", [-2.0, 4.0])  # 4.0: the screen's dense fallback
def test_model_encode_sparse_terms_are_encode_sparse_nonzeros(screening, bias_mean, monkeypatch):
    import modeling_fles1

    monkeypatch.setattr(modeling_fles1, "int8_screening_available", lambda: screening)
    model, _ = tiny_model(bias_mean=bias_mean)
    with torch.inference_mode():
        for length in (3, 11, 40):
            input_ids = torch.randint(5, 9000, (1, length))
            dense = model.encode_sparse(input_ids=input_ids).sparse_embeddings[0]
            ids, weights = model.encode_sparse_terms(input_ids)
            assert torch.equal(ids, dense.nonzero().squeeze(1)) and len(ids) > 10
            assert (weights - dense[ids]).abs().max().item() <= 1e-6
        with pytest.raises(ValueError, match="one text"):
            model.encode_sparse_terms(torch.randint(5, 9000, (2, 4)))
        # the tokenizer's output as is (its attention_mask was a TypeError); padding is refused, not pooled
        features = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
                    "attention_mask": torch.ones_like(input_ids)}
        ids, weights = model.encode_sparse_terms(**features)
        assert torch.equal(ids, dense.nonzero().squeeze(1)) and (weights - dense[ids]).abs().max().item() <= 1e-6
        with pytest.raises(ValueError, match="attention_mask has zeros; use encode_sparse for padded input"):
            model.encode_sparse_terms(**{**features, "attention_mask": torch.tensor([[1] * 39 + [0]])})


def _encode_one_by_one(model, texts):
    with torch.inference_mode():
        return [model.encode_sparse(input_ids=ids).sparse_embeddings for ids in texts]


def test_used_model_and_encoder_still_copy_and_pickle(fles1_checkpoint):
    """After encoding, the model holds a TorchScript trace and oneDNN-packed weights: deepcopy, pickle and
    torch.save of it used to fail ("Cannot access storage of OpaqueTensorImpl"). The copies rebuild them."""
    import copy
    import io
    import pickle

    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(fles1_checkpoint, device="cpu")
    query, documents = "vitamin d deficiency", ["Statins and LDL cholesterol.", "Vitamin D in older adults."]
    expected = encoder.encode(query, kind="query"), encoder.encode_batch(documents)
    assert encoder.model.__dict__.get("_fles1_traced_hidden_states") and encoder.model.__dict__.get("_fles1_decoder_cache")
    copied = FLES1Encoder(copy.deepcopy(encoder.model), encoder.tokenizer)
    unpickled = pickle.loads(pickle.dumps(encoder))
    torch.save(encoder.model, io.BytesIO())
    for other in (copied, unpickled):
        assert other.model.cls.predictions.decoder.weight is not encoder.model.cls.predictions.decoder.weight
        assert (other.encode(query, kind="query"), other.encode_batch(documents)) == expected
    assert encoder.model.__dict__.get("_fles1_traced_hidden_states")  # the original keeps its caches


def test_model_traced_backbone_matches_eager_and_follows_the_model():
    model, _ = tiny_model()
    texts = [torch.randint(5, 9000, (1, length)) for length in (3, 11, 40)]  # the trace is built at length 3

    def check_against_eager():
        model.use_traced_backbone = False
        eager = _encode_one_by_one(model, texts)
        model.use_traced_backbone = True
        traced = _encode_one_by_one(model, texts)
        assert model._fles1_traced_hidden_states[1] is not None  # the traced path did run
        for expected, actual in zip(eager, traced):
            assert (expected > 0).sum() > 10
            assert (actual - expected).abs().max().item() <= 1e-6

    check_against_eager()
    first_trace = model._fles1_traced_hidden_states[1]
    with torch.no_grad():  # in place (an optimizer step): the trace shares the tensors and stays
        model.bert.encoder.layer[0].output.dense.weight.mul_(3.0)
    check_against_eager()
    assert model._fles1_traced_hidden_states[1] is first_trace
    model.bert.encoder.layer[0].output.dense = torch.nn.Linear(32, 16)  # a new module: traced again
    check_against_eager()
    assert model._fles1_traced_hidden_states[1] is not first_trace


def test_model_traces_survive_other_models_and_new_modules():
    """Two models in one process (say a query and a document encoder) keep their traces, and so does building a
    module anywhere; they used to re-trace each other on every single-text call (~90 ms each)."""
    first, _ = tiny_model()
    second, _ = tiny_model(seed=1)
    ids = torch.randint(5, 9000, (1, 6))
    _encode_one_by_one(first, [ids]), _encode_one_by_one(second, [ids])
    traces = (first._fles1_traced_hidden_states[1], second._fles1_traced_hidden_states[1])
    for _ in range(2):
        torch.nn.Linear(4, 4)
        _encode_one_by_one(first, [ids]), _encode_one_by_one(second, [ids])
    assert traces[0] is not None and traces[1] is not None
    assert first._fles1_traced_hidden_states[1] is traces[0] and second._fles1_traced_hidden_states[1] is traces[1]


def test_model_backbone_falls_back_to_eager_when_tracing_fails(monkeypatch):
    model, _ = tiny_model()
    texts = [torch.randint(5, 9000, (1, length)) for length in (4, 9)]
    model.use_traced_backbone = False
    eager = _encode_one_by_one(model, texts)

    def broken_trace(*args, **kwargs):
        raise RuntimeError("tracing unsupported here")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    model.use_traced_backbone = True
    for expected, actual in zip(eager, _encode_one_by_one(model, texts)):
        assert torch.equal(expected, actual)
    assert model._fles1_traced_hidden_states[1] is None


def test_model_projection_dtype_is_a_floating_dtype_or_its_name():
    """torch.int8 projected into wrong vectors (max abs diff 2.5), "bfloat16" failed later as a device string."""
    model, features = tiny_model()
    single = features["input_ids"][:1, : int(features["attention_mask"][0].sum())]
    with torch.inference_mode():
        by_dtype = model.encode_sparse(**features, projection_dtype=torch.bfloat16).sparse_embeddings
        by_name = model.encode_sparse(**features, projection_dtype="bfloat16").sparse_embeddings
        assert torch.equal(by_dtype, by_name)
        assert all(torch.equal(a, b) for a, b in zip(model.encode_sparse_terms(single, projection_dtype="torch.float16"),
                                                     model.encode_sparse_terms(single, projection_dtype=torch.float16)))
        for bad in (torch.int8, torch.int32, "bogus", "cpu", 16):
            for call in (lambda: model.encode_sparse(**features, projection_dtype=bad),
                         lambda: model.encode_sparse_terms(single, projection_dtype=bad)):
                with pytest.raises(ValueError, match=r"projection_dtype=.* is not supported; choose None \(the model's "
                                                     r"dtype\) or one of \['float32', 'bfloat16', 'float16', "
                                                     r"'float64'\]"):
                    call()


def test_model_dtype_change_drops_the_decoder_copies():
    """.to(bf16) after an encode kept the int8 screen (holding the float32 decoder weight) and a copy per dtype."""
    model, features = tiny_model()
    with torch.inference_mode():
        model.encode_sparse(**features)
    assert model.__dict__.get("_fles1_decoder_cache")
    model.to(torch.bfloat16)
    assert "_fles1_decoder_cache" not in model.__dict__
    with torch.inference_mode():
        half = model.encode_sparse(**features).sparse_embeddings
    model.float()
    assert "_fles1_decoder_cache" not in model.__dict__
    with torch.inference_mode():
        assert (model.encode_sparse(**features).sparse_embeddings - half).abs().max() < 0.1


def test_model_projection_cache_follows_weight_updates():
    model, features = tiny_model()
    with torch.inference_mode():
        before = model.encode_sparse(**features).sparse_embeddings
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(2.0)  # tied to the word embeddings: the whole model changes
    with torch.inference_mode():
        after = model.encode_sparse(**features).sparse_embeddings
        reference = naive_sparse(model, features)
    assert not torch.allclose(before, after)
    assert (after - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("path", ["int8-screen", "float32", "bf16"])
def test_model_projection_cache_follows_writes_through_data(path, monkeypatch):
    """EMA / weight-averaging code that writes through `.data` bumps no version counter; the cached int8 screen
    (or packed weight) kept the old decoder and dropped the terms the new one makes positive."""
    import modeling_fles1

    monkeypatch.setattr(modeling_fles1, "int8_screening_available", lambda: path == "int8-screen")
    model, features = tiny_model()
    dtype = torch.bfloat16 if path == "bf16" else None
    single = features["input_ids"][:1]

    def encoded():
        with torch.inference_mode():
            return (model.encode_sparse(**features, projection_dtype=dtype).sparse_embeddings,
                    model.encode_sparse_terms(single, projection_dtype=dtype))

    encoded()  # builds the caches
    decoder, bias = model.cls.predictions.decoder, model.cls.predictions.bias
    decoder.weight.data.copy_(-decoder.weight.detach())  # as sparse as before, other entries positive
    bias.data.copy_(bias.detach().flip(0))
    vectors, (ids, weights) = encoded()
    with torch.inference_mode():
        reference = naive_sparse(model, features)
    assert 10 < (reference > 0).sum(dim=1).min() and (reference > 0).sum(dim=1).max() < 9000 // 8  # screened
    assert (vectors - reference).abs().max().item() <= 1e-5  # bf16: screened, so float32's vectors too
    assert torch.equal(ids, reference[0].nonzero().squeeze(1))


@pytest.mark.parametrize("where", ["decoder-row", "backbone"])
def test_model_int8_screen_passes_nan_through_like_float32(where, monkeypatch):
    """A NaN in the weights made every screening bound NaN, so nothing was a candidate: int8 estimates (or
    nothing) came out instead of the float32 path's NaN, and a diverged model looked like a quiet one."""
    import modeling_fles1

    model, features = tiny_model()
    with torch.no_grad():
        if where == "decoder-row":  # a vocabulary entry no text uses
            model.cls.predictions.decoder.weight[8999] = float("nan")
        else:
            model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    results = {}
    for screening in (False, True):
        monkeypatch.setattr(modeling_fles1, "int8_screening_available", lambda: screening)
        with torch.inference_mode():
            vectors = model.encode_sparse(**features).sparse_embeddings
            terms = model.encode_sparse_terms(features["input_ids"][:1])
        with torch.enable_grad():  # training's forward screens too
            model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
            trained = model.encode_sparse(**features).sparse_embeddings.detach()
        results[screening] = vectors, terms, trained
    (vectors, (ids, weights), trained), (reference, _, _) = results[True], results[False]
    nan_columns = reference.isnan().any(dim=0)
    assert nan_columns.sum().item() == (1 if where == "decoder-row" else reference.shape[1])
    for screened in (vectors, trained):
        assert torch.allclose(screened, reference, atol=1e-5, equal_nan=True)
    assert torch.equal(ids, reference[0].nonzero().squeeze(1))
    assert torch.allclose(weights, reference[0][ids], atol=1e-5, equal_nan=True) and weights.isnan().any()


def test_model_first_calls_from_threads_leave_logging_and_warnings_as_they_were():
    """Tracing mutes transformers' logging and Python's warnings and restores them; threads tracing at once (a
    server's first queries) restored each other's muted state and left every later warning hidden."""
    import threading
    import warnings

    from transformers.utils import logging

    model, _ = tiny_model()
    filters, verbosity = list(warnings.filters), logging.get_verbosity()
    texts = [torch.randint(5, 9000, (1, length)) for length in (3, 5, 7, 9, 11, 13)]
    start = threading.Barrier(len(texts))

    def first_call(ids):
        start.wait()
        _encode_one_by_one(model, [ids])

    threads = [threading.Thread(target=first_call, args=(ids,)) for ids in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert model._fles1_traced_hidden_states[1] is not None
    assert warnings.filters == filters and logging.get_verbosity() == verbosity


def _single_text_paths(model, input_ids):
    """One text through encode_sparse (screened where the CPU can) and encode_sparse_terms, as dense vectors."""
    with torch.inference_mode():
        dense = model.encode_sparse(input_ids=input_ids).sparse_embeddings[0]
        ids, weights = model.encode_sparse_terms(input_ids)
    return dense, torch.zeros_like(dense).index_put_((ids,), weights.float())


def test_model_single_text_path_follows_forward_hooks():
    """The single-text trace ignored a hook registered after it was built, and kept one removed after."""
    model, features = tiny_model()
    input_ids = features["input_ids"][:1]
    plain = naive_sparse(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    assert all((path - plain).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))  # traced
    offset = torch.randn(model.config.hidden_size)
    handle = model.bert.encoder.layer[-1].output.register_forward_hook(lambda module, args, output: output + offset)
    with torch.no_grad():
        hooked = naive_sparse(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    assert (hooked - plain).abs().max().item() > 1e-2
    assert all((path - hooked).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))
    handle.remove()
    assert all((path - plain).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))


def test_model_single_text_path_follows_accelerate_hooks_and_documented_edits():
    """accelerate's hooks (device placement, offloading) replace a module's forward in its __dict__: no hook dict
    sees them, and the trace computed without (or kept) them. Removing a layer registers nothing: clear_caches()."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Shift(ModelHook):
        def __init__(self, offset):
            self.offset = offset

        def post_forward(self, module, output):
            return output + self.offset

    model, features = tiny_model()
    input_ids = features["input_ids"][:1]
    mask = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    plain = naive_sparse(model, mask)
    assert all((path - plain).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))  # traced
    dense = model.bert.encoder.layer[-1].output.dense
    add_hook_to_module(dense, Shift(torch.randn(model.config.hidden_size)))
    with torch.no_grad():
        hooked = naive_sparse(model, mask)
    assert (hooked - plain).abs().max().item() > 1e-2
    assert all((path - hooked).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))
    remove_hook_from_module(dense)
    assert all((path - plain).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))

    del model.bert.encoder.layer[-1]
    model.clear_caches()
    pruned = naive_sparse(model, mask)
    assert (pruned - plain).abs().max().item() > 1e-4  # a random tiny layer moves little, still 100x the tolerance
    assert all((path - pruned).abs().max().item() <= 1e-5 for path in _single_text_paths(model, input_ids))


def test_model_sparse_paths_load_a_decoder_that_accelerate_offloads():
    """accelerate's cpu_offload keeps each module's weights on the meta device between forwards and loads them in its
    hooks: the sparse paths read the decoder without calling its forward -- the batched projection copied a meta
    result into an uninitialised buffer (garbage, different on every call), the CPU paths failed inside oneDNN."""
    from accelerate import cpu_offload

    model, features = tiny_model()
    single = features["input_ids"][:1]
    with torch.no_grad():
        expected = naive_sparse(model, features)
        expected_single = naive_sparse(model, {"input_ids": single, "attention_mask": torch.ones_like(single)})[0]
    model = cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.cls.predictions.decoder.weight.is_meta
    with torch.no_grad():
        for options in ({}, {"screening": False}, {"screening": True}, {"chunk_tokens": 4}):
            for _ in range(2):  # the garbage differed from call to call
                vectors = model.encode_sparse(**features, **options).sparse_embeddings
                assert (vectors - expected).abs().max().item() <= 1e-5, options
        ids, weights = model.encode_sparse_terms(single)
    assert torch.equal(ids, expected_single.nonzero().squeeze(1))
    assert (weights - expected_single[ids]).abs().max().item() <= 1e-5
    # threads: one's post_forward sent the weights back to meta under another's projection (errors, wrong vectors)
    from concurrent.futures import ThreadPoolExecutor

    def encode(_):
        with torch.no_grad():
            return (model.encode_sparse(**features, chunk_tokens=4).sparse_embeddings - expected).abs().max().item()

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(encode, range(80))) <= 1e-5
    # still offloaded after the calls, and nothing cached from the weights loaded for them
    assert model.cls.predictions.decoder.weight.is_meta and model.cls.predictions.bias.is_meta
    assert not model.__dict__.get("_fles1_decoder_cache")

    untied, _ = tiny_model()
    untied.config.tie_word_embeddings = False
    untied.cls.predictions.decoder.weight = torch.nn.Parameter(torch.empty_like(untied.cls.predictions.decoder.weight,
                                                                                device="meta"))
    with pytest.raises(ValueError, match="meta device and no accelerate offloading hook"), torch.no_grad():
        untied.encode_sparse(**features)  # no hook to load it: not garbage


def test_model_partly_offloaded_encodes_right_from_several_threads(tmp_path):
    """The backbone offloaded to disk, the decoder in memory (BERT's usual split: the tied decoder stays with the
    embeddings): no lock was taken, and one thread's unload pulled the weights from under another's."""
    from concurrent.futures import ThreadPoolExecutor

    from accelerate import dispatch_model

    model, features = tiny_model()
    single = features["input_ids"][:1]
    with torch.no_grad():
        expected = naive_sparse(model, features)
        expected_single = naive_sparse(model, {"input_ids": single, "attention_mask": torch.ones_like(single)})[0]
    model = dispatch_model(model, device_map={"bert.embeddings": "cpu", "bert.encoder": "disk", "cls": "cpu"},
                           offload_dir=str(tmp_path), main_device="cpu")
    assert not model.cls.predictions.decoder.weight.is_meta

    def encode(call):
        with torch.no_grad():
            if call % 2:
                return (model.encode_sparse(**features).sparse_embeddings - expected).abs().max().item()
            ids, weights = model.encode_sparse_terms(single)
            return (torch.zeros_like(expected_single).index_put_((ids,), weights) - expected_single).abs().max().item()

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(encode, range(80))) <= 1e-5


def test_model_encode_sparse_with_return_dict_false():
    """config.return_dict=False (a from_pretrained kwarg) made BERT return tuples: encode_sparse raised AttributeError."""
    model, features = tiny_model()
    with torch.no_grad():
        expected = model.encode_sparse(**features).sparse_embeddings
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**features), tuple)
        assert torch.equal(model.encode_sparse(**features).sparse_embeddings, expected)
    assert all(torch.equal(path, expected[0]) or (path - expected[0]).abs().max() <= 1e-5
               for path in _single_text_paths(model, features["input_ids"][:1]))


def test_model_single_text_under_cpu_autocast():
    """Under torch.autocast("cpu", bfloat16) a single text crashed once its trace existed (the exact recompute
    ran in bf16 against float32 buffers); now every path follows autocast like forward does."""
    model, features = tiny_model()
    input_ids = features["input_ids"][:1]
    _single_text_paths(model, input_ids)  # builds the trace and the int8 screen first
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        reference = naive_sparse(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
        dense, terms = _single_text_paths(model, input_ids)
        batch = model.encode_sparse(**features).sparse_embeddings
    assert (reference > 0).sum() > 10
    assert (dense - reference).abs().max().item() <= 0.05 and (terms - dense).abs().max().item() <= 1e-6
    assert (batch[0] - dense).abs().max().item() <= 0.05


def test_model_converts_dtype_after_a_single_text_when_torch_swaps_parameters():
    """With torch.__future__.set_swap_module_params_on_conversion(True) (how torch converts tensor subclasses),
    .to() / .double() after one single-text encode failed: "Couldn't swap Embedding.weight" (the trace held them)."""
    model, features = tiny_model()
    input_ids = features["input_ids"][:1]
    before = _single_text_paths(model, input_ids)[0]
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
        model.float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert all(torch.equal(path, before) or (path - before).abs().max() <= 1e-6
               for path in _single_text_paths(model, input_ids))


def test_model_clear_caches_after_a_data_write_to_one_decoder_row():
    """A write through .data to one decoder row bumps no version counter and may miss the sampled elements:
    the documented remedy is clear_caches()."""
    model, features = tiny_model()
    with torch.no_grad():
        model.encode_sparse(**features)
        active = int(naive_sparse(model, features)[0].argmax())
    weight = model.get_output_embeddings().weight
    weight.data[active] = -weight.data[active]
    model.clear_caches()
    with torch.no_grad():
        reference = naive_sparse(model, features)
        assert (model.encode_sparse(**features).sparse_embeddings - reference).abs().max().item() <= 1e-5
    assert all((path - reference[0]).abs().max().item() <= 1e-5
               for path in _single_text_paths(model, features["input_ids"][:1]))


IDS = torch.tensor([[101, 2054, 2003, 3698, 4083, 1029, 102]])


def _reference_vector(model, ids):
    """log(1 + ReLU) of forward()'s logits, max-pooled over the tokens: what encode_sparse must equal."""
    return torch.log1p(torch.relu(model(input_ids=ids).logits)).amax(dim=1)


def test_training_only_the_vocabulary_bias_gets_its_gradient(tiny_random_checkpoint):
    """With every parameter frozen but the bias, encode_sparse took the no-grad CPU inference path: a vector
    without grad_fn, and backward() failed."""
    model = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    bias = model.cls.predictions.bias
    bias.requires_grad_(True)
    model.encode_sparse(IDS).sparse_embeddings.sum().backward()
    ours, bias.grad = bias.grad.clone(), None
    _reference_vector(model, IDS).sum().backward()
    assert ours.abs().sum() > 0 and torch.allclose(ours, bias.grad, atol=1e-6)


def test_sparse_settings_given_to_the_loaders_are_checked(tiny_random_checkpoint):
    """from_pretrained's keyword overrides are set after __init__'s checks: pooling="mean" loaded (and max-pooled
    all the same), an overlong max length or a negative threshold failed only later, in the encoder or at save."""
    from transformers import AutoConfig

    for override, message in (({"pooling": "mean"}, r"pooling='mean' is not supported; choose one of \['max'\]"),
                              ({"query_max_length": 1000}, "query_max_length=1000 exceeds max_position_embeddings"),
                              ({"inference_threshold": -1.0}, "inference_threshold must be a number >= 0")):
        for load in (FLES1Config.from_pretrained, FLES1ForMaskedLM.from_pretrained,
                     lambda path, **kw: AutoConfig.from_pretrained(path, trust_remote_code=True, **kw)):
            with pytest.raises(ValueError, match=message):
                load(tiny_random_checkpoint, **override)
    config, unused = FLES1Config.from_pretrained(tiny_random_checkpoint, query_max_length=12, other=1,
                                                 return_unused_kwargs=True)
    assert config.query_max_length == 12 and unused == {"other": 1}


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_fles1_encoder_sends_each_keyword_where_it_belongs(tiny_random_checkpoint, trust_remote_code):
    """Every keyword went to the config, the model and the tokenizer: query_max_length=8 (a config setting the
    model loaders take) and use_fast=False (the tokenizer's) were TypeErrors from FLES1ForMaskedLM.__init__."""
    from fles1_encoder import FLES1Encoder, SettingError

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", trust_remote_code=trust_remote_code,
                                           query_max_length=8, inference_threshold=0.5, use_fast=False,
                                           dtype=torch.bfloat16)
    assert encoder.model.config.query_max_length == 8 and encoder.threshold == 0.5
    assert encoder.model.dtype == torch.bfloat16  # use_fast went to the tokenizer (transformers 5 may keep it fast)
    # queries are cut at 8 tokens: [CLS] + 6 words + [SEP]
    cut, whole = encoder.encode_batch([" ".join(["protein"] * 6), " ".join(["protein"] * 50)], kind="query",
                                      output="torch", threshold=0).to_dense()
    assert torch.equal(cut, whole) and cut.count_nonzero() > 0
    # the caller's setting, not a broken folder (it was a CheckpointError, "could not load the FLES-1 model")
    with pytest.raises(SettingError, match="query_max_length=1000 exceeds max_position_embeddings"):
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", trust_remote_code=trust_remote_code,
                                     query_max_length=1000)
    with pytest.raises(TypeError, match=r"^FLES1Encoder.from_pretrained got query_max_lenght: neither a download "
                                        r"option \(revision, token"):  # a typo: FLES1ForMaskedLM.__init__'s TypeError
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", trust_remote_code=trust_remote_code,
                                     query_max_lenght=8)
    with pytest.raises(TypeError, match="does not take output_loading_info"):  # the model came back as a tuple
        FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu", output_loading_info=True)


def test_a_model_built_under_inference_mode_encodes(tiny_random_checkpoint):
    """Its weights are inference tensors, which keep no version counter: the decoder cache's key raised
    "Inference tensors do not track version counter" (also for a parametrized decoder under inference_mode)."""
    config = FLES1Config.from_pretrained(tiny_random_checkpoint)
    torch.manual_seed(0)
    with torch.inference_mode():
        model = FLES1ForMaskedLM(config).eval()
        assert model.cls.predictions.decoder.weight.is_inference()
        first = model.encode_sparse(IDS).sparse_embeddings
        terms, weights = model.encode_sparse_terms(IDS)
        model.cls.predictions.decoder.weight.mul_(1.5)  # in place, in inference mode: no version to bump
        changed = model.encode_sparse(IDS).sparse_embeddings
        reference = _reference_vector(model, IDS)
    assert torch.equal(terms, first[0].nonzero().squeeze(1)) and torch.allclose(weights, first[0][terms], atol=1e-6)
    assert not torch.equal(first, changed) and torch.allclose(changed, reference, atol=1e-5)


def test_model_check_source_closes_the_files_it_reads(tiny_random_checkpoint, tmp_path):
    """check_source read a sentence-transformers folder's modules.json and pooling config through json.load(open(..))
    and left both files to the garbage collector: ResourceWarnings, errors under -W error."""
    import gc
    import warnings

    from sentence_transformers import SparseEncoder

    from fles1.checkpoint import check_source

    SparseEncoder(tiny_random_checkpoint, trust_remote_code=True, device="cpu").save_pretrained(str(tmp_path / "st"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_source(str(tmp_path / "st")) == "fles1"
        gc.collect()
    assert not [warning for warning in caught if issubclass(warning.category, ResourceWarning)]
