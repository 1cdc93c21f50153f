#!/usr/bin/env bash
# benchmarks/gpu_check.py on a lent GPU machine: a fresh copy of this repository, run from its
# root; the device tool sets $OUT (else outputs/gpu_check). The device command:
#
#     bash benchmarks/gpu_check.sh            # or: bash benchmarks/gpu_check.sh --quick
#
# 1. torch==2.13.0 where torch is not 2.13 already and an index answers; the lent machines
#    reach none, so it fails at once and the image's torch (and its triton) is used: the
#    report's header records the versions that ran;
# 2. this package, editable and without its dependencies (the image has transformers and
#    accelerate; datasets, evaluate and peft are not needed here); PYTHONPATH covers it if
#    even that fails;
# 3. the check, under 560 s (the tool's limit per command is 600 s); its tables, JSON and
#    log land in $OUT (gpu_check.md, gpu_check.json, gpu_check.log, install.log).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-outputs/gpu_check}"
mkdir -p "$out"
{
  python3 -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13."))' ||
    python3 -m pip install -q --retries 0 --timeout 10 torch==2.13.0 ||
    echo "torch==2.13.0 not installed (no index reachable?): keeping the image's torch"
  python3 -m pip install -q --no-deps --no-build-isolation -e . ||
    echo "editable install failed: PYTHONPATH has the repository"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$out/install.log" 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 560 python3 benchmarks/gpu_check.py --output_dir "$out" "$@" 2>&1 |
  tee "$out/gpu_check.log"
