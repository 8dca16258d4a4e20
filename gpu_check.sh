#!/usr/bin/env bash
# The GPU check: fills the GPU figures of docs/SCALE.md whenever a CUDA machine is at hand.
#
#   ./gpu_check.sh                         # paper preset on cuda: the benchmark, then torchrun over NCCL
#   DEVICE=cpu PRESET=cpu ./gpu_check.sh   # the same flow on a CPU (gloo), to check the script itself
#
# 1. bench.py --preset paper --device cuda at the preset's batch (256) under bf16 autocast, cut off
#    after BENCH_TIMEOUT seconds (default 300): every figure docs/SCALE.md lists, in gpu_bench.txt.
# 2. A short data-parallel run: torchrun with one rank per GPU (NCCL) trains the tokenizer for a few
#    steps on built-in synthetic data and checks every rank ends with identical weights. With a
#    single GPU, NCCL cannot run two ranks on one device: one rank then initialises NCCL and
#    all-reduces a tensor, which checks the library and driver, not the multi-GPU path.
set -euo pipefail
cd "$(dirname "$0")"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-paper}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"

python - <<EOF
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| gpus", torch.cuda.device_count(),
      "|", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
if "$DEVICE".startswith("cuda") and not torch.cuda.is_available():
    raise SystemExit("gpu_check: DEVICE=$DEVICE but torch sees no CUDA device (a CPU build of torch?)")
EOF

echo "== 1. benchmark: preset $PRESET on $DEVICE (at most ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" python bench.py --preset "$PRESET" --device "$DEVICE" --steps 5 | tee "$OUT/gpu_bench.txt" \
    || echo "gpu_check: the benchmark stopped early (exit $?); the figures above are those it printed"

echo "== 2. torchrun"
python -c "
import testdata, preprocess
arrays, meta = testdata.synthetic_dataset(episodes=4, frames=24, img_size=32, grid=5)
preprocess.write_dataset('$OUT/data', arrays, meta)"
if [[ "$DEVICE" == cuda* ]]; then
    RANKS=$(python -c "import torch; print(min(8, torch.cuda.device_count()))")
else
    RANKS=2
fi
if [[ "$RANKS" -ge 2 ]]; then
    torchrun --nproc_per_node="$RANKS" --master_port=29531 amplify.py --stage tokenizer --data "$OUT/data" \
        --out "$OUT/ddp" --device "$DEVICE" --steps 5 --batch-size $((4 * RANKS)) --log-every 1 --eval-every 5 \
        | tee "$OUT/torchrun.txt"
    grep -q "ddp: $RANKS ranks, max weight difference 0" "$OUT/torchrun.txt" \
        || { echo "gpu_check: the ranks' weights differ (see $OUT/torchrun.txt)"; exit 1; }
else
    python - <<'EOF'
import os
import torch
import torch.distributed as dist
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29532")
dist.init_process_group("nccl", rank=0, world_size=1)
x = torch.ones(4, device="cuda")
dist.all_reduce(x)
dist.barrier()
assert x.tolist() == [1.0] * 4, x
print("nccl: one rank initialised, all_reduce ok (one GPU: the multi-GPU path is not exercised)")
dist.destroy_process_group()
EOF
fi
echo "gpu_check: done; figures in $OUT/gpu_bench.txt"
