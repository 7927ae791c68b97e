"""FLES-1: a BERT masked-LM whose logits become one sparse, vocabulary-sized vector per text.

    weight[v] = log(1 + ReLU( max_t logit[t, v] ))        t over the text's non-padding tokens

(log1p and ReLU are monotone, so pooling the raw logits first and activating after gives the same vector as
SPLADE's activate-then-pool, on a (batch x vocab) tensor instead of (batch x length x vocab).)

Shipped to the Hub next to ``configuration_fles1.py``; imports torch and transformers only. The backbone is
transformers' own ``BertForMaskedLM``: attention, embeddings and the MLM head are not reimplemented here.
"""

import contextlib
import functools
import inspect
import itertools
import math
import operator
import os
import re
import shutil
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from transformers import BertForMaskedLM
from transformers.modeling_utils import _add_variant
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, ModelOutput, cached_file, logging
from transformers.utils.hub import is_offline_mode

try:  # loaded as remote code: a package-relative import, which transformers copies along
    from .configuration_fles1 import FLES1Config
except ImportError:  # imported from a checkout
    from configuration_fles1 import FLES1Config


# Tokens whose (tokens x vocab) logits are materialised at once under autograd / on accelerators. The projection
# is compute-bound; small tiles keep the logits in cache on CPU, large ones keep a GPU busy.
CPU_CHUNK_TOKENS = 256
ACCELERATOR_CHUNK_TOKENS = 16384  # 1 GB of bf16 logits: big enough to fill a GPU, small for its allocator
ENCODER_FILE = "fles1_encoder.py"  # ships beside the model files; see `FLES1ForMaskedLM._copy_companion_files`
LICENSE_FILES = re.compile(r"(LICEN[CS]E|NOTICE|COPYING)([.-].*)?$", re.IGNORECASE)
HUB_LICENSE_FILES = ["LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "COPYING"]  # looked up one by one
# imported from transformers' modules cache (trust_remote_code) rather than as a plain module
_REMOTE_CODE = __name__.split(".")[0] == "transformers_modules"


def license_files(folder: str) -> list[str]:
    """The names of `folder`'s license files (LICENSE, NOTICE, COPYING and their variants), sorted; [] for no
    folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if LICENSE_FILES.match(name) and os.path.isfile(os.path.join(folder, name)))

logger = logging.get_logger(__name__)
# CPU inference projects one text at a time, CPU_TILE_TOKENS tokens at once, so that the (tokens x vocab) logits
# tile stays in cache; no padding token is ever projected.
CPU_TILE_TOKENS = 32
# int8 screening (`_screen`): relative slack on the error bounds it sums, and the float32 rounding it allows for
# (the kernel's output and the float32 reference's 128-term sums are within 2^-17 of |h| |w|; 2^-16 covers them).
SCREEN_SLACK = 1 + 2.0**-8
FLOAT32_ROUNDING = 2.0**-16
# bf16 / fp16 screening (`_half_screen_pass`): a float32 sum of n products rounds by at most n 2^-24 times the sum
# of their magnitudes (<= |h| |w|), allowed twice over; subnormal products and sums flushed to zero cost under
# 2^-100 a logit.
HALF_SCREEN_DTYPES = (torch.bfloat16, torch.float16)
FLOAT32_SUM_ROUNDING = 2.0**-23
FLUSHED_SUBNORMALS = 2.0**-100


@dataclass
class FLES1SparseOutput(ModelOutput):
    """
    Output of [`FLES1ForMaskedLM.encode_sparse`].

    Args:
        sparse_embeddings (`torch.FloatTensor` of shape `(batch_size, vocab_size)`):
            log(1 + ReLU(max-pooled logits)), before any inference threshold. Float32.
        max_logits (`torch.FloatTensor` of shape `(batch_size, vocab_size)`):
            The raw max-pooled logits the embeddings were computed from: exact wherever the embedding is non-zero;
            where CPU screening ran, entries it proved <= 0 hold a non-positive int8 estimate instead.
    """

    sparse_embeddings: Optional[torch.FloatTensor] = None
    max_logits: Optional[torch.FloatTensor] = None


def _chunk_rows(batch_size: int, length: int, chunk_tokens: int):
    rows = max(1, chunk_tokens // max(1, length))
    for start in range(0, batch_size, rows):
        yield start, min(batch_size, start + rows)


class _MaxPooledProjection(torch.autograd.Function):
    """max_t (hidden[b, t] @ weight.T + bias) without keeping the (batch x length x vocab) logits.

    Forward computes the logits tile by tile and keeps only each text's per-vocabulary maximum and the token
    that reached it. Backward routes each vocabulary entry's gradient to that one token (the gradient of a
    max), touching only the entries whose gradient is non-zero: after ReLU that is the text's active terms,
    a few hundred out of 30,522.

    On a CPU with exact int8 products (VNNI/AMX through oneDNN) a float32 forward is *screened* text by text
    (`_screened_max`, the same routine inference uses): exact values and arg-max wherever the weight can be non-zero.
    """

    screening = None  # None: on where `int8_screening_available()`; True/False force it (tests)

    @staticmethod
    def _use_screening(hidden) -> bool:
        forced = _MaxPooledProjection.screening
        if forced is not None and hidden.device.type == "cpu" and hidden.dtype == torch.float32:
            return forced
        return _screens_by_default(hidden.device, hidden.dtype)

    @staticmethod
    def _screened_forward(hidden, weight, bias, values, argmax):
        weight = weight.detach()
        screen = _int8_screen(weight, bias)  # quantized per step: the weight changes every step
        for row, states in enumerate(hidden.detach()):
            values[row] = _screened_max(states, screen, argmax[row])

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_tokens):
        shape = (hidden.shape[0], weight.shape[0])
        # float32 at least (bf16 logits are pooled into float32); float64 stays float64 so gradcheck can run.
        values = hidden.new_empty(shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
        argmax = torch.zeros(shape, dtype=torch.int32, device=hidden.device)
        if _MaxPooledProjection._use_screening(hidden):
            _MaxPooledProjection._screened_forward(hidden, weight, bias, values, argmax)
        else:
            _chunked_max(hidden, weight, bias, chunk_tokens, values, argmax)
        ctx.save_for_backward(hidden, weight, argmax)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, argmax = ctx.saved_tensors
        batch, length, hidden_size = hidden.shape
        dtype = grad_values.dtype  # float32, or float64 under gradcheck
        rows, vocab = grad_values.nonzero(as_tuple=True)
        grad = grad_values[rows, vocab].unsqueeze(1)
        token = rows * length + argmax[rows, vocab].long()  # index into the flattened (batch * length) tokens
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(batch * length, hidden_size, dtype=dtype, device=hidden.device)
            grad_hidden.index_add_(0, token, grad * weight[vocab].to(dtype))
            grad_hidden = grad_hidden.view(batch, length, hidden_size).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
            grad_weight.index_add_(0, vocab, grad * hidden.reshape(-1, hidden_size)[token].to(dtype))
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
            grad_bias.index_add_(0, vocab, grad.squeeze(1))
            grad_bias = grad_bias.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def max_pooled_logits(hidden, weight, bias, chunk_tokens):
    """Per-text max over tokens of ``hidden @ weight.T + bias``; differentiable with a sparse backward."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias.requires_grad):
        return _MaxPooledProjection.apply(hidden, weight, bias, chunk_tokens)
    values = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32)
    return _chunked_max(hidden, weight, bias, chunk_tokens, values)


def _chunked_max(hidden, weight, bias, chunk_tokens, values, argmax=None):
    """values[b] = max_t hidden[b, t] @ weight.T + bias, a chunk of texts at a time (and the arg-max token when
    ``argmax`` is given). The bias is constant over tokens: it is added after the max, not to every logit."""
    batch, length, _ = hidden.shape
    weight_t = weight.to(hidden.dtype).t()
    for start, end in _chunk_rows(batch, length, chunk_tokens):
        logits = torch.matmul(hidden[start:end], weight_t)
        if argmax is None:
            values[start:end] = logits.amax(dim=1)
        else:
            values[start:end], argmax[start:end] = logits.max(dim=1)
    return values.add_(bias.to(values.dtype))


@functools.lru_cache(maxsize=None)
def int8_screening_available() -> bool:
    """True where oneDNN's int8 linear runs on this CPU and accumulates exactly (VNNI/AMX), so that `_screen`'s
    bound holds. The probe would overflow a CPU path that sums u8 x s8 pairs in int16 (pre-VNNI x86), and checks
    the zero-point compensation `_screen` relies on."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.onednn.qlinear_prepack(torch.full((16, 128), 127, dtype=torch.int8), None)
        states = torch.full((2, 128), 255, dtype=torch.uint8)
        exact = [
            torch.ops.onednn.qlinear_pointwise(states, 1.0, zero_point, packed, torch.ones(16),
                                               torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32,
                                               "none", [], "")
            == (255 - zero_point) * 127 * 128
            for zero_point in (0, 128)
        ]
    except Exception:  # torch built without these ops, or refused on this CPU: no screening, nothing else lost
        return False
    return all(bool(result.all()) for result in exact)


PROJECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                     "float64": torch.float64}


@functools.lru_cache(maxsize=None)
def half_screening_available(dtype: torch.dtype, hidden_size: int = 128) -> bool:
    """True where the CPU projection in `dtype` (bf16 or fp16: oneDNN's packed linear, else a matmul) of
    `hidden_size`-long states sums its products in float32, as `_half_screen_pass`'s bound assumes. The probe:
    values in [1, 2) and their negatives, plus 2^-10, shuffled -- float32 sums them to 2^-10 exactly (up to 4,096
    terms), a half-precision running sum does not."""
    if dtype not in HALF_SCREEN_DTYPES or not 4 <= hidden_size <= 4096:
        return False
    generator = torch.Generator().manual_seed(0)
    pairs = (hidden_size - 1) // 2
    magnitudes = torch.randint(128, 256, (32, pairs), generator=generator) / 128
    values = torch.cat([magnitudes, -magnitudes, torch.full((32, 1), 2.0**-10),
                        torch.zeros(32, hidden_size - 2 * pairs - 1)], dim=1)
    rows = values.gather(1, torch.rand(32, hidden_size, generator=generator).argsort(dim=1)).to(dtype)
    try:
        packed = _pack_for_onednn(rows)
        sums = [_max_over_tokens(torch.ones((tokens, hidden_size), dtype=dtype), rows, packed)
                for tokens in (1, CPU_TILE_TOKENS + 1)]  # one token, and two tiles
    except Exception:  # no such kernel on this CPU: no screening, nothing else lost
        return False
    return all(bool((result == 2.0**-10).all()) for result in sums)


def projection_dtype_of(value) -> Optional[torch.dtype]:
    """A projection dtype as given (None, a floating torch dtype, or its name: "bfloat16", "torch.bfloat16") ->
    the torch dtype or None; anything else is a ValueError listing the choices (an integer dtype projected into
    wrong vectors, a name failed later as a device string)."""
    if value is None or (isinstance(value, torch.dtype) and value in PROJECTION_DTYPES.values()):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in PROJECTION_DTYPES:
        return PROJECTION_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"projection_dtype={value!r} is not supported; choose None (the model's dtype) or one of "
                     f"{list(PROJECTION_DTYPES)} (as torch dtypes or names)")


def _screens_by_default(device: torch.device, dtype: torch.dtype, projection_dtype=None) -> bool:
    """Whether a float32 projection goes through int8 screening (`_screened_max`) unless told otherwise. Not
    under CPU autocast: it would run the exact recompute in bf16 (the batched paths follow autocast instead)."""
    return (device.type == "cpu" and dtype == torch.float32 and projection_dtype in (None, torch.float32)
            and not _cpu_autocast() and int8_screening_available())


def _half_screens_by_default(device: torch.device, dtype: torch.dtype, projection_dtype, hidden_size: int) -> bool:
    """Whether a bf16/fp16 projection of float32 states is screened (`_half_screen_pass`): float32's vectors at the
    half-precision projection's cost. Not under CPU autocast, for the reason `_screens_by_default` gives."""
    return (device.type == "cpu" and dtype == torch.float32 and projection_dtype in HALF_SCREEN_DTYPES
            and not _cpu_autocast() and half_screening_available(projection_dtype, hidden_size))


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _hooked(hook_dicts, module_dicts) -> bool:
    """Whether forward hooks could change what the traced modules compute (a trace would have baked them in or
    missed them). `hook_dicts`: the modules' own hook dicts, which registering and removing a hook mutate;
    `module_dicts`: their instance ``__dict__``s, where accelerate's hooks (``add_hook_to_module``: device
    placement, offloading) and other wrappers put a ``forward`` of their own (~1 us)."""
    state = torch.nn.modules.module
    return bool(state._global_forward_hooks or state._global_forward_pre_hooks) or any(hook_dicts) \
        or any(map(dict.__contains__, module_dicts, itertools.repeat("forward")))


class _Int8Screen(NamedTuple):
    """The decoder, quantized for `_screen`: row v is approximated by ``scales[v] * q_v`` (q_v int8), and
    ``row_error[v]`` >= |w_v - scales[v] q_v| and ``row_l1[v]`` >= |scales[v] q_v|_1 bound what that costs."""

    weight: torch.Tensor  # float32 (vocab, hidden): the exact recompute's
    packed: torch.Tensor  # the int8 rows in oneDNN's layout
    scales: torch.Tensor
    zero_points: torch.Tensor  # zeros: the rows are symmetric
    bias: torch.Tensor  # float32, added by the kernel
    row_error: torch.Tensor
    row_l1: torch.Tensor
    largest_row_error: float
    largest_row_l1: float
    cut: float  # an entry is a candidate when its bound is above this (<= 0: float32 rounding of the bias add)
    finite: bool  # weight and bias hold no NaN/inf; else nothing can be bounded and `_screen` passes every entry


def _int8_screen(weight: torch.Tensor, bias: torch.Tensor) -> _Int8Screen:
    with torch.no_grad():
        weight, bias = weight.detach().float(), bias.detach().float()
        scales = weight.abs().amax(dim=1).div_(127).clamp_min_(torch.finfo(torch.float32).tiny)
        rows = torch.round(weight / scales[:, None]).clamp_(-127, 127)
        approx = rows * scales[:, None]
        # float32 here is within 2^-23 |w| of the exact differences: FLOAT32_ROUNDING covers it too
        row_error = (weight - approx).norm(dim=1).add_(weight.norm(dim=1), alpha=FLOAT32_ROUNDING).mul_(SCREEN_SLACK)
        row_l1 = approx.abs().sum(dim=1).mul_(SCREEN_SLACK)
        packed = torch.ops.onednn.qlinear_prepack(rows.to(torch.int8), None)
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        cut = -FLOAT32_ROUNDING * bias.abs().max().item() if bias.numel() else 0.0
        finite = bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())
    return _Int8Screen(weight, packed, scales, zero_points, bias, row_error, row_l1, row_error.max().item(),
                       row_l1.max().item(), cut, finite)


class _HalfScreen(NamedTuple):
    """The decoder for `_half_screen_pass`: its rows rounded to bf16 or fp16 (subnormals flushed, so that kernels
    which flush them read the same values), packed, and per row what the rounding may cost (float64)."""

    weight: torch.Tensor  # float32 (vocab, hidden): the exact recompute's
    bias: torch.Tensor  # float32
    dtype: torch.dtype  # bf16 or fp16
    rows: Optional[torch.Tensor]  # the rounded rows, where oneDNN cannot pack them (else None)
    packed: Optional[torch.Tensor]  # their oneDNN layout, or None
    bias_slack: torch.Tensor  # float32 |b_v| 2^-20: covers the float32 rounding of the first, coarse test
    row_norm: torch.Tensor  # |w_v|
    rounded_norm: torch.Tensor  # |w~_v|
    row_error: torch.Tensor  # |w_v - w~_v|
    largest_norms: tuple[float, float, float]  # the three norms' maxima over the vocabulary


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of `values` in `dtype`, subnormals flushed to zero."""
    rounded = values.to(dtype)
    return rounded.masked_fill(rounded.abs() < torch.finfo(dtype).tiny, 0)


def _half_screen(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> _HalfScreen:
    with torch.no_grad():
        weight, bias = weight.detach().float(), bias.detach().float()
        rows = _rounded(weight, dtype).contiguous()
        exact, rounded = weight.double(), rows.double()
        norms = exact.norm(dim=1), rounded.norm(dim=1), (exact - rounded).norm(dim=1)
        packed = _pack_for_onednn(rows)
    return _HalfScreen(weight, bias, dtype, rows if packed is None else None, packed, bias.abs() * 2.0**-20, *norms,
                       tuple(float(norm.max()) for norm in norms))


def _half_screen_pass(states: torch.Tensor, screen: _HalfScreen):
    """The bf16/fp16 pass of `_screened_max`, in place of `_screen`'s int8 one: (float32 estimate of every max
    logit, ids of the entries that can be > 0).

    The states are rounded like the rows (h~_t) and projected with float32 sums, so each logit is within
    |h_t - h~_t| |w_v| + |h~_t| |w_v - w~_v| (the rounded inputs) plus the float32 rounding of that sum and of the
    reference's own of its float32 value; the kernel's half-precision output adds one rounding (eps/2 |x|).
    """
    dtype = screen.dtype
    rounded = _rounded(states, dtype)
    largest = _max_over_tokens(rounded, screen.rows, screen.packed).float()  # before the bias; exact in float32
    exact64, rounded64 = states.double(), rounded.double()
    input_error = float((exact64 - rounded64).norm(dim=1).max())
    longest, longest_rounded = float(exact64.norm(dim=1).max()), float(rounded64.norm(dim=1).max())
    sum_rounding = FLOAT32_SUM_ROUNDING * states.shape[1]
    # the output's rounding: eps/2 of its size, and below the half dtype's smallest normal a fixed step (fp16: 2^-24
    # apart from 2^-14 down) that a kernel may also flush -- the smallest normal covers both
    output_rounding, output_floor = torch.finfo(dtype).eps / 2, torch.finfo(dtype).smallest_normal

    def bound(row_norm, rounded_norm, row_error):  # each logit's distance from its float32 value, but the output's
        return row_norm * (input_error + sum_rounding * longest) + row_error * longest_rounded \
            + rounded_norm * (sum_rounding * longest_rounded) + (FLUSHED_SUBNORMALS + output_floor)

    # First against the largest bound, in float32 over the vocabulary; its own rounding (~2^-22 of the magnitudes)
    # is covered by 2^-20 of |largest| and |b|. Then each survivor's own bound, in float64.
    estimate = largest + screen.bias
    coarse = largest.abs().mul_(output_rounding + 2.0**-20).add_(estimate).add_(screen.bias_slack)
    survivors = (~(coarse <= -bound(*screen.largest_norms) * SCREEN_SLACK)).nonzero().squeeze(1)
    largest64 = largest[survivors].double()
    upper = (largest64 + screen.bias[survivors].double()
             + (bound(screen.row_norm[survivors], screen.rounded_norm[survivors], screen.row_error[survivors])
                + largest64.abs() * output_rounding) * SCREEN_SLACK)
    # NaN or inf anywhere (weights, states, fp16's overflow past 65,504) bounds nothing: recomputed in float32,
    # which gives the reference's NaN
    return estimate, survivors[(upper > 0) | ~torch.isfinite(upper)]


def _pack_for_onednn(rows: torch.Tensor):
    """oneDNN's pre-packed layout of a (vocab x hidden) CPU weight, or None where oneDNN cannot take it.

    A plain matmul re-lays the 30,522-row weight out on every call; packing it once makes a query's projection
    (a few tokens) about 5x faster on x86. Same float32 arithmetic, so the same vectors (tests).
    """
    if rows.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(rows, None)
        torch.ops.mkldnn._linear_pointwise(rows.new_zeros((1, rows.shape[1])), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):  # torch built without these ops, or dtype refused
        return None
    return packed


def _max_over_tiles(states: torch.Tensor, project) -> torch.Tensor:
    """max over tokens of ``project(tile)`` (tile x vocab), CPU_TILE_TOKENS tokens at a time: (vocab,)."""
    values = None
    for tile in (states,) if len(states) <= CPU_TILE_TOKENS else states.split(CPU_TILE_TOKENS):
        tile_max = project(tile).amax(dim=0)
        values = tile_max if values is None else torch.maximum(values, tile_max, out=values)
    return values


def _max_over_tokens(states: torch.Tensor, rows: torch.Tensor, packed) -> torch.Tensor:
    """max over tokens of states @ rows.T, (vocab,) in rows' dtype."""
    if packed is None:
        return _max_over_tiles(states, lambda tile: torch.matmul(tile, rows.t()))
    return _max_over_tiles(states, lambda tile: torch.ops.mkldnn._linear_pointwise(tile, packed, None, "none", [], ""))


def _screen(states: torch.Tensor, screen: _Int8Screen):
    """The int8 pass of `_screened_max`: (float32 estimate of every max logit, ids of the entries that can be > 0).

    The states are quantized to u8 with one step ``s`` (error <= s/2 per element) and multiplied against the int8
    rows with exact integer sums, so each logit's estimate is within |h_t| row_error[v] + s/2 row_l1[v] of the
    float32 one (|h_t| <= max_t |h_t|). Per-tensor activations and per-row weights: what oneDNN's kernel takes.
    """
    # A query's hot path: ndarray methods on these few hundred values cost ~1 us each, torch ops ~5 (CPU only).
    values = states.numpy()
    largest, longest = float(abs(values).max()), float((values * values).sum(axis=1).max()) ** 0.5
    if not (math.isfinite(longest) and screen.finite):
        # NaN/inf (a diverged or corrupt model) would make every bound False and screen everything out: hand every
        # entry to the float32 pass instead, which gives the reference's NaN
        return torch.empty(screen.bias.shape[0]), torch.arange(screen.bias.shape[0])
    step = float(values.dtype.type(largest / 127 if largest > 0 else 1.0))  # float32, as the kernel reads it
    # h / s + 128 in [1, 255]: float32 puts it within 2^-15 of exact, far inside the bound's slack
    quantized = torch.from_numpy((values * (1 / step) + 128).round().astype("uint8"))
    estimate = _max_over_tiles(quantized, lambda tile: torch.ops.onednn.qlinear_pointwise(
        tile, step, 128, screen.packed, screen.scales, screen.zero_points, screen.bias, 1.0, 0, torch.float32,
        "none", [], ""))
    # candidates: estimate + longest * row_error + activation_error * row_l1 > cut. One comparison over the
    # vocabulary against the largest bound first, then each survivor's own (ndarray: ~4x faster than torch here).
    activation_error = step / 2 * SCREEN_SLACK
    largest_bound = (longest * screen.largest_row_error + activation_error * screen.largest_row_l1) * SCREEN_SLACK
    estimates = estimate.numpy()
    survivors = (estimates > screen.cut - largest_bound).nonzero()[0]
    upper = (estimates[survivors] + longest * screen.row_error.numpy()[survivors]
             + activation_error * screen.row_l1.numpy()[survivors])
    return estimate, torch.from_numpy(survivors[upper > screen.cut])


def _screening_pass(states, screen):
    """`_screen` for an int8 screen, `_half_screen_pass` for a bf16/fp16 one."""
    return (_half_screen_pass if isinstance(screen, _HalfScreen) else _screen)(states, screen)


def _too_many(candidates: torch.Tensor, estimate: torch.Tensor) -> bool:
    """Whether the screen passed over 1/8 of the vocabulary: one full float32 pass is then cheaper than gathering
    the candidates' rows."""
    return candidates.numel() > estimate.numel() // 8


def _screened_max(states, screen: "Union[_Int8Screen, _HalfScreen]", argmax=None, screened=None) -> torch.Tensor:
    """One text's exact float32 max over tokens of ``states @ weight.T + bias``, at the screen's speed, (vocab,).

    An int8 pass (`_screen`; or bf16/fp16, `_half_screen_pass`, for a `_HalfScreen`) bounds every logit's distance from
    its float32 value, so an entry whose bound stays <= 0 has a float32 maximum <= 0: weight 0 and gradient 0
    after ReLU. Only the other candidates (~30 of 30,522 for a query, ~500 for a document) are recomputed in
    float32; the entries screened out keep their negative estimate. ``argmax`` (int32, (vocab,)), when given,
    receives the arg-max token of every recomputed entry (what the sparse backward needs). ``screened``: the
    screening pass's result, when the caller has it.
    """
    estimate, candidates = screened or _screening_pass(states, screen)
    if _too_many(candidates, estimate):  # dense (e.g. an untrained model): one full float32 pass
        exact, token = torch.matmul(states, screen.weight.t()).max(dim=0)
        if argmax is not None:
            argmax.copy_(token)
        return exact.add_(screen.bias)
    exact, token = _exact_at(states, screen, candidates)
    if argmax is not None:
        argmax[candidates] = token.to(torch.int32)
    return estimate.index_copy_(0, candidates, exact)


def _exact_at(states, screen: _Int8Screen, candidates):
    """float32 max over tokens of ``states @ weight.T + bias`` at the vocabulary ids `candidates`, and the arg-max
    token of each."""
    exact, token = torch.matmul(screen.weight.index_select(0, candidates), states.t()).max(dim=1)
    return exact.add_(screen.bias.index_select(0, candidates)), token


def _version(tensor: torch.Tensor) -> int:
    """The version counter; -1 for an inference tensor (a model built, or a parametrized decoder's weight computed,
    under torch.inference_mode), which keeps none: the element sample alone then tells a changed weight."""
    return -1 if tensor.is_inference() else tensor._version


class _ElementSample:
    """The bits of SAMPLED_ELEMENTS evenly spaced elements of each contiguous CPU tensor given, taken again in ~1 us
    by `changed()` through numpy views of their storage. It catches writes the version counter misses (``.data``)
    when they change many elements -- an averaged or merged weight -- not an edit of a few rows."""

    def __init__(self, *tensors: torch.Tensor):
        self.views = []
        for tensor in tensors:
            bits = _INTEGER_OF_SIZE.get(tensor.element_size())
            if tensor.device.type == "cpu" and tensor.is_contiguous() and bits is not None and tensor.numel():
                view = tensor.detach().reshape(-1).view(bits).numpy()  # shares the storage: sees every write
                self.views.append((view, max(1, view.size // SAMPLED_ELEMENTS)))
        self.taken = self.take()

    def take(self) -> bytes:
        return b"".join(view[::stride].tobytes() for view, stride in self.views)

    def changed(self) -> bool:
        return self.take() != self.taken


SAMPLED_ELEMENTS = 257
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bits compared, NaN included


def _weight_layouts(folder, variant: Optional[str]) -> tuple[str, str]:
    """The two files that tell a transformers save's layout, named as transformers names them: model[.<variant>]
    .safetensors (one file) and model.safetensors.index[.<variant>].json (shards)."""
    return tuple(os.path.join(folder, _add_variant(name, variant)) for name in (SAFE_WEIGHTS_NAME,
                                                                                SAFE_WEIGHTS_INDEX_NAME))


class _TransformedHiddenStates(torch.nn.Module):
    """Backbone + MLM-head transform of one unpadded text: the part of `encode_sparse` that gets traced."""

    def __init__(self, model: "FLES1ForMaskedLM"):
        super().__init__()
        self.bert, self.transform = model.bert, model.cls.predictions.transform

    def forward(self, input_ids, token_type_ids):
        hidden = self.bert(input_ids=input_ids, token_type_ids=token_type_ids, return_dict=True).last_hidden_state
        return self.transform(hidden)


# The modules some trace was built from. A parameter or submodule registered on one of them (e.g.
# `load_state_dict(assign=True)`, `resize_token_embeddings`) bumps the count, and traces are rebuilt then: a trace
# holds the parameter tensors it was built with. In-place updates (optimizer steps, `load_state_dict`) reach it
# through the shared tensors. Registrations elsewhere -- tracing itself, another model, any new module -- do not
# count (they used to: two FLES-1 models in one process re-traced each other on every call).
_TRACED_MODULES = weakref.WeakSet()
_TRAINING = operator.attrgetter("training")
_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
_REGISTRATIONS = [0]
# One trace at a time: tracing mutes transformers' logging and Python's warnings process-wide and restores them
# after; two threads doing that at once (a server's first queries) could leave them muted for good.
_TRACE_LOCK = threading.Lock()
# the sparse paths of a model carrying accelerate's hooks (offloading): one call at a time
_OFFLOADED_LOCK = threading.RLock()


def _count_registration(module, *_):
    if module in _TRACED_MODULES:
        _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _trace_hidden_states(model: "FLES1ForMaskedLM", input_ids, token_type_ids):
    """A TorchScript trace of `_TransformedHiddenStates`, or None when tracing is unavailable or would not
    reproduce the eager result at another length. The trace shares the model's parameters."""
    eager = _TransformedHiddenStates(model)
    probe = torch.cat([input_ids, input_ids[:, -1:].expand(1, 3)], dim=1)  # a second length
    verbosity = logging.get_verbosity()
    try:
        logging.set_verbosity_error()  # tracing reads every attribute, and transformers logs about some
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile (too slow to build)
            traced = torch.jit.trace(eager, (input_ids, token_type_ids), check_trace=False)
        for ids in (input_ids, probe):
            types = torch.zeros_like(ids) if ids is probe else token_type_ids
            if not torch.equal(traced(ids, types), eager(ids, types)):
                return None
    except Exception:  # any tracing failure only costs speed: fall back to the eager backbone
        return None
    finally:
        logging.set_verbosity(verbosity)
    return traced


class FLES1ForMaskedLM(BertForMaskedLM):
    r"""
    FLES-1 learned sparse encoder: transformers' [`BertForMaskedLM`] with a memory-light sparse pooling method.

    `forward` is BERT's masked-LM forward and returns a [`~modeling_outputs.MaskedLMOutput`] with `logits`
    of shape (batch, length, vocab) -- this is what sentence-transformers' `SparseEncoder` consumes.
    [`encode_sparse`] returns the pooled vectors directly.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForMaskedLM, AutoTokenizer
    >>> model = AutoModelForMaskedLM.from_pretrained("mindoval/fles1-v14", trust_remote_code=True)
    >>> tokenizer = AutoTokenizer.from_pretrained("mindoval/fles1-v14", trust_remote_code=True)  # reads config.json
    >>> batch = tokenizer(["What is machine learning?"], return_tensors="pt")
    >>> with torch.inference_mode():
    ...     vectors = model.encode_sparse(**batch).sparse_embeddings
    >>> vectors.shape
    torch.Size([1, 30522])

    ```
    """

    config_class = FLES1Config
    config: FLES1Config
    # Trace the backbone for single-text CPU inference (see `_hidden_states`); False keeps it eager.
    use_traced_backbone = True

    # Derived caches (`_decoder_cache`, the single-text trace, `_module_views`) live in __dict__ and are rebuilt on
    # demand; copies, pickles and torch.save leave them out -- a TorchScript module and oneDNN's opaque packed
    # tensors cannot be.
    _fles1_caches = ("_fles1_decoder_cache", "_fles1_traced_hidden_states", "_fles1_module_views")

    def __init__(self, config: FLES1Config):
        super().__init__(config)
        self.post_init()

    def __getstate__(self):
        return {key: value for key, value in super().__getstate__().items() if key not in self._fles1_caches}

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .double(): the trace holds the parameter tensors themselves, and torch refuses to swap
        # a tensor something else holds (torch.__future__.set_swap_module_params_on_conversion, DTensor); the
        # decoder copies would be rebuilt on the next call anyway, but the old ones (an int8 screen holding the
        # float32 weight, a copy per dtype) stayed alive beside the converted weights
        self.__dict__.pop("_fles1_traced_hidden_states", None)
        self.__dict__.pop("_fles1_decoder_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def dropout_active(self) -> bool:
        """Whether a mode-dependent module is in training mode anywhere: dropout or batch norm, or a module holding
        one (BERT's attention reads its own flag for SDPA's dropout). ``model.eval(); model.bert.train()`` leaves
        ``model.training`` False with dropout on; a new Linear left in training mode changes nothing. ~1 us on the
        shipped model (`_module_views`)."""
        return any(map(_TRAINING, self._module_views()[1]))

    def _module_views(self) -> tuple[list, tuple, list, list]:
        """What the single-text path asks of the modules on every call, collected once and rebuilt after any module
        or parameter registration on them: the forward (pre-)hook dicts of the modules a trace runs (any() over
        them costs ~1 us on the shipped 2-layer model, ~5 us at 12 layers, asking each module ~9x that), the
        mode-dependent modules (`dropout_active`), the traced modules' instance dicts (`_hooked`) and every module's
        (`_one_call_at_a_time_if_hooked`). Registering and removing hooks mutate those dicts; code that assigns a
        module a new one (``module._forward_hooks = OrderedDict()``) is not seen until `clear_caches()`."""
        cached = self.__dict__.get("_fles1_module_views")
        if cached is None or cached[0] != _REGISTRATIONS[0]:
            _TRACED_MODULES.update(self.modules())  # a submodule registered on them from now on rebuilds the views
            traced = (*self.bert.modules(), *self.cls.predictions.transform.modules())
            hooks = [hooks for module in traced for hooks in (module._forward_hooks, module._forward_pre_hooks)]
            modes = tuple(module for module in self.modules() if isinstance(module, _MODE_DEPENDENT)
                          or any(isinstance(child, _MODE_DEPENDENT) for child in module.children()))
            instances = [module.__dict__ for module in traced]
            every = [module.__dict__ for module in self.modules()]  # where accelerate puts its `_hf_hook`s
            cached = self.__dict__["_fles1_module_views"] = (_REGISTRATIONS[0], (hooks, modes, instances, every))
        return cached[1]

    def _forward_hooked(self) -> bool:
        """`_hooked` over the traced modules: whether the single-text trace must give way to eager."""
        hooks, _, instances, _ = self._module_views()
        return _hooked(hooks, instances)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus `auto_map` for AutoModel too (both auto classes load this model), plus the
        `FLES1Encoder` file that came with the checkpoint (sentence-transformers' save goes through here too)."""
        check = getattr(self.config, "check_sparse_settings", None)
        if check is not None:  # before any file is written: an edited setting the loader refuses
            check()
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_fles1.FLES1Config",
            "AutoModel": "modeling_fles1.FLES1ForMaskedLM",
            "AutoModelForMaskedLM": "modeling_fles1.FLES1ForMaskedLM",
        }
        # transformers removes an earlier save's stale shards only: a sharded save over an unsharded one left
        # model.safetensors -- which the loaders read first: the earlier weights -- and the reverse a stale index.
        # Where both are there after the save and one was not before, that one is this save's and the other stale.
        # Only where this process writes the model's weights (not another rank's, not a PEFT adapter's save).
        arguments = inspect.signature(BertForMaskedLM.save_pretrained).bind(
            self, save_directory, *args, **kwargs).arguments
        saving = arguments.get("is_main_process", True)
        if hasattr(self, "should_save_on_this_rank"):  # transformers >= 5.10: rank 0 of torch.distributed too
            saving = self.should_save_on_this_rank(saving)
        tidy = saving and not getattr(self, "_hf_peft_config_loaded", False)
        layouts = _weight_layouts(save_directory, arguments.get("variant"))
        existed = [os.path.isfile(path) for path in layouts]
        if tidy and all(existed):  # both left by earlier saves: the index is stale either way (a sharded save
            os.remove(layouts[1])  # writes its own), and the rule below then tells the stale single file
            existed[1] = False
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        if tidy and all(map(os.path.isfile, layouts)) and not all(existed):
            with contextlib.suppress(FileNotFoundError):
                os.remove(layouts[1] if not existed[0] else layouts[0])
        self._copy_companion_files(save_directory)
        return saved

    def _upload_modified_files(self, working_dir, repo_id, files_timestamps, *args, **kwargs):
        """transformers' upload step (``save_pretrained(push_to_hub=True)``, ``push_to_hub``): the companion files
        first -- save_pretrained uploads before it returns, and fles1_encoder.py and the license were left out -- and
        always, also when an earlier save left them there (transformers uploads what changed since the save began)."""
        self._copy_companion_files(working_dir)
        companions = {ENCODER_FILE} | {name for name in os.listdir(working_dir) if LICENSE_FILES.match(name)}
        files_timestamps = {name: stamp for name, stamp in files_timestamps.items() if name not in companions}
        return super()._upload_modified_files(working_dir, repo_id, files_timestamps, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        # where the checkpoint came from (revision, cache, subfolder): save_pretrained copies its companion files
        model._fles1_loaded_from = (kwargs.get("revision"), kwargs.get("cache_dir"), kwargs.get("subfolder") or "")
        return loaded

    def _companion_file(self, name: str) -> Optional[str]:
        """A file of the checkpoint this model was loaded from: its local folder's, or its hub repo's at the
        revision loaded; None when there is none. A hub file is looked up once per model (a trainer saves every
        checkpoint): in the local cache, then -- for fles1_encoder.py and LICENSE only, and unless offline -- on
        the Hub (without a network each missing file cost ~20 s of retries)."""
        source = self.name_or_path
        revision, cache_dir, subfolder = getattr(self, "_fles1_loaded_from", (None, None, ""))
        folders = [subfolder, ""] if subfolder else [""]  # the subfolder loaded from first, then the repo's root
        if not source or os.path.isdir(source):
            paths = [os.path.join(source, folder, name) for folder in folders] if source else []
            return next((path for path in paths if os.path.isfile(path)), None)
        found = self.__dict__.setdefault("_fles1_companions", {})
        if name not in found:
            found[name] = None
            online = name in (ENCODER_FILE, "LICENSE") and not is_offline_mode()
            for local_only, folder in itertools.product((True, False) if online else (True,), folders):
                try:
                    found[name] = cached_file(source, name, revision=revision, cache_dir=cache_dir,
                                              subfolder=folder, local_files_only=local_only,
                                              _raise_exceptions_for_missing_entries=False,
                                              _raise_exceptions_for_connection_errors=False)
                except Exception:  # not a hub id after all: nothing to copy
                    pass
                if found[name]:
                    break
        return found[name]

    def _copy_companion_files(self, save_directory) -> None:
        """transformers copies only the code it imports. Also saved: fles1_encoder.py (users fetch it with
        ``hf_hub_download``) -- the one beside this file where it was imported as a plain module (the code running),
        else (remote code) that of the checkpoint the model was loaded from (folder, or hub repo as cached); and that
        checkpoint's license files (LICENSE, NOTICE, COPYING): a derived checkpoint
        -- a sentence-transformers fine-tune saved or pushed -- redistributes them (Apache-2.0 section 4). License
        files already in the folder are kept. A hub checkpoint's files come from the local cache, and
        fles1_encoder.py and LICENSE, when not cached, from the Hub (online; `_companion_file`); a missing encoder
        file or license is named in a warning."""
        subfolder = getattr(self, "_fles1_loaded_from", ("", "", ""))[2]
        folders = [os.path.join(self.name_or_path or "", part) for part in dict.fromkeys([subfolder, ""])]
        local = bool(self.name_or_path) and os.path.isdir(self.name_or_path)
        names = [ENCODER_FILE] + (sorted({name for folder in folders for name in license_files(folder)})
                                  if local else HUB_LICENSE_FILES)
        licensed = False
        beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), ENCODER_FILE)
        beside = beside if os.path.isfile(beside) else None
        for name in names:
            target = os.path.join(save_directory, name)
            # imported as a plain module, this is the code running and the modeling file transformers saves: the
            # encoder file beside it matches it (a checkpoint's own could be older); remote code has none beside it
            source = beside if name == ENCODER_FILE and beside and not _REMOTE_CODE else self._companion_file(name)
            licensed |= name != ENCODER_FILE and (source is not None or os.path.exists(target))
            if source is None and name == ENCODER_FILE:
                source = beside
                if source is None and not os.path.exists(target):
                    logger.warning_once(f"{ENCODER_FILE} not saved: it is not in the local cache of "
                                        f"{self.name_or_path}; hf_hub_download({self.name_or_path!r}, "
                                        f"{ENCODER_FILE!r}) fetches it, and later saves copy it")
            if source is None or (os.path.exists(target) and (name != ENCODER_FILE or os.path.samefile(source, target))):
                continue
            shutil.copyfile(source, target)
        if not licensed and self.name_or_path and not os.path.isdir(self.name_or_path):
            logger.warning_once(f"no license file of {self.name_or_path} was found to save beside the weights (a "
                                "derived checkpoint redistributes it): hf_hub_download it, or copy it into the folder")

    def sparse_chunk_tokens(self, device: torch.device) -> int:
        return CPU_CHUNK_TOKENS if device.type == "cpu" else ACCELERATOR_CHUNK_TOKENS

    def _decoder_cache(self, name: str, build):
        """``build(weight, bias)`` for the decoder, cached under `name` until the weight or bias changes; None while
        they are on the meta device (offloaded).

        The key holds their storage and version counters, so an optimizer step, `load_state_dict` or `.to()`
        invalidates it. Writes through ``.data`` (some EMA and weight-averaging code) bump no version counter: a
        sample of evenly spaced elements (`_ElementSample`) catches those that change the whole weight; after one
        to a few rows, `clear_caches()`.
        """
        weight, bias = self.cls.predictions.decoder.weight, self._decoder_bias()
        if weight.is_meta or bias.is_meta:  # offloaded: loaded per call (`_decoder_in_memory`), nothing to cache
            return None
        key = (weight.data_ptr(), _version(weight), weight.dtype, bias.data_ptr(), _version(bias))
        cache = self.__dict__.setdefault("_fles1_decoder_cache", {})
        entry = cache.get(name)
        if entry is None or entry[0] != key or entry[1].changed():
            with torch.no_grad():
                entry = cache[name] = (key, _ElementSample(weight, bias), build(weight.detach(), bias.detach()))
        return entry[2]

    def _projection_weight(self, dtype: torch.dtype):
        """The decoder weight in `dtype` (vocab, hidden) and its oneDNN-packed form (or None), cached per dtype."""
        def build(weight, _):
            rows = weight.to(dtype).contiguous()
            return rows, _pack_for_onednn(rows)

        return self._decoder_cache(f"weight-{dtype}", build)

    def _int8_screen(self) -> "_Int8Screen":
        return self._decoder_cache("int8-screen", _int8_screen)

    def _half_screen(self, dtype: torch.dtype) -> _HalfScreen:
        return self._decoder_cache(f"half-screen-{dtype}", functools.partial(_half_screen, dtype=dtype))

    def _default_screen(self, device, dtype, projection_dtype):
        """The screen CPU inference uses unless told otherwise: int8 for a float32 projection, the projection's own
        dtype for a bf16/fp16 one (an explicit choice, though int8 is faster where both run), each where this CPU's
        kernels allow it; else None."""
        if _screens_by_default(device, dtype, projection_dtype):
            return self._int8_screen()
        if _half_screens_by_default(device, dtype, projection_dtype, self.config.hidden_size):
            return self._half_screen(projection_dtype)
        return None

    def _hidden_states(self, input_ids, attention_mask, token_type_ids, position_ids=None) -> torch.Tensor:
        """MLM-head-transformed hidden states (batch, length, hidden).

        One unpadded text at CPU inference -- the query-latency case -- goes through a TorchScript trace of the
        same modules (checked equal to eager at trace time), which skips transformers' per-call Python work:
        about 0.35 instead of 0.8 ms for a query on the shipped model. Everything else runs eagerly.
        """
        single = input_ids.shape[0] == 1 and position_ids is None \
            and (attention_mask is None or bool(attention_mask.all()))
        # eager under autocast (a trace does not follow it) and while forward hooks are registered (a trace built
        # with them would keep them after their removal, one built before would miss them)
        if single and self.use_traced_backbone and input_ids.device.type == "cpu" and not self.training \
                and not torch.is_grad_enabled() and not _cpu_autocast() and not self._forward_hooked() \
                and not self.dropout_active():  # a trace built with dropout on would fail its check, for good
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            dtype = self.bert.embeddings.word_embeddings.weight.dtype
            cached = self.__dict__.get("_fles1_traced_hidden_states")
            if cached is None or cached[0] != (_REGISTRATIONS[0], dtype):
                with _TRACE_LOCK:
                    cached = self.__dict__.get("_fles1_traced_hidden_states")  # another thread's, maybe
                    if cached is None or cached[0] != (_REGISTRATIONS[0], dtype):
                        traced = _trace_hidden_states(self, input_ids, token_type_ids)
                        _TRACED_MODULES.update(self.modules())
                        cached = ((_REGISTRATIONS[0], dtype), traced)
                        self.__dict__["_fles1_traced_hidden_states"] = cached
            if cached[1] is not None:
                return cached[1](input_ids, token_type_ids)
        outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, return_dict=True)  # config.return_dict=False: a tuple
        return self.cls.predictions.transform(outputs.last_hidden_state)

    @torch.no_grad()
    def _cpu_max_logits(self, hidden, attention_mask, bias, projection_dtype, screen) -> torch.Tensor:
        """Inference-only CPU projection, one text at a time, padding skipped: (batch, vocab) float32.

        With a `screen` (int8 or half precision), the float32 result comes through `_screened_max`; entries
        screened out keep their (negative) estimate in `max_logits`.
        """
        if screen is None:
            dtype = projection_dtype or hidden.dtype
            rows, packed = self._projection_weight(dtype)
            bias = bias.detach().float()
        values = torch.empty((hidden.shape[0], bias.shape[0]), dtype=torch.float32)
        keep = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        for row in range(hidden.shape[0]):
            states = hidden[row] if keep is None else hidden[row][keep[row]]
            if len(states) == 0:  # no token attended: the max over none, as the batched path gives it
                values[row] = -math.inf
            elif screen is not None:
                values[row] = _screened_max(states, screen)
            else:
                values[row] = torch.add(_max_over_tokens(states.to(dtype), rows, packed), bias)
        return values

    def encode_sparse(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        projection_dtype: Optional[torch.dtype] = None,
        chunk_tokens: Optional[int] = None,
        screening: Optional[bool] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> FLES1SparseOutput:
        """
        Sparse vectors log(1 + ReLU(max_t logits)) of shape (batch, vocab), float32, without thresholding.

        Args:
            input_ids, attention_mask, token_type_ids: as returned by the tokenizer.
            projection_dtype: dtype of the vocabulary projection (e.g. `torch.bfloat16` or "bfloat16"; one of
                `PROJECTION_DTYPES`); the backbone runs in the model's dtype. Defaults to the model's dtype.
                A bf16/fp16 projection of a float32 model at CPU inference is screened (see `screening`): the
                float32 vectors; on accelerators, under autograd, with ``screening=False`` or an offloaded decoder it
                rounds them (~2e-2).
            chunk_tokens: tokens projected onto the vocabulary at once (memory/speed trade-off). Setting it
                on CPU selects the batched projection instead of the per-text tiled one.
            screening: CPU inference only: find the float32 result through an int8 pass that bounds every
                logit, plus a float32 recompute of the few entries that can be positive (same vectors, about 2x
                faster). Defaults to on for float32 models where `int8_screening_available()`; by default a
                bf16/fp16 `projection_dtype` screens in that dtype instead, the same way, where
                `half_screening_available(dtype, hidden_size)`. True: the int8 screen, whatever the projection
                dtype (a float32 model's only: at CPU inference a ValueError otherwise). False: no screening.
            position_ids: passed to BERT. By default a text's tokens sit at positions 0, 1, ... of the padded
                row, as in transformers: under left padding they are shifted, and the vectors change (as they do
                in `forward` and sentence-transformers); `(attention_mask.cumsum(1) - 1).clamp(min=0)` undoes it.

        Under autograd the projection keeps only each entry's max and argmax (sparse backward); on CPU at
        inference it runs per text, a cache-sized tile of tokens at a time against a oneDNN-packed weight,
        skipping padding; a single text's backbone runs through a TorchScript trace (see `_hidden_states`). A model
        whose weights accelerate offloads (``cpu_offload``, ``disk_offload``) loads them per call through its hooks,
        as `forward` does, and projects them without screening; a model carrying accelerate's hooks encodes one
        call at a time across threads.
        """
        projection_dtype = projection_dtype_of(projection_dtype)
        with self._one_call_at_a_time_if_hooked():
            hidden = self._hidden_states(input_ids, attention_mask, token_type_ids, position_ids)
            with self._decoder_in_memory() as offloaded:
                return self._project(hidden, attention_mask, projection_dtype, chunk_tokens, screening, offloaded)

    def _project(self, hidden, attention_mask, projection_dtype, chunk_tokens, screening, offloaded):
        """`encode_sparse` past the backbone: the vocabulary projection, max-pooled. ``offloaded``: the decoder's
        weights were loaded for this call alone (`_decoder_in_memory`), so nothing is cached from them."""
        decoder = self.cls.predictions.decoder
        bias = self._decoder_bias()
        # any of the three: training the vocabulary bias alone (the rest frozen) needs its gradient too
        differentiable = torch.is_grad_enabled() and (hidden.requires_grad or decoder.weight.requires_grad
                                                      or bias.requires_grad)
        if hidden.device.type == "cpu" and not differentiable and chunk_tokens is None and not offloaded:
            if screening is None:
                screen = self._default_screen(hidden.device, hidden.dtype, projection_dtype)
            elif screening and hidden.dtype != torch.float32:  # was a RuntimeError about m1/m2 dtypes deep inside
                raise ValueError(f"screening=True bounds a float32 model's logits; this model computes in "
                                 f"{str(hidden.dtype).removeprefix('torch.')}: load it in float32, or leave screening "
                                 "at None")
            else:
                screen = self._int8_screen() if screening else None
            max_logits = self._cpu_max_logits(hidden, attention_mask, bias, projection_dtype, screen)
            return FLES1SparseOutput(sparse_embeddings=torch.log1p(torch.relu(max_logits)), max_logits=max_logits)
        attended = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        if attended is not None:
            # Padding positions copy the text's first attended token (not position 0: left padding puts [PAD]
            # there): the max over tokens is then unchanged, no (batch x length x vocab) mask is needed, and
            # autograd routes their gradient to that token.
            first = attended.int().argmax(dim=1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            hidden = torch.where(attended.unsqueeze(-1), hidden, hidden.gather(1, first))
        if projection_dtype is not None:
            hidden = hidden.to(projection_dtype)
        max_logits = max_pooled_logits(
            hidden, decoder.weight, bias, chunk_tokens or self.sparse_chunk_tokens(hidden.device)
        )
        if attended is not None:  # a row that attends to nothing: the max over none (no host sync to test for one)
            max_logits = max_logits.masked_fill(~attended.any(dim=1, keepdim=True), -math.inf)
        return FLES1SparseOutput(sparse_embeddings=torch.log1p(torch.relu(max_logits)), max_logits=max_logits)

    @torch.no_grad()
    def encode_sparse_terms(
        self,
        input_ids: torch.LongTensor,
        token_type_ids: Optional[torch.Tensor] = None,
        projection_dtype: Optional[torch.dtype] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """
        One text's active terms: (vocabulary ids, weights) of the entries of [`encode_sparse`] that are > 0, in
        vocabulary order -- the same values, without the dense (vocab,) vector when the CPU screens (int8, or a
        bf16/fp16 `projection_dtype`; the single-query path of `FLES1Encoder`). Takes the tokenizer's output as is
        (``**tokenizer(text, return_tensors="pt")``); one text has no padding, so an ``attention_mask`` must be all
        ones.

        Example:

        ```python
        >>> ids = tokenizer("What is machine learning?", return_tensors="pt")["input_ids"]
        >>> term_ids, weights = model.encode_sparse_terms(ids)
        >>> tokenizer.convert_ids_to_tokens(int(term_ids[weights.argmax()]))  # top term (shipped splade-tiny)
        'machine'

        ```
        """
        projection_dtype = projection_dtype_of(projection_dtype)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"encode_sparse_terms takes one text: input_ids of shape (1, length), got "
                             f"{tuple(input_ids.shape)}; use encode_sparse for batches")
        if attention_mask is not None and not bool(attention_mask.all()):  # padding would be pooled as tokens
            raise ValueError("encode_sparse_terms takes one text without padding: attention_mask has zeros; use "
                             "encode_sparse for padded input")
        with self._one_call_at_a_time_if_hooked():
            return self._sparse_terms(input_ids, token_type_ids, projection_dtype)

    def _sparse_terms(self, input_ids, token_type_ids, projection_dtype):
        """`encode_sparse_terms` past its checks."""
        screen = self._default_screen(input_ids.device, self.bert.embeddings.word_embeddings.weight.dtype,
                                      projection_dtype)  # None for an offloaded decoder too (`_decoder_cache`)
        if screen is None:
            vector = self.encode_sparse(input_ids, token_type_ids=token_type_ids, projection_dtype=projection_dtype)
            vector = vector.sparse_embeddings[0]
            ids = vector.nonzero().squeeze(1)
            return ids, vector[ids]
        states = self._hidden_states(input_ids, None, token_type_ids)[0]
        estimate, candidates = screened = _screening_pass(states, screen)
        if _too_many(candidates, estimate):  # dense (an untrained model): `_screened_max`'s full pass
            vector = torch.log1p(torch.relu(_screened_max(states, screen, screened=screened)))
            candidates = vector.nonzero().squeeze(1)
            return candidates, vector[candidates]
        exact = _exact_at(states, screen, candidates)[0].numpy()
        positive = (exact > 0).nonzero()[0]  # ndarray indexing: a few us where torch's boolean masks take ~15
        return torch.from_numpy(candidates.numpy()[positive]), torch.log1p(torch.from_numpy(exact[positive]))

    def clear_caches(self) -> None:
        """Drop the decoder's int8 / packed copies and the traced backbone; they are rebuilt on the next call.

        They follow the weights and hooks by themselves (version counters, a sample of elements, module and hook
        registrations, a ``forward`` set on a backbone or MLM-transform module as accelerate's hooks do), except
        after edits that register nothing -- call this then:

        - a write through ``.data`` to a few rows of the decoder (``weight.data[new_id] = ...``);
        - a module's hook dict replaced by assignment;
        - a submodule or parameter removed (``del model.bert.encoder.layer[1]``, ``linear.bias = None``);
        - a setting the trace holds as a constant (``LayerNorm.eps``, an attention module's ``scaling``).

        The sparse paths project with the decoder's weight themselves: hooks on ``cls.predictions`` or its
        ``decoder`` act on `forward`'s logits only.
        """
        for name in self._fles1_caches:
            self.__dict__.pop(name, None)

    def _decoder_bias(self) -> torch.Tensor:
        decoder = self.cls.predictions.decoder
        return decoder.bias if decoder.bias is not None else self.cls.predictions.bias

    def _one_call_at_a_time_if_hooked(self):
        """`_OFFLOADED_LOCK` for a model carrying accelerate's hooks (offloading: they load and unload weights per
        call, and one thread's unload would pull them from under another's -- wrong vectors, no error), else a
        context that does nothing (~1 us to tell)."""
        hooked = any(map(dict.__contains__, self._module_views()[3], itertools.repeat("_hf_hook")))
        return _OFFLOADED_LOCK if hooked else contextlib.nullcontext()

    def _decoder_offloaded(self) -> bool:
        """Whether the vocabulary projection's weight or bias is on the meta device (accelerate's offloading, or a
        model built under ``init_empty_weights``)."""
        return self.cls.predictions.decoder.weight.is_meta or self._decoder_bias().is_meta

    @contextlib.contextmanager
    def _decoder_in_memory(self):
        """The vocabulary projection's weights in memory while the sparse paths read them; yields whether they were
        offloaded. accelerate's offloading hooks (``cpu_offload``, ``disk_offload``, a ``device_map`` offloading
        ``cls``) keep them on the meta device between forwards and load them in their ``pre_forward``: the sparse
        paths read the decoder without calling its forward, so they load them the same way (duck-typed: no
        accelerate import), and cache nothing from them -- a kept copy would undo the offload. Weights on the meta
        device with no hook to load them are a ValueError (they read as garbage)."""
        if not self._decoder_offloaded():
            yield False
            return
        head = self.cls.predictions
        # (`encode_sparse` holds `_OFFLOADED_LOCK` whenever a hook is here: the load and unload are one call's)
        with contextlib.ExitStack() as unload:
            for module in (head, head.decoder):  # the order forward's hooks run in
                hook = getattr(module, "_hf_hook", None)
                if hook is not None:
                    hook.pre_forward(module)
                    unload.callback(hook.post_forward, module, None)
            if self._decoder_offloaded():
                raise ValueError("the vocabulary projection's weights (cls.predictions.decoder) are on the meta device "
                                 "and no accelerate offloading hook loads them: a model built under init_empty_weights "
                                 "needs its weights loaded (load_checkpoint_and_dispatch, or from_pretrained)")
            yield True


# save_pretrained copies this file and configuration_fles1.py next to the weights.
FLES1Config.register_for_auto_class()
FLES1ForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__all__ = ["FLES1ForMaskedLM", "FLES1SparseOutput", "max_pooled_logits", "int8_screening_available",
           "half_screening_available", "projection_dtype_of"]
