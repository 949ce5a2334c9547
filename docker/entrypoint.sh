#!/usr/bin/env bash
# Entrypoint of the pptk image: safe W&B default, optional environment check, then the user's command.
set -euo pipefail

# Runtimes that pass the host's environment through (pyxis/enroot, Apptainer) can replace the image's PATH.
if [[ -d /opt/venv/bin && ":${PATH}:" != *":/opt/venv/bin:"* ]]; then
    export PATH="/opt/venv/bin:${PATH}"
fi

# Without a key (WANDB_API_KEY, or `wandb login`'s ~/.netrc) wandb would ask for a login, which hangs or fails
# in a batch job: log offline instead (`wandb sync` uploads later). An explicit WANDB_MODE always wins.
if [[ -z "${WANDB_API_KEY:-}" ]] && ! grep -qs "api.wandb.ai" "${HOME:-/nonexistent}/.netrc"; then
    export WANDB_MODE="${WANDB_MODE:-offline}"
fi

# PPTK_ENV_CHECK=1 prints a one-line summary (or the mismatches) before the command; it never blocks it.
if [[ "${PPTK_ENV_CHECK:-0}" == "1" ]]; then
    pptk env --quiet || echo "pptk-entrypoint: pptk env reported problems (above); continuing" >&2
fi

exec "$@"
