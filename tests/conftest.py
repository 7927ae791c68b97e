"""Shared fixtures. Real assets live in ../shared (CI has them); tests that need them fail loudly if absent."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads, ever, in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER") and "HF_MODULES_CACHE" not in os.environ:
    # transformers copies remote code into its module cache without a lock between processes: under pytest-xdist
    # each worker (and the CLIs it starts) gets its own, so no worker imports a file another is half-way writing.
    # Removed when the worker exits (the CLIs it started have ended by then).
    import atexit
    import shutil
    import tempfile

    _modules_cache = os.path.join(
        tempfile.gettempdir(), f"fles1-tests-modules-{os.environ['PYTEST_XDIST_WORKER']}-{os.getpid()}")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
BACKBONE = os.path.join(SHARED, "models", "splade-tiny")
NFCORPUS = os.path.join(SHARED, "data", "nfcorpus")
MSMARCO_TOY = os.path.join(SHARED, "data", "msmarco-toy")


@pytest.fixture(scope="session")
def backbone_dir():
    assert os.path.isdir(BACKBONE), f"shared backbone missing at {BACKBONE}"
    return BACKBONE


@pytest.fixture(scope="session")
def nfcorpus_dir():
    assert os.path.isdir(NFCORPUS), f"shared nfcorpus missing at {NFCORPUS}"
    return NFCORPUS


@pytest.fixture(scope="session")
def msmarco_toy_dir():
    assert os.path.isdir(MSMARCO_TOY), f"shared msmarco-toy missing at {MSMARCO_TOY}"
    return MSMARCO_TOY


@pytest.fixture(scope="session")
def fles1_checkpoint(tmp_path_factory, backbone_dir):
    """The shipped backbone converted into a FLES-1 checkpoint folder (read-only by convention: copy to modify)."""
    from fles1.checkpoint import convert

    return convert(backbone_dir, str(tmp_path_factory.mktemp("fles1-tiny")))


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory, backbone_dir):
    """A randomly initialised 1-layer FLES-1 model with the real tokenizer: fast, not meaningful."""
    import torch
    from transformers import AutoTokenizer

    from configuration_fles1 import FLES1Config
    from fles1.checkpoint import save_checkpoint
    from modeling_fles1 import FLES1ForMaskedLM

    torch.manual_seed(0)
    config = FLES1Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, query_max_length=16, document_max_length=48,
    )
    model = FLES1ForMaskedLM(config)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    return save_checkpoint(model, tokenizer, str(tmp_path_factory.mktemp("fles1-random")))


def sharded_copy(checkpoint: str, folder) -> str:
    """A copy of `checkpoint` whose weights are saved in 300 KB shards (model.safetensors.index.json)."""
    import shutil

    from transformers import AutoModelForMaskedLM

    shutil.copytree(checkpoint, folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    AutoModelForMaskedLM.from_pretrained(checkpoint, trust_remote_code=True).save_pretrained(
        folder, max_shard_size="300KB")
    return str(folder)
