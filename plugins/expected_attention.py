"""``expected_attention``: Expected Attention -- the attention future queries are expected to pay each key.

Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution" (2025, arXiv:2510.00636), the method of kvpress's ``ExpectedAttentionPress``. Queries are modelled
as a Gaussian: the mean ``mu`` and covariance ``S`` of recent (pre-RoPE) queries, rotated by the RoPE rotation
averaged over the next ``n_future`` positions (``R``). For ``q ~ N(R mu, R S R^T)`` the expected un-normalised
attention of key ``k`` is ``exp(k . R mu / sqrt(d) + k^T R S R^T k / (2 d))``; the scores are its softmax over
the keys, times the value norm ``||v||`` (``use_vnorm``; plus ``epsilon`` first). The first ``n_sink`` tokens
are kept and take no part in the softmax, and the first ``n_sink`` queries of the stream are left out of the
statistics (attention sinks are outliers).

**What differs from kvpress, and why.** The memory gives an evictor the attention *rows* of the newest queries
(``view.rows``), not the queries themselves (``LayerView`` has no query field). The queries are recovered from
the rows: for a query ``q`` and the keys ``k_j`` it saw, ``log a_j = q . k_j * scaling - logsumexp``, a linear
system in ``(q * scaling, logsumexp)`` solved by least squares over the keys every used row saw with a
non-zero weight (at least ``head_dim + 1`` of them; the oldest rows are dropped until that holds), then
un-rotated from each query's position. So:

* with one query head per KV head (no GQA), the recovered queries are the real ones up to float rounding, and
  the scores are kvpress's (checked in ``tests/test_peers_kvpress.py`` on a tiny multi-head Llama);
* with GQA the rows are the mean of the group's softmaxes, which is not the softmax of any one query: the fit
  gives one *effective* query per KV head (the best log-linear fit of the group's attention), where kvpress
  averages the group's per-head expected attentions. The kept sets then differ a little (measured in the
  peers tests on a tiny GQA Llama and Qwen2);
* the statistics cover the newest ``window`` queries (the memory's row window, ``stats_window``), not every
  query of the prefill: in a stream the memory holds rows of the newest queries only. With a window at least
  as long as the prompt, the one-shot setting uses the same queries as kvpress (those past ``n_sink``) once
  ``n_sink >= head_dim`` (every used row then sees ``head_dim + 1`` keys);
* a row whose keys all underflowed to zero weight but ``head_dim`` or fewer cannot be inverted: when no row
  can be, the head falls back to the window's mean attention times ``||v||``.

The exact method needs the raw queries: a ``LayerView.queries`` field (the call's post-RoPE queries
``[b, q_heads, q, d]`` with their ``rope`` positions) passed to :meth:`observe` on every call, and per-layer (not
per-token) evictor state to accumulate their mean and covariance across calls (``[b, q_heads, d]`` and
``[b, q_heads, d, d]``), selected with the batch and reset with the memory.
"""

from __future__ import annotations

import torch

from tokenmem.evictor import Evictor, LayerView, register_evictor
from tokenmem.rope import rotate_by
from tokenmem.scoring import average_heads, check_count, mean_rotation, rope_frequencies, window_attention

#: attention weights at or below this are treated as underflowed (their log carries no information)
TINY = 1e-30


def recover_queries(rows: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, live: torch.Tensor):
    """Queries (times the attention scaling) that produced ``rows [b, h, r, n]`` over ``keys [b, h, n, d]``:
    ``(queries [b, h, r, d] float64, used [b, h, r] bool)``. ``live`` marks the rows to use; the oldest live rows
    are dropped until the keys every remaining row saw with a weight above :data:`TINY` number ``d + 1``."""
    b, h, r, n = rows.shape
    d = keys.shape[-1]
    present = (rows > TINY) | ~live[..., None]  # [b, h, r, n]; rows not used constrain nothing
    # shared[t]: keys seen by every live row from t to the newest (suffix AND over rows)
    shared = torch.flip(torch.cumprod(torch.flip(present, [2]).to(torch.uint8), dim=2), [2]).bool()
    shared = shared & valid[:, :, None, :]
    enough = shared.sum(-1) >= d + 1  # [b, h, r], non-decreasing in t
    start = torch.where(enough.any(-1), enough.to(torch.int8).argmax(-1), r)  # [b, h]
    used = live & (torch.arange(r, device=rows.device) >= start[..., None])
    J = shared.gather(2, start.clamp(max=r - 1)[..., None, None].expand(b, h, 1, n))[:, :, 0]  # [b, h, n]
    J = J & (start < r)[..., None]
    w = J.to(torch.float64)[..., None]  # [b, h, n, 1]
    X = torch.cat([keys.to(torch.float64), -torch.ones(b, h, n, 1, dtype=torch.float64, device=keys.device)], -1)
    Y = torch.log(rows.to(torch.float64).clamp(min=TINY)).transpose(2, 3)  # [b, h, n, r]
    Y = torch.where(used[:, :, None, :], Y, 0.0)
    solution = torch.linalg.lstsq((X * w).cpu(), (Y * w).cpu(), driver="gelsd").solution.to(keys.device)
    queries = solution[:, :, :d].transpose(2, 3)  # [b, h, r, d]
    return queries, used & (start < r)[..., None]


@register_evictor("expected_attention")
class ExpectedAttentionEvictor(Evictor):
    name = "expected_attention"
    description = "Expected Attention: attention predicted from recent queries' statistics at future RoPE positions"

    def __init__(self, window: int = 64, n_future: int = 512, n_sink: int = 4, use_covariance: bool = True,
                 use_vnorm: bool = True, epsilon: float = 0.0, average_heads: bool = False, rows_chunk: int = 128):
        check_count("window", window, 2)
        check_count("n_future", n_future, 1)
        check_count("n_sink", n_sink, 0)
        check_count("rows_chunk", rows_chunk, 0)
        self.window, self.n_future, self.n_sink = window, n_future, n_sink
        self.use_covariance, self.use_vnorm, self.epsilon = use_covariance, use_vnorm, float(epsilon)
        self.average_heads = average_heads
        self.stats_window = window  # rows of the newest `window` queries, never consumed
        self.rows_chunk = rows_chunk

    def protect(self, view: LayerView) -> torch.Tensor:
        return view.first_valid(self.n_sink)

    def score(self, view: LayerView) -> torch.Tensor:
        keys = view.keys
        b, h, n, d = keys.shape
        valid = view.meta.valid
        sinks = view.first_valid(self.n_sink)
        vnorm = torch.linalg.vector_norm(view.values.float(), dim=-1) if self.use_vnorm else None
        rows = view.rows
        if rows is None or rows.shape[2] < 2:
            fallback = window_attention(view)
            return self._finish(view, fallback if vnorm is None else (fallback + self.epsilon) * vnorm, valid)
        r = rows.shape[2]
        newest = view.meta.rope[..., -1]  # [b, h] the newest slot holds the newest query's token
        qpos = newest[..., None] - (r - 1 - torch.arange(r, device=keys.device))  # [b, h, r] query positions
        live = (rows.sum(-1) > 0) & (qpos >= self.n_sink)
        queries, used = recover_queries(rows, keys, valid, live)  # [b, h, r, d] (times the scaling), [b, h, r]
        inv_freq = rope_frequencies(view)
        if inv_freq is not None:  # back to position 0 (pre-RoPE queries)
            queries = rotate_by(queries, -qpos, inv_freq).to(torch.float64)
        count = used.sum(-1).clamp(min=1)[..., None]  # [b, h, 1]
        wq = used[..., None].to(torch.float64)
        mean = (queries * wq).sum(2) / count  # [b, h, d]
        cov = None
        if self.use_covariance:  # population covariance, as kvpress
            centred = (queries - mean[:, :, None]) * wq
            cov = torch.einsum("bhri,bhrj->bhij", centred, centred) / count[..., None]
        if inv_freq is not None:  # the rotation averaged over the next n_future positions
            R = mean_rotation(newest + 1, self.n_future, inv_freq, d)  # [b, h, d, d]
            mean = torch.einsum("bhij,bhj->bhi", R, mean)
            cov = None if cov is None else R @ cov @ R.transpose(-1, -2)
        kf = keys.to(torch.float64)
        logits = torch.einsum("bhnd,bhd->bhn", kf, mean)
        if cov is not None:
            logits = logits + torch.einsum("bhni,bhij,bhnj->bhn", kf, cov, kf) / 2
        logits = torch.where(valid & ~sinks, logits, float("-inf"))
        scores = torch.softmax(logits, dim=-1).nan_to_num(0.0).float()  # [b, h, n]
        fitted = used.any(-1)  # [b, h] heads whose queries could be recovered
        if not bool(fitted.all()):
            scores = torch.where(fitted[..., None], scores, window_attention(view))
        if vnorm is not None:
            scores = (scores + self.epsilon) * vnorm
        return self._finish(view, scores, valid)

    def _finish(self, view, scores, valid):
        return average_heads(scores, valid) if self.average_heads else scores

    def __repr__(self) -> str:
        return (f"ExpectedAttentionEvictor(window={self.window}, n_future={self.n_future}, n_sink={self.n_sink}, "
                f"use_covariance={self.use_covariance}, use_vnorm={self.use_vnorm}, epsilon={self.epsilon})")
