//! The `chat` workload: the first turns of a conversation rendered with the model's chat template,
//! as a chat application sends them (the equivalent of the reference H100 report's UltraChat run).

use anyhow::{Context, Result, anyhow, bail};
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use super::pyrandom::PyRandom;
use super::sharegpt::{ShareGpt, Turn, pad_with_duplicates};
use super::{LengthRules, Request, Workload, WorkloadInfo};
use crate::tokenizer::TextTokenizer;

/// One chat message as templates expect it.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A Hugging Face chat template, rendered as `transformers` renders it (Jinja with
/// `trim_blocks` and `lstrip_blocks`, Python string methods, `raise_exception`).
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("chat template syntax: {e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_today(&fmt));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The template of a tokenizer, or an error saying how to supply one.
    pub fn of(tokenizer: &TextTokenizer) -> Result<Self> {
        let source = tokenizer.chat_template.as_deref().ok_or_else(|| {
            anyhow!(
                "tokenizer {} has no chat template (give --chat-template FILE)",
                tokenizer.source
            )
        })?;
        Self::new(
            source,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| anyhow!("chat template: {e}"))?;
        tmpl.render(context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow!("rendering the chat template failed: {e}"))
    }
}

/// `strftime_now` for the few formats chat templates use (`%d %b %Y`, `%Y-%m-%d`, ...).
fn strftime_today(fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let today = crate::util::utc_date();
    let mut parts = today.split('-').map(|p| p.parse::<usize>().unwrap_or(1));
    let (y, m, d) = (
        parts.next().unwrap_or(1970),
        parts.next().unwrap_or(1),
        parts.next().unwrap_or(1),
    );
    let month = MONTHS[(m.clamp(1, 12)) - 1];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// ShareGPT's speaker names mapped to chat roles.
fn role_of(from: &str) -> Option<&'static str> {
    match from {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// The first `turns` turns as messages, if they alternate user/assistant starting with the user
/// (what every chat template accepts).
pub fn messages_of(conv: &[Turn], turns: usize) -> Option<Vec<Message>> {
    if conv.len() < turns {
        return None;
    }
    let mut out = Vec::with_capacity(turns);
    for (i, t) in conv[..turns].iter().enumerate() {
        let role = role_of(&t.from)?;
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if role != want {
            return None;
        }
        out.push(Message {
            role: role.into(),
            content: t.value.clone(),
        });
    }
    Some(out)
}

#[derive(Clone, Debug)]
pub struct ChatOptions {
    pub num_prompts: usize,
    pub seed: u64,
    pub turns: usize,
    pub output_len: usize,
    pub rules: LengthRules,
}

/// Samples the `chat` workload: conversations whose first `turns` turns alternate
/// user/assistant, shuffled as vLLM shuffles ShareGPT, rendered with the chat template plus the
/// generation prompt and tokenized without adding special tokens (the template has them), kept
/// when the length rules accept them with the fixed output length (the `throughput` command
/// bounds only prompt + output, by 2048, and the prompt's minimum of 4).
pub fn sample(
    data: &ShareGpt,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    opts: &ChatOptions,
    source: &str,
    on_progress: &dyn Fn(usize),
) -> Result<Workload> {
    if opts.turns == 0 {
        bail!("--prompt-turns must be at least 1");
    }
    let mut eligible: Vec<Vec<Message>> = data
        .conversations
        .iter()
        .flatten()
        .filter_map(|c| messages_of(c, opts.turns))
        .collect();
    if eligible.is_empty() {
        bail!(
            "{source}: no conversation has {} turns alternating user/assistant",
            opts.turns
        );
    }
    let eligible_count = eligible.len();
    PyRandom::new(opts.seed).shuffle(&mut eligible);

    let mut requests = Vec::with_capacity(opts.num_prompts);
    let (mut examined, mut rejected) = (0usize, 0usize);
    'outer: for chunk in eligible.chunks(256) {
        let texts = chunk
            .iter()
            .map(|m| template.render(m, true))
            .collect::<Result<Vec<_>>>()
            .context("chat workload")?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        for ids in tokenizer.encode_batch(&refs, false)? {
            if requests.len() >= opts.num_prompts {
                break 'outer;
            }
            examined += 1;
            if opts.rules.accepts(ids.len(), opts.output_len, true) {
                requests.push(Request {
                    prompt_ids: ids,
                    max_tokens: opts.output_len,
                });
            } else {
                rejected += 1;
            }
        }
        on_progress(requests.len());
    }
    if requests.is_empty() {
        bail!("{source}: no rendered conversation passes the length rules");
    }
    let duplicated = pad_with_duplicates(&mut requests, opts.num_prompts, opts.seed);
    let mut info = WorkloadInfo {
        dataset: "chat".into(),
        source: Some(source.into()),
        tokenizer: Some(tokenizer.source.clone()),
        seed: opts.seed,
        eligible: Some(eligible_count),
        examined: Some(examined),
        rejected: Some(rejected),
        duplicated,
        notes: vec![format!(
            "prompt = first {} turns through the chat template, {} output tokens",
            opts.turns, opts.output_len
        )],
    };
    info.notes.extend(data.truncation_note());
    Ok(Workload { info, requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = include_str!("../../models/templates/llama-3.jinja");

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_llama3_as_transformers_does() {
        let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
        let out = t
            .render(
                &msgs(&[("user", " Hi "), ("assistant", "Hello"), ("user", "Bye")]),
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        assert!(ChatTemplate::new("{% if %}", None, None).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  ab ")]), false).unwrap(), "AB");
    }

    #[test]
    fn turns_must_alternate_from_the_user() {
        let turn = |f: &str| Turn {
            from: f.into(),
            value: "x".into(),
        };
        let good = vec![turn("human"), turn("gpt"), turn("human"), turn("gpt")];
        assert_eq!(messages_of(&good, 3).unwrap().len(), 3);
        assert!(messages_of(&good[..2], 3).is_none());
        let bad = vec![turn("gpt"), turn("human"), turn("gpt")];
        assert!(messages_of(&bad, 3).is_none());
    }
}
