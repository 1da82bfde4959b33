"""Align (token, slot) rows to experts, each expert padded to a multiple of BLOCK_SIZE.

Rows are the flat indices f = token * top_k + slot of ``topk_ids``. The result orders
rows by expert, then by f, pads each expert's run with the sentinel ``num_rows`` (= M * top_k)
to a multiple of BLOCK_SIZE, and names the expert of every padded block.

Two paths:
* one program (``moe_align_single_kernel``) when all rows fit one chunk (decode);
* three launches otherwise: per-chunk histograms (``moe_align_count_kernel``), a single
  program turning counts into offsets and block expert ids (``moe_align_offsets_kernel``),
  and a parallel scatter plus padding fill (``moe_align_scatter_kernel``).

Ids outside [0, NUM_EXPERTS) go to an overflow bin (index NUM_EXPERTS < NB) that owns no
block, so such rows are placed nowhere. NB is a power of two > NUM_EXPERTS.

Sizes that vary with the batch (``num_rows``, ``max_blocks``, ``num_chunks``) are runtime
arguments: one compiled kernel serves every batch of a size class (``CHUNK``).
"""

import triton
import triton.language as tl


@triton.jit
def _chunk_bins(topk_ids_ptr, chunk, num_rows, NUM_EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """Expert bin of each row of one chunk; invalid ids and rows past num_rows go to NUM_EXPERTS."""
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + rows, mask=rows < num_rows, other=NUM_EXPERTS)
    valid = (ids >= 0) & (ids < NUM_EXPERTS) & (rows < num_rows)
    return tl.where(valid, ids, NUM_EXPERTS)


@triton.jit
def _expert_layout(totals, NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """From per-expert row counts: (first sorted position, end of real rows, cumulative block ends)."""
    bins = tl.arange(0, NB)
    totals = tl.where(bins < NUM_EXPERTS, totals, 0)
    nblocks = (totals + BLOCK_SIZE - 1) // BLOCK_SIZE
    block_ends = tl.cumsum(nblocks, axis=0)
    starts = (block_ends - nblocks) * BLOCK_SIZE
    return starts, starts + totals, block_ends


@triton.jit
def _scatter_chunk(topk_ids_ptr, sorted_token_ids_ptr, chunk, bases_ptr, num_rows,
                   NUM_EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """Write the rows of one chunk to their sorted positions.

    ``bases[e]`` = sorted position of the chunk's first row of expert e, minus the number
    of the chunk's rows of lower experts; a row then lands at bases[e] plus its index in
    the chunk sorted by (expert, row).
    """
    bins = _chunk_bins(topk_ids_ptr, chunk, num_rows, NUM_EXPERTS, CHUNK)
    local = tl.arange(0, CHUNK)
    keys = tl.sort(bins * CHUNK + local)
    expert = keys // CHUNK
    row = chunk * CHUNK + keys % CHUNK
    valid = expert < NUM_EXPERTS
    base = tl.load(bases_ptr + expert, mask=valid, other=0)
    tl.store(sorted_token_ids_ptr + base + local, row, mask=valid)


@triton.jit
def _fill_tile(sorted_token_ids_ptr, expert_ids_ptr, tile, end_real_ptr, block_ends_ptr, num_rows, max_blocks,
               NB: tl.constexpr, LOG2_NB: tl.constexpr, BLOCK_SIZE: tl.constexpr, FILL: tl.constexpr):
    """Padding sentinels and block expert ids for one tile of FILL sorted positions.

    A position is padding when it lies past its expert's real rows or past the last used
    block; real rows are written by the scatter, never here. The expert of a block is
    found by binary search in the cumulative block ends.
    """
    pos = tile * FILL + tl.arange(0, FILL)
    block = pos // BLOCK_SIZE
    lo = tl.zeros([FILL], tl.int32)
    hi = tl.full([FILL], NB, tl.int32)
    for _ in tl.static_range(LOG2_NB + 1):
        mid = (lo + hi) // 2
        ends = tl.load(block_ends_ptr + mid, mask=mid < NB, other=0)
        later = (ends <= block) & (mid < NB)
        lo = tl.where(later, mid + 1, lo)
        hi = tl.where(later, hi, mid)
    expert = lo  # first expert whose blocks end after this block; NB if none
    used = expert < NB
    end_real = tl.load(end_real_ptr + expert, mask=used, other=0)
    in_range = block < max_blocks
    is_pad = (~used) | (pos >= end_real)
    tl.store(sorted_token_ids_ptr + pos, tl.zeros([FILL], tl.int32) + num_rows, mask=is_pad & in_range)
    first_of_block = (pos % BLOCK_SIZE) == 0
    tl.store(expert_ids_ptr + block, tl.where(used, expert, -1), mask=first_of_block & in_range)


@triton.jit
def _align_single(topk_ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                  bases_ptr, end_real_ptr, block_ends_ptr, num_rows, max_blocks,
                  NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """The whole alignment by one program, for num_rows <= CHUNK (bases, end_real, block_ends: scratch)."""
    bins = tl.arange(0, NB)
    counts = tl.histogram(_chunk_bins(topk_ids_ptr, 0, num_rows, NUM_EXPERTS, CHUNK), NB)
    starts, end_real, block_ends = _expert_layout(counts, NUM_EXPERTS, NB, BLOCK_SIZE)
    tl.store(bases_ptr + bins, starts - (tl.cumsum(counts, axis=0) - counts))
    tl.store(end_real_ptr + bins, end_real)
    tl.store(block_ends_ptr + bins, block_ends)
    tl.store(num_tokens_post_padded_ptr, tl.max(block_ends, axis=0) * BLOCK_SIZE)
    tl.debug_barrier()  # the tables above are read back by other threads below
    _scatter_chunk(topk_ids_ptr, sorted_token_ids_ptr, 0, bases_ptr, num_rows, NUM_EXPERTS, CHUNK)
    for tile in range(0, (max_blocks * BLOCK_SIZE + FILL - 1) // FILL):
        _fill_tile(sorted_token_ids_ptr, expert_ids_ptr, tile, end_real_ptr, block_ends_ptr, num_rows, max_blocks,
                   NB, LOG2_NB, BLOCK_SIZE, FILL)


@triton.jit
def moe_align_single_kernel(topk_ids_ptr, num_rows, max_blocks,
                            sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                            bases_ptr, end_real_ptr, block_ends_ptr,
                            NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """The whole alignment in one program, for num_rows <= CHUNK (the last three outputs are scratch)."""
    _align_single(topk_ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                  bases_ptr, end_real_ptr, block_ends_ptr, num_rows, max_blocks, NUM_EXPERTS, NB, LOG2_NB,
                  BLOCK_SIZE, CHUNK, FILL)


@triton.jit
def moe_align_count_kernel(topk_ids_ptr, num_rows, counts_ptr,
                           NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr):
    """counts[c, e] = rows of chunk c routed to expert e (bin NUM_EXPERTS: invalid)."""
    chunk = tl.program_id(0)
    bins = _chunk_bins(topk_ids_ptr, chunk, num_rows, NUM_EXPERTS, CHUNK)
    tl.store(counts_ptr + chunk * NB + tl.arange(0, NB), tl.histogram(bins, NB))


@triton.jit
def moe_align_offsets_kernel(counts_ptr, num_chunks,
                             bases_ptr, end_real_ptr, block_ends_ptr, num_tokens_post_padded_ptr,
                             NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One program: per-chunk bases, the expert layout and the padded row count."""
    bins = tl.arange(0, NB)
    totals = tl.zeros([NB], tl.int32)
    for c in range(0, num_chunks):
        totals += tl.load(counts_ptr + c * NB + bins)
    starts, end_real, block_ends = _expert_layout(totals, NUM_EXPERTS, NB, BLOCK_SIZE)
    seen = tl.zeros([NB], tl.int32)
    for c in range(0, num_chunks):
        counts = tl.load(counts_ptr + c * NB + bins)
        tl.store(bases_ptr + c * NB + bins, starts + seen - (tl.cumsum(counts, axis=0) - counts))
        seen += counts
    tl.store(end_real_ptr + bins, end_real)
    tl.store(block_ends_ptr + bins, block_ends)
    tl.store(num_tokens_post_padded_ptr, tl.max(block_ends, axis=0) * BLOCK_SIZE)


@triton.jit
def moe_align_scatter_kernel(topk_ids_ptr, bases_ptr, end_real_ptr, block_ends_ptr,
                             num_rows, max_blocks, num_chunks,
                             sorted_token_ids_ptr, expert_ids_ptr,
                             NUM_EXPERTS: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """Programs [0, num_chunks) scatter one chunk each; the rest fill one padding tile each."""
    pid = tl.program_id(0)
    if pid < num_chunks:
        _scatter_chunk(topk_ids_ptr, sorted_token_ids_ptr, pid, bases_ptr + pid * NB, num_rows, NUM_EXPERTS, CHUNK)
    else:
        _fill_tile(sorted_token_ids_ptr, expert_ids_ptr, pid - num_chunks, end_real_ptr, block_ends_ptr, num_rows,
                   max_blocks, NB, LOG2_NB, BLOCK_SIZE, FILL)
