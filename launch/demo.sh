#!/usr/bin/env bash
# Sets up .venv if needed, then runs the demo: a tiny random UNITE model encodes text, images,
# a video and fused inputs, and prints their similarities.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python launch/demo_encode.py --workdir="${1:-demo_out}"
