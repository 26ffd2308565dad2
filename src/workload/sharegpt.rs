//! ShareGPT: reading the conversations file and sampling it exactly as vLLM's benchmark does.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::pyrandom::PyRandom;
use super::{LengthRules, Request, Workload, WorkloadInfo};
use crate::tokenizer::TextTokenizer;

/// One turn of a conversation (`from` is `human`, `gpt`, `system`, ...).
#[derive(Clone, Debug, Deserialize)]
pub struct Turn {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    conversations: Option<Vec<Turn>>,
}

/// The conversations of a ShareGPT file, in file order.
#[derive(Debug)]
pub struct ShareGpt {
    /// Every record's turns (`None` for a record without a `conversations` key).
    pub conversations: Vec<Option<Vec<Turn>>>,
    /// Set when the file ends inside a record: the byte offset where that record starts.
    pub truncated_at: Option<usize>,
}

impl ShareGpt {
    /// Reads a ShareGPT JSON array. A file cut off inside its last record (as the PyPI copy is)
    /// yields every complete record and sets `truncated_at`; damage anywhere else is an error
    /// that names the byte offset.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read dataset {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("dataset {}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut pos = skip_ws(bytes, 0);
        if bytes[pos..].starts_with(b"\xef\xbb\xbf") {
            pos = skip_ws(bytes, pos + 3);
        }
        if bytes.get(pos) != Some(&b'[') {
            bail!(
                "not a ShareGPT JSON file: expected a JSON array ('[') at byte {pos}, found {}",
                describe_byte(bytes.get(pos))
            );
        }
        pos = skip_ws(bytes, pos + 1);
        let mut conversations = Vec::new();
        if bytes.get(pos) == Some(&b']') {
            return Ok(Self {
                conversations,
                truncated_at: None,
            });
        }
        loop {
            let start = pos;
            let mut stream = serde_json::Deserializer::from_slice(&bytes[start..]).into_iter();
            match stream.next() {
                Some(Ok(Entry { conversations: c })) => {
                    conversations.push(c);
                    pos = start + stream.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => {
                    return Ok(Self {
                        conversations,
                        truncated_at: Some(start),
                    });
                }
                Some(Err(e)) => {
                    let at = start + offset_of(&bytes[start..], e.line(), e.column());
                    bail!(
                        "record {} (starting at byte {start}) is broken at byte {at}: {e}",
                        conversations.len()
                    );
                }
                None => {
                    return Ok(Self {
                        conversations,
                        truncated_at: Some(start),
                    });
                }
            }
            pos = skip_ws(bytes, pos);
            match bytes.get(pos) {
                Some(b',') => pos = skip_ws(bytes, pos + 1),
                Some(b']') => {
                    let end = skip_ws(bytes, pos + 1);
                    if end != bytes.len() {
                        bail!("unexpected data after the closing ']' at byte {end}");
                    }
                    return Ok(Self {
                        conversations,
                        truncated_at: None,
                    });
                }
                None => {
                    return Ok(Self {
                        conversations,
                        truncated_at: Some(pos),
                    });
                }
                other => bail!(
                    "expected ',' or ']' after record {} at byte {pos}, found {}",
                    conversations.len() - 1,
                    describe_byte(other)
                ),
            }
        }
    }

    /// The warning a truncated file deserves, if it is one.
    pub fn truncation_note(&self) -> Option<String> {
        self.truncated_at.map(|at| {
            format!(
                "the dataset file is cut off inside a record at byte {at}; using the {} complete records before it",
                self.conversations.len()
            )
        })
    }
}

fn skip_ws(bytes: &[u8], mut pos: usize) -> usize {
    while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

fn describe_byte(b: Option<&u8>) -> String {
    match b {
        None => "the end of the file".into(),
        Some(c) if c.is_ascii_graphic() => format!("'{}'", *c as char),
        Some(c) => format!("byte 0x{c:02x}"),
    }
}

/// Byte offset of a serde_json (1-based line, column) position within `bytes`.
fn offset_of(bytes: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    for _ in 1..line {
        match bytes[line_start..].iter().position(|&b| b == b'\n') {
            Some(i) => line_start += i + 1,
            None => break,
        }
    }
    (line_start + column.saturating_sub(1)).min(bytes.len())
}

/// What to sample.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub num_prompts: usize,
    pub seed: u64,
    /// Fixed output length (`--output-len`); otherwise the completion's token count.
    pub output_len: Option<usize>,
    pub rules: LengthRules,
}

/// vLLM's ShareGPT sampling: keep records with at least 2 turns, shuffle them with Python's
/// `random.seed(seed); random.shuffle(...)`, then walk them, tokenizing the first turn (prompt)
/// and second turn (completion) with special tokens, keeping those the length rules accept,
/// until `num_prompts` are found; pad a short sample with seeded duplicates.
pub fn sample(
    data: &ShareGpt,
    tokenizer: &TextTokenizer,
    opts: &SampleOptions,
    source: &str,
    on_progress: &dyn Fn(usize),
) -> Result<Workload> {
    let mut eligible: Vec<&Vec<Turn>> = data
        .conversations
        .iter()
        .flatten()
        .filter(|c| c.len() >= 2)
        .collect();
    if eligible.is_empty() {
        bail!("{source}: no conversation has at least 2 turns");
    }
    let eligible_count = eligible.len();
    let mut rng = PyRandom::new(opts.seed);
    rng.shuffle(&mut eligible);

    let fixed = opts.output_len.is_some();
    let mut requests = Vec::with_capacity(opts.num_prompts);
    let (mut examined, mut rejected) = (0usize, 0usize);
    const CHUNK: usize = 256;
    'outer: for chunk in eligible.chunks(CHUNK) {
        let prompts: Vec<&str> = chunk.iter().map(|c| c[0].value.as_str()).collect();
        let prompt_ids = tokenizer.encode_batch(&prompts, true)?;
        let output_lens: Vec<usize> = match opts.output_len {
            Some(n) => vec![n; chunk.len()],
            None => {
                let completions: Vec<&str> = chunk.iter().map(|c| c[1].value.as_str()).collect();
                let ids = tokenizer.encode_batch(&completions, true)?;
                ids.iter().map(Vec::len).collect()
            }
        };
        for (ids, out) in prompt_ids.into_iter().zip(output_lens) {
            if requests.len() >= opts.num_prompts {
                break 'outer;
            }
            examined += 1;
            if opts.rules.accepts(ids.len(), out, fixed) {
                requests.push(Request {
                    prompt_ids: ids,
                    max_tokens: out,
                });
            } else {
                rejected += 1;
            }
        }
        on_progress(requests.len());
    }
    if requests.is_empty() {
        bail!(
            "{source}: no conversation passes the length rules (prompt 4..=1024 tokens, prompt + output <= 2048)"
        );
    }
    let duplicated = pad_with_duplicates(&mut requests, opts.num_prompts, opts.seed);
    let mut info = WorkloadInfo {
        dataset: "sharegpt".into(),
        source: Some(source.into()),
        tokenizer: Some(tokenizer.source.clone()),
        seed: opts.seed,
        eligible: Some(eligible_count),
        examined: Some(examined),
        rejected: Some(rejected),
        duplicated,
        notes: vec![],
    };
    info.notes.extend(data.truncation_note());
    Ok(Workload { info, requests })
}

/// vLLM's oversampling: reseed, then append `random.choice` copies until there are `n`.
pub(crate) fn pad_with_duplicates(requests: &mut Vec<Request>, n: usize, seed: u64) -> usize {
    let have = requests.len();
    if have >= n || have == 0 {
        return 0;
    }
    let mut rng = PyRandom::new(seed);
    for _ in have..n {
        let pick = rng.choice_index(have);
        requests.push(requests[pick].clone());
    }
    n - have
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_complete_and_truncated_files() {
        let full = br#"[{"id":"a","conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"yo"}]},
            {"id":"b"} ]"#;
        let d = ShareGpt::parse(full).unwrap();
        assert_eq!(d.conversations.len(), 2);
        assert!(d.truncated_at.is_none());
        assert!(d.conversations[1].is_none());

        let cut =
            br#"[{"conversations":[{"from":"human","value":"hi"}]}, {"conversations":[{"from":"hu"#;
        let d = ShareGpt::parse(cut).unwrap();
        assert_eq!(d.conversations.len(), 1);
        assert_eq!(d.truncated_at, Some(52));
        assert!(d.truncation_note().unwrap().contains("byte 52"));

        let cut_after_comma = br#"[{"conversations":[]},"#;
        assert_eq!(
            ShareGpt::parse(cut_after_comma)
                .unwrap()
                .conversations
                .len(),
            1
        );
    }

    #[test]
    fn damage_in_the_middle_names_the_offset() {
        let bad = br#"[{"conversations":[]}, {"conversations": [}, {"conversations":[]}]"#;
        let err = format!("{:#}", ShareGpt::parse(bad).unwrap_err());
        assert!(err.contains("record 1") && err.contains("byte 42"), "{err}");

        let bad_sep = br#"[{"conversations":[]} {"conversations":[]}]"#;
        let err = format!("{:#}", ShareGpt::parse(bad_sep).unwrap_err());
        assert!(err.contains("byte 22"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_dataset() {
        let err = format!("{:#}", ShareGpt::parse(b"\x00\x01garbage").unwrap_err());
        assert!(err.contains("not a ShareGPT JSON file"), "{err}");
        let err = format!("{:#}", ShareGpt::parse(b"").unwrap_err());
        assert!(err.contains("end of the file"), "{err}");
    }

    #[test]
    fn duplicates_pad_a_short_sample() {
        let mut reqs: Vec<Request> = (0..3)
            .map(|i| Request {
                prompt_ids: vec![i],
                max_tokens: 4,
            })
            .collect();
        assert_eq!(pad_with_duplicates(&mut reqs, 7, 0), 4);
        assert_eq!(reqs.len(), 7);
        assert!(reqs[3..].iter().all(|r| r.prompt_ids[0] < 3));
        assert_eq!(pad_with_duplicates(&mut reqs, 5, 0), 0);
    }
}
