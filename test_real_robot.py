"""Tests for real_robot.py without hardware: fake robot, gripper, cameras, policy and clock.

    pytest -q test_real_robot.py

Covers the config checks, the fixed-rate scheduler (fake clock, plus one real-time run), the
safety filter (clamp and refuse), the stops (exception, stale/lost frame, Ctrl-C, overruns),
--dry-run, and --record writing a dataset that amplify.load_dataset reads. The two safety reviews
(issues 17 and 26) have one test per finding at the end, named after it (test_finding<N>_...).
The fake ur-rtde mirrors the installed names (test_fake_rtde_names_exist_in_the_installed_ur_rtde);
what only a real arm can verify is listed in docs/REAL_ROBOT.md.
"""
import _thread
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import real_robot as rr
from conftest import need

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Fakes


class FakeClock:
    """Time moves only when the code under test sleeps or a fake 'computes'."""

    def __init__(self, t=1000.0):
        self.t = t

    def now(self):
        return self.t

    def sleep_until(self, t):
        self.t = max(self.t, t)

    def advance(self, dt):
        self.t += dt


class FakeCamera:
    """A view with a constant colour (so tests can tell views apart) and a moving texture."""

    def __init__(self, clock, value, h=48, w=64):
        self.clock, self.value, self.h, self.w = clock, value, h, w
        self.age = 0.0  # how old the returned frame is
        self.fail = None  # exception to raise from read()
        self.reads = 0

    def read(self):
        if self.fail is not None:
            raise self.fail
        self.reads += 1
        img = np.full((self.h, self.w, 3), self.value, np.uint8)
        x = (4 + self.reads) % (self.w - 8)  # a bright square moving right: something to track
        img[10:18, x:x + 8] = 255
        return rr.Frame(img, self.clock.now() - self.age)

    def close(self):
        pass


class FakeRobot:
    """Follows servo targets exactly; records every command. `state`: what status() reports."""

    def __init__(self, pose=(0.0, -0.5, 0.2, 0.0, 3.14, 0.0)):
        self.pose = np.array(pose, np.float64)
        self.servo_calls, self.moves, self.teach_calls = [], [], []
        self.stops = self.kicks = 0
        self.q, self.tcp, self.payload_kg = list(Q_HOME), list(TCP), 0.9
        self.allowed, self.checked = (lambda pose: True), []  # the controller's own check
        self.state = SimpleNamespace(connected=True, program_running=True, protective_stop=False,
                                     emergency_stop=False, safety_mode=1, speed_scaling=1.0,
                                     timestamp=None)

    def tcp_pose(self):
        return self.pose.copy()

    def joints(self):
        return np.array(self.q)

    def tcp_offset(self):
        return np.array(self.tcp)

    def payload(self):
        return self.payload_kg

    def pose_allowed(self, pose):
        self.checked.append(np.array(pose))
        return self.allowed(pose)

    def status(self):
        return SimpleNamespace(**vars(self.state))

    def kick(self):
        self.kicks += 1

    def servo(self, pose, period):
        self.servo_calls.append(np.array(pose))
        self.pose = np.array(pose, np.float64)

    def move_to(self, pose, speed=None, timeout=None):
        self.moves.append(np.array(pose))
        self.pose = np.array(pose, np.float64)

    def stop(self):
        self.stops += 1

    def teach(self, on):
        self.teach_calls.append(on)

    def close(self):
        pass


class FakeGripper:
    def __init__(self):
        self.commands, self.activations = [], 0

    def activate(self, idle=None):
        self.activations += 1

    def position(self):
        return self.commands[-1] if self.commands else 0.0

    def command(self, g):
        self.commands.append(g)

    def close(self):
        pass


class FakePolicy:
    """The amplify.Policy interface (docs/CONTRACTS.md); `fn(step, images, proprio) -> action`.
    `action_stats`: the action statistics of its training data, by default metres in the test box."""

    def __init__(self, fn, views=("front", "left"), img_size=(32, 32), action_dim=4, clock=None,
                 compute_s=0.0, act_mean=None, act_std=None):
        self.fn, self.views, self.img_size = fn, list(views), img_size
        self.action_dim = self.proprio_dim = action_dim
        rot = [0.0, 3.14, 0.0] if action_dim == 7 else []
        self.action_stats = {
            "mean": np.array(act_mean if act_mean is not None else [0.0, -0.5, 0.2] + rot + [0.5]),
            "std": np.array(act_std if act_std is not None else [0.05] * 3 + [0.1] * len(rot) + [0.5])}
        self.horizon, self.device, self.last_tracks = 16, "cpu", None
        self.clock, self.compute_s = clock, compute_s
        self.calls, self.resets, self.seen = 0, 0, []

    def reset(self):
        self.resets += 1
        self.step = 0

    def act(self, images, proprio, task):
        self.seen.append((images.shape, images.dtype, proprio.copy(), images[:, 0, 0, 0].copy()))
        self.calls += 1
        if self.clock is not None:
            self.clock.advance(self.compute_s)
        a = self.fn(getattr(self, "step", 0), images, proprio)
        self.step = getattr(self, "step", 0) + 1
        return np.asarray(a, np.float32)


class FakeRTDE:
    """The ur-rtde calls UR5 makes, receive and control interface in one object (both are passed
    as `interfaces`); every name exists in the installed ur-rtde (test_fake_rtde_names_exist).
    Asynchronous moveL takes `move_s` seconds of real time; blocking moveL would hold the caller."""

    def __init__(self, pose, move_s=0.05):
        self.pose, self.move_s = list(map(float, pose)), move_s
        self.calls, self.kicks, self.watchdog_hz = [], 0, None
        self._target, self._until = None, None
        self.stamp, self.frozen_after = 0.0, None
        self.allowed, self.checked = (lambda pose: True), []

    # RTDEReceiveInterface
    def getActualTCPPose(self):
        if self._until is not None and time.monotonic() >= self._until:  # the move has ended
            self.pose, self._until = list(self._target), None
        return list(self.pose)

    def isConnected(self):
        return True

    def isProtectiveStopped(self):
        return False

    def isEmergencyStopped(self):
        return False

    def getSafetyMode(self):
        return 1

    def getSpeedScaling(self):
        return 1.0

    def getActualQ(self):
        return list(Q_HOME)

    def getPayload(self):
        return 0.9

    def getTCPOffset(self):
        return list(TCP)

    def isPoseWithinSafetyLimits(self, pose):
        self.checked.append(list(pose))
        return self.allowed(pose)

    def getTimestamp(self):  # the controller's clock: 2 ms a reading, until the data freeze
        if self.frozen_after is None or self.stamp < self.frozen_after:
            self.stamp += 0.002
        return self.stamp

    # RTDEControlInterface
    def isProgramRunning(self):
        return True

    def setWatchdog(self, min_frequency=10.0):
        self.watchdog_hz = min_frequency
        return True

    def kickWatchdog(self):
        self.kicks += 1
        return True

    def moveL(self, pose, speed=0.25, acceleration=1.2, asynchronous=False):
        self.calls.append(("moveL", asynchronous))
        self._target = list(pose)
        if not asynchronous:
            time.sleep(self.move_s)
            self.pose = list(pose)
        else:
            self._until = time.monotonic() + self.move_s
        return True

    def getAsyncOperationProgressEx(self):
        self.getActualTCPPose()
        running = self._until is not None
        return SimpleNamespace(isAsyncOperationRunning=lambda: running)

    def servoL(self, pose, speed, acceleration, time_, lookahead_time, gain):
        self.calls.append(("servoL", list(pose)))
        self.pose = list(pose)
        return True

    def stopL(self, a=10.0, asynchronous=False):
        self.calls.append(("stopL", a))
        self._until = None

    def servoStop(self, a=10.0):
        self.calls.append(("servoStop", a))
        return True

    def teachMode(self):
        self.calls.append(("teachMode",))
        return True

    def endTeachMode(self):
        self.calls.append(("endTeachMode",))
        return True

    def stopScript(self):
        self.calls.append(("stopScript",))

    def disconnect(self):
        pass

TCP = [0.0, 0.0, 0.15, 0.0, 0.0, 0.0]  # flange -> tool point of the fakes' gripper
Q_HOME = [0.0, -1.57, 1.57, -1.57, -1.57, 0.0]  # joints of a gripper-down pose, clear of singularities


def config_dict(**overrides):
    raw = {
        "task": "push the block",
        "robot": {"host": "127.0.0.1", "tcp_offset": TCP, "payload_kg": 0.9},
        "cameras": [
            {"name": "front", "kind": "opencv", "device": 0, "crop": [8, 0, 48, 48]},
            {"name": "left", "kind": "opencv", "device": 1, "rotate": 180},
        ],
        "control": {"rate_hz": 20, "episode_s": 1.0, "max_frame_age_s": 0.2,
                    "max_consecutive_overruns": 3},
        "safety": {"workspace_min": [-0.3, -0.7, 0.05], "workspace_max": [0.3, -0.3, 0.4],
                   "max_step_m": 0.02, "max_step_rad": 0.1, "on_violation": "clamp"},
        "record": {"img_size": [32, 32]},
    }
    for path, value in overrides.items():  # "safety.on_violation"="refuse"
        d = raw
        *parents, key = path.split(".")
        for p in parents:
            d = d[p]
        d[key] = value
    return raw


def rig(cfg=None, clock=None):
    clock = clock or FakeClock()
    cfg = cfg or rr.parse_config(config_dict())
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    return cfg, clock, rr.Hardware(FakeRobot(), FakeGripper(), cams)


def hold(step, images, proprio):  # a policy that asks to stay where it is
    return proprio


# -----------------------------------------------------------------------------
# Config


def test_example_config_loads():
    cfg = rr.load_config(os.path.join(HERE, "real_robot.example.json"))
    assert [c.name for c in cfg.cameras] == ["front", "left", "right"]
    assert cfg.control.rate_hz == 20 and cfg.control.episode_s == 90
    assert cfg.safety.on_violation in ("clamp", "refuse")


@pytest.mark.parametrize("override, delete, needle", [
    ({"safety.max_step_m": "0.02"}, None, "safety.max_step_m: expected a valid number, found str"),
    ({"control.rate_hz": True}, None, "control.rate_hz: expected a valid number, found bool"),
    ({"safety.workspace_min": [0, 0]}, None, "safety.workspace_min: expected a list of at least 3"),
    ({"safety.on_violation": "ignore"}, None, "expected 'clamp' or 'refuse', found str (\"ignore\")"),
    ({"safety.max_stp_m": 0.1}, None, "unknown key 'max_stp_m'"),
    ({}, ("safety", "workspace_max"), "missing key 'safety.workspace_max'"),
    ({}, ("robot", "host"), "missing key 'robot.host'"),
    ({"safety.workspace_min": [0.5, -0.7, 0.05]}, None, "expected workspace_min < workspace_max"),
    ({"cameras": []}, None, "cameras: expected a non-empty list"),
])
def test_config_errors_name_key_expected_found(override, delete, needle):
    raw = config_dict(**override)
    if delete:
        del raw[delete[0]][delete[1]]
    with pytest.raises(rr.ConfigError) as e:
        rr.parse_config(raw)
    assert needle in str(e.value)


def test_cli_bad_config_is_one_line_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config_dict(**{"control.rate_hz": "fast"})))
    r = subprocess.run([sys.executable, os.path.join(HERE, "real_robot.py"), "--config", str(path),
                        "--policy", "x.pt", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "control.rate_hz: expected a valid number, found str" in lines[0]


# -----------------------------------------------------------------------------
# Fixed-rate scheduling


def test_rate_fake_clock_ticks_on_absolute_deadlines():
    clock = FakeClock()
    rate = rr.Rate(20, clock)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(2000):
        starts.append(clock.now())
        clock.advance(rng.uniform(0, 0.9) * rate.period)  # work of random length, always in time
        assert rate.sleep() == 0.0
    k = (np.array(starts) - rate.start) / rate.period
    np.testing.assert_allclose(k, np.arange(2000), atol=1e-6)  # no drift after 2000 ticks


def test_rate_overrun_is_reported_and_missed_deadlines_dropped():
    clock = FakeClock()
    rate = rr.Rate(10, clock)  # period 0.1
    clock.advance(0.05)
    assert rate.sleep() == 0.0  # tick 0 on time -> now 0.1
    clock.advance(0.25)  # tick 1 runs until 0.35: misses 0.2 and 0.3
    late = rate.sleep()
    assert late == pytest.approx(0.15)
    assert clock.now() - rate.start == pytest.approx(0.35)  # no waiting after an overrun
    clock.advance(0.01)
    assert rate.sleep() == 0.0  # the next tick ends on the grid (0.4), no burst to catch up
    assert clock.now() - rate.start == pytest.approx(0.4)


def test_rate_real_time_100_ticks_at_100hz():
    clock = rr.MonotonicClock()
    rate = rr.Rate(100, clock)
    starts = []
    for _ in range(100):
        starts.append(clock.now())
        time.sleep(0.002)  # some work
        rate.sleep()
    end = clock.now()
    mean_period = (end - starts[0]) / 100
    assert abs(mean_period - 0.01) < 0.001, f"mean period {mean_period * 1e3:.2f} ms"
    # no cumulative drift: the loop ends on the deadline grid, whatever the jitter on the way
    assert 0 <= end - (rate.start + (rate.k) * rate.period) < 0.005


# -----------------------------------------------------------------------------
# Safety filter


PREV = np.array([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])


def safety(mode="clamp", start=PREV, **overrides):
    raw = config_dict(**{"safety.on_violation": mode}, **{f"safety.{k}": v for k, v in overrides.items()})
    cfg = rr.parse_config(raw)
    return rr.SafetyFilter(cfg.safety, cfg.period, start)


def run_filter(f, target, n):
    outs, events = zip(*(f.apply(target) for _ in range(n)))
    return np.array(outs), list(events)


def rotate(rotvec, extra):
    """The orientation `rotvec` turned by the rotation vector `extra` (base frame)."""
    from scipy.spatial.transform import Rotation
    return (Rotation.from_rotvec(extra) * Rotation.from_rotvec(rotvec)).as_rotvec()


def test_clamp_keeps_the_box_and_the_speed_limit():
    f = safety("clamp")
    outs, events = run_filter(f, np.array([5.0, 5.0, 5.0, 0, 3.14, 0]), 80)  # far outside, diagonal
    steps = np.linalg.norm(np.diff(np.vstack([PREV, outs])[:, :3], axis=0), axis=1)
    assert all(f.inside(o[:3]) for o in outs) and steps.max() <= 0.02 + 1e-9
    assert set(events) == {"clamped"}
    np.testing.assert_allclose(outs[-1][:3], [0.3, -0.3, 0.4], atol=1e-6)  # the nearest corner
    below = PREV.copy()
    below[2] = 0.0  # under the table: z_min = 0.05
    outs, events = run_filter(safety("clamp"), below, 80)
    assert set(events) == {"clamped"} and outs[:, 2].min() == pytest.approx(0.05)
    # a reachable target: no event, reached
    target = PREV + [0.01, 0, 0, 0, 0, 0]
    outs, events = run_filter(safety("clamp"), target, 30)
    assert events == [None] * 30 and np.allclose(outs[-1], target, atol=1e-9)


def test_clamp_limits_rotation_speed_and_cone():
    f = safety("clamp")
    target = PREV.copy()
    target[3:] = rotate(PREV[3:], [0, 0, 1.5])  # 1.5 rad about z: beyond the 0.8 rad cone
    outs, events = run_filter(f, target, 80)
    poses = np.vstack([PREV, outs])
    turns = [rr.rotation_angle(a, b) for a, b in zip(poses[1:, 3:], poses[:-1, 3:])]
    assert max(turns) <= 0.1 + 1e-6 and set(events) == {"clamped"}
    assert rr.rotation_angle(outs[-1][3:], PREV[3:]) == pytest.approx(0.8, abs=1e-6)
    np.testing.assert_allclose(outs[:, :3], np.tile(PREV[:3], (80, 1)))  # the position is held


def test_smooth_motion_is_followed_exactly_and_a_far_goal_reached_without_overshoot():
    f = safety("clamp")  # 20 Hz, 0.4 m/s, 1.5 m/s^2, 1 s ramp-in
    k = np.arange(1, 201)
    x = 0.2 * np.sin(1.5 * k * 0.05)  # peak 0.3 m/s, 0.45 m/s^2: within every limit
    outs = np.array([f.apply(PREV + [xi, 0, 0, 0, 0, 0])[0] for xi in x])
    assert np.abs(outs[40:, 0] - x[40:]).max() < 1e-9  # after the ramp-in: no lag at all
    f = safety("clamp")
    outs, _ = run_filter(f, PREV + [0.2, 0, 0, 0, 0, 0], 60)
    assert outs[:, 0].max() - 0.2 < 1e-3 and abs(outs[-1, 0] - 0.2) < 1e-9  # braked in time


def test_refuse_holds_previous_command():
    f = safety("refuse")
    out, event = f.apply(PREV + [0.1, 0, 0, 0, 0, 0])  # inside the box, too far for one tick
    assert event == "refused" and np.allclose(out, PREV)
    prev = PREV.copy()
    prev[0] = 0.295
    outside = prev.copy()
    outside[0] = 0.31  # one small step, but it leaves the box
    out, event = safety("refuse", start=prev).apply(outside)
    assert event == "refused" and np.allclose(out, prev)
    target = PREV + [0.005, 0, 0, 0, 0, 0]
    outs, events = run_filter(safety("refuse"), target, 20)
    assert events == [None] * 20 and np.allclose(outs[-1], target, atol=1e-9)


def test_non_finite_target_stops():
    with pytest.raises(rr.SafetyStop):
        safety().apply(PREV + [np.nan, 0, 0, 0, 0, 0])


# -----------------------------------------------------------------------------
# Cameras and images


def test_prepare_image_crop_rotate_resize():
    img = np.zeros((48, 64, 3), np.uint8)
    img[0, 8] = 255  # top-left corner of the crop
    cam = rr.CameraConfig(name="front", kind="opencv", device=0, crop=[8, 0, 48, 48], rotate=180)
    out = rr.prepare_image(img, cam, (48, 48))
    assert out.shape == (48, 48, 3) and out[47, 47, 0] == 255  # rotated to the bottom-right
    assert rr.prepare_image(img, cam, (32, 32)).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        rr.prepare_image(img, rr.CameraConfig(name="f", kind="opencv", device=0, crop=[40, 0, 48, 48]),
                         (32, 32))


def test_threaded_camera_stamps_frames_and_reports_loss():
    n, unplug = {"i": 0}, threading.Event()

    def grab():
        n["i"] += 1
        if unplug.is_set() and n["i"] > 5:  # only once a frame was read: no race on a busy CPU
            raise OSError("device unplugged")
        time.sleep(0.002)
        return np.zeros((4, 4, 3), np.uint8)
    cam = rr.ThreadedCamera("front", grab)
    try:
        rr.wait_for_cameras({"front": cam}, timeout=2.0)
        assert 0 <= time.monotonic() - cam.read().stamp < 2.0
        unplug.set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                frame = cam.read()
                assert 0 <= time.monotonic() - frame.stamp < 2.0
            except rr.CameraLost as e:
                assert "device unplugged" in str(e)
                break
            time.sleep(0.005)
        else:
            pytest.fail("the lost camera was never reported")
    finally:
        cam.close()


# -----------------------------------------------------------------------------
# Control loop


def test_episode_runs_at_rate_within_limits_and_stops_at_the_end():
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"control.episode_s": 3.0})))  # 60 ticks
    # ask for a big jump every step: each step <= max_step_m, each change of step <= max_accel
    policy = FakePolicy(lambda s, im, p: [0.2, -0.4, 0.3, 1.0], views=("left", "front"),
                        clock=clock, compute_s=0.01)
    res = rr.run_episode(policy, hw, cfg, "push the block", clock=clock)
    assert res.steps == 60 and len(hw.robot.servo_calls) == 60
    assert hw.robot.stops == 1
    poses = np.array([[0.0, -0.5, 0.2, 0.0, 3.14, 0.0]] + hw.robot.servo_calls)
    steps = np.diff(poses[:, :3], axis=0)
    assert np.linalg.norm(steps, axis=1).max() <= 0.02 + 1e-9
    assert np.linalg.norm(np.diff(steps, axis=0), axis=1).max() <= 1.5 * 0.05 ** 2 + 1e-9
    assert np.allclose(poses[:, 3:], [0.0, 3.14, 0.0])  # xyz_gripper holds the start orientation
    # 0.245 m away: clamped while farther than one step, then reached and held
    events = [e["event"] for e in res.log]
    far = [np.linalg.norm(np.array([0.2, -0.4, 0.3]) - p[:3]) > 0.02 for p in poses[:-1]]
    assert events == ["clamped" if f else None for f in far] and events[-1] is None
    assert np.allclose(hw.robot.servo_calls[-1][:3], [0.2, -0.4, 0.3])
    assert hw.gripper.commands == [1.0] and hw.gripper.activations == 1  # sent once: unchanged
    # views reach the policy in the policy's order, at its size, uint8 (V, H, W, 3)
    shape, dtype, proprio, colour = policy.seen[-1]
    assert shape == (2, 32, 32, 3) and dtype == np.uint8 and proprio.shape == (4,)
    assert colour.tolist() == [150, 50]
    # ticks on the grid: t = k * period exactly (fake clock), latency logged
    assert [e["t"] for e in res.log] == pytest.approx([k * 0.05 for k in range(60)])
    assert all(e["latency_ms"] == pytest.approx(10.0) for e in res.log)
    assert "overruns 0" in rr.latency_summary(res.log, cfg.period)


def test_refuse_mode_holds_position():
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"safety.on_violation": "refuse"})))
    res = rr.run_episode(FakePolicy(lambda s, im, p: [0.2, -0.4, 0.3, 0.0]), hw, cfg, "t", clock=clock)
    assert all(e["event"] == "refused" for e in res.log)
    assert all(np.allclose(p, [0.0, -0.5, 0.2, 0.0, 3.14, 0.0]) for p in hw.robot.servo_calls)


def test_dry_run_sends_no_motion():
    cfg = rr.parse_config(config_dict(**{"robot.home": [0.0, -0.45, 0.25, 0.0, 3.14, 0.0]}))
    cfg, clock, hw = rig(cfg)
    res = rr.run_episode(FakePolicy(lambda s, im, p: p + [0.01, 0, 0, 1.0]), hw, cfg, "t",
                         clock=clock, dry_run=True)
    assert res.steps == 20 and all("target" in e for e in res.log)
    assert hw.robot.servo_calls == [] and hw.robot.moves == [] and hw.gripper.commands == []


def test_should_end_ends_the_episode_early_and_stops():
    cfg, clock, hw = rig()
    res = rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock,
                         should_end=lambda: len(hw.robot.servo_calls) >= 7)
    assert res.steps == 7 and hw.robot.stops == 1


def test_home_pose_is_reached_before_the_episode():
    home = [0.0, -0.45, 0.25, 0.0, 3.14, 0.0]
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"robot.home": home})))
    rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock, max_steps=2)
    assert len(hw.robot.moves) == 1 and np.allclose(hw.robot.servo_calls[0], home)


def failing_at(step, exc):
    def fn(s, im, p):
        if s == step:
            raise exc
        return p
    return fn


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error"), KeyboardInterrupt()])
def test_exception_or_ctrl_c_stops_the_robot(exc):
    cfg, clock, hw = rig()
    with pytest.raises(type(exc)):
        rr.run_episode(FakePolicy(failing_at(3, exc)), hw, cfg, "t", clock=clock)
    assert len(hw.robot.servo_calls) == 3 and hw.robot.stops == 1


def test_stale_frame_stops_the_robot():
    cfg, clock, hw = rig()
    cams = hw.cameras

    def fn(s, im, p):
        if s == 4:
            cams["left"].age = 0.25  # > max_frame_age_s 0.2: the camera froze
        return p
    with pytest.raises(rr.StaleFrame, match="camera 'left'"):
        rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    assert len(hw.robot.servo_calls) == 5 and hw.robot.stops == 1


def test_lost_camera_stops_the_robot():
    cfg, clock, hw = rig()

    def fn(s, im, p):
        if s == 2:
            hw.cameras["front"].fail = rr.CameraLost("camera 'front' lost: unplugged")
        return p
    with pytest.raises(rr.CameraLost):
        rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    assert hw.robot.stops == 1


def test_overrun_budget_stops_the_robot():
    cfg, clock, hw = rig()  # max_consecutive_overruns = 3
    policy = FakePolicy(hold, clock=clock, compute_s=0.03)
    rr.run_episode(policy, hw, cfg, "t", clock=clock, max_steps=10)  # 30 ms of 50: fine
    policy.compute_s = 0.06  # slower than the 50 ms period
    with pytest.raises(rr.OverrunBudget, match="3 consecutive overruns"):
        rr.run_episode(policy, hw, cfg, "t", clock=clock)
    assert hw.robot.stops == 2


def test_real_ctrl_c_interrupts_the_loop_and_stops_the_robot():
    """A real asynchronous KeyboardInterrupt (as from Ctrl-C) lands in the middle of the loop."""
    cfg, _, hw = rig(clock=None)
    clock = rr.MonotonicClock()
    for cam in hw.cameras.values():
        cam.clock = clock
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)  # 1 s episode
    timer.cancel()
    assert time.monotonic() - t0 < 0.9 and hw.robot.stops == 1 and hw.robot.servo_calls


# -----------------------------------------------------------------------------
# Command line with injected hardware


def write_cfg(tmp_path, **overrides):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_dict(**overrides)))
    return str(path)


def test_main_dry_run_logs_every_step(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    policy = FakePolicy(lambda s, im, p: p + [0.01, 0, 0, 0], clock=clock, compute_s=0.005)
    log = tmp_path / "steps.jsonl"
    code = rr.main(["--config", cfg_path, "--dry-run", "--episodes", "2", "--log", str(log)],
                   hardware=lambda cfg, mode: hw if mode == "read" else pytest.fail(mode),
                   policy=policy, clock=clock)
    assert code == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 40 and all(e["latency_ms"] == pytest.approx(5.0) for e in entries)
    assert hw.robot.servo_calls == [] and policy.resets >= 2
    assert "(dry run): steps 20" in capsys.readouterr().err


def test_main_reports_stops_in_one_line(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    code = rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock,
                   policy=FakePolicy(failing_at(2, KeyboardInterrupt()), clock=clock))
    assert code == 130 and hw.robot.stops == 1
    hw.cameras["left"].age = 1.0
    code = rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock, policy=FakePolicy(hold))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("stopped: stale frame from camera 'left'")


def test_main_rejects_a_policy_that_does_not_match_the_config(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    assert rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock,
                   policy=FakePolicy(hold, views=("front", "wrist"))) == 1
    assert "expected views ['front', 'wrist']" in capsys.readouterr().err
    assert rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock,
                   policy=FakePolicy(hold, action_dim=7)) == 1
    assert hw.robot.servo_calls == []


# -----------------------------------------------------------------------------
# Recording


class TeleopRobot(FakeRobot):
    """Moved by someone else: the pose follows a smooth path in (fake) time."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.t0 = clock, clock.now()

    def tcp_pose(self):
        t = self.clock.now() - self.t0
        return np.array([0.1 * t, -0.5, 0.2 + 0.05 * t, 0.0, 3.14, 0.0])


@pytest.fixture(scope="module")
def robot_demos(tmp_path_factory):
    """Two 1 s teleoperated episodes recorded through preprocess.py (LK tracker) at 64x64."""
    need("cv2")  # the "lk" tracker of preprocess.py
    cfg = rr.parse_config(config_dict(**{"record.img_size": [64, 64]}))  # 20 frames an episode
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    hw = rr.Hardware(TeleopRobot(clock), FakeGripper(), cams)
    out = tmp_path_factory.mktemp("rec") / "robot_demos"
    rr.record(hw, cfg, str(out), "push the block", episodes=2, tracker="lk", clock=clock,
              kinesthetic=True)
    assert hw.robot.teach_calls == [True, False] and hw.robot.servo_calls == []
    return str(out), cfg, clock, cams


def test_record_with_and_without_actions_writes_a_dataset_amplify_loads(robot_demos, tmp_path):
    import amplify

    out, cfg, clock, cams = robot_demos
    ds = amplify.load_dataset(out)
    assert ds.num_episodes == 2 and ds.tasks == ["push the block"] * 2
    assert ds.meta["views"] == ["front", "left"] and ds.meta["fps"] == 20
    images, proprio, actions = (np.asarray(ds.arrays[k]) for k in ("images", "proprio", "actions"))
    assert images.shape == (40, 2, 64, 64, 3) and images.dtype == np.uint8
    assert ds.arrays["tracks"].shape[:3] == (40, 2, 16)
    assert proprio.shape == (40, 4) and actions.shape == (40, 4)
    s, e = ds.episode_range(0)
    np.testing.assert_allclose(actions[s:e - 1], proprio[s + 1:e], atol=1e-6)  # a_t = pose at t+1
    np.testing.assert_allclose(actions[e - 1], proprio[e - 1], atol=1e-6)
    assert proprio[1, 0] - proprio[0, 0] == pytest.approx(0.1 * 0.05, abs=1e-6)  # 20 Hz samples

    # human demonstrations: cameras only, no robot at all
    human = rr.Hardware(None, None, cams)
    out = tmp_path / "human_demos"
    rr.record(human, cfg, str(out), "push the block", episodes=1, with_actions=False,
              tracker="lk", clock=clock)
    ds = amplify.load_dataset(str(out))
    assert ds.num_episodes == 1 and ds.arrays["images"].shape[0] == 20
    assert ds.meta["source"] == "real_human"
    assert "actions" not in ds.arrays or np.isnan(np.asarray(ds.arrays["actions"])).all()


@pytest.mark.parametrize("head", ["gaussian", "diffusion"])  # the paper's real robot runs the diffusion head
def test_policy_trained_on_recorded_demos_runs_in_the_loop(robot_demos, tmp_path, head):
    """record -> amplify.py (inverse only, 1 step: the fastest real Policy) -> real_robot.main."""
    out, _, _, _ = robot_demos
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(HERE, "amplify.py"), "--stage", "inverse",
                        "--no-codes", "--data", out, "--out", str(run), "--steps", "1",
                        "--batch-size", "2", "--device", "cpu", "--action-head", head,
                        "--diffusion-sample-steps", "4"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg_path = write_cfg(tmp_path)
    for dry_run in (True, False):
        _, clock, hw = rig()
        log = tmp_path / f"steps_{dry_run}.jsonl"
        argv = ["--config", cfg_path, "--policy", str(run), "--device", "cpu",
                "--max-steps", "4", "--log", str(log)] + (["--dry-run"] if dry_run else ["--yes"])
        assert rr.main(argv, hardware=hw, clock=clock) == 0
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(entries) == 4 and all(np.isfinite(e["target"]).all() for e in entries)
        assert len(hw.robot.servo_calls) == (0 if dry_run else 4) and hw.robot.stops == 1
        prev = np.array([0.0, -0.5, 0.2])
        for pose in hw.robot.servo_calls:  # whatever the untrained policy says, within limits
            assert np.linalg.norm(pose[:3] - prev) <= 0.02 + 1e-9
            prev = pose[:3]


def fake_preprocess(monkeypatch):
    """Stand in for preprocess.episodes_to_dataset; returns the dict it fills with what it was given."""
    written = {}

    class FakePreprocess:
        @staticmethod
        def episodes_to_dataset(episodes, out, **kw):
            written.update(episodes=list(episodes), out=out, **kw)
            return {"episodes": len(written["episodes"])}
    monkeypatch.setitem(sys.modules, "preprocess", FakePreprocess)
    return written


def test_record_ctrl_c_keeps_completed_episodes(tmp_path, monkeypatch):
    cfg = rr.parse_config(config_dict())
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    hw = rr.Hardware(TeleopRobot(clock), FakeGripper(), cams)
    written = fake_preprocess(monkeypatch)

    def wait_start(i):
        if i == 2:
            raise KeyboardInterrupt
    summary = rr.record(hw, cfg, str(tmp_path / "out"), "t", episodes=5, clock=clock,
                        wait_start=wait_start)
    assert summary == {"episodes": 2} and written["views"] == ["front", "left"]
    assert written["fps"] == 20 and written["source"] == "real_robot"
    ep = written["episodes"][0]
    assert ep["images"].shape == (20, 2, 32, 32, 3) and ep["task"] == "t"


@pytest.mark.parametrize("flags, mode, source", [
    ([], "read", "real_robot"),  # teleoperation: the robot is read, never commanded
    (["--kinesthetic"], "control", "real_robot"),  # freedrive needs the control interface
    (["--no-actions"], None, "real_human"),  # human demonstrations: no robot at all
])
def test_main_record_opens_only_what_it_needs(tmp_path, monkeypatch, flags, mode, source):
    cfg_path = write_cfg(tmp_path)
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    opened = []

    def hardware(cfg, robot_mode):
        opened.append(robot_mode)
        robot = TeleopRobot(clock) if robot_mode else None
        return rr.Hardware(robot, FakeGripper() if robot_mode else None, cams)
    written = fake_preprocess(monkeypatch)
    code = rr.main(["--config", cfg_path, "--record", str(tmp_path / "out"), "--episodes", "2",
                    "--tracker", "lk"] + flags, hardware=hardware, clock=clock, interactive=False)
    assert code == 0 and opened == [mode]
    assert written["source"] == source and written["tracker"] == "lk" and len(written["episodes"]) == 2
    assert ("actions" in written["episodes"][0]) == (mode is not None)


def test_main_rejects_conflicting_flags(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path)
    for argv in (["--record", "out", "--policy", "p.pt"], ["--no-actions", "--policy", "p.pt"],
                 ["--record", "out", "--no-actions", "--kinesthetic"], []):
        assert rr.main(["--config", cfg_path] + argv, hardware=pytest.fail) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "expected" in err[0] and "found" in err[0]


# -----------------------------------------------------------------------------
# The safety review (issue 17): one test per reproduced scenario, in its order


class FlippingRobot(FakeRobot):
    """Holds a gripper-down orientation, a half turn about y. As UR does, it reports rotation
    vectors with angles in [0, pi]; the wrist jitters by 2 mrad, so the reported vector jumps
    between about [0, pi, 0] and [0, -pi, 0] from one reading to the next."""

    def __init__(self, pose=(0.0, -0.5, 0.2, 0.0, 3.1416, 0.0)):
        super().__init__(pose)
        self.reads = 0

    def tcp_pose(self):
        from scipy.spatial.transform import Rotation
        self.reads += 1
        jitter = Rotation.from_rotvec([0.0, 0.002 if self.reads % 2 else -0.002, 0.0])
        rot = (Rotation.from_rotvec(self.pose[3:]) * jitter).as_rotvec()  # angle in [0, pi]
        return np.concatenate([self.pose[:3], rot])


HOME_DOWN = [0.0, -0.5, 0.2, 0.0, 3.1416, 0.0]


def test_wrist_near_pi_rotation_vectors_continuous_and_orientation_limited():
    cfg = rr.parse_config(config_dict(**{"control.action": "xyz_rotvec_gripper", "robot.home": HOME_DOWN}))
    _, clock, hw = rig(cfg)
    hw.robot = FlippingRobot()
    assert np.sign(hw.robot.tcp_pose()[4]) != np.sign(hw.robot.tcp_pose()[4])  # the raw readings flip
    seen = []

    def averaging(s, im, p):  # what a regression on the recorded rotation vectors converges to
        seen.append(p[3:6].copy())
        return np.concatenate([p[:3], np.mean(seen, axis=0), [0.0]])
    policy = FakePolicy(averaging, action_dim=7)
    rr.run_episode(policy, hw, cfg, "t", clock=clock)
    seen = np.array(seen)
    assert np.abs(np.diff(seen, axis=0)).max() < 0.01  # continuous: no jump between +pi and -pi
    turns = [rr.rotation_angle(c[3:], HOME_DOWN[3:]) for c in hw.robot.servo_calls]
    assert max(turns) < 0.01  # the wrist holds (it turned 2 rad towards the identity before)

    # a policy that asks for the identity rotation gets no more than the cone around home
    _, clock, hw = rig(cfg)
    hw.robot = FlippingRobot()
    rr.run_episode(FakePolicy(lambda s, im, p: np.r_[p[:3], 0, 0, 0, 0], action_dim=7), hw, cfg, "t",
                   clock=clock, max_steps=60)
    turns = [rr.rotation_angle(c[3:], HOME_DOWN[3:]) for c in hw.robot.servo_calls]
    assert max(turns) == pytest.approx(0.8, abs=1e-6)  # safety.max_rot_from_home_rad

    # recording: proprio and actions continuous too, on the same reference (robot.home)
    clock = FakeClock()
    rec = rr.Hardware(FlippingRobot(), FakeGripper(), {"front": FakeCamera(clock, 50),
                                                       "left": FakeCamera(clock, 150)})
    ep = rr.record_episode(rec, cfg, clock=clock)
    for key in ("proprio", "actions"):
        rot = ep[key][:, 3:6]
        assert np.abs(np.diff(rot, axis=0)).max() < 0.01 and np.allclose(rot[:, 1], 3.1416, atol=0.01)


def test_alternating_policy_gets_bounded_acceleration_and_a_soft_start():
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"control.episode_s": 3.0})))
    flip = lambda s, im, p: p + [0.02 if s % 2 == 0 else -0.02, 0, 0, 0]  # +0.4 / -0.4 m/s
    rr.run_episode(FakePolicy(flip), hw, cfg, "t", clock=clock)
    x = np.array([0.0] + [c[0] for c in hw.robot.servo_calls])
    v = np.diff(x) / cfg.period  # commanded velocity, m/s
    accel = np.abs(np.diff(np.r_[0.0, v])) / cfg.period  # from rest
    assert accel.max() <= 1.5 + 1e-6  # safety.max_accel (it was 16 m/s^2)
    assert np.abs(v).max() < 0.1
    # ramp-in: a policy asking for full speed gets a gentle start
    cfg, clock, hw = rig()
    rr.run_episode(FakePolicy(lambda s, im, p: p + [0.02, 0, 0, 0]), hw, cfg, "t", clock=clock)
    x = np.array([0.0] + [c[0] for c in hw.robot.servo_calls])
    dv = 1.5 * cfg.period ** 2  # max_accel as a change of the per-tick step
    assert np.diff(x)[0] <= dv + 1e-9 and np.abs(np.diff(x, 2)).max() <= dv + 1e-9


@pytest.mark.parametrize("mean, std", [
    ([0.0, 0.0, 0.0, 0.0], [0.6, 0.6, 0.6, 0.6]),  # normalized actions in [-1, 1]
    ([0.0, 0.0, 0.0, 0.5], [0.004, 0.004, 0.004, 0.5]),  # deltas of position per step
    ([0.0, -0.5, 0.2, 0.5], [2.0, 0.05, 0.05, 0.5]),  # x spread far wider than the box
])
def test_policy_trained_in_other_units_is_refused(tmp_path, capsys, mean, std):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    policy = FakePolicy(lambda s, im, p: [0.3, -0.3, 0.4, 1.0], act_mean=mean, act_std=std)
    assert rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock, policy=policy) == 1
    assert "expected actions in metres inside the workspace" in capsys.readouterr().err
    assert hw.robot.servo_calls == [] and hw.robot.moves == []
    # the layout stored by a recording must match the config's
    policy = FakePolicy(hold)
    policy.action_layout = "xyz_rotvec_gripper"
    assert rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock, policy=policy) == 1
    assert "expected the policy's action layout 'xyz_rotvec_gripper'" in capsys.readouterr().err


def test_homing_checked_asynchronous_and_interruptible():
    home = [0.0, -0.45, 0.25, 0.0, 3.14, 0.0]
    cfg = rr.parse_config(config_dict(**{"robot.home": home}))
    # 1. the start is outside the workspace: moveL's straight line could leave it; no move at all
    _, clock, hw = rig(cfg)
    hw.robot.pose[0] = 0.5
    with pytest.raises(rr.SafetyStop, match="outside the workspace"):
        rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)
    assert hw.robot.moves == [] and hw.robot.servo_calls == [] and hw.robot.stops == 1

    # 2. the move ends short of home (blocked, stopped on the pendant): the episode does not start
    class Blocked(FakeRobot):
        def move_to(self, pose, speed=None, timeout=None):
            super().move_to(pose, speed, timeout)
            self.pose[2] -= 0.03
    _, clock, hw = rig(cfg)
    hw.robot = Blocked()
    with pytest.raises(rr.SafetyStop, match="homing ended 30.0 mm"):
        rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)
    assert hw.robot.servo_calls == [] and hw.robot.stops == 1

    # 3. ur-rtde: moveL asynchronous, the watchdog fed while it runs, Ctrl-C ends it with stopL
    rtde = FakeRTDE([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])
    _, clock, hw = rig(cfg)
    hw.robot = rr.UR5(cfg.robot, interfaces=(rtde, rtde), watchdog_hz=5.0)
    rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock, max_steps=2)  # a 50 ms move
    assert rtde.calls[0] == ("moveL", True)
    assert [c[0] for c in rtde.calls[1:]] == ["servoL"] * 2 + ["servoStop"]
    rtde.pose, rtde.move_s, rtde.calls = [0.0, -0.5, 0.2, 0.0, 3.14, 0.0], 30.0, []  # a long move
    kicks = rtde.kicks
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)
    timer.cancel()
    assert time.monotonic() - t0 < 5.0 and rtde.calls == [("moveL", True), ("stopL", 2.0)]
    assert rtde.kicks > kicks  # fed while the move ran


def test_moving_the_arm_without_a_terminal_needs_yes(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    code = rr.main(["--config", cfg_path, "--episodes", "3"], hardware=pytest.fail, clock=clock,
                   policy=FakePolicy(hold), interactive=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--yes" in err[0]
    assert rr.main(["--config", cfg_path, "--episodes", "2", "--yes"], hardware=hw, clock=clock,
                   policy=FakePolicy(hold), interactive=False) == 0
    assert len(hw.robot.servo_calls) == 40


def test_fake_rtde_names_exist_in_the_installed_ur_rtde():
    rtde_control, rtde_receive = need("rtde_control"), need("rtde_receive")
    names = [n for n in vars(FakeRTDE) if not n.startswith("_")]
    missing = [n for n in names if not hasattr(rtde_control.RTDEControlInterface, n)
               and not hasattr(rtde_receive.RTDEReceiveInterface, n)]
    assert not missing
    assert hasattr(rtde_control.AsyncOperationStatus, "isAsyncOperationRunning")


def test_watchdog_armed_and_kicked_every_tick():
    cfg, clock, hw = rig()
    rtde = FakeRTDE([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])
    hw.robot = rr.UR5(cfg.robot, interfaces=(rtde, rtde), watchdog_hz=cfg.control.rate_hz / rr.WATCHDOG_TICKS)
    assert rtde.watchdog_hz == 5.0
    res = rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)
    assert rtde.kicks >= res.steps == 20


@pytest.mark.parametrize("signame", ["SIGHUP", "SIGQUIT", "SIGTERM"])
def test_hangup_and_quit_signals_stop_the_robot(signame):
    import signal
    sig = getattr(signal, signame)
    cfg, clock, hw = rig()
    previous = rr.install_stop_signals()
    try:
        def fn(s, im, p):
            if s == 3:
                os.kill(os.getpid(), sig)  # an SSH session dropping sends SIGHUP
            return p
        with pytest.raises(KeyboardInterrupt):
            rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert len(hw.robot.servo_calls) == 3 and hw.robot.stops == 1


@pytest.mark.parametrize("field, value, needle", [
    ("connected", False, "connection lost"),
    ("protective_stop", True, "safety stop"),
    ("safety_mode", 5, "safety mode 5"),
    ("program_running", False, "control script is not running"),
    ("speed_scaling", 0.5, "speed scaling 0.50 < control.min_speed_scaling"),
])
def test_robot_state_is_checked_every_tick(field, value, needle):
    cfg, clock, hw = rig()

    def fn(s, im, p):
        if s == 2:
            setattr(hw.robot.state, field, value)
        return p
    with pytest.raises(rr.SafetyStop, match=needle):
        rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    assert len(hw.robot.servo_calls) == 3 and hw.robot.stops == 1


def test_tracking_error_stops_and_the_log_holds_measured_pose_and_raw_action():
    class Slowed(FakeRobot):  # the speed slider down, or the arm held: it covers a tenth of each step
        def servo(self, pose, period):
            self.servo_calls.append(np.array(pose))
            self.pose = self.pose + 0.1 * (np.array(pose) - self.pose)
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"control.episode_s": 5.0})))
    hw.robot = Slowed()
    log = []
    policy = FakePolicy(lambda s, im, p: [0.25, -0.5, 0.2, 0.0])  # 0.25 m to the right
    with pytest.raises(rr.SafetyStop, match="tracking error"):
        rr.run_episode(policy, hw, cfg, "t", clock=clock, on_step=log.append)
    assert 20 < log[-1]["tracking_mm"] <= 80 and hw.robot.stops == 1
    assert log[-1]["action"] == pytest.approx([0.25, -0.5, 0.2, 0.0])
    assert log[-1]["measured"] == pytest.approx(list(hw.robot.pose), abs=0.05)  # before the last servo
    assert np.linalg.norm(hw.robot.pose[:3] - hw.robot.servo_calls[-1][:3]) > 0.06


def test_finding10_a_stall_stops_the_loop_before_its_command_goes_out():
    cfg, clock, hw = rig()

    def fn(s, im, p):
        if s == 3:
            clock.advance(5.0)  # the policy hangs for 5 s once
        return p + [0.01, 0, 0, 0]
    with pytest.raises(rr.OverrunBudget, match="stalled: a tick was about to command 4950 ms late"):
        rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    # the command computed from the 5 s old images was sent before; now it is not
    assert len(hw.robot.servo_calls) == 3 and len(hw.gripper.commands) <= 3 and hw.robot.stops == 1


def test_a_high_overrun_rate_stops_the_loop():
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"control.episode_s": 3.0})))

    def fn(s, im, p):
        clock.advance(0.09 if s % 2 == 0 else 0.005)  # late every other tick, never twice in a row
        return p
    with pytest.raises(rr.OverrunBudget, match="of the last"):
        rr.run_episode(FakePolicy(fn), hw, cfg, "t", clock=clock)
    assert len(hw.robot.servo_calls) <= 12 and hw.robot.stops == 1


class FlakyGripper(FakeGripper):
    """Times out on the `fail_at`-th read (a socket that stopped answering)."""

    def __init__(self, fail_at):
        super().__init__()
        self.reads, self.fail_at = 0, fail_at

    def position(self):
        self.reads += 1
        if self.reads >= self.fail_at:
            raise TimeoutError("timed out")
        return 0.0


def test_recording_keeps_completed_episodes_on_disk_whatever_stops_it(tmp_path, monkeypatch):
    cfg = rr.parse_config(config_dict())
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    hw = rr.Hardware(TeleopRobot(clock), FlakyGripper(fail_at=2 * 20 + 5), cams)  # in episode 3
    written = fake_preprocess(monkeypatch)
    out = str(tmp_path / "demos")
    with pytest.raises(TimeoutError):
        rr.record(hw, cfg, out, "t", episodes=5, clock=clock)
    files = sorted(os.listdir(out + ".episodes"))
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # saved as they ended
    assert len(written["episodes"]) == 2 and written["out"] == out  # and the dataset built from them
    assert written["episodes"][1]["images"].shape == (20, 2, 32, 32, 3)
    assert written["extra_meta"] == {"action_layout": "xyz_gripper"}


def test_recording_refuses_an_existing_recording_unless_append_or_overwrite(tmp_path, monkeypatch, capsys):
    cfg_path = write_cfg(tmp_path)
    out = tmp_path / "demos"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # someone's dataset
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    hardware = lambda cfg, mode: rr.Hardware(TeleopRobot(clock), FakeGripper(), cams)
    written = fake_preprocess(monkeypatch)
    argv = ["--config", cfg_path, "--record", str(out), "--tracker", "lk"]
    assert rr.main(argv + ["--episodes", "1"], hardware=pytest.fail, interactive=False) == 2
    assert "--append adds episodes to it, --overwrite replaces it" in capsys.readouterr().err
    assert (out / "meta.json").read_text() == "{}"
    assert rr.main(argv + ["--append", "--episodes", "1"], hardware=hardware, clock=clock,
                   interactive=False) == 0 and len(written["episodes"]) == 1
    assert rr.main(argv + ["--append", "--episodes", "2"], hardware=hardware, clock=clock,
                   interactive=False) == 0 and len(written["episodes"]) == 3
    assert rr.main(argv + ["--overwrite", "--episodes", "1"], hardware=hardware, clock=clock,
                   interactive=False) == 0 and len(written["episodes"]) == 1
    assert len(os.listdir(str(out) + ".episodes")) == 1  # the earlier episodes went with the old dataset


@pytest.mark.parametrize("override, needle", [
    ({"robot.stop_decel": -1}, "robot.stop_decel: expected a number >= 0.5, found int (-1)"),
    ({"robot.servo_gain": 5000}, "robot.servo_gain: expected a number <= 2000"),
    ({"robot.servo_lookahead_s": 2.0}, "robot.servo_lookahead_s: expected a number <= 0.2"),
    ({"control.rate_hz": 500, "safety.max_step_m": 0.5}, "safety.max_step_m: expected at most 1.0 m/s"),
    ({"safety.max_step_rad": 0.5}, "safety.max_step_rad: expected at most 3.14 rad/s"),
    ({"safety.max_accel": 50}, "safety.max_accel: expected a number <= 3"),
    ({"control.rate_hz": float("nan")}, "control.rate_hz: expected a finite number"),
    ({"control.max_overrun_fraction": 0}, "control.max_overrun_fraction: expected a number > 0"),
    ({"control.max_consecutive_overruns": 2.0}, "expected a valid integer"),
    ({"gripper": {"port": 70000}}, "gripper.port: expected a number <= 65535"),
])
def test_every_config_number_has_a_range(override, needle):
    with pytest.raises(rr.ConfigError, match=".*".join(map(__import__("re").escape, needle.split(".*")))):
        rr.parse_config(config_dict(**override))


def test_duplicate_config_keys_and_bad_max_steps_are_refused(tmp_path, capsys):
    text = json.dumps(config_dict())
    dup = text.replace('"max_step_m": 0.02', '"max_step_m": 0.02, "max_step_m": 0.2')
    path = tmp_path / "dup.json"
    path.write_text(dup)
    with pytest.raises(rr.ConfigError, match="duplicate key 'max_step_m'"):
        rr.load_config(str(path))
    cfg_path = write_cfg(tmp_path)
    assert rr.main(["--config", cfg_path, "--yes", "--max-steps", "0"], hardware=pytest.fail,
                   policy=FakePolicy(hold)) == 2
    assert "--max-steps: expected >= 1, found 0" in capsys.readouterr().err


def test_nan_gripper_action_stops_and_the_log_stays_json(tmp_path):
    cfg_path = write_cfg(tmp_path)
    _, clock, hw = rig()
    policy = FakePolicy(lambda s, im, p: np.r_[p[:3], np.nan if s == 2 else 0.5])
    log = tmp_path / "steps.jsonl"
    assert rr.main(["--config", cfg_path, "--yes", "--log", str(log)], hardware=hw, clock=clock,
                   policy=policy) == 1
    assert hw.gripper.commands == [0.5] and hw.robot.stops == 1

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")
    entries = [json.loads(line, parse_constant=strict) for line in log.read_text().splitlines()]
    assert len(entries) == 2

# -----------------------------------------------------------------------------
# Robotiq socket protocol against a local fake server (the real gripper cannot be tested here)


def fake_robotiq_server():
    """A local stand-in for the URCap socket: SET answers 'ack', GET '<VAR> <int>'; activation
    (SET ACT 1) completes at once (STA 3). Returns (server, received lines, state, serve)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received, state = [], {"POS": 0, "ACT": 0, "STA": 0}

    def serve():
        conn, _ = server.accept()
        with conn:
            for line in conn.makefile("r"):
                line = line.strip()
                received.append(line)
                if line.startswith("SET"):
                    _, var, value = line.split()
                    state[var] = int(value)
                    if var == "ACT":
                        state["STA"] = 3 if int(value) == 1 else 0
                    conn.sendall(b"ack\n")
                else:
                    conn.sendall(f"{line.split()[1]} {state.get(line.split()[1], 0)}\n".encode())
    return server, received, state, serve


def test_robotiq_gripper_protocol():
    server, received, state, serve = fake_robotiq_server()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    g = rr.RobotiqGripper("127.0.0.1", server.getsockname()[1])
    with pytest.raises(RuntimeError, match="not activated"):
        g.command(1.0)
    g.activate()
    g.command(1.0)
    g.command(1.0)  # unchanged: no second socket round trip
    assert g.position() == 1.0
    g.command(0.5)
    assert g.position() == pytest.approx(128 / 255)
    g.close()
    thread.join(timeout=5)
    assert received[:6] == ["GET ACT", "SET ACT 1", "GET STA", "SET SPE 255", "SET FOR 100", "SET GTO 1"]
    assert received.count("SET POS 255") == 1 and "SET POS 128" in received

    # already active (a later run): no activation stroke, only speed and force
    received.clear()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    g = rr.RobotiqGripper("127.0.0.1", server.getsockname()[1], speed=64, force=30)
    g.activate()
    g.close()
    thread.join(timeout=5)
    server.close()
    assert received == ["GET ACT", "GET STA", "SET SPE 64", "SET FOR 30", "SET GTO 1"]


# -----------------------------------------------------------------------------
# The second safety review (issue 26): one test per finding, named after it, in its order


def kinematics(start, commands, period):
    """Commanded velocity (m/s or rad/s, base frame) and its change (m/s^2, rad/s^2) at every tick
    of a command stream that starts at rest at `start`: what the limits are stated in."""
    from scipy.spatial.transform import Rotation

    poses = np.vstack([start, commands])
    v = np.diff(poses[:, :3], axis=0) / period
    rots = Rotation.from_rotvec(poses[:, 3:])
    w = np.array([(b * a.inv()).as_rotvec() for a, b in zip(rots[:-1], rots[1:])]) / period
    accel = np.diff(np.vstack([np.zeros(3), v]), axis=0) / period
    ang_accel = np.diff(np.vstack([np.zeros(3), w]), axis=0) / period
    return v, accel, w, ang_accel


def test_finding1_acceleration_limit_holds_at_the_box_wall_and_the_cone_edge():
    # a policy descending at 0.3 m/s towards a target below z_min (0.05): it went from -0.3 m/s to
    # 0 in one tick (6.0 m/s^2 against 1.5)
    f = safety("clamp")
    outs = np.array([f.apply(PREV - [0, 0, 0.015 * k, 0, 0, 0])[0] for k in range(1, 80)])
    v, accel, _, _ = kinematics(PREV, outs, 0.05)
    assert v[:, 2].min() < -0.25  # it did descend at speed
    assert np.linalg.norm(accel, axis=1).max() <= 1.5 + 1e-6
    assert outs[:, 2].min() >= 0.05 - 1e-12 and outs[-1, 2] == pytest.approx(0.05, abs=1e-6)
    # turning through the cone's edge (0.8 rad) at 1.5 rad/s: it stopped in one tick (24 rad/s^2)
    f = safety("clamp", ramp_s=0.25)
    outs = np.array([f.apply(np.r_[PREV[:3], rotate(PREV[3:], [0, 0, 0.075 * min(k, 30)])])[0]
                     for k in range(1, 60)])  # on to 2.25 rad, then held
    _, _, w, ang_accel = kinematics(PREV, outs, 0.05)
    assert np.linalg.norm(w, axis=1).max() > 1.2  # it did turn at speed
    assert np.linalg.norm(ang_accel, axis=1).max() <= 4.0 + 1e-6
    cone = [rr.rotation_angle(o[3:], PREV[3:]) for o in outs]
    assert max(cone) <= 0.8 + 1e-9 and cone[-1] == pytest.approx(0.8, abs=1e-4)


def sweeps(lo, hi, rng):
    """Target streams across the walls: along each axis both ways at 0.1-0.4 m/s, diagonally into
    every corner at 0.4 m/s (start, per-tick target motion), and random far targets."""
    streams = []
    for axis in range(3):
        for sign in (-1, 1):
            for speed in (0.1, 0.25, 0.4):
                streams.append(np.eye(3)[axis] * sign * speed * 0.05)
    for corner in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3):
        streams.append(corner / np.sqrt(3) * 0.4 * 0.05)
    out = [[PREV[:3] + d * k for k in range(1, 70)] for d in streams]
    span = hi - lo
    for _ in range(4):  # a new target beyond the walls every 5 ticks
        out.append([rng.uniform(lo - 0.3 * span, hi + 0.3 * span) for _ in range(14) for _ in range(5)])
    return out


def test_finding1_2_sweep_across_the_walls_every_tick_within_limits_and_every_stop_inside():
    """Every tick of targets swept across the box walls and the cone's edge: speed and acceleration
    within their limits, the command inside, and a stop begun at that tick (servoStop at
    robot.stop_decel, continuous braking) ending inside the box. Rotations likewise, braking at
    max_ang_accel."""
    from scipy.spatial.transform import Rotation

    cfg = rr.parse_config(config_dict())
    s, period, stop_decel = cfg.safety, cfg.period, cfg.robot.stop_decel
    lo, hi = np.array(s.workspace_min), np.array(s.workspace_max)
    rng = np.random.default_rng(0)
    for stream in sweeps(lo, hi, rng):
        f = rr.SafetyFilter(s, period, PREV)
        outs = np.array([f.apply(np.r_[t, PREV[3:]])[0] for t in stream])
        v, accel, _, _ = kinematics(PREV, outs, period)
        assert np.linalg.norm(v, axis=1).max() <= s.max_step_m / period + 1e-6
        assert np.linalg.norm(accel, axis=1).max() <= s.max_accel + 1e-6
        speed = np.linalg.norm(v, axis=1, keepdims=True)
        stops = outs[:, :3] + np.divide(v, speed, out=np.zeros_like(v), where=speed > 0) * speed ** 2 / (
            2 * stop_decel)
        assert np.all(stops >= lo - 1e-9) and np.all(stops <= hi + 1e-9)
        assert np.all(outs[:, :3] >= lo - 1e-12) and np.all(outs[:, :3] <= hi + 1e-12)
    # orientations: turning about each axis, both ways, at 0.5-2 rad/s through the cone's edge
    ref = Rotation.from_rotvec(PREV[3:])
    for axis in range(3):
        for sign in (-1, 1):
            for rate in (0.5, 1.5, 2.0):
                f = rr.SafetyFilter(s, period, PREV)
                extra = np.eye(3)[axis] * sign * rate * period
                held = 2.5 / rate / period  # on to 2.5 rad, then held
                outs = np.array([f.apply(np.r_[PREV[:3], rotate(PREV[3:], extra * min(k, held))])[0]
                                 for k in range(1, 60)])
                _, _, w, ang_accel = kinematics(PREV, outs, period)
                assert np.linalg.norm(w, axis=1).max() <= s.max_step_rad / period + 1e-6
                assert np.linalg.norm(ang_accel, axis=1).max() <= s.max_ang_accel + 1e-6
                for out, wk in zip(outs, w):
                    n = np.linalg.norm(wk)
                    stop = Rotation.from_rotvec(wk / max(n, 1e-12) * n ** 2 / (2 * s.max_ang_accel))
                    angle = ((stop * Rotation.from_rotvec(out[3:])) * ref.inv()).magnitude()
                    assert angle <= s.max_rot_from_home_rad + 1e-9


def test_finding2_stop_decel_below_max_accel_is_refused():
    # stop_decel 0.5 and max_accel 5 were both accepted: a stop would have ended ~140 mm outside
    with pytest.raises(rr.ConfigError, match="robot.stop_decel: expected at least safety.max_accel 1.5"):
        rr.parse_config(config_dict(**{"robot.stop_decel": 1.0}))  # the old default, max_accel 1.5
    assert rr.parse_config(config_dict()).robot.stop_decel >= rr.parse_config(config_dict()).safety.max_accel


@pytest.mark.parametrize("override, needle", [
    ({"safety.workspace_min": [-2, -2, -2], "safety.workspace_max": [2, 2, 2]},
     "safety.workspace_min[0]: expected a number >= -0.85"),  # a 4 m box
    ({"safety.workspace_min": [-0.3, -0.7, -0.1]}, "expected z >= 0 (above the robot's mounting plane)"),
    ({"safety.workspace_min": [-0.6, -0.7, 0.05]}, "within the UR5's reach 0.85 m of the shoulder"),
    ({"safety.workspace_min": [-0.3, -0.5, 0.05], "safety.workspace_max": [0.3, 0.1, 0.4]},
     "at least 0.2 m from the robot base's vertical axis"),  # the box holds the base
    ({"safety.max_rot_from_home_rad": 3.14}, "max_rot_from_home_rad: expected a number <= 1.57"),
    ({"safety.ramp_s": 0}, "safety.ramp_s: expected a number >= 0.25"),
    ({"control.min_speed_scaling": 0}, "control.min_speed_scaling: expected a number >= 0.5"),
    ({"control.max_overrun_fraction": 1}, "control.max_overrun_fraction: expected a number <= 0.5"),
])
def test_extra_config_ranges_are_what_a_ur5_can_do(override, needle):
    import re
    with pytest.raises(rr.ConfigError, match=re.escape(needle)):
        rr.parse_config(config_dict(**override))


def test_finding4_rotation_layout_needs_robot_home_as_the_one_reference():
    # without robot.home each episode took its first reading as the reference: two episodes came
    # out at ry +3.1416 and -3.1416 (and a policy trained on them averaged to the identity)
    with pytest.raises(rr.ConfigError, match="robot.home: expected a home pose with control.action"):
        rr.parse_config(config_dict(**{"control.action": "xyz_rotvec_gripper"}))
    cfg = rr.parse_config(config_dict(**{"control.action": "xyz_rotvec_gripper", "robot.home": HOME_DOWN}))
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    for reported in (3.1416, -3.1416):  # the same gripper-down orientation, as UR may report it
        robot = FakeRobot(pose=(0.0, -0.5, 0.2, 0.0, reported, 0.0))
        ep = rr.record_episode(rr.Hardware(robot, FakeGripper(), cams), cfg, clock=clock)
        np.testing.assert_allclose(ep["proprio"][:, 4], 3.1416, atol=1e-4)


def euler_of(rotvec):
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(rotvec).as_euler("xyz").tolist()


@pytest.mark.parametrize("rot_mean, rot_std", [
    ([0.0, 180.0, 0.0], [5.0, 5.0, 5.0]),  # degrees
    (euler_of([0.2, 3.0, 0.1]), [0.1, 0.1, 0.1]),  # Euler angles of a gripper-down pose
    ([0.0, 0.0, 0.0], [0.05, 3.1, 0.05]),  # rotation vectors flipping between +pi and -pi
])
def test_finding3_rotations_in_other_units_and_delta_policies_are_refused(tmp_path, capsys, rot_mean,
                                                                           rot_std):
    cfg_path = write_cfg(tmp_path, **{"control.action": "xyz_rotvec_gripper", "robot.home": HOME_DOWN})
    _, clock, hw = rig(rr.parse_config(config_dict(**{"control.action": "xyz_rotvec_gripper",
                                                      "robot.home": HOME_DOWN})))
    ok = FakePolicy(hold, action_dim=7)  # rotation vectors near home's: runs
    assert rr.main(["--config", cfg_path, "--yes", "--max-steps", "2"], hardware=hw, clock=clock,
                   policy=ok) == 0
    calls = len(hw.robot.servo_calls)
    policy = FakePolicy(hold, action_dim=7, act_mean=[0.0, -0.5, 0.2] + rot_mean + [0.5],
                        act_std=[0.05] * 3 + rot_std + [0.5])
    assert rr.main(["--config", cfg_path, "--yes"], hardware=hw, clock=clock, policy=policy) == 1
    assert "expected rotation vectors (rad) continuous from robot.home's" in capsys.readouterr().err
    assert len(hw.robot.servo_calls) == calls
    # a delta policy (mean 0) passed when the box held the origin; such a box is refused now, and in
    # any other box the position means are outside
    with pytest.raises(rr.ConfigError, match="from the robot base's vertical axis"):
        rr.parse_config(config_dict(**{"safety.workspace_min": [-0.3, -0.3, 0.0],
                                       "safety.workspace_max": [0.3, 0.3, 0.4]}))
    delta = FakePolicy(hold, act_mean=[0.0, 0.0, 0.0, 0.5], act_std=[0.004, 0.004, 0.004, 0.5])
    with pytest.raises(rr.ConfigError, match="expected actions in metres inside the workspace"):
        rr.check_policy(delta, rr.parse_config(config_dict()))


def test_finding5_a_frozen_camera_stops_the_arm():
    # identical pixels with fresh timestamps ran 100 steps while the arm moved 0.25 m
    cfg, clock, hw = rig(rr.parse_config(config_dict(**{"control.episode_s": 5.0})))
    frozen = {}

    class Stuck(FakeCamera):  # the driver hands out its last buffer again, stamped anew
        def read(self):
            frame = super().read()
            if self.reads > 5:
                frozen.setdefault("image", frame.image)
                return rr.Frame(frozen["image"].copy(), frame.stamp)
            return frame
    hw.cameras["left"] = Stuck(clock, 150)
    with pytest.raises(rr.StaleFrame, match="frozen camera 'left': the same pixels for"):
        rr.run_episode(FakePolicy(lambda s, im, p: p + [0.01, 0, 0, 0]), hw, cfg, "t", clock=clock)
    assert 5 <= len(hw.robot.servo_calls) <= 5 + 0.2 / cfg.period + 1 and hw.robot.stops == 1
    # recording stops too: a frozen view is no demonstration
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": Stuck(clock, 150)}
    frozen.clear()
    with pytest.raises(rr.StaleFrame, match="frozen camera 'left'"):
        rr.record_episode(rr.Hardware(TeleopRobot(clock), FakeGripper(), cams), cfg, clock=clock)


def test_finding7_recording_checks_the_robot_every_frame(tmp_path, monkeypatch):
    # after RTDE was lost, 30 of 40 frames were saved with a frozen pose, no warning
    cfg = rr.parse_config(config_dict(**{"control.episode_s": 2.0}))
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}

    class Dropping(TeleopRobot):  # the connection drops at frame 10; the last pose stays
        def status(self):
            if self.clock.now() - self.t0 >= 10 * 0.05:
                self.state.connected = False
            return super().status()
    fake_preprocess(monkeypatch)
    out = str(tmp_path / "demos")
    with pytest.raises(rr.SafetyStop, match="robot connection lost"):
        rr.record(rr.Hardware(Dropping(clock), FakeGripper(), cams), cfg, out, "t", episodes=1, clock=clock)
    assert os.listdir(out + ".episodes") == []  # nothing saved from the broken episode
    # connected, but the receive data stop updating (ur-rtde keeps the last values)
    rtde = FakeRTDE([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])
    rtde.frozen_after = 10 * 0.002
    robot = rr.UR5(cfg.robot, control=False, interfaces=(rtde, None))
    with pytest.raises(rr.SafetyStop, match="robot data frozen"):
        rr.record_episode(rr.Hardware(robot, FakeGripper(), cams), cfg, clock=clock)


def test_finding9_nan_gripper_reading_never_reaches_the_policy_or_a_recording():
    class NaNGripper(FakeGripper):
        def position(self):
            return float("nan") if len(self.commands) >= 3 else super().position()
    cfg, clock, hw = rig()
    hw.gripper = NaNGripper()
    policy = FakePolicy(lambda s, im, p: np.r_[p[:3], 1.0 if s % 6 < 3 else 0.0])
    with pytest.raises(rr.SafetyStop, match="gripper reading: expected a position in"):
        rr.run_episode(policy, hw, cfg, "t", clock=clock)
    assert all(np.isfinite(seen[2]).all() for seen in policy.seen) and hw.robot.stops == 1
    hw.gripper.commands = [0.0] * 3
    with pytest.raises(rr.SafetyStop, match="gripper reading"):
        rr.record_episode(hw, cfg, clock=clock)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_finding6_a_full_disk_on_log_still_shuts_the_hardware_down(tmp_path, capsys):
    # servoStop was sent, then closing the log raised: stopScript and the camera release never ran
    cfg_path = write_cfg(tmp_path)
    clock = FakeClock()
    rtde = FakeRTDE([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])
    closed = []

    class Camera(FakeCamera):
        def close(self):
            closed.append(self.value)

    def hardware(cfg, mode):
        cams = {"front": Camera(clock, 50), "left": Camera(clock, 150)}
        return rr.Hardware(rr.UR5(cfg.robot, interfaces=(rtde, rtde)), FakeGripper(), cams)
    code = rr.main(["--config", cfg_path, "--yes", "--log", "/dev/full"], hardware=hardware,
                   policy=FakePolicy(hold), clock=clock)
    names = [c[0] for c in rtde.calls]
    assert code == 1 and names[-2:] == ["servoStop", "stopScript"] and sorted(closed) == [50, 150]
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "--log /dev/full: cannot write" in err[-2]


def test_finding8_homing_checks_the_start_orientation_and_orientation_tracking_is_checked():
    # with the tool 3.14 rad from home, homing went ahead (on an arm, a swing of about pi)
    cfg = rr.parse_config(config_dict(**{"control.action": "xyz_rotvec_gripper", "robot.home": HOME_DOWN}))
    _, clock, hw = rig(cfg)
    hw.robot.pose[3:] = [0.0, 0.0, 0.0]  # gripper up: a half turn from home
    with pytest.raises(rr.SafetyStop, match="start orientation 3.142 rad from robot.home's"):
        rr.run_episode(FakePolicy(hold, action_dim=7), hw, cfg, "t", clock=clock)
    assert hw.robot.moves == [] and hw.robot.servo_calls == [] and hw.robot.stops == 1

    # a wrist stuck 0.70 rad from its command did not stop the arm
    class StuckWrist(FakeRobot):  # follows positions, never turns
        def servo(self, pose, period):
            self.servo_calls.append(np.array(pose))
            self.pose[:3] = pose[:3]
    _, clock, hw = rig(cfg)
    hw.robot = StuckWrist(HOME_DOWN)
    turn = rotate(HOME_DOWN[3:], [0.0, 0.0, 0.7])
    log = []
    with pytest.raises(rr.SafetyStop, match="orientation tracking error 0.3"):
        rr.run_episode(FakePolicy(lambda s, im, p: np.r_[p[:3], turn, 0.0], action_dim=7), hw, cfg,
                       "t", clock=clock, on_step=log.append)
    assert log[-1]["tracking_rad"] <= 0.3 and hw.robot.stops == 1


def test_finding9_gripper_activates_after_enter_with_config_speed_force_and_rate_limited(tmp_path):
    # activation (a full stroke on an inactive gripper) was sent when the hardware opened, before
    # the operator's Enter, with speed 255 and force 100 hard-coded
    server, received, state, serve = fake_robotiq_server()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    raw = config_dict(**{"gripper": {"kind": "robotiq", "host": "127.0.0.1",
                                     "port": server.getsockname()[1], "speed": 128, "force": 40}})
    cfg = rr.parse_config(raw)
    g = rr.RobotiqGripper(cfg.gripper.host, cfg.gripper.port, speed=cfg.gripper.speed,
                          force=cfg.gripper.force)
    time.sleep(0.05)
    assert received == []  # opening sends nothing; run_episode activates, after the Enter
    _, clock, hw = rig(cfg)
    hw.gripper = g
    rr.run_episode(FakePolicy(lambda s, im, p: np.r_[p[:3], 1.0]), hw, cfg, "t", clock=clock, max_steps=2)
    g.close()
    thread.join(timeout=5)
    server.close()
    assert received[:6] == ["GET ACT", "SET ACT 1", "GET STA", "SET SPE 128", "SET FOR 40", "SET GTO 1"]
    assert received.count("SET POS 255") == 1
    _, clock, hw = rig()
    rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock, dry_run=True)
    assert hw.gripper.activations == 0  # a dry run never activates

    # commands were not rate-limited: an alternating policy sent 20 position commands in 20 ticks
    cfg, clock, hw = rig()
    log = []
    rr.run_episode(FakePolicy(lambda s, im, p: np.r_[p[:3], s % 2]), hw, cfg, "t", clock=clock,
                   on_step=log.append)
    assert len(log) == 20 and len(hw.gripper.commands) == 4  # one per gripper.min_interval_s 0.25
    assert sum(e["gripper_sent"] for e in log) == 4


def test_extra_overwrite_stopped_by_an_error_keeps_the_earlier_recording(tmp_path, monkeypatch):
    # --overwrite with a gripper timeout in the second new episode deleted the three earlier
    # episodes and built a one-episode dataset
    cfg = rr.parse_config(config_dict())
    clock = FakeClock()
    cams = {"front": FakeCamera(clock, 50), "left": FakeCamera(clock, 150)}
    written = fake_preprocess(monkeypatch)
    out = str(tmp_path / "demos")
    rr.record(rr.Hardware(TeleopRobot(clock), FakeGripper(), cams), cfg, out, "t", episodes=3, clock=clock)
    earlier = sorted(os.listdir(out + ".episodes"))
    assert len(earlier) == 3 and len(written["episodes"]) == 3
    written.clear()
    with pytest.raises(TimeoutError):
        rr.record(rr.Hardware(TeleopRobot(clock), FlakyGripper(fail_at=20 + 5), cams), cfg, out, "t",
                  episodes=3, clock=clock, existing="overwrite")
    kept = sorted(os.listdir(out + ".episodes"))
    assert kept[:3] == earlier and len(kept) == 4 and written == {}  # no dataset built from one episode


def test_finding11_joints_tcp_payload_and_the_controllers_own_check_stop_the_arm():
    # nothing read joint positions or limits, singularities, the TCP offset or the payload
    def run(setup, policy=hold, **kw):
        cfg, clock, hw = rig()
        setup(hw.robot)
        with pytest.raises(rr.SafetyStop) as e:
            rr.run_episode(FakePolicy(policy), hw, cfg, "t", clock=clock, **kw)
        assert hw.robot.stops == 1
        return str(e.value), hw.robot
    msg, robot = run(lambda r: setattr(r, "tcp", [0.0] * 6))  # the installation's TCP is the flange
    assert "TCP offset [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is not robot.tcp_offset" in msg
    assert robot.servo_calls == [] and robot.moves == []
    msg, robot = run(lambda r: setattr(r, "payload_kg", 0.0))
    assert "payload 0 kg is not robot.payload_kg 0.9" in msg and robot.servo_calls == []
    msg, _ = run(lambda r: r.q.__setitem__(5, 6.25))  # wrist 3 wound up to its +2 pi limit
    assert msg.startswith("joint 6 at 6.250 rad")
    msg, _ = run(lambda r: r.q.__setitem__(2, 0.05))  # elbow stretched straight
    assert msg.startswith("elbow joint at 0.050 rad")

    class Singular(FakeRobot):  # wrist 2 turns towards 0 as the tool moves right
        def joints(self):
            q = np.array(self.q)
            q[4] = -1.57 + 10 * self.pose[0]
            return q
    cfg, clock, hw = rig()
    hw.robot = Singular()
    with pytest.raises(rr.SafetyStop, match="wrist 2 joint at"):
        rr.run_episode(FakePolicy(lambda s, im, p: p + [0.02, 0, 0, 0]), hw, cfg, "t", clock=clock)
    assert 0.13 < hw.robot.pose[0] < 0.16 and hw.robot.stops == 1  # stopped near -0.15 rad

    # the controller's own check: corners of the box at start, then every target before it is sent
    msg, robot = run(lambda r: setattr(r, "allowed", lambda pose: pose[0] < 0.05),
                     policy=lambda s, im, p: p + [0.01, 0, 0, 0])
    assert "the controller refuses the pose" in msg and robot.servo_calls == []
    cfg, clock, hw = rig()
    hw.robot.allowed = lambda pose: pose[0] < 0.05 or len(hw.robot.checked) <= 8  # corners pass
    with pytest.raises(rr.SafetyStop, match="the controller refuses the target"):
        rr.run_episode(FakePolicy(lambda s, im, p: p + [0.02, 0, 0, 0]), hw, cfg, "t", clock=clock)
    assert all(c[0] < 0.05 for c in hw.robot.servo_calls) and hw.robot.stops == 1
    # through ur-rtde: isPoseWithinSafetyLimits on the corners, nothing moves when one is refused
    rtde = FakeRTDE([0.0, -0.5, 0.2, 0.0, 3.14, 0.0])
    rtde.allowed = lambda pose: pose[2] > 0.1  # z_min 0.05 is below the controller's safety plane
    cfg, clock, hw = rig()
    hw.robot = rr.UR5(cfg.robot, interfaces=(rtde, rtde))
    with pytest.raises(rr.SafetyStop, match="the controller refuses the pose"):
        rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock)
    assert [c[0] for c in rtde.calls] == ["servoStop"] and rtde.checked
    rtde.checked = []
    hw.robot = rr.UR5(cfg.robot, control=False, interfaces=(rtde, None))  # a dry run cannot ask
    rr.run_episode(FakePolicy(hold), hw, cfg, "t", clock=clock, dry_run=True, max_steps=2)
    assert rtde.checked == []
