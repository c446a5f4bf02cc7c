#!/usr/bin/env bash
# `make lock`: regenerate requirements.lock (every runtime, test and build
# dependency, pinned with hashes; torch at torch.txt's pin, which `make setup` installs first
# on its own) and requirements/models.lock. pip-compile runs from its own throwaway venv,
# resolving the newest versions pyproject.toml's ranges allow.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d); trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q pip-tools==7.7.0
"$tools/venv/bin/pip-compile" -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
    --extra test --no-emit-index-url --no-emit-find-links \
    -c requirements/torch.txt -o requirements.lock pyproject.toml requirements/build.in
requirements/lock_models.sh
