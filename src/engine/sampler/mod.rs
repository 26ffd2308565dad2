//! Turning logits into tokens on the logits' device, only the ids coming back: greedy (argmax)
//! or seeded temperature / top-k / top-p sampling. Each request draws from its own random
//! stream, keyed by the seed, the request, which of its `n` outputs, and the output position,
//! so its tokens do not depend on which other requests share its steps.

#[cfg(feature = "cuda")]
mod cuda;
pub mod rows;

use anyhow::{Result, bail};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::launch::{Arg, Launch};
use crate::util::Rng64;

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }

    /// `greedy`, or `temperature=0.8 top_p=0.95 top_k=40 seed=0`.
    pub fn describe(&self) -> String {
        if self.is_greedy() {
            "greedy".into()
        } else {
            format!(
                "temperature={} top_p={} top_k={} seed={}",
                self.temperature, self.top_p, self.top_k, self.seed
            )
        }
    }
}

/// What keys one row's random draw. A request's first output (`sample` 0) draws what the
/// request draws with `n` = 1, so `--n` adds outputs without changing the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub request: usize,
    /// Which of the request's `n` outputs.
    pub sample: usize,
    /// Output position.
    pub position: usize,
}

/// One token per row of `logits` (`[rows, vocab]`, f32). `streams[i]` keys row `i`'s random
/// draw. Greedy is an argmax on the logits' device; otherwise
/// each row's uniform number is drawn on the host and the rows are sampled on the logits'
/// device (`rows::sample_row`, or its CUDA kernel): only the ids come back.
pub fn sample(logits: &Tensor, params: &SamplingParams, streams: &[Stream]) -> Result<Vec<u32>> {
    if params.is_greedy() {
        // Ours on the CPU (both cores, vectorised: 32 rows of 49152 took 2.5 ms in candle's).
        if logits.device().is_cpu() && logits.dtype() == DType::F32 {
            let ids = logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)?;
            return Ok(ids.to_vec1::<u32>()?);
        }
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let uniforms: Vec<f32> = streams.iter().map(|&s| uniform(params.seed, s)).collect();
    let uniforms = Tensor::from_vec(uniforms, streams.len(), logits.device())?;
    let ids = logits.apply_op2_no_bwd(&uniforms, &SampleRows(*params))?;
    Ok(ids.to_vec1::<u32>()?)
}

/// The uniform number in `[0, 1)` (24 bits, exact in f32) of one output position.
pub fn uniform(seed: u64, s: Stream) -> f32 {
    let stream = ((s.request as u64) << 32) | s.position as u64;
    // Later outputs of a request draw under a seed derived from the output's index.
    let seed = match s.sample {
        0 => seed,
        k => Rng64::for_stream(seed, k as u64).next_u64(),
    };
    (Rng64::for_stream(seed, stream).next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Sampling of `[rows, vocab]` f32 logits with `[rows]` uniforms, as an op of either device.
pub struct SampleRows(pub SamplingParams);

/// The buffers of the `sample_rows` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleBuf {
    /// `[rows, vocab]` f32.
    Logits,
    /// `[rows]` f32 in `[0, 1)`.
    Uniforms,
    /// `[rows]` u32, the drawn tokens.
    Ids,
}

/// Threads per row of the `sample_rows` kernel (`SAMPLE_THREADS` in kernels/sampling.cu).
pub const SAMPLE_THREADS: u32 = 1024;

/// The CUDA launch of [`SampleRows`]: one block per row.
pub fn sample_launch(p: &SamplingParams, rows: usize, vocab: usize) -> Launch<SampleBuf> {
    Launch::new(
        "sample_rows".into(),
        [rows.max(1) as u32, 1, 1],
        SAMPLE_THREADS,
        vec![
            Arg::Buf(SampleBuf::Logits),
            Arg::Buf(SampleBuf::Uniforms),
            Arg::Buf(SampleBuf::Ids),
            Arg::int(vocab),
            Arg::F32(1.0 / p.temperature),
            Arg::int(p.top_k),
            Arg::F32(p.top_p),
        ],
    )
}

/// Greedy on the CPU: [`rows::argmax`] of each row of `[rows, vocab]` f32 logits, the rows
/// spread over the threads.
pub struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let (CpuStorage::F32(logits), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("argmax: logits must be contiguous f32, got {:?}", l.dims());
        };
        if vocab == 0 {
            candle_core::bail!("argmax: logits {:?} have no columns", l.dims());
        }
        let ids: Vec<u32> = logits[a..b].par_chunks(vocab).map(rows::argmax).collect();
        Ok((CpuStorage::U32(ids), Shape::from(rows)))
    }
}

/// `(rows, vocab)` of the logits, checked against the uniforms.
fn dims(ll: &Layout, ul: &Layout) -> candle_core::Result<(usize, usize)> {
    let (rows, vocab) = ll.shape().dims2()?;
    if ul.shape().dims1()? != rows || vocab == 0 {
        candle_core::bail!(
            "sample: logits {:?} with uniforms {:?}",
            ll.dims(),
            ul.dims()
        );
    }
    Ok((rows, vocab))
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = dims(ll, ul)?;
        let (CpuStorage::F32(logits), CpuStorage::F32(u)) = (ls, us) else {
            candle_core::bail!("sample: logits and uniforms must be f32");
        };
        let (Some((la, lb)), Some((ua, ub))) = (ll.contiguous_offsets(), ul.contiguous_offsets())
        else {
            candle_core::bail!("sample: logits and uniforms must be contiguous");
        };
        let ids: Vec<u32> = logits[la..lb]
            .par_chunks(vocab)
            .zip(u[ua..ub].par_iter())
            .map(|(row, &u)| rows::sample_row(row, &self.0, u))
            .collect();
        Ok((CpuStorage::U32(ids), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = dims(ll, ul)?;
        cuda::sample(&self.0, (ls, ll), (us, ul), rows, vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(t: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            seed: 3,
        }
    }

    fn at(request: usize, position: usize) -> Stream {
        Stream {
            request,
            sample: 0,
            position,
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let l = Tensor::new(&[[0.1f32, 2.0, -1.0], [5.0, 0.0, 4.9]], &Device::Cpu).unwrap();
        let ids = sample(&l, &SamplingParams::greedy(), &[at(0, 0), at(1, 0)]).unwrap();
        assert_eq!(ids, vec![1, 0]);
    }

    #[test]
    fn greedy_op_checks_its_input() {
        let l = Tensor::zeros((2, 3), DType::F16, &Device::Cpu).unwrap();
        assert!(l.apply_op1_no_bwd(&ArgmaxRows).is_err());
        let l = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        assert!(l.apply_op1_no_bwd(&ArgmaxRows).is_err());
        // A transposed (strided) input is not read as if it were contiguous.
        let l = Tensor::new(&[[0f32, 1.0], [3.0, 2.0]], &Device::Cpu).unwrap();
        assert!(l.t().unwrap().apply_op1_no_bwd(&ArgmaxRows).is_err());
    }

    #[test]
    fn streams_do_not_depend_on_batch_order() {
        let l = Tensor::new(
            &[[0.0f32, 0.1, 0.2, 0.3], [0.3, 0.2, 0.1, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let p = params(1.0, 1.0, 0);
        let a = sample(&l, &p, &[at(4, 9), at(5, 9)]).unwrap();
        let swapped = Tensor::new(
            &[[0.3f32, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]],
            &Device::Cpu,
        )
        .unwrap();
        let b = sample(&swapped, &p, &[at(5, 9), at(4, 9)]).unwrap();
        assert_eq!(a, vec![b[1], b[0]]);
    }

    #[test]
    fn uniforms_are_per_stream_and_in_range() {
        assert_eq!(uniform(3, at(4, 9)), uniform(3, at(4, 9)));
        assert_ne!(uniform(3, at(4, 9)), uniform(3, at(4, 10)));
        assert_ne!(uniform(3, at(4, 9)), uniform(4, at(4, 9)));
        assert!((0..1000).all(|p| (0.0..1.0).contains(&uniform(0, at(1, p)))));
        // A request's outputs draw apart, and each of them apart from other requests'.
        let of = |request, sample| {
            (0..64)
                .map(|position| {
                    uniform(
                        3,
                        Stream {
                            request,
                            sample,
                            position,
                        },
                    )
                })
                .collect::<Vec<_>>()
        };
        let draws = [of(4, 0), of(4, 1), of(4, 2), of(5, 0), of(5, 1)];
        for (i, a) in draws.iter().enumerate() {
            for b in &draws[i + 1..] {
                assert!(a.iter().zip(b).filter(|(x, y)| x == y).count() < 2);
            }
        }
    }

    #[test]
    fn the_op_checks_its_inputs() {
        let l = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let u = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let p = params(1.0, 1.0, 0);
        assert!(l.apply_op2_no_bwd(&u, &SampleRows(p)).is_err());
        let u = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        let ids = l.apply_op2_no_bwd(&u, &SampleRows(p)).unwrap();
        // All weights equal and u = 0: the first token.
        assert_eq!(ids.to_vec1::<u32>().unwrap(), vec![0, 0]);
    }

    #[test]
    fn bad_params() {
        assert!(params(-1.0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 0.9, 40).validate().is_ok());
    }
}
