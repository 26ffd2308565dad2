//! `offline-bench generate`: one prompt through the same engine, greedy by default; prints the
//! continuation and its token ids (a quick check that weights and tokenizer agree).

use anyhow::{Result, anyhow};

use super::Setup;
use crate::cli::GenerateArgs;
use crate::progress::Progress;
use crate::workload::Request;
use crate::workload::chat::{ChatTemplate, Message};

pub fn run(args: &GenerateArgs) -> Result<()> {
    let progress = Progress::new(args.engine.quiet);
    let setup = Setup::new(&args.model, &progress)?;
    let tok = setup.info.tokenizer.as_ref().ok_or_else(|| {
        anyhow!("generate needs a tokenizer: pass --tokenizer (tokenizer.json or its folder)")
    })?;
    let prompt_ids = if args.chat {
        let text = ChatTemplate::of(tok)?.render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let mut engine = setup.engine(&args.engine, &progress)?;
    let request = Request {
        prompt_ids: prompt_ids.clone(),
        max_tokens: args.max_tokens,
    };
    let out = engine.run(std::slice::from_ref(&request), |_| {})?;
    let ids = &out.outputs[0].output_ids;
    println!("prompt ids: {prompt_ids:?}");
    println!("output ids: {ids:?}");
    println!("{}{}", args.prompt, tok.decode(ids)?);
    let secs = out.stats.elapsed.max(f64::MIN_POSITIVE);
    progress.info(format!(
        "{} prompt + {} generated tokens in {:.2}s ({:.1} tokens/s)",
        prompt_ids.len(),
        ids.len(),
        secs,
        (prompt_ids.len() + ids.len()) as f64 / secs
    ));
    Ok(())
}
