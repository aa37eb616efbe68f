"""Balanced pseudo-labels by optimal transport: the Sinkhorn-Knopp solver of SeLa.

Asano, Rupprecht, Vedaldi, "Self-labelling via simultaneous clustering and representation
learning", ICLR 2020, Sec. 3.1. Given the model's posteriors P (N images x K clusters), SeLa picks
the labelling Q that solves

    max_Q  <Q, log P> + (1/lambda) H(Q)   s.t.  Q >= 0,  Q 1_K = 1/N,  Q^T 1_N = 1/K,

i.e. every image carries mass 1/N and every cluster receives mass 1/K (equal cluster sizes; the
paper writes Q as K x N, so its rows and columns are swapped with respect to ours). The solution
is Q = diag(u) P^lambda diag(v); the paper's "fast version" of Sinkhorn-Knopp finds u and v by
alternately rescaling rows and columns, and the hard labels are argmax_k Q_ik.

How this implementation differs from the paper's code (which raises P to the power lambda in
float64):

* Shifted exponentials in float32. P^lambda underflows in float32 at lambda = 25 (and even float64
  underflows for peaked posteriors), which is what makes a naive solver return NaN. We keep
  exp(lambda log P - a_i - b_k) with a row offset a and column offset b chosen so that every row
  and every column of the kernel holds an entry equal to 1 (no all-zero row or column, so no 0/0),
  and fold the scalings back into a and b whenever they leave [e^-absorb_at, e^absorb_at]
  ("absorption", Schmitzer 2019, Sec. 4.1).
* Over-relaxation (Thibault et al. 2021, "Overrelaxed Sinkhorn-Knopp algorithm for regularized
  optimal transport"; Lehmann et al. 2022): the log-scalings move by omega times the plain
  Sinkhorn step. omega starts at 1; after a few plain iterations it is set from the observed
  convergence rate with Young's SOR formula omega = 2 / (1 + sqrt(1 - mu^2)) and refined every 10
  iterations; if the error stops improving it falls back to plain Sinkhorn for good. At lambda = 25
  this cuts the iterations 2-4x on peaked posteriors (docs/benchmarks.md).
* The error is checked every iteration (the paper's code every 10th) and is the same quantity:
  err = sum_i |N * (Q 1_K)_i - 1|, the L1 violation of the image marginal scaled by N, measured
  right after the cluster update. The last update is always a plain cluster update, so the
  cluster marginal is exact when the solver returns.

Rows may be sharded across ranks (``sharded=True``): every rank passes its own rows, the
K-sized column sums (plus the error) are all-reduced once per iteration, and every rank ends with
the same cluster scaling, hence the same result as one process solving the whole matrix.

Memory. The solver's one large array is the kernel m (n, K). It needs the log-posteriors three
times: to build m, to rebuild it at each absorption, and for the final argmax, always block by
block of ``chunk`` rows and always elementwise (a row max, then shifts and an exp per entry).
:func:`sinkhorn_knopp_rows` takes them as a function of a row block instead of a tensor, so a
caller that can recompute them (SeLa: one small matrix product and a log_softmax from this rank's
features, n x D instead of n x K) keeps a single n x K array alive: half of what
:func:`sinkhorn_knopp` needs with its (n, K) ``log_p`` input. Both run the same arithmetic on the
same blocks, so for equal log-posteriors they return equal bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from instdisc import dist

# Over-relaxation: plain iterations before the first rate estimate, iterations between
# estimates, and the largest omega used (omega -> 2 stops converging).
_WARMUP = 10
_EVERY = 10
_OMEGA_MAX = 1.95


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn_knopp` for this rank's rows.

    log Q_ik = lamb * log_p_ik + log_u_i + log_v_k (``transport_plan`` rebuilds it).
    """

    labels: Tensor  # (n,) int64, argmax_k Q_ik
    log_u: Tensor  # (n,) image (row) log-scalings
    log_v: Tensor  # (K,) cluster (column) log-scalings, identical on every rank
    iters: int  # Sinkhorn iterations run
    err: float  # sum_i |N (Q 1)_i - 1| at the last check
    converged: bool  # err <= tol before max_iter
    rebuilds: int = 0  # absorptions that rebuilt the kernel (each one reads every log-posterior once)


# rows(lo, hi) -> (hi - lo, K) log-posteriors of rows lo .. hi-1 of this rank's block.
LogPRows = Callable[[int, int], Tensor]


def _kernel(rows: LogPRows, n: int, lamb: float, a: Tensor, b: Tensor, floor: float, out: Tensor, chunk: int) -> Tensor:
    """exp(lamb * log_p - a[:, None] - b[None, :]) in place in `out`, entries below e^-floor set to 0: (n, K)."""
    for i in range(0, n, chunk):
        blk = out[i : i + chunk]  # (c, K) view
        torch.mul(rows(i, min(i + chunk, n)).to(out.dtype), lamb, out=blk).sub_(a[i : i + chunk, None]).sub_(b)
        _exp_flushed_(blk, floor)
    return out


def _exp_flushed_(x: Tensor, floor: float) -> Tensor:
    # exp(x) for x < -floor would be negligible (see `floor` in sinkhorn_knopp) or a float32
    # subnormal, and CPUs compute with subnormals 10-20x slower: a matrix with 7% of them made
    # every matrix-vector product 14x slower. Make them exact zeros instead.
    return torch.nn.functional.threshold_(x, -floor, -math.inf).exp_()


@torch.no_grad()
def sinkhorn_knopp(
    log_p: Tensor,
    lamb: float,
    tol: float = 0.1,
    max_iter: int = 1000,
    *,
    sharded: bool = False,
    overrelax: bool = True,
    absorb_at: float = 15.0,
    chunk: int = 8192,
) -> SinkhornResult:
    """Equal-size pseudo-labels maximising <Q, log P> + H(Q) / lamb (SeLa, Sec. 3.1).

    Args:
        log_p: (n, K) log-posteriors of this rank's images (log_softmax of a head's logits).
            float32 is enough at any lamb; float64 input is solved in float64.
        lamb: lambda, the inverse entropic weight (paper: 25 on ImageNet, 10 on CIFAR). Larger
            values give harder, more confident assignments and slower convergence.
        tol: stop when sum_i |N (Q 1)_i - 1| <= tol (paper's code: 0.1 ImageNet, 0.01 CIFAR).
        max_iter: iteration cap; the result is still balanced per cluster if it is reached.
        sharded: rows are split across the ranks of the default process group; all ranks must
            call this together with the same K, lamb, tol, max_iter.
        overrelax: adaptive over-relaxation (see the module docstring); False gives the plain
            Sinkhorn-Knopp iteration of the paper.
        absorb_at: fold a scaling into the kernel's offsets once |log scaling| exceeds this
            (keeps float32 exponentials in range; smaller is safer and slower). Kernel entries
            below exp(-2 absorb_at - 24) are set to 0: with both scalings within
            exp(+-absorb_at), such an entry adds less than e^-24 to a row whose sum is about 1
            (the targets are scaled so), below float32 rounding. Above ~15 that floor reaches the
            subnormal range: still correct, but slower on CPUs.
        chunk: rows per block when building the kernel and taking the final argmax (bounds
            their temporary memory).

    Returns:
        A :class:`SinkhornResult` for this rank's rows.

    Raises:
        ValueError: log_p is not 2-D, holds NaN/+inf, or has a row or column that is all -inf.
    """
    if log_p.ndim != 2:
        raise ValueError(f"log_p must be (N, K); got shape {tuple(log_p.shape)}")
    return sinkhorn_knopp_rows(
        lambda lo, hi: log_p[lo:hi], log_p.shape[0], log_p.shape[1], lamb, tol, max_iter,
        dtype=torch.float64 if log_p.dtype == torch.float64 else torch.float32, device=log_p.device,
        sharded=sharded, overrelax=overrelax, absorb_at=absorb_at, chunk=chunk,
    )


@torch.no_grad()
def sinkhorn_knopp_rows(
    rows: LogPRows,
    n: int,
    k: int,
    lamb: float,
    tol: float = 0.1,
    max_iter: int = 1000,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    sharded: bool = False,
    overrelax: bool = True,
    absorb_at: float = 15.0,
    chunk: int = 8192,
) -> SinkhornResult:
    """:func:`sinkhorn_knopp` with the log-posteriors given block by block: one (n, K) array in memory.

    Args:
        rows: rows(lo, hi) returns the (hi - lo, K) log-posteriors of rows lo .. hi-1; called with
            the blocks [0, chunk), [chunk, 2 chunk), ... once to build the kernel, once per
            absorption (``SinkhornResult.rebuilds``) and once for the final argmax. It must
            return the same values every time (the solver assumes a fixed matrix).
        n, k: this rank's number of rows (may be 0) and the number of clusters.
        dtype: the kernel's dtype (float32, or float64 for a float64 solve).
        device: where the kernel lives.
        Other arguments: as :func:`sinkhorn_knopp`.
    """
    if lamb <= 0 or tol < 0 or max_iter < 1:
        raise ValueError(f"need lamb > 0, tol >= 0, max_iter >= 1; got {lamb}, {tol}, {max_iter}")
    dt, dev = dtype, torch.device(device)

    def reduce_(x: Tensor) -> Tensor:
        return dist.all_reduce_(x) if sharded else x

    n_total = int(reduce_(torch.tensor([float(n)], dtype=torch.float64, device=dev)).item())
    floor = 2.0 * absorb_at + 24.0

    # Kernel offsets: a_i = row max, then b_k = column max of the row-shifted matrix. Each row's
    # own argmax column then has b_k = 0, so every row and every column holds a 1 after exp.
    m = torch.empty((n, k), dtype=dt, device=dev)  # (n, K) becomes the kernel in place
    a = m.new_empty(n)  # (n,)
    for i in range(0, n, chunk):
        blk = m[i : i + chunk]  # (c, K) view
        torch.mul(rows(i, min(i + chunk, n)).to(dt), lamb, out=blk)
        a[i : i + chunk] = blk.amax(1)
        blk.sub_(a[i : i + chunk, None])
    if not bool(torch.isfinite(a).all()):
        raise ValueError("log_p holds NaN or +inf, or a row whose entries are all -inf")
    b = m.amax(0) if n else m.new_full((k,), -math.inf)  # (K,)
    if sharded:
        b = dist.all_gather_cat(b[None]).amax(0)  # (K,) global column max
    if not bool(torch.isfinite(b).all()):
        raise ValueError("a cluster has probability 0 for every image: equal cluster sizes are infeasible")
    _exp_flushed_(m.sub_(b), floor)

    # Targets scaled by N (image mass 1, cluster mass N/K) keep u and v near 1, far from float32's
    # limits; Q = diag(u) m diag(v) / N.
    row_t, col_t = 1.0, n_total / k
    u = torch.ones(n, dtype=dt, device=dev)  # (n,)
    v = col_t / reduce_(u @ m)  # (K,) plain first cluster update
    omega, adapt = 1.0, overrelax
    errs: list[float] = []
    best, since_best = math.inf, 0
    err, it, converged, rebuilds = math.inf, 0, False, 0
    while True:
        it += 1
        s = m @ v  # (n,) row sums of diag(1) m diag(v)
        err_local = (s * u - row_t).abs().sum()
        u_new = row_t / s
        u = u_new if omega == 1.0 else u * (u_new / u).pow(omega)
        red = reduce_(torch.cat([u @ m, err_local[None]]))  # (K+1,) column sums + error
        err = float(red[k])
        v_new = col_t / red[:k]
        if err <= tol or it >= max_iter:
            converged = err <= tol
            v = v_new  # always end on a plain cluster update: exact cluster marginal
            break
        v = v_new if omega == 1.0 else v * (v_new / v).pow(omega)

        errs.append(err)
        if err < best:
            best, since_best = err, 0
        else:
            since_best += 1
        if adapt and omega > 1.0 and since_best > 3 * _EVERY:
            omega, adapt = 1.0, False  # not helping here: plain Sinkhorn from now on
        elif adapt and it > _WARMUP and it % _EVERY == 0 and since_best <= _EVERY and errs[-1 - _EVERY] > 0:
            rho = (errs[-1] / errs[-1 - _EVERY]) ** (1.0 / _EVERY)  # observed rate per iteration
            if 0 < rho < 1:
                # Young's SOR theory: rho = (rho + omega - 1)^2 / (omega^2 mu^2) at omega below the
                # optimum; solve for mu^2 (the plain iteration's rate) and take the optimal omega.
                mu2 = (rho + omega - 1) ** 2 / (rho * omega * omega)
                if mu2 < 1:
                    omega = max(omega, min(_OMEGA_MAX, 2.0 / (1.0 + math.sqrt(1.0 - mu2))))

        # Absorption: v is identical on every rank, so all ranks decide alike for b; u is local.
        big_u = n > 0 and float(u.log().abs().max()) > absorb_at
        big_v = float(v.log().abs().max()) > absorb_at
        if big_u:
            a, u = a - u.log(), torch.ones_like(u)
        if big_v:
            b, v = b - v.log(), torch.ones_like(v)
        if big_u or big_v:
            _kernel(rows, n, lamb, a, b, floor, m, chunk)
            rebuilds += 1

    del m
    log_u = u.log() - a - math.log(n_total)  # (n,)
    log_v = v.log() - b  # (K,)
    labels = torch.empty(n, dtype=torch.long, device=dev)
    for i in range(0, n, chunk):
        # The row term log_u_i does not change a row's argmax.
        labels[i : i + chunk] = (rows(i, min(i + chunk, n)).to(dt) * lamb + log_v).argmax(1)
    return SinkhornResult(labels, log_u, log_v, it, err, converged, rebuilds)


def transport_plan(log_p: Tensor, lamb: float, result: SinkhornResult) -> Tensor:
    """Q (n, K) of a solve, in log_p's dtype (for tests and analysis; costs an n x K tensor)."""
    return (log_p * lamb + result.log_u.to(log_p.dtype)[:, None] + result.log_v.to(log_p.dtype)).exp()
