//! Hugging Face hub ids (`--model org/name`): the files of an HF model folder, from the local
//! cache or downloaded through hf-hub. Honours `HF_HOME` (cache location), `HF_HUB_OFFLINE`
//! (cache only, never the network), `HF_TOKEN` (gated models) and `HF_ENDPOINT`.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::{Cache, Repo, RepoType};

/// Whether `HF_HUB_OFFLINE` asks for cache-only lookups.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Whether `text` is shaped like a hub id (`org/name`, not a path).
pub fn looks_like_repo_id(text: &str) -> bool {
    let parts: Vec<&str> = text.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        && !text.starts_with('.')
}

/// The files a model folder needs, resolved to a local folder holding them.
pub fn fetch(repo_id: &str, revision: Option<&str>, show_progress: bool) -> Result<PathBuf> {
    let repo = match revision {
        Some(r) => Repo::with_revision(repo_id.into(), RepoType::Model, r.into()),
        None => Repo::new(repo_id.into(), RepoType::Model),
    };
    if offline() {
        let cache = Cache::from_env();
        let cached = cache.repo(repo);
        let get = |f: &str| cached.get(f);
        let config = get("config.json").ok_or_else(|| {
            anyhow!(
                "model {repo_id} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: download it first or unset HF_HUB_OFFLINE",
                cache.path().display()
            )
        })?;
        let weights: Vec<String> = match get("model.safetensors.index.json") {
            Some(index) => shard_names(&std::fs::read_to_string(&index)?)?,
            None => vec!["model.safetensors".into()],
        };
        for w in &weights {
            if get(w).is_none() {
                bail!(
                    "model {repo_id}: {w} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                    cache.path().display()
                );
            }
        }
        for optional in ["tokenizer.json", "tokenizer_config.json"] {
            let _ = get(optional);
        }
        return folder_of(&config);
    }
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(show_progress);
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let remote = api.repo(repo);
    let get = |f: &str| {
        remote.get(f).with_context(|| {
            format!("cannot fetch {f} of {repo_id} from the hub (gated models need HF_TOKEN; set HF_HUB_OFFLINE=1 to use the cache only)")
        })
    };
    let config = get("config.json")?;
    match remote.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&std::fs::read_to_string(&index)?)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    for optional in ["tokenizer.json", "tokenizer_config.json"] {
        let _ = remote.get(optional);
    }
    folder_of(&config)
}

/// The ShareGPT file vLLM's benchmark documentation points at, on the hub.
pub const SHAREGPT_REPO: &str = "anon8231489123/ShareGPT_Vicuna_unfiltered";
pub const SHAREGPT_FILE: &str = "ShareGPT_V3_unfiltered_cleaned_split.json";

/// One file of a hub dataset repository, from the cache or downloaded.
pub fn fetch_dataset_file(repo_id: &str, file: &str, show_progress: bool) -> Result<PathBuf> {
    let repo = Repo::new(repo_id.into(), RepoType::Dataset);
    if offline() {
        let cache = Cache::from_env();
        return cache.repo(repo).get(file).ok_or_else(|| {
            anyhow!(
                "dataset {repo_id}/{file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: pass --dataset-path",
                cache.path().display()
            )
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(show_progress)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    api.repo(repo).get(file).with_context(|| {
        format!("cannot fetch {file} of dataset {repo_id} from the hub (pass --dataset-path to use a local copy)")
    })
}

fn folder_of(config: &std::path::Path) -> Result<PathBuf> {
    config
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| anyhow!("{} has no parent folder", config.display()))
}

/// The shard file names of a `model.safetensors.index.json`.
fn shard_names(index: &str) -> Result<Vec<String>> {
    let json: serde_json::Value =
        serde_json::from_str(index).context("model.safetensors.index.json is not valid JSON")?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("model.safetensors.index.json has no weight_map"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("meta-llama/Meta-Llama-3-8B-Instruct"));
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("llama-3-8b"));
    }

    #[test]
    fn shards_from_index() {
        let idx = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}}"#;
        assert_eq!(
            shard_names(idx).unwrap(),
            vec!["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(shard_names("{}").is_err());
    }
}
