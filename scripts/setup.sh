#!/usr/bin/env bash
# Create .venv (Python >= 3.12) at the repository root and install jaxmoe there with its
# test extra, editable. Safe to run again. Set PYTHON=/path/to/python to choose the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

is_new_enough() {  # a Python that really runs (pyenv shims may not) and is >= 3.12
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate version path
    for candidate in ${PYTHON:-} python3.13 python3.12 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && is_new_enough "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then  # installed through pyenv but not selected
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -rV); do
            path="$(PYENV_VERSION="$version" pyenv which python 2>/dev/null)" || continue
            if is_new_enough "$path"; then
                echo "$path"
                return 0
            fi
        done
    fi
    return 1
}

if [ ! -x .venv/bin/python ] || ! is_new_enough .venv/bin/python; then
    if ! py="$(find_python)"; then
        echo "setup: jaxmoe needs Python >= 3.12 (jax >= 0.11); none found as python3.13, python3.12," >&2
        echo "setup: python3, python or through pyenv. Install one, or set PYTHON=/path/to/python." >&2
        exit 1
    fi
    echo "setup: creating .venv with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    rm -rf .venv
    "$py" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
echo "setup: installing jaxmoe[test] (jax, triton, jax-triton: a few minutes the first time)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "setup: done; use .venv/bin/python"
