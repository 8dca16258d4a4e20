"""The paper's claims on Meta-World, end to end on a CPU: one command, one table.

AMPLIFY (Collins et al., CoRL 2025, arXiv 2506.14198) claims that a motion prior learned from
action-free video (1) predicts point tracks accurately, (2) makes few-shot policy learning work
better than behaviour cloning on the same actions, and (3) transfers zero-shot to tasks with no
action data at all. This script runs that protocol on scripted-expert Meta-World data through the
project's three command lines (`preprocess.py`, `amplify.py`, `eval_libero.py`) and prints one
table: closed-loop success per method and setting, and the track metrics of the tokenizer and the
forward model on held-out episodes, with the paper's LIBERO figures beside them.

    python experiment.py --out runs/experiment      # the README's table; about an hour on 2 cores

The protocol (every step is one subprocess; logs in OUT/logs/):
  1. data       `preprocess.py metaworld`: E successful expert episodes per task (MT1 seed 0);
                the last episode of each task is held out of all training (`--val-episodes 1`)
  2. motion     tokenizer and forward model on the videos of all training episodes of all tasks
  3. policies   per setting, AMPLIFY = inverse model on true-track codes, then fine-tuned on
                forward-predicted codes (`--predicted-codes`); the baseline "AMPLIFY (inverse
                only)" = the same inverse model without codes (`--no-codes`), trained on the same
                actions for the same total number of steps (inverse + fine-tuning)
                  few-shot K   actions of the first K episodes of every task (`--shots K`)
                  zero-shot    actions of the other tasks only (`--exclude-task`); the forward
                               model has still seen the held-out tasks' videos
  4. eval       `eval_libero.py --suite metaworld`: few-shot policies on every task, zero-shot
                policies on the held-out tasks only; episode i uses goal variation i of
                MT1(seed=1000 + seed), so no evaluation episode replays a training episode

Notable features
  - Resumable: a step that finished is recorded in OUT/steps.json with its exact command and
    skipped next time; an interrupted training stage continues from its checkpoint (`--resume`).
    Running again with other settings into the same OUT is refused instead of mixing results.
  - Fixed seeds everywhere (data, model init, batch order, evaluation episodes); every subprocess
    runs with one torch/OpenMP thread (on a busy 2-core machine more threads are slower).
  - OUT/results.md holds the printed table; the total time counts every step over all invocations.
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
# Published LIBERO figures (paper Table 2/15), printed beside ours for orientation only: another
# benchmark, 128 px images, CoTracker tracks and models thousands of times longer trained.
PAPER = {"tokenizer": {"delta_auc": 0.92}, "forward": {"mse": 0.006, "pixel_acc": 0.629, "delta_auc": 0.913}}
METHODS = {"amplify": "AMPLIFY", "bc": "inverse only (BC)"}


# -----------------------------------------------------------------------------
# Steps: run a command once, remember that it finished


class Steps:
    """OUT/steps.json: {name: {"cmd": [...], "seconds": float}} for every step that finished."""

    def __init__(self, out):
        self.path = Path(out) / "steps.json"
        self.logs = Path(out) / "logs"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped = self.ran = 0

    def run(self, name, cmd):
        """Run `cmd` (argv after the interpreter) unless step `name` finished with the same command."""
        cmd = [str(c) for c in cmd]
        if name in self.done:
            if self.done[name]["cmd"] != cmd:
                sys.exit(f"experiment.py: error: step '{name}' in {self.path.parent} finished with other settings "
                         f"(expected command {' '.join(cmd)}, found {' '.join(self.done[name]['cmd'])}); "
                         f"use a new --out")
            print(f"skip  {name:<24} (done in {self.done[name]['seconds'] / 60:.1f} min)", flush=True)
            self.skipped += 1
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        print(f"run   {name:<24} log: {log_path}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.setdefault("MUJOCO_GL", "egl")
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env)
        seconds = time.time() - t0
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            sys.exit(f"{tail}\nexperiment.py: error: step '{name}' failed (exit code {code}); see {log_path}")
        self.done[name] = {"cmd": cmd, "seconds": seconds}
        import amplify  # lazily, as below: the protocol itself only runs command lines

        # atomic: a crash never leaves a half-written record
        amplify.atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.done, indent=1)))
        print(f"done  {name:<24} {seconds / 60:.1f} min", flush=True)
        self.ran += 1

    def seconds(self):
        return sum(s["seconds"] for s in self.done.values())


# -----------------------------------------------------------------------------
# The protocol


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
    import preprocess  # lazily: importing it is cheap, but the test of the table should not need it

    return preprocess.task_from_name(name)


def run_protocol(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    data, motion = out / "data", out / "motion"
    common = ["--data", data, "--seed", args.seed, "--batch-size", args.batch_size, "--device", args.device,
              "--resume"]

    steps.run("data", ["preprocess.py", "metaworld", ",".join(args.tasks), "--episodes", args.episodes,
                       "--img-size", args.img_size, "--T", args.T, "--grid", args.grid, "--tracker", "lk",
                       "--seed", 0, "--no-progress", "--out", data])
    steps.run("tokenizer", ["amplify.py", "--stage", "tokenizer", "--out", motion, "--steps", args.tokenizer_steps,
                            *common])
    steps.run("forward", ["amplify.py", "--stage", "forward", "--out", motion, "--steps", args.forward_steps, *common])

    for name, _, flags, eval_tasks in settings(args):
        amp, bc = out / "policies" / f"{name}-amplify", out / "policies" / f"{name}-bc"
        amp.mkdir(parents=True, exist_ok=True)
        for stage in ("tokenizer", "forward"):  # Policy.load(DIR) reads all three stages from DIR
            if not (amp / f"{stage}.pt").exists():
                shutil.copyfile(motion / f"{stage}.pt", amp / f"{stage}.pt")
        steps.run(f"{name}-amplify-inverse", ["amplify.py", "--stage", "inverse", "--out", amp,
                                              "--steps", args.inverse_steps, *flags, *common])
        if args.finetune_steps:
            steps.run(f"{name}-amplify-finetune", ["amplify.py", "--stage", "inverse", "--predicted-codes", "--out", amp,
                                                   "--steps", args.finetune_steps, *flags, *common])
        # Same actions, same total number of gradient steps as AMPLIFY's inverse model.
        steps.run(f"{name}-bc-inverse", ["amplify.py", "--stage", "inverse", "--no-codes", "--out", bc,
                                         "--steps", args.inverse_steps + args.finetune_steps, *flags, *common])
        for method, policy in (("amplify", amp), ("bc", bc)):
            steps.run(f"{name}-{method}-eval", [
                "eval_libero.py", "--policy", policy, "--suite", "metaworld", "--tasks", ",".join(eval_tasks),
                "--episodes", args.eval_episodes, "--seed", args.seed, "--workers", args.workers,
                "--out", out / "eval" / f"{name}-{method}",
                *(["--max-steps", args.max_steps] if args.max_steps else [])])
    return steps


# -----------------------------------------------------------------------------
# The table


def last_metrics(path):
    """The last record of a <stage>_metrics.jsonl (the final evaluation of the stage)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"experiment.py: error: {path}: expected evaluation records, found none")
    return json.loads(lines[-1])


def no_motion_metrics(data, samples=64):
    """track_metrics of predicting that nothing moves, on the windows the forward model is scored on.

    The reference a reader needs: with a fixed camera most grid points lie on static background, so
    even this trivial prediction scores high. Same held-out episodes (`--val-episodes 1`) and the
    same evenly spaced windows as amplify.py's forward evaluation (cpu preset: 64).
    """
    import amplify  # lazily: the protocol itself only runs the command lines

    corpus = amplify.load_corpus([str(data)])
    _, val = amplify.split_episodes(corpus, 1)
    gt = amplify.tracks_batch(corpus, amplify.eval_frames(corpus, val, samples))  # (B, V, T, N, 2)
    still = gt[:, :, :1].repeat(gt.shape[2], axis=2)  # every point stays where it starts
    return amplify.track_metrics(still, gt, corpus.img_size)


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a success rate k/n (sensible also at 0/n and n/n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def success_cell(results):
    k, n = results["overall"]["successes"], results["overall"]["episodes"]
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.0f}% ({k}/{n}) [{100 * lo:.0f}-{100 * hi:.0f}]"


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def make_table(args, steps_seconds):
    out = Path(args.out)
    lines = [f"AMPLIFY on Meta-World ({', '.join(args.tasks)}): {args.episodes} expert episodes per task at "
             f"{args.img_size}x{args.img_size} px, the last one per task held out; {args.eval_episodes} evaluation "
             f"episodes per task on held-out goal variations; seed {args.seed}.", "",
             "| setting | action data (inverse model) | evaluated on | AMPLIFY | inverse only (BC) |",
             "|---|---|---|---|---|"]
    per_task = {}
    n_train = args.episodes - 1  # --val-episodes 1
    for name, label, _, eval_tasks in settings(args):
        cells = {}
        for method in METHODS:
            r = json.loads((out / "eval" / f"{name}-{method}" / "results.json").read_text())
            cells[method] = success_cell(r)
            per_task[(name, method)] = {t["task"]: t for t in r["tasks"]}
        if name == "zeroshot":
            seen = [t for t in args.tasks if t not in args.zero_shot_tasks]
            data = f"{n_train} episodes x {len(seen)} other tasks"
        else:
            data = f"{min(int(name[len('fewshot'):]), n_train)} episodes x {len(args.tasks)} tasks"
        lines.append(f"| {label} | {data} | {len(eval_tasks)} tasks x {args.eval_episodes} | "
                     f"{cells['amplify']} | {cells['bc']} |")
    lines += ["", "Success rate (successes/episodes) [95% Wilson interval]. Per task:", "",
              "| setting | method | " + " | ".join(args.tasks) + " |", "|---|---|" + "---|" * len(args.tasks)]
    for name, label, _, _ in settings(args):
        for method, method_label in METHODS.items():
            row = [per_task[(name, method)].get(task) for task in args.tasks]
            lines.append(f"| {label} | {method_label} | " +
                         " | ".join("-" if t is None else f"{t['successes']}/{t['episodes']}" for t in row) + " |")

    tok = last_metrics(out / "motion" / "tokenizer_metrics.jsonl")
    fwd = last_metrics(out / "motion" / "forward_metrics.jsonl")
    lines += ["", f"Track metrics on the {len(args.tasks)} held-out episodes (per coordinate, as published; "
                  f"ours: {args.img_size} px, Lucas-Kanade tracks; paper: LIBERO, 128 px, CoTracker):", "",
              "| | MSE | pixel acc | Delta_AUC | paper MSE | paper pixel acc | paper Delta_AUC |",
              "|---|---|---|---|---|---|---|"]
    still = no_motion_metrics(out / "data")
    for label, m, paper in (("tokenizer reconstruction", tok, PAPER["tokenizer"]),
                            (f"forward prediction (code acc {fmt(fwd.get('code_acc'))})", fwd, PAPER["forward"]),
                            ("reference: no motion predicted", still, {})):
        lines.append(f"| {label} | {fmt(m['mse'], 4)} | {fmt(m['pixel_acc'])} | {fmt(m['delta_auc'])} | "
                     f"{fmt(paper.get('mse'))} | {fmt(paper.get('pixel_acc'))} | {fmt(paper.get('delta_auc'))} |")
    lines += ["", f"Steps: tokenizer {args.tokenizer_steps}, forward {args.forward_steps}, inverse {args.inverse_steps} + "
                  f"{args.finetune_steps} fine-tuning on predicted codes (BC: {args.inverse_steps + args.finetune_steps}), "
                  f"batch {args.batch_size}; evaluation episodes end at success or after "
                  f"{args.max_steps or 500} steps. Total time of all steps: {steps_seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="AMPLIFY's few-shot and zero-shot claims on Meta-World, "
                                            "through preprocess.py, amplify.py and eval_libero.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/experiment", help="everything goes here; run again to resume")
    # data
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated Meta-World tasks")
    # drawer-open: its motions (reach a handle, pull it) occur in the other tasks, its actions never.
    p.add_argument("--zero-shot-tasks", default="drawer-open-v3",
                   help="tasks whose actions the zero-shot inverse models never see (comma-separated)")
    p.add_argument("--episodes", type=int, default=12, help="expert episodes per task (the last is held out)")
    p.add_argument("--img-size", type=int, default=64, help="rendered image size")
    p.add_argument("--T", type=int, default=16, help="track window length (paper: 16)")
    p.add_argument("--grid", type=int, default=20, help="tracked grid side (paper: 20)")
    # training
    p.add_argument("--shots", default="2,5", help="few-shot settings: action episodes per task (comma-separated)")
    # At 300 steps the tokenizer's reconstructions barely beat "nothing moves" (measured here:
    # Delta_AUC 0.879 vs 0.870); it keeps improving for thousands of steps, cheaply on this data.
    p.add_argument("--tokenizer-steps", type=int, default=2000, help="tokenizer training steps")
    p.add_argument("--forward-steps", type=int, default=3000, help="forward-model training steps")
    p.add_argument("--inverse-steps", type=int, default=500, help="inverse model on codes of the true tracks")
    p.add_argument("--finetune-steps", type=int, default=250, help="then on forward-predicted codes (0: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="amplify.py --device (auto picks a GPU)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order; evaluation episodes")
    # evaluation
    p.add_argument("--eval-episodes", type=int, default=10, help="closed-loop episodes per task and policy")
    # The experts finish these tasks in 34-122 steps; Meta-World's own limit (500) would spend most
    # of the evaluation time on episodes that have already failed. Same limit for every method.
    p.add_argument("--max-steps", type=int, default=300, help="policy steps per episode (0: Meta-World's own 500)")
    p.add_argument("--workers", type=int, default=2, help="eval_libero.py worker processes")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # args error checking
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.zero_shot_tasks = [t.strip() for t in args.zero_shot_tasks.split(",") if t.strip()]
    try:
        args.shots = [int(k) for k in args.shots.split(",") if k.strip()]
    except ValueError:
        p.error(f"--shots: expected comma-separated integers, found {args.shots!r}")
    if len(args.tasks) < 2:
        p.error(f"--tasks: expected at least two tasks (zero-shot trains on some, evaluates on others), found {args.tasks}")
    if not args.zero_shot_tasks or not set(args.zero_shot_tasks) < set(args.tasks):
        p.error(f"--zero-shot-tasks: expected some but not all of --tasks {args.tasks}, found {args.zero_shot_tasks}")
    if any(k < 1 for k in args.shots):
        p.error(f"--shots: expected positive integers, found {args.shots}")
    if args.episodes < 2:
        p.error(f"--episodes: expected at least 2 (one is held out), found {args.episodes}")
    for name in ("tokenizer_steps", "forward_steps", "inverse_steps", "batch_size", "eval_episodes", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive number, found {getattr(args, name)}")
    if args.finetune_steps < 0 or args.max_steps < 0:
        p.error("--finetune-steps and --max-steps: expected numbers >= 0")

    t0 = time.time()
    print(f"experiment: {' '.join(sys.argv)}\nstarted {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    steps = run_protocol(args)
    table = make_table(args, steps.seconds())
    import amplify

    amplify.atomic_write(Path(args.out) / "results.md", lambda tmp: Path(tmp).write_text(table))
    print("\n" + table, flush=True)
    print(f"ran {steps.ran} steps, skipped {steps.skipped}; this invocation {(time.time() - t0) / 60:.1f} min; "
          f"table: {Path(args.out) / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
