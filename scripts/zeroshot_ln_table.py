"""Tables of scripts/zeroshot_ln_arm.sh: closed loop with the memory LayerNorm against the run's
published models (paired bootstrap over seed x task), and the oracle's per-dimension errors.

  python scripts/zeroshot_ln_table.py [RUN_DIR]     # default runs/zeroshot-scale-published
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import experiment as X  # noqa: E402

R = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "runs" / "zeroshot-scale-published")
unseen = X.SCALE_UNSEEN.split(",")


def eps(root, p):
    """{(task, episode): success} of one evaluation directory."""
    r = json.loads((root / p / "results.json").read_text())
    if not r["complete"]:
        raise SystemExit(f"zeroshot_ln_table.py: error: {root / p}: expected a complete evaluation, found a partial one")
    return {(e["task"], e["episode"]): bool(e["success"]) for e in r["episodes"]}


arms = {"amplify-ln": (R / "eval-ln", "amplify"), "bc-ln": (R / "eval-ln", "bc"),
        "amplify": (R / "eval", "amplify"), "bc": (R / "eval", "bc")}
res = {a: {s: eps(root, f"d16-s{s}-{m}") for s in (0, 1, 2)} for a, (root, m) in arms.items()}


def tot(a, task=None):
    """Success of arm `a` pooled over seeds (and tasks, with task None)."""
    v = [x for s in res[a].values() for (t, _), x in s.items() if task is None or t == task]
    return f"{100 * np.mean(v):.0f}% ({sum(v)}/{len(v)})"


def diff(a, b, task=None):
    """a - b in points, paired bootstrap over seed x task."""
    pairs = {}
    for s in (0, 1, 2):
        for k in res[a][s]:
            if task is None or k[0] == task:
                pairs.setdefault((s, k[0]), []).append((res[a][s][k], res[b][s][k]))
    d, lo, hi = X.paired_bootstrap(pairs)
    return f"{100 * d:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}]"


print("| unseen task | AMPLIFY + LN | BC + LN | AMPLIFY+LN - BC+LN | AMPLIFY+LN - AMPLIFY (published) | BC+LN - BC |")
print("|---|---|---|---|---|---|")
for t in unseen + [None]:
    print(f"| {t or 'pooled'} | {tot('amplify-ln', t)} | {tot('bc-ln', t)} | {diff('amplify-ln', 'bc-ln', t)} "
          f"| {diff('amplify-ln', 'amplify', t)} | {diff('bc-ln', 'bc', t)} |")
print("per seed (AMPLIFY+LN / BC+LN of 80):",
      [(sum(res['amplify-ln'][s].values()), sum(res['bc-ln'][s].values())) for s in (0, 1, 2)])


def pos(v):
    """Mean error over the x, y, z dimensions."""
    return float(np.mean(v[:3]))


# the oracle: held-out action error on the unseen tasks (position, gripper) and on the trained tasks
rows = {k: [] for k in ("amplify", "bc", "amplify_pred", "bc_all")}
src, grip = {k: [] for k in rows}, {k: [] for k in rows}
for s in (0, 1, 2):
    d = json.load(open(R / "scores-ln" / f"d16-s{s}.json"))
    for k in rows:
        m = d["models"][k]
        rows[k].append(np.mean([pos(m[t]) for t in unseen]))
        grip[k].append(np.mean([m[t][3] for t in unseen]))
        src[k].append(np.mean(m["source"]))
for k in rows:
    print(k, "unseen pos %.4f grip %.4f trained %.4f" % (np.mean(rows[k]), np.mean(grip[k]), np.mean(src[k])))
print("oracle ratio unseen pos", np.mean(rows["amplify"]) / np.mean(rows["bc"]),
      "trained", np.mean(src["amplify"]) / np.mean(src["bc"]))
