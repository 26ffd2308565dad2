//! Kernel launches described apart from the driver that runs them: the grid, the block, the
//! dynamic shared memory and the arguments in the kernel's order, with buffers named by a
//! caller's enum. The CUDA launches (cudarc) and the CPU emulator of the kernels (`simt`, for
//! tests) both execute these descriptions, so what the tests run is what the GPU runs.

/// One kernel argument: a buffer (`B` names it; each executor maps names to memory) or a scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg<B> {
    Buf(B),
    I32(i32),
    F32(f32),
}

/// One launch of a kernel of `kernels/*.cu`.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch<B> {
    /// The entry point, with its dtype suffix (`attention_tiles_bf16`).
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory.
    pub shared_bytes: u32,
    pub args: Vec<Arg<B>>,
}

/// Threads per block of the one-thread-per-element kernels (as cudarc's `for_num_elems`).
pub const ELEMENTWISE_THREADS: u32 = 1024;

impl<B> Launch<B> {
    /// A launch of `kernel` over a grid of blocks of `block` threads.
    pub fn new(kernel: String, grid: [u32; 3], block: u32, args: Vec<Arg<B>>) -> Self {
        Self {
            kernel,
            grid,
            block: [block, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// One thread per element of `n`.
    pub fn elementwise(kernel: String, n: usize, args: Vec<Arg<B>>) -> Self {
        let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).max(1) as u32;
        Self::new(kernel, [blocks, 1, 1], ELEMENTWISE_THREADS, args)
    }

    pub fn with_shared_bytes(mut self, bytes: usize) -> Self {
        self.shared_bytes = bytes as u32;
        self
    }
}

/// The kernel-name suffix of an element type (`attention_tiles_bf16`, ...).
pub fn suffix(dtype: candle_core::DType) -> candle_core::Result<&'static str> {
    use candle_core::DType;
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("no CUDA kernel for {other:?}"),
    })
}

impl<B> Arg<B> {
    /// A size or count, which the kernels take as `int` (saturating; a step's sizes are far
    /// below `i32::MAX`).
    pub fn int(n: usize) -> Self {
        Arg::I32(i32::try_from(n).unwrap_or(i32::MAX))
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! Running a [`Launch`](super::Launch) with cudarc.
    use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

    use super::{Arg, Launch};

    impl<B> Launch<B> {
        pub fn config(&self) -> LaunchConfig {
            LaunchConfig {
                grid_dim: (self.grid[0], self.grid[1], self.grid[2]),
                block_dim: (self.block[0], self.block[1], self.block[2]),
                shared_mem_bytes: self.shared_bytes,
            }
        }
    }

    /// Pushes `l`'s arguments in order: scalars from the description, buffers through `buf`.
    pub fn push_args<'a, B: Copy>(
        args: &mut LaunchArgs<'a>,
        l: &'a Launch<B>,
        mut buf: impl FnMut(&mut LaunchArgs<'a>, B) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        for a in &l.args {
            match a {
                Arg::Buf(b) => buf(args, *b)?,
                Arg::I32(v) => {
                    args.arg(v);
                }
                Arg::F32(v) => {
                    args.arg(v);
                }
            }
        }
        Ok(())
    }

    /// The error for a buffer a launch names twice or the step lacks.
    pub fn missing<B: std::fmt::Debug>(l: &Launch<B>, b: B) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: buffer {b:?} is missing or passed twice",
            l.kernel
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_launches_cover_every_element_with_one_thread() {
        for n in [0usize, 1, 1023, 1024, 1025, 5000] {
            let l: Launch<()> = Launch::elementwise("k".into(), n, vec![]);
            let threads = l.grid[0] as usize * l.block[0] as usize;
            assert!(threads >= n, "{n}");
            assert!(threads < n + ELEMENTWISE_THREADS as usize || n == 0);
            assert_eq!(l.grid[1] * l.grid[2] * l.block[1] * l.block[2], 1);
        }
    }
}
