"""FLES-1 configuration: a BERT masked-LM backbone plus the settings of its sparse encoding.

Shipped to the Hub next to ``modeling_fles1.py``; imports transformers only.
"""

import math
import numbers
from typing import Optional

from transformers import BertConfig

ACTIVATIONS = ("log1p_relu",)
POOLINGS = ("max",)


class FLES1Config(BertConfig):
    r"""
    Configuration of a FLES-1 learned sparse encoder.

    Every BERT hyper-parameter (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...) keeps its
    :class:`~transformers.BertConfig` meaning. The extra arguments describe how the masked-LM logits
    become one sparse vector per text:

        weight[v] = pooling_t( activation(logit[t, v]) )   over the text's tokens t,
        activation = log(1 + ReLU(x)),  pooling = max.

    Args:
        inference_threshold (`float`, *optional*, defaults to 0.3):
            Weights below this value are dropped by the encoders at inference (0 keeps every positive
            weight). Must be >= 0.
        query_max_length (`int`, *optional*, defaults to 64):
            Queries are truncated to this many tokens (special tokens included). At most
            ``max_position_embeddings`` (the default is capped there for a model with fewer positions).
        document_max_length (`int`, *optional*, defaults to 256):
            Documents are truncated to this many tokens (special tokens included); same cap.
        pooling (`str`, *optional*, defaults to `"max"`): Token pooling. Only ``"max"`` is supported.
        activation (`str`, *optional*, defaults to `"log1p_relu"`): Logit activation. Only
            ``"log1p_relu"`` is supported.

    Example:

    ```python
    >>> from configuration_fles1 import FLES1Config
    >>> config = FLES1Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    >>> config.inference_threshold
    0.3

    ```
    """

    model_type = "fles1"

    def __init__(
        self,
        inference_threshold: float = 0.3,
        query_max_length: Optional[int] = None,
        document_max_length: Optional[int] = None,
        pooling: str = "max",
        activation: str = "log1p_relu",
        **kwargs,
    ):
        self.inference_threshold, self.pooling, self.activation = inference_threshold, pooling, activation
        super().__init__(**kwargs)
        # the defaults are capped for a model with fewer positions
        self.query_max_length = min(64, self.max_position_embeddings) if query_max_length is None \
            else query_max_length
        self.document_max_length = min(256, self.max_position_embeddings) if document_max_length is None \
            else document_max_length
        self.check_sparse_settings()

    def check_sparse_settings(self) -> None:
        """Refuse a sparse setting the encoders cannot use (``__init__`` runs it; again for settings edited since:
        ``config.query_max_length = 1000``); numpy numbers become Python ones (JSON cannot hold them)."""
        _check_choices(self.pooling, self.activation)
        self.inference_threshold = _check_threshold(self.inference_threshold)
        for name in ("query_max_length", "document_max_length"):
            setattr(self, name, check_max_length(name, getattr(self, name), self.max_position_embeddings))

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # from_pretrained's keyword overrides (`from_pretrained(path, pooling="mean")`, AutoModel's, sentence-
        # transformers' config_kwargs) are set after __init__ ran its checks: check them too
        # numpy numbers as Python ones first: transformers logs the config as JSON before any check runs (TypeError)
        kwargs = {key: value.item() if isinstance(value, numbers.Number) and not isinstance(value, (int, float))
                  and hasattr(value, "item") else value for key, value in kwargs.items()}
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).check_sparse_settings()
        return loaded

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # an edited setting the loader refuses was written, and the folder no longer loaded
        self.check_sparse_settings()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


def _check_choices(pooling, activation) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")


def _check_threshold(inference_threshold) -> float:
    if isinstance(inference_threshold, bool) or not isinstance(inference_threshold, numbers.Real) \
            or not inference_threshold >= 0:  # NaN too: a NaN cut would keep no weight and say nothing
        raise ValueError(f"inference_threshold must be a number >= 0, got {inference_threshold!r}")
    try:
        return float(inference_threshold)
    except OverflowError:  # an int past float range (10**400): above every weight, as inf is
        return math.inf


def check_max_length(name: str, value, max_position_embeddings: int) -> int:
    """A query or document max length (special tokens included) that the model can take: `value`, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 3:  # numpy ints too
        raise ValueError(f"{name} must be an int >= 3 (room for [CLS], one token, [SEP]), got {value!r}")
    if value > max_position_embeddings:  # longer inputs would index past the position embeddings
        raise ValueError(f"{name}={value} exceeds max_position_embeddings={max_position_embeddings}")
    return int(value)


__all__ = ["FLES1Config", "check_max_length"]
