"""Pallas forward kernels of chunked linear attention: the segment summary and the outputs.

Notation of DESIGN.md §1: S_t = diag(a_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t, with
a_t = exp(g_t). The segment of one (batch, head) is cut into chunks of C tokens, and the chunks
into ``num_segments`` segments of K chunks: LASP-2 applied across the programs of one device.

Decays enter every kernel in the same chunk-local form (built by
:mod:`lasp2_jax.kernels.pallas_scans`): ``bf`` is the inclusive cumulative sum of the finite log
decays from the chunk start and ``cnt`` counts the resets (g < RESET_LOG_DECAY, where exp(g)
is 0 in float32) from the chunk start. All decays are then referred to the chunk's own
boundaries, so every exponent is <= 0, and a reset zeroes exactly the products that cross it
(the count differs) without forming inf - inf:

    q side  exp(b_i)         = [cnt_i == 0]        exp(bf_i)            (chunk start -> i)
    k side  exp(b_C - b_j)   = [cnt_j == cnt_C]    exp(bf_C - bf_j)     (j -> chunk end)
    chunk   exp(b_C)         = [cnt_C == 0]        exp(bf_C)
    pair    exp(b_i - b_j)   = [cnt_i == cnt_j]    exp(bf_i - bf_j)     (j <= i)

These kernels are the forward of the custom VJP in :mod:`lasp2_jax.kernels.pallas`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lasp2_jax import compat

_f32 = jnp.float32

# Decay forms inside the kernels.
NONE, SCALAR, PER_DIM = "none", "scalar", "per_dim"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the forward kernels.

    chunk: C, tokens per chunk (a power of two >= 16).
    block_v: Dv columns per program (the state tile is [Dk, block_v]).
    dim_slice: Dk columns per step of the per-dimension-decay pairwise product ([C, C, slice]).
    min_programs: split the sequence into segments until (batch*heads) * segments * (Dv blocks)
      reaches this many programs (LASP-2 inside the device).
    num_warps, num_stages: Triton launch parameters.
    """

    chunk: int = 64
    block_v: int = 64
    dim_slice: int = 32
    min_programs: int = 132
    num_warps: int = 4
    num_stages: int = 2


def mm(a, b, *, ta: bool = False, tb: bool = False):
    """a @ b with either operand transposed, accumulated in float32.

    Float32 operands are not multiplied in plain TF32, Triton's default on the GPU: the decay
    gradient is a difference of sums whose pair terms must round alike on both sides, and
    TF32's 10-bit operands took its error on an H100 to 1.4e-3 (the bar for float32 inputs is
    1e-3). On the GPU they take three TF32 products (about float32's precision, still on the
    tensor cores; Triton's float32 FMA path spilled so much that a launch ran out of memory),
    in interpret mode float32 itself. bf16 operands are unaffected."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    precision = None
    if a.dtype == _f32:
        precision = (lax.Precision.HIGHEST if compat.pallas_interpret()
                     else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_f32)


# The log-decay gradient is a difference of q*dq and k*dk sums (pallas_backward): the pair
# terms cancel, and what is left has a bf16 rounding error amplified by the cancellation,
# unless the float32 intermediates that the dq, dk and summary kernels feed to their matmuls
# (states, decayed q / k) keep more than bf16's 8 bits. With a decay they enter
# as a bf16 pair hi + lo (hi = bf16(x), lo = bf16(x - hi)): ~16 bits, for a second matmul.
# "dscores" (dP * W) would take the error from ~1e-3 to ~1e-5 at two more matmuls.
DG_SPLIT = frozenset({"state", "qk_decay"})


# The forms whose log-decay gradient is instead summed over the pairs that cross each position
# (pallas_backward): no cancellation, so no operand needs the split (bf16 error ~2e-3 in
# benchmarks/dg_precision_study.py, 2.4e-3 on an H100). Read when a kernel is traced. Only the
# scalar form can take it ({SCALAR}); it was its default from v6 to v9. In v10 the scalar
# difference form (SCALAR_DG_SPLIT) was faster: on an H100 at B=1 T=16K H=16 D=128, simple GLA's
# forward+backward took 0.902 ms against 0.992 ms crossing, with the bf16 decay gradient at
# 1.7e-3 (5.1e-3 under strong decays) against 2.4e-3 (benchmarks/NOTES_kernels.md, v10). Since
# v11 the anchored form below is the default.
CROSSING_DG_MODES = frozenset()


# A scalar decay's difference form over the whole sequence (the default in v10, now taken only
# where ANCHORED_DG_MODES leaves the scalar form out) splits only the carried states: its
# decayed q and k enter the state matmuls rounded once, and the decay gradient takes the same
# rounded operands (pallas_backward._difference_side), so their pair terms cancel exactly.
SCALAR_DG_SPLIT = frozenset({"state"})


# The forms whose log-decay gradient is anchored (pallas_backward): the difference form summed
# only inside groups of DG_ANCHOR_CHUNKS chunks, each group starting from the exact sum over
# the pairs that cross its first position, <S, dS> of the state entering it (stored by the dq
# kernel) and its cotangent (dk kernel). Rounding errors then add up over one group, not the
# sequence, so no operand needs the split. Read when a kernel is traced; crossing wins where a
# form is in both. `python benchmarks/dg_precision_study.py --tokens 8192 --dim 128 --trials 2`
# (bf16, chunks of 64): groups of 1, 2, 4 and 8 chunks at most 2.1e-3, 2.7e-3, 3.6e-3 and
# 5.7e-3, the split 1.9e-3. On an H100 at B=1 T=16K H=16 D=128, simple GLA's forward+backward
# took 0.953, 0.872, 0.843 and 0.832 ms, the split difference form 0.887
# (benchmarks/NOTES_kernels.md, v11); 4 keeps the error well below the bf16 bar of 1e-2.
# GLA's prescaled kernels anchor with the same group size (pallas_prescaled.ANCHORED_DG); the
# exact per-dimension kernels keep the split.
ANCHORED_DG_MODES = frozenset({SCALAR})
DG_ANCHOR_CHUNKS = 4

# The anchored form's per-token products q . dq and k . dk: True, x times the float32
# gradient the kernel has just formed (the default since v13); False, as the difference form
# must, from the decayed operands rounded as the state matmuls rounded them
# (pallas_backward._difference_side), so that pair terms cancel exactly over the whole
# sequence, which a group of chunks does not need. A scalar decay's float32 inputs keep the
# latter, which leaves the diagonal pair out. On an H100 at B=1 T=16K H=16 D=128, simple GLA's
# forward+backward took 0.785 against 0.852 ms (a second run: 0.806 against 0.839), with the
# bf16 decay gradient at most 4.3e-3 against 3.1e-3 from the oracle
# (benchmarks/NOTES_kernels.md, v13). Read when a kernel is traced.
DG_DIRECT_PRODUCTS = True


def dg_split(mode: str, decay_grad: bool) -> frozenset:
    """The operands that enter a matmul in two bf16 parts for the log-decay gradient."""
    if (mode == NONE or not decay_grad or mode in CROSSING_DG_MODES
            or mode in ANCHORED_DG_MODES):
        return frozenset()
    return SCALAR_DG_SPLIT if mode == SCALAR else DG_SPLIT


def lowp(x, dtype, name: str, split: frozenset = frozenset()):
    """x (float32) as a matmul operand of `dtype`: rounded, or split into (hi, lo)."""
    if name not in split or jnp.dtype(dtype) == jnp.dtype(_f32):
        return x.astype(dtype)
    hi = x.astype(dtype)
    return hi, (x - hi.astype(_f32)).astype(dtype)


def mmx(a, b, *, ta: bool = False, tb: bool = False):
    """mm where either operand may be a (hi, lo) pair from :func:`lowp` (lo * lo dropped)."""
    if isinstance(a, tuple):
        return mmx(a[0], b, ta=ta, tb=tb) + mmx(a[1], b if not isinstance(b, tuple) else b[0],
                                                 ta=ta, tb=tb)
    if isinstance(b, tuple):
        return mm(a, b[0], ta=ta, tb=tb) + mm(a, b[1], ta=ta, tb=tb)
    return mm(a, b, ta=ta, tb=tb)


def pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n and >= minimum: Triton's block sizes must be powers of
    two (and a dot needs 16 along each dimension)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two that divides n and is at most at_most (1 at least)."""
    p = 1
    while 2 * p <= at_most and n % (2 * p) == 0:
        p *= 2
    return p


def causal_mask(c: int):
    i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return i >= j


def document_pairs(cnt, c: int):
    """[C, C] bool: the causal pairs (j <= i) of one document, from the chunk's reset counts
    cnt [C] (equal counts: no reset between the two tokens)."""
    return causal_mask(c) & (cnt[:, None] == cnt[None, :])


def chunk_factors(bf_ref, cnt_ref, sl, before=None):
    """Per-dimension decay: the q-side, k-side and whole-chunk decay factors of the span ``sl``
    (table in the module docstring; the scalar form's are :func:`scalar_factors`).

    bf_ref, cnt_ref: [L, Dk] refs; before: the row just before the span (a sub-chunk of the
    exact path), None at a chunk start, where the tables are 0.
    Returns fq, fk [span, Dk] and fa [Dk]. The span's b_C and reset count are its last row (bf
    falls and cnt rises along a chunk), loaded rather than reduced over the span's rows.
    """
    bf, cnt = bf_ref[sl, :], cnt_ref[sl, :]
    end = last_row(sl)
    last, clast = bf_ref[end, :], cnt_ref[end, :]
    bf0, cnt0 = (0.0, 0.0) if before is None else (bf_ref[before, :], cnt_ref[before, :])
    fq = jnp.where(cnt == cnt0, jnp.exp(jnp.minimum(bf - bf0, 0.0)), 0.0)
    fk = jnp.where(cnt == clast, jnp.exp(jnp.minimum(last - bf, 0.0)), 0.0)
    fa = jnp.where(clast == cnt0, jnp.exp(jnp.minimum(last - bf0, 0.0)), 0.0)
    return fq, fk, fa


def last_row(sl):
    """The index of the last row of the span ``sl``."""
    return sl.start + sl.size - 1


def chunk_end(sl):
    """The chunk's last position as a slice of one: a scalar decay's b_C and reset count are
    the last entries of bf and cnt (bf falls and cnt rises along the chunk), loaded instead of
    reduced (a reduction across the program's threads in every step of the chunk loop)."""
    return pl.ds(last_row(sl), 1)


def pair_weights(bf_ref, cnt_ref, sl, c: int, factorised: bool = False):
    """[C, C] causal decay weights exp(b_i - b_j) for j <= i (scalar decay); 0 across resets.

    factorised: the chunk has no reset and b_C >= FACTOR_LOG_DECAY (see :func:`chunk_loop`):
    exp(b_i - r) * exp(r - b_j) with r = b_C / 2 keeps both factors within exp(+-40), so the
    [C, C] table costs two [C] exponentials instead of C * C, and cnt is not read.
    """
    bf = bf_ref[sl]
    if factorised:
        ref = 0.5 * bf_ref[chunk_end(sl)]
        w = jnp.exp(bf - ref)[:, None] * jnp.exp(ref - bf)[None, :]
        return jnp.where(causal_mask(c), w, 0.0)
    cnt = cnt_ref[sl]
    keep = document_pairs(cnt, c)
    return jnp.where(keep, jnp.exp(jnp.minimum(bf[:, None] - bf[None, :], 0.0)), 0.0)


def scalar_factors(bf_ref, cnt_ref, sl, factorised: bool = False):
    """Scalar decay: the q-side and k-side factors [C, 1] and the chunk's factor [1] (table in
    the module docstring). factorised: no reset in the segment (:func:`chunk_loop`), so cnt is
    all zero and is not read."""
    bf, end = bf_ref[sl], chunk_end(sl)
    last = bf_ref[end]
    if factorised:
        return jnp.exp(bf)[:, None], jnp.exp(last - bf)[:, None], jnp.exp(last)
    cnt, clast = cnt_ref[sl], cnt_ref[end]
    fq = jnp.where(cnt == 0.0, jnp.exp(jnp.minimum(bf, 0.0)), 0.0)
    fk = jnp.where(cnt == clast, jnp.exp(jnp.minimum(last - bf, 0.0)), 0.0)
    fa = jnp.where(clast == 0.0, jnp.exp(jnp.minimum(last, 0.0)), 0.0)
    return fq[:, None], fk[:, None], fa


def pair_weights_dim(bf, cnt, c: int):
    """[C, C, D] weights exp(b_i[d] - b_j[d]) for j <= i (per-dimension decay)."""
    keep = causal_mask(c)[:, :, None] & (cnt[:, None, :] == cnt[None, :, :])
    return jnp.where(keep, jnp.exp(jnp.minimum(bf[:, None, :] - bf[None, :, :], 0.0)), 0.0)


def intra_scores(q_ref, k_ref, bf_ref, cnt_ref, sl, *, mode: str, c: int, dk: int,
                 dim_slice: int, q=None, k=None, factorised: bool = False):
    """A = (q k^T) masked and decayed inside one chunk, [C, C] float32 (the intra-chunk term)."""
    if mode == PER_DIM:
        # A_ij = sum_d q_id k_jd exp(b_id - b_jd): no factorisation through one matmul keeps
        # every exponent <= 0, so it is a [C, C, slice] product, a Dk slice at a time.
        a = jnp.zeros((c, c), _f32)
        for d0 in range(0, dk, dim_slice):
            ds = pl.ds(d0, dim_slice)
            qs = q_ref[sl, ds].astype(_f32)
            ks = k_ref[sl, ds].astype(_f32)
            w = pair_weights_dim(bf_ref[sl, ds], cnt_ref[sl, ds], c)
            a = a + jnp.sum(qs[:, None, :] * ks[None, :, :] * w, axis=2)
        return a
    a = mm(q_ref[sl, :] if q is None else q, k_ref[sl, :] if k is None else k, tb=True)
    if mode == SCALAR:
        return a * pair_weights(bf_ref, cnt_ref, sl, c, factorised)
    return jnp.where(causal_mask(c), a, 0.0)


def load_factors(bf_ref, cnt_ref, sl, mode: str, before=None, factorised: bool = False):
    """(fq, fk, fa) broadcastable against [C, Dk] tiles and [Dk, *] states; None if no decay.

    before: the row just before a sub-chunk (per-dimension exact path), None at a chunk start.
    factorised: a scalar decay's segment without resets (:func:`scalar_factors`).
    """
    if mode == NONE:
        return None
    if mode == SCALAR:
        return scalar_factors(bf_ref, cnt_ref, sl, factorised)
    fq, fk, fa = chunk_factors(bf_ref, cnt_ref, sl, before)
    return fq, fk, fa[:, None]


# A per-dimension decay takes, chunk by chunk, one of two paths. Fast: with no reset in the
# chunk and every chunk-local log decay above SAFE_LOG_DECAY, A = (q exp(b)) (k exp(-b))^T is
# one matmul: the factor exp(-b) <= exp(-SAFE_LOG_DECAY) stays finite and each product is still
# exp(b_i - b_j) <= 1 for j <= i. Exact: otherwise every exponent is <= 0 and a reset is an
# exact zero, on sub-chunks of SUB_CHUNK tokens with a [SUB, SUB, slice] product. (A scalar
# decay picks its pair weights once per program instead: see chunk_loop.)
SAFE_LOG_DECAY = -40.0
SUB_CHUNK = 16
# The forms that take the per-chunk fast path (read when a kernel is traced; empty: always
# exact). On an H100 it halved the per-dimension forward (1.53 ms against 2.98 ms at B=1
# T=16K H=16 D=128); for the scalar form the per-chunk branch made it 2x slower.
FAST_PATH_MODES = frozenset({PER_DIM})


def fast_path_ok(bf_ref, cnt_ref, sl):
    """Per-dimension decay: no reset in the chunk and every log decay above SAFE_LOG_DECAY."""
    bf, cnt = bf_ref[sl, :], cnt_ref[sl, :]
    no_reset = jnp.max(jnp.max(cnt, axis=1), axis=0) == 0.0
    return no_reset & (jnp.min(jnp.min(bf, axis=1), axis=0) > SAFE_LOG_DECAY)


def fast_factors(bf_ref, sl):
    """Per-dimension decay, a chunk without resets: exp(b), exp(-b) and the k-side factor
    exp(b_C - b) as [C, Dk] tiles, and the chunk factor exp(b_C) as [Dk, 1]."""
    bf, last = bf_ref[sl, :], bf_ref[last_row(sl), :]  # b_C: the last row (chunk_factors)
    return (jnp.exp(bf), jnp.exp(-bf), jnp.exp(jnp.minimum(last[None, :] - bf, 0.0)),
            jnp.exp(last)[:, None])


def run_chunk(step, load, ci, carry, *, c: int, mode: str, bf_ref, cnt_ref,
              reverse: bool = False, factorised: bool = False):
    """Apply step(sl, c, carry, before, fast, tiles) -> carry to chunk ci.

    load(sl) reads the chunk's input tiles ahead of any branch (so that the loads can be
    pipelined). Scalar decay: ``fast`` is the program's choice of ``factorised`` pair weights
    (:func:`chunk_loop`). Per-dimension decay: the fast step where the whole segment allows it
    (``factorised``), else chunk by chunk the fast step when fast_path_ok and otherwise the
    exact step on each sub-chunk, which reads its own tiles (in reverse order for the backward).
    """
    start = pl.multiple_of(ci * c, c)
    sl = pl.ds(start, c)
    tiles = load(sl)
    if mode == NONE:
        return step(sl, c, carry, None, False, tiles)
    if mode == SCALAR:
        return step(sl, c, carry, None, factorised, tiles)

    def exact(carry):
        subs = range(c // SUB_CHUNK)
        for r in (reversed(subs) if reverse else subs):
            sub = pl.ds(start + r * SUB_CHUNK, SUB_CHUNK)
            carry = step(sub, SUB_CHUNK, carry, None if r == 0 else start + r * SUB_CHUNK - 1,
                         False, load(sub))
        return carry

    if mode not in FAST_PATH_MODES:
        return exact(carry)
    if factorised:
        return step(sl, c, carry, None, True, tiles)
    return lax.cond(fast_path_ok(bf_ref, cnt_ref, sl),
                    lambda carry: step(sl, c, carry, None, True, tiles), exact, carry)


# A program whose segment has no reset and no chunk with b_C below this takes the factorised
# pair weights of a scalar decay (pair_weights): its factors stay within exp(+-40). (A
# per-dimension decay's segment takes the fast path throughout where no reset and every chunk
# has b_C > SAFE_LOG_DECAY in every dimension.)
FACTOR_LOG_DECAY = -80.0

# For measurements only: "factorised" or "exact" compiles that one of chunk_loop's two loops
# and runs it whatever a segment's flag says, so results are right only where every segment
# takes it (the benchmarks' inputs take the factorised one). None: both loops, the default.
# Read when a kernel is traced.
ONE_LOOP = None


def chunk_loop(n_chunks: int, body, init, *, mode: str, fast_ref):
    """lax.fori_loop over the chunks of body(i, carry, factorised) -> carry.

    With a decay the program reads its segment's flag in ``fast_ref`` ([S] int32, 1 where the
    scalar pair weights may be factorised, or where every chunk may take the per-dimension fast
    path) once and runs one of two loops. The branch sits outside the loop: on an H100 a branch
    inside the chunk loop made the scalar forms 2x slower (benchmarks/NOTES_kernels.md, v3).
    """
    def loop(factorised):
        return lambda carry: lax.fori_loop(
            0, n_chunks, functools.partial(body, factorised=factorised), carry)

    if mode == NONE or (mode == PER_DIM and mode not in FAST_PATH_MODES):
        return loop(False)(init)
    if ONE_LOOP is not None:
        return loop(ONE_LOOP == "factorised")(init)
    flags = fast_ref[...]
    mine = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, flags.shape, 0)
                             == pl.program_id(1), flags, 0))
    return lax.cond(mine != 0, loop(True), loop(False), init)


def _scaled(x, f, split: frozenset = frozenset()):
    return x if f is None else lowp(x.astype(_f32) * f, x.dtype, "qk_decay", split)


def decayed_mm(x, f, y, mode: str):
    """(diag(f) x) y for the chunk's q-side factor f. A scalar decay's factor is one number per
    row ([C, 1]): it scales the [C, block] product instead of the [C, Dk] operand (half the
    work at Dk = 2 * block, and no bf16 rounding of the decayed operand)."""
    if mode == SCALAR:
        return f * mm(x, y)
    return mm(_scaled(x, f), y)


def decayed_tmm(x, f, y, mode: str, split: frozenset = frozenset()):
    """(diag(f) x)^T y for the chunk's k-side factor f; with a scalar decay (and no decay
    gradient in the difference form, which needs diag(f) x as pallas_backward rounds it) the
    factor scales y's [C, block] rows instead of x's [C, Dk]."""
    if mode == SCALAR and not split:
        return mm(x, _scaled(y, f), ta=True)
    return mmx(_scaled(x, f, split), y, ta=True)


def chunk_scores(q, k, q_ref, k_ref, bf_ref, cnt_ref, sl, cc, before, fast, *, mode: str,
                 dk: int, dim_slice: int):
    """One chunk's masked decayed scores A [C, C] = (q k^T) * exp(b_i - b_j) * [j <= i], and
    the factors (fq, fk, fa) that carry the state across it (None, None, 1.0: no decay).

    ``fast``: per-dimension decay, factorise it as (q exp(b)) (k exp(-b))^T, one matmul;
    scalar decay, factorised pair weights; otherwise the exact path of :func:`intra_scores`.
    """
    if fast and mode == PER_DIM:
        e, einv, fk, fa = fast_factors(bf_ref, sl)
        a = jnp.where(causal_mask(cc), mm(_scaled(q, e), _scaled(k, einv), tb=True), 0.0)
        return a, e, fk, fa
    a = intra_scores(q_ref, k_ref, bf_ref, cnt_ref, sl, mode=mode, c=cc, dk=dk,
                     dim_slice=dim_slice, q=q, k=k, factorised=fast)
    f = load_factors(bf_ref, cnt_ref, sl, mode, before, fast)
    return (a, None, None, 1.0) if f is None else (a, *f)


# --------------------------------------------------------------------------------------------
# Segment summary: M = sum over the segment of (x * f)^T y, chunk by chunk.


def _summary_kernel(x_ref, y_ref, bf_ref, cnt_ref, fast_ref, m_ref, *, c: int, n_chunks: int,
                    mode: str, reverse: bool, side: str, scale: float, split: frozenset):
    """One (batch*head, segment, column block) program.

    Forward (side "k", chunks in order): the segment's state from zero,
        M = sum_j diag(exp(b_L - b_j)) k_j^T v_j,  by  S <- diag(a_chunk) S + (k * fk)^T v.
    Backward (side "q", chunks in reverse): the gradient its outputs send to the state entering
    the segment, dM = scale * sum_i (q_i exp(b_i))^T dO_i,  by  dS <- diag(a_chunk) dS
    + scale (q * fq)^T dO. Both are LASP-2's step 1 (DESIGN.md §1) on a segment of one device.
    A segment without resets (its flag in ``fast_ref``, see :func:`chunk_loop`) reads no reset
    counts: its factors need no mask.
    """

    def body(i, acc, factorised):
        ci = n_chunks - 1 - i if reverse else i
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        x, y = x_ref[sl, :], y_ref[sl, :]
        if mode == NONE:
            return acc + scale * mm(x, y, ta=True)
        if mode == PER_DIM and factorised:
            fq, _, fk, fa = fast_factors(bf_ref, sl)
        else:
            fq, fk, fa = load_factors(bf_ref, cnt_ref, sl, mode, factorised=factorised)
        return fa * acc + scale * decayed_tmm(x, fq if side == "q" else fk, y, mode, split)

    m_ref[...] = chunk_loop(n_chunks, body, jnp.zeros(m_ref.shape, _f32), mode=mode,
                            fast_ref=fast_ref)


# Whether a scalar decay's difference-form summaries take Dk blocks (see segment_summary).
SUMMARY_ROW_BLOCKS = True


def segment_summary(x, y, bf, cnt, fast, *, mode: str, num_segments: int, heads: int,
                    block_sizes: BlockSizes, reverse: bool, side: str, scale: float,
                    decay_grad: bool = True):
    """Per-segment summaries [B, H, S, Dk, Dv] float32 (see :func:`_summary_kernel`).

    x [B, T, H, Dk]; y [B, T, H, Dv]; bf, cnt [B, H, T] or [B, T, H, Dk] and the per-segment
    flags fast [B, H, S] of :func:`chunk_loop` (all None without decay).
    T, Dk, Dv already padded: T = S * K * C, Dk and Dv powers of two. decay_grad: the log-decay
    gradient will be taken (decayed operands enter as dg_split says).
    """
    B, T, H, dk = x.shape
    dv = y.shape[-1]
    c, S = block_sizes.chunk, num_segments
    L = T // S
    split = dg_split(mode, decay_grad)
    # Each program owns a [Dk, block_v] tile of M and so reads all of x; but where x's rows are
    # scaled before the matmul (a scalar decay's difference form, see decayed_tmm) it owns a
    # [block_v, Dv] tile instead, so that it scales [C, block_v] and not [C, Dk].
    rows = mode == SCALAR and bool(split) and SUMMARY_ROW_BLOCKS
    bx, by = (min(block_sizes.block_v, dk), dv) if rows else (dk, min(block_sizes.block_v, dv))
    grid = (B * H, S, (dk // bx) * (dv // by))
    def seq(d, blocked):
        return pl.BlockSpec((None, L, None, d), lambda bh, s, j: (bh // H, s, bh % H,
                                                                  j if blocked else 0))
    in_specs = [seq(bx, rows), seq(by, not rows)]
    dargs, dspecs = decay_operands(bf, cnt, L, H, dk, fast)
    args = [x, y, *dargs]
    in_specs += dspecs
    kernel = functools.partial(_summary_kernel, c=c, n_chunks=L // c, mode=mode,
                               reverse=reverse, side=side, scale=scale, split=split)
    kernel = with_decay_refs(kernel, 2, bf is not None)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, bx, by),
                               lambda bh, s, j: (bh // H, bh % H, s, j if rows else 0,
                                                 0 if rows else j)),
        out_shape=jax.ShapeDtypeStruct((B, H, S, dk, dv), _f32),
        compiler_params=compat.triton_compiler_params(block_sizes.num_warps,
                                                      block_sizes.num_stages),
        interpret=compat.pallas_interpret(),
        name="lasp2_segment_summary_bwd" if reverse else "lasp2_segment_summary",
    )(*args)


def absent_refs(kernel, count: int, position: int | None = None):
    """Pass ``count`` None refs at ``position`` (default: after all others) for operands or
    outputs that the pallas_call leaves out."""
    if count == 0:
        return kernel

    def wrapped(*refs):
        at = len(refs) if position is None else position
        return kernel(*refs[:at], *([None] * count), *refs[at:])

    return wrapped


def with_decay_refs(kernel, position: int, has_decay: bool):
    """Without decay the pallas_call gets no (bf, cnt, fast) operands: pass None refs in
    their place."""
    return absent_refs(kernel, 0 if has_decay else 3, position)


def decay_operands(bf, cnt, L: int, H: int, dk: int, fast=None):
    """(operands, BlockSpecs) of the chunk-local decays bf, cnt ([B, H, T] scalar or
    [B, T, H, Dk]) and of the per-segment flags fast [B, H, S] of :func:`chunk_loop`, when
    given; empty without decay."""
    if bf is None:
        return [], []
    if bf.ndim == 3:  # scalar decay, head-major [B, H, T]
        spec = pl.BlockSpec((None, None, L), lambda bh, s, j: (bh // H, bh % H, s))
    else:
        spec = pl.BlockSpec((None, L, None, dk), lambda bh, s, j: (bh // H, s, bh % H, 0))
    if fast is None:
        return [bf, cnt], [spec, spec]
    flag_spec = pl.BlockSpec((None, None, fast.shape[-1]), lambda bh, s, j: (bh // H, bh % H, 0))
    return [bf, cnt, fast], [spec, spec, flag_spec]


def segment_entry_state(s0_ref, m_ref, a_ref, reverse: bool = False):
    """LASP-2 step 4 across the programs of a device, done by each program for itself.

    Forward: the state entering segment s, folding (A_u, M_u) for u < s onto the initial state
    with S <- diag(A_u) S + M_u. Reverse (backward): the cotangent of the state leaving segment
    s, folding (A_u, dM_u) for u > s from the last segment down onto dS_T. The summaries are a
    few [Dk, Dv] tiles per head, read from L2: cheaper than a separate scan launch.
    m_ref [S, rows, cols], a_ref [S, rows], s0_ref [rows, cols].
    """
    # The segment count from the summaries' block, not pl.num_programs(1): on the GPU a kernel
    # reused for another grid in the same process read the first grid's num_programs
    # (benchmarks/check_reverse_sums.py).
    s, n_seg = pl.program_id(1), m_ref.shape[0]

    def body(i, st):
        u = n_seg - 1 - i if reverse else i
        return a_ref[u, :][:, None] * st + m_ref[u, :, :]

    steps = n_seg - 1 - s if reverse else s
    return lax.fori_loop(0, steps, body, s0_ref[...])


def summary_specs(H: int, S: int, rows: int, cols: int, row_block: bool):
    """BlockSpecs of (s0 or dS_T [B,H,Dk,Dv], summaries [B,H,S,Dk,Dv], decays [B,H,S,Dk]) for a
    program that owns a [rows, cols] tile: rows are a Dk block (row_block) or all of Dk."""
    if row_block:
        return [pl.BlockSpec((None, None, rows, cols), lambda bh, s, j: (bh // H, bh % H, j, 0)),
                pl.BlockSpec((None, None, S, rows, cols),
                             lambda bh, s, j: (bh // H, bh % H, 0, j, 0)),
                pl.BlockSpec((None, None, S, rows), lambda bh, s, j: (bh // H, bh % H, 0, j))]
    return [pl.BlockSpec((None, None, rows, cols), lambda bh, s, j: (bh // H, bh % H, 0, j)),
            pl.BlockSpec((None, None, S, rows, cols), lambda bh, s, j: (bh // H, bh % H, 0, 0, j)),
            pl.BlockSpec((None, None, S, rows), lambda bh, s, j: (bh // H, bh % H, 0, 0))]


# --------------------------------------------------------------------------------------------
# Outputs: o = scale * (A v + (q * fq) S_in), chunk by chunk, from each segment's incoming state.


def _forward_kernel(q_ref, k_ref, v_ref, bf_ref, cnt_ref, fast_ref, s0_ref, m_ref, a_ref, o_ref,
                    final_ref, *, c: int, n_chunks: int, mode: str, scale: float, dk: int,
                    dim_slice: int, n_seg: int, decay_grad: bool):
    """One (batch*head, segment, Dv block) program: LASP-2 steps 3 and 5 on one segment.

    With S the state entering chunk n (from the segment's incoming state):
        o_chunk = scale * (A v + diag(exp(b)) q S),   A = (q k^T) * exp(b_i - b_j) * [j <= i]
        S      <- diag(exp(b_C)) S + (diag(exp(b_C - b_j)) k)^T v.
    """
    # The final state feeds the log-decay gradient: with one segment it comes from this
    # recurrence, which then takes the decayed k as dg_split says.
    split = dg_split(mode, decay_grad) if n_seg == 1 else frozenset()

    def load(sl):
        return q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]

    def step(sl, cc, state, before, fast, tiles):
        q, k, v = tiles
        a, fq, fk, fa = chunk_scores(q, k, q_ref, k_ref, bf_ref, cnt_ref, sl, cc, before, fast,
                                     mode=mode, dk=dk, dim_slice=dim_slice)
        o = mm(a.astype(v.dtype), v) + decayed_mm(q, fq, state.astype(q.dtype), mode)
        o_ref[sl, :] = (scale * o).astype(o_ref.dtype)
        return fa * state + decayed_tmm(k, fk, v, mode, split)

    def body(ci, state, factorised):
        return run_chunk(step, load, ci, state, c=c, mode=mode, bf_ref=bf_ref, cnt_ref=cnt_ref,
                         factorised=factorised)

    entry = segment_entry_state(s0_ref, m_ref, a_ref)
    state = chunk_loop(n_chunks, body, entry, mode=mode, fast_ref=fast_ref)

    if n_seg == 1:  # with several segments the caller folds the final state (forward_outputs)
        final_ref[...] = state


def forward_outputs(q, k, v, bf, cnt, fast, s0, m, a, *, mode: str, scale: float,
                    block_sizes: BlockSizes, out_dtype, decay_grad: bool = True):
    """Outputs [B, T, H, Dv] and the final state [B, H, Dk, Dv] (float32).

    s0 [B, H, Dk, Dv] the initial state; m [B, H, S, Dk, Dv] the segment summaries and
    a [B, H, S, Dk] the segment decays: each program folds them into its incoming state.
    fast [B, H, S] int32: the segments that take the fast path throughout (chunk_loop).
    """
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    S = m.shape[2]
    c, L = block_sizes.chunk, T // S
    bv = min(block_sizes.block_v, dv)
    grid = (B * H, S, dv // bv)
    full = pl.BlockSpec((None, L, None, dk), lambda bh, s, j: (bh // H, s, bh % H, 0))
    vcol = pl.BlockSpec((None, L, None, bv), lambda bh, s, j: (bh // H, s, bh % H, j))
    dargs, dspecs = decay_operands(bf, cnt, L, H, dk, fast)
    in_specs = [full, full, vcol, *dspecs, *summary_specs(H, S, dk, bv, row_block=False)]
    kernel = functools.partial(_forward_kernel, c=c, n_chunks=L // c, mode=mode, scale=scale,
                               dk=dk, dim_slice=min(block_sizes.dim_slice, dk), n_seg=S,
                               decay_grad=decay_grad)
    kernel = with_decay_refs(kernel, 3, bf is not None)
    o, final = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[vcol, pl.BlockSpec((None, None, dk, bv),
                                      lambda bh, s, j: (bh // H, bh % H, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, dv), out_dtype),
                   jax.ShapeDtypeStruct((B, H, dk, dv), _f32)],
        compiler_params=compat.triton_compiler_params(block_sizes.num_warps,
                                                      block_sizes.num_stages),
        interpret=compat.pallas_interpret(),
        name="lasp2_chunk_attention_fwd",
    )(q, k, v, *dargs, s0, m, a)
    if S > 1:
        # Outside the kernel: the final state then waits for the summaries only, not for the
        # outputs (LASP-2 gathers it as the rank's summary while the output kernel runs).
        final = fold_summaries(s0, a, m)
    return o, final


def fold_summaries(state, a, m, reverse: bool = False):
    """The state after every segment, from ``state`` [B, H, Dk, Dv] entering the first:
    S <- diag(A_s) S + M_s over a [B, H, S, Dk] and m [B, H, S, Dk, Dv].

    reverse: the backward's fold, from the last segment to the first. With ``state`` the
    cotangent of the state leaving the last segment and m the backward summaries, the result
    is the cotangent of the state entering the first."""
    order = range(m.shape[2] - 1, -1, -1) if reverse else range(m.shape[2])
    for s in order:
        state = a[:, :, s, :, None] * state + m[:, :, s]
    return state
