//! The CUDA kernels of `kernels/` run on the CPU (cargo feature `simt`): `kernels/simt/simt.cpp`
//! compiles them as C++ and runs every GPU thread as a fiber, switching only where CUDA threads
//! synchronise, so a test can run the exact [`Launch`] a GPU would and compare the result with
//! the CPU reference. Launch errors (a barrier or warp operation some threads never reach, an
//! access outside an argument or the shared memory, a write to an input, a geometry the GPU
//! refuses) come back as errors naming the kernel, block and thread.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::fmt::Debug;
use std::hash::Hash;

use anyhow::{Context, Result, bail};

use crate::launch::{Arg, Launch};

#[repr(C)]
struct RawArg {
    kind: u8,
    writable: u8,
    len: u64,
    ptr: *mut c_void,
    i: i32,
    f: f32,
}

impl RawArg {
    /// An argument of `kind` (`p`, `i` or `f`) with every other field empty.
    fn of_kind(kind: u8) -> Self {
        Self {
            kind,
            writable: 0,
            len: 0,
            ptr: std::ptr::null_mut(),
            i: 0,
            f: 0.0,
        }
    }
}

unsafe extern "C" {
    fn simt_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        schedule: u32,
        args: *const RawArg,
        nargs: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// How the emulator orders a block's threads between barriers, and which side of each buffer
/// its guard page is on. Running both catches a read that races with its write (a missing
/// barrier) and an access past either end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Threads in index order, guard pages after the buffers.
    Forward,
    /// Threads in reverse order, guard pages before the buffers.
    Reverse,
}

impl Schedule {
    pub const BOTH: [Schedule; 2] = [Schedule::Forward, Schedule::Reverse];

    fn bits(self) -> u32 {
        match self {
            Schedule::Forward => 0,
            Schedule::Reverse => 3,
        }
    }
}

struct Buffer {
    bytes: Vec<u8>,
    writable: bool,
}

/// Host memory for described launches: buffers by name, inputs read-only to the kernels.
pub struct Memory<B> {
    buffers: HashMap<B, Buffer>,
}

impl<B> Default for Memory<B> {
    fn default() -> Self {
        Self {
            buffers: HashMap::new(),
        }
    }
}

impl<B: Copy + Eq + Hash + Debug> Memory<B> {
    /// A buffer the kernels only read (writing it is a launch error).
    pub fn input<T: bytemuck::Pod>(&mut self, name: B, data: &[T]) {
        self.put(name, data, false);
    }

    /// A buffer the kernels may write, starting as `data` (poison, for outputs).
    pub fn output<T: bytemuck::Pod>(&mut self, name: B, data: &[T]) {
        self.put(name, data, true);
    }

    fn put<T: bytemuck::Pod>(&mut self, name: B, data: &[T], writable: bool) {
        let bytes = bytemuck::cast_slice(data).to_vec();
        self.buffers.insert(name, Buffer { bytes, writable });
    }

    /// A buffer's contents as `T`s.
    pub fn read<T: bytemuck::Pod>(&self, name: B) -> Result<Vec<T>> {
        let b = self
            .buffers
            .get(&name)
            .with_context(|| format!("no buffer {name:?}"))?;
        Ok(bytemuck::pod_collect_to_vec(&b.bytes))
    }

    /// Runs `l` with its buffers taken from this memory.
    pub fn run(&mut self, l: &Launch<B>, schedule: Schedule) -> Result<()> {
        let mut raw = Vec::with_capacity(l.args.len());
        let mut seen = std::collections::HashSet::new();
        for a in &l.args {
            raw.push(match a {
                Arg::Buf(name) => {
                    if !seen.insert(*name) {
                        bail!("{}: buffer {name:?} passed twice", l.kernel);
                    }
                    let b = self.buffers.get_mut(name).with_context(|| {
                        format!("{}: no buffer {name:?} in this memory", l.kernel)
                    })?;
                    RawArg {
                        writable: u8::from(b.writable),
                        len: b.bytes.len() as u64,
                        ptr: b.bytes.as_mut_ptr().cast(),
                        ..RawArg::of_kind(b'p')
                    }
                }
                Arg::I32(i) => RawArg {
                    i: *i,
                    ..RawArg::of_kind(b'i')
                },
                Arg::F32(f) => RawArg {
                    f: *f,
                    ..RawArg::of_kind(b'f')
                },
            });
        }
        let name = CString::new(l.kernel.as_str()).context("kernel name")?;
        let mut err = vec![0u8; 1024];
        // SAFETY: every pointer argument points at a distinct live buffer of `len` bytes,
        // exclusively borrowed from `self` for the call; the emulator copies them and writes
        // back only into buffers marked writable; `err` holds `err.len()` bytes.
        let rc = unsafe {
            simt_launch(
                name.as_ptr(),
                l.grid.as_ptr(),
                l.block.as_ptr(),
                l.shared_bytes,
                schedule.bits(),
                raw.as_ptr(),
                raw.len(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            bail!("{}", String::from_utf8_lossy(&err[..end]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::launch::Buf;

    /// `write_kv` of 2 tokens x 1 KV head x 32 dims into a 2-block cache of block size 4.
    fn write_kv_launch(tokens: usize) -> Launch<Buf> {
        Launch::elementwise(
            "write_kv_f32".into(),
            tokens * 32,
            vec![
                Arg::Buf(Buf::Src),
                Arg::Buf(Buf::Cache),
                Arg::Buf(Buf::Slots),
                Arg::int(tokens),
                Arg::int(1),
                Arg::int(32),
                Arg::int(4),
                Arg::I32(1),
            ],
        )
    }

    fn memory(slots: &[u32], cache_len: usize) -> Memory<Buf> {
        let mut m = Memory::default();
        let src: Vec<f32> = (0..slots.len() * 32).map(|i| i as f32).collect();
        m.input(Buf::Src, &src);
        m.input(Buf::Slots, slots);
        m.output(Buf::Cache, &vec![f32::NAN; cache_len]);
        m
    }

    #[test]
    fn a_kernel_runs_and_its_outputs_come_back() {
        for s in Schedule::BOTH {
            let mut m = memory(&[5, 0], 2 * 4 * 32);
            m.run(&write_kv_launch(2), s).unwrap();
            let cache: Vec<f32> = m.read(Buf::Cache).unwrap();
            // V layout [blocks, heads, bs, d]: slot 5 is block 1, row 1; slot 0 is block 0, row 0.
            assert_eq!(cache[(4 + 1) * 32 + 3], 3.0);
            assert_eq!(cache[7], 32.0 + 7.0);
            assert_eq!(cache.iter().filter(|x| !x.is_nan()).count(), 64);
        }
    }

    #[test]
    fn accesses_outside_a_buffer_are_errors_naming_the_buffer_and_thread() {
        // Slot 9 lies in a third block the cache lacks: the writes land past its end.
        let mut m = memory(&[9, 0], 2 * 4 * 32);
        let err = m
            .run(&write_kv_launch(2), Schedule::Forward)
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the end of argument 1"), "{err}");
        assert!(
            err.contains("write_kv_f32, block (0,0,0), thread (0,0,0)"),
            "{err}"
        );
    }

    #[test]
    fn writing_an_input_is_an_error() {
        let mut m = memory(&[1, 0], 2 * 4 * 32);
        let mut l = write_kv_launch(2);
        l.args.swap(0, 1); // the kernel now writes into the source
        let err = m.run(&l, Schedule::Reverse).unwrap_err().to_string();
        assert!(err.contains("writes to argument 1, an input"), "{err}");
    }

    #[test]
    fn wrong_argument_kinds_and_geometries_are_refused() {
        let mut m = memory(&[1, 0], 2 * 4 * 32);
        let mut l = write_kv_launch(2);
        l.args[3] = Arg::F32(2.0);
        let err = m.run(&l, Schedule::Forward).unwrap_err().to_string();
        assert!(
            err.contains("takes arguments (pppiiiii) but was given (pppfiiii)"),
            "{err}"
        );
        let mut l = write_kv_launch(2);
        l.block = [2048, 1, 1];
        assert!(m.run(&l, Schedule::Forward).is_err());
        let mut l = write_kv_launch(2);
        l.kernel = "write_kv_f64".into();
        assert!(m.run(&l, Schedule::Forward).is_err());
    }

    #[test]
    fn blocks_over_a_kernels_launch_bounds_are_refused() {
        use crate::model::norm::{AddRmsNormBuf as B, add_rms_norm_launch};
        let mut m = Memory::default();
        for b in [B::X, B::Delta, B::Weight] {
            m.input(b, &[1f32; 8]);
        }
        m.output(B::Out, &[f32::NAN; 16]);
        let mut l = add_rms_norm_launch("f32", 1, 8, 1e-5);
        m.run(&l, Schedule::Forward).unwrap();
        l.block = [512, 1, 1];
        let err = m.run(&l, Schedule::Forward).unwrap_err().to_string();
        assert!(err.contains("over its __launch_bounds__ of 256"), "{err}");
    }
}
