"""Tests of experiment.py: the whole protocol on tiny sizes, so the script cannot rot.

    pytest test_experiment.py -q        # a few minutes on a busy 2-core CPU

The protocol test runs two Meta-World tasks at 32 px with a 5x5 grid and 4-step windows: one
action-free video and one action demo (plus one held out) per task, two training steps per round,
one evaluation episode of three steps per task. It checks that the script runs preprocess.py ->
amplify.py -> eval_libero.py end to end and prints the table with every link, that the videos
reach the motion prior without actions, that the plateau rule adds a round, that a second
invocation skips every finished step and prints the same table, and that changed settings are
refused rather than mixed into the same output directory. Skipped where Meta-World is absent
(fails under CI=true, see conftest.need). The statistics and the plan are tested without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import experiment
from conftest import need

HERE = Path(__file__).resolve().parent
TINY = ["--tasks", "reach-v3,button-press-topdown-v3", "--zero-shot-tasks", "button-press-topdown-v3",
        "--videos", "1", "--demos", "1", "--img-size", "32", "--grid", "5", "--T", "4", "--shots", "1",
        "--seeds", "0", "--tokenizer-steps", "2", "--forward-steps", "2", "--max-motion-steps", "4",
        "--motion-eval-samples", "8", "--inverse-steps", "2", "--finetune-steps", "1", "--inverse-eval-every", "1",
        "--batch-size", "2", "--eval-episodes", "1", "--max-steps", "3", "--workers", "1"]
POLICY_STEPS = [f"{s}-s0-{part}" for s in ("fewshot1", "zeroshot") for part in (
    "amplify-inverse", "amplify-finetune", "bc-inverse", "amplify-eval", "bc-eval")]
STEPS = ["data-videos-raw", "data-videos", "data-demos", "tokenizer", "tokenizer-round2", "forward", "forward-round2",
         "diagnostics", *POLICY_STEPS, "tracker-bench"]


def run_experiment(out, *extra, flags=TINY):
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HERE / "experiment.py"), "--out", str(out), *flags, *extra],
                          capture_output=True, text=True, timeout=1500, cwd=HERE, env=env)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    need("metaworld")
    need("cv2")  # bench-tracker's Lucas-Kanade tracker
    out = tmp_path_factory.mktemp("experiment") / "run"
    proc = run_experiment(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def table_of(stdout, title="AMPLIFY vs BC on Meta-World", end="ran "):
    """The printed table: from its first line (`title`) to the line before the closing summary."""
    start = stdout.index(title)
    return stdout[start:stdout.index(end, start)].strip()


def test_runs_every_step_and_prints_the_table(first_run):
    out, proc = first_run
    for name in STEPS:
        assert f"run   {name}" in proc.stdout and f"done  {name}" in proc.stdout, name
    table = table_of(proc.stdout)
    assert table + "\n" == (out / "results.md").read_text().strip() + "\n"
    rows = [line for line in table.splitlines() if line.startswith("|")]
    few = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | exact | 1 x 2 tasks | 2 x 1 x 1 |"))
    zero = next(r for r in rows if r.startswith("| zero-shot on button-press-topdown-v3 | exact |"))
    assert few.count("/2)") == 2 and zero.count("/1)") == 2  # both methods, pooled over tasks
    diff = few.split("|")[7]  # AMPLIFY - BC [low, high]: the difference lies in its interval
    d, lo, hi = (float(x) for x in diff.replace("[", " ").replace("]", " ").replace(",", " ").split())
    assert lo <= d <= hi
    oracle = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | exact |") and r.count("|") == 7)
    assert all(float(x) >= 0 for x in oracle.split("|")[3:7])  # four held-out action errors, none missing
    for label in ("tokenizer reconstruction", "forward model prediction", "nothing moves (reference)"):
        row = next(r for r in rows if r.startswith(f"| exact | {label}"))
        cells = row.split("|")[3:-1]  # moving px, per view, MSE, pixel acc, Delta_AUC
        assert len(cells) == 6, row
        assert 0 <= float(cells[-2]) <= 1 and 0 <= float(cells[-1]) <= 1, row
    for tracker in ("lk", "flow"):
        assert any(r.startswith(f"| {tracker} | corner |") for r in rows), tracker
        assert any(r.startswith(f"| {tracker} | gripperPOV |") for r in rows), tracker
    assert "Motion training (plateau rule" in table and "Total time of all steps" in table


def test_protocol_reaches_the_command_lines(first_run):
    out, _ = first_run
    done = json.loads((out / "steps.json").read_text())
    assert sorted(done) == sorted(STEPS)
    cmd = {name: " ".join(s["cmd"]) for name, s in done.items()}
    # the asymmetry: many videos without actions for the motion prior, a few demos with actions
    assert "--episodes 1 --seed 0" in cmd["data-videos-raw"] and "--episodes 2 --seed 1" in cmd["data-demos"]
    assert "--tracker sim" in cmd["data-demos"] and "--img-size 32" in cmd["data-demos"]
    videos = out / "data" / "videos"
    assert not (videos / "actions.npy").exists() and not (videos / "proprio.npy").exists()
    assert (out / "data" / "demos" / "actions.npy").exists()
    assert f"--data {videos} {out / 'data' / 'demos'}" in cmd["tokenizer"]
    log = (out / "logs" / "fewshot1-s0-amplify-inverse.log").read_text()
    assert "6 episodes" in log and "4 episodes with actions" in log  # 1 video + 2 demos per task; 2 x 2 with actions
    # plateau rule: a second round resumes the same stage for twice the steps
    assert "--steps 2 " in cmd["tokenizer"] + " " and "--steps 4 " in cmd["tokenizer-round2"] + " "
    assert "--resume" in cmd["tokenizer-round2"]
    # the policies and the fair baseline
    assert "--shots 1" in cmd["fewshot1-s0-amplify-inverse"] and "--shots 1" in cmd["fewshot1-s0-bc-inverse"]
    assert "--no-codes" in cmd["fewshot1-s0-bc-inverse"] and "--no-codes" not in cmd["fewshot1-s0-amplify-inverse"]
    assert "--predicted-codes" in cmd["fewshot1-s0-amplify-finetune"]
    assert "--steps 3 " in cmd["fewshot1-s0-bc-inverse"]  # the baseline gets inverse + fine-tuning steps
    zero_bc = done["zeroshot-s0-bc-inverse"]["cmd"]
    assert zero_bc[zero_bc.index("--exclude-task") + 1] == "button press topdown"
    results = json.loads((out / "eval" / "zeroshot-s0-amplify" / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["button-press-topdown-v3"] and results["complete"] is True
    for f in ("tokenizer.pt", "forward.pt", "inverse.pt", "inverse_ft.pt"):
        assert (out / "policies" / "fewshot1-s0-amplify" / f).exists(), f
    assert not (out / "policies" / "fewshot1-s0-bc" / "forward.pt").exists()
    diag = json.loads((out / "motion" / "diagnostics.json").read_text())
    assert diag["views"] == ["corner", "gripperPOV"] and set(diag) >= {"tokenizer", "forward", "still"}
    curves = sorted(p.name for p in (out / "curves").glob("*.png"))
    assert "motion-tokenizer.png" in curves and "motion-forward.png" in curves
    assert "fewshot1-s0-bc-inverse.png" in curves


def test_second_invocation_skips_finished_steps(first_run):
    out, proc = first_run
    again = run_experiment(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in STEPS:
        assert f"skip  {name}" in again.stdout, name
    assert "run   " not in again.stdout
    assert f"ran 0 steps, skipped {len(STEPS)}" in again.stdout
    assert table_of(again.stdout).split("Total time")[0] == table_of(proc.stdout).split("Total time")[0]


def test_other_settings_in_the_same_out_are_refused(first_run):
    out, _ = first_run
    before = (out / "steps.json").read_text()
    proc = run_experiment(out, "--tokenizer-steps", "3")
    assert proc.returncode != 0
    assert "step 'tokenizer'" in proc.stderr and "use a new --out" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (out / "steps.json").read_text() == before


@pytest.mark.parametrize("flags, message", [
    (["--zero-shot-tasks", "reach-v3,button-press-topdown-v3"], "--zero-shot-tasks"),
    (["--shots", "two"], "--shots"),
    (["--shots", "2"], "--shots"),  # more shots than --demos 1
    (["--seeds", "0,0"], "--seeds"),
    (["--inverse-eval-every", "2"], "--inverse-eval-every"),  # does not divide --finetune-steps 1
])
def test_bad_arguments_fail_before_any_work(tmp_path, flags, message):
    proc = run_experiment(tmp_path / "run", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# Without a simulator


def test_plan_lists_every_step_and_runs_nothing(tmp_path, capsys):
    experiment.main(["--out", str(tmp_path / "run"), *TINY, "--seeds", "0,1", "--lk-ablation", "--plan"])
    printed = capsys.readouterr().out
    names = [line.split()[0] for line in printed.splitlines() if "~" in line and "min" in line][:-1]
    assert names[:3] == ["data-videos-raw", "data-videos", "data-demos"]
    assert "data-lk-demos" in names and "tokenizer-lk" in names and "lk-fewshot1-s1-amplify-eval" in names
    assert not any(n.startswith("lk-") and "-bc-" in n for n in names)  # BC reads no tracks: shared
    assert "tokenizer-round2" in names  # a round the plateau rule may add
    assert "zeroshot-s1-amplify-finetune" in names and names[-1] == "tracker-bench"
    assert not (tmp_path / "run").exists()


def test_ablation_tracks_with_its_tracker_and_is_scored_on_exact_tracks(tmp_path, monkeypatch):
    """The ablation's data come from its offline tracker; its motion prior's links are measured
    against the exact tracks of the same held-out windows, as the exact run's are."""
    commands = {}

    class Recording(experiment.Steps):
        def run(self, name, cmd, estimate=0.0):
            commands[name] = [str(c) for c in cmd]
            super().run(name, cmd, estimate)

        def call(self, name, what, fn, estimate=0.0):
            commands[name] = [str(c) for c in what]
            super().call(name, what, fn, estimate)

    monkeypatch.setattr(experiment, "Steps", Recording)
    args = experiment.parse_args(["--out", str(tmp_path / "run"), *TINY, "--ablation-tracker", "flow", "--plan"])
    experiment.run_protocol(args)
    tracker = lambda name: commands[name][commands[name].index("--tracker") + 1]  # noqa: E731
    assert tracker("data-demos") == "sim" and tracker("data-flow-demos") == tracker("data-flow-videos-raw") == "flow"
    exact, ablation = commands["diagnostics"], commands["diagnostics-flow"]
    assert ablation[1:3] == exact[1:3] and exact[1].endswith(os.path.join("data", "videos"))  # the exact tracks
    assert exact[3].endswith("motion") and ablation[3].endswith("motion-flow")
    assert "flow-fewshot1-s0-amplify-eval" in commands and "flow-zeroshot-s0-amplify-eval" not in commands
    assert not (tmp_path / "run").exists()


def test_quick_sizes_are_defaults_that_flags_override():
    args = experiment.parse_args(["--quick", "--eval-episodes", "3"])
    assert args.videos == experiment.QUICK["videos"] and args.seeds == [0] and args.eval_episodes == 3
    full = experiment.parse_args([])
    assert full.videos >= 30 and full.demos >= 5 and full.shots == [2, 5] and full.seeds == [0, 1, 2]
    assert full.img_size == 128 and full.eval_episodes == 20


def test_plateau_rule():
    falling = [{"step": s, "val_loss": 3.0 / s} for s in range(1, 9)]
    flat = [{"step": s, "val_loss": 1.0 + (0.5 if s == 1 else 0.001 * (s % 2))} for s in range(1, 9)]
    rising = [{"step": s, "val_loss": 1.0 + 0.1 * s} for s in range(1, 9)]  # over-fitting: stop too
    assert not experiment.plateaued(falling, 0.02)
    assert experiment.plateaued(flat, 0.02) and experiment.plateaued(rising, 0.02)
    assert not experiment.plateaued(flat[:3], 0.02)  # too few evaluations to say


def test_wilson_and_paired_bootstrap():
    lo, hi = experiment.wilson(0, 20)
    assert lo == 0 and 0.1 < hi < 0.2
    lo, hi = experiment.wilson(10, 20)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-9
    # AMPLIFY wins 15 of 20 paired episodes per stratum where BC fails, never the reverse: clearly positive
    better = {(s, t): [(1, 0)] * 15 + [(1, 1)] * 5 for s in range(3) for t in range(4)}
    d, lo, hi = experiment.paired_bootstrap(better)
    assert d == pytest.approx(0.75) and 0.6 < lo < d < hi <= 0.9
    # identical outcomes: the difference is zero and so is the interval
    same = {(0, t): [(1, 1), (0, 0)] * 10 for t in range(4)}
    assert experiment.paired_bootstrap(same) == (0.0, 0.0, 0.0)
    # pure noise: the interval covers zero
    rng = __import__("numpy").random.default_rng(0)
    noise = {(0, t): [tuple(rng.integers(0, 2, 2)) for _ in range(20)] for t in range(4)}
    d, lo, hi = experiment.paired_bootstrap(noise)
    assert lo < 0 < hi


def test_strip_actions_keeps_everything_else(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    import numpy as np

    for name in ("images", "tracks", "actions", "proprio", "episode_ends"):
        np.save(src / f"{name}.npy", np.arange(3))
    (src / "meta.json").write_text(json.dumps({"views": ["corner"], "action_stats": {}, "proprio_stats": {}}))
    experiment.strip_actions(src, tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["episode_ends.npy", "images.npy", "meta.json",
                                                                      "tracks.npy"]
    meta = json.loads((tmp_path / "dst" / "meta.json").read_text())
    assert meta["views"] == ["corner"] and "action_stats" not in meta and "actions" in meta
    assert (src / "actions.npy").exists()  # the source is left as it was


def fake_run(out, args):
    """The files a finished run leaves, with known outcomes: AMPLIFY wins every few-shot episode with
    exact tracks, BC none; the ablation's AMPLIFY (offline tracks) wins half; zero-shot both win everything."""
    def write(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for variant in experiment.variants(args):
        for name, _, _, tasks in experiment.variant_settings(args, variant):
            for seed in args.seeds:
                for method in experiment.variant_methods(variant):
                    p = experiment.policy_name(variant, name, seed, method)
                    def win(ep):
                        return (name == "zeroshot" or method == "amplify") and (variant == "sim" or ep % 2 == 0)
                    episodes = [{"task": t, "episode": ep, "success": win(ep)} for t in tasks
                                for ep in range(args.eval_episodes)]
                    write(out / "eval" / p / "results.json", json.dumps({"complete": True, "episodes": episodes}))
                    mse = 0.1 if method == "amplify" else 0.2
                    write(out / "policies" / p / "inverse_metrics.jsonl", "".join(
                        json.dumps({"step": s, "action_mse": mse + seed / 100}) + "\n" for s in (1, 2, 3)))
                    if method == "amplify":
                        write(out / "policies" / p / "inverse_ft_metrics.jsonl", json.dumps(
                            {"step": 1, "action_mse": 0.3}) + "\n")
        motion = out / ("motion" if variant == "sim" else f"motion-{variant}")
        m = {"moving_px": 2.0, "moving_px_per_view": [1.0, 3.0], "mse": 0.01, "pixel_acc": 0.5, "delta_auc": 0.9}
        write(motion / "diagnostics.json", json.dumps({
            "views": ["corner", "gripperPOV"], "windows": 8, "moving_frac": 0.25, "outside_frac": 0.01,
            "tokenizer": m, "forward": m, "still": {**m, "moving_px": 4.0}}))
        for stage in ("tokenizer", "forward"):
            write(motion / f"{stage}_metrics.jsonl", "".join(json.dumps({"step": s, "val_loss": 1.0, "code_acc": 0.5})
                                                              + "\n" for s in (1, 2, 3, 4)))
    write(out / "logs" / "tracker-bench.log", "| tracker | view | windows |\n|---|---|---|\n| lk | corner | 9 |\n")


def test_table_pools_seeds_and_pairs_episodes(tmp_path):
    out = tmp_path / "run"
    args = experiment.parse_args(["--out", str(out), *TINY, "--seeds", "0,1", "--eval-episodes", "4",
                                  "--ablation-tracker", "flow"])
    fake_run(out, args)
    table = experiment.make_table(args, experiment.Steps(out))
    rows = [line for line in table.splitlines() if line.startswith("|")]
    few = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | exact | 1 x 2 tasks | 2 x 4 x 2 |"))
    assert "100% (16/16)" in few and "0% (0/16)" in few and few.endswith("| +100 [+100, +100] |")
    flow = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | dense flow |") and "x 2 |" in r)
    assert "50% (8/16)" in flow and "0% (0/16)" in flow  # against the exact run's BC
    assert not any(r.startswith("| zero-shot on button-press-topdown-v3 | dense flow") for r in rows)
    zero = next(r for r in rows if r.startswith("| zero-shot on button-press-topdown-v3 | exact |") and "x 2 |" in r)
    assert zero.count("100% (8/8)") == 2 and zero.endswith("| 0 [0, 0] |")
    per = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | AMPLIFY |")).split("|")[3:-1]
    assert [c.split()[0] for c in per] == ["8/8", "8/8", "8/8", "8/8"]  # two tasks, then two seeds
    assert all(c.strip().endswith("-100]") for c in per)  # Wilson intervals
    oracle = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | exact |") and r.count("|") == 7)
    assert [float(x) for x in oracle.split("|")[3:7]] == pytest.approx([0.105, 0.205, 0.3, 0.205])
    assert "| exact | nothing moves (reference) | 4.00 | 1.00 | 3.00 |" in table
    assert "| dense flow | tokenizer reconstruction | 2.00 |" in table
    assert "| lk | corner | 9 |" in rows and "plateau reached" in table


def test_table_of_an_unfinished_run_marks_what_is_pending(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--out", str(out), *TINY, "--seeds", "0,1", "--eval-episodes", "4", "--ablation-tracker", "flow"]
    with pytest.raises(SystemExit, match="expected a run"):
        experiment.main([*flags, "--table"])
    fake_run(out, experiment.parse_args(flags))
    (out / "steps.json").write_text("{}")
    (out / "eval" / "fewshot1-s1-bc" / "results.json").write_text(json.dumps(  # seed 1: BC's evaluation under way
        {"complete": False, "episodes": [{"task": "reach-v3", "episode": 0, "success": True}]}))
    for seed in (0, 1):
        (out / "eval" / f"zeroshot-s{seed}-amplify" / "results.json").unlink()
    (out / "motion-flow" / "diagnostics.json").unlink()
    experiment.main([*flags, "--table"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("|")]
    few = next(r for r in rows if r.startswith("| few-shot, 1 demo/task | exact | 1 x 2 tasks |"))
    assert "| 2 x 4 x 1 (seeds 0 of 2) |" in few and "100% (8/8)" in few and "0% (0/8)" in few
    assert any(r.startswith("| zero-shot on button-press-topdown-v3 | exact | pending |") for r in rows)
    assert "| dense flow | pending |" in rows and "| exact | nothing moves (reference) | 4.00 |" in table
    assert not (out / "results.md").exists()  # a complete run writes the table; --table only prints it


# -----------------------------------------------------------------------------
# Zero-shot at scale (--setting zeroshot-scale): the same machinery, many source tasks, unseen tasks

# Two source tasks (reach; drawer-close, the unseen task's same-scene sibling) and one unseen task
# (drawer-open); the dose curve at 1 and 2 source tasks; two jobs side by side.
TINY_SCALE = ["--setting", "zeroshot-scale", "--source-tasks", "reach-v3,drawer-close-v3", "--unseen-tasks",
              "drawer-open-v3", "--dose", "1,2", "--videos", "1", "--demos", "1", "--probe-episodes", "1",
              "--img-size", "32", "--grid", "5", "--T", "4", "--seeds", "0", "--tokenizer-steps", "2",
              "--forward-steps", "2", "--max-motion-steps", "2", "--max-forward-steps", "2",
              "--motion-eval-samples", "8", "--inverse-steps", "2", "--finetune-steps", "1",
              "--inverse-eval-every", "1", "--batch-size", "2", "--eval-episodes", "1", "--max-steps", "3",
              "--workers", "1", "--jobs", "2"]
SCALE_STEPS = ["data-videos-raw", "data-videos", "data-demos", "data-probe", "tokenizer", "forward", "diagnostics",
               *(f"d2-s0-{p}" for p in ("amplify-inverse", "amplify-finetune", "amplify-eval", "bc-inverse",
                                         "bc-eval", "gcbc-inverse", "gcbc-eval", "bc-eq-inverse", "gcbc-eq-inverse",
                                         "oracle", "closed-loop-models")),
               *(f"d1-s0-{p}" for p in ("amplify-inverse", "bc-eq-inverse", "gcbc-eq-inverse", "oracle"))]


def run_scale(out, *extra):
    return run_experiment(out, *extra, flags=TINY_SCALE)


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    need("metaworld")
    out = tmp_path_factory.mktemp("scale") / "run"
    proc = run_scale(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def scale_table_of(stdout):
    return table_of(stdout, "Zero-shot at scale on Meta-World", "\nran ")


def test_scale_runs_every_step_with_the_right_data(scale_run):
    out, proc = scale_run
    done = json.loads((out / "steps.json").read_text())
    assert sorted(done) == sorted(SCALE_STEPS)
    for name in SCALE_STEPS:
        assert f"run   {name}" in proc.stdout and f"done  {name}" in proc.stdout, name
    cmd = {name: s["cmd"] for name, s in done.items()}
    # videos of every task without actions; demos of the source tasks only; probes of the unseen task
    assert cmd["data-videos-raw"][2] == "reach-v3,drawer-close-v3,drawer-open-v3"
    assert cmd["data-demos"][2] == "reach-v3,drawer-close-v3" and cmd["data-probe"][2] == "drawer-open-v3"
    assert "--seed 2" in " ".join(cmd["data-probe"]) and "--episodes 2 --seed 1" in " ".join(cmd["data-demos"])
    assert not (out / "data" / "videos" / "actions.npy").exists() and (out / "data" / "probe" / "actions.npy").exists()
    data = f"--data {out / 'data' / 'videos'} {out / 'data' / 'demos'} --out"
    for name in ("tokenizer", "forward", "d2-s0-amplify-inverse", "d1-s0-bc-eq-inverse"):
        assert data in " ".join(cmd[name]), name  # the probe episodes train nothing
    assert "probe" not in " ".join(" ".join(c) for n, c in cmd.items() if n != "data-probe" and "-oracle" not in n
                                   and "closed-loop" not in n)


def only_tasks(cmd):
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == "--only-task"]


def test_scale_policies_the_dose_and_both_baselines(scale_run):
    out, _ = scale_run
    cmd = {name: s["cmd"] for name, s in json.loads((out / "steps.json").read_text()).items()}
    steps = lambda name: int(cmd[name][cmd[name].index("--steps") + 1])  # noqa: E731
    for name, c in cmd.items():
        if name.startswith("d1-") and name.endswith("-inverse"):
            assert only_tasks(c) == ["reach"], name  # the first source task only
        elif name.endswith(("-inverse", "-finetune")):
            assert only_tasks(c) == ["reach", "drawer close"], name  # never the unseen task
    for dose in (1, 2):
        assert "--no-codes" not in cmd[f"d{dose}-s0-amplify-inverse"]
        bc = cmd[f"d{dose}-s0-bc-eq-inverse"]
        assert "--no-codes" in bc and "--goal-conditioned" not in bc
        assert {"--no-codes", "--goal-conditioned"} <= set(cmd[f"d{dose}-s0-gcbc-eq-inverse"])
        # the dose curve: equal steps; the closed loop: the baselines as long as AMPLIFY in all
        assert steps(f"d{dose}-s0-bc-eq-inverse") == steps(f"d{dose}-s0-amplify-inverse") == 2
    assert steps("d2-s0-bc-inverse") == steps("d2-s0-gcbc-inverse") == 3 and steps("d2-s0-amplify-finetune") == 1
    assert "--predicted-codes" in cmd["d2-s0-amplify-finetune"]
    assert {"--no-codes", "--goal-conditioned"} <= set(cmd["d2-s0-gcbc-inverse"])
    for m in ("amplify", "bc", "gcbc"):
        c = cmd[f"d2-s0-{m}-eval"]
        assert c[c.index("--tasks") + 1] == "drawer-open-v3"
        results = json.loads((out / "eval" / f"d2-s0-{m}" / "results.json").read_text())
        assert [t["task"] for t in results["tasks"]] == ["drawer-open-v3"] and results["complete"] is True
    log = lambda name: (out / "logs" / f"{name}.log").read_text()  # noqa: E731
    assert "| 1 action episodes" in log("d1-s0-amplify-inverse") and "| 2 action episodes" in log("d2-s0-bc-inverse")
    assert "task text read" in log("d2-s0-gcbc-inverse") and "task text read" not in log("d2-s0-bc-inverse")
    assert (out / "policies" / "d2-s0-amplify" / "inverse_ft.pt").exists()
    assert not (out / "policies" / "d1-s0-amplify" / "inverse_ft.pt").exists()  # no closed loop below the full dose


def test_scale_scores_every_action_dimension(scale_run):
    out, _ = scale_run
    for name in ("d1-s0-oracle", "d2-s0-oracle", "d2-s0-closed-loop-models"):
        r = json.loads((out / "scores" / f"{name}.json").read_text())
        assert set(r["models"]) == {"amplify", "bc", "gcbc"}
        for m in r["models"].values():
            assert set(m) == {"source", "drawer-open-v3"} and all(len(v) == 4 for v in m.values())  # x, y, z, gripper
            assert all(x >= 0 for v in m.values() for x in v)
        assert r["windows"]["drawer-open-v3"] > 0 and r["windows"]["source"] > 0
        assert sum(r["gripper_command"].values()) == pytest.approx(1.0)
    d1 = json.loads((out / "scores" / "d1-s0-oracle.json").read_text())
    d2 = json.loads((out / "scores" / "d2-s0-oracle.json").read_text())
    assert d1["sources"] == ["reach-v3"] and d2["sources"] == ["reach-v3", "drawer-close-v3"]
    # reach's expert never moves the gripper command off 0, drawer-close's holds it at +1
    assert d1["gripper_command"]["zero"] == 1.0 and d2["gripper_command"]["positive"] > 0


def test_scale_table(scale_run):
    out, proc = scale_run
    table = scale_table_of(proc.stdout)
    assert table + "\n" == (out / "results.md").read_text().strip() + "\n"
    rows = [line for line in table.splitlines() if line.startswith("|")]
    task = next(r for r in rows if r.startswith("| drawer-open-v3 | drawer-close-v3 |"))
    pooled = next(r for r in rows if r.startswith("| all unseen tasks |"))
    assert task.count("/1)") == 3 and pooled.count("/1)") == 3  # three methods, one episode each
    assert len(pooled.split("|")) == 9  # two differences with their intervals
    one = next(r for r in rows if r.startswith("| 1 (first 1) | none |"))
    two = next(r for r in rows if r.startswith("| 2 (all) | drawer-close-v3 |"))
    for r in (one, two):
        cells = r.split("|")[4:10]  # position and gripper errors of the three models
        assert all(float(c) >= 0 for c in cells), r
    assert any(r.startswith("| 1 | drawer-open-v3 | no |") for r in rows)
    assert any(r.startswith("| 2 | drawer-open-v3 | yes |") for r in rows)
    assert any(r.startswith("| goal-conditioned BC | ") and "pending" not in r for r in rows)
    assert any(r.startswith("| exact | forward model prediction |") for r in rows)
    assert "Time of all steps" in table and "wall time of the invocations" in table


def test_scale_second_invocation_skips_and_changes_are_refused(scale_run):
    out, proc = scale_run
    again = run_scale(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run   " not in again.stdout and f"ran 0 steps, skipped {len(SCALE_STEPS)}" in again.stdout
    assert scale_table_of(again.stdout).split("Time of all")[0] == scale_table_of(proc.stdout).split("Time of all")[0]
    before = (out / "steps.json").read_text()
    changed = run_scale(out, "--inverse-steps", "4", "--inverse-eval-every", "1")
    assert changed.returncode != 0 and "use a new --out" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and "run   " not in changed.stdout
    assert (out / "steps.json").read_text() == before


@pytest.mark.parametrize("flags, message", [
    (["--dose", "2,1"], "--dose"),
    (["--dose", "1"], "--dose"),  # the last dose is all source tasks
    (["--unseen-tasks", "reach-v3"], "--source-tasks and --unseen-tasks"),  # also a source task
    (["--tasks", "reach-v3,push-v3"], "--tasks"),  # the other setting's flag
    (["--jobs", "0"], "--jobs"),
    (["--finetune-steps", "0"], "--finetune-steps"),
])
def test_scale_bad_arguments_fail_before_any_work(tmp_path, flags, message):
    proc = run_scale(tmp_path / "run", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_scale_flags_are_refused_in_the_fewshot_setting():
    for flags in (["--source-tasks", "reach-v3"], ["--dose", "3"], ["--jobs", "2"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(flags)


def test_scale_defaults():
    args = experiment.parse_args(["--setting", "zeroshot-scale"])
    assert len(args.source_tasks) >= 16 and len(args.unseen_tasks) == 4 and args.dose == [3, 8, 16]
    assert args.out == "runs/zeroshot-scale" and args.seeds == [0, 1, 2] and args.eval_episodes == 20
    for t in args.unseen_tasks:  # each unseen task has a same-scene sibling among the source tasks ...
        assert experiment.scene_siblings(t, args.source_tasks), t
    assert not any(experiment.scene_siblings(t, args.source_tasks[:3]) for t in args.unseen_tasks)  # ... not at dose 3
    assert all(experiment.scene_siblings(t, args.source_tasks[:8]) for t in args.unseen_tasks)
    quick = experiment.parse_args(["--setting", "zeroshot-scale", "--quick", "--videos", "3"])
    assert quick.videos == 3 and quick.demos == experiment.SCALE_QUICK["demos"] and quick.dose == [3, 8, 16]
    assert experiment.parse_args([]).out == "runs/experiment"  # the few-shot setting keeps its own


def test_scale_plan_lists_every_step_and_runs_nothing(tmp_path, capsys):
    experiment.main(["--out", str(tmp_path / "run"), *TINY_SCALE, "--seeds", "0,1", "--plan"])
    printed = capsys.readouterr().out
    names = [line.split()[0] for line in printed.splitlines() if "~" in line and "min" in line][:-1]
    assert names[:4] == ["data-videos-raw", "data-videos", "data-demos", "data-probe"]
    assert sorted(set(names)) == sorted(set(SCALE_STEPS) | {n.replace("-s0-", "-s1-") for n in SCALE_STEPS})
    assert "2 side by side" in printed.splitlines()[-1]
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# The job runner and its schedule (no simulator)


def test_run_jobs_respects_deps_and_cores(tmp_path):
    import threading
    import time

    log, lock, busy, most = [], threading.Lock(), [0], [0]

    def job(name, cores=1):
        def fn(steps):
            with lock:
                busy[0] += cores
                most[0] = max(most[0], busy[0])
                log.append(("start", name))
            time.sleep(0.05)
            with lock:
                busy[0] -= cores
                log.append(("end", name))
        return fn

    J = experiment.Job
    jobs = [J("a", job("a")), J("b", job("b"), ["a"]), J("c", job("c")), J("e", job("e", 2), ["b", "c"], cores=2),
            J("d", job("d"), ["e"])]
    experiment.run_jobs(experiment.Steps(tmp_path), jobs, cores=2)
    at = {event: i for i, event in enumerate(log)}
    assert at[("end", "a")] < at[("start", "b")] and at[("end", "e")] < at[("start", "d")]
    assert at[("end", "b")] < at[("start", "e")] and at[("end", "c")] < at[("start", "e")]
    assert most[0] <= 2 and len(log) == 10
    log.clear()
    experiment.run_jobs(experiment.Steps(tmp_path), jobs, cores=1)
    assert [n for e, n in log if e == "start"] == ["a", "b", "c", "e", "d"]  # priority order, one at a time


def test_run_jobs_stops_starting_jobs_after_a_failure(tmp_path):
    ran = []

    def fail(steps):
        sys.exit("experiment.py: error: step 'x' failed")

    J = experiment.Job
    jobs = [J("x", fail), J("y", lambda s: ran.append("y"), ["x"]), J("z", lambda s: ran.append("z"), ["y"])]
    with pytest.raises(SystemExit, match="step 'x' failed"):
        experiment.run_jobs(experiment.Steps(tmp_path), jobs, cores=2)
    assert ran == []
    with pytest.raises(ValueError, match="missing"):
        experiment.run_jobs(experiment.Steps(tmp_path), [J("y", lambda s: None, ["nope"])], cores=1)


def test_schedule_is_the_runner_on_estimates():
    J = experiment.Job
    jobs = [J("a", None), J("b", None, ["a"]), J("c", None), J("e", None, ["b"], cores=2)]
    t = {"a": 10, "b": 5, "c": 7, "e": 4}
    assert experiment.schedule(jobs, t, 2) == 19  # a | c side by side, then b, then e alone on both cores
    assert experiment.schedule(jobs, t, 1) == 26  # one after another


def fake_scale_run(out, args):
    """Known outcomes: AMPLIFY wins every closed-loop episode of the first unseen task and none of the
    others; BC wins none; goal-conditioned BC all. Scores: AMPLIFY's position error is half BC's."""
    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    K = args.dose[-1]
    for seed in args.seeds:
        for m in experiment.SCALE_METHODS:
            win = {t: m == "gcbc" or (m == "amplify" and t == args.unseen_tasks[0]) for t in args.unseen_tasks}
            eps = [{"task": t, "episode": ep, "success": win[t]} for t in args.unseen_tasks
                   for ep in range(args.eval_episodes)]
            write(out / "eval" / experiment.scale_name(K, seed, m) / "results.json",
                  {"complete": True, "episodes": eps})
        for dose in args.dose:
            for name in (f"d{dose}-s{seed}-oracle", f"d{K}-s{seed}-closed-loop-models"):
                errs = {"amplify": [0.1, 0.2, 0.3, 0.4], "bc": [0.2, 0.4, 0.6, 0.4], "gcbc": [0.4, 0.4, 0.4, 1.0]}
                write(out / "scores" / f"{name}.json", {
                    "models": {m: {k: e for k in ["source", *args.unseen_tasks]} for m, e in errs.items()},
                    "windows": {}, "gripper_command": {"negative": 0.25, "zero": 0.25, "positive": 0.5}})


def test_scale_table_pools_seeds_and_splits_position_from_gripper(tmp_path):
    out = tmp_path / "run"
    flags = ["--setting", "zeroshot-scale", "--out", str(out), "--seeds", "0,1", "--eval-episodes", "5"]
    args = experiment.parse_args(flags)
    fake_scale_run(out, args)
    table = experiment.scale_table(args, experiment.Steps(out))
    rows = [line for line in table.splitlines() if line.startswith("|")]
    first = next(r for r in rows if r.startswith("| drawer-open-v3 | drawer-close-v3 |"))
    assert first.split("|")[3:6] == [" 100% (10/10) [72-100] ", " 0% (0/10) [0-28] ", " 100% (10/10) [72-100] "]
    assert first.endswith("| +100 [+100, +100] | 0 [0, 0] |")
    pooled = next(r for r in rows if r.startswith("| all unseen tasks |"))
    # within each seed x task stratum the outcomes agree, so resampling pairs there leaves the mean as it is
    assert "25% (10/40)" in pooled and pooled.endswith("| +25 [+25, +25] | -75 [-75, -75] |")
    assert next(r for r in rows if r.startswith("| window-close-v3 | window-open-v3 |"))
    dose = next(r for r in rows if r.startswith("| 3 (first 3) | none | 25/25/50% |"))
    # position = mean of x, y, z; gripper = the last dimension; AMPLIFY/BC on position; trained tasks all dims
    assert dose.split("|")[4:12] == [" 0.2000 ", " 0.4000 ", " 0.4000 ", " 0.4000 ", " 0.4000 ", " 1.0000 ", " 0.50 ",
                                     " 0.2500 / 0.4000 / 0.5500 "]
    assert any(r.startswith("| 8 (first 8) | drawer-close-v3, ") for r in rows)
    assert any(r.startswith("| 16 (all) |") for r in rows)
    assert "| 3 | faucet-close-v3 | no |" in table and "| 8 | faucet-close-v3 | yes |" in table
    assert "| AMPLIFY | 0.2000 | 0.4000 | 0.2500 |" in table
    assert "| exact | pending |" in table and "seed 0: 5/0/20; seed 1: 5/0/20" in table


def test_scale_table_of_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--setting", "zeroshot-scale", "--out", str(out), "--seeds", "0,1", "--eval-episodes", "5"]
    fake_scale_run(out, experiment.parse_args(flags))
    (out / "steps.json").write_text("{}")
    (out / "eval" / "d16-s1-gcbc" / "results.json").unlink()
    for seed in (0, 1):
        (out / "scores" / f"d8-s{seed}-oracle.json").unlink()
    experiment.main([*flags, "--table"])
    table = capsys.readouterr().out
    assert "Per seed (seeds 0 of 2)" in table and "| 8 (first 8) | pending |" in table
    assert not (out / "results.md").exists()
