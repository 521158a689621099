#!/usr/bin/env bash
# The two commands, from a fresh clone:
#   ./dev.sh demo [generate.py options]   sample the fixture with and without ditopt (examples/generate.py)
#   ./dev.sh test [--all] [pytest args]   the tests: all but the `slow` ones, or with --all every test (CI)
# Creates ./.venv and installs ditopt into it on first use (or uses the active virtualenv);
# without a CUDA GPU it installs the CPU build of torch (torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        echo "dev.sh: creating .venv" >&2
        python3 -m venv .venv
    fi
    source .venv/bin/activate
fi

stamp="$VIRTUAL_ENV/.ditopt-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "dev.sh: installing ditopt and its dependencies into $VIRTUAL_ENV" >&2
    pip() { python -m pip install --quiet --disable-pip-version-check "$@"; }
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
            pip "torch>=2.11"
        else
            pip torch==2.13.0  # the CPU build: a bare `torch` would pull a several-GB CUDA build
        fi
    fi
    # transformers (every pipeline's text encoder), peft, accelerate and torchao: what a diffusers user has.
    # The constraint keeps the torch installed above: nothing may replace it with another build.
    constraint="$VIRTUAL_ENV/.ditopt-torch-constraint.txt"
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraint"
    pip -e ".[test]" -c "$constraint"
    touch "$stamp"
fi

case "${1:-}" in
    demo)
        shift
        exec python examples/generate.py "$@"
        ;;
    test)
        shift
        if [[ "${1:-}" == "--all" ]]; then
            shift
            exec python -m pytest -q -p no:cacheprovider -m "" "$@"
        fi
        exec python -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [--preset balanced ...] | ./dev.sh test [--all] [pytest args]" >&2
        exit 2
        ;;
esac
