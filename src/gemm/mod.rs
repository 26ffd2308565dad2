//! Single-threaded matrix products for the CPU kernels (which parallelise across their own work
//! items): f32 through the `gemm` crate with every access bounds-checked up front, few f32 rows
//! against weight rows (`rows_by_weights`), f32 rows against bf16 weights (`bf16`, whose rows
//! are prepared once per product in parallel), and against int8 and 4-bit weights (`int8`,
//! `int4`).

use std::mem::MaybeUninit;

/// `dst[m x n] = lhs[m x k] * rhs[k x n]` (f32, single-threaded: callers parallelise), with
/// explicit row and column strides; bounds are checked before the unchecked kernel runs.
pub fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: dst too small");
    if k > 0 {
        assert!(
            (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
            "gemm: lhs too small"
        );
        assert!(
            (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
            "gemm: rhs too small"
        );
    }
    // SAFETY: every index the kernel touches is within the slices (checked above), and `dst`
    // is exclusively borrowed, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `out[r * n + j] = x[r] . w[j]` for `x` `[m, k]` and `w` `[n, k]` (both row-major), the
/// product of a few rows with a weight matrix as linear layers store it. For the small row
/// counts of decode steps: each weight row is read from memory once and used for every `x` row
/// from the L1 cache, with no packing of `w` (which the general GEMM does on every call and
/// which costs as much as the product itself when `m` is small). AVX-512 CPUs run 512-bit tiles
/// (`avx512`), others AVX2 ones (`x86`): on the Intel Xeon of 2026-12-04 gate/up of SmolLM2 at
/// 32 rows took 777-804 us against 1050-1065 (docs/cpu-performance.md).
pub fn rows_by_weights((m, n, k): (usize, usize, usize), x: &[f32], w: &[f32], out: &mut [f32]) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "rows_by_weights: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::device::cpu_has_avx512_bw() {
        // SAFETY: AVX-512 F and BW are available (checked); the assert above bounds every
        // access (rows `k` apart, not padded).
        unsafe { avx512::rows_by_weights((m, n, k), (x, k), w, as_uninit(out)) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::device::cpu_has_avx2_fma() {
        // SAFETY: AVX2 and FMA are available (checked); the assert above bounds every access.
        unsafe { x86::rows_by_weights(m, k, n, x, w, out) };
        return;
    }
    for r in 0..m {
        for j in 0..n {
            out[r * n + j] = dot(&x[r * k..][..k], &w[j * k..][..k]);
        }
    }
}

/// Whether [`rows_by_weights`] runs a vector kernel on this CPU (AVX2 or AVX-512). Elsewhere
/// (aarch64, say) its plain loops sum each output as one dependent chain: a copy of them ran at
/// 2.1 GFLOP/s on one core of the Intel Xeon (3072 x 576, 1 to 64 rows, 2026-12-06) where
/// candle's GEMM ran 23-85 GFLOP/s on two, so there `model::matmul::linear` leaves f32 products
/// to candle (the `gemm` crate, with NEON kernels on aarch64).
pub fn rows_by_weights_is_vectorised() -> bool {
    crate::device::cpu_has_avx2_fma() || crate::device::cpu_has_avx512_bw()
}

/// [`rows_by_weights`] into outputs not yet written (`out[..m * n]`, every one of which it
/// writes): the 512-bit kernel stores each output once, so prefill products skip the zeroing of
/// their output (a `memset` of up to 100 MB per layer); the other paths get zeros first.
pub fn rows_by_weights_uninit(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    w: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "rows_by_weights_uninit: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::device::cpu_has_avx512_bw() {
        // SAFETY: as in `rows_by_weights`; the kernel writes every output.
        unsafe { avx512::rows_by_weights((m, n, k), (x, k), w, out) };
        return;
    }
    rows_by_weights((m, n, k), x, w, zeroed(&mut out[..m * n]));
}

/// `w` (`[n, k]`) packed for [`rows_by_packed_uninit`], where the CPU runs a panel kernel
/// (AVX-512, or AVX2 and FMA); `None` elsewhere. Once at load for the model's projections
/// ([`pack_at_load`]), or per product of many rows, where reading and writing the weights once
/// more is a few percent (on the Intel Xeon of 2026-12-06 the f32 products of a 32 x 512
/// prefill took 17% less time so than with [`rows_by_weights_uninit`]; docs/cpu-performance.md).
pub fn pack_for_many_rows(w: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if panels_run_here() {
        return Some(packed::pack(w, n, k));
    }
    let _ = (w, n, k);
    None
}

/// `w` packed as [`pack_for_many_rows`] packs it, where the panels serve every row count better
/// than rows do, so that a model keeps its f32 projections as panels from load: AVX-512 CPUs.
/// With AVX2 alone, products of 1, 4 and 8 rows ran 6-48% slower over panels than as dot
/// products over rows (one core, AMD EPYC Zen 3, 2026-12-07: 14336 x 4096 from memory, 8 rows
/// 25.6 against 17.3 ms): there the rows are kept, and only products of many rows pack them.
pub fn pack_at_load(w: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
    if !crate::device::cpu_has_avx512_bw() {
        return None;
    }
    pack_for_many_rows(w, n, k)
}

/// Whether [`crate::model::matmul::linear`]'s f32 products of many rows pack the weights per
/// product for the panel kernel rather than leave them to candle's GEMM: where
/// [`rows_by_weights_suits_many_rows`], or where the panel kernel is the AVX2 one (a prefill of
/// 128 tokens of SmolLM2 on an AMD EPYC Zen 3 took 0.21-0.28 s over panels against candle's
/// 0.35-0.36).
pub fn packs_many_rows(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if !crate::device::cpu_has_avx512_bw() && crate::device::cpu_has_avx2_fma() {
        return true;
    }
    rows_by_weights_suits_many_rows(k)
}

/// Rows `ids` of an `[n, k]` matrix packed by [`pack_for_many_rows`], row-major `[ids.len(),
/// k]`: the embedding lookup where the tied LM head is kept only as panels. `None` where an id
/// is not below `n` or `panels` is shorter than `n` rows packed.
pub fn unpack_rows(panels: &[f32], (n, k): (usize, usize), ids: &[u32]) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if ids.iter().any(|&j| j as usize >= n) || panels.len() < n.div_ceil(PANEL) * PANEL * k {
        return None;
    }
    let mut out = vec![0f32; ids.len() * k];
    // A row is one value in each of its panel's `k` steps, 128 bytes apart.
    out.par_chunks_mut(k.max(1))
        .zip(ids.par_iter())
        .with_min_len(64)
        .for_each(|(row, &j)| {
            let (p, c) = (j as usize / PANEL, j as usize % PANEL);
            let panel = &panels[p * k * PANEL..][..k * PANEL];
            for (v, step) in row.iter_mut().zip(panel.chunks_exact(PANEL)) {
                *v = step[c];
            }
        });
    Some(out)
}

/// `out[r * n + j] = x[r] . w[j]` for `x` `[m, k]` and weights packed by
/// [`pack_for_many_rows`] (`packed::rows_by_packed`: the outer-product form on 12 x 32 tiles;
/// without AVX-512, `packed_avx2`'s 6 x 16 and 2 x 32), into outputs not yet written (every one
/// of the `m * n` is).
pub fn rows_by_packed_uninit(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    packed: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            panels_run_here()
                && x.len() >= m * k
                && packed.len() >= n.div_ceil(PANEL) * PANEL * k
                && out.len() >= m * n,
            "rows_by_packed_uninit: sizes, or weights not packed here"
        );
        // SAFETY: AVX-512 F, or AVX2 and FMA, are available and the assert bounds every access.
        unsafe { rows_by_f32_panels((m, n, k), x, (packed, k * PANEL), out) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, x, packed, out);
        unreachable!("rows_by_packed_uninit: no packed weights off x86-64");
    }
}

/// [`rows_by_packed`] over panels `stride` apart (`stride >= k * 32`), of which the product
/// reads the first `k` steps: for panels holding more steps than one product uses (prefill
/// attention's values, gathered once per sequence for tiles that each read their first keys).
pub fn rows_by_panels(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (panels, stride): (&[f32], usize),
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let count = n.div_ceil(PANEL);
        assert!(
            panels_run_here()
                && stride >= k * PANEL
                && x.len() >= m * k
                && (count == 0 || panels.len() >= (count - 1) * stride + k * PANEL)
                && out.len() >= m * n,
            "rows_by_panels: sizes ({m} x {k} by {n} x {k}, panels {stride} apart), or no AVX2"
        );
        // SAFETY: AVX-512 F, or AVX2 and FMA, are available and the assert bounds every access.
        unsafe { rows_by_f32_panels((m, n, k), x, (panels, stride), as_uninit(out)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, x, panels, stride, out);
        unreachable!("rows_by_panels: no packed weights off x86-64");
    }
}

/// [`rows_by_packed_uninit`] into initialised outputs (which it overwrites).
pub fn rows_by_packed(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    packed: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    rows_by_packed_uninit((m, n, k), x, packed, as_uninit(out));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, x, packed, out);
        unreachable!("rows_by_packed: no packed weights off x86-64");
    }
}

/// Output features per panel of packed weights.
pub const PANEL: usize = 32;

/// Panels from some panel on, and the stride between them (in elements): how the panel
/// kernels take quantized weights and their scales.
#[cfg(target_arch = "x86_64")]
pub(crate) type Strided<'a, T> = (&'a [T], usize);

/// Whether this CPU runs a vector kernel over panels (f32, and the quantized weights' `int8`,
/// `int4`): the 512-bit one (`packed`) or, without AVX-512, the AVX2 one (`packed_avx2`).
/// Elsewhere quantized products are plain loops, and `--quantization` is refused.
pub fn panels_run_here() -> bool {
    crate::device::cpu_has_avx512_bw() || crate::device::cpu_has_avx2_fma()
}

/// The product over f32 panels `stride` apart by the kernel this CPU runs.
///
/// # Safety
/// As `packed::rows_by_packed`, with AVX-512 F, or AVX2 and FMA, available.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_by_f32_panels(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    panels: (&[f32], usize),
    out: &mut [MaybeUninit<f32>],
) {
    // SAFETY: the caller's contract.
    unsafe {
        if crate::device::cpu_has_avx512_bw() {
            packed::rows_by_packed((m, n, k), x, panels, out)
        } else {
            packed_avx2::rows_by_panels((m, n, k), x, panels, (&[], 0), out)
        }
    }
}

/// `out` seen as possibly uninitialised, for kernels that only write it.
#[cfg(target_arch = "x86_64")]
fn as_uninit<T: Copy>(out: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and whatever is written through the result is
    // an initialised `T`, so `out` stays valid.
    unsafe { &mut *(out as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// `out` filled with zeros, as the initialised slice it then is.
fn zeroed(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    out.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Whether `rows_by_weights` beats the `gemm` crate at many rows (a prefill, in row blocks) for
/// rows of `k` values: with AVX-512, when a group of its rows fits in the L1 data cache.
/// Measured on the Intel Xeon of 2026-12-04 (48 KiB L1), 32 x 512 prefill in f32: qkv, o and
/// gate/up (`k` = 576) faster; down (`k` = 1536, 48 KiB a group) 6-9% slower while buffers were
/// 16 bytes off a cache line, 26-34% faster once they start on one (`heap`;
/// docs/cpu-performance.md). Not measured on CPUs with a smaller L1.
pub fn rows_by_weights_suits_many_rows(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::device::cpu_has_avx512_bw()
            && avx512::group_bytes(k) <= crate::device::cpu_l1d_bytes()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Weights kept as blocks of codes in panels (`int8`, `int4`), read a value at a time: what
/// their dequantization and their plain loops (CPUs without AVX-512) share.
pub trait BlockValues {
    /// `(n, k)`: weight rows, and values per row.
    fn dims(&self) -> (usize, usize);

    /// Weight `(j, kk)` as the kernels compute it (to within rounding).
    fn value(&self, j: usize, kk: usize) -> f32;

    /// The f32 values, row-major `[n, k]`.
    fn values(&self) -> Vec<f32> {
        let (n, k) = self.dims();
        (0..n)
            .flat_map(|j| (0..k).map(move |kk| self.value(j, kk)))
            .collect()
    }

    /// Checks the operands of a product of `m` rows `x` by the weight rows `cols` (a range of
    /// whole panels, or the last) into `out` (`[m, cols.len()]`); `op` names it in the panic.
    fn check_product(
        &self,
        op: &str,
        (m, x): (usize, &[f32]),
        cols: &std::ops::Range<usize>,
        out: &[MaybeUninit<f32>],
    ) {
        let (n, k) = self.dims();
        assert!(
            x.len() >= m * k
                && out.len() >= m * cols.len()
                && cols.start.is_multiple_of(PANEL)
                && cols.end <= n,
            "{op}: sizes"
        );
    }

    /// The product [`BlockValues::check_product`] checks, by plain loops.
    fn rows_by_values(
        &self,
        (m, x): (usize, &[f32]),
        cols: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (k, width) = (self.dims().1, cols.len());
        for r in 0..m {
            let row = &x[r * k..][..k];
            for (c, j) in cols.clone().enumerate() {
                let sum = row
                    .iter()
                    .enumerate()
                    .map(|(kk, &a)| a * self.value(j, kk))
                    .sum::<f32>();
                out[r * width + c].write(sum);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod bf16;
pub mod int4;
pub mod int8;
#[cfg(target_arch = "x86_64")]
mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_avx2;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_amx;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gemm::quant::QuantPanels;
    use crate::util::Rng64;

    /// int8 and int4 weights quantized from the same values (`n` rows of `k`), for tests over
    /// both schemes.
    pub(crate) fn both_schemes(
        w: &[f32],
        n: usize,
        k: usize,
    ) -> (int8::Int8Weights, int4::Int4Weights) {
        (
            int8::Int8Weights::quantize(w, n, k),
            int4::Int4Weights::quantize(w, n, k),
        )
    }

    /// `out` (`[m, n]`, every element written: NaN fails) against f64 dot products of the rows
    /// `x` (`[m, k]`) and the first `k` values of the weight rows `w` (`n` rows `stride`
    /// apart), to f32 rounding.
    pub(super) fn assert_products_match_dots(
        (m, n, k): (usize, usize, usize),
        x: &[f32],
        (w, stride): (&[f32], usize),
        out: &[MaybeUninit<f32>],
    ) {
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * stride + t] as f64)
                    .sum();
                // SAFETY: the caller initialised every element (NaN where unwritten).
                let got = unsafe { out[r * n + j].assume_init() } as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{m} x {n} x {k} of {stride} [{r}][{j}]: {got} vs {want}"
                );
            }
        }
    }

    /// Every path of `rows_by_weights` this CPU can run: the one it picks, and the AVX2 one
    /// that AVX-512 CPUs skip.
    #[allow(clippy::type_complexity)]
    fn paths() -> Vec<(
        &'static str,
        fn((usize, usize, usize), &[f32], &[f32], &mut [f32]),
    )> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut paths: Vec<(&str, fn(_, &[f32], &[f32], &mut [f32]))> =
            vec![("picked", rows_by_weights)];
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx2_fma() {
            paths.push(("avx2", |(m, n, k), x, w, out| {
                // SAFETY: AVX2 and FMA are available (checked); the test's slices are exact.
                unsafe { x86::rows_by_weights(m, k, n, x, w, out) }
            }));
        }
        paths
    }

    #[test]
    fn rows_by_weights_matches_plain_dots() {
        let mut rng = Rng64::new(3);
        for (m, k, n) in [
            (1, 64, 9),
            (2, 576, 4),
            (3, 13, 7),
            (8, 576, 33),
            (5, 1, 2),
            (7, 40, 1),
            (6, 200, 8),
            (32, 1536, 100),
            (9, 4000, 40),
            (17, 95, 31),
        ] {
            let x = rng.uniform_f32(m * k, 1.0);
            let w = rng.uniform_f32(n * k, 1.0);
            for (path, product) in paths() {
                let mut got = vec![f32::NAN; m * n];
                product((m, n, k), &x, &w, &mut got);
                for r in 0..m {
                    for j in 0..n {
                        let want = dot(&x[r * k..][..k], &w[j * k..][..k]);
                        let g = got[r * n + j];
                        assert!(
                            (g - want).abs()
                                <= 1e-4 * (1.0 + want.abs()) * (k as f32 / 64.0).max(1.0).sqrt(),
                            "{path} {m}x{k}x{n} [{r},{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Any rows of packed panels, a ragged last panel included, come back as they were; an id
    /// past the last row is refused.
    #[test]
    fn unpack_rows_gives_back_the_rows() {
        let (n, k) = (70, 45);
        let w = Rng64::new(5).uniform_f32(n * k, 1.0);
        let Some(panels) = pack_for_many_rows(&w, n, k) else {
            return; // no packed layout on this CPU
        };
        let ids = [0u32, 69, 31, 32, 64, 5, 5];
        let rows = unpack_rows(&panels, (n, k), &ids).expect("ids below n");
        for (i, &j) in ids.iter().enumerate() {
            assert_eq!(&rows[i * k..][..k], &w[j as usize * k..][..k], "row {j}");
        }
        assert!(unpack_rows(&panels, (n, k), &[70]).is_none());
        assert!(unpack_rows(&panels[..k], (n, k), &[0]).is_none());
        assert_eq!(unpack_rows(&panels, (n, k), &[]), Some(vec![]));
    }

    /// A row's products do not depend on the rows beside it: each output sums its `k` products
    /// in one order (int4 on AVX2: per block) whatever tile the row falls in, whether its panel
    /// was paired with the next (one row, AVX2) and whether it was widened in registers (few
    /// rows) or once into a buffer (many), so a request's greedy tokens do not depend on its
    /// batch. The kernel this CPU picks, and the AVX2 one where an AVX-512 CPU skips it.
    #[test]
    fn a_row_s_products_do_not_depend_on_its_batch() {
        fn check(
            which: &str,
            (n, k, m): (usize, usize, usize),
            x: &[f32],
            product: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]),
        ) {
            let run = |m: usize, x: &[f32]| {
                let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
                product(m, x, &mut out);
                // SAFETY: every element was initialised (to NaN) before the product.
                out.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let all = run(m, x);
            for r in [0, 5, m - 1] {
                let alone = run(1, &x[r * k..][..k]);
                assert_eq!(alone, all[r * n..][..n], "{which}, row {r} of {m}");
                let r = r.min(m - 2);
                let pair = run(2, &x[r * k..][..2 * k]);
                assert_eq!(pair, all[r * n..][..2 * n], "{which}, rows from {r} of {m}");
            }
        }
        let mut rng = Rng64::new(4);
        // 3 panels (a pair and one for a lone row), `k` ending in a partial block.
        let (n, k, m) = (70, 100, 31);
        let (w, x) = (rng.uniform_f32(n * k, 0.5), rng.uniform_f32(m * k, 1.0));
        let (q8, q4) = both_schemes(&w, n, k);
        // On AVX2, 31 rows read panels widened once into a buffer, 20 widen them in registers.
        for m in [m, 20] {
            check("int8", (n, k, m), &x, |m, x, out| {
                q8.rows_by_weights_uninit((m, x), 0..n, out)
            });
            check("int4", (n, k, m), &x, |m, x, out| {
                q4.rows_by_weights_uninit((m, x), 0..n, out)
            });
            // The AVX2 kernel, which an AVX-512 CPU does not dispatch to.
            #[cfg(target_arch = "x86_64")]
            if crate::device::cpu_has_avx2_fma() {
                check("int8, avx2", (n, k, m), &x, |m, x, out| {
                    let (q, scales) = q8.panels_from(0);
                    // SAFETY: AVX2, FMA and F16C checked; the panels are as quantized.
                    unsafe { packed_avx2::rows_by_panels((m, n, k), x, q, scales, out) }
                });
                check("int4, avx2", (n, k, m), &x, |m, x, out| {
                    let (q, dm) = q4.panels_from(0);
                    // SAFETY: as above.
                    unsafe { packed_avx2::rows_by_panels((m, n, k), x, q, dm, out) }
                });
            }
        }
    }

    /// The int8 and int4 kernels against products of their dequantized values: row counts
    /// around the kernels' tiles (12; on AVX2 6, and 24, beyond which panels are widened once
    /// into a buffer), features around the panels (32) and their halves, `k` not a multiple of a
    /// block; all features, and a range of whole panels.
    #[test]
    fn block_products_equal_their_values() {
        fn check<W: QuantPanels>((m, x): (usize, &[f32]), cols: std::ops::Range<usize>, w: &W) {
            let ((_, k), width) = (w.dims(), cols.len());
            let mut out = vec![MaybeUninit::new(f32::NAN); m * width];
            w.rows_by_weights_uninit((m, x), cols.clone(), &mut out);
            let values = w.values();
            assert_products_match_dots((m, width, k), x, (&values[cols.start * k..], k), &out);
        }
        let mut rng = Rng64::new(2);
        for (m, n, k, cols) in [
            (1, 1, 32, 0..1),
            (3, 7, 70, 0..7),
            (12, 40, 64, 0..40),
            (13, 70, 576, 32..70),
            (25, 64, 5, 0..32),
            (2, 20, 33, 0..20),
            (7, 57, 40, 0..57),
            (1, 100, 70, 0..100),
            (1, 130, 40, 32..130),
        ] {
            let x = rng.uniform_f32(m * k, 1.0);
            let w = rng.uniform_f32(n * k, 0.5);
            let (q8, q4) = both_schemes(&w, n, k);
            check((m, &x), cols.clone(), &q8);
            check((m, &x), cols, &q4);
        }
    }
}
