"""The full scan of several queries per pass over the codes: one SIMD lane per query.

A group of ``lanes`` queries (4, 8 or 16) shares one interleaved lookup table, float32
(L * K * lanes,): entry (level, code) holds the group's terms side by side. Each item's
codes are read once for the whole group; per level one vector load fetches every query's
term, and one vector compare tests every lane's sum against its list's worst score. Lanes
add in IEEE single precision in the scalar kernels' order (level 0 to L-1, then the norm),
so each lane's score is bit for bit :func:`dpq.index.kernels.scan_kernel`'s; the rare item
that beats a lane's worst is pushed, with the lane's sum, into that query's list.

The vector code is an LLVM intrinsic (numba.extending.intrinsic): numba does not vectorise
a loop across queries by itself (it cannot prove the arrays do not alias). numpy, numba and
llvmlite only (no torch).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from dpq.index import kernels

__all__ = ["LANE_WIDTHS", "lane_scan_kernel", "lane_sums_below", "lanes_for", "scan_rows"]

# Group sizes compiled; the widest is the group a long batch is cut into. 16 float32 lanes
# are one AVX-512 register or two AVX2 ones. On Zen 4 the 16-lane table (64 KiB at L=4,
# K=256, twice L1) still beats 8 lanes, and 32 lanes gain little more (docs/RESULTS.md,
# "Scan profile").
LANE_WIDTHS = (4, 8, 16)


def lanes_for(queries: int) -> int:
    """The narrowest lane width that holds ``queries`` (>= 1) queries, at most the widest."""
    return next((w for w in LANE_WIDTHS if w >= queries), LANE_WIDTHS[-1])


def _literal(value: types.Type) -> int | bool | None:
    """The value of a compile-time constant argument, None when it is not one."""
    return value.literal_value if isinstance(value, types.Literal) else None


@intrinsic(prefer_literal=True)
def lane_sums_below(
    typingctx, table, codes, row, codebook_size, norm, worst, sums, num_levels, stride, lanes,
    with_norm,
):  # fmt: skip
    """``lane_sums_below(table, codes, row, codebook_size, norm, worst, sums, num_levels,
    stride, lanes, with_norm) -> int64``: writes every lane's score of ``row`` into sums
    float32 (lanes,) and returns a bit mask, bit j set when sums[j] < worst[j] (float32
    (lanes,)).

    Lane j's score is ``sum_l table[(l * codebook_size + code_l) * lanes + j]`` (+ norm when
    ``with_norm``), added left to right in float32 (one vector add per level). codes:
    packed uint32 (N * stride,) words of four uint8 codes (little-endian), or rows
    (N, >= num_levels) of uint8/uint16 codes. num_levels, stride, lanes and with_norm must
    be compile-time constants (a kernel's closure variables).
    """
    constants = [_literal(c) for c in (num_levels, stride, lanes, with_norm)]
    if any(c is None for c in constants):
        return None
    levels_n, stride_n, lanes_n, add_norm = constants
    packed = codes.ndim == 1
    signature = types.int64(
        table, codes, row, codebook_size, norm, worst, sums, num_levels, stride, lanes, with_norm
    )

    def codegen(context, builder, sig, args):
        table_v, codes_v, row_v, size_v, norm_v, worst_v, sums_v = args[:7]
        i64 = ir.IntType(64)
        vector = ir.VectorType(ir.FloatType(), lanes_n)
        row_i = context.cast(builder, row_v, sig.args[2], types.int64)
        size_i = context.cast(builder, size_v, sig.args[3], types.int64)
        code_array = context.make_array(sig.args[1])(context, builder, codes_v)

        def data(position: int, value: ir.Value) -> ir.Value:
            return context.make_array(sig.args[position])(context, builder, value).data

        def code_of(level: int) -> ir.Value:
            if packed:
                index = [builder.add(builder.mul(row_i, i64(stride_n)), i64(level // 4))]
            else:
                index = [row_i, i64(level)]
            word = builder.load(
                cgutils.get_item_pointer(context, builder, sig.args[1], code_array, index)
            )
            if packed:
                word = builder.and_(builder.lshr(word, word.type(8 * (level % 4))), word.type(255))
            return builder.zext(word, i64)

        def lanes_at(ptr: ir.Value, index: ir.Value) -> ir.Value:
            return builder.bitcast(builder.gep(ptr, [index]), vector.as_pointer())

        table_ptr = data(0, table_v)
        total = None
        for level in range(levels_n):
            entry = builder.add(builder.mul(size_i, i64(level)), code_of(level))
            terms = builder.load(lanes_at(table_ptr, builder.mul(entry, i64(lanes_n))), align=4)
            total = terms if total is None else builder.fadd(total, terms)
        if add_norm:
            norm_f = context.cast(builder, norm_v, sig.args[4], types.float32)
            one = builder.insert_element(
                ir.Constant(vector, ir.Undefined), norm_f, ir.IntType(32)(0)
            )
            spread = builder.shuffle_vector(
                one,
                ir.Constant(vector, ir.Undefined),
                ir.Constant(ir.VectorType(ir.IntType(32), lanes_n), [0] * lanes_n),
            )
            total = builder.fadd(total, spread)
        builder.store(total, lanes_at(data(6, sums_v), i64(0)), align=4)
        bound = builder.load(lanes_at(data(5, worst_v), i64(0)), align=4)
        lower = builder.fcmp_ordered("<", total, bound)
        return builder.zext(builder.bitcast(lower, ir.IntType(lanes_n)), i64)

    return signature, codegen


@kernels.jit()
def push_lanes(mask, sums, heap_d, heap_r, worst, row):
    """Offer (sums[j], row) to list j (heap_d float32 (lanes, k), heap_r int64 (lanes, k))
    for every bit j of mask, and keep worst[j] (float32 (lanes,)) its list's worst score.
    Out of line: the rare path leaves the scan loop its registers."""
    j = 0
    while mask != 0:
        if mask & 1:
            kernels.topk_push(heap_d[j], heap_r[j], sums[j], row)
            worst[j] = heap_d[j, 0]
        mask >>= 1
        j += 1


@functools.cache
def lane_scan_kernel(num_levels: int, stride: int, packed: bool, lanes: int, with_norms: bool):
    """Compiled top-k scan of rows first..stop-1 for queries taken ``lanes`` at a time
    (built once per process; numba caches it on disk).

    ``scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r)``: arguments and
    result as :func:`dpq.index.kernels.scan_kernel`'s (codes packed uint32 words when
    ``packed``, else rows; norms float32 (N,), read only when ``with_norms``; luts float32
    (nq, num_levels * K)), the same scores and rows bit for bit. The last group's unused
    lanes hold zero tables and a worst of -inf: they never match.
    """

    @kernels.jit()
    def scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r):
        nq, width = luts.shape
        table = np.empty(width * lanes, np.float32)
        worst = np.empty(lanes, np.float32)
        sums = np.empty(lanes, np.float32)
        heap_d = np.empty((lanes, k), np.float32)
        heap_r = np.empty((lanes, k), np.int64)
        # views indexed from 0 let numba drop negative-index handling
        if packed:
            rows_codes = codes[first * stride : stop * stride]
        else:
            rows_codes = codes[first:stop]
        rows_norms = norms[first:stop] if with_norms else norms
        norm = np.float32(0.0)
        for group in range(0, nq, lanes):
            count = min(lanes, nq - group)
            for j in range(lanes):
                if j < count:
                    lut = luts[group + j]
                    for e in range(width):
                        table[e * lanes + j] = lut[e]
                    worst[j] = kernels.topk_start(heap_d[j], heap_r[j])
                else:
                    for e in range(width):
                        table[e * lanes + j] = 0.0
                    worst[j] = -np.inf
            for t in range(stop - first):
                if with_norms:
                    norm = rows_norms[t]
                mask = lane_sums_below(
                    table, rows_codes, t, codebook_size, norm, worst, sums, num_levels,
                    stride, lanes, with_norms,
                )  # fmt: skip
                if mask != 0:  # rare once the lists are full
                    push_lanes(mask, sums, heap_d, heap_r, worst, first + t)
            for j in range(count):
                kernels.topk_finish(heap_d[j], heap_r[j], out_d[group + j], out_r[group + j])

    return scan


def scan_rows(
    num_levels: int,
    stride: int,
    packed: bool,
    codes: np.ndarray,
    first: int,
    stop: int,
    codebook_size: int,
    norms: np.ndarray,
    luts: np.ndarray,
    k: int,
    out_d: np.ndarray,
    out_r: np.ndarray,
) -> None:
    """Every query's top k of rows first..stop-1, as :func:`dpq.index.kernels.scan_kernel`
    writes it (same arguments after the layout's ``num_levels, stride, packed``).

    Queries go in groups of the widest lane width, the rest in the narrowest group that
    holds it; a lone query goes to the scalar kernel (one lane of a group costs as much as
    the whole group).
    """
    nq, with_norms = len(luts), len(norms) > 0
    full = nq - nq % LANE_WIDTHS[-1]
    parts = [(0, full, LANE_WIDTHS[-1])] if full else []
    if nq - full:
        parts.append((full, nq, lanes_for(nq - full)))
    for q0, q1, lanes in parts:
        if q1 - q0 == 1:
            scan = kernels.scan_kernel(num_levels, stride, packed)
        else:
            scan = lane_scan_kernel(num_levels, stride, packed, lanes, with_norms)
        scan(codes, first, stop, codebook_size, norms, luts[q0:q1], k, out_d[q0:q1], out_r[q0:q1])
