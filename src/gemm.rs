//! Single-threaded f32 matrix products for the CPU kernels (which parallelise across their
//! own work items), through the `gemm` crate with every access bounds-checked up front.

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
