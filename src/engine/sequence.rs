//! A request as the engine tracks it: its tokens so far, its blocks, what is already computed.

use super::prefix::ContentId;

/// Where a sequence is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
    Finished,
}

/// One generation in flight: a request's prompt and one of its `n` outputs.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// Index of the sequence in the engine's list.
    pub id: usize,
    /// Index of its request in the submitted list.
    pub request: usize,
    /// Which of the request's `n` outputs this is (0 with `n` = 1).
    pub sample: usize,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Block table: the cache blocks holding this sequence's K/V, in order.
    pub blocks: Vec<u32>,
    /// With prefix caching: the identity of each leading full block's content, the chain its
    /// next full block is indexed under.
    pub block_keys: Vec<ContentId>,
    pub status: SeqStatus,
    /// Seconds from the start of the run to the first generated token.
    pub first_token_at: Option<f64>,
    /// Seconds from the start of the run to the last generated token.
    pub finished_at: Option<f64>,
    /// Times this sequence lost its blocks and had to be recomputed.
    pub preemptions: u32,
}

impl Sequence {
    /// The only sequence of request `id` (`n` = 1).
    pub fn new(id: usize, prompt: &[u32], max_tokens: usize) -> Self {
        Self::sample_of(id, id, 0, prompt, max_tokens)
    }

    /// Sequence `id`: output `sample` of request `request`.
    pub fn sample_of(
        id: usize,
        request: usize,
        sample: usize,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Self {
        let mut tokens = Vec::with_capacity(prompt.len() + max_tokens);
        tokens.extend_from_slice(prompt);
        Self {
            id,
            request,
            sample,
            tokens,
            prompt_len: prompt.len(),
            max_tokens,
            num_computed: 0,
            blocks: Vec::new(),
            block_keys: Vec::new(),
            status: SeqStatus::Waiting,
            first_token_at: None,
            finished_at: None,
            preemptions: 0,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be run through the model before the next one can be sampled.
    pub fn num_pending(&self) -> usize {
        self.num_tokens() - self.num_computed
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The most tokens this sequence will ever hold.
    pub fn max_len(&self) -> usize {
        self.prompt_len + self.max_tokens
    }
}
