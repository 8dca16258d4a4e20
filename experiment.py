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
    python experiment.py --setting zeroshot-scale       # zero-shot at scale (below), in runs/zeroshot-scale

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

Zero-shot at scale (`--setting zeroshot-scale`, issue #25; docs/EXPERIMENT.md gives the design). The
paper's zero-shot setting trains the inverse model on many tasks' actions (LIBERO-90) and evaluates
on tasks with video only whose scenes appear in that action data. Here: `--source-tasks` (16 by
default, their experts covering every sign of the gripper command) give the demos that train the
inverse model and both baselines; `--unseen-tasks` (4, each beside a same-scene source task) give
only videos, to the motion prior, and probe episodes (MT1 seed 2, with actions) that nothing trains
on. Policies per seed: AMPLIFY (true codes, then predicted), BC without codes and goal-conditioned
BC (the same inverse model reading the task text: the paper's baselines are goal-conditioned), the
baselines for AMPLIFY's total steps; closed loop on the unseen tasks, paired bootstrap per task and
pooled. Before any closed loop, the dose curve: the inverse model on the first k source tasks
(`--dose 3,8,16`: nested), each with both baselines at equal steps, scored in process per action
dimension (position vs gripper) on the probe episodes with codes of the TRUE tracks: does the
inverse model follow motions of tasks it has no actions of, and do more tasks help? Steps run side
by side (`--jobs`, default 2: each subprocess keeps one core) as their inputs become ready: the
baselines need no motion prior and train beside it.

Notable features
  - Resumable: a finished step is recorded in OUT/steps.json with its exact command and skipped
    next time; an interrupted training stage continues from its checkpoint (`--resume`). Other
    settings in the same OUT are refused instead of mixing results.
  - Fixed seeds everywhere; every subprocess runs with one torch/OpenMP thread (on a busy 2-core
    machine more threads are slower).
  - OUT/results.md holds the printed table; its last line counts the time of every step.
"""

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
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
# CPU seconds (user + sys) per unit, measured with `time` (128 px, 2 views, grid 20, cpu preset,
# batch 8, one thread): a training step of each stage ("bc": either baseline), a rendered frame of
# `preprocess.py metaworld --tracker sim`, a closed-loop policy step (simulation, two renders, the
# policy), one held-out evaluation of a motion stage (256 windows), one window scored by one inverse
# model in process (score_inverse). RATES: a 2-core machine without native bf16 (2026-11-30; its
# "score" is RATES_BF16's scaled by the inverse step's ratio, not measured). RATES_BF16: a 2-core
# AMD EPYC with AVX-512 BF16, where amplify.py trains in bf16 (2026-12-07, under a load average of
# 2.5-4 from other jobs: upper bounds). `--plan` adds them up as wall time on an otherwise idle 2-core
# machine: one core per training step, `--workers 2` evaluations on both. On a shared machine
# multiply by the load's share.
RATES = {"frame": 0.045, "tokenizer": 0.64, "forward": 0.13, "inverse": 0.07, "inverse_ft": 0.12, "bc": 0.07,
         "eval_amplify": 0.04, "eval_bc": 0.018, "motion_eval": 15.0, "score": 0.015}
RATES_BF16 = {"frame": 0.045, "tokenizer": 0.27, "forward": 0.05, "inverse": 0.045, "inverse_ft": 0.072, "bc": 0.05,
              "eval_amplify": 0.03, "eval_bc": 0.022, "motion_eval": 15.0, "score": 0.01}
STARTUP = 5.0  # seconds to start a subprocess (torch, the simulator) and load the data


@functools.lru_cache(maxsize=None)
def rates():
    """The measured rates of the kind of CPU the plan runs on (amplify.py trains in bf16 where it can)."""
    import amplify

    return RATES_BF16 if amplify.cpu_has_bf16() else RATES


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
        self.lock = threading.Lock()  # run_jobs runs steps from several threads: one writer of steps.json

    def _skip(self, name, cmd):
        if name not in self.done:
            return False
        if self.done[name]["cmd"] != cmd:
            sys.exit(f"experiment.py: error: step '{name}' in {self.path.parent} finished with other settings "
                     f"(expected command {' '.join(cmd)}, found {' '.join(self.done[name]['cmd'])}); use a new --out")
        if not self.plan:
            print(f"skip  {name:<30} (done in {self.done[name]['seconds'] / 60:.1f} min)", flush=True)
        with self.lock:
            self.skipped += 1
        return True

    def _finish(self, name, cmd, seconds):
        import amplify  # lazily: the protocol itself only runs command lines

        with self.lock:
            self.done[name] = {"cmd": cmd, "seconds": seconds}
            text = json.dumps(self.done, indent=1)
            amplify.atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
            self.ran += 1
        print(f"done  {name:<30} {seconds / 60:.1f} min", flush=True)

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
              estimate=STARTUP + n * args.videos * 80 * rates()["frame"])
    steps.call(f"data{tag}-videos", ["strip_actions", d / "videos-raw", d / "videos"],
               lambda: strip_actions(d / "videos-raw", d / "videos"))
    steps.run(f"data{tag}-demos", ["preprocess.py", "metaworld", tasks, "--episodes", args.demos + 1, "--seed", 1,
                                   *common, "--out", d / "demos"],
              estimate=STARTUP + n * (args.demos + 1) * 80 * rates()["frame"])
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


def motion_stage(steps, args, data, out, stage, tag=""):
    """One motion stage (tokenizer or forward model) in rounds until its held-out loss plateaus."""
    first = args.tokenizer_steps if stage == "tokenizer" else args.forward_steps
    cap = args.max_forward_steps if stage == "forward" and args.max_forward_steps else args.max_motion_steps
    total, before, r = first, 0, 1
    every = max(1, first // 5)  # five evaluations per round of the first size, more later
    while True:
        name = f"{stage}{tag}" if r == 1 else f"{stage}{tag}-round{r}"
        if steps.plan and r > 1:
            name += " (if still improving)"
        steps.run(name, amplify_cmd(stage, data, out, total, args, eval_every=every,
                                    eval_samples=args.motion_eval_samples),
                  estimate=STARTUP + (total - before) * rates()[stage]
                  + (total - before) // every * rates()["motion_eval"])
        if total >= cap:
            break
        if not steps.plan and plateaued(read_jsonl(out / f"{stage}_metrics.jsonl"), args.plateau):
            break
        before, total, r = total, min(2 * total, cap), r + 1


def motion_steps(steps, args, data, variant, truth=None):
    """Tokenizer then forward model on all videos, each in rounds until its held-out loss plateaus;
    then their links, scored on the held-out windows of `truth` (default `data`): the exact tracks."""
    out = Path(args.out) / ("motion" if variant == "sim" else f"motion-{variant}")
    tag = "" if variant == "sim" else f"-{variant}"
    for stage in ("tokenizer", "forward"):
        motion_stage(steps, args, data, out, stage, tag)
    truth = truth or data
    steps.call(f"diagnostics{tag}", ["motion_diagnostics", *truth, out, args.motion_eval_samples],
               lambda: write_motion_diagnostics(truth, out, args.motion_eval_samples), estimate=rates()["motion_eval"])
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
                      estimate=STARTUP + args.inverse_steps * rates()["inverse"])
            if args.finetune_steps:
                steps.run(f"{a}-finetune", amplify_cmd("inverse", data, amp, args.finetune_steps, args, *flags,
                                                       "--predicted-codes", seed=seed, eval_every=inv_every),
                          estimate=STARTUP + args.finetune_steps * rates()["inverse_ft"])
            if "bc" in variant_methods(variant):
                # Same actions, same model, same total number of gradient steps as AMPLIFY's inverse model.
                steps.run(f"{b}-inverse", amplify_cmd("inverse", data, bc, args.inverse_steps + args.finetune_steps,
                                                      args, *flags, "--no-codes", seed=seed, eval_every=inv_every),
                          estimate=STARTUP + (args.inverse_steps + args.finetune_steps) * rates()["bc"])
            for method in variant_methods(variant):
                p = policy_name(variant, name, seed, method)
                # episodes end early on success: a guess of 0.6 of the cap on average
                eval_steps = len(eval_tasks) * args.eval_episodes * 0.6 * (args.max_steps or 500)
                steps.run(f"{p}-eval", [
                    "eval_libero.py", "--policy", out / "policies" / p, "--suite", "metaworld",
                    "--tasks", ",".join(eval_tasks), "--episodes", args.eval_episodes, "--seed", seed,
                    "--workers", args.workers, "--out", out / "eval" / p,
                    *(["--max-steps", args.max_steps] if args.max_steps else [])],
                    estimate=STARTUP + eval_steps * rates()[f"eval_{method}"] / min(2, args.workers))


def run_protocol(args, steps=None):
    out = Path(args.out)
    if not args.plan:
        out.mkdir(parents=True, exist_ok=True)
    steps = steps or Steps(out, plan=args.plan)
    exact = None
    for variant in variants(args):  # "sim" first: its data are the exact tracks every variant is scored on
        data = data_steps(steps, args, variant)
        exact = exact or data
        motion = motion_steps(steps, args, data, variant, truth=exact)
        policy_steps(steps, args, data, motion, variant)
    steps.run("tracker-bench", ["preprocess.py", "bench-tracker", "--truth", "metaworld", "--tracker", "lk,flow",
                                "--tasks", ",".join(args.tasks), "--episodes", 1, "--size", args.img_size],
              estimate=STARTUP + len(args.tasks) * 80 * rates()["frame"] * 2)
    if not args.plan:
        plot_curves(out)
    return steps


# -----------------------------------------------------------------------------
# Jobs: chains of steps that run side by side (the zero-shot-at-scale setting)


class Job:
    """A chain of steps, `fn(steps)`, that may start once the jobs named in `deps` have finished and
    keeps `cores` cores busy while it runs (an evaluation with --workers 2: two)."""

    def __init__(self, name, fn, deps=(), cores=1):
        self.name, self.fn, self.deps, self.cores = name, fn, tuple(deps), cores


def run_jobs(steps, jobs, cores):
    """Run `jobs`, listed in priority order, with at most `cores` cores busy; a job starts once its
    deps have finished. Every subprocess keeps one thread, so on an idle 2-core machine two training
    steps side by side take the time of one. After a failure no new job starts; those running
    finish (their steps are recorded for the next invocation), then the first error is raised.

    Plan mode runs nothing: every job's steps are listed in order, and the return value is
    {job name: [(step, estimated seconds), ...]} for `schedule`."""
    names = [j.name for j in jobs]
    missing = {d for j in jobs for d in j.deps} - set(names)
    twice = {n for n in names if names.count(n) > 1}
    if missing or twice:
        raise ValueError(f"run_jobs: expected distinct job names and deps among them, found deps missing "
                         f"{sorted(missing)} and names twice {sorted(twice)}")
    if steps.plan:
        planned = {}
        for j in jobs:
            n = len(steps.planned)
            j.fn(steps)
            planned[j.name] = steps.planned[n:]
        return planned
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending, running, done, error = list(jobs), {}, set(), None
    with ThreadPoolExecutor(max_workers=len(jobs) or 1) as pool:
        while running or (pending and error is None):
            busy = sum(min(j.cores, cores) for j in running.values())
            for j in list(pending) if error is None else []:
                need = min(j.cores, cores)
                if all(d in done for d in j.deps) and busy + need <= cores:
                    running[pool.submit(j.fn, steps)] = j
                    pending.remove(j)
                    busy += need
            if not running:  # deps are checked above, so only a cycle gets here
                raise ValueError(f"run_jobs: jobs {[j.name for j in pending]} wait on each other")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                try:
                    f.result()
                    done.add(j.name)
                except BaseException as e:  # SystemExit from a failed step included
                    error = error or e
    if error is not None:
        raise error


def schedule(jobs, seconds, cores):
    """Wall time of run_jobs' schedule if job j takes seconds[j.name]: the plan's estimate of a run."""
    t, running, done, pending = 0.0, [], set(), list(jobs)
    while pending or running:
        busy = sum(min(j.cores, cores) for _, j in running)
        for j in list(pending):
            need = min(j.cores, cores)
            if all(d in done for d in j.deps) and busy + need <= cores:
                running.append((t + seconds[j.name], j))
                pending.remove(j)
                busy += need
        end, j = min(running, key=lambda r: r[0])
        running.remove((end, j))
        t = end
        done.add(j.name)
    return t


# -----------------------------------------------------------------------------
# Zero-shot at scale (issue #25): many source tasks' actions, unseen tasks' videos only
#
# The paper's zero-shot setting trains the inverse model on the actions of 90 tasks and evaluates on
# tasks with video only, whose scenes appear in the action data. Here: the actions of the source
# tasks (demos, MT1 seed 1) train the inverse model and both baselines; every task's action-free
# videos (MT1 seed 0), the unseen tasks' included, train the motion prior; the unseen tasks' probe
# episodes (MT1 seed 2, with actions) are scored and never trained on. docs/EXPERIMENT.md, "Zero-shot
# at scale: design", gives the facts behind the task lists.

# Source tasks in dose order: a dose of k trains on the first k (nested subsets). The first 3 are the
# few-shot protocol's other tasks (today's zero-shot regime: no unseen task's scene, no expert that
# opens the gripper); 4-8 add the four unseen tasks' same-scene siblings and handle-press (gripper
# -1); 9-16 add tasks of every gripper pattern (-1; 0; 0 then +; -1 then +; +1).
SCALE_SOURCES = ("reach-v3,button-press-topdown-v3,door-open-v3,drawer-close-v3,window-open-v3,faucet-open-v3,"
                 "coffee-pull-v3,handle-press-v3,plate-slide-v3,door-lock-v3,button-press-v3,push-v3,pick-place-v3,"
                 "lever-pull-v3,sweep-v3,hammer-v3")
# Each beside a source sibling in its scene: drawer-close, window-open, faucet-open, coffee-pull.
SCALE_UNSEEN = "drawer-open-v3,window-close-v3,faucet-close-v3,coffee-push-v3"
# Meta-World v3 tasks that share a scene, i.e. a MuJoCo model file (metaworld 3.1.1, `env.model_name`);
# every other task has a scene of its own.
SCENES = (("drawer-open-v3", "drawer-close-v3"), ("window-open-v3", "window-close-v3"),
          ("faucet-open-v3", "faucet-close-v3"), ("door-open-v3", "door-close-v3"),
          ("door-lock-v3", "door-unlock-v3"), ("coffee-button-v3", "coffee-pull-v3", "coffee-push-v3"),
          ("handle-press-v3", "handle-pull-v3"), ("handle-press-side-v3", "handle-pull-side-v3"),
          ("plate-slide-v3", "plate-slide-back-v3"), ("plate-slide-side-v3", "plate-slide-back-side-v3"),
          ("assembly-v3", "disassemble-v3"), ("stick-pull-v3", "stick-push-v3"), ("hand-insert-v3", "sweep-into-v3"))
PROBE_SEED = 2  # MT1 seed of the unseen tasks' scored episodes: neither the videos' (0) nor the demos' (1)
SCORE_WINDOWS = 256  # windows scored per unseen task (evenly spaced), and pooled over the source tasks
# The setting's defaults (explicit flags still win), and its `--quick` sizes.
SCALE = {"out": "runs/zeroshot-scale", "source_tasks": SCALE_SOURCES, "unseen_tasks": SCALE_UNSEEN,
         "dose": "3,8,16", "videos": 10, "demos": 5, "probe_episodes": 5, "seeds": "0,1,2", "jobs": 2,
         "tokenizer_steps": 1000, "forward_steps": 2000, "max_motion_steps": 2000, "max_forward_steps": 8000,
         "inverse_steps": 1600, "finetune_steps": 800, "inverse_eval_every": 400}
SCALE_QUICK = {"out": "runs/zeroshot-scale-quick", "videos": 2, "demos": 1, "probe_episodes": 1, "seeds": "0",
               "tokenizer_steps": 150, "forward_steps": 150, "max_motion_steps": 150, "max_forward_steps": 150,
               "inverse_steps": 100, "finetune_steps": 50, "inverse_eval_every": 50, "eval_episodes": 2,
               "max_steps": 120, "motion_eval_samples": 64}
# Policies of the setting: AMPLIFY (inverse model on true codes, then fine-tuned on predicted ones),
# the two baselines trained as long as AMPLIFY in all (closed loop), and the same baselines trained as
# long as AMPLIFY's true-code stage (the dose curve's equal steps, suffix -eq).
SCALE_METHODS = {"amplify": "AMPLIFY", "bc": "BC (no codes)", "gcbc": "goal-conditioned BC"}
BASELINE_FLAGS = {"bc": ["--no-codes"], "gcbc": ["--no-codes", "--goal-conditioned"]}


def scene_siblings(task, others):
    """The tasks among `others` that share `task`'s scene (SCENES)."""
    group = next((g for g in SCENES if task in g), (task,))
    return [t for t in others if t in group and t != task]


def scale_name(dose, seed, method):
    return f"d{dose}-s{seed}-{method}"


def scale_jobs(args):
    """Every job of the setting, in priority order (the longest chain, through the motion prior to
    AMPLIFY's evaluations, first; the baselines fill the other core meanwhile)."""
    out = Path(args.out)
    d, motion, policies = out / "data", out / "motion", out / "policies"
    data, probe = [d / "videos", d / "demos"], d / "probe"
    common = ["--img-size", args.img_size, "--T", args.T, "--grid", args.grid, "--tracker", "sim", "--no-progress"]
    tasks = args.source_tasks + args.unseen_tasks
    K, N, F = args.dose[-1], args.inverse_steps, args.finetune_steps
    every = args.inverse_eval_every
    episode = 80 * rates()["frame"]  # rendered seconds of an episode (the experts need 33-88 steps, median)
    eval_cores = min(args.workers, args.jobs)

    def videos(steps):
        steps.run("data-videos-raw", ["preprocess.py", "metaworld", ",".join(tasks), "--episodes", args.videos,
                                      "--seed", 0, *common, "--out", d / "videos-raw"],
                  estimate=STARTUP + len(tasks) * args.videos * episode)
        steps.call("data-videos", ["strip_actions", d / "videos-raw", d / "videos"],
                   lambda: strip_actions(d / "videos-raw", d / "videos"))

    def demos(steps):
        steps.run("data-demos", ["preprocess.py", "metaworld", ",".join(args.source_tasks), "--episodes",
                                 args.demos + 1, "--seed", 1, *common, "--out", d / "demos"],
                  estimate=STARTUP + len(args.source_tasks) * (args.demos + 1) * episode)

    def probes(steps):
        steps.run("data-probe", ["preprocess.py", "metaworld", ",".join(args.unseen_tasks), "--episodes",
                                 args.probe_episodes, "--seed", PROBE_SEED, *common, "--out", probe],
                  estimate=STARTUP + len(args.unseen_tasks) * args.probe_episodes * episode)

    def stage(name):
        return lambda steps: motion_stage(steps, args, data, motion, name)

    def diagnostics(steps):
        steps.call("diagnostics", ["motion_diagnostics", *data, motion, args.motion_eval_samples],
                   lambda: write_motion_diagnostics(data, motion, args.motion_eval_samples),
                   estimate=rates()["motion_eval"])

    def only(dose):
        return [f for t in args.source_tasks[:dose] for f in ("--only-task", task_text(t))]

    def place(steps, dst, stage):
        """Policy.load(DIR) reads every stage from DIR: copy the motion stage there (once it is final)."""
        if not steps.plan and not (dst / f"{stage}.pt").exists():
            dst.mkdir(parents=True, exist_ok=True)
            atomic_copy(motion / f"{stage}.pt", dst / f"{stage}.pt")

    def amplify_inverse(dose, seed):
        def fn(steps):
            p = scale_name(dose, seed, "amplify")
            place(steps, policies / p, "tokenizer")
            steps.run(f"{p}-inverse", amplify_cmd("inverse", data, policies / p, N, args, *only(dose), seed=seed,
                                                  eval_every=every), estimate=STARTUP + N * rates()["inverse"])
        return fn

    def amplify_finetune(seed):
        def fn(steps):
            p = scale_name(K, seed, "amplify")
            place(steps, policies / p, "forward")
            steps.run(f"{p}-finetune", amplify_cmd("inverse", data, policies / p, F, args, *only(K),
                                                   "--predicted-codes", seed=seed, eval_every=every),
                      estimate=STARTUP + F * rates()["inverse_ft"])
        return fn

    def baseline(dose, seed, method, steps_total):
        def fn(steps):
            p = scale_name(dose, seed, method)
            steps.run(f"{p}-inverse", amplify_cmd("inverse", data, policies / p, steps_total, args, *only(dose),
                                                  *BASELINE_FLAGS[method.split("-")[0]], seed=seed,
                                                  eval_every=every),
                      estimate=STARTUP + steps_total * rates()["bc"])
        return fn

    def evaluation(seed, method):
        def fn(steps):
            p = scale_name(K, seed, method)
            # zero-shot episodes mostly run to the step cap: a guess of 0.85 of it on average
            n = len(args.unseen_tasks) * args.eval_episodes * 0.85 * (args.max_steps or 500)
            steps.run(f"{p}-eval", [
                "eval_libero.py", "--policy", policies / p, "--suite", "metaworld", "--tasks",
                ",".join(args.unseen_tasks), "--episodes", args.eval_episodes, "--seed", seed, "--workers",
                args.workers, "--out", out / "eval" / p, *(["--max-steps", args.max_steps] if args.max_steps else [])],
                estimate=STARTUP + n * rates()["eval_amplify" if method == "amplify" else "eval_bc"] / eval_cores)
        return fn

    def scores(dose, seed, closed):
        """Per-dimension held-out action errors: the dose curve's models (AMPLIFY on TRUE codes, the
        baselines after as many steps) or, closed=True, the closed-loop models (AMPLIFY on PREDICTED codes)."""
        if closed:
            name, models = f"d{dose}-s{seed}-closed-loop-models", {
                "amplify": (scale_name(dose, seed, "amplify"), "inverse_ft.pt", "pred"),
                "bc": (scale_name(dose, seed, "bc"), "inverse.pt", None),
                "gcbc": (scale_name(dose, seed, "gcbc"), "inverse.pt", None)}
        else:
            name, models = f"d{dose}-s{seed}-oracle", {
                "amplify": (scale_name(dose, seed, "amplify"), "inverse.pt", "true"),
                "bc": (scale_name(dose, seed, "bc-eq"), "inverse.pt", None),
                "gcbc": (scale_name(dose, seed, "gcbc-eq"), "inverse.pt", None)}
        path = out / "scores" / f"{name}.json"
        models = {m: (str(policies / p), f, c) for m, (p, f, c) in models.items()}

        def fn(steps):
            windows = SCORE_WINDOWS * (len(args.unseen_tasks) + 2)
            steps.call(name, ["score_inverse", *data, probe, json.dumps(models, sort_keys=True),
                              ",".join(args.source_tasks[:dose]), ",".join(args.unseen_tasks), SCORE_WINDOWS],
                       lambda: write_scores(path, data, probe, models, args.source_tasks[:dose], args.unseen_tasks),
                       estimate=3 * windows * rates()["score"])
        return fn

    jobs = [Job("data-videos", videos), Job("data-demos", demos), Job("data-probe", probes),
            Job("tokenizer", stage("tokenizer"), ["data-videos", "data-demos"]),
            Job("forward", stage("forward"), ["tokenizer"])]
    for s in args.seeds:  # the critical path: AMPLIFY at the full dose, fine-tuned, evaluated
        a = scale_name(K, s, "amplify")
        jobs += [Job(f"{a}-inverse", amplify_inverse(K, s), ["tokenizer"]),
                 Job(f"{a}-finetune", amplify_finetune(s), [f"{a}-inverse", "forward"]),
                 Job(f"{a}-eval", evaluation(s, "amplify"), [f"{a}-finetune"], cores=eval_cores)]
    for s in args.seeds:  # the closed-loop baselines need no motion prior: they run beside it
        for m in ("bc", "gcbc"):
            p = scale_name(K, s, m)
            jobs += [Job(f"{p}-inverse", baseline(K, s, m, N + F), ["data-videos", "data-demos"]),
                     Job(f"{p}-eval", evaluation(s, m), [f"{p}-inverse"], cores=eval_cores)]
    for dose in reversed(args.dose):  # the dose curve
        for s in args.seeds:
            a = scale_name(dose, s, "amplify")
            if dose != K:
                jobs.append(Job(f"{a}-inverse", amplify_inverse(dose, s), ["tokenizer"]))
            eq = [scale_name(dose, s, m) for m in ("bc-eq", "gcbc-eq")]
            jobs += [Job(f"{p}-inverse", baseline(dose, s, m, N), ["data-videos", "data-demos"])
                     for p, m in zip(eq, ("bc-eq", "gcbc-eq"))]
            jobs.append(Job(f"d{dose}-s{s}-oracle", scores(dose, s, False),
                            [f"{a}-inverse", *(f"{p}-inverse" for p in eq), "data-probe"]))
    for s in args.seeds:
        a, b, g = (scale_name(K, s, m) for m in ("amplify", "bc", "gcbc"))
        jobs.append(Job(f"d{K}-s{s}-closed-loop-models", scores(K, s, True),
                        [f"{a}-finetune", f"{b}-inverse", f"{g}-inverse", "data-probe"]))
    jobs.append(Job("diagnostics", diagnostics, ["forward"]))
    return jobs


def run_scale(args, steps=None):
    """The zero-shot-at-scale protocol; returns (steps, jobs, planned) (planned: --plan only)."""
    out = Path(args.out)
    if not args.plan:
        out.mkdir(parents=True, exist_ok=True)
    steps = steps or Steps(out, plan=args.plan)
    jobs = scale_jobs(args)
    if not args.plan:  # a finished step with other settings stops the run before any job starts
        run_jobs(Steps(out, plan=True), jobs, args.jobs)
    planned = run_jobs(steps, jobs, args.jobs)
    if not args.plan:
        plot_curves(out)
    return steps, jobs, planned


def inverse_errors(corpus, frames, ckpt, inverse, codes_from, batch=32):
    """Squared error per action dimension, summed over the valid steps of each window's chunk, and the
    number of valid steps: (sum (A,), count). Data units, as the policy acts. codes_from: None, or
    (model, "true" | "pred") that makes the codes (tokenizer of the true tracks, forward model)."""
    import numpy as np
    import torch

    import amplify

    act, prop = amplify.normalizers(ckpt["stats"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            f = frames[i:i + batch]
            actions, valid = corpus.action_chunks(f, inverse.cfg.T)  # (B, T, A), (B, T)
            images = torch.as_tensor(corpus.gather("images", f))
            tasks = corpus.tasks_of(f)
            codes = None
            if codes_from is not None:
                model, kind = codes_from
                codes = (model.encode(torch.as_tensor(amplify.tracks_batch(corpus, f)))[1] if kind == "true"
                         else model.generate(images, tasks))
            proprio = torch.as_tensor(prop(corpus.gather("proprio", f)).astype(np.float32))
            g = torch.Generator().manual_seed(0)  # sampled heads (diffusion, flow): the same noise everywhere
            chunk = act.inverse(inverse(images, proprio, codes, generator=g, tasks=tasks).float().numpy())
            err = (chunk - actions) ** 2  # (B, T, A)
            total = total + err[valid].sum(axis=0)
            count += int(valid.sum())
    return total, count


def score_inverse(data, probe, models, sources, unseen, samples=SCORE_WINDOWS):
    """Held-out action MSE per action dimension of inverse models, in data units, on two sets of windows:
    the unseen tasks' probe episodes (per task; no model trained on their actions) and the held-out
    demo (the last) of every source task in `sources` (pooled: the trained tasks' reference).

    models: {label: (policy dir, inverse checkpoint file, codes)}, codes "true" (the dir's tokenizer
    on the true tracks), "pred" (the dir's forward model) or None. Also the gripper command (the last
    action dimension) in the sources' training actions: the share of steps < -0.05, near 0, > 0.05."""
    import torch

    import amplify

    torch.set_num_threads(1)  # beside training subprocesses on a 2-core machine
    corpus, probes = amplify.load_corpus([str(p) for p in data]), amplify.load_corpus([str(probe)])
    texts = {task_text(t): t for t in sources}
    train, val = amplify.split_episodes(corpus, 1)
    held = [e for e in val if corpus.has_actions[e] and corpus.tasks[e] in texts]
    sets = {"source": (corpus, amplify.eval_frames(corpus, held, 2 * samples))}
    for t in unseen:
        eps = [e for e in range(probes.num_episodes) if probes.tasks[e] == task_text(t)]
        if not eps:
            raise SystemExit(f"experiment.py: error: {probe}: expected probe episodes of {t}, found none")
        sets[t] = (probes, amplify.eval_frames(probes, eps, samples))
    out = {"windows": {k: len(f) for k, (_, f) in sets.items()}, "models": {}}
    for label, (path, file, codes) in models.items():
        ckpt = amplify.load_checkpoint(str(Path(path) / file), "inverse")
        inverse = amplify.model_from_checkpoint(ckpt)
        codes_from = None
        if codes is not None:
            stage = "tokenizer" if codes == "true" else "forward"
            codes_from = (amplify.model_from_checkpoint(amplify.load_checkpoint(str(Path(path) / f"{stage}.pt"),
                                                                                  stage)), codes)
        res = {}
        for key, (c, frames) in sets.items():
            amplify.check_data_matches(ckpt, c, path)
            total, count = inverse_errors(c, frames, ckpt, inverse, codes_from)
            res[key] = (total / max(count, 1)).tolist()
        out["models"][label] = res
    rows = corpus.frames([e for e in train if corpus.has_actions[e] and corpus.tasks[e] in texts])
    grip = corpus.gather("actions", rows)[:, -1]
    out["gripper_command"] = {"negative": float((grip < -0.05).mean()), "zero": float((abs(grip) <= 0.05).mean()),
                              "positive": float((grip > 0.05).mean())}
    out["sources"], out["unseen"] = list(sources), list(unseen)
    return out


def write_scores(path, data, probe, models, sources, unseen):
    import amplify

    r = score_inverse(data, probe, models, sources, unseen)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    amplify.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(r, indent=1)))


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
        if variant == "sim":
            exact = d
        lines += diagnostics_rows(d, TRACKS[variant], header=variant == "sim")
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


def diagnostics_rows(d, tracks, header=False):
    """Rows of the motion-prior table from one diagnostics.json (motion_diagnostics)."""
    views = d["views"]
    lines = (["| tracks | prediction | moving px | " + " | ".join(f"{v} px" for v in views) +
              " | MSE | pixel acc | Delta_AUC |", "|---|---|---|" + "---|" * len(views) + "---|---|---|"]
             if header else [])
    for key, label in (("tokenizer", "tokenizer reconstruction"), ("forward", "forward model prediction"),
                       ("still", "nothing moves (reference)")):
        m = d[key]
        lines.append(f"| {tracks} | {label} | {fmt(m['moving_px'], 2)} | " +
                     " | ".join(fmt(x, 2) for x in m["moving_px_per_view"]) +
                     f" | {fmt(m['mse'], 4)} | {fmt(m['pixel_acc'])} | {fmt(m['delta_auc'])} |")
    return lines


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
# The zero-shot-at-scale table


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def position_gripper(errors):
    """Per-dimension MSE -> (position: mean of all but the last dimension, gripper: the last one);
    Meta-World actions are (dx, dy, dz, gripper)."""
    return sum(errors[:-1]) / max(len(errors) - 1, 1), errors[-1]


def mean_scores(runs, model, keys):
    """(position, gripper, all dimensions) of `model` averaged over tasks `keys`, then over the seeds' runs."""
    per_run = []
    for r in runs:
        errs = [r["models"][model][k] for k in keys]
        dims = [sum(e[i] for e in errs) / len(errs) for i in range(len(errs[0]))]
        per_run.append((*position_gripper(dims), sum(dims) / len(dims)))
    return tuple(sum(x[i] for x in per_run) / len(per_run) for i in range(3))


def scale_closed_loop_rows(args, partial):
    """Closed-loop rows (per unseen task, then pooled) and the per-seed line."""
    out, K = Path(args.out), args.dose[-1]
    seeds, eps = [], {}
    for s in args.seeds:
        e = {m: episodes_of(out, scale_name(K, s, m), partial) for m in SCALE_METHODS}
        if None not in e.values():
            seeds.append(s)
            eps[s] = e
    if not seeds:
        return ["| all unseen tasks | | pending | | | | |"], "Per seed: pending."
    rows = []
    for task in args.unseen_tasks + ["all"]:
        wins = {m: [0, 0] for m in SCALE_METHODS}
        pairs = {"bc": {}, "gcbc": {}}
        for s in seeds:
            for (t, ep), success in eps[s]["amplify"].items():
                if task != "all" and t != task:
                    continue
                for m in pairs:
                    pairs[m].setdefault((s, t), []).append((success, eps[s][m][(t, ep)]))
                for m in SCALE_METHODS:
                    wins[m][0] += eps[s][m][(t, ep)]
                    wins[m][1] += 1
        diffs = []
        for m in ("bc", "gcbc"):
            d, lo, hi = paired_bootstrap(pairs[m])
            diffs.append(f"{pct(d)} [{pct(lo)}, {pct(hi)}]")
        label = "all unseen tasks" if task == "all" else task
        sibling = "" if task == "all" else ", ".join(scene_siblings(task, args.source_tasks)) or "none"
        rows.append(f"| {label} | {sibling} | " + " | ".join(rate_cell(*wins[m]) for m in SCALE_METHODS) +
                    " | " + " | ".join(diffs) + " |")
    of = "" if len(seeds) == len(args.seeds) else f" (seeds {', '.join(map(str, seeds))} of {len(args.seeds)})"
    per_seed = [f"seed {s}: " + "/".join(str(sum(eps[s][m].values())) for m in SCALE_METHODS) for s in seeds]
    n = len(args.unseen_tasks) * args.eval_episodes
    return rows, (f"Per seed{of}, successes of {n} (AMPLIFY/BC/goal-conditioned BC): " + "; ".join(per_seed) + ".")


def scale_table(args, steps, partial=False):
    """The zero-shot-at-scale results (markdown). partial: what has finished, the rest marked pending."""
    out, K = Path(args.out), args.dose[-1]
    N, F = args.inverse_steps, args.finetune_steps
    sib = {t: scene_siblings(t, args.source_tasks) for t in args.unseen_tasks}
    lines = [f"Zero-shot at scale on Meta-World, {args.img_size}x{args.img_size} px, exact tracks. Actions: "
             f"{args.demos} demos of each of {len(args.source_tasks)} source tasks (one more held out); unseen "
             f"tasks {', '.join(args.unseen_tasks)}: no model trains on their actions. Motion prior: "
             f"{args.videos} action-free videos of every task (unseen ones included) + the source demos' videos. "
             f"Policy seeds {','.join(map(str, args.seeds))}; {args.eval_episodes} closed-loop episodes per unseen "
             f"task and seed (held-out goal variations), at most {args.max_steps or 500} steps each. AMPLIFY: "
             f"inverse model on true codes ({N} steps), fine-tuned on forward-predicted codes ({F}); both "
             f"baselines the same inverse model without codes for {N + F} steps, the goal-conditioned one also "
             f"reading the task text.", "",
             "| unseen task | same-scene source | AMPLIFY | BC (no codes) | goal-conditioned BC | AMPLIFY - BC "
             "(points) [95%] | AMPLIFY - goal-conditioned BC [95%] |", "|---|---|---|---|---|---|---|"]
    rows, per_seed = scale_closed_loop_rows(args, partial)
    lines += rows + ["", "Success (successes/episodes) [95% Wilson interval], pooled over seeds (and tasks in the "
                         "last row). Differences: paired bootstrap (10000 resamples of episode pairs within seed x "
                         "task). " + per_seed, ""]

    # the dose curve: does the inverse model follow the motion of tasks it has no actions of?
    probe_n = f"{args.probe_episodes} probe episode{'s' if args.probe_episodes > 1 else ''}"
    lines += [f"Dose curve (the oracle, before any closed loop): held-out action MSE (data units, over the chunk) "
              f"on the unseen tasks ({probe_n} each, MT1 seed {PROBE_SEED}, never trained on; up to "
              f"{SCORE_WINDOWS} windows per task, tasks weighted alike), mean over seeds, with the inverse model "
              f"trained on the first k source tasks. AMPLIFY reads codes of the TRUE tracks; the baselines are "
              f"trained for the same {N} steps. pos = mean over x, y, z; grip = the gripper command. Trained "
              f"tasks: the same models on the held-out demo of each of their source tasks (all dimensions).", "",
              "| source tasks | same-scene sources | gripper command in their actions (<0/0/>0) | AMPLIFY pos | "
              "AMPLIFY grip | BC pos | BC grip | goal-cond. BC pos | goal-cond. BC grip | AMPLIFY/BC pos | "
              "trained tasks: AMPLIFY / BC / goal-cond. BC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    per_task = []
    for dose in args.dose:
        runs = [r for s in args.seeds if (r := read_json(out / "scores" / f"d{dose}-s{s}-oracle.json"))]
        in_dose = [s for s in args.source_tasks[:dose] if any(s in sib[t] for t in args.unseen_tasks)]
        label = f"{dose} (first {dose})" if dose < len(args.source_tasks) else f"{dose} (all)"
        if not runs:
            lines.append(f"| {label} | pending |")
            continue
        g = runs[0]["gripper_command"]
        cells = [mean_scores(runs, m, args.unseen_tasks) for m in SCALE_METHODS]
        trained = [mean_scores(runs, m, ["source"])[2] for m in SCALE_METHODS]
        of = "" if len(runs) == len(args.seeds) else f", {len(runs)} of {len(args.seeds)} seeds"
        lines.append(f"| {label}{of} | {', '.join(in_dose) or 'none'} | {100 * g['negative']:.0f}/"
                     f"{100 * g['zero']:.0f}/{100 * g['positive']:.0f}% | " +
                     " | ".join(f"{fmt(c[0], 4)} | {fmt(c[1], 4)}" for c in cells) +
                     f" | {fmt(cells[0][0] / cells[1][0], 2)} | " + " / ".join(fmt(x, 4) for x in trained) + " |")
        for t in args.unseen_tasks:
            c = [mean_scores(runs, m, [t]) for m in SCALE_METHODS]
            here = "yes" if any(s in args.source_tasks[:dose] for s in sib[t]) else "no"
            per_task.append(f"| {dose} | {t} | {here} | " + " | ".join(f"{fmt(x[0], 4)} | {fmt(x[1], 4)}" for x in c)
                            + " |")
    lines += ["", "Per unseen task (same windows, mean over seeds):", "",
              "| source tasks | unseen task | its same-scene sibling among them | AMPLIFY pos | AMPLIFY grip | "
              "BC pos | BC grip | goal-cond. BC pos | goal-cond. BC grip |", "|---|---|---|---|---|---|---|---|---|",
              *per_task]

    # the closed-loop models, open loop: what the forward model's predictions leave of the oracle's margin
    runs = [r for s in args.seeds if (r := read_json(out / "scores" / f"d{K}-s{s}-closed-loop-models.json"))]
    lines += ["", f"The closed-loop models on the same windows (AMPLIFY on codes PREDICTED by the forward model, "
                  f"after fine-tuning; the baselines after {N + F} steps), mean over seeds:", "",
              "| model | unseen pos | unseen grip | trained tasks (all dimensions) |", "|---|---|---|---|"]
    for m, label in SCALE_METHODS.items():
        if not runs:
            lines.append(f"| {label} | pending | | |")
            continue
        pos, grip, _ = mean_scores(runs, m, args.unseen_tasks)
        lines.append(f"| {label} | {fmt(pos, 4)} | {fmt(grip, 4)} | {fmt(mean_scores(runs, m, ['source'])[2], 4)} |")

    d = read_json(out / "motion" / "diagnostics.json")
    lines += ["", "Motion prior on the held-out windows (the last episode of every task, unseen tasks' videos "
                  "included): endpoint error (px, median) of the points that move > 1 px and stay in the image:", ""]
    if d is None:
        lines.append("| exact | pending |")
    else:
        lines += diagnostics_rows(d, "exact", header=True)
        fwd = read_jsonl(out / "motion" / "forward_metrics.jsonl")
        lines += ["", f"Moving points: {100 * d['moving_frac']:.0f}% of all, {d['windows']} windows; forward-model "
                      f"code accuracy on held-out windows: {fmt(fwd[-1].get('code_acc') if fwd else None)}."]
    walls = read_jsonl(out / "invocations.jsonl")
    lines += ["", plateau_line(args, out), "",
              f"Batch {args.batch_size}; last checkpoints; {args.jobs} jobs side by side. Curves: {out / 'curves'}. "
              f"Time of all steps: {steps.seconds() / 60:.1f} min; wall time of the invocations that ran them: "
              f"{sum(w['minutes'] for w in walls):.1f} min."]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--setting", choices=["fewshot", "zeroshot-scale"], default="fewshot",
                   help="fewshot: few-shot settings on --tasks plus zero-shot on --zero-shot-tasks (the published "
                        "table); zeroshot-scale: the inverse model and baselines on many source tasks' actions, "
                        "evaluated on unseen tasks with video only, and the dose curve (issue #25). Its defaults: " +
                        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCALE.items()))
    p.add_argument("--out", default=None, help="everything goes here; run again to resume (default: runs/experiment; "
                                               "zeroshot-scale: runs/zeroshot-scale)")
    p.add_argument("--quick", action="store_true", help="small sizes (< 20 min): " +
                   ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) +
                   "; zeroshot-scale: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCALE_QUICK.items()))
    p.add_argument("--plan", action="store_true",
                   help="list the steps still to run with estimated minutes; run nothing")
    p.add_argument("--table", action="store_true",
                   help="print the table of what has finished in --out, the rest marked pending; run nothing "
                        "(results.md is written by a complete run only)")
    # data
    p.add_argument("--tasks", default=None,
                   help=f"fewshot: comma-separated Meta-World tasks (default: {DEFAULT_TASKS})")
    # drawer-open: its motions (reach a handle, pull it) occur in the other tasks, its actions never.
    p.add_argument("--zero-shot-tasks", default=None,
                   help="fewshot: tasks whose actions the zero-shot inverse models never see (comma-separated; "
                        "default: drawer-open-v3)")
    p.add_argument("--source-tasks", default=None,
                   help="zeroshot-scale: tasks whose actions train the inverse models, in dose order")
    p.add_argument("--unseen-tasks", default=None,
                   help="zeroshot-scale: tasks with video only, evaluated in closed loop")
    p.add_argument("--dose", default=None,
                   help="zeroshot-scale: numbers k of source tasks (the first k) the dose curve trains on, "
                        "increasing; the last is all of them, and the closed loop runs there")
    p.add_argument("--videos", type=int, default=30, help="action-free videos per task (motion prior only)")
    p.add_argument("--demos", type=int, default=5, help="action demos per task (one more is held out)")
    p.add_argument("--probe-episodes", type=int, default=None,
                   help="zeroshot-scale: scored episodes per unseen task (with actions, never trained on)")
    p.add_argument("--img-size", type=int, default=128, help="rendered image size (paper: 128)")
    p.add_argument("--T", type=int, default=16, help="track window length (paper: 16)")
    p.add_argument("--grid", type=int, default=20, help="tracked grid side (paper: 20)")
    p.add_argument("--ablation-tracker", choices=["flow", "lk"], default=None,
                   help="fewshot: also the protocol (first few-shot setting) with this offline tracker's tracks "
                        "instead of the exact ones: dense flow or Lucas-Kanade")
    p.add_argument("--lk-ablation", dest="ablation_tracker", action="store_const", const="lk",
                   help="the same as --ablation-tracker lk")
    # motion prior
    p.add_argument("--tokenizer-steps", type=int, default=1000, help="tokenizer steps of the first round")
    p.add_argument("--forward-steps", type=int, default=1000, help="forward-model steps of the first round")
    p.add_argument("--max-motion-steps", type=int, default=4000, help="cap of the plateau rounds (each stage)")
    p.add_argument("--max-forward-steps", type=int, default=None,
                   help="the forward model's own cap (default: --max-motion-steps); its steps cost a fifth of "
                        "the tokenizer's")
    p.add_argument("--plateau", type=float, default=0.02,
                   help="a stage stops when its later evaluations improve the held-out loss by less than this")
    p.add_argument("--motion-eval-samples", type=int, default=256, help="held-out windows per motion evaluation")
    # policies
    p.add_argument("--shots", default=None, help="fewshot: action demos per task of each few-shot setting "
                                                 "(comma-separated; default: 2,5)")
    p.add_argument("--seeds", default="0,1,2", help="policy seeds (model init, batch order, evaluation episodes)")
    p.add_argument("--inverse-steps", type=int, default=800, help="inverse model on codes of the true tracks")
    p.add_argument("--finetune-steps", type=int, default=400, help="then on forward-predicted codes (0: none)")
    p.add_argument("--inverse-eval-every", type=int, default=200,
                   help="held-out evaluations of the inverse models (must divide both step counts)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="amplify.py --device (auto picks a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the motion prior's training")
    p.add_argument("--jobs", type=int, default=None,
                   help="zeroshot-scale: cores kept busy by steps side by side (each subprocess uses one; an "
                        "evaluation --workers)")
    # evaluation
    p.add_argument("--eval-episodes", type=int, default=20, help="closed-loop episodes per task, policy and seed")
    # The experts finish these tasks in 34-122 steps; Meta-World's own limit (500) would spend most
    # of the evaluation time on episodes that have already failed. Same limit for every method.
    p.add_argument("--max-steps", type=int, default=200, help="policy steps per episode (0: Meta-World's own 500)")
    p.add_argument("--workers", type=int, default=2, help="eval_libero.py worker processes")
    return p


FEWSHOT = {"out": "runs/experiment", "tasks": DEFAULT_TASKS, "zero_shot_tasks": "drawer-open-v3", "shots": "2,5"}
# Flags of one setting only: given with the other, they are refused rather than ignored.
SETTING_ONLY = {"fewshot": ("tasks", "zero_shot_tasks", "shots", "ablation_tracker"),
                "zeroshot-scale": ("source_tasks", "unseen_tasks", "dose", "probe_episodes", "jobs")}


def task_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    scale = args.setting == "zeroshot-scale"
    for setting, names in SETTING_ONLY.items():
        given = [n for n in names if getattr(args, n) is not None]
        if setting != args.setting and given:
            p.error(f"--{given[0].replace('_', '-')}: expected with --setting {setting} only, found it with "
                    f"--setting {args.setting}")
    # the setting's defaults, then the quick sizes; flags given explicitly still win
    p.set_defaults(**{**(SCALE if scale else FEWSHOT), **((SCALE_QUICK if scale else QUICK) if args.quick else {})})
    args = p.parse_args(argv)
    # args error checking
    names = ("seeds",) if scale else ("shots", "seeds")
    if scale:
        names += ("dose",)
        args.source_tasks, args.unseen_tasks = task_list(args.source_tasks), task_list(args.unseen_tasks)
        both = args.source_tasks + args.unseen_tasks
        if not args.source_tasks or not args.unseen_tasks or len(set(both)) != len(both):
            p.error(f"--source-tasks and --unseen-tasks: expected two non-empty lists of distinct tasks, found "
                    f"{args.source_tasks} and {args.unseen_tasks}")
        args.tasks, args.zero_shot_tasks, args.shots = both, args.unseen_tasks, []
    else:
        args.tasks, args.zero_shot_tasks = task_list(args.tasks), task_list(args.zero_shot_tasks)
    for name in names:
        try:
            setattr(args, name, [int(k) for k in getattr(args, name).split(",") if k.strip()])
        except ValueError:
            p.error(f"--{name}: expected comma-separated integers, found {getattr(args, name)!r}")
    if scale:
        if (not args.dose or args.dose != sorted(set(args.dose)) or args.dose[0] < 1
                or args.dose[-1] != len(args.source_tasks)):
            p.error(f"--dose: expected increasing numbers of source tasks ending with all {len(args.source_tasks)}, "
                    f"found {args.dose}")
        for name in ("probe_episodes", "jobs"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')}: expected a positive number, found {getattr(args, name)}")
    else:
        if len(args.tasks) < 2:
            p.error(f"--tasks: expected at least two tasks (zero-shot trains on some, evaluates on others), "
                    f"found {args.tasks}")
        if not args.zero_shot_tasks or not set(args.zero_shot_tasks) < set(args.tasks):
            p.error(f"--zero-shot-tasks: expected some but not all of --tasks {args.tasks}, found "
                    f"{args.zero_shot_tasks}")
        if not args.shots or any(k < 1 or k > args.demos for k in args.shots):
            p.error(f"--shots: expected integers from 1 to --demos {args.demos}, found {args.shots}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds: expected distinct integers >= 0, found {args.seeds}")
    for name in ("videos", "demos", "tokenizer_steps", "forward_steps", "max_motion_steps", "inverse_steps",
                 "batch_size", "eval_episodes", "workers", "inverse_eval_every", "motion_eval_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive number, found {getattr(args, name)}")
    if args.max_forward_steps is not None and args.max_forward_steps < 1:
        p.error(f"--max-forward-steps: expected a positive number, found {args.max_forward_steps}")
    if args.finetune_steps < 0 or args.max_steps < 0:
        p.error(f"--finetune-steps and --max-steps: expected numbers >= 0, found {args.finetune_steps} and "
                f"{args.max_steps}")
    if scale and args.finetune_steps < 1:
        p.error("--finetune-steps: expected a positive number with --setting zeroshot-scale (its closed-loop "
                f"AMPLIFY reads predicted codes), found {args.finetune_steps}")
    if args.inverse_steps % args.inverse_eval_every or args.finetune_steps % args.inverse_eval_every:
        p.error(f"--inverse-eval-every: expected a divisor of --inverse-steps {args.inverse_steps} and "
                f"--finetune-steps {args.finetune_steps} (the oracle row compares equal steps), found "
                f"{args.inverse_eval_every}")
    if not 0 <= args.plateau < 1:
        p.error(f"--plateau: expected a fraction in [0, 1), found {args.plateau}")
    return args


def print_plan(planned, skipped, jobs=None, cores=1):
    """The steps still to run with their estimates, and the total; with `jobs`, the wall time of running
    them side by side on `cores` cores (schedule)."""
    later = " (if still improving)"
    for name, s in planned:
        print(f"{name:<52} ~{s / 60:5.1f} min")
    total = sum(s for _, s in planned)
    extra = sum(s for name, s in planned if name.endswith(later))
    line = (f"{len(planned)} steps to run, {skipped} done: ~{(total - extra) / 60:.0f} min if the motion stages "
            f"plateau in their first round, ~{total / 60:.0f} min at the step caps")
    if jobs is not None:
        by_job = {j.name: jobs_planned for j, jobs_planned in jobs}
        first = schedule([j for j, _ in jobs], {n: sum(s for name, s in p if not name.endswith(later))
                                                for n, p in by_job.items()}, cores)
        caps = schedule([j for j, _ in jobs], {n: sum(s for _, s in p) for n, p in by_job.items()}, cores)
        line = (f"{len(planned)} steps to run, {skipped} done: {total / 60:.0f} min of steps at the step caps "
                f"({(total - extra) / 60:.0f} if the motion stages plateau in their first round); {cores} side by "
                f"side: ~{first / 60:.0f} min wall if they plateau in the first round, ~{caps / 60:.0f} min at the "
                f"step caps")
    print(line + f" ({'RATES_BF16' if rates() is RATES_BF16 else 'RATES'}: CPU time measured on this kind of "
          f"machine, as wall time on an otherwise idle 2-core machine)")


def main(argv=None):
    args = parse_args(argv)
    scale = args.setting == "zeroshot-scale"
    table_of = scale_table if scale else make_table
    if args.table:
        if not (Path(args.out) / "steps.json").exists():
            sys.exit(f"experiment.py: error: --table: expected a run in {args.out} (its steps.json), found none")
        print(table_of(args, Steps(args.out), partial=True), end="")
        return
    if args.plan:
        if scale:
            steps, jobs, planned = run_scale(args)
            print_plan(steps.planned, steps.skipped, [(j, planned[j.name]) for j in jobs], args.jobs)
        else:
            steps = run_protocol(args)
            print_plan(steps.planned, steps.skipped)
        return
    t0 = time.time()
    started = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f"experiment: {' '.join(sys.argv)}\nstarted {started}", flush=True)
    steps = Steps(args.out)
    try:
        run_scale(args, steps) if scale else run_protocol(args, steps)
    finally:  # the wall time of every invocation, finished or not: steps side by side overlap in steps.json
        if steps.ran:
            import amplify

            rows = read_jsonl(Path(args.out) / "invocations.jsonl") + [
                {"started": started, "minutes": round((time.time() - t0) / 60, 2), "ran": steps.ran,
                 "skipped": steps.skipped}]
            amplify.atomic_write(Path(args.out) / "invocations.jsonl", lambda tmp: Path(tmp).write_text(
                "".join(json.dumps(r) + "\n" for r in rows)))
    table = table_of(args, steps)
    import amplify

    amplify.atomic_write(Path(args.out) / "results.md", lambda tmp: Path(tmp).write_text(table))
    print("\n" + table, flush=True)
    print(f"ran {steps.ran} steps, skipped {steps.skipped}; this invocation {(time.time() - t0) / 60:.1f} min; "
          f"table: {Path(args.out) / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
