#!/bin/bash
# Zero-shot at scale, dose 16: AMPLIFY and BC with the inverse model's memory LayerNorm
# (--memory-layernorm), beside the run in $R (same data, motion prior, seeds, steps, flags).
# Resumable: every amplify.py call has --resume, an evaluation with results.json is skipped.
# Usage: bash scripts/zeroshot_ln_arm.sh   (after experiment.py --setting zeroshot-scale --out $R); R=... to point elsewhere.
# Writes $R/policies-ln, $R/eval-ln, $R/scores-ln; scripts/zeroshot_ln_table.py prints the tables.
set -e
HERE=$(cd "$(dirname "$0")/.." && pwd)
R=$(realpath "${R:-$HERE/runs/zeroshot-scale-published}")
CODE=${CODE:-$HERE}  # the amplify.py to run (the published run used a snapshot of 7d655d2)
cd "$CODE"
D="$R/data/videos $R/data/demos"
# The setting's task lists, as experiment.py defines them (its default run: dose 16 = every source task)
UNSEEN=$(python -c "import experiment as X; print(X.SCALE_UNSEEN)")
mapfile -t ONLY < <(python -c "import experiment as X
for t in X.SCALE_SOURCES.split(','): print('--only-task'); print(X.task_text(t))")
COMMON=(--batch-size 8 --device cpu --threads 1 --resume --eval-every 400 --memory-layernorm "${ONLY[@]}")
P=$R/policies-ln
train() {  # seed: AMPLIFY (1600 true-code steps + 800 fine-tuning), BC at equal steps (1600) and in all (2400)
  s=$1; a=$P/d16-s$s-amplify
  mkdir -p $a && cp -n $R/motion/tokenizer.pt $R/motion/forward.pt $a/
  python amplify.py --stage inverse --data $D --out $a --steps 1600 --seed $s "${COMMON[@]}" > $a.log 2>&1
  python amplify.py --stage inverse --data $D --out $a --steps 800 --seed $s "${COMMON[@]}" --predicted-codes >> $a.log 2>&1
  for m in bc-eq:1600 bc:2400; do
    b=$P/d16-s$s-${m%%:*}
    python amplify.py --stage inverse --data $D --out $b --steps ${m##*:} --seed $s "${COMMON[@]}" --no-codes > $b.log 2>&1
  done
}
evaluate() {  # seed method
  p=d16-s$1-$2; [ -f $R/eval-ln/$p/results.json ] && return
  python eval_libero.py --policy $P/$p --suite metaworld --tasks $UNSEEN \
    --episodes 20 --seed $1 --workers 2 --out $R/eval-ln/$p --max-steps 200 > $R/eval-ln-$p.log 2>&1
}
train 0 & train 1; wait; train 2
for s in 0 1 2; do evaluate $s amplify; evaluate $s bc; done
python - "$R" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
import experiment as X
R = Path(sys.argv[1]); P = R / "policies-ln"
src, unseen = X.SCALE_SOURCES.split(","), X.SCALE_UNSEEN.split(",")
for s in (0, 1, 2):
    models = {"amplify": (str(P / f"d16-s{s}-amplify"), "inverse.pt", "true"),
              "bc": (str(P / f"d16-s{s}-bc-eq"), "inverse.pt", None),
              "amplify_pred": (str(P / f"d16-s{s}-amplify"), "inverse_ft.pt", "pred"),
              "bc_all": (str(P / f"d16-s{s}-bc"), "inverse.pt", None)}
    X.write_scores(R / "scores-ln" / f"d16-s{s}.json", [R / "data/videos", R / "data/demos"], R / "data/probe",
                   models, src, unseen)
PY
