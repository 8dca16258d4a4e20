"""The paper's few-shot claim in the paper's regime, on Meta-World, end to end on a CPU.

AMPLIFY (Collins et al., CoRL 2025, arXiv 2506.14198) claims that a motion prior learned from
action-free video makes few-shot policy learning work better than behaviour cloning on the same
actions, and transfers zero-shot to tasks with no action data. The gain comes from an asymmetry:
the forward model sees *many* videos, the inverse model only a few action demonstrations (paper
Table 14: more action-free video, better policies). This script runs that protocol through the
project's command lines (`preprocess.py`, `amplify.py`, `eval_libero.py`) and prints one table:
closed-loop success with 95% intervals, and beside it every link the result depends on (tracker,
tokenizer, forward model, inverse model with true codes).

    python experiment.py --out runs/experiment          # the full run (docs/EXPERIMENT.md: wall time)
    python experiment.py --quick --out runs/quick       # the same protocol, small (< 20 min)
    python experiment.py --plan                         # the steps and their estimated time

The protocol (every step is one subprocess or one in-process function; logs in OUT/logs/):
  1. data      `preprocess.py metaworld`, 128 px, exact simulator tracks (`--tracker sim`):
               videos  V episodes per task (MT1 seed 0), stored WITHOUT actions and proprio, as
                       human video would be (data/videos: the rendered set less those two arrays)
               demos   D + 1 episodes per task with actions (MT1 seed 1: other goal variations);
                       the last one of each task is held out of all training (`--val-episodes 1`)
  2. motion    tokenizer, then forward model, on the videos of all training episodes (videos +
               demos), in rounds until the held-out loss stops improving (the plateau rule below)
  3. policies  per seed and setting: AMPLIFY = inverse model on codes of the true tracks, then
               fine-tuned on forward-predicted codes (the paper's protocol); the baseline "inverse
               only (BC)" = the same inverse model without codes (`--no-codes`) on the same actions
               for the same total number of gradient steps. Both use their last checkpoint: nothing
               is chosen by its closed-loop result.
                 few-shot K   the first K demos of every task (`--shots K`)
                 zero-shot    the demos of the other tasks only (`--exclude-task`); the forward
                              model has still seen the held-out tasks' videos
  4. eval      `eval_libero.py --suite metaworld`: episode i of seed s uses goal variation i of
               MT1(seed=1000 + s), the same for both methods (so outcomes pair up episode by
               episode), never a training episode
  5. links     tokenizer and forward model on the held-out windows: endpoint error of the points
               that move, beside "nothing moves"; inverse model's held-out action error with true
               codes vs BC at equal steps (the oracle row); the offline trackers (Lucas-Kanade,
               dense flow) vs the exact tracks (`preprocess.py bench-tracker --truth metaworld`)
  6. ablation  (`--ablation-tracker flow|lk`) steps 1-4 again with an offline tracker's tracks for
               every episode, for the first few-shot setting; its motion prior is scored against
               the exact tracks of the same held-out windows

Plateau rule (tokenizer, forward model): round 1 trains S steps; if the best held-out loss of the
second half of the evaluations so far is lower than the best of the first half by more than
`--plateau` (relative), the stage resumes for twice the steps, up to `--max-motion-steps`. A
resumed round stretches the cosine schedule over the new total, so its learning rate climbs back to
about half the peak (a warm restart). OUT/curves/*.png show every stage's held-out curves.

Notable features
  - Resumable: a finished step is recorded in OUT/steps.json with its exact command and skipped
    next time; an interrupted training stage continues from its checkpoint (`--resume`). Other
    settings in the same OUT are refused instead of mixing results.
  - Fixed seeds everywhere; every subprocess runs with one torch/OpenMP thread (on a busy 2-core
    machine more threads are slower).
  - OUT/results.md holds the printed table; its last line counts the time of every step.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULT_TASKS = "reach-v3,button-press-topdown-v3,drawer-open-v3,door-open-v3"
METHODS = {"amplify": "AMPLIFY", "bc": "inverse only (BC)"}
# `--quick`: the same protocol at sizes that finish in under 20 minutes on a busy 2-core machine.
# Explicit flags still win over these.
QUICK = {"videos": 6, "demos": 2, "shots": "2", "seeds": "0", "tokenizer_steps": 200, "forward_steps": 200,
         "max_motion_steps": 200, "inverse_steps": 150, "finetune_steps": 50, "eval_episodes": 5,
         "max_steps": 150, "motion_eval_samples": 64, "inverse_eval_every": 50}
# CPU seconds (user + sys) per unit, measured with `time` on this machine (2026-11-30; 128 px,
# 2 views, grid 20, cpu preset, batch 8, one thread): a training step of each stage, a rendered
# frame of `preprocess.py metaworld --tracker sim`, a closed-loop policy step (simulation, two
# renders, the policy), one held-out evaluation of a motion stage (256 windows). `--plan` adds them
# up as wall time on an otherwise idle 2-core machine: one core per training step, `--workers 2`
# evaluations on both. On a shared machine multiply by the load's share.
RATES = {"frame": 0.045, "tokenizer": 0.64, "forward": 0.13, "inverse": 0.07, "inverse_ft": 0.12, "bc": 0.07,
         "eval_amplify": 0.04, "eval_bc": 0.018, "motion_eval": 15.0}
STARTUP = 5.0  # seconds to start a subprocess (torch, the simulator) and load the data


# -----------------------------------------------------------------------------
# Steps: run a command once, remember that it finished


class Steps:
    """OUT/steps.json: {name: {"cmd": [...], "seconds": float}} for every step that finished.

    plan=True only lists the steps (with `estimate` seconds) and runs nothing."""

    def __init__(self, out, plan=False):
        self.path = Path(out) / "steps.json"
        self.logs = Path(out) / "logs"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped = self.ran = 0
        self.plan, self.planned = plan, []

    def _skip(self, name, cmd):
        if name not in self.done:
            return False
        if self.done[name]["cmd"] != cmd:
            sys.exit(f"experiment.py: error: step '{name}' in {self.path.parent} finished with other settings "
                     f"(expected command {' '.join(cmd)}, found {' '.join(self.done[name]['cmd'])}); use a new --out")
        if not self.plan:
            print(f"skip  {name:<30} (done in {self.done[name]['seconds'] / 60:.1f} min)", flush=True)
        self.skipped += 1
        return True

    def _finish(self, name, cmd, seconds):
        self.done[name] = {"cmd": cmd, "seconds": seconds}
        import amplify  # lazily: the protocol itself only runs command lines

        amplify.atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.done, indent=1)))
        print(f"done  {name:<30} {seconds / 60:.1f} min", flush=True)
        self.ran += 1

    def run(self, name, cmd, estimate=0.0):
        """Run `cmd` (argv after the interpreter) unless step `name` finished with the same command."""
        cmd = [str(c) for c in cmd]
        if self._skip(name, cmd):
            return
        if self.plan:
            self.planned.append((name, estimate))
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        print(f"run   {name:<30} log: {log_path}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.setdefault("MUJOCO_GL", "egl")
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env)
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            sys.exit(f"{tail}\nexperiment.py: error: step '{name}' failed (exit code {code}); see {log_path}")
        self._finish(name, cmd, time.time() - t0)

    def call(self, name, what, fn, estimate=0.0):
        """An in-process step: `what` (a list of strings) stands for its command in steps.json."""
        what = [str(c) for c in what]
        if self._skip(name, what):
            return
        if self.plan:
            self.planned.append((name, estimate))
            return
        print(f"run   {name:<30} (in process)", flush=True)
        t0 = time.time()
        fn()
        self._finish(name, what, time.time() - t0)

    def log_text(self, name):
        path = self.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def seconds(self):
        return sum(s["seconds"] for s in self.done.values())


# -----------------------------------------------------------------------------
# Data: action-free videos, a few demonstrations


def strip_actions(src, dst):
    """dst = dataset src without 'actions' and 'proprio' (files hard-linked where possible).

    amplify.py treats an episode without actions as video only: the tokenizer and the forward
    model train on it, the inverse model never sees it. Written with amplify.atomic_write: a crash
    leaves no half dataset, and a leftover of one is replaced.
    """
    import amplify

    src = Path(src)

    def write(tmp):
        for f in sorted(src.glob("*.npy")):
            if f.stem in ("actions", "proprio"):
                continue
            try:
                os.link(f, Path(tmp) / f.name)
            except OSError:  # another file system: copy
                shutil.copyfile(f, Path(tmp) / f.name)
        meta = json.loads((src / "meta.json").read_text())
        meta = {k: v for k, v in meta.items() if k not in ("action_stats", "proprio_stats")}
        meta["actions"] = "removed by experiment.py: action-free video, as human video would be"
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=1))

    amplify.atomic_write(dst, write, directory=True)


def data_steps(steps, args, variant):
    """The two datasets of one track variant (a key of TRACKS); returns their paths."""
    d = Path(args.out) / ("data" if variant == "sim" else f"data-{variant}")
    tag = "" if variant == "sim" else f"-{variant}"
    common = ["--img-size", args.img_size, "--T", args.T, "--grid", args.grid, "--tracker", variant, "--no-progress"]
    tasks = ",".join(args.tasks)
    n = len(args.tasks)
    steps.run(f"data{tag}-videos-raw", ["preprocess.py", "metaworld", tasks, "--episodes", args.videos, "--seed", 0,
                                        *common, "--out", d / "videos-raw"],
              estimate=STARTUP + n * args.videos * 80 * RATES["frame"])
    steps.call(f"data{tag}-videos", ["strip_actions", d / "videos-raw", d / "videos"],
               lambda: strip_actions(d / "videos-raw", d / "videos"))
    steps.run(f"data{tag}-demos", ["preprocess.py", "metaworld", tasks, "--episodes", args.demos + 1, "--seed", 1,
                                   *common, "--out", d / "demos"],
              estimate=STARTUP + n * (args.demos + 1) * 80 * RATES["frame"])
    return [d / "videos", d / "demos"]


# -----------------------------------------------------------------------------
# Motion prior: tokenizer and forward model until the held-out loss stops improving


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plateaued(records, tol):
    """True when the best held-out loss of the later half of the evaluations is not lower than the
    best of the earlier half by more than `tol` (relative). Too few evaluations: not yet."""
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    if len(losses) < 4:
        return False
    half = len(losses) // 2
    early, late = min(losses[:half]), min(losses[half:])
    return late > early * (1 - tol)


def amplify_cmd(stage, data, out, steps, args, *flags, seed=None, eval_every=None, eval_samples=None):
    """Every amplify.py call of the protocol: flag names live here (and in the policy steps) only.

    --resume: a stage continues from its checkpoint in `out` if there is one (also the flag that
    lets amplify.py write into a directory holding its checkpoint)."""
    cmd = ["amplify.py", "--stage", stage, "--data", *data, "--out", out, "--steps", steps,
           "--seed", args.seed if seed is None else seed, "--batch-size", args.batch_size,
           "--device", args.device, "--threads", 1, "--resume"]
    if eval_every:
        cmd += ["--eval-every", eval_every]
    if eval_samples:
        cmd += ["--eval-samples", eval_samples]
    return cmd + list(flags)


def motion_steps(steps, args, data, variant, truth=None):
    """Tokenizer then forward model on all videos, each in rounds until its held-out loss plateaus;
    then their links, scored on the held-out windows of `truth` (default `data`): the exact tracks."""
    out = Path(args.out) / ("motion" if variant == "sim" else f"motion-{variant}")
    tag = "" if variant == "sim" else f"-{variant}"
    for stage, first in (("tokenizer", args.tokenizer_steps), ("forward", args.forward_steps)):
        total, r = first, 1
        every = max(1, first // 5)  # five evaluations per round of the first size, more later
        while True:
            name = f"{stage}{tag}" if r == 1 else f"{stage}{tag}-round{r}"
            if steps.plan and r > 1:
                name += " (if still improving)"
            steps.run(name, amplify_cmd(stage, data, out, total, args, eval_every=every,
                                        eval_samples=args.motion_eval_samples),
                      estimate=STARTUP + (total - (total // 2 if r > 1 else 0)) * RATES[stage]
                      + 5 * RATES["motion_eval"])
            if total >= args.max_motion_steps:
                break
            if not steps.plan and plateaued(read_jsonl(out / f"{stage}_metrics.jsonl"), args.plateau):
                break
            total, r = min(2 * total, args.max_motion_steps), r + 1
    truth = truth or data
    steps.call(f"diagnostics{tag}", ["motion_diagnostics", *truth, out, args.motion_eval_samples],
               lambda: write_motion_diagnostics(truth, out, args.motion_eval_samples), estimate=RATES["motion_eval"])
    return out


def motion_diagnostics(data, motion, samples):
    """The links between tracks and codes, on the held-out windows amplify.py scores (evenly spaced).

    Endpoint error in pixels (Euclidean, at the window's last step) of the points that move more than
    1 px from their start within the window and stay in the image, median: tokenizer reconstruction,
    forward prediction
    (forward codes decoded by the tokenizer) and "nothing moves" (every point stays at its start).
    Also the published per-coordinate metrics of each and the share of moving points.
    """
    import torch

    import amplify  # lazily, as everywhere in this script

    corpus = amplify.load_corpus([str(p) for p in data])
    _, val = amplify.split_episodes(corpus, 1)
    frames = amplify.eval_frames(corpus, val, samples)
    tok = amplify.model_from_checkpoint(amplify.load_checkpoint(str(Path(motion) / "tokenizer.pt"), "tokenizer")).eval()
    fwd = amplify.model_from_checkpoint(amplify.load_checkpoint(str(Path(motion) / "forward.pt"), "forward")).eval()
    h, w = corpus.img_size
    scale = torch.tensor([w / 2, h / 2])  # normalized -> pixel displacements
    preds = {"tokenizer": [], "forward": [], "still": []}
    gts = []
    with torch.no_grad():
        for i in range(0, len(frames), 16):
            f = frames[i:i + 16]
            gt = torch.as_tensor(amplify.tracks_batch(corpus, f))  # (B, V, T, N, 2)
            start = gt[:, :, 0]  # (B, V, N, 2)
            preds["tokenizer"].append(tok.decode(tok.encode(gt)[1], start))
            images = torch.as_tensor(corpus.gather("images", f))
            preds["forward"].append(tok.decode(fwd.generate(images, corpus.tasks_of(f)), start))
            preds["still"].append(start[:, :, None].expand_as(gt))
            gts.append(gt)
    gt = torch.cat(gts)
    moving = ((gt - gt[:, :, :1]) * scale).norm(dim=-1).amax(dim=2) > 1.0  # (B, V, N)
    # Only points that stay in the image: exact tracks project points that leave the view (the wrist
    # camera passes close to objects) far outside it, and no decoder of pixel moves can follow them.
    inside = (gt.abs() <= 1).all(dim=-1).all(dim=2)  # (B, V, N)
    moving &= inside
    out = {"windows": len(frames), "moving_frac": float(moving.float().mean()),
           "outside_frac": float(1 - inside.float().mean())}
    for name, p in preds.items():
        p = torch.cat(p)
        end_err = ((p[:, :, -1] - gt[:, :, -1]) * scale).norm(dim=-1)  # (B, V, N) pixels
        m = amplify.track_metrics(p, gt, corpus.img_size)
        out[name] = {"moving_px": float(end_err[moving].median()) if moving.any() else float("nan"),
                     "moving_px_per_view": [float(end_err[:, v][moving[:, v]].median()) if moving[:, v].any()
                                            else float("nan") for v in range(gt.shape[1])],
                     **{k: float(m[k]) for k in ("mse", "pixel_acc", "delta_auc")}}
    out["views"] = list(corpus.views)
    return out


def write_motion_diagnostics(data, motion, samples):
    import amplify

    d = motion_diagnostics(data, motion, samples)
    amplify.atomic_write(Path(motion) / "diagnostics.json", lambda tmp: Path(tmp).write_text(json.dumps(d, indent=1)))


# -----------------------------------------------------------------------------
# Policies and their evaluation


def settings(args):
    """(name, label, inverse flags, evaluation tasks) of every setting, in table order."""
    out = []
    for k in args.shots:
        out.append((f"fewshot{k}", f"few-shot, {k} demo{'s' if k > 1 else ''}/task", ["--shots", k], args.tasks))
    held = args.zero_shot_tasks
    flags = [f for t in held for f in ("--exclude-task", task_text(t))]
    out.append(("zeroshot", f"zero-shot on {', '.join(held)}", flags, held))
    return out


def task_text(name):
    """Meta-World name -> the instruction preprocess.py stores: 'door-open-v3' -> 'door open'."""
    import preprocess  # lazily: the table alone should not need it

    return preprocess.task_from_name(name)


def atomic_copy(src, dst):
    import amplify

    amplify.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


TRACKS = {"sim": "exact", "flow": "dense flow", "lk": "Lucas-Kanade"}  # track variant -> table label


def variants(args):
    return ["sim", args.ablation_tracker] if args.ablation_tracker else ["sim"]


def policy_name(variant, setting, seed, method):
    return f"{'' if variant == 'sim' else variant + '-'}{setting}-s{seed}-{method}"


def variant_settings(args, variant):
    """The settings a track variant runs: all with exact tracks; the ablation only the first few-shot
    setting (the claim's: fewest demos), which keeps it affordable."""
    return settings(args) if variant == "sim" else settings(args)[:1]


def variant_methods(variant):
    """BC reads no tracks, so the ablation reuses the exact-track run's BC policies (same episodes,
    images, actions and seeds) instead of training identical ones again."""
    return list(METHODS) if variant == "sim" else ["amplify"]


def policy_steps(steps, args, data, motion, variant):
    out = Path(args.out)
    inv_every = args.inverse_eval_every
    for name, _, flags, eval_tasks in variant_settings(args, variant):
        for seed in args.seeds:
            a, b = (policy_name(variant, name, seed, m) for m in ("amplify", "bc"))
            amp, bc = out / "policies" / a, out / "policies" / b
            if not steps.plan:
                amp.mkdir(parents=True, exist_ok=True)
                for stage in ("tokenizer", "forward"):  # Policy.load(DIR) reads all three stages from DIR
                    if not (amp / f"{stage}.pt").exists():
                        atomic_copy(motion / f"{stage}.pt", amp / f"{stage}.pt")
            steps.run(f"{a}-inverse", amplify_cmd("inverse", data, amp, args.inverse_steps, args, *flags, seed=seed,
                                                  eval_every=inv_every),
                      estimate=STARTUP + args.inverse_steps * RATES["inverse"])
            if args.finetune_steps:
                steps.run(f"{a}-finetune", amplify_cmd("inverse", data, amp, args.finetune_steps, args, *flags,
                                                       "--predicted-codes", seed=seed, eval_every=inv_every),
                          estimate=STARTUP + args.finetune_steps * RATES["inverse_ft"])
            if "bc" in variant_methods(variant):
                # Same actions, same model, same total number of gradient steps as AMPLIFY's inverse model.
                steps.run(f"{b}-inverse", amplify_cmd("inverse", data, bc, args.inverse_steps + args.finetune_steps,
                                                      args, *flags, "--no-codes", seed=seed, eval_every=inv_every),
                          estimate=STARTUP + (args.inverse_steps + args.finetune_steps) * RATES["bc"])
            for method in variant_methods(variant):
                p = policy_name(variant, name, seed, method)
                # episodes end early on success: a guess of 0.6 of the cap on average
                eval_steps = len(eval_tasks) * args.eval_episodes * 0.6 * (args.max_steps or 500)
                steps.run(f"{p}-eval", [
                    "eval_libero.py", "--policy", out / "policies" / p, "--suite", "metaworld",
                    "--tasks", ",".join(eval_tasks), "--episodes", args.eval_episodes, "--seed", seed,
                    "--workers", args.workers, "--out", out / "eval" / p,
                    *(["--max-steps", args.max_steps] if args.max_steps else [])],
                    estimate=STARTUP + eval_steps * RATES[f"eval_{method}"] / min(2, args.workers))


def run_protocol(args):
    out = Path(args.out)
    if not args.plan:
        out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, plan=args.plan)
    exact = None
    for variant in variants(args):  # "sim" first: its data are the exact tracks every variant is scored on
        data = data_steps(steps, args, variant)
        exact = exact or data
        motion = motion_steps(steps, args, data, variant, truth=exact)
        policy_steps(steps, args, data, motion, variant)
    steps.run("tracker-bench", ["preprocess.py", "bench-tracker", "--truth", "metaworld", "--tracker", "lk,flow",
                                "--tasks", ",".join(args.tasks), "--episodes", 1, "--size", args.img_size],
              estimate=STARTUP + len(args.tasks) * 80 * RATES["frame"] * 2)
    if not args.plan:
        plot_curves(out)
    return steps


# -----------------------------------------------------------------------------
# Statistics


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a success rate k/n (sensible also at 0/n and n/n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(pairs, draws=10000, seed=0):
    """95% interval of mean(a) - mean(b) over paired outcomes {stratum: [(a, b), ...]}.

    Pairs are resampled with replacement within each stratum (seed x task: the same goal variation
    for both methods), so the interval keeps the pairing and the design's task mix. Percentile
    interval of `draws` resamples, fixed seed. Returns (difference, low, high)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    strata = [np.asarray(v, dtype=float) for v in pairs.values() if len(v)]
    n = sum(len(s) for s in strata)
    diff = sum((s[:, 0] - s[:, 1]).sum() for s in strata) / n
    total = np.zeros(draws)
    for s in strata:
        d = s[:, 0] - s[:, 1]
        total += d[rng.integers(0, len(d), size=(draws, len(d)))].sum(axis=1)
    lo, hi = np.percentile(total / n, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def pct(x):
    return f"{100 * x:+.0f}" if x < 0 or x > 0 else "0"


def rate_cell(k, n):
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.0f}% ({k}/{n}) [{100 * lo:.0f}-{100 * hi:.0f}]"


def fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# -----------------------------------------------------------------------------
# The table


def episodes_of(out, policy, partial=False):
    """{(task, episode): success} of one policy's evaluation; with `partial`, None where it has not
    run or not to the end."""
    path = Path(out) / "eval" / policy / "results.json"
    if partial and not path.exists():
        return None
    r = json.loads(path.read_text())
    if not r.get("complete", True):
        if partial:
            return None
        raise SystemExit(f"experiment.py: error: {out}/eval/{policy}/results.json: expected a complete evaluation, "
                         f"found a partial one")
    return {(e["task"], e["episode"]): bool(e["success"]) for e in r["episodes"]}


def metric_at(records, step, key="action_mse"):
    for r in records:
        if r["step"] == step:
            return r[key]
    return None


def mean_of(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def closed_loop_rows(args, variant, partial=False):
    """Rows of the success table for one track variant, and counts per (setting, method, task or seed).

    partial: a seed whose evaluations have not both run is left out (the row says of how many), and a
    setting with none is marked pending."""
    out = Path(args.out)
    rows, per_task = [], {}
    n_demos = args.demos
    tracks = TRACKS[variant]
    for name, label, _, eval_tasks in variant_settings(args, variant):
        wins = {m: [0, 0] for m in METHODS}
        pairs = {}
        seeds = []
        for seed in args.seeds:
            eps = {m: episodes_of(out, policy_name(variant if m in variant_methods(variant) else "sim", name, seed, m),
                                  partial) for m in METHODS}
            if None in eps.values():
                continue
            seeds.append(seed)
            for (task, ep), success in eps["amplify"].items():
                pairs.setdefault((seed, task), []).append((success, eps["bc"][(task, ep)]))
            for m in METHODS:
                for (task, _), success in eps[m].items():
                    wins[m][0] += success
                    wins[m][1] += 1
                    for key in ((name, m, task), (name, m, f"seed {seed}")):
                        c = per_task.setdefault(key, [0, 0])
                        c[0] += success
                        c[1] += 1
        if not seeds:
            rows.append(f"| {label} | {tracks} | pending | | | | |")
            continue
        diff, lo, hi = paired_bootstrap(pairs)
        if name == "zeroshot":
            actions = f"{n_demos} x {len(args.tasks) - len(eval_tasks)} other tasks"
        else:
            actions = f"{name[len('fewshot'):]} x {len(args.tasks)} tasks"
        of = "" if len(seeds) == len(args.seeds) else f" (seeds {', '.join(map(str, seeds))} of {len(args.seeds)})"
        rows.append(f"| {label} | {tracks} | {actions} | {len(eval_tasks)} x {args.eval_episodes} x "
                    f"{len(seeds)}{of} | {rate_cell(*wins['amplify'])} | {rate_cell(*wins['bc'])} | "
                    f"{pct(diff)} [{pct(lo)}, {pct(hi)}] |")
    return rows, per_task


def make_table(args, steps, partial=False):
    """The results table (markdown). partial: from whatever has finished, the rest marked pending."""
    out = Path(args.out)
    seeds = ",".join(str(s) for s in args.seeds)
    lines = [f"AMPLIFY vs BC on Meta-World ({', '.join(args.tasks)}), {args.img_size}x{args.img_size} px. Motion "
             f"prior (tokenizer + forward model): {args.videos} action-free videos + the demos' videos per task. "
             f"Inverse model / BC: {args.demos} action demos per task at most (one more per task held out). "
             f"Policy seeds {seeds}; {args.eval_episodes} closed-loop episodes per task and seed on held-out goal "
             f"variations, at most {args.max_steps or 500} steps each.", "",
             "| setting | tracks | action demos | episodes (tasks x ep x seeds) | AMPLIFY | inverse only (BC) "
             "| AMPLIFY - BC (points) [95%] |", "|---|---|---|---|---|---|---|"]
    per_task = {}
    for variant in variants(args):
        rows, counts = closed_loop_rows(args, variant, partial)
        lines += rows
        per_task[variant] = counts
    lines += ["", "Success (successes/episodes) [95% Wilson interval], pooled over tasks and seeds. The difference's "
                  "interval: paired bootstrap (10000 resamples of episode pairs within seed x task; both methods "
                  "meet the same goal variations). Per task (pooled over seeds) and per seed (pooled over tasks), "
                  "exact tracks:", ""]
    columns = args.tasks + [f"seed {s}" for s in args.seeds]
    lines += ["| setting | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, label, _, _ in settings(args):
        for m, m_label in METHODS.items():
            cells = [per_task["sim"].get((name, m, c)) for c in columns]
            lines.append(f"| {label} | {m_label} | " + " | ".join(
                "-" if c is None else f"{c[0]}/{c[1]} [{100 * wilson(*c)[0]:.0f}-{100 * wilson(*c)[1]:.0f}]"
                for c in cells) + " |")

    # the links, so a reader sees which one fails
    lines += ["", f"The links (held-out episodes: the last demo of each task). Inverse model, held-out action MSE "
                  f"(data units, over the chunk), mean over seeds; AMPLIFY with codes of the TRUE tracks (oracle) "
                  f"vs BC after the same {args.inverse_steps} steps, then AMPLIFY fine-tuned on PREDICTED codes vs BC "
                  f"after the same {args.inverse_steps + args.finetune_steps}:", "",
              "| setting | tracks | AMPLIFY, true codes | BC, same steps | AMPLIFY, predicted codes | BC, same steps |",
              "|---|---|---|---|---|---|"]
    for variant in variants(args):
        for name, label, _, _ in variant_settings(args, variant):
            cols = [[], [], [], []]
            for seed in args.seeds:
                amp = out / "policies" / policy_name(variant, name, seed, "amplify")
                bc = read_jsonl(out / "policies" / policy_name("sim", name, seed, "bc") / "inverse_metrics.jsonl")
                cols[0].append(metric_at(read_jsonl(amp / "inverse_metrics.jsonl"), args.inverse_steps))
                cols[1].append(metric_at(bc, args.inverse_steps))
                if args.finetune_steps:
                    cols[2].append(metric_at(read_jsonl(amp / "inverse_ft_metrics.jsonl"), args.finetune_steps))
                cols[3].append(metric_at(bc, args.inverse_steps + args.finetune_steps))
            tracks = TRACKS[variant]
            lines.append(f"| {label} | {tracks} | " + " | ".join(fmt(mean_of(c), 4) for c in cols) + " |")

    lines += ["", "Motion prior on the held-out windows: endpoint error (px, median) of the points that move > 1 px "
                  "in the window and stay in the image, pooled and per view, against the exact tracks (an "
                  "ablation's motion prior too: it learnt from its tracker's tracks); the published "
                  "per-coordinate metrics beside it:", ""]
    exact = None  # the exact-track run's diagnostics, for the moving-points line below
    for variant in variants(args):
        path = out / ("motion" if variant == "sim" else f"motion-{variant}") / "diagnostics.json"
        if partial and not path.exists():
            lines.append(f"| {TRACKS[variant]} | pending |")
            continue
        d = json.loads(path.read_text())
        views = d["views"]
        if variant == "sim":
            exact = d
            lines += ["| tracks | prediction | moving px | " + " | ".join(f"{v} px" for v in views) +
                      " | MSE | pixel acc | Delta_AUC |", "|---|---|---|" + "---|" * len(views) + "---|---|---|"]
        tracks = TRACKS[variant]
        for key, label in (("tokenizer", "tokenizer reconstruction"), ("forward", "forward model prediction"),
                           ("still", "nothing moves (reference)")):
            m = d[key]
            lines.append(f"| {tracks} | {label} | {fmt(m['moving_px'], 2)} | " +
                         " | ".join(fmt(x, 2) for x in m["moving_px_per_view"]) +
                         f" | {fmt(m['mse'], 4)} | {fmt(m['pixel_acc'])} | {fmt(m['delta_auc'])} |")
    fwd = read_jsonl(out / "motion" / "forward_metrics.jsonl")
    if exact is not None:
        lines += ["", f"Moving points (exact tracks): {100 * exact['moving_frac']:.0f}% of all, {exact['windows']} windows; "
                      f"points that leave the image (left out above, but in MSE etc.): "
                      f"{100 * exact['outside_frac']:.1f}%; forward-model code accuracy on held-out "
                      f"windows: {fmt(fwd[-1].get('code_acc') if fwd else None)}.", ""]
    else:
        lines += [""]
    lines += tracker_rows(steps)
    lines += ["", plateau_line(args, out), "",
              f"Policy steps: inverse {args.inverse_steps} + {args.finetune_steps} fine-tuning on predicted codes "
              f"(BC: {args.inverse_steps + args.finetune_steps}), batch {args.batch_size}; last checkpoints. Curves: "
              f"{out / 'curves'}. Total time of all steps: {steps.seconds() / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def tracker_rows(steps):
    """The tracker link: the last table bench-tracker printed into its log."""
    text = steps.log_text("tracker-bench")
    at = text.rfind("| tracker | view |")
    if at < 0:
        return ["Tracker vs exact tracks: no bench-tracker output found."]
    table = [line for line in text[at:].splitlines() if line.startswith("|")]
    return ["Tracker link: the offline trackers (Lucas-Kanade, dense flow) vs the exact simulator tracks on one episode per task "
            "(`preprocess.py bench-tracker --truth metaworld`):", "", *table]


def plateau_line(args, out):
    parts = []
    for variant in variants(args):
        motion = out / ("motion" if variant == "sim" else f"motion-{variant}")
        for stage in ("tokenizer", "forward"):
            rec = read_jsonl(motion / f"{stage}_metrics.jsonl")
            if not rec:
                continue
            best = min(rec, key=lambda r: r["val_loss"])
            state = "plateau reached" if plateaued(rec, args.plateau) else "STILL IMPROVING at the step cap"
            parts.append(f"{stage}{'' if variant == 'sim' else f' ({TRACKS[variant]} tracks)'} {rec[-1]['step']} steps, held-out loss "
                         f"{rec[-1]['val_loss']:.4f} (best {best['val_loss']:.4f} at {best['step']}), {state}")
    return "Motion training (plateau rule, --plateau " + f"{args.plateau}): " + "; ".join(parts) + "."


# -----------------------------------------------------------------------------
# Curves: every stage's curves picture (amplify.py draws one when a stage ends), gathered in one folder


def plot_curves(out):
    """OUT/curves/<dir>-<label>.png: a copy of every <label>_curves.png under OUT/motion* and OUT/policies."""
    out = Path(out)
    (out / "curves").mkdir(exist_ok=True)
    written = []
    for path in sorted(out.glob("motion*/*_curves.png")) + sorted(out.glob("policies/*/*_curves.png")):
        target = out / "curves" / f"{path.parent.name}-{path.name[:-len('_curves.png')]}.png"
        atomic_copy(path, target)
        written.append(target)
    return written


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="AMPLIFY's few-shot and zero-shot claims on Meta-World in the paper's "
                                            "regime (many videos, few action demos), through preprocess.py, "
                                            "amplify.py and eval_libero.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/experiment", help="everything goes here; run again to resume")
    p.add_argument("--quick", action="store_true", help="small sizes (< 20 min): " +
                   ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--plan", action="store_true",
                   help="list the steps still to run with estimated minutes; run nothing")
    p.add_argument("--table", action="store_true",
                   help="print the table of what has finished in --out, the rest marked pending; run nothing "
                        "(results.md is written by a complete run only)")
    # data
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated Meta-World tasks")
    # drawer-open: its motions (reach a handle, pull it) occur in the other tasks, its actions never.
    p.add_argument("--zero-shot-tasks", default="drawer-open-v3",
                   help="tasks whose actions the zero-shot inverse models never see (comma-separated)")
    p.add_argument("--videos", type=int, default=30, help="action-free videos per task (motion prior only)")
    p.add_argument("--demos", type=int, default=5, help="action demos per task (one more is held out)")
    p.add_argument("--img-size", type=int, default=128, help="rendered image size (paper: 128)")
    p.add_argument("--T", type=int, default=16, help="track window length (paper: 16)")
    p.add_argument("--grid", type=int, default=20, help="tracked grid side (paper: 20)")
    p.add_argument("--ablation-tracker", choices=["flow", "lk"], default=None,
                   help="also the protocol (first few-shot setting) with this offline tracker's tracks instead "
                        "of the exact ones: dense flow or Lucas-Kanade")
    p.add_argument("--lk-ablation", dest="ablation_tracker", action="store_const", const="lk",
                   help="the same as --ablation-tracker lk")
    # motion prior
    p.add_argument("--tokenizer-steps", type=int, default=1000, help="tokenizer steps of the first round")
    p.add_argument("--forward-steps", type=int, default=1000, help="forward-model steps of the first round")
    p.add_argument("--max-motion-steps", type=int, default=4000, help="cap of the plateau rounds (each stage)")
    p.add_argument("--plateau", type=float, default=0.02,
                   help="a stage stops when its later evaluations improve the held-out loss by less than this")
    p.add_argument("--motion-eval-samples", type=int, default=256, help="held-out windows per motion evaluation")
    # policies
    p.add_argument("--shots", default="2,5", help="few-shot settings: action demos per task (comma-separated)")
    p.add_argument("--seeds", default="0,1,2", help="policy seeds (model init, batch order, evaluation episodes)")
    p.add_argument("--inverse-steps", type=int, default=800, help="inverse model on codes of the true tracks")
    p.add_argument("--finetune-steps", type=int, default=400, help="then on forward-predicted codes (0: none)")
    p.add_argument("--inverse-eval-every", type=int, default=200,
                   help="held-out evaluations of the inverse models (must divide both step counts)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="amplify.py --device (auto picks a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the motion prior's training")
    # evaluation
    p.add_argument("--eval-episodes", type=int, default=20, help="closed-loop episodes per task, policy and seed")
    # The experts finish these tasks in 34-122 steps; Meta-World's own limit (500) would spend most
    # of the evaluation time on episodes that have already failed. Same limit for every method.
    p.add_argument("--max-steps", type=int, default=200, help="policy steps per episode (0: Meta-World's own 500)")
    p.add_argument("--workers", type=int, default=2, help="eval_libero.py worker processes")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:  # the quick sizes become the defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    # args error checking
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.zero_shot_tasks = [t.strip() for t in args.zero_shot_tasks.split(",") if t.strip()]
    for name in ("shots", "seeds"):
        try:
            setattr(args, name, [int(k) for k in getattr(args, name).split(",") if k.strip()])
        except ValueError:
            p.error(f"--{name}: expected comma-separated integers, found {getattr(args, name)!r}")
    if len(args.tasks) < 2:
        p.error(f"--tasks: expected at least two tasks (zero-shot trains on some, evaluates on others), "
                f"found {args.tasks}")
    if not args.zero_shot_tasks or not set(args.zero_shot_tasks) < set(args.tasks):
        p.error(f"--zero-shot-tasks: expected some but not all of --tasks {args.tasks}, found {args.zero_shot_tasks}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds: expected distinct integers >= 0, found {args.seeds}")
    if not args.shots or any(k < 1 or k > args.demos for k in args.shots):
        p.error(f"--shots: expected integers from 1 to --demos {args.demos}, found {args.shots}")
    for name in ("videos", "demos", "tokenizer_steps", "forward_steps", "max_motion_steps", "inverse_steps",
                 "batch_size", "eval_episodes", "workers", "inverse_eval_every", "motion_eval_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive number, found {getattr(args, name)}")
    if args.finetune_steps < 0 or args.max_steps < 0:
        p.error(f"--finetune-steps and --max-steps: expected numbers >= 0, found {args.finetune_steps} and "
                f"{args.max_steps}")
    if args.inverse_steps % args.inverse_eval_every or args.finetune_steps % args.inverse_eval_every:
        p.error(f"--inverse-eval-every: expected a divisor of --inverse-steps {args.inverse_steps} and "
                f"--finetune-steps {args.finetune_steps} (the oracle row compares equal steps), found "
                f"{args.inverse_eval_every}")
    if not 0 <= args.plateau < 1:
        p.error(f"--plateau: expected a fraction in [0, 1), found {args.plateau}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        if not (Path(args.out) / "steps.json").exists():
            sys.exit(f"experiment.py: error: --table: expected a run in {args.out} (its steps.json), found none")
        print(make_table(args, Steps(args.out), partial=True), end="")
        return
    if args.plan:
        steps = run_protocol(args)
        total = sum(s for _, s in steps.planned)
        extra = sum(s for name, s in steps.planned if name.endswith("(if still improving)"))
        for name, s in steps.planned:
            print(f"{name:<52} ~{s / 60:5.1f} min")
        print(f"{len(steps.planned)} steps to run, {steps.skipped} done: ~{(total - extra) / 60:.0f} min if the motion "
              f"stages plateau in their first round, ~{total / 60:.0f} min at the step caps (RATES: CPU time measured "
              f"on this machine, as wall time on an otherwise idle 2-core machine)")
        return
    t0 = time.time()
    print(f"experiment: {' '.join(sys.argv)}\nstarted {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    steps = run_protocol(args)
    table = make_table(args, steps)
    import amplify

    amplify.atomic_write(Path(args.out) / "results.md", lambda tmp: Path(tmp).write_text(table))
    print("\n" + table, flush=True)
    print(f"ran {steps.ran} steps, skipped {steps.skipped}; this invocation {(time.time() - t0) / 60:.1f} min; "
          f"table: {Path(args.out) / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
