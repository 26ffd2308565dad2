//! Products of f32 rows with bf16 weights on the CPU (`--dtype bf16`), by one of three kernels,
//! all reading half the weight bytes of f32 and summing in f32:
//! - [`dot`]: the rows rounded to bf16 once per call, 32 products of bf16 pairs (exact in f32)
//!   per `vdpbf16ps`, twice an f32 FMA's 16;
//! - [`widen`]: the weights widened to f32 in registers and multiplied by f32 FMAs, the rows
//!   kept in f32;
//! - [`amx`]: the rows rounded to bf16 too, multiplied by the matrix unit of Intel CPUs with
//!   AMX, 8192 products per `tdpbf16ps`;
//! - on CPUs without AVX-512, `gemm::x86`'s AVX2 dot products with the weights widened to f32
//!   in registers (a shift each), the rows kept in f32.
//!
//! Which is faster depends on the CPU, not on its vendor's feature list: on the AMD EPYC (Zen 4)
//! build machine one core ran 233 GFLOP/s of `vdpbf16ps` against 117 of f32 FMAs, on an Intel
//! Xeon with AVX-512 BF16 107 against 214 (docs/cpu-performance.md). So the process times those
//! it has once, at its first product ([`Bf16Kernel::chosen`]). Without AVX2 the same products
//! run as plain loops (correct, slow).

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::as_uninit;

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
mod dot;
#[cfg(target_arch = "x86_64")]
mod widen;

/// A way to multiply f32 rows by bf16 weights; each reads its rows in its own form
/// ([`Bf16Rows`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on rows rounded to bf16 (AVX-512 F, BW and BF16).
    Dot,
    /// f32 FMAs on weights widened in registers, rows in f32 (AVX-512 F and BW).
    Widen,
    /// `tdpbf16ps` on rows rounded to bf16 (`Dot`'s features, AMX-TILE and AMX-BF16); products
    /// whose `k` is not a multiple of 32 run `Dot`.
    Amx,
    /// f32 FMAs on weights widened in registers, rows in f32, 256 bits at a time (AVX2 and FMA,
    /// on CPUs without AVX-512, which have none of the others).
    Avx2,
    /// Plain loops on rows rounded to bf16 (any CPU).
    Plain,
}

impl Bf16Kernel {
    /// The fast kernels this CPU can run (none without AVX-512).
    pub fn available() -> Vec<Self> {
        [Self::Dot, Self::Widen, Self::Amx, Self::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU has what the kernel needs (cached feature checks; no allocation, as it
    /// guards every product).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = crate::device::cpu_has_avx512_bw();
            let dot = avx512 && is_x86_feature_detected!("avx512bf16");
            match self {
                Self::Dot => dot,
                Self::Widen => avx512,
                Self::Amx => dot && amx::usable(),
                Self::Avx2 => !avx512 && crate::device::cpu_has_avx2_fma(),
                Self::Plain => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Plain
        }
    }

    /// The kernel every product of this process uses: the fastest on a start-up measurement
    /// where there are several, [`Self::Plain`] where there are none.
    pub fn chosen() -> Self {
        chosen().0
    }

    /// One line for the user: the kernel and, where there was a choice, what was measured.
    pub fn describe() -> String {
        let (kernel, timed) = chosen();
        let what = match kernel {
            Self::Dot => "vdpbf16ps on rows rounded to bf16",
            Self::Widen => "f32 FMAs on weights widened in registers",
            Self::Amx => "AMX tdpbf16ps on rows rounded to bf16",
            Self::Avx2 => "f32 FMAs on weights widened in registers (AVX2)",
            Self::Plain => "plain loops (no AVX2 here; slow: --dtype f32 is faster)",
        };
        if timed.is_empty() {
            return format!("bf16 products: {what}");
        }
        let rates: Vec<String> = timed
            .iter()
            .map(|(k, t)| format!("{} {:.0}", k.short_name(), gflops(*t)))
            .collect();
        format!(
            "bf16 products: {what} (one core at start-up, GFLOP/s: {})",
            rates.join(", ")
        )
    }

    /// The kernel's name in the start-up measurement's line.
    fn short_name(self) -> &'static str {
        match self {
            Self::Dot => "vdpbf16ps",
            Self::Widen => "widened",
            Self::Amx => "AMX",
            Self::Avx2 => "AVX2",
            Self::Plain => "plain",
        }
    }
}

/// The start-up measurement's product: whole register tiles for the AVX-512 kernels (4 x 4 and
/// 8 x 3) and whole blocks of weight rows for AMX (32), few enough weights (108 KiB) to stay in
/// L2, so that it times the arithmetic, not memory.
const PROBE: (usize, usize, usize) = (24, 96, 576);

fn gflops(t: Duration) -> f64 {
    let (m, n, k) = PROBE;
    2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9
}

/// The chosen kernel and, where several were timed, each one's best time on [`PROBE`].
fn chosen() -> &'static (Bf16Kernel, Vec<(Bf16Kernel, Duration)>) {
    static CHOSEN: OnceLock<(Bf16Kernel, Vec<(Bf16Kernel, Duration)>)> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let kernels = Bf16Kernel::available();
        match kernels.as_slice() {
            [] => (Bf16Kernel::Plain, Vec::new()),
            [one] => (*one, Vec::new()),
            _ => {
                let timed = time_each(&kernels);
                let fastest = timed
                    .iter()
                    .min_by_key(|(_, t)| *t)
                    .map_or(Bf16Kernel::Plain, |(k, _)| *k);
                (fastest, timed)
            }
        }
    })
}

/// The best of several timings of [`PROBE`] by each kernel, alternating (a few milliseconds in
/// all).
fn time_each(kernels: &[Bf16Kernel]) -> Vec<(Bf16Kernel, Duration)> {
    let (m, n, k) = PROBE;
    let mut rng = crate::util::Rng64::new(1);
    let x = rng.uniform_f32(m * k, 1.0);
    let w: Vec<bf16> = rng
        .uniform_f32(n * k, 0.1)
        .iter()
        .map(|v| bf16::from_f32(*v))
        .collect();
    let rows: Vec<Bf16Rows> = kernels
        .iter()
        .map(|kernel| Bf16Rows::prepare(*kernel, &x, k))
        .collect();
    let mut out = vec![0f32; m * n];
    let mut best = vec![Duration::MAX; kernels.len()];
    for _ in 0..8 {
        for (b, r) in best.iter_mut().zip(&rows) {
            let start = Instant::now();
            for _ in 0..4 {
                rows_by_weights_bf16(r, 0..m, (n, &w), &mut out);
                std::hint::black_box(&mut out);
            }
            *b = (*b).min(start.elapsed() / 4);
        }
    }
    kernels.iter().copied().zip(best).collect()
}

/// Rows of `x`, prepared once per product in the form a kernel reads.
pub struct Bf16Rows {
    kernel: Bf16Kernel,
    m: usize,
    k: usize,
    data: RowData,
}

enum RowData {
    /// Rounded to nearest even, `k` apart.
    Bf16(Vec<bf16>),
    /// Split steps (`widen::split_row`), `widen::split_len(k)` apart.
    #[cfg(target_arch = "x86_64")]
    Split(Vec<f32>),
    /// Rounded to bf16 and paired for AMX tiles (`amx::pair_rows`): `k / 2` rows of `stride`.
    #[cfg(target_arch = "x86_64")]
    Pairs { pairs: Vec<u32>, stride: usize },
    /// As they are, `k` apart (`Avx2`).
    #[cfg(target_arch = "x86_64")]
    F32(Vec<f32>),
}

impl Bf16Rows {
    /// `x` (`[x.len() / k, k]`, row-major) for `kernel`, which this CPU must have (the
    /// kernels' safety rests on this check); rows prepared in parallel.
    pub fn prepare(kernel: Bf16Kernel, x: &[f32], k: usize) -> Self {
        assert!(
            kernel.runs_here(),
            "Bf16Rows: this CPU cannot run the {kernel:?} kernel"
        );
        assert!(
            k > 0 && x.len().is_multiple_of(k),
            "Bf16Rows: {} values in rows of {k}",
            x.len()
        );
        let m = x.len() / k;
        let data = match kernel {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Widen => {
                let kp = widen::split_len(k);
                let mut dst = vec![0f32; m * kp];
                dst.par_chunks_mut(kp)
                    .zip(x.par_chunks(k))
                    .with_min_len(8)
                    // SAFETY: AVX-512 F is present (checked above) and each chunk is
                    // `split_len(k)` long.
                    .for_each(|(d, s)| unsafe { widen::split_row(s, d) });
                RowData::Split(dst)
            }
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx2 => RowData::F32(x.to_vec()),
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Amx if k.is_multiple_of(amx::K_STEP) => {
                let (stride, len) = (amx::pair_stride(m), k / 2 * amx::pair_stride(m));
                let mut pairs: Vec<u32> = Vec::with_capacity(len);
                pairs.spare_capacity_mut()[..len]
                    .par_chunks_mut(amx::K_STEP / 2 * stride)
                    .enumerate()
                    // SAFETY: `Amx` runs here (checked above), so AVX-512 F, BW and BF16 are
                    // present; `k` is a multiple of 32, each chunk is one step's 16 pair rows.
                    .for_each(|(step, d)| unsafe { amx::pair_rows(x, k, step, stride, d) });
                // SAFETY: `pair_rows` wrote every element of its chunk, and the chunks (`k / 32`
                // of 16 pair rows) cover the `len` elements.
                unsafe { pairs.set_len(len) };
                RowData::Pairs { pairs, stride }
            }
            _ => {
                let mut dst = Vec::with_capacity(m * k);
                dst.spare_capacity_mut()[..m * k]
                    .par_chunks_mut(k)
                    .zip(x.par_chunks(k))
                    .with_min_len(8)
                    .for_each(|(d, s)| round_to_bf16(kernel, s, d));
                // SAFETY: `round_to_bf16` wrote every element of the `m` rows of `k`.
                unsafe { dst.set_len(m * k) };
                RowData::Bf16(dst)
            }
        };
        Self { kernel, m, k, data }
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.m
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.m == 0
    }

    /// The weight rows the kernel takes at a time: a product split over weight rows runs best
    /// in multiples of it (AMX pads a partial block of 32 with zero rows).
    pub fn weight_block(&self) -> usize {
        match self.data {
            #[cfg(target_arch = "x86_64")]
            RowData::Pairs { .. } => amx::W_BLOCK,
            _ => 1,
        }
    }
}

/// Whether [`rows_by_weights_bf16_silu_uninit`] runs for `x` and a gate/up matrix of `2h` rows:
/// rows paired for AMX, and `h` a multiple of 16.
pub fn silu_fits(x: &Bf16Rows, h: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(x.data, RowData::Pairs { .. }) && h.is_multiple_of(16);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, h);
        false
    }
}

/// `out[i * h + j] = silu(x[rows.start + i] . w[j]) * (x[rows.start + i] . w[h + j])` for a
/// gate/up matrix `w` (`[2h, k]`, gate rows first), into outputs not yet written (every one of
/// the `rows.len() * h` is): the product and the MLP's activation in one pass, on AMX
/// (`amx::rows_by_weights_silu`), where [`silu_fits`].
pub fn rows_by_weights_bf16_silu_uninit(
    x: &Bf16Rows,
    rows: Range<usize>,
    (h, w): (usize, &[bf16]),
    out: &mut [MaybeUninit<f32>],
) {
    let (k, m) = (x.k, rows.len());
    assert!(
        silu_fits(x, h) && rows.end <= x.m && w.len() >= 2 * h * k && out.len() >= m * h,
        "rows_by_weights_bf16_silu_uninit: sizes or rows not paired for AMX"
    );
    #[cfg(target_arch = "x86_64")]
    if let RowData::Pairs { pairs, stride } = &x.data {
        // SAFETY: `prepare` paired the rows only after checking that this CPU has `Amx`, and
        // only for `k` a multiple of 32; `h` is a multiple of 16 and the assert above bounds
        // the rows, the `2h` weight rows and the outputs.
        unsafe { amx::rows_by_weights_silu((h, k), (pairs, *stride), rows, w, out) };
    }
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even (as `vcvtne2ps2bf16` does; subnormal inputs
/// there become zero, which no activation of a model at work is); every element of `dst` is
/// written, so it need not be initialised.
fn round_to_bf16(kernel: Bf16Kernel, src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len(), "round_to_bf16: lengths");
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Bf16Kernel::Dot | Bf16Kernel::Amx) && kernel.runs_here() {
        // SAFETY: this CPU has the kernel (checked), and `Amx` needs what `Dot` does; the
        // lengths are equal (checked).
        unsafe { dot::round(src, dst) };
        return;
    }
    let _ = kernel;
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(bf16::from_f32(*s));
    }
}

/// `out[i * n + j] = x[rows.start + i] . w[j]` for `w` `[n, k]` (row-major), summed in f32:
/// `gemm::rows_by_weights` for bf16 weights, at any number of rows (callers keep a call's rows
/// few enough for L2: they are read once per block of weight rows).
pub fn rows_by_weights_bf16(
    x: &Bf16Rows,
    rows: Range<usize>,
    (n, w): (usize, &[bf16]),
    out: &mut [f32],
) {
    let (k, m) = (x.k, rows.len());
    assert!(
        rows.end <= x.m && w.len() >= n * k && out.len() >= m * n,
        "rows_by_weights_bf16: sizes"
    );
    match (&x.data, x.kernel) {
        #[cfg(target_arch = "x86_64")]
        (RowData::Bf16(xb), Bf16Kernel::Dot | Bf16Kernel::Amx) => {
            // SAFETY: `prepare` checked that this CPU has `Dot` (or `Amx`, which needs as
            // much); the assert above bounds every access.
            unsafe { dot::rows_by_weights(m, k, n, &xb[rows.start * k..], w, out) };
        }
        #[cfg(target_arch = "x86_64")]
        (RowData::Split(xs), _) => {
            let kp = widen::split_len(k);
            // SAFETY: `prepare` made split rows only after checking that this CPU has `Widen`;
            // the assert above bounds every access (split rows are `kp` long).
            unsafe { widen::rows_by_weights((m, n, k), &xs[rows.start * kp..], w, out) };
        }
        #[cfg(target_arch = "x86_64")]
        (RowData::F32(xs), _) => {
            // SAFETY: `prepare` kept the rows in f32 only after checking that this CPU has
            // `Avx2` (AVX2 and FMA); the assert above bounds every access.
            unsafe { super::x86::rows_by_weights(m, k, n, &xs[rows.start * k..], w, out) };
        }
        #[cfg(target_arch = "x86_64")]
        (RowData::Pairs { pairs, stride }, _) => {
            // SAFETY: `prepare` paired the rows only after checking that this CPU has `Amx`,
            // and only for `k` a multiple of 32; the pairs hold `k / 2` rows of
            // `pair_stride(x.m)`, and the assert above bounds the rows, weights and outputs.
            unsafe { amx::rows_by_weights((n, k), (pairs, *stride), rows, (w, k), as_uninit(out)) };
        }
        (RowData::Bf16(xb), _) => {
            for (i, r) in rows.enumerate() {
                for j in 0..n {
                    out[i * n + j] = xb[r * k..][..k]
                        .iter()
                        .zip(&w[j * k..][..k])
                        .map(|(a, b)| a.to_f32() * b.to_f32())
                        .sum();
                }
            }
        }
    }
}

/// [`rows_by_weights_bf16`] into outputs not yet written (`out[..rows.len() * n]`, every one
/// of which it writes): the AMX kernel stores each output once, so its products skip the
/// zeroing of their output buffer (which, for the activations of a prefill, is a `memset` of
/// hundreds of MB per layer); the other kernels get zeros first.
pub fn rows_by_weights_bf16_uninit(
    x: &Bf16Rows,
    rows: Range<usize>,
    (n, w): (usize, &[bf16]),
    out: &mut [MaybeUninit<f32>],
) {
    let (k, m) = (x.k, rows.len());
    assert!(
        rows.end <= x.m && w.len() >= n * k && out.len() >= m * n,
        "rows_by_weights_bf16_uninit: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if let RowData::Pairs { pairs, stride } = &x.data {
        // SAFETY: as in `rows_by_weights_bf16`; the kernel writes every output of the rows.
        unsafe { amx::rows_by_weights((n, k), (pairs, *stride), rows, (w, k), out) };
        return;
    }
    rows_by_weights_bf16(x, rows, (n, w), super::zeroed(&mut out[..m * n]));
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even, 32 values per instruction where AMX runs
/// (whose CPUs have AVX-512 BF16), one by one elsewhere: for callers preparing AMX operands (the
/// int8 kernel's rows, `gemm::int8`). Every element of `dst` is written.
pub fn round_for_amx(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    let kernel = if Bf16Kernel::Amx.runs_here() {
        Bf16Kernel::Amx
    } else {
        Bf16Kernel::Plain
    };
    round_to_bf16(kernel, src, dst);
}

/// `dst[j * ld_dst + i] = bf16(src[i * ld_src + j])` for `i, j < 16`, rounded to nearest even:
/// for callers laying out [`amx_rows_by_weights`]' operands from data stored the other way
/// round (prefill attention's K and V blocks). Callers check [`Bf16Kernel::Amx`]'s `runs_here`
/// first (its CPUs have AVX-512 BF16).
pub fn transpose16_to_bf16(src: &[f32], ld_src: usize, dst: &mut [bf16], ld_dst: usize) {
    assert!(
        Bf16Kernel::Amx.runs_here()
            && src.len() >= 15 * ld_src + 16
            && dst.len() >= 15 * ld_dst + 16,
        "transpose16_to_bf16: {} values by {ld_src} into {} by {ld_dst}",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX runs here, so AVX-512 F and BF16 do; the assert bounds both sides.
    unsafe {
        amx::transpose16_to_bf16(src, ld_src, dst, ld_dst)
    };
}

/// `out[i * n + j] = x[i] . w[j]` for f32 rows `x` (`[m, k]`) rounded to bf16 and bf16 `w`
/// (`n` rows of `k` from `w[j * ldw]`, `ldw >= k`) on the AMX unit, on the calling thread: for
/// kernels that parallelise over their own work items (prefill attention under `--dtype bf16`,
/// whose tiles read the first keys of a sequence's values). `pairs` is the caller's reusable
/// buffer for the rows in the unit's form. Callers check [`Bf16Kernel::Amx`]'s `runs_here`
/// first; `k` must be a multiple of 32.
pub fn amx_rows_by_weights(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (w, ldw): (&[bf16], usize),
    pairs: &mut Vec<u32>,
    out: &mut [f32],
) {
    assert!(
        Bf16Kernel::Amx.runs_here(),
        "amx_rows_by_weights: this CPU cannot run AMX"
    );
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            k.is_multiple_of(amx::K_STEP)
                && ldw >= k
                && x.len() >= m * k
                && (n == 0 || w.len() >= (n - 1) * ldw + k)
                && out.len() >= m * n,
            "amx_rows_by_weights: sizes ({m} x {k} by {n} x {k}, rows {ldw} apart)"
        );
        let stride = amx::pair_stride(m);
        let step_len = amx::K_STEP / 2 * stride;
        if pairs.len() < k / 2 * stride {
            pairs.resize(k / 2 * stride, 0);
        }
        for (step, d) in pairs
            .chunks_exact_mut(step_len)
            .take(k / amx::K_STEP)
            .map(as_uninit)
            .enumerate()
        {
            // SAFETY: AMX runs here (checked), which implies AVX-512 F, BW and BF16; `k` is a
            // multiple of 32 and each chunk is one step's 16 pair rows of `stride`.
            unsafe { amx::pair_rows(&x[..m * k], k, step, stride, d) };
        }
        // SAFETY: AMX runs here (checked); the pairs hold `k / 2` rows of `pair_stride(m)`,
        // and the assert above bounds the weights and outputs.
        unsafe { amx::rows_by_weights((n, k), (pairs, stride), 0..m, (w, ldw), as_uninit(out)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, n, k, x, w, ldw, pairs, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|x| bf16::from_f32(*x)).collect()
    }

    /// Every kernel this CPU has, and the plain loops.
    fn kernels() -> Vec<Bf16Kernel> {
        let mut all = Bf16Kernel::available();
        all.push(Bf16Kernel::Plain);
        all
    }

    #[test]
    fn rounding_matches_half() {
        let src = Rng64::new(5).uniform_f32(101, 3.0);
        for kernel in [Bf16Kernel::Dot, Bf16Kernel::Plain] {
            if !kernels().contains(&kernel) {
                continue;
            }
            let mut got = vec![MaybeUninit::new(bf16::NAN); src.len()];
            round_to_bf16(kernel, &src, &mut got);
            // SAFETY: every element was initialised (NaN) before the rounding overwrote it.
            let got: Vec<bf16> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(got, to_bf16(&src), "{kernel:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn split_rows_put_even_values_before_odd_and_pad_with_zeros() {
        if !Bf16Kernel::available().contains(&Bf16Kernel::Widen) {
            return;
        }
        for k in [1, 31, 32, 33, 95] {
            let src: Vec<f32> = (1..=k).map(|v| v as f32).collect();
            let mut got = vec![f32::NAN; widen::split_len(k)];
            // SAFETY: AVX-512 F is present (`Widen` is available); `got` is split_len(k) long.
            unsafe { widen::split_row(&src, &mut got) };
            let want: Vec<f32> = (0..got.len())
                .map(|i| {
                    let (step, t) = (i / 32, i % 32);
                    let at = step * 32 + if t < 16 { 2 * t } else { 2 * (t - 16) + 1 };
                    src.get(at).copied().unwrap_or(0.0)
                })
                .collect();
            assert_eq!(got, want, "k = {k}");
        }
    }

    /// Each kernel against f64 sums over the rows as it reads them (rounded to bf16 by `Dot`
    /// and the plain loops, f32 by `Widen` and `Avx2`), from rows other than the first, into outputs
    /// poisoned with NaN.
    #[test]
    fn products_match_plain_dots() {
        let mut rng = Rng64::new(9);
        for (m, k, n) in [
            (1, 64, 9),
            (2, 576, 4),
            (3, 13, 7),
            (4, 32, 8),
            (8, 576, 33),
            (5, 1, 2),
            (7, 40, 1),
            (6, 200, 8),
            (13, 1536, 23),
            (33, 95, 17),
            // Several weight panels of the widening kernel, the last one ragged.
            (3, 1536, 100),
            (9, 4000, 40),
            // AMX: two tiles of rows then one, the second of a pair partly past the rows, and
            // weight blocks of 32 with a ragged last one.
            (40, 64, 70),
            (20, 128, 32),
        ] {
            let skip = 2;
            let x = rng.uniform_f32((m + skip) * k, 1.0);
            let w = to_bf16(&rng.uniform_f32(n * k, 1.0));
            for kernel in kernels() {
                let rows = Bf16Rows::prepare(kernel, &x, k);
                assert_eq!(rows.len(), m + skip);
                let mut got = vec![f32::NAN; m * n];
                rows_by_weights_bf16(&rows, skip..skip + m, (n, &w), &mut got);
                for r in 0..m {
                    for j in 0..n {
                        let xr = &x[(skip + r) * k..][..k];
                        let want: f64 = (0..k)
                            .map(|t| {
                                let a = match kernel {
                                    Bf16Kernel::Widen | Bf16Kernel::Avx2 => xr[t] as f64,
                                    _ => bf16::from_f32(xr[t]).to_f64(),
                                };
                                a * w[j * k + t].to_f64()
                            })
                            .sum();
                        let g = got[r * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{kernel:?} {m}x{k}x{n} [{r},{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The gate/up product fused with SiLU x mul equals the product, then the activation, bit
    /// for bit on the same kernel: rows in one tile and in several, the last partly past the
    /// rows, a sub-range of the rows, one and several blocks of 16 features.
    #[test]
    fn silu_product_equals_product_then_activation() {
        if !Bf16Kernel::Amx.runs_here() {
            return;
        }
        let mut rng = Rng64::new(23);
        for (m, h, k) in [(40, 32, 64), (17, 16, 96), (100, 48, 32)] {
            let x = rng.uniform_f32(m * k, 1.0);
            let w = to_bf16(&rng.uniform_f32(2 * h * k, 1.0));
            let xb = Bf16Rows::prepare(Bf16Kernel::Amx, &x, k);
            assert!(silu_fits(&xb, h) && !silu_fits(&xb, h + 8));
            let mut both = vec![f32::NAN; m * 2 * h];
            rows_by_weights_bf16(&xb, 0..m, (2 * h, &w), &mut both);
            let rows = 3..m;
            let mut got = vec![MaybeUninit::new(f32::NAN); rows.len() * h];
            rows_by_weights_bf16_silu_uninit(&xb, rows.clone(), (h, &w), &mut got);
            for (i, r) in rows.enumerate() {
                for j in 0..h {
                    let (g, u) = (both[r * 2 * h + j], both[r * 2 * h + h + j]);
                    let want = crate::fastmath::silu(g) * u;
                    // SAFETY: initialised above.
                    let x = unsafe { got[i * h + j].assume_init() };
                    assert_eq!(x.to_bits(), want.to_bits(), "{m} x {h} x {k}: [{r}][{j}]");
                }
            }
        }
    }

    /// The single-threaded entry point against f64 sums of the rounded operands, reusing one
    /// buffer of pairs across shapes.
    #[test]
    fn amx_rows_by_weights_matches_plain_dots() {
        if !Bf16Kernel::Amx.runs_here() {
            return;
        }
        let mut rng = Rng64::new(21);
        let mut pairs = Vec::new();
        // Rows `ldw` apart, the first `k` of each used: contiguous, and the first keys of
        // longer rows (the padded tail copy too, where `n` is no multiple of 32).
        for (m, n, k, ldw) in [
            (64, 96, 64, 64),
            (3, 40, 128, 128),
            (64, 64, 512, 512),
            (17, 5, 32, 32),
            (64, 64, 96, 160),
            (9, 40, 32, 100),
        ] {
            let x = rng.uniform_f32(m * k, 1.0);
            // NaN past each row's `k`: a read beyond the row shows in the products.
            let mut w = to_bf16(&rng.uniform_f32(n * ldw, 1.0));
            for row in w.chunks_exact_mut(ldw) {
                row[k..].fill(bf16::NAN);
            }
            let mut got = vec![f32::NAN; m * n];
            amx_rows_by_weights((m, n, k), &x, (&w, ldw), &mut pairs, &mut got);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| bf16::from_f32(x[r * k + t]).to_f64() * w[j * ldw + t].to_f64())
                        .sum();
                    let g = got[r * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                        "{m}x{k}x{n} [{r},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose16_to_bf16_transposes_and_rounds() {
        if !Bf16Kernel::Amx.runs_here() {
            return;
        }
        let (ld_src, ld_dst) = (21, 37);
        let src = Rng64::new(8).uniform_f32(15 * ld_src + 16, 3.0);
        let mut dst = vec![bf16::NAN; 15 * ld_dst + 16];
        transpose16_to_bf16(&src, ld_src, &mut dst, ld_dst);
        for (at, x) in dst.iter().enumerate() {
            let (j, i) = (at / ld_dst, at % ld_dst);
            if i < 16 {
                assert_eq!(
                    x.to_bits(),
                    bf16::from_f32(src[i * ld_src + j]).to_bits(),
                    "{j} {i}"
                );
            } else {
                assert!(x.is_nan(), "wrote {j} {i}");
            }
        }
    }

    #[test]
    fn the_chosen_kernel_is_one_this_cpu_has() {
        let chosen = Bf16Kernel::chosen();
        let available = Bf16Kernel::available();
        if available.is_empty() {
            assert_eq!(chosen, Bf16Kernel::Plain);
        } else {
            assert!(available.contains(&chosen), "{chosen:?} of {available:?}");
        }
        assert!(Bf16Kernel::describe().starts_with("bf16 products: "));
    }
}
