"""How precise can a bf16 kernel make the gradient of a learned scalar decay? (CPU study)

The Pallas backward forms d log_decay as a reverse cumulative sum of q.dq - k.dk, a small
difference of two large sums; keeping its bf16 error below 1e-2 costs a hi/lo split of the
decayed operands (several matmuls done twice). This script emulates the kernels' arithmetic
in numpy (every matmul operand rounded to bf16, float32 accumulation, chunks of C tokens with
running states) for one head and compares, against a float64 oracle:

  difference   the present formula, operands rounded to bf16 (what the split avoids)
  split        the present formula, decayed operands and states kept in float32 (the split)
  crossing     d log_decay_u as the sum over the pairs (s < u <= t) that cross u, which has no
               cancellation: chunk-local corner sums of the [C, C] pair matrix, plus three
               terms from the running states (pairs entering from earlier chunks, leaving to
               later chunks, or passing over the chunk), with every operand rounded to bf16
  via totals   the same, but the pairs passing over a chunk from a running sum of per-chunk
               totals (a kernel holds either the forward or the reverse state, not both)

and the difference form as the kernels compute it since v9 (pallas_backward._difference_side:
the decayed q and k rounded once and used alike on both sides, so only the carried states'
rounding is left), with the states' matmul operand

  states bf16  rounded to bf16 (one matmul)
  states split in two bf16 parts (two matmuls: the kernels' default)
  states fp16  rounded to fp16's 11-bit significand, its exponent range ignored (one fp16
               matmul with ideally scaled operands: what a kernel could do instead of the split)

and the kernels' default since v11, the anchored form: the same per-token terms with the states
in bf16, summed only within groups of 1, 2, 4 or 8 chunks from each group's exact anchor

  anchored G   the pairs crossing the group's first position as <S, dS> (S in bf16), minus
               the running sum of dL/db inside the group

and, in groups of 4 chunks, with other per-token terms than the decayed operands' products:

  4 direct     q times the float32 dq, k times dk (the kernels' default since v13)
  4 output     dO.o - v.dv with o the bf16 output (needs no q in the dq kernel)

  python benchmarks/dg_precision_study.py            # prints a table of relative errors

The "crossing" form would replace the split in the kernels if its error stays below 1e-2.
"""

from __future__ import annotations

import argparse

import numpy as np


def bf16(x):
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.view(np.float32)


def mm(a, b, round_operands=True):
    """A matmul as the kernels do it: bf16 operands (or float32 ones), float32 result."""
    if round_operands:
        a, b = bf16(a), bf16(b)
    return (np.asarray(a, np.float32) @ np.asarray(b, np.float32)).astype(np.float32)


def oracle(q, k, v, do, a):
    """Float64: dg_u = sum over s < u <= t of exp(b_t - b_s) (q_t.k_s) (do_t.v_s)."""
    q, k, v, do, a = (np.asarray(x, np.float64) for x in (q, k, v, do, a))
    b = np.cumsum(a)
    T = len(a)
    causal = np.tril(np.ones((T, T), bool))
    w = np.where(causal, np.exp(np.where(causal, b[:, None] - b[None, :], 0.0)), 0.0)
    pairs = w * (q @ k.T) * (do @ v.T)  # [t, s]
    # before[t, u] = sum over s < u of pairs[t, s]; dg_u = sum over t >= u of before[t, u].
    before = np.concatenate([np.zeros((T, 1)), np.cumsum(pairs, axis=1)[:, :-1]], axis=1)
    return np.sum(np.where(causal, before, 0.0), axis=0)


def _chunk_tables(a, C):
    """Per chunk: local inclusive cumsums b (from the chunk start) and the chunk's total."""
    T = len(a)
    b = np.cumsum(a.reshape(T // C, C), axis=1).astype(np.float32)
    return b, b[:, -1]


def _states(q, k, v, do, a, C, round_operands):
    """Running states: h[c] = sum over s before chunk c of exp(b_start - b_s) k_s^T v_s and
    dh[c] = sum over t after chunk c of exp(b_t - b_end) q_t^T do_t (float32, with the
    kernels' rounding of the decayed operands)."""
    n, D = len(a) // C, q.shape[1]
    b, tot = _chunk_tables(a, C)
    h, dh = np.zeros((n, D, D), np.float32), np.zeros((n, D, D), np.float32)
    for c in range(1, n):
        kc = k[(c - 1) * C:c * C] * np.exp(tot[c - 1] - b[c - 1])[:, None]
        h[c] = np.exp(tot[c - 1]) * h[c - 1] + mm(kc.T, v[(c - 1) * C:c * C], round_operands)
    for c in range(n - 2, -1, -1):
        qc = q[(c + 1) * C:(c + 2) * C] * np.exp(b[c + 1])[:, None]
        dh[c] = np.exp(tot[c + 1]) * dh[c + 1] + mm(qc.T, do[(c + 1) * C:(c + 2) * C],
                                                    round_operands)
    return h, dh


def difference_form(q, k, v, do, a, C, split):
    """dg = reverse cumsum of (q.dq - k.dk) without the diagonal pair, chunked like the
    kernels; split: decayed operands and states unrounded (what the hi/lo split buys)."""
    T = len(a)
    n = T // C
    b, tot = _chunk_tables(a, C)
    h, dh = _states(q, k, v, do, a, C, not split)
    mask = np.tril(np.ones((C, C), bool), -1)
    contrib = np.zeros(T, np.float32)
    for c in range(n):
        sl = slice(c * C, (c + 1) * C)
        qc, kc, vc, dc, bc = q[sl], k[sl], v[sl], do[sl], b[c]
        decay = np.where(mask, np.exp(np.where(mask, bc[:, None] - bc[None, :], 0.0)), 0.0)
        dp = mm(dc, vc.T) * decay  # [t, s], strictly causal
        dq = mm(dp, kc) + mm(dc * np.exp(bc)[:, None], h[c].T, not split)
        dk = mm(dp.T, qc) + mm(vc * np.exp(tot[c] - bc)[:, None], dh[c].T, not split)
        contrib[sl] = np.sum(qc * dq, axis=1) - np.sum(kc * dk, axis=1)
    # The initial (zero) state and final-state cotangent add nothing here.
    return np.cumsum(contrib[::-1])[::-1]


def fp16_significand(x):
    """Round to fp16's 11-bit significand, ignoring fp16's exponent range (as if each operand
    were scaled by a power of two into range first), returned as float32."""
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(m * 2048) / 2048, e).astype(np.float32)


# The functions are looked up at each call, so that the tests can switch the rounding off.
STATE_ROUNDING = {"bf16": lambda x: bf16(x), "split": lambda x: x,
                  "fp16": lambda x: fp16_significand(x)}


def kernel_difference_form(q, k, v, do, a, C, state="split"):
    """dg as the kernels form it since v9: the difference form with the diagonal pair kept
    (bf16 inputs), every decayed q and k rounded to bf16 once and used alike in the states and
    in q.dq and k.dk, the states entering the inter-chunk matmuls as STATE_ROUNDING[state]."""
    return np.cumsum(_kernel_db(q, k, v, do, a, C, state)[::-1])[::-1]


def anchored_form(q, k, v, do, a, C, group, product="operands"):
    """dg as the kernels form it since v11 (pallas_forward.ANCHORED_DG_MODES): per token
    dL/db = q.dq - k.dk, summed only inside groups of `group` chunks, from each group's anchor:
    the pairs crossing its first position, <S, dS> with S the state entering it rounded to bf16
    (the dq kernel stores it so) and dS its float32 cotangent. The per-token terms by product:
    "operands" as in kernel_difference_form with the states rounded to bf16 (v11, v12),
    "direct" q times the float32 dq and k times dk (v13), "output" dO.o - v.dv with o the bf16
    output (the same sum, by o_t = sum_s P_ts v_s and dv_s = sum_t P_ts dO_t; not read from q)."""
    T = len(a)
    b, tot = _chunk_tables(a, C)
    h, dh = _states(q, k, v, do, a, C, True)
    if product == "operands":
        db = _kernel_db(q, k, v, do, a, C, "bf16", (h, dh))
    else:
        db = _gradient_db(q, k, v, do, a, C, (h, dh), product == "output")
    dg = np.zeros(T, np.float64)
    for start in range(0, T, group * C):
        c = start // C
        # the cotangent of the state entering chunk c: dh[c] carried over the chunk, plus its
        # own queries (as the dk kernel forms it)
        dh_in = np.exp(tot[c]) * dh[c] + mm((q[start:start + C] * np.exp(b[c])[:, None]).T,
                                           do[start:start + C])
        span = db[start:start + group * C]
        dg[start:start + group * C] = (np.sum(bf16(h[c]).astype(np.float64) * dh_in)
                                       - (np.cumsum(span) - span))
    return dg


def _gradient_db(q, k, v, do, a, C, states, from_output: bool):
    """dL/db_t per token from the float32 gradients of a chunk (states (h, dh) rounded to bf16
    in the inter-chunk matmuls): q.dq - k.dk, or dO.o - v.dv with o rounded to bf16."""
    T = len(a)
    b, tot = _chunk_tables(a, C)
    h, dh = states
    causal = np.tril(np.ones((C, C), bool))
    contrib = np.zeros(T, np.float64)
    for c in range(T // C):
        sl = slice(c * C, (c + 1) * C)
        qc, kc, vc, dc, bc = q[sl], k[sl], v[sl], do[sl], b[c]
        decay = np.where(causal, np.exp(np.where(causal, bc[:, None] - bc[None, :], 0.0)), 0.0)
        fq, fk = np.exp(bc)[:, None], np.exp(tot[c] - bc)[:, None]
        if from_output:
            scores = bf16(mm(qc, kc.T) * decay)
            o = bf16(mm(scores, vc) + fq * mm(qc, bf16(h[c]), False))
            dv = mm(scores.T, dc) + fk * mm(kc, bf16(dh[c]), False)
            x, grad, y, dy = dc, o, vc, dv
        else:
            wdp = bf16(mm(dc, vc.T) * decay)
            x, grad = qc, mm(wdp, kc) + fq * mm(dc, bf16(h[c]).T, False)
            y, dy = kc, mm(wdp.T, qc) + fk * mm(vc, bf16(dh[c]).T, False)
        contrib[sl] = np.sum(x * grad, axis=1, dtype=np.float64) - np.sum(y * dy, axis=1,
                                                                           dtype=np.float64)
    return contrib


def _kernel_db(q, k, v, do, a, C, state, states=None):
    """dL/db_t = q.dq - k.dk per token as the kernels form it (see kernel_difference_form);
    states: the (h, dh) of _states(..., True) where the caller has them already."""
    T = len(a)
    n = T // C
    b, tot = _chunk_tables(a, C)
    h, dh = _states(q, k, v, do, a, C, True) if states is None else states
    rounded = STATE_ROUNDING[state]
    causal = np.tril(np.ones((C, C), bool))
    contrib = np.zeros(T, np.float64)
    for c in range(n):
        sl = slice(c * C, (c + 1) * C)
        qc, kc, vc, dc, bc = q[sl], k[sl], v[sl], do[sl], b[c]
        decay = np.where(causal, np.exp(np.where(causal, bc[:, None] - bc[None, :], 0.0)), 0.0)
        wdp = bf16(mm(dc, vc.T) * decay)  # dP * W, one bf16 operand for both sides
        inter_q = mm(dc, rounded(h[c]).T, False)
        inter_k = mm(vc, rounded(dh[c]).T, False)
        qd, kd = bf16(qc * np.exp(bc)[:, None]), bf16(kc * np.exp(tot[c] - bc)[:, None])
        r = np.sum(qc * mm(wdp, kc) + qd * inter_q, axis=1)
        w = np.sum(kc * mm(wdp.T, qc) + kd * inter_k, axis=1)
        contrib[sl] = r - w
    return contrib


def crossing_form(q, k, v, do, a, C, passing_from_totals=False):
    """dg_u as the sum over crossing pairs, every operand rounded to bf16.

    passing_from_totals: the pairs passing over chunk c from the chunk totals instead of
    <h_c, dh_c> (which needs the forward and the reverse state in one kernel): the pairs
    crossing the start of chunk c are Z_c = sum over c' < c of (leaving_c' - entering_c'),
    and those passing over it are Z_c - entering_c.
    """
    T = len(a)
    n = T // C
    b, tot = _chunk_tables(a, C)
    h, dh = _states(q, k, v, do, a, C, True)
    causal = np.tril(np.ones((C, C), bool))
    strict_upper = np.triu(np.ones((C, C), np.float32), 1)  # [s, u] = (s < u)
    dg = np.zeros(T, np.float32)
    crossing_start = np.float32(0.0)  # Z_c
    for c in range(n):
        sl = slice(c * C, (c + 1) * C)
        qc, kc, vc, dc, bc = q[sl], k[sl], v[sl], do[sl], b[c]
        decay = np.where(causal, np.exp(np.where(causal, bc[:, None] - bc[None, :], 0.0)), 0.0)
        pairs = mm(qc, kc.T) * mm(dc, vc.T) * decay  # [t, s]
        before = mm(pairs, strict_upper)  # [t, u]: sum over s < u
        corner = np.sum(np.where(causal, before, 0.0), axis=0)
        # Pairs from earlier chunks into t >= u of this chunk: suffix sums of r_t.
        r = np.sum(mm(qc * np.exp(bc)[:, None], h[c]) * dc, axis=1)
        entering = np.cumsum(r[::-1])[::-1]
        # Pairs from s < u of this chunk to later chunks: exclusive prefix sums of w_s.
        w = np.sum(mm(kc * np.exp(tot[c] - bc)[:, None], dh[c]) * vc, axis=1)
        leaving = np.concatenate([[0.0], np.cumsum(w)[:-1]])
        # Pairs from earlier chunks to later chunks pass over every u of the chunk.
        if passing_from_totals:
            passing = crossing_start - entering[0]
            crossing_start = crossing_start + np.sum(w) - np.sum(r)
        else:
            passing = np.exp(tot[c]) * np.sum(h[c] * dh[c])
        dg[sl] = corner + entering + leaving + passing
    return dg


ANCHOR_GROUPS = (1, 2, 4, 8)  # chunks per group of the anchored form's columns
PRODUCTS = ("direct", "output")  # the anchored form's other per-token products, groups of 4


def rel_err(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    T, D, C = args.tokens, args.dim, args.chunk
    rng = np.random.default_rng()
    print(f"T={T} D={D} C={C}, relative error of d log_decay against float64")
    cols = ("difference", "split", "crossing", "via totals", "states bf16", "states split",
            "states fp16", *(f"anchored {g}" for g in ANCHOR_GROUPS),
            *(f"4 {p}" for p in PRODUCTS))
    print(f"{'decays':<10}" + "".join(f"{c:>13}" for c in cols))
    for name, lo, hi in (("weak", 0.001, 0.1), ("gla", 0.01, 0.5), ("strong", 0.5, 4.0)):
        errs = []
        for _ in range(args.trials):
            q, k, v, do = (bf16(rng.standard_normal((T, D)) * D ** -0.25) for _ in range(4))
            a = -rng.uniform(lo, hi, T).astype(np.float32)
            ref = oracle(q, k, v, do, a)
            errs.append([rel_err(difference_form(q, k, v, do, a, C, False), ref),
                         rel_err(difference_form(q, k, v, do, a, C, True), ref),
                         rel_err(crossing_form(q, k, v, do, a, C), ref),
                         rel_err(crossing_form(q, k, v, do, a, C, True), ref),
                         *(rel_err(kernel_difference_form(q, k, v, do, a, C, st), ref)
                           for st in ("bf16", "split", "fp16")),
                         *(rel_err(anchored_form(q, k, v, do, a, C, g), ref)
                           for g in ANCHOR_GROUPS),
                         *(rel_err(anchored_form(q, k, v, do, a, C, 4, p), ref)
                           for p in PRODUCTS)])
        e = np.max(errs, axis=0)
        print(f"{name:<10}" + "".join(f"{x:>13.2e}" for x in e))


if __name__ == "__main__":
    main()
