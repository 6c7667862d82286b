"""Triton helpers shared by fastvae's kernels: row blocks and strided 2-D tiles, int64 offsets."""
import triton
import triton.language as tl


@triton.jit
def row_block(n_rows, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M row indices (int64) and which of them exist."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return rows, rows < n_rows


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, mask, other):
    """The [rows x cols] tile of a strided 2-D tensor, as fp32."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=other).to(tl.float32)


@triton.jit
def load_tile_pair(a_ptr, b_ptr, rows, row_ok, c0, n_cols, stride_ar, stride_ac, stride_br, stride_bc,
                   other_a, B_U8: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [c0, c0 + BLOCK) of two row-aligned tensors: (cols, mask, a tile, b tile), with b
    read as b/255 when B_U8 (uint8 pixel intensities)."""
    cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
    m = row_ok[:, None] & (cols < n_cols)[None, :]
    a = load_tile(a_ptr, rows, cols, stride_ar, stride_ac, m, other_a)
    b = load_tile(b_ptr, rows, cols, stride_br, stride_bc, m, 0)
    if B_U8:
        b = b / 255.0
    return cols, m, a, b
