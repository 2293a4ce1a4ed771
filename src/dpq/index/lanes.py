"""The full scan of several queries per pass over the codes: one SIMD lane per query.

A group of ``lanes`` queries (4, 8 or 16) shares one interleaved lookup table, float32
(L * K * lanes,): entry (level, code) holds the group's terms side by side. Each item's
codes are read once for the whole group; per level one vector load fetches every query's
term, and one vector compare tests every lane's sum against its list's worst score. Lanes
add in IEEE single precision in the scalar kernels' order (level 0 to L-1, then the norm),
so each lane's score is bit for bit :func:`dpq.index.kernels.scan_kernel`'s; the rare item
that beats a lane's worst is re-scored by the scalar code and pushed into that query's list.

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

__all__ = ["LANE_WIDTHS", "lane_scan_kernel", "lanes_for"]

# Group sizes compiled; the widest is the group a long batch is cut into. 16 float32 lanes
# are one AVX-512 register or two AVX2 ones; on both the 16-lane table (64 KiB at L=4,
# K=256) scores more queries per item read than the 8-lane one loses to L1 misses.
LANE_WIDTHS = (4, 8, 16)


def lanes_for(queries: int) -> int:
    """The narrowest lane width that holds ``queries`` (>= 1) queries, at most the widest."""
    return next((w for w in LANE_WIDTHS if w >= queries), LANE_WIDTHS[-1])


@functools.cache
def _lanes_below(num_levels: int, stride: int, packed: bool, lanes: int, with_norm: bool):
    """The intrinsic ``below(table, codes, row, codebook_size, norm, worst) -> int64``: a bit
    mask, bit j set when lane j's score of ``row`` is below worst[j] (float32 (lanes,)).

    Lane j's score is ``sum_l table[(l * codebook_size + code_l) * lanes + j]`` (+ norm when
    ``with_norm``), added left to right. codes: packed uint32 (N * stride,) words of four
    uint8 codes (little-endian), or rows (N, >= num_levels) of uint8/uint16 codes.
    """

    @intrinsic
    def below(typingctx, table, codes, row, codebook_size, norm, worst):
        signature = types.int64(table, codes, row, codebook_size, norm, worst)

        def codegen(context, builder, sig, args):
            table_v, codes_v, row_v, size_v, norm_v, worst_v = args
            i64 = ir.IntType(64)
            vector = ir.VectorType(ir.FloatType(), lanes)
            row_i = context.cast(builder, row_v, sig.args[2], types.int64)
            size_i = context.cast(builder, size_v, sig.args[3], types.int64)
            code_array = context.make_array(sig.args[1])(context, builder, codes_v)
            table_ptr = context.make_array(sig.args[0])(context, builder, table_v).data
            worst_ptr = context.make_array(sig.args[5])(context, builder, worst_v).data

            def code_of(level: int) -> ir.Value:
                if packed:
                    word_index = builder.add(builder.mul(row_i, i64(stride)), i64(level // 4))
                    ptr = cgutils.get_item_pointer(
                        context, builder, sig.args[1], code_array, [word_index]
                    )
                    word = builder.load(ptr)
                    code = builder.and_(
                        builder.lshr(word, word.type(8 * (level % 4))), word.type(255)
                    )
                    return builder.zext(code, i64)
                ptr = cgutils.get_item_pointer(
                    context, builder, sig.args[1], code_array, [row_i, i64(level)]
                )
                return builder.zext(builder.load(ptr), i64)

            def load_lanes(ptr: ir.Value, index: ir.Value) -> ir.Value:
                address = builder.bitcast(builder.gep(ptr, [index]), vector.as_pointer())
                return builder.load(address, align=4)

            total = None
            for level in range(num_levels):
                entry = builder.add(builder.mul(size_i, i64(level)), code_of(level))
                terms = load_lanes(table_ptr, builder.mul(entry, i64(lanes)))
                total = terms if total is None else builder.fadd(total, terms)
            if with_norm:
                norm_f = context.cast(builder, norm_v, sig.args[4], types.float32)
                one = builder.insert_element(
                    ir.Constant(vector, ir.Undefined), norm_f, ir.IntType(32)(0)
                )
                spread = builder.shuffle_vector(
                    one,
                    ir.Constant(vector, ir.Undefined),
                    ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes),
                )
                total = builder.fadd(total, spread)
            lower = builder.fcmp_ordered("<", total, load_lanes(worst_ptr, i64(0)))
            return builder.zext(builder.bitcast(lower, ir.IntType(lanes)), i64)

        return signature, codegen

    return below


@functools.cache
def lane_scan_kernel(num_levels: int, stride: int, packed: bool, lanes: int, with_norms: bool):
    """Compiled top-k scan of rows first..stop-1 for queries taken ``lanes`` at a time
    (built once per process; numba caches it on disk).

    ``scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r)``: arguments and
    result as :func:`dpq.index.kernels.scan_kernel`'s (norms float32 (N,), read only when
    ``with_norms``; luts float32 (nq, num_levels * K)), the same scores and rows bit for bit.
    The last group's unused lanes hold zero tables and a worst of -inf: they never match.
    """
    below = _lanes_below(num_levels, stride, packed, lanes, with_norms)
    score = kernels.item_score(num_levels, stride, packed)

    @kernels.jit()
    def scan(codes, first, stop, codebook_size, norms, luts, k, out_d, out_r):
        nq, width = luts.shape
        table = np.empty(width * lanes, np.float32)
        worst = np.empty(lanes, np.float32)
        heap_d = np.empty((lanes, k), np.float32)
        heap_r = np.empty((lanes, k), np.int64)
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
            for row in range(first, stop):
                if with_norms:
                    norm = norms[row]
                mask = below(table, codes, row, codebook_size, norm, worst)
                if mask != 0:  # rare once the lists are full
                    for j in range(count):
                        if (mask >> j) & 1:
                            lut = kernels.level_tables(luts, group + j, num_levels, codebook_size)
                            d = score(codes, lut, row)
                            if with_norms:
                                d += norm
                            # rows arrive in increasing order: below the worst is enough
                            kernels.topk_push(heap_d[j], heap_r[j], d, row)
                            worst[j] = heap_d[j, 0]
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
