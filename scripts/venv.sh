#!/usr/bin/env bash
# Create or update the virtual environment: `make venv` runs this. The default set is
# requirements.txt (what `make run` needs); each extra adds requirements-<extra>.txt, pinned and
# installed with --no-deps like the default (pyproject.toml says why):
#   EXTRAS="dev ray team lite"   tests and lint, Ray engine, team server driver, Lite1/2 backbones
#   GPU=1                        TensorFlow's CUDA build (requirements-gpu.txt) in place of tensorflow-cpu
# The venv remembers what it holds in $VENV/.installed (a digest of the requirement files, then the
# extras), so a later call with fewer extras keeps them and a call with nothing new does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed"

had=""
[ -f "$STAMP" ] && had="$(sed 1d "$STAMP")"
[ -n "${GPU:-}" ] && [ "${GPU}" != 0 ] && had="$had gpu"
wanted="$(printf '%s\n' $had ${EXTRAS:-} | sort -u | sed '/^$/d')"
for extra in $wanted; do
    [ "$extra" = gpu ] || [ -f "requirements-$extra.txt" ] || {
        echo "make venv: unknown extra '$extra' (extras: dev ray team lite; GPU=1 for the CUDA build)" >&2; exit 2; }
done
digest="$(cat requirements*.txt pyproject.toml | cksum)"
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(printf '%s\n' "$digest" $wanted)" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --no-deps)
"$VENV/bin/python" -m pip install --quiet --upgrade "pip==25.3"
files=()
if printf '%s\n' $wanted | grep -qx gpu; then
    grep -v '^tensorflow_cpu==' requirements.txt > "$VENV/requirements-base.txt"
    "$VENV/bin/python" -m pip uninstall --quiet --yes tensorflow-cpu 2>/dev/null || true
    files+=(-r "$VENV/requirements-base.txt" -r requirements-gpu.txt)
else
    files+=(-r requirements.txt)
fi
for extra in $wanted; do
    [ "$extra" = gpu ] || files+=(-r "requirements-$extra.txt")
done
"${pip[@]}" "${files[@]}"
"${pip[@]}" --no-build-isolation -e .
printf '%s\n' "$digest" $wanted > "$STAMP"
echo "venv $VENV: default set${wanted:+ + $(echo $wanted)}"
