"""The FLES-1 contrastive loss.

InfoNCE over dot products of sparse vectors, temperature tau (0.05): query i (vector q_i) is scored against every
document of the batch -- its positive, its own n negatives and all other queries' positives and negatives:

    s_ij = <q_i, d_j> / tau,    j over the B * (1 + n) documents of the batch
    L    = mean_i [ -s_i,pos(i) + log sum_j exp(s_ij) ]

Documents are laid out query-major: the documents of query i are rows i*(1+n) ... i*(1+n)+n, the positive first.
Under DDP the trainer passes every rank's documents (``document_offset`` = where this rank's start), so the
denominators hold the global batch, as in one process.

    >>> import torch
    >>> from fles1.training.losses import info_nce
    >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> documents = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (pos, neg) per query
    >>> round(float(info_nce(queries, documents, group_size=2, temperature=0.05)), 6)
    0.0
"""

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor, documents: torch.Tensor, group_size: int, temperature: float = 0.05,
    false_negatives: torch.Tensor | None = None, document_offset: int | None = None,
):
    """InfoNCE of ``queries`` (B, V) against ``documents`` (B * group_size, V), positive first in each group; or
    against a larger matrix (all ranks' documents) whose rows ``document_offset`` onwards are these queries' groups.

    ``false_negatives`` (B, documents) bool marks documents known to be relevant to a query other than as
    its positive (e.g. another query's positive that the qrels also judge relevant to it): they are left out of
    that query's denominator instead of being pushed away.
    """
    needed = queries.shape[0] * group_size
    if documents.shape[0] != needed if document_offset is None else documents.shape[0] < document_offset + needed:
        where = "" if document_offset is None else f" from row {document_offset}"
        raise ValueError(f"expected {queries.shape[0]} x {group_size} documents{where} for {queries.shape[0]} "
                         f"queries, got {documents.shape[0]}")
    # at least float32, under bf16 autocast too: sparse dot products / 0.05 reach the hundreds, where bf16 steps by 2-4
    dtype = torch.promote_types(torch.promote_types(queries.dtype, documents.dtype), torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        scores = queries.to(dtype) @ documents.to(dtype).t() / temperature
    if false_negatives is not None:
        scores = scores.masked_fill(false_negatives.to(scores.device), float("-inf"))
    labels = torch.arange(queries.shape[0], device=queries.device) * group_size + (document_offset or 0)
    return F.cross_entropy(scores, labels)
