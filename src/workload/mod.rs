//! Workloads: the requests a benchmark submits, sampled and tokenized before the clock starts.
//!
//! Every source (ShareGPT as vLLM samples it, chat-templated conversations, random token ids,
//! random prompts behind a few shared prefixes, or a saved workload file) ends as a [`Workload`]: token ids and an output length per request,
//! plus a description of how they were chosen and a fingerprint of the exact ids.

pub mod chat;
pub mod prefix_repetition;
pub mod pyrandom;
pub mod random;
pub mod sharegpt;

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One request: the engine generates exactly `max_tokens` tokens after `prompt_ids`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
}

/// How a workload was made, carried into the report so a figure can be traced to its inputs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// `sharegpt`, `chat` or `random`.
    pub dataset: String,
    /// The dataset file, if any.
    pub source: Option<String>,
    /// The tokenizer that produced the ids.
    pub tokenizer: Option<String>,
    pub seed: u64,
    /// Conversations that qualify before any length filter (ShareGPT: at least 2 turns).
    pub eligible: Option<usize>,
    /// Conversations examined (tokenized) to fill the sample.
    pub examined: Option<usize>,
    /// Of those, rejected by the length rules.
    pub rejected: Option<usize>,
    /// Requests that are seeded duplicates, added because too few conversations passed.
    pub duplicated: usize,
    /// Anything a reader of the figures should know about the sample.
    pub notes: Vec<String>,
}

/// The requests of one benchmark run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workload {
    pub info: WorkloadInfo,
    pub requests: Vec<Request>,
}

/// The on-disk form of a saved workload.
#[derive(Serialize, Deserialize)]
struct WorkloadFile {
    format: String,
    fingerprint: String,
    #[serde(flatten)]
    workload: Workload,
}

const WORKLOAD_FORMAT: &str = "offline-bench-workload/1";

impl Workload {
    /// A short hash of every request's ids and output length: equal fingerprints mean the same
    /// work, byte for byte.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.requests.len() as u64).to_le_bytes());
        for r in &self.requests {
            h.update((r.prompt_ids.len() as u64).to_le_bytes());
            for id in &r.prompt_ids {
                h.update(id.to_le_bytes());
            }
            h.update((r.max_tokens as u64).to_le_bytes());
        }
        let digest = h.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn total_prompt_tokens(&self) -> usize {
        self.requests.iter().map(|r| r.prompt_ids.len()).sum()
    }

    pub fn total_output_tokens(&self) -> usize {
        self.requests.iter().map(|r| r.max_tokens).sum()
    }

    /// One paragraph for the terminal: what was sampled and its average lengths.
    pub fn summary(&self) -> String {
        let n = self.requests.len().max(1) as f64;
        let mut s = format!(
            "workload {}: {} requests, avg prompt {:.2} tokens, avg output {:.2} tokens, fingerprint {}",
            self.info.dataset,
            self.requests.len(),
            self.total_prompt_tokens() as f64 / n,
            self.total_output_tokens() as f64 / n,
            self.fingerprint()
        );
        if let Some(e) = self.info.eligible {
            s += &format!("\n  eligible conversations: {e}");
        }
        if let (Some(x), Some(r)) = (self.info.examined, self.info.rejected) {
            s += &format!(", examined {x}, rejected by length rules {r}");
        }
        if self.info.duplicated > 0 {
            s += &format!(
                "\n  note: {} requests are seeded duplicates (too few conversations passed)",
                self.info.duplicated
            );
        }
        for note in &self.info.notes {
            s += &format!("\n  note: {note}");
        }
        s
    }

    /// Saves the sampled, tokenized requests so a later run (or a GPU host without the dataset
    /// or tokenizer) submits exactly the same work.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file = WorkloadFile {
            format: WORKLOAD_FORMAT.into(),
            fingerprint: self.fingerprint(),
            workload: self.clone(),
        };
        let bytes = serde_json::to_vec(&file).context("cannot serialise the workload")?;
        crate::util::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read workload file {}", path.display()))?;
        let file: WorkloadFile = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a workload file saved by --save-workload",
                path.display()
            )
        })?;
        if file.format != WORKLOAD_FORMAT {
            bail!(
                "{}: unsupported workload format '{}' (expected '{WORKLOAD_FORMAT}')",
                path.display(),
                file.format
            );
        }
        let workload = file.workload;
        let actual = workload.fingerprint();
        if actual != file.fingerprint {
            bail!(
                "{}: requests do not match the saved fingerprint ({} != {}); the file was edited or damaged",
                path.display(),
                actual,
                file.fingerprint
            );
        }
        workload
            .validate()
            .with_context(|| path.display().to_string())?;
        Ok(workload)
    }

    /// Rejects workloads no engine can run: empty, or a request with no prompt or no output.
    pub fn validate(&self) -> Result<()> {
        if self.requests.is_empty() {
            bail!("the workload has no requests");
        }
        for (i, r) in self.requests.iter().enumerate() {
            if r.prompt_ids.is_empty() {
                bail!("request {i} has an empty prompt");
            }
            if r.max_tokens == 0 {
                bail!("request {i} asks for 0 output tokens");
            }
        }
        Ok(())
    }

    /// Truncates to the first `n` requests (a smaller run from a saved workload).
    pub fn take(mut self, n: usize) -> Self {
        self.requests.truncate(n);
        self
    }
}

/// The length limits vLLM applies when it samples a text dataset.
#[derive(Clone, Copy, Debug)]
pub struct LengthRules {
    pub min_len: usize,
    pub max_prompt_len: usize,
    pub max_total_len: usize,
}

impl Default for LengthRules {
    fn default() -> Self {
        Self {
            min_len: 4,
            max_prompt_len: 1024,
            max_total_len: 2048,
        }
    }
}

impl LengthRules {
    /// vLLM's `is_valid_sequence`: the output minimum is skipped when the length is fixed.
    pub fn accepts(&self, prompt_len: usize, output_len: usize, fixed_output: bool) -> bool {
        !(prompt_len < self.min_len
            || (!fixed_output && output_len < self.min_len)
            || prompt_len > self.max_prompt_len
            || prompt_len + output_len > self.max_total_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Workload {
        Workload {
            info: WorkloadInfo {
                dataset: "random".into(),
                ..Default::default()
            },
            requests: vec![
                Request {
                    prompt_ids: vec![1, 2, 3],
                    max_tokens: 4,
                },
                Request {
                    prompt_ids: vec![5],
                    max_tokens: 1,
                },
            ],
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        let w = sample();
        w.save(&path).unwrap();
        let back = Workload::load(&path).unwrap();
        assert_eq!(back.requests, w.requests);
        assert_eq!(back.fingerprint(), w.fingerprint());
    }

    #[test]
    fn edited_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        sample().save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("[1,2,3]", "[1,2,4]")).unwrap();
        let err = format!("{:#}", Workload::load(&path).unwrap_err());
        assert!(err.contains("fingerprint"), "{err}");
    }

    #[test]
    fn fingerprint_sees_every_id() {
        let a = sample();
        let mut b = sample();
        b.requests[1].prompt_ids[0] = 6;
        let mut c = sample();
        c.requests[0].max_tokens = 5;
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn vllm_length_rules() {
        let r = LengthRules::default();
        assert!(r.accepts(4, 4, false));
        assert!(!r.accepts(3, 100, false));
        assert!(!r.accepts(100, 3, false));
        assert!(r.accepts(100, 3, true));
        assert!(!r.accepts(1025, 10, false));
        assert!(!r.accepts(1000, 1049, false));
        assert!(r.accepts(1000, 1048, false));
        assert!(!r.accepts(1000, 1049, true));
    }
}
