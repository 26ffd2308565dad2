//! The AMX kernel (Intel Sapphire Rapids and later): the CPU's matrix unit multiplies a tile of
//! 16 weight rows x 32 bf16 values by a tile of 32 values of 16 rows, 8192 bf16 products summed
//! into a 16 x 16 f32 tile per `tdpbf16ps`, 16 times the products of one `vdpbf16ps`.
//!
//! The weights are the A operand as they are stored (16 rows read 64 bytes at a time, `k * 2`
//! bytes apart), so nothing of them is copied. The x rows are the B operand, which the unit
//! reads as pairs: row `p` of a B tile holds, for 16 x rows, their values `2p` and `2p + 1`
//! ([`pair_rows`], once per product). So a result tile is `[16 weights][16 x rows]`, transposed
//! in registers on its way out. Tile instructions are written in `asm!` (the intrinsics are not
//! stable Rust); the tile registers are used by nothing else.

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

/// Values of `k` per tile step: one 64-byte tile row of bf16.
pub const K_STEP: usize = 32;

/// Rows of a tile (weights or x rows), and x rows per pair row's step.
const TILE: usize = 16;

/// Weight rows per block: two A tiles, so that each B tile loaded serves two products.
pub const W_BLOCK: usize = 2 * TILE;

/// Whether this CPU has AMX-TILE and AMX-BF16 and Linux lets this process use their registers
/// (asked once; the permission holds for every thread of the process).
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that can run this program's
        // AVX-512 callers; it only reads identification registers.
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && tile_data_permitted()
    })
}

/// Linux keeps the 8 KiB of tile registers off until a process asks (`arch_prctl`
/// `ARCH_REQ_XCOMP_PERM` for `XFEATURE_XTILEDATA`); it refuses where the kernel or the
/// hypervisor does not support them.
#[cfg(target_os = "linux")]
fn tile_data_permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request takes two integers and touches no memory of the process.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn tile_data_permitted() -> bool {
    false
}

/// The distance, in pairs, between two pair rows of `m` x rows: room for a whole tile of 16
/// from any row, on whole cache lines.
pub fn pair_stride(m: usize) -> usize {
    (m + TILE - 1).next_multiple_of(TILE)
}

/// Fills the 16 pair rows of one step (`step * 32` to `step * 32 + 32` of `k`) from the f32
/// rows `x` (`[m, k]`): `dst[p * stride + t]` holds `x[t][step * 32 + 2p]` rounded to bf16 in
/// its low half and `x[t][step * 32 + 2p + 1]` in its high half; from `t = m` to the stride,
/// zeros. So it writes every element of `dst[..16 * stride]`, which need not hold anything yet.
/// Sixteen rows at a time, transposed in registers, so that every store is a whole line of 16
/// rows (a scatter per row was 8% of a bf16 prefill).
///
/// # Safety
/// AVX-512 F, BW and BF16 must be available; `k % 32 == 0`, `step < k / 32`, `x.len() ==
/// m * k`, `m <= stride`, `stride` a multiple of 16, `dst.len() >= 16 * stride`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn pair_rows(
    x: &[f32],
    k: usize,
    step: usize,
    stride: usize,
    dst: &mut [MaybeUninit<u32>],
) {
    let m = x.len() / k;
    let covered = m.next_multiple_of(TILE);
    // SAFETY: rows `t0 .. t0 + 16` below `m` read their 32 values of the step within `x`; the
    // stores write `dst[p * stride + t0 ..][..16]` for p < 16, t0 + 16 <= covered <= stride.
    unsafe {
        for t0 in (0..m).step_by(TILE) {
            // Row i's 16 pairs (zeros past the last row), then pair p's values of the 16 rows.
            let by_pair = transpose(std::array::from_fn(|i| {
                if t0 + i >= m {
                    return _mm512_setzero_ps();
                }
                let src = x.as_ptr().add((t0 + i) * k + step * K_STEP);
                let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo))
            }));
            for (p, v) in by_pair.iter().enumerate() {
                let at = dst.as_mut_ptr().add(p * stride + t0);
                _mm512_storeu_ps(at.cast::<f32>(), *v);
            }
        }
    }
    for p in 0..16 {
        dst[p * stride + covered..(p + 1) * stride].fill(MaybeUninit::new(0));
    }
}

/// The palette-1 layout `ldtilecfg` reads: every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    row_bytes: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    row_bytes: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Zeroes the four result tiles (tmm0-3).
///
/// # Safety
/// The tiles configured ([`configured`]).
pub(crate) unsafe fn zero_results() {
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        )
    };
}

/// One `k` step of a 2 x 2 block of result tiles: `tmm0 += A0 B0`, `tmm1 += A0 B1`, `tmm2 +=
/// A1 B0`, `tmm3 += A1 B1`, the A tiles loaded (into tmm4-5) from `a`, rows `a_bytes` apart,
/// the B tiles (tmm6-7) from `b`, rows `b_bytes` apart. A second operand of `None` leaves out
/// its products (the last, partial block of rows); both second operands cannot be left out.
///
/// # Safety
/// The tiles configured ([`configured`]); each operand given has 16 rows of 64 bytes readable.
pub(crate) unsafe fn block_step(
    a: (*const u8, Option<*const u8>),
    b: (*const u8, Option<*const u8>),
    (a_bytes, b_bytes): (usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        match (a.1, b.1) {
            (Some(a1), Some(b1)) => asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.0,
                a1 = in(reg) a1,
                b0 = in(reg) b.0,
                b1 = in(reg) b1,
                sa = in(reg) a_bytes,
                sb = in(reg) b_bytes,
                options(nostack, readonly)
            ),
            (None, Some(b1)) => asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a0 = in(reg) a.0,
                b0 = in(reg) b.0,
                b1 = in(reg) b1,
                sa = in(reg) a_bytes,
                sb = in(reg) b_bytes,
                options(nostack, readonly)
            ),
            (Some(a1), None) => asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a.0,
                a1 = in(reg) a1,
                b0 = in(reg) b.0,
                sa = in(reg) a_bytes,
                sb = in(reg) b_bytes,
                options(nostack, readonly)
            ),
            (None, None) => unreachable!("block_step: one operand of each kind at least"),
        }
    }
}

/// Four result tiles, as `tilestored` leaves them: `[tile][weight][x row]`.
#[repr(C, align(64))]
struct Results([f32; 4 * TILE * TILE]);

/// `out[(r - rows.start) * n + j] = x[r] . w[j]` for `w` `[n, k]` with rows `ldw` apart
/// (`ldw >= k`: the first keys of longer rows, for prefill attention's values), `x` as pair
/// rows (`pairs`, [`pair_rows`]): tiles 0-3 hold results, 4-5 weights, 6-7 x pairs. Every
/// output is written (so `out` need not be initialised), nothing else of `out` is.
///
/// # Safety
/// [`usable`] and AVX-512 F must hold; `k % 32 == 0`; `pairs` holds `k / 2` pair rows of
/// `stride = pair_stride(m)` pairs with `rows.end <= m`; `ldw >= k`, `w.len() >= (n - 1) *
/// ldw + k`; `out.len() >= rows.len() * n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn rows_by_weights(
    (n, k): (usize, usize),
    (pairs, stride): (&[u32], usize),
    rows: Range<usize>,
    (w, ldw): (&[bf16], usize),
    out: &mut [MaybeUninit<f32>],
) {
    let whole = n / W_BLOCK * W_BLOCK;
    let block = Block {
        k,
        ldw,
        n,
        pairs: pairs.as_ptr(),
        stride,
        rows,
        silu: false,
    };
    // SAFETY: AMX is usable (caller). Each block's weight rows are within `w` (or the padded
    // copy), and the caller's contract bounds the pair rows and the outputs.
    unsafe {
        on_tiles(|results| {
            for j0 in (0..whole).step_by(W_BLOCK) {
                block.run(w.as_ptr().add(j0 * ldw), (j0, W_BLOCK), results, out);
            }
            if whole < n {
                // The last weight rows, fewer than a block: a zero-padded copy (rows of `k`),
                // so that the tiles never read past `w`.
                let mut padded = vec![bf16::ZERO; W_BLOCK * k];
                for (dst, j) in padded.chunks_exact_mut(k).zip(whole..n) {
                    dst.copy_from_slice(&w[j * ldw..][..k]);
                }
                let tail = Block {
                    ldw: k,
                    rows: block.rows.clone(),
                    ..block
                };
                tail.run(padded.as_ptr(), (whole, n - whole), results, out);
            }
        })
    }
}

/// Runs `f` with the tiles configured and a buffer for four result tiles, and releases the
/// tiles after: what every AMX product does around its blocks.
///
/// # Safety
/// [`usable`] must hold.
unsafe fn on_tiles(f: impl FnOnce(&mut Results)) {
    // Every value is stored by `tilestored` before it is read; zeroed once per call.
    let mut results = Results([0.0; 4 * TILE * TILE]);
    // SAFETY: AMX is usable (caller).
    unsafe { configured(|| f(&mut results)) }
}

/// Runs `f` with the eight tiles configured as 16 rows of 64 bytes each, and releases them
/// after.
///
/// # Safety
/// [`usable`] must hold.
pub(crate) unsafe fn configured(f: impl FnOnce()) {
    // SAFETY: AMX is usable (caller); the configuration is a valid palette-1 layout.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    f();
    // SAFETY: as above; releasing configured tiles.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// `out[(r - rows.start) * h + j] = silu(x[r] . w[j]) * (x[r] . w[h + j])` for a gate/up
/// matrix `w` (`[2h, k]`: the gate rows, then the up rows), as [`rows_by_weights`] followed by
/// SiLU x mul, without writing the `[rows, 2h]` products (a prefill's gate/up output is
/// 100-200 MB a layer, read back by the activation): each block takes 16 gate rows and the 16
/// up rows of the same features as its two weight tiles.
///
/// # Safety
/// As [`rows_by_weights`] with `n = 2h`, and `h % 16 == 0`; `out.len() >= rows.len() * h`.
#[target_feature(enable = "avx512f")]
pub unsafe fn rows_by_weights_silu(
    (h, k): (usize, usize),
    (pairs, stride): (&[u32], usize),
    rows: Range<usize>,
    w: &[bf16],
    out: &mut [MaybeUninit<f32>],
) {
    let block = Block {
        k,
        ldw: k,
        n: h,
        pairs: pairs.as_ptr(),
        stride,
        rows,
        silu: true,
    };
    // SAFETY: as in `rows_by_weights`; block `j0` reads gate rows `j0 .. j0 + 16` and up rows
    // `h + j0 .. h + j0 + 16`, within `w` as `h` is a multiple of 16.
    unsafe {
        on_tiles(|results| {
            for j0 in (0..h).step_by(TILE) {
                block.run(w.as_ptr().add(j0 * k), (j0, TILE), results, out);
            }
        })
    }
}

/// What every block of 32 weight rows shares.
struct Block {
    k: usize,
    /// Elements from one weight row to the next (`>= k`).
    ldw: usize,
    /// Output columns (the row stride of `out`).
    n: usize,
    pairs: *const u32,
    stride: usize,
    rows: Range<usize>,
    /// The second weight tile holds the up rows of the first's gate rows (`n` rows on, in a
    /// gate/up matrix of `2n`): the block writes `silu(gate) * up` (16 columns) instead of both
    /// products. Otherwise the two tiles are 32 consecutive weight rows.
    silu: bool,
}

impl Block {
    /// The products of the 32 weight rows at `wp` (the first `valid` of them real, output
    /// columns from `j0`) with every x row, two tiles of 16 x rows at a time.
    ///
    /// # Safety
    /// As [`rows_by_weights`], with the tiles configured; `wp` points at 32 rows of `k`, `ldw`
    /// apart.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(
        &self,
        wp: *const bf16,
        (j0, valid): (usize, usize),
        results: &mut Results,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (k, stride) = (self.k, self.stride);
        let (w_bytes, pair_bytes) = (self.ldw * 2, stride * 4);
        // From the first weight tile's rows to the second's.
        let second = if self.silu {
            self.n * self.ldw
        } else {
            TILE * self.ldw
        };
        let mut t = self.rows.start;
        // SAFETY: the caller's contract: 32 weight rows of `k` from `wp`, pair rows `k / 2`
        // of `stride` with room for a tile from any row before `rows.end`.
        unsafe {
            while t < self.rows.end {
                let two = self.rows.end - t > TILE;
                zero_results();
                for step in 0..k / K_STEP {
                    let w0 = wp.add(step * K_STEP).cast::<u8>();
                    let x0 = self.pairs.add(step * TILE * stride + t).cast::<u8>();
                    let x1 = two.then(|| x0.add(TILE * 4));
                    block_step(
                        (w0, Some(w0.add(second * 2))),
                        (x0, x1),
                        (w_bytes, pair_bytes),
                    );
                }
                let r = results.0.as_mut_ptr();
                asm!(
                    "tilestored [{r0} + {b}*1], tmm0",
                    "tilestored [{r1} + {b}*1], tmm1",
                    "tilestored [{r2} + {b}*1], tmm2",
                    "tilestored [{r3} + {b}*1], tmm3",
                    r0 = in(reg) r,
                    r1 = in(reg) r.add(TILE * TILE),
                    r2 = in(reg) r.add(2 * TILE * TILE),
                    r3 = in(reg) r.add(3 * TILE * TILE),
                    b = in(reg) TILE * 4,
                    options(nostack)
                );
                if self.silu {
                    // Tiles 0 and 1 hold the gate products of the two x tiles, 2 and 3 the up
                    // ones of the same features.
                    for (g, dt) in [(0, 0), (1, TILE)] {
                        if t + dt < self.rows.end {
                            let (gate, up) = results.0.split_at_mut(2 * TILE * TILE);
                            let gate = &mut gate[g * TILE * TILE..][..TILE * TILE];
                            let up = &up[g * TILE * TILE..][..TILE * TILE];
                            for (x, &u) in gate.iter_mut().zip(up) {
                                *x = crate::fastmath::silu(*x) * u;
                            }
                            self.place(gate, j0, t + dt, out);
                        }
                    }
                } else {
                    for (tile, (dj, dt)) in [(0, 0), (0, TILE), (TILE, 0), (TILE, TILE)]
                        .into_iter()
                        .enumerate()
                    {
                        if dj < valid && t + dt < self.rows.end {
                            self.place(&results.0[tile * TILE * TILE..], j0 + dj, t + dt, out);
                        }
                    }
                }
                t += 2 * TILE;
            }
        }
    }

    /// Writes one result tile (`[16 weights][16 x rows]`) transposed into the outputs of x
    /// rows `t..` and columns `j..`, leaving out rows past `rows.end` and columns past `n`.
    ///
    /// # Safety
    /// AVX-512 F; `tile` holds 256 values; `j < n`, `t < rows.end`; `out` as in
    /// [`rows_by_weights`].
    #[target_feature(enable = "avx512f")]
    unsafe fn place(&self, tile: &[f32], j: usize, t: usize, out: &mut [MaybeUninit<f32>]) {
        // SAFETY: 16 loads of 16 values within `tile`; stores only to rows before `rows.end`
        // and (masked) columns before `n`.
        unsafe {
            let by_row = transpose(std::array::from_fn(|i| {
                _mm512_loadu_ps(tile.as_ptr().add(i * TILE))
            }));
            let cols = (self.n - j).min(TILE);
            let mask: __mmask16 = if cols == TILE { !0 } else { (1u16 << cols) - 1 };
            for (i, v) in by_row.iter().enumerate().take(self.rows.end - t) {
                let at = (t + i - self.rows.start) * self.n + j;
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(at).cast::<f32>(), mask, *v);
            }
        }
    }
}

/// `dst[j * ld_dst + i] = bf16(src[i * ld_src + j])` for `i, j < 16`: a 16 x 16 block
/// transposed in registers and rounded to nearest even, one 32-byte store per row.
///
/// # Safety
/// AVX-512 F and BF16 must be available; `src` holds `15 * ld_src + 16` values, `dst`
/// `15 * ld_dst + 16`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn transpose16_to_bf16(src: &[f32], ld_src: usize, dst: &mut [bf16], ld_dst: usize) {
    // SAFETY: 16 loads of 16 values from rows `ld_src` apart and 16 stores of 16 values to rows
    // `ld_dst` apart, within the lengths the caller guarantees.
    unsafe {
        let cols = transpose(std::array::from_fn(|i| {
            _mm512_loadu_ps(src.as_ptr().add(i * ld_src))
        }));
        for (j, c) in cols.iter().enumerate() {
            let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(*c));
            _mm256_storeu_si256(dst.as_mut_ptr().add(j * ld_dst).cast(), v);
        }
    }
}

/// The transpose of a 16 x 16 matrix held as 16 rows: 64 shuffles in four rounds (pairs of
/// values, then of pairs, then of 128-bit lanes twice).
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512; 16]) -> [__m512; 16] {
    // Round 1: t[2i], t[2i + 1] interleave rows 2i and 2i + 1 within each 128-bit lane.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Round 2: u[4g + c], lane l, is column 4l + c of rows 4g .. 4g + 4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let a = _mm512_castps_pd(t[4 * g + c / 2]);
        let b = _mm512_castps_pd(t[4 * g + c / 2 + 2]);
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Round 3: v[h][c] (even lanes) and v[h][4 + c] (odd lanes) gather columns c, 8 + c (even)
    // or 4 + c, 12 + c (odd) of rows 8h .. 8h + 8.
    let v: [[__m512; 8]; 2] = std::array::from_fn(|h| {
        std::array::from_fn(|i| {
            let (a, b) = (u[8 * h + i % 4], u[8 * h + 4 + i % 4]);
            if i < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        })
    });
    // Round 4: the two halves of each column.
    std::array::from_fn(|col| {
        let (c, which) = (col % 4, col / 4);
        // Column c: even lanes of v[.][c]; 8 + c: odd lanes of the same; 4 + c and 12 + c: of
        // v[.][4 + c].
        let i = if which % 2 == 0 { c } else { 4 + c };
        let (a, b) = (v[0][i], v[1][i]);
        if which < 2 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        if !crate::device::cpu_has_avx512_bw() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|v| v as f32).collect();
        // SAFETY: AVX-512 F is present (checked); 16 loads of 16 within `m`, stores into `got`.
        let got = unsafe {
            let rows = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            let mut got = [0f32; 256];
            for (i, r) in transpose(rows).iter().enumerate() {
                _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *r);
            }
            got
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], m[16 * j + i], "[{i}][{j}]");
            }
        }
    }
}
