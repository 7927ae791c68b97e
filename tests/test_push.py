"""push_fles1.py: dry-run folder round trip, upload through huggingface_hub's client over a fake HTTP transport,
refusals (no token, broken folder), and the token never reaching the output."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http

import push_fles1
from fles1 import publish as publish_module
from test_card import make_eval, make_training_log

# The HTTP library huggingface_hub's own client is built on: httpx2 from huggingface_hub 2.0, httpx in 1.x
# (requirements allow both; the GPU machine's image has 1.33).
http = getattr(_http, "httpx2", None) or _http.httpx

TOKEN = "hf_fakeTOKEN0123456789abcdefSECRET"
REPO_ID = "mindoval/fles1-v14"
TEXTS = ["What is machine learning?", "Vitamin D deficiency and statin use in older adults.", "émoji 🙂 naïve café"]

# A fresh interpreter, offline, without the project on sys.path: loads OUT three ways and SOURCE with the project's
# FLES1Encoder, prints every vector (before the threshold) as JSON.
ROUND_TRIP_SCRIPT = r"""
import json, os, sys
out, source, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, out)  # as after hf_hub_download("mindoval/fles1-v14", "fles1_encoder.py")
import torch
from transformers import AutoModel, AutoTokenizer
from sentence_transformers import SparseEncoder
import fles1_encoder
assert os.path.dirname(fles1_encoder.__file__) == out, fles1_encoder.__file__
model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
vectors = {"auto_model": [], "sparse_encoder": None, "fles1_encoder": None, "source": None}
with torch.inference_mode():
    for text in texts:
        features = tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
        vectors["auto_model"].append(model.encode_sparse(**features).sparse_embeddings[0].tolist())
vectors["sparse_encoder"] = SparseEncoder(out, trust_remote_code=True, device="cpu").encode_document(
    texts, convert_to_tensor=True).to_dense().tolist()
dense = lambda encoder: encoder.encode_batch(texts, threshold=0, output="torch").to_dense().tolist()
vectors["fles1_encoder"] = dense(fles1_encoder.FLES1Encoder.from_pretrained(out, device="cpu"))
sys.path.remove(out)
for name in ("fles1_encoder", "configuration_fles1", "modeling_fles1"):  # the folder's copies, imported with it
    sys.modules.pop(name, None)
sys.path.insert(0, sys.argv[4])  # the project checkout, for the source folder's reference vectors
from fles1_encoder import FLES1Encoder
vectors["source"] = dense(FLES1Encoder.from_pretrained(source, device="cpu"))
print(json.dumps(vectors))
"""


@pytest.fixture
def source_checkpoint(fles1_checkpoint, tmp_path):
    """A copy of the converted shipped backbone plus training leftovers that must not be published."""
    folder = tmp_path / "trained"
    shutil.copytree(fles1_checkpoint, folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"not for the hub")
    (folder / "training_args.bin").write_bytes(b"not for the hub")
    (folder / "nnz_trace_rank0.json").write_text("[]")  # train_fles1.py --trace-nnz
    return str(folder)


@pytest.fixture
def result_files(tmp_path, source_checkpoint):
    from fles1.evaluation import model_fingerprint

    results = make_eval(tmp_path / "eval_nfcorpus.json", model_path=source_checkpoint,
                        fingerprint=model_fingerprint(source_checkpoint),
                        datasets={"nfcorpus": 0.30587123, "scifact": 0.60112})
    log = make_training_log(os.path.join(source_checkpoint, "training_log.json"), seed=7)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1, 1))
    axis.plot([0, 1], [1, 0])
    plot = str(tmp_path / "loss.png")
    figure.savefig(plot)
    plt.close(figure)
    return {"results": results, "training_log": log, "plot": plot}


class FakeHub:
    """The Hub's HTTP API, faked at the transport under huggingface_hub's own httpx client."""

    def __init__(self, remote_files=(".gitattributes",), private=None):
        self.requests = []
        self.remote_files = list(remote_files)  # what the repo holds before the push (its tree listing)
        self.private = private  # the repo's visibility as the Hub reports it (repo_info)

    def __call__(self, request: http.Request) -> http.Response:
        path, body = request.url.path, request.read()
        self.requests.append((request.method, path, dict(request.url.params), dict(request.headers), body))
        if path == "/api/repos/create":
            return http.Response(200, json={"url": f"https://huggingface.co/{REPO_ID}"})
        if path == "/api/validate-yaml":  # upload_folder has the Hub check README.md's metadata
            return http.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/discussions") and request.method == "POST":  # create_pr: a draft PR first
            return http.Response(200, json={"num": 1})
        if path.endswith("/discussions/1"):
            return http.Response(200, json={
                "title": "Upload FLES-1", "num": 1,
                "createdAt": "2025-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                "repo": {"name": REPO_ID, "type": "model"}, "events": [], "filesWithConflicts": [],
                "changes": {"base": "refs/heads/main"}})
        if "/branch/" in path:
            return http.Response(200, json={})
        if "/tree/" in path:  # list_repo_files, for upload_folder's delete_patterns
            return http.Response(200, json=[{"type": "file", "path": name, "size": 1, "oid": "b" * 40}
                                            for name in self.remote_files])
        if path == f"/api/models/{REPO_ID}" and request.method == "GET":  # repo_info
            return http.Response(200, json={"id": REPO_ID, "private": self.private})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return http.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:  # a PR: committed to refs/pr/N, or (older clients) to main with ?create_pr=1
            pr = "refs/pr/" in path or request.url.params.get("create_pr") == "1"
            return http.Response(200, json={
                "commitUrl": f"https://huggingface.co/{REPO_ID}/commit/{'a' * 40}", "commitOid": "a" * 40,
                "pullRequestUrl": f"https://huggingface.co/{REPO_ID}/discussions/1" if pr else None})
        return http.Response(404, json={"error": f"fake hub: unexpected {request.method} {path}"})

    def repo_calls(self) -> list:
        """(method, path) of the calls that act on the repo (not metadata checks or client telemetry)."""
        return [(method, path) for method, path, *_ in self.requests
                if path in ("/api/repos/create", f"/api/models/{REPO_ID}") or path.startswith(f"/api/models/{REPO_ID}/")]

    def json_sent(self, path: str) -> dict:
        (body,) = [body for _, sent_path, _, _, body in self.requests if sent_path == path]
        return json.loads(body)

    def deleted_files(self) -> set:
        """path_in_repo of the commit's deletions."""
        (_, _, _, _, body), = [r for r in self.requests if "/commit/" in r[1]]
        lines = [json.loads(line) for line in body.decode().splitlines()]
        return {item["value"]["path"] for item in lines if item["key"] == "deletedFile"}

    def committed_files(self) -> dict:
        """path_in_repo -> bytes of the commit's regular-file operations (NDJSON payload)."""
        (_, _, _, _, body), = [r for r in self.requests if "/commit/" in r[1]]
        files = {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake transport is the network
    _http.set_client_factory(lambda: http.Client(transport=http.MockTransport(hub)))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_dry_run_round_trip(source_checkpoint, result_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # the validating import wrote __pycache__/ in OUT
    out, older = str(tmp_path / "hub"), tmp_path / "older"
    shutil.copytree(source_checkpoint, older)  # weights saved next to an older copy of the code
    with open(older / "modeling_fles1.py", "a", encoding="utf-8") as handle:
        handle.write("\n# saved by an older FLES-1\n")
    settings = json.loads((older / "tokenizer_config.json").read_text())
    settings.pop("is_local", None)
    (older / "tokenizer_config.json").write_text(  # an offline save of a folder
        json.dumps({**settings, "local_files_only": True, "is_local": True}))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # the validation child's
    rc = push_fles1.main(["--model", str(older), "--repo-id", REPO_ID, "--dry-run", out,
                          "--results", result_files["results"], "--plots", result_files["plot"]])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    # it loaded the staging folder's code (remote code): one orphaned copy per push was left in the modules cache
    copies = os.listdir(tmp_path / "modules" / "transformers_modules")
    assert not [name for name in copies if "partial" in name], copies
    assert "nothing uploaded" in printed.out and "[FAILED]" not in printed.out
    assert "no training log" not in printed.out  # MODEL/training_log.json is found
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    for name in ("README.md", "model.safetensors", "config.json", "modules.json", "tokenizer.json",
                 "configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py", "results/eval_nfcorpus.json",
                 "results/training_log_seed7.json", "plots/loss.png", "LICENSE"):  # the backbone's, as Apache-2.0 asks
        assert name in names
    assert not any(n.startswith(("checkpoint-", "__pycache__", "nnz_trace_rank")) or n == "training_args.bin"
                   for n in names), names
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py"):  # the current code ships
        with open(os.path.join(out, name), "rb") as shipped, open(os.path.join(project, name), "rb") as current:
            assert shipped.read() == current.read(), name
    with open(os.path.join(out, "tokenizer_config.json")) as handle:
        assert json.load(handle) == settings  # without the saving machine's local_files_only / is_local

    # the three loaders in a fresh offline process agree, and give the source folder's vectors
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.run([sys.executable, "-c", ROUND_TRIP_SCRIPT, out, source_checkpoint, json.dumps(TEXTS),
                              root], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    import torch

    vectors = {k: torch.tensor(v) for k, v in json.loads(process.stdout.strip().splitlines()[-1]).items()}
    assert (vectors["source"] > 0).sum(dim=1).min() > 0
    for name in ("auto_model", "sparse_encoder", "fles1_encoder"):
        assert (vectors[name] - vectors["source"]).abs().max() <= 1e-5, name

    # the card: valid metadata, NDCG@10 for nfcorpus equal to the eval JSON's
    card = ModelCard.load(os.path.join(out, "README.md"))
    with open(result_files["results"]) as handle:
        expected = json.load(handle)["datasets"]["nfcorpus"]["metrics"]["ndcg@10"]
    ndcg = [r.metric_value for r in card.data.eval_results if r.dataset_name == "nfcorpus"
            and r.metric_type == "ndcg_at_10"]
    assert ndcg == [expected]
    assert "![plots/loss.png](plots/loss.png)" in card.text
    assert "| 7 | 12500 |" in card.text
    assert "Source: `results/eval_nfcorpus.json`" in card.text  # the card names the copy shipped beside it  # the training log found in the model folder fed the training section


def passing_validation(monkeypatch):
    """The loaders' checks run for real in the dry-run and broken-folder tests; here the upload path is tested."""
    checked = []
    monkeypatch.setattr(publish_module, "validate",
                        lambda folder: checked.append(folder) or [publish_module.check_files(folder),
                                                                   publish_module.check_card(folder)])
    return checked


def test_upload_through_huggingface_hub_client(source_checkpoint, result_files, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    checked = passing_validation(monkeypatch)
    fake_hub.private = True  # a new repo, created private
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--private", "--create-pr",
                          "--results", result_files["results"]])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert TOKEN not in printed.out + printed.err
    assert len(checked) == 1
    validated = [json.loads(body) for _, path, _, _, body in fake_hub.requests if path == "/api/validate-yaml"]
    # the card the Hub validated is the card committed (huggingface_hub 1.3 validates it twice, later ones once)
    assert validated and {v["content"].encode() for v in validated} == {fake_hub.committed_files()["README.md"]}
    calls = fake_hub.repo_calls()
    # --private: the repo's visibility checked (an existing public repo stays public); the branch's files listed
    # (the earlier push's weights, results and plots are replaced)
    assert calls[:4] == [("POST", "/api/repos/create"), ("GET", f"/api/models/{REPO_ID}"),
                         ("GET", f"/api/models/{REPO_ID}/tree/main"), ("POST", f"/api/models/{REPO_ID}/preupload/main")]
    # --create-pr: a PR, not main. huggingface_hub opens a draft PR and commits to it; 1.3 and older ask the Hub to
    # turn the commit into a PR (?create_pr=1)
    pr_commit = [params for _, path, params, *_ in fake_hub.requests if "/commit/" in path]
    assert calls[4:] == [("POST", f"/api/models/{REPO_ID}/discussions"), ("GET", f"/api/models/{REPO_ID}/discussions/1"),
                         ("POST", f"/api/models/{REPO_ID}/commit/refs/pr/1")] or (
        calls[4:] == [("POST", f"/api/models/{REPO_ID}/commit/main")] and pr_commit == [{"create_pr": "1"}])
    create = fake_hub.json_sent("/api/repos/create")
    assert create["name"] == "fles1-v14" and create["organization"] == "mindoval"
    assert create.get("visibility") == "private" or create.get("private") is True  # huggingface_hub <= 1.3: private
    for _, path, _, headers, _ in fake_hub.requests:
        if path == "/api/repos/create" or path.startswith(f"/api/models/{REPO_ID}/"):
            assert headers["authorization"] == f"Bearer {TOKEN}"
    assert [params.get("create_pr") for _, path, params, *_ in fake_hub.requests if "/preupload/" in path] == ["1"]
    files = fake_hub.committed_files()
    with open(os.path.join(source_checkpoint, "model.safetensors"), "rb") as handle:
        assert files["model.safetensors"] == handle.read()
    assert {"README.md", "fles1_encoder.py", "modeling_fles1.py", "results/eval_nfcorpus.json"} <= set(files)
    assert "discussions/1" in printed.out  # the PR url is reported
    assert "revision=" not in files["README.md"].decode()  # merged into main, which the snippets load


def test_revision_without_pr_creates_the_branch(source_checkpoint, result_files, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    passing_validation(monkeypatch)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--revision", "v14",
                          "--results", result_files["results"]])
    assert rc == 0, capsys.readouterr().err
    calls = [path for _, path in fake_hub.repo_calls()]
    assert calls == ["/api/repos/create", f"/api/models/{REPO_ID}/branch/v14", f"/api/models/{REPO_ID}/tree/v14",
                     f"/api/models/{REPO_ID}/preupload/v14", f"/api/models/{REPO_ID}/commit/v14"]
    create = fake_hub.json_sent("/api/repos/create")
    assert "visibility" not in create and not create.get("private")  # not --private: the account default
    assert all("create_pr" not in params for _, _, params, _, _ in fake_hub.requests)
    # the card's snippets load the branch the weights went to, not main (which may hold another model, or none)
    card = fake_hub.committed_files()["README.md"].decode()
    loads = [line for line in card.splitlines() if f'"{REPO_ID}"' in line]
    assert len(loads) == 5 and all('revision="v14"' in line for line in loads), loads
    rerun = card.split("```bash\n")[1].split("```")[0].splitlines()
    assert rerun[0] == f"hf download {REPO_ID} --revision v14 --local-dir fles1-v14-v14", rerun
    assert all(" --model fles1-v14-v14 " in line for line in rerun[1:]), rerun


@pytest.mark.parametrize("failure", ["rejected token", "no network"])
def test_hub_failure_is_one_error_line_without_the_token(source_checkpoint, result_files, fake_hub, monkeypatch,
                                                         capsys, failure):
    reached = []

    def refuse(request):
        if request.url.path.startswith(("/api/repos/", "/api/models/")):  # not the client's telemetry
            reached.append(request.url.path)
        if failure == "no network":
            raise http.ConnectError("[Errno -2] Name or service not known", request=request)
        return http.Response(401, json={"error": "Invalid credentials in Authorization header"})

    _http.set_client_factory(lambda: http.Client(transport=http.MockTransport(refuse)))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    passing_validation(monkeypatch)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"]])
    printed = capsys.readouterr()
    assert rc == 1  # the Hub failed, not the inputs (bad inputs: 2)
    (line,) = printed.err.strip().splitlines()
    assert line.startswith(f"error: upload to {REPO_ID} failed at create_repo (")
    assert ("401" in line) if failure == "rejected token" else ("Name or service not known" in line)
    assert TOKEN not in printed.out + printed.err
    assert reached[0] == "/api/repos/create" and not any("/preupload/" in p or "/commit/" in p for p in reached)


def test_missing_token_refused_before_any_work(source_checkpoint, result_files, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(publish_module, "assemble", lambda *a, **k: pytest.fail("assembled without a token"))
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err


def test_broken_folder_refused_naming_the_checks(source_checkpoint, result_files, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    os.remove(os.path.join(source_checkpoint, "model.safetensors"))
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"]])
    printed = capsys.readouterr()
    assert rc == 2
    assert "refusing to upload" in printed.err
    assert "[FAILED] required files: missing weights (" in printed.err and "model.safetensors: missing" in printed.err
    for loader in ("AutoModel.from_pretrained", "SparseEncoder", "FLES1Encoder.from_pretrained"):
        assert f"[FAILED] {loader}" in printed.err
    assert fake_hub.requests == []  # nothing reached the Hub
    assert TOKEN not in printed.out + printed.err


def test_a_folder_without_tokenizer_files_is_refused_naming_them(source_checkpoint, result_files, tmp_path, capsys):
    """Without tokenizer.json, transformers built a stand-in (every word [UNK]): push blamed the results' tokenizer
    fingerprint, and with results recording none its file check said [ok]."""
    os.remove(os.path.join(source_checkpoint, "tokenizer.json"))
    if os.path.exists(os.path.join(source_checkpoint, "vocab.txt")):
        os.remove(os.path.join(source_checkpoint, "vocab.txt"))
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                            "--dry-run", str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().err
    assert "[FAILED] required files: missing tokenizer.json or vocab.txt" in printed
    assert "evaluated with a tokenizer" not in printed


@pytest.mark.parametrize("edit", ["query-length", "query-prompt"])
def test_folder_whose_loaders_encode_queries_otherwise_is_refused_naming_why(edit, source_checkpoint, result_files,
                                                                               tmp_path, capsys):
    """sentence_bert_config.json cutting queries at 8 tokens (config.json: 64) passed: the probe (one short text,
    encoded as a document only) reached neither cut, while SparseEncoder.encode_query and FLES1Encoder then differed
    by 1.78 on a 16-word query. A query prompt saved in config_sentence_transformers.json was refused with only the
    difference, not its cause."""
    name, key, value = {"query-length": ("sentence_bert_config.json", "query_length", 8),
                        "query-prompt": ("config_sentence_transformers.json", "prompts", {"query": "query: "})}[edit]
    path = os.path.join(source_checkpoint, name)
    with open(path) as handle:
        settings = json.load(handle)
    settings[key] = value  # (a document_length of 8 cut the old probe too: it was refused already)
    with open(path, "w") as handle:
        json.dump(settings, handle)
    out = tmp_path / "hub"
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                          "--dry-run", str(out)])
    assert rc == 2 and not out.exists()
    cause = {"query-length": r"sentence-transformers cuts in encode_query at 8 tokens",
             "query-prompt": r"config_sentence_transformers\.json says: encode_query prepends 'query: '"}[edit]
    err = capsys.readouterr().err
    assert re.search(r"\[FAILED\] vectors agree: query: max abs difference [1-9].* -- .*" + cause, err)
    # the reasons name the folder kept for inspection, not the staging folder renamed to it
    assert ".partial" not in err and f"{out}.rejected" in err


def test_inputs_push_cannot_read_or_tie_to_the_model_are_one_line(source_checkpoint, result_files, tmp_path,
                                                                  monkeypatch, capsys):
    """Results recording no model fingerprint were published as the folder's (another model's numbers); an unreadable
    plot or an output folder that cannot be made was a traceback with exit 1 (push's code for a Hub failure); a data
    folder given as --model was assembled and validated before five failed checks."""
    import builtins
    import tempfile

    args = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "out")]
    unmarked = json.loads(open(result_files["results"]).read())
    del unmarked["model"]["fingerprint"]
    (tmp_path / "unmarked.json").write_text(json.dumps(unmarked))
    assert push_fles1.main([*args, "--results", str(tmp_path / "unmarked.json")]) == 2
    assert "unmarked.json: records no model fingerprint (model.fingerprint)" in capsys.readouterr().err
    assert push_fles1.main([*args, "--model", str(tmp_path), "--results", result_files["results"]]) == 2
    assert f"error: {tmp_path}: no config.json, not a FLES-1 checkpoint folder" in capsys.readouterr().err
    real_open, real_mkdtemp = builtins.open, tempfile.mkdtemp

    def refusing_open(path, *more, **kwargs):  # as for a chmod 000 file (root reads those, so tests cannot chmod)
        if os.fspath(path) == result_files["plot"]:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *more, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert push_fles1.main([*args, "--results", result_files["results"], "--plots", result_files["plot"]]) == 2
    assert f"error: {result_files['plot']}: cannot be copied (Permission denied)" in capsys.readouterr().err
    monkeypatch.setattr(builtins, "open", real_open)

    def refusing_mkdtemp(*more, dir=None, **kwargs):  # a parent folder not writable
        if dir is not None and os.path.realpath(dir) == os.path.realpath(tmp_path / "ro"):
            raise PermissionError(13, "Permission denied", dir)
        return real_mkdtemp(*more, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refusing_mkdtemp)
    os.makedirs(tmp_path / "ro")
    assert push_fles1.main([*args[:-1], str(tmp_path / "ro" / "hub"), "--results", result_files["results"]]) == 2
    assert f"error: {tmp_path / 'ro' / 'hub'}: not assembled ([Errno 13] Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sharded_weights_count_as_the_weights(tiny_random_checkpoint, tmp_path):
    """A sharded folder loads and evaluates, but 'required files: missing model.safetensors' refused to publish it."""
    from conftest import sharded_copy
    from fles1.publish import check_files

    folder = Path(sharded_copy(tiny_random_checkpoint, tmp_path / "sharded"))
    assert check_files(str(folder)).ok
    shard = sorted(name for name in os.listdir(folder) if name.startswith("model-"))[0]
    os.remove(folder / shard)
    check = check_files(str(folder))
    assert not check.ok and f"{shard}: missing (listed in" in check.detail


def test_a_card_without_training_details_is_announced(source_checkpoint, result_files, tmp_path, monkeypatch,
                                                      capsys):
    """Republishing a converted or an already published folder (no training_log.json of its own) gave a card whose
    Training section was empty, without a word -- convert --threshold is what push's own threshold error advises."""
    passing_validation(monkeypatch)
    os.makedirs(os.path.join(source_checkpoint, "results"))
    earlier = os.path.join(source_checkpoint, "results", "training_log_seed7.json")
    os.rename(os.path.join(source_checkpoint, "training_log.json"), earlier)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "o"),
                          "--results", result_files["results"]])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"warning: no training log or recipe: the card's Training section will be empty (--training-log FILE " \
           f"({earlier} is an earlier publish's: pass it), or --recipe)" in printed
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "p"),
                          "--results", result_files["results"], "--training-log", earlier])
    assert rc == 0 and "no training log" not in capsys.readouterr().out


def test_revision_with_create_pr_refused_early(source_checkpoint, result_files, tmp_path, capsys):
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--revision", "v14", "--create-pr",
                          "--results", result_files["results"], "--dry-run", str(tmp_path / "o")])
    assert rc == 2 and "--create-pr" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_missing_results_refused(source_checkpoint, tmp_path, capsys):
    """--help showed --results as optional ([--results [RESULTS ...]]), and without it push failed after parsing."""
    with pytest.raises(SystemExit) as exit:
        push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "o")])
    assert exit.value.code == 2
    assert "the following arguments are required: --results" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(publish_module.PublishError, match="at least one eval results JSON: pass --results"):
        publish_module.publish(source_checkpoint, REPO_ID, publish_module.CardInputs(results=[]),
                               dry_run=str(tmp_path / "o"))  # the library call


def test_bad_repo_id_refused_before_any_work(source_checkpoint, result_files, tmp_path, capsys):
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", "not a repo!", "--results",
                          result_files["results"], "--dry-run", str(tmp_path / "o")])
    assert rc == 2 and "--repo-id 'not a repo!' is not a Hub repo id" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    # an id without an owner is valid for the Hub (it lands under the token's account), but the card's snippets
    # would load `fles1-bare`, which is not that repo
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", "fles1-bare", "--results",
                          result_files["results"], "--dry-run", str(tmp_path / "o")])
    assert rc == 2 and "--repo-id 'fles1-bare' names no owner" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_a_push_replaces_an_earlier_pushs_weights_results_and_plots(source_checkpoint, result_files, fake_hub,
                                                                    monkeypatch, capsys):
    """upload_folder adds and overwrites only: an earlier sharded push would leave its shards and index beside this
    push's model.safetensors (and a single-file push's model.safetensors beside later shards, which loaders
    prefer), its results and plots beside a card that no longer describes them. Other files stay."""
    earlier_push = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json", "results/eval_old.json", "plots/old_loss.png"]
    earlier_push += ["results/seed1/eval.json"]
    kept = [".gitattributes", "notes/ablations.md", "onnx/model.onnx", "fp16/model.safetensors",  # not at the root:
            "2_Dense/model.safetensors"]  # a bare "*.safetensors" pattern deleted these too
    fake_hub.remote_files = earlier_push + kept + ["model.safetensors", "README.md", "results/eval_nfcorpus.json"]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    passing_validation(monkeypatch)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"]])
    assert rc == 0, capsys.readouterr().err
    assert fake_hub.deleted_files() == set(earlier_push)  # in the same commit as the new files
    assert {"model.safetensors", "README.md", "results/eval_nfcorpus.json"} <= set(fake_hub.committed_files())


def test_an_existing_public_repo_is_not_pushed_to_as_private(source_checkpoint, result_files, fake_hub, monkeypatch,
                                                             capsys):
    fake_hub.private = False  # the repo exists, public: create_repo(private=True, exist_ok=True) leaves it so
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    passing_validation(monkeypatch)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--private",
                          "--results", result_files["results"]])
    err = capsys.readouterr().err
    assert rc == 2 and f"--private: {REPO_ID} exists and is public" in err and "nothing was uploaded" in err
    assert not any("/preupload/" in path or "/commit/" in path for _, path in fake_hub.repo_calls())


def test_published_files_name_no_local_absolute_path(source_checkpoint, result_files, tmp_path, capsys):
    """An eval's model.path and a recipe's folders are the publisher's (/home/<user>/...): cut to their last
    component in the card and in the results/ copies; relative paths stay; the recipe file keeps its comments."""
    with open(result_files["training_log"]) as handle:
        log = json.load(handle)
    log["recipe"]["data"]["source"] = str(tmp_path / "datasets" / "nfcorpus")
    log["recipe"]["output_dir"] = str(tmp_path / "runs" / "2026-11-27")
    log["eval"] = {"note": f"{tmp_path / 'datasets' / 'nfcorpus'}: no BEIR dev split (qrels/dev.tsv); skipped"}
    with open(result_files["training_log"], "w") as handle:
        json.dump(log, handle)
    recipe = tmp_path / "recipe.yaml"  # a relative path holding the absolute one's last part stays as it is
    recipe.write_text(f"# the v14 recipe\nlearning_rate: 2.0e-05\ndata:\n  source: {tmp_path / 'datasets' / 'nfcorpus'}"
                      f"  # BEIR folder\n  split: train\noutput_dir: {tmp_path / 'runs' / '2026-11-27'}\n"
                      f"notes: [outputs/datasets/nfcorpus-fles1]\n")
    out = tmp_path / "hub"
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                          "--recipe", str(recipe), "--dry-run", str(out)])
    assert rc == 0, capsys.readouterr().err
    published = {path.relative_to(out).as_posix(): path.read_text(encoding="utf-8") for path in out.rglob("*")
                 if path.suffix in (".json", ".yaml", ".md", ".py", ".txt")}
    assert "results/eval_nfcorpus.json" in published and "results/recipe.yaml" in published
    leaking = [name for name, text in published.items() if str(tmp_path) in text]
    assert not leaking
    assert json.loads(published["results/eval_nfcorpus.json"])["model"]["path"] == "trained"
    # quoted: a bare 2026-11-27 reads back as a date
    assert published["results/recipe.yaml"] == ('# the v14 recipe\nlearning_rate: 2.0e-05\ndata:\n  source: "nfcorpus"'
                                                '  # BEIR folder\n  split: train\noutput_dir: "2026-11-27"\n'
                                                'notes: [outputs/datasets/nfcorpus-fles1]\n')
    assert yaml.safe_load(published["results/recipe.yaml"])["output_dir"] == "2026-11-27"
    (log_name,) = [name for name in published if name.startswith("results/training_log")]
    assert json.loads(published[log_name])["eval"]["note"] == "nfcorpus: no BEIR dev split (qrels/dev.tsv); skipped"
    assert "| `data.source` | nfcorpus |" in published["README.md"]


def test_missing_input_file_leaves_no_half_built_folder(source_checkpoint, result_files, tmp_path, capsys):
    """A plot that does not exist fails the assembly after the checkpoint was copied: the partial folder goes, so
    the same command works once the path is fixed (it used to leave 'exists and is not empty')."""
    out = tmp_path / "o"
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
            "--dry-run", str(out), "--plots"]
    assert push_fles1.main(argv + [str(tmp_path / "missing.png")]) == 2
    assert "missing.png: file not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(["trained", "eval_nfcorpus.json", "loss.png"])  # no leftovers
    assert push_fles1.main(argv + [result_files["plot"]]) == 0
    assert os.path.isfile(out / "README.md") and os.path.isfile(out / "plots" / "loss.png")


def test_results_file_the_card_cannot_read_is_one_error_line(source_checkpoint, result_files, tmp_path, capsys):
    """A results file that is not eval_fles1.py JSON (e.g. its --markdown table) was a CardInputError traceback."""
    out, table = tmp_path / "o", tmp_path / "eval.md"
    table.write_text("| model | NDCG@10 |\n")
    for bad, message in ((table, "not valid JSON"), (tmp_path / "trained" / "config.json", "no 'datasets' object")):
        rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", str(bad),
                              "--dry-run", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: {bad}: {message}" in err and "Traceback" not in err
        assert not out.exists()  # nothing half-built


def test_results_of_another_model_refused(source_checkpoint, result_files, tmp_path, capsys):
    """The card showed the first results file's metrics whatever model folder was published."""
    other = make_eval(tmp_path / "other.json", model_path="outputs/other", fingerprint="e50026c1d5cc3488")
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "o"), "--results"]
    assert push_fles1.main(argv + [other, result_files["results"]]) == 2
    err = capsys.readouterr().err
    assert f"error: {other}: evaluated the model with fingerprint e50026c1d5cc3488, not {source_checkpoint}" in err
    assert not os.path.exists(tmp_path / "o")
    assert push_fles1.main(argv + [result_files["results"], other]) == 0  # another model later: a reproducibility run


def test_results_at_another_threshold_than_the_models_refused(source_checkpoint, result_files, tmp_path, capsys):
    """The card says "weights below the inference threshold (X) are dropped" with X from the results file: the
    parity run at 0, or a model converted with --threshold 0.5 and evaluated at 0.3, stated the wrong one."""
    at_zero = tmp_path / "at-zero.json"
    at_zero.write_text(json.dumps({**json.load(open(result_files["results"])), "threshold": 0.0}))
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "o"), "--results"]
    assert push_fles1.main(argv + [str(at_zero)]) == 2
    err = capsys.readouterr().err
    assert (f"error: {at_zero}: evaluated at threshold 0.0, but the model's inference threshold (config.json) is 0.3"
            in err) and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


def test_copies_with_clashing_names_never_overwrite_each_other(tmp_path):
    from fles1.publish import _copy_unique

    sources = []
    for folder, name in (("a", "eval.json"), ("b", "2_eval.json"), ("c", "eval.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(folder)
        sources.append(str(tmp_path / folder / name))
    copied = _copy_unique(sources, str(tmp_path / "out"))  # c's "2_eval.json" used to overwrite b's copy
    assert len(set(copied)) == 3 and [open(path).read() for path in copied] == ["a", "b", "c"]


def test_dry_run_that_fails_validation_is_kept_aside_not_in_place(source_checkpoint, result_files, tmp_path, capsys):
    os.remove(os.path.join(source_checkpoint, "model.safetensors"))
    out = tmp_path / "o"
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                          "--dry-run", str(out)])
    assert rc == 2 and f"(the folder is left at {out}.rejected for inspection)" in capsys.readouterr().err
    # it was renamed into place before the checks ran: a failed (or interrupted) dry run looked complete
    assert not out.exists() and (tmp_path / "o.rejected" / "config.json").is_file()
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                            "--dry-run", str(out)]) == 2  # again: the earlier .rejected is replaced
    assert not out.exists() and (tmp_path / "o.rejected").is_dir()
    shutil.rmtree(tmp_path / "o.rejected")
    capsys.readouterr()
    (tmp_path / "o.rejected").write_text("a file of that name")  # replaced too; the checks are still what is said
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                            "--dry-run", str(out)]) == 2
    assert "refusing to upload, failed checks" in capsys.readouterr().err and (tmp_path / "o.rejected").is_dir()


def test_an_interrupted_check_leaves_no_folder(source_checkpoint, result_files, tmp_path):
    def interrupted(staging):
        assert os.path.isfile(os.path.join(staging, "README.md"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_module.assemble(source_checkpoint, str(tmp_path / "o"), REPO_ID,
                                publish_module.CardInputs(results=[result_files["results"]]), check=interrupted)
    assert not (tmp_path / "o").exists()
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


def test_output_inside_the_model_folder_refused(source_checkpoint, result_files, capsys):
    """The folder copied itself (its staging folder) into the Hub folder, and a later dry run copied the earlier."""
    out = os.path.join(source_checkpoint, "hub")
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                            "--dry-run", out]) == 2
    assert f"{out}: inside the model folder {source_checkpoint}" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_images_the_studies_link_are_published(source_checkpoint, result_files, tmp_path, capsys):
    """The card embeds the studies text with its ![...](plots/...) links; the images were not copied."""
    studies = tmp_path / "study" / "STUDY.md"
    (studies.parent / "plots").mkdir(parents=True)
    shutil.copy(result_files["plot"], studies.parent / "plots" / "nnz_study.png")
    studies.write_text("## A study\n\n![nnz](plots/nnz_study.png)\n")
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
            "--studies", str(studies), "--dry-run"]
    assert push_fles1.main(argv + [str(tmp_path / "o")]) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "plots" / "nnz_study.png").read_bytes() == open(result_files["plot"], "rb").read()
    assert "![nnz](plots/nnz_study.png)" in (tmp_path / "o" / "README.md").read_text()
    # a study image at the path of the model's own plot replaced it: the card's training plot showed the study's
    (studies.parent / "plots" / "loss.png").write_bytes(b"\x89PNG another run's loss curve")
    studies.write_text("![nnz](plots/nnz_study.png) ![loss](plots/loss.png)\n")
    assert push_fles1.main(argv + [str(tmp_path / "o1"), "--plots", result_files["plot"]]) == 2
    assert "STUDY.md: links plots/loss.png, but the published folder has another file there" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    studies.write_text("![gone](plots/missing.png)\n")
    assert push_fles1.main(argv + [str(tmp_path / "o2")]) == 2
    assert "STUDY.md: links plots/missing.png, which is not at" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_results_or_logs_of_another_model_than_the_folder_are_refused(source_checkpoint, result_files,
                                                                        tiny_random_checkpoint, tmp_path, capsys):
    """Two ways another model's numbers reached the card: results evaluated with another tokenizer (the weights'
    fingerprint alone matched), and a training log whose folder holds another model (attached as the only log)."""
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--results"]
    from fles1.evaluation import tokenizer_fingerprint
    from transformers import AutoTokenizer

    recorded = json.load(open(result_files["results"]))
    own = tokenizer_fingerprint(AutoTokenizer.from_pretrained(source_checkpoint))
    for name, fingerprint, expected in (("same", own, 0), ("other", "0123456789abcdef", 2)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**recorded, "model": {**recorded["model"], "tokenizer_fingerprint": fingerprint}}))
        assert push_fles1.main(argv + [str(path), "--dry-run", str(tmp_path / f"o-{name}")]) == expected
    assert "evaluated with a tokenizer (fingerprint 0123456789abcdef) other than" in capsys.readouterr().err
    assert not (tmp_path / "o-other").exists()
    # every file of the folder's model is checked, not the first alone (the headline table merges them)
    second = tmp_path / "scifact.json"
    second.write_text(json.dumps({**recorded, "model": {**recorded["model"], "tokenizer_fingerprint": "feedbeef"},
                                  "datasets": {"trec-covid": recorded["datasets"]["nfcorpus"]}}))
    assert push_fles1.main(argv + [str(tmp_path / "same.json"), str(second), "--dry-run",
                                   str(tmp_path / "o-second")]) == 2
    assert f"{second}: evaluated with a tokenizer (fingerprint feedbeef) other than" in capsys.readouterr().err
    assert not (tmp_path / "o-second").exists()
    other_run = tmp_path / "other-run"
    shutil.copytree(tiny_random_checkpoint, other_run)  # another model, with its own training log
    log = make_training_log(other_run / "training_log.json", seed=42)
    assert push_fles1.main(argv + [result_files["results"], "--training-log", log, "--dry-run",
                                   str(tmp_path / "o-log")]) == 2
    assert f"{log}: its folder holds a model (fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "o-log").exists()


def test_dry_run_needs_a_folder_and_leaves_pickles_and_dotfiles_out(source_checkpoint, result_files, tmp_path,
                                                                     capsys):
    """--dry-run "" reported a temporary folder already deleted; a stray pytorch_model.bin (pickled, never
    validated) or .env (credentials) in the model folder went into the upload; a study image linked with a
    percent-encoded name was 'not found'."""
    argv = ["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"]]
    assert push_fles1.main(argv + ["--dry-run", ""]) == 2
    assert "--dry-run needs the folder to write" in capsys.readouterr().err
    (Path(source_checkpoint) / "pytorch_model.bin").write_bytes(b"pickled")
    (Path(source_checkpoint) / ".env").write_text("HF_TOKEN=secret\n")
    studies = tmp_path / "STUDY.md"
    (tmp_path / "figs").mkdir()
    shutil.copy(result_files["plot"], tmp_path / "figs" / "my fig.png")
    studies.write_text("![a](figs/my%20fig.png)\n")
    assert push_fles1.main(argv + ["--studies", str(studies), "--dry-run", str(tmp_path / "o")]) == 0, \
        capsys.readouterr().err
    published = set(os.listdir(tmp_path / "o"))
    assert "model.safetensors" in published and not {"pytorch_model.bin", ".env"} & published
    assert (tmp_path / "o" / "figs" / "my fig.png").is_file()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def _validation_child(pid: int, folder: str):
    """The child of `pid` validating `folder` (its command line names it), or None yet."""
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if folder.encode() in handle.read().split(b"\0"):
                    return child
        except FileNotFoundError:
            pass
    return None


def _loading_torch(pid) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as handle:
            return "libtorch" in handle.read()
    except (FileNotFoundError, TypeError):  # gone, or None
        return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_a_publisher_killed_outright_takes_its_validation_process_and_scratch_with_it(fles1_checkpoint, tmp_path,
                                                                                      monkeypatch):
    """kill -9 of push left the validation process loading the model for ~20 s more, and its scratch folder in
    the temporary folder for good."""
    import signal
    import tempfile
    import time

    from fles1.atomic import scratch_directory

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fles1.publish import validate; validate(sys.argv[1])",
         fles1_checkpoint], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "TMPDIR": str(scratch_root)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _loading_torch(validation := _validation_child(driver.pid, fles1_checkpoint)):
        # torch loads after the script's first lines, where it asks to die with its parent
        assert driver.poll() is None and time.monotonic() < deadline, "the validation process never loaded torch"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 5
    while _running(validation) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(validation), "the validation process outlived the publisher killed outright"
    scratches = lambda: [name for name in os.listdir(scratch_root) if name.startswith(".fles1-validate.")]  # noqa: E731
    (left,) = scratches()  # what the killed publisher could not remove
    assert left.endswith(".partial")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    with scratch_directory("fles1-validate") as scratch:  # the next use sweeps it, and keeps its own
        assert scratches() == [os.path.basename(scratch)]
    assert scratches() == []


def test_a_folder_whose_tokenizer_is_code_is_not_published(source_checkpoint, result_files, tmp_path, capsys):
    """Its tokenizer code ran in the push process and twice in the validation child, the checks passed and the code
    went into the upload (an AutoTokenizer auto_map every user's loader would run)."""
    ran = tmp_path / "ran"
    (Path(source_checkpoint) / "own_tokenizer.py").write_text(
        f"open({str(ran)!r}, 'w').close()\nfrom transformers import BertTokenizerFast\n"
        "class OwnTokenizer(BertTokenizerFast):\n    pass\n")
    settings = json.loads((Path(source_checkpoint) / "tokenizer_config.json").read_text())
    (Path(source_checkpoint) / "tokenizer_config.json").write_text(json.dumps(
        {**settings, "auto_map": {"AutoTokenizer": [None, "own_tokenizer.OwnTokenizer"]}}))
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                          "--dry-run", str(tmp_path / "hub")])
    err = capsys.readouterr().err
    assert rc == 2 and "its tokenizer is code of its own (tokenizer_config.json: auto_map AutoTokenizer" in err, err
    assert not ran.exists() and not (tmp_path / "hub").exists()


def test_published_yaml_keeps_its_types_and_drops_windows_paths_too(tmp_path):
    """Text replacement of each path value published /models/42 as the number 42, a Windows path (escaped in the
    YAML) not at all, and cut the relative outputs/data/nfcorpus-fles1 that held /data/nfcorpus to outputsnfcorpus."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text('model:\n  path: /models/42\ndata:\n  source: /data/nfcorpus\n  copy: "C:\\\\Users\\\\alice\\\\nf"\n'
                      "output_dir: outputs/data/nfcorpus-fles1\nflag: /x/true\n")
    published = yaml.safe_load(publish_module.public_text(str(recipe)))
    assert published == {"model": {"path": "42"}, "data": {"source": "nfcorpus", "copy": "nf"},
                         "output_dir": "outputs/data/nfcorpus-fles1", "flag": "true"}
    relative = tmp_path / "relative.yaml"
    relative.write_text("data:\n  source: ../shared/data/nfcorpus\n")
    assert publish_module.public_text(str(relative)) is None  # copied as it is


@pytest.mark.parametrize("route", ["save_pretrained(push_to_hub=True)", "push_to_hub"])
def test_transformers_own_push_routes_carry_the_encoder_file_and_license(fles1_checkpoint, fake_hub, monkeypatch,
                                                                         tmp_path, route):
    """save_pretrained(push_to_hub=True) uploads inside transformers' save, before FLES-1 copied fles1_encoder.py
    (which the card's users fetch) and the backbone's LICENSE (Apache-2.0 section 4) into the folder: the repo had
    neither, while model.push_to_hub had both."""
    from modeling_fles1 import FLES1ForMaskedLM

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = FLES1ForMaskedLM.from_pretrained(fles1_checkpoint)
    if route == "push_to_hub":
        model.push_to_hub(REPO_ID)
    else:  # into a folder an earlier save filled: transformers uploads only what changed since this save began
        model.save_pretrained(str(tmp_path / "saved"))
        model.save_pretrained(str(tmp_path / "saved"), push_to_hub=True, repo_id=REPO_ID)
    files = fake_hub.committed_files()
    assert {"config.json", "model.safetensors", "configuration_fles1.py", "modeling_fles1.py", "fles1_encoder.py",
            "LICENSE"} <= set(files), sorted(files)
    with open(os.path.join(fles1_checkpoint, "LICENSE"), "rb") as handle:
        assert files["LICENSE"] == handle.read()


@pytest.mark.parametrize("failing", ["card", "upload"])
def test_a_failed_upload_keeps_the_local_save_it_follows(fles1_checkpoint, fake_hub, monkeypatch, tmp_path, failing):
    """save_pretrained(push_to_hub=True) uploads inside transformers' save: an upload that failed (or a Ctrl-C), or
    the model card's download before it, after the weights were written put the earlier weights back beside the new
    config (a first fix of stale weight files) -- the local save, which had worked, silently half undone."""
    import torch
    import transformers.modeling_utils
    from transformers.utils.hub import PushToHubMixin

    from modeling_fles1 import FLES1ForMaskedLM

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "saved"
    model = FLES1ForMaskedLM.from_pretrained(fles1_checkpoint)
    model.save_pretrained(folder)
    with torch.no_grad():
        model.cls.predictions.bias.add_(1.0)
    model.config.query_max_length = 33

    def upload_fails(*args, **kwargs):
        raise KeyboardInterrupt

    if failing == "card":
        monkeypatch.setattr(transformers.modeling_utils, "create_and_tag_model_card", upload_fails)
    else:
        monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload_fails)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder, push_to_hub=True, repo_id=REPO_ID)
    saved = FLES1ForMaskedLM.from_pretrained(folder)
    assert saved.config.query_max_length == 33
    assert torch.equal(saved.cls.predictions.bias, model.cls.predictions.bias)
    assert not [name for name in os.listdir(folder) if name.startswith(".")]


@pytest.mark.parametrize("license_text, flag, expected", [
    (None, None, "apache-2.0"),  # the converted backbone's Apache-2.0 LICENSE
    ("Creative Commons Attribution-NonCommercial 4.0 International\n", None, "other"),
    ("Creative Commons Attribution-NonCommercial 4.0 International\n", "cc-by-nc-4.0", "cc-by-nc-4.0"),
    ("", "missing", "unknown"),  # no LICENSE at all
])
def test_the_cards_license_is_the_backbones(source_checkpoint, result_files, tmp_path, monkeypatch, capsys,
                                           license_text, flag, expected):
    """The card said "Apache-2.0, the license of the backbone" whatever LICENSE the weights shipped with: a
    non-commercial backbone's fine-tune was published as Apache-2.0."""
    passing_validation(monkeypatch)
    if flag == "missing":
        os.remove(os.path.join(source_checkpoint, "LICENSE"))
        flag = None
    elif license_text is not None:
        with open(os.path.join(source_checkpoint, "LICENSE"), "w") as handle:
            handle.write(license_text)
    out = str(tmp_path / "hub")
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", out,
                          "--results", result_files["results"]] + (["--license", flag] if flag else []))
    assert rc == 0, capsys.readouterr().err
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.license == expected
    license_section = card.text.split("## License")[1]
    assert ("Apache-2.0, the license of the backbone" in license_section) == (expected == "apache-2.0")
    if expected == "other":
        assert card.data.license_link == "LICENSE" and "[LICENSE](LICENSE)" in license_section
    if expected == "unknown":
        assert "shipped no license file" in license_section


@pytest.mark.parametrize("license_text, flag", [
    ("Creative Commons Attribution-NonCommercial 4.0 International\n", "apache-2.0"),
    (None, "mit"),  # the file is the Apache text
    ("", "other"),  # no license file for the card to link
    (None, "Apache-2.0"),  # not a Hub id (they are lower case)
])
def test_a_license_flag_that_contradicts_the_shipped_license_file_is_refused(source_checkpoint, result_files, tmp_path,
                                                                            capsys, license_text, flag):
    if license_text == "":
        os.remove(os.path.join(source_checkpoint, "LICENSE"))
    elif license_text is not None:
        with open(os.path.join(source_checkpoint, "LICENSE"), "w") as handle:
            handle.write(license_text)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "hub"),
                          "--results", result_files["results"], "--license", flag])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --license ") and flag in err.splitlines()[0]
    assert not os.path.exists(tmp_path / "hub")


def test_a_dry_run_folder_written_meanwhile_by_another_push_is_one_error_line(source_checkpoint, result_files,
                                                                             tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"

    def another_push_lands_first(folder):
        out.mkdir()
        (out / "README.md").write_text("the other push's card")
        return [publish_module.check_files(folder), publish_module.check_card(folder)]

    monkeypatch.setattr(publish_module, "validate", another_push_lands_first)
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(out),
                          "--results", result_files["results"]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "hub: exists and is not empty (written meanwhile by another process)" in err
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "the other push's card"


@pytest.mark.parametrize("revision", ["bad branch..", "-x", "v1.lock", "a:b"])
def test_a_revision_git_cannot_create_is_refused_before_any_work(source_checkpoint, result_files, tmp_path, capsys,
                                                                revision):
    """Accepted: the dry run's card told users to load it, and a real push failed only at create_branch (exit 1)."""
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--results", result_files["results"],
                          f"--revision={revision}", "--dry-run", str(tmp_path / "hub")])
    assert rc == 2
    assert f"error: --revision {revision!r} is not a branch name git can create" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hub")



@pytest.mark.parametrize("files, expected", [
    ({"LICENSE.md": "Licensed under the Apache License, Version 2.0 (the \"License\");"}, ("apache-2.0", "LICENSE.md")),
    ({"LICENSE.txt": "CC BY-NC-SA 4.0", "NOTICE": "Apache License Version 2.0"}, ("other", "LICENSE.txt")),
    ({"COPYING": "GPL"}, ("other", "COPYING")),
    ({}, ("unknown", None)),
])
def test_license_detection_reads_every_license_file(tmp_path, files, expected):
    """Only a file named LICENSE was read: LICENSE.md with the Apache text gave "unknown" (the card then said no
    license file shipped while uploading it), the Apache short notice gave "other"."""
    from fles1.checkpoint import license_of

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert license_of(str(tmp_path)) == expected


def test_a_push_publishes_the_checkpoint_and_no_other_content_of_the_folder(source_checkpoint, result_files,
                                                                            tmp_path, monkeypatch, capsys):
    """Everything in the model folder but a few training leftovers was uploaded: logs, wandb/, notes, links to files
    outside it (followed: their contents published); a link to nothing was a traceback, exit 1."""
    passing_validation(monkeypatch)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the hub")
    model = tmp_path / "trained"  # source_checkpoint
    os.symlink(outside / "secret.txt", model / "notes.txt")
    os.symlink(outside, model / "extra")
    for name in ("logs/train.log", "wandb/run-1/config.yaml", "nohup.out", "notes.json", "config.json~",
                 "pytorch_model.bin"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text("x")
    out = str(tmp_path / "hub")
    rc = push_fles1.main(["--model", str(model), "--repo-id", REPO_ID, "--dry-run", out,
                          "--results", result_files["results"]])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert not names & {"notes.txt", "extra/secret.txt", "logs/train.log", "wandb/run-1/config.yaml", "nohup.out",
                        "notes.json", "config.json~", "pytorch_model.bin"}, names
    assert {"model.safetensors", "config.json", "1_SpladePooling/config.json", "LICENSE"} <= names
    assert ("left out of the upload (not part of a FLES-1 checkpoint): config.json~, extra, logs, nohup.out, "
            "notes.json, notes.txt, pytorch_model.bin, wandb") in printed.out
    os.symlink(tmp_path / "rotated-away", model / "notes.md")  # not published: only named
    os.symlink(tmp_path / "rotated-away", model / "vocab.txt")  # a published name linking to nothing
    rc = push_fles1.main(["--model", str(model), "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "hub2"),
                          "--results", result_files["results"]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "vocab.txt: a link to a file that does not exist" in err


def test_secrets_in_logs_and_recipes_are_not_published(source_checkpoint, result_files, tmp_path, monkeypatch,
                                                       capsys):
    """A recipe's training.hub_token (a TrainingArguments setting) went verbatim into the card's recipe table and
    results/training_log*.json, and a --recipe differing from the log printed both tokens."""
    passing_validation(monkeypatch)
    token = "hf_" + "Ab1" * 12
    log_path = os.path.join(source_checkpoint, "training_log.json")
    log = json.load(open(log_path))
    log["recipe"] = {**log.get("recipe", {}), "training": {"hub_token": token, "seed": 7},
                     "data": {"source": "https://alice:pa55@data.example/nf"}}
    log["seed"] = "1/2"  # hand-edited: named a file in a folder that does not exist
    open(log_path, "w").write(json.dumps(log))
    out = str(tmp_path / "hub")
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", out,
                          "--results", result_files["results"]])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    published = "".join(open(os.path.join(d, f), encoding="utf-8", errors="replace").read()
                        for d, _, fs in os.walk(out) for f in fs if f.endswith((".md", ".json", ".yaml")))
    assert token not in published and "pa55" not in published and token not in printed.out + printed.err
    assert "| `training.hub_token` | <redacted> |" in open(os.path.join(out, "README.md")).read()
    assert os.path.isfile(os.path.join(out, "results", "training_log.json"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"training:\n  hub_token: hf_{'Zz9' * 12}\n  seed: 7\n")
    rc = push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "hub2"),
                          "--results", result_files["results"], "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2 and "hf_Zz9" not in err and token not in err and "training.hub_token ('<redacted>' here" in err


def test_the_checkpoints_own_configs_are_published_without_secrets_or_home_paths(source_checkpoint, result_files,
                                                                                 tmp_path, monkeypatch):
    """Only results, logs and recipes were scrubbed: a token or home path in config.json was uploaded as is."""
    passing_validation(monkeypatch)
    token = "hf_" + "Kq4" * 12
    config_path = os.path.join(source_checkpoint, "config_sentence_transformers.json")  # not fingerprinted
    config = json.load(open(config_path))
    json.dump({**config, "hub_token": token, "src_url": "https://u:pw@example.com/x",
               "source_dir": "/home/alice/private/splade"}, open(config_path, "w"))
    out = tmp_path / "hub"
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(out),
                            "--results", result_files["results"]]) == 0
    published = json.load(open(out / "config_sentence_transformers.json"))
    assert (published["hub_token"], published["src_url"], published["source_dir"]) == \
        ("<redacted>", "https://<redacted>@example.com/x", "splade")
    with open(os.path.join(source_checkpoint, "tokenizer.json"), "rb") as original:  # nothing to scrub: as it was
        assert (out / "tokenizer.json").read_bytes() == original.read()


def test_a_sharded_checkpoint_is_published_with_its_index(source_checkpoint, result_files, tmp_path, monkeypatch):
    """Without the index in the allowlist the shards would be uploaded unloadable: the real checks run here."""
    from conftest import sharded_copy

    folder = sharded_copy(source_checkpoint, tmp_path / "sharded")
    published, _ = publish_module.published_entries(folder)
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert len(shards) > 1 and {"model.safetensors.index.json", *shards} <= set(published)
    from fles1.evaluation import model_fingerprint

    results = make_eval(tmp_path / "eval_sharded.json", model_path=folder, fingerprint=model_fingerprint(folder))
    out = tmp_path / "hub"
    assert push_fles1.main(["--model", folder, "--repo-id", REPO_ID, "--dry-run", str(out), "--results", results]) == 0
    assert {"model.safetensors.index.json", *shards} <= set(os.listdir(out))


def test_a_training_folders_own_log_and_plots_are_published_by_default(source_checkpoint, result_files, tmp_path,
                                                                       monkeypatch, capsys):
    """Without --training-log / --plots a push takes the model folder's training_log.json and *.png: published as
    results/training_log_seed<seed>.json and plots/, and linked from the card (a push without them lost the
    training curves; logs of several seeds, all named training_log.json, got index-prefixed names)."""
    passing_validation(monkeypatch)
    shutil.copy(result_files["plot"], os.path.join(source_checkpoint, "nnz.png"))
    out = tmp_path / "hub"
    assert push_fles1.main(["--model", source_checkpoint, "--repo-id", REPO_ID, "--dry-run", str(out),
                            "--results", result_files["results"]]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out / "plots")) == ["nnz.png"]
    assert sorted(os.listdir(out / "results")) == ["eval_nfcorpus.json", "training_log_seed7.json"]
    assert "![plots/nnz.png](plots/nnz.png)" in (out / "README.md").read_text()
