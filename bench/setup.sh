#!/usr/bin/env bash
# Installs what bench/proxy_overhead.py needs; safe to run again.
#   wrk (Debian)                        the load generator
#   bench/.work/litellm-venv            LiteLLM's proxy, in its own virtual environment
#   bench/.work/floor-venv              the floor proxies: the gateway's versions of uvicorn,
#                                       uvloop, httptools, httpx, httpcore, anyio, sniffio + aiohttp
#   py-spy in the project venv          for --profile
set -euo pipefail
cd "$(dirname "$0")/.."
LITELLM_SPEC="${LITELLM_SPEC:-litellm[proxy]==1.108.7}"

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk
fi

if [ ! -x bench/.work/litellm-venv/bin/litellm ]; then
  python3 -m venv bench/.work/litellm-venv
  bench/.work/litellm-venv/bin/pip install -q "$LITELLM_SPEC"
fi

if [ ! -x bench/.work/floor-venv/bin/python ]; then
  pins=$(.venv/bin/python - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in
               ("uvicorn", "uvloop", "httptools", "httpx", "httpcore", "anyio", "sniffio", "h11")))
EOF
)
  python3 -m venv bench/.work/floor-venv
  # shellcheck disable=SC2086  # pins is a list of requirement specifiers
  bench/.work/floor-venv/bin/pip install -q $pins aiohttp
fi

[ -x .venv/bin/py-spy ] || .venv/bin/pip install -q py-spy
echo "bench setup done"
