"""Tests for amplify.py, on CPU, in a few minutes:  pytest test_amplify.py

Three tiers: invariants (round trips, masks that do not leak, hand-computed metrics), tiny models
that really learn (a small batch is overfit), and the command line run end to end for a few steps,
including every kind of bad input it must refuse.
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import amplify as A
import amplify_extras as E
import preprocess
import testdata
from conftest import need

# `pytest test_amplify.py` needs only torch, numpy, einops and pytest; pictures need Pillow, the
# robot's resize real_robot.py's requirements. Without them those checks are skipped (not under CI).
HAVE_PIL = bool(os.environ.get("CI")) or importlib.util.find_spec("PIL") is not None

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny models gain nothing from threads, and on a shared 2-core machine extra threads spin against
# each other; one thread keeps the suite fast and its numbers reproducible.
# AMPLIFY_TEST_THREADS=2 runs the learning tests with two threads: their criteria hold under both.
THREADS = int(os.environ.get("AMPLIFY_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}


def assert_close(a, b, atol=1e-6, msg=""):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    diff = (a - b).abs()
    assert diff.max() <= atol, f"{msg} max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


def tiny_data(episodes=4, frames=20, views=2, img=16, grid=5, seed=0, **kw):
    return testdata.synthetic_dataset(episodes=episodes, frames=frames, views=views, img_size=img, grid=grid, seed=seed, **kw)


# -----------------------------------------------------------------------------
# FSQ


def test_fsq_level_table_and_unknown_size():
    assert A.fsq_levels(256) == [8, 6, 5]
    assert A.fsq_levels(512) == [8, 8, 8]
    assert A.fsq_levels(1024) == [8, 5, 5, 5]
    assert A.fsq_levels(2048) == [8, 8, 6, 5]
    assert A.fsq_levels(4096) == [7, 5, 5, 5, 5]
    assert A.FSQ(A.fsq_levels(2048)).codebook_size == 1920
    with pytest.raises(A.UserError, match="expected one of"):
        A.fsq_levels(1000)


def test_fsq_round_trip_every_index():
    fsq = A.FSQ([8, 6, 5])
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)
    assert codes.min() >= -1 and codes.max() <= 1
    # Codes -> latents that bound() maps onto the codes' levels -> the same indices back.
    half = torch.tensor([4.0, 3.0, 2.0])
    target = codes * half  # the rounded level each code stands for
    z = torch.linspace(-6, 6, 4001)[:, None].repeat(1, 3)
    bounded = fsq.bound(z)
    z_for = torch.stack([z[(bounded[:, i:i + 1] - target[:, i]).abs().argmin(0), i] for i in range(3)], -1)
    codes2, idx2 = fsq(z_for)
    assert torch.equal(idx2, idx)
    assert_close(codes2, codes)


def test_fsq_conventions_zero_maps_to_zero_first_level_least_significant():
    fsq = A.FSQ([8, 5])
    assert_close(fsq.bound(torch.zeros(2)), torch.zeros(2), 1e-6)
    codes, idx = fsq(torch.zeros(1, 2))
    assert_close(codes, torch.zeros(1, 2))
    assert idx.item() == 4 + 2 * 8  # digits (4, 2): first level least significant
    assert_close(fsq.indices_to_codes(torch.tensor([1])), torch.tensor([[-3 / 4, -1.0]]))


def test_fsq_straight_through_gradient():
    fsq = A.FSQ([8, 8, 8])
    z = torch.randn(5, 3, requires_grad=True)
    codes, _ = fsq(z)
    codes.sum().backward()
    assert z.grad is not None and (z.grad.abs() > 0).all()


# -----------------------------------------------------------------------------
# Local-window codec


def test_codec_round_trip_exact_when_steps_fit():
    g = torch.Generator().manual_seed(0)
    size, T, N = 64, 16, 30
    start_px = torch.randint(16, 48, (N, 2), generator=g).float() + 0.3  # off-integer like the grid
    steps = torch.randint(-3, 4, (T - 1, N, 2), generator=g).float()  # fits in the 15x15 window
    px = torch.cat([start_px[None], start_px[None] + steps.cumsum(0)])
    tracks = 2 * px / size - 1
    classes = A.tracks_to_classes(tracks, size)
    assert classes.shape == (T - 1, N) and classes.dtype == torch.long
    assert_close(A.classes_to_tracks(tracks[0], classes, size), tracks, 1e-5)


def test_codec_clamps_steps_larger_than_window_and_pins_class_layout():
    size = 100
    x0 = 2 * 50.2 / size - 1
    def track(dx, dy):
        return torch.tensor([[[x0, x0]], [[x0 + 2 * dx / size, x0 + 2 * dy / size]]])  # (T=2, N=1, 2)
    assert A.tracks_to_classes(track(0, 0), size).item() == 112  # (W*W)//2 is "no motion"
    assert A.tracks_to_classes(track(1, 0), size).item() == 113  # x is the fast axis
    assert A.tracks_to_classes(track(0, 1), size).item() == 127
    big = track(12, -20)
    cls = A.tracks_to_classes(big, size)
    assert cls.item() == (0 * 15) + (7 + 7)  # dy clamped to -7, dx to +7
    back = A.classes_to_tracks(big[0], cls, size)
    assert_close((back[1] - back[0]) * size / 2, torch.tensor([[7.0, -7.0]]), 1e-4)


def test_codec_rectangular_images_and_edge_clamp():
    h, w = 20, 40
    t = torch.tensor([[[1.5, 0.0]], [[1.5, 0.0]]])  # outside the image: clamped to the last column
    assert A.tracks_to_classes(t, (h, w)).item() == 112
    step_y = torch.tensor([[[0.0, 0.0]], [[0.0, 2 * 1 / h]]])  # one pixel down in a 20-row image
    assert A.tracks_to_classes(step_y, (h, w)).item() == 127


def test_decode_readouts_keep_sub_pixel_motion_only_in_the_mean(monkeypatch):
    # Every point moves +1 px in x with probability 0.3 a step and stays otherwise: on average
    # 0.3 px a step, 4.5 px over 15 steps; "stay" is nevertheless each step's most likely class.
    size, W = 64, 15
    model = A.MotionTokenizer(A.TokenizerConfig(d_model=32, n_head=4, codebook_size=256, views=1, img_size=(size, size),
                                                grid=2))
    probs = torch.zeros(W * W)
    probs[112], probs[113] = 0.7, 0.3  # 112: no move, 113: +1 px in x
    logits = probs.clamp_min(1e-12).log().expand(1, 1, 15, 4, W * W)
    monkeypatch.setattr(model, "decode_logits", lambda codes: logits)
    start = model.start_points(1)
    moved = {r: (model.decode(torch.zeros(1, 15, dtype=torch.long), start, readout=r)[:, :, -1] - start) * size / 2
             for r in ("mean", "argmax")}
    assert_close(moved["mean"], torch.tensor([4.5, 0.0]).expand(1, 1, 4, 2), 1e-4)
    assert_close(moved["argmax"], torch.zeros(1, 1, 4, 2), 1e-6)
    with pytest.raises(A.UserError, match="expected 'argmax' or 'mean', found 'mode'"):
        model.decode(torch.zeros(1, 15, dtype=torch.long), start, readout="mode")


def test_grid_points_convention():
    pts = A.grid_points(20)
    assert pts.shape == (400, 2)
    assert_close(pts[0], [-1 + 1 / 20, -1 + 1 / 20])
    assert_close(pts[1], [-1 + 1 / 20 + 0.1, -1 + 1 / 20])  # x (column) varies fastest
    assert_close(pts[20], [-1 + 1 / 20, -1 + 1 / 20 + 0.1])


# -----------------------------------------------------------------------------
# Metrics and ensembling


def test_track_metrics_hand_computed():
    size = 10
    gt = torch.zeros(3, 4, 2)
    m = A.track_metrics(gt, gt, size)
    assert m["mse"] == 0 and m["pixel_acc"] == 1 and m["delta_auc"] == 1
    pred = gt.clone()
    pred[..., 0] += 1.5 * 2 / size  # 1.5 pixels off in x, exact in y
    m = A.track_metrics(pred, gt, size)
    assert m["mse"] == pytest.approx((0.3 ** 2) / 2)
    assert m["pixel_acc"] == pytest.approx(0.5)  # per coordinate: y right, x wrong
    assert m["delta_auc"] == pytest.approx(0.5 + 0.5 * 0.9)  # x within tau for tau = 2..10
    assert m["pixel_acc_euclid"] == pytest.approx(0.0)
    assert m["delta_auc_euclid"] == pytest.approx(0.9)


def test_moving_point_error_and_no_motion_reference():
    """moving_px: median endpoint error over the points that move > 1 px; the still_* reference is
    "nothing moves" on the same windows."""
    size, px = 100, 2 / 100
    gt = torch.zeros(1, 4, 3, 2)  # (V, T, N, xy): point 0 moves 6 px right, point 1 moves 1 px (not "moving")
    gt[0, :, 0, 0] = torch.tensor([0, 2, 4, 6]) * px
    gt[0, :, 1, 1] = torch.tensor([0, 1, 1, 1]) * px
    pred = gt.clone()
    pred[0, -1, 0, 0] += 3 * px  # 3 px off at the end of the window
    m = A.track_metrics(pred, gt, size)
    assert m["moving_frac"] == pytest.approx(1 / 3) and m["moving_px"] == pytest.approx(3)
    report = A.track_report(pred, gt, size)
    assert report["still_moving_px"] == pytest.approx(6)  # staying put misses the whole motion
    assert report["still_delta_auc"] == A.track_metrics(A.no_motion(gt), gt, size)["delta_auc"]
    assert np.isnan(A.track_metrics(torch.zeros(1, 4, 3, 2), torch.zeros(1, 4, 3, 2), size)["moving_px"])


def test_temporal_ensembler_weights_oldest_first_and_expiry():
    ens = A.TemporalEnsembler(horizon=3, k=0.5)
    assert ens.step(np.zeros((3, 1)))[0] == 0
    w = np.exp(-0.5 * np.arange(2))
    assert ens.step(np.ones((3, 1)))[0] == pytest.approx(w[1] / w.sum())  # oldest (0) weighs most
    a = ens.step(np.full((3, 1), 2.0))[0]
    w = np.exp(-0.5 * np.arange(3))
    assert a == pytest.approx((0 * w[0] + 1 * w[1] + 2 * w[2]) / w.sum())
    a = ens.step(np.full((3, 1), 3.0))[0]  # the first chunk has run out
    assert a == pytest.approx((1 * w[0] + 2 * w[1] + 3 * w[2]) / w.sum())
    ens.reset()
    assert ens.step(np.full((3, 1), 5.0))[0] == 5.0


# -----------------------------------------------------------------------------
# Models: masks, caching, shapes


def small_forward(views=2, img=16, codebook=256):
    torch.manual_seed(0)
    cfg = A.ForwardConfig(d_model=32, n_layer=2, n_head=4, codebook_size=codebook, views=views, img_size=(img, img),
                          vision=A.VisionConfig(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1)))
    return A.ForwardDynamics(cfg).eval()


def small_inverse(views=1, img=16, codebook=256):
    torch.manual_seed(0)
    cfg = A.InverseConfig(d_model=32, n_head=4, codebook_size=codebook, views=views, img_size=(img, img), action_dim=3,
                          proprio_dim=2, vision=A.VisionConfig(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1)))
    return A.InverseDynamics(cfg)


def test_block_causal_mask():
    m = A.block_causal_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # condition tokens see each other, not the codes
    assert m[3:, :3].all()  # codes see the whole condition
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_forward_mask_does_not_leak_the_future():
    model = small_forward()
    images = torch.randint(0, 255, (2, 2, 16, 16, 3), dtype=torch.uint8)
    codes = torch.randint(0, model.K, (2, model.L))
    with torch.no_grad():
        cond = model.condition(images, ["open the drawer", "push the block"])
        base = model.logits(cond, codes[:, :-1])  # logits[:, j] predicts code j from codes < j
        for k in (0, 5, model.L - 2):
            changed = codes.clone()
            changed[:, k] = (changed[:, k] + 1) % model.K
            out = model.logits(cond, changed[:, :-1])
            assert_close(out[:, : k + 1], base[:, : k + 1], 1e-5, f"code {k} leaked into earlier positions")
            assert (out[:, k + 1:] - base[:, k + 1:]).abs().max() > 1e-6  # and it does reach later ones


def test_cached_and_uncached_sampling_agree():
    model = small_forward()
    images = torch.randint(0, 255, (3, 2, 16, 16, 3), dtype=torch.uint8)
    tasks = ["a", "b c", "a"]
    """Each code the cached sampler picks is what the uncached model, teacher-forced on the same prefix,
    ranks first (greedy) or among its top 5 (top-k sampling). Compared through the logits, with a
    tolerance: the two paths round differently, and exact equality of argmaxes fails on near-ties."""
    cached = model.generate(images, tasks, use_cache=True)
    assert cached.shape == (3, model.L)

    def rank_gap(codes, k):
        """How far each chosen code's logit is below the k-th best, relative to the logits' scale."""
        with torch.no_grad():
            logits = model.logits(model.condition(images, tasks), codes[:, :-1])  # (B, L, K)
        chosen = logits.gather(-1, codes[..., None])[..., 0]
        return ((logits.topk(k, dim=-1).values[..., -1] - chosen) / logits.abs().max()).max().item()

    assert rank_gap(cached, 1) < 1e-4
    assert torch.equal(cached, model.generate(images, tasks, use_cache=False)) or rank_gap(cached, 1) < 1e-4
    s1 = model.generate(images, tasks, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert rank_gap(s1, 5) < 1e-4
    assert torch.equal(s1, model.generate(images, tasks, temperature=1.0, top_k=5,
                                          generator=torch.Generator().manual_seed(1)))  # same path, same seed


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("groups, chunk_rows", [(1, 7), (15, 7), (15, None), (3, 1000)])
def test_chunked_cross_entropy_equals_the_plain_computation(groups, chunk_rows):
    """Loss and gradients of x, weight and bias as linear + F.cross_entropy give them (1e-5 relative)."""
    g = torch.Generator().manual_seed(groups)
    M, D, C = 50, 12, 9  # 50 rows in chunks of 7: the last chunk is partial
    x = torch.randn(M, D, generator=g, requires_grad=True)
    weight = torch.randn(groups * C, D, generator=g, requires_grad=True)
    bias = torch.randn(groups * C, generator=g, requires_grad=True)
    target = torch.randint(0, C, (M, groups), generator=g)
    results = []
    for fn in (lambda: F.cross_entropy((x @ weight.T + bias).view(M * groups, C), target.view(-1)),
               lambda: E.chunked_linear_cross_entropy(x, weight, bias, target.view(-1), chunk_rows)):
        loss = fn()
        (3 * loss).backward()  # a scaled upstream gradient reaches every input
        results.append([loss.detach()] + [t.grad.clone() for t in (x, weight, bias)])
        for t in (x, weight, bias):
            t.grad = None
    for name, a, b in zip(("loss", "x", "weight", "bias"), results[1], results[0]):
        assert rel_diff(a, b) < 1e-5, name
    with torch.no_grad():  # evaluation: the same loss, no gradients kept
        assert rel_diff(E.chunked_linear_cross_entropy(x, weight, bias, target, chunk_rows), results[0][0]) < 1e-5


@pytest.mark.parametrize("width", [32, 256])  # narrower than the 225 window classes (chunked head) and wider (plain)
def test_tokenizer_loss_equals_plain_cross_entropy_of_its_logits(width):
    torch.manual_seed(0)
    arrays, _ = tiny_data(episodes=1, img=32, grid=5)
    tracks = torch.as_tensor(arrays["tracks"][:3]).double()
    model = A.MotionTokenizer(A.TokenizerConfig(d_model=width, n_head=4, codebook_size=256, views=2, img_size=(32, 32),
                                                grid=5)).double()  # float64: whole-model gradients, no rounding noise
    grads = []
    for plain in (True, False):
        model.zero_grad()
        if plain:
            logits, _ = model(tracks)  # (B, V, L, N, Cw)
            target = A.tracks_to_classes(tracks, 32)  # (B, V, L, N)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        else:
            loss = model.loss(tracks)[0]
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for (name, _), a, b in zip([("loss", None)] + list(model.named_parameters()), grads[1], grads[0]):
        assert rel_diff(a, b) < 1e-5, name
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 path: the same loss to bf16 precision
        assert rel_diff(model.loss(tracks.float())[0].double(), grads[0][0]) < 2e-2


@pytest.mark.parametrize("width", [32, 256])  # the chunked head and the plain one
def test_tokenizer_view_weights_weight_each_views_mean_loss(width):
    torch.manual_seed(0)
    arrays, _ = tiny_data(episodes=1, img=32, grid=5)
    tracks = torch.as_tensor(arrays["tracks"][:3]).double()
    cfg = A.TokenizerConfig(d_model=width, n_head=4, codebook_size=256, views=2, img_size=(32, 32), grid=5)
    model = A.MotionTokenizer(cfg).double()
    logits, _ = model(tracks)  # (B, V, L, N, Cw)
    target = A.tracks_to_classes(tracks, 32)
    per_view = [F.cross_entropy(logits[:, v].reshape(-1, logits.shape[-1]), target[:, v].reshape(-1)) for v in (0, 1)]
    for weights in ((0.9, 0.1), (0.0, 1.0), (0.5, 0.5)):
        model.cfg = replace(cfg, view_weights=weights)
        expected = weights[0] * per_view[0] + weights[1] * per_view[1]
        assert rel_diff(model.loss(tracks)[0], expected) < 1e-6, weights
    model.cfg = cfg  # no weights: every row alike, which with equal views is weights (0.5, 0.5)
    assert rel_diff(model.loss(tracks)[0], (per_view[0] + per_view[1]) / 2) < 1e-6
    with pytest.raises(A.UserError, match=r"one per view \(2\), found \[1.0\]"):
        A.MotionTokenizer(replace(cfg, view_weights=(1.0,)))


def test_prefetcher_yields_batches_in_order_and_raises_errors_of_the_worker():
    made = []

    def make(step):
        made.append(step)
        if step == 3:
            raise KeyError("bad row")
        return {"x": np.full(2, step)}

    with A.Prefetcher(make, range(1, 6), torch.device("cpu"), depth=1) as loader:
        assert [loader.next()["x"][0] for _ in range(2)] == [1, 2]
        with pytest.raises(KeyError, match="bad row"):
            loader.next()
    assert made == [1, 2, 3]  # the worker stops at the error
    with A.Prefetcher(make, range(10, 1000), torch.device("cpu"), depth=2) as loader:
        assert loader.next()["x"][0] == 10
    assert len(made) < 3 + 10  # leaving the block stops the worker (it was at most `depth` ahead)


# What the published code builds at the paper config, counted as --count-params counts (the forward
# and inverse models with their ResNet-18): docs/PUBLISHED_ARCHITECTURE.md, section 12.
PUBLISHED_COUNTS = {"tokenizer": 30_847_973, "forward": 70_263_872, "inverse": 68_637_511}


def test_paper_preset_parameter_counts_are_the_published_ones():
    for stage, n in PUBLISHED_COUNTS.items():
        count = A.count_params(stage, A.PRESETS["paper"])
        assert abs(count - n) / n < 0.01, f"{stage}: {count:,} vs {n:,}"


# -----------------------------------------------------------------------------
# Tiny models really learn (a small batch is overfit)


def overfit(model, loss_fn, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def history(values, every):
    return ", ".join(f"{i}: {v:.4g}" for i, v in list(enumerate(values))[::every])


def test_tokenizer_overfits_and_reconstructs():
    """Judged on the points that move: on static background "nothing moves" is already right (a
    tokenizer that learnt only that scored delta_auc 0.997 here, as high as the no-motion guess)."""
    torch.manual_seed(0)
    arrays, meta = tiny_data(episodes=2, frames=24, img=32, grid=5)
    tracks = torch.as_tensor(arrays["tracks"])  # (F, V, T, N, 2)
    motion_px = (tracks - tracks[:, :, :1]).abs().amax(dim=(1, 2, 4)) * 16  # (F, N) largest move of each point
    tracks = tracks[(motion_px > 1).sum(-1).argsort(descending=True)[:8]]  # the 8 windows with most motion
    model = A.MotionTokenizer(A.TokenizerConfig(d_model=64, n_head=4, codebook_size=256, views=2, img_size=(32, 32),
                                                grid=5))
    # The step-query decoder first learns "nothing moves" (most points), then the moves: here they
    # came in between steps 200 and 300 (0.46 px vs 9.98 px still at 400), so 600 leaves a margin.
    # On 20-frame episodes it was slower: 4.37 px vs 6.36 px after 800 steps.
    losses = overfit(model, lambda: model.loss(tracks)[0], 600)
    assert min(losses[-10:]) < losses[0] / 10, history(losses, 80)
    model.eval()
    with torch.no_grad():
        recon = model.decode(model.encode(tracks)[1], tracks[:, :, 0])
    moving = ((tracks - tracks[:, :, :1]).abs().amax(dim=(2, 4)) * 16 > 1)[:, :, None].expand(tracks.shape[:-1])
    error = ((recon - tracks).norm(dim=-1) * 16)[moving].mean().item()  # pixels, on points that move
    still = ((tracks[:, :, :1] - tracks).norm(dim=-1) * 16)[moving].mean().item()  # the no-motion guess
    assert moving.any() and error < 0.5 * still, f"moving points: {error:.2f} px vs {still:.2f} px if nothing moves; " \
        f"loss {history(losses, 80)}"


def test_forward_overfits_codes():
    model = small_forward()
    model.train()
    images = torch.randint(0, 255, (4, 2, 16, 16, 3), dtype=torch.uint8)
    codes = torch.randint(0, model.K, (4, model.L), generator=torch.Generator().manual_seed(0))
    tasks = ["t0", "t1", "t2", "t3"]
    losses = overfit(model, lambda: model.loss(images, tasks, codes)[0], 120)
    assert min(losses[-10:]) < losses[0] / 5, history(losses, 20)
    model.eval()
    accuracy = (model.generate(images, tasks) == codes).float().mean().item()  # greedy, code by code
    assert accuracy > 0.9, f"greedy code accuracy {accuracy:.3f}; loss {history(losses, 20)}"


def test_inverse_overfits_actions():
    model = small_inverse()
    B = 6
    images = torch.randint(0, 255, (B, 1, 16, 16, 3), dtype=torch.uint8)
    proprio = torch.randn(B, 2)
    codes = torch.randint(0, 240, (B, 15))
    ramp = torch.linspace(0, 1, 16)[None, :, None]
    actions = torch.randn(B, 1, 3) + ramp * torch.randn(B, 1, 3)  # smooth chunks, different per sample
    valid = torch.ones(B, 16)
    errors = []  # mean-squared error of the predicted mean at each step, in units of the targets' variance
    variance = actions.expand(B, 16, 3).var().item()

    def loss_fn():
        loss, metrics = model.loss(images, proprio, codes, actions, valid)
        errors.append(metrics["action_mse_norm"].item() / variance)
        return loss

    losses = overfit(model, loss_fn, 300)
    # Criteria relative to the targets, on the best of the last 10 steps: the NLL keeps sharpening
    # the std, so single iterates of the mean jitter (one machine's last step: 0.076 of a 0.05 bound).
    elements = sum(0.99 ** k for k in range(16)) * 3  # discounted action elements in the NLL
    drop = (losses[0] - min(losses[-10:])) / elements
    assert drop > 1.0, f"NLL fell {drop:.2f} nats per action element (expected > 1); NLL {history(losses, 30)}"
    assert min(errors[-10:]) < 0.25, f"error / variance {history(errors, 30)}"


@pytest.mark.parametrize("stage", ["forward", "inverse"])
def test_code_inputs_are_continuous_in_the_levels(stage):
    """Both models read a code as its FSQ vector through a linear map: codes one level apart in one
    channel give nearby inputs (an embedding of indices would put them as far apart as any two)."""
    torch.manual_seed(0)
    model = small_forward() if stage == "forward" else small_inverse()
    fsq = model.code_in.fsq
    idx = torch.arange(fsq.codebook_size)
    digits = (idx[:, None] // fsq.basis) % fsq.levels  # (K, channels)
    with torch.no_grad():
        emb = model.code_in(idx)  # (K, D)
        near = torch.cat([(emb[idx[ok] + fsq.basis[c]] - emb[idx[ok]]).norm(dim=-1)
                          for c in range(len(fsq.levels)) for ok in [digits[:, c] < fsq.levels[c] - 1]])
        pairs = torch.randint(0, fsq.codebook_size, (2, 2000), generator=torch.Generator().manual_seed(0))
        far = (emb[pairs[0]] - emb[pairs[1]]).norm(dim=-1)
    assert near.mean() < 0.4 * far.mean(), (near.mean(), far.mean())
    assert near.max() < far.mean(), (near.max(), far.mean())


def test_inverse_memory_layernorm_is_an_option_beside_the_published_memory():
    """The published inverse memory has no LayerNorm (the default); --memory-layernorm adds one, so
    memory tokens of any scale reach the cross-attention alike."""
    cfg = A.InverseConfig(d_model=16, n_head=2, n_layer=1, codebook_size=256, views=1, img_size=(16, 16), action_dim=2,
                          proprio_dim=2, T=4, vision=A.VisionConfig(widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1)))
    published, normed = A.InverseDynamics(cfg).eval(), A.InverseDynamics(replace(cfg, memory_ln=True)).eval()
    assert not any("memory_ln" in k for k in published.state_dict())
    assert set(normed.state_dict()) - set(published.state_dict()) == {"memory_ln.weight", "memory_ln.bias"}
    normed.load_state_dict({**published.state_dict(), "memory_ln.weight": torch.ones(16), "memory_ln.bias": torch.zeros(16)})
    x, p, codes = torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8), torch.randn(1, 2), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        scaled = {m: m.tokens(x, 1000 * p, codes) for m in (published, normed)}  # proprio 1000x larger
        plain = {m: m.tokens(x, p, codes) for m in (published, normed)}
    assert (scaled[published] - plain[published]).abs().max() > 1e-3  # the published memory feels the scale
    assert (scaled[normed] - plain[normed]).abs().max() < 0.5 * (scaled[published] - plain[published]).abs().max()


def test_inverse_loss_discounts_and_masks():
    cfg = A.InverseConfig(d_model=16, n_head=2, n_layer=1, codebook_size=256, views=1, img_size=(16, 16), action_dim=2,
                          proprio_dim=2, T=4, vision=A.VisionConfig(widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1)))
    model = A.InverseDynamics(cfg).eval()
    x = torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8)
    p, codes, actions = torch.zeros(1, 2), torch.zeros(1, 3, dtype=torch.long), torch.randn(1, 4, 2)
    actions = actions.tanh()  # actions are scaled to [-1, 1]
    with torch.no_grad():
        nll = truncated_normal_nll(model.head.sample(model.tokens(x, p, codes)), actions, 0.1)[0]  # (T, A)
        full, _ = model.loss(x, p, codes, actions, torch.ones(1, 4))
        masked, _ = model.loss(x, p, codes, actions, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    # The published averaging: the mean over batch, steps and action dims, step k's terms weighted 0.99^k.
    per_step = nll.mean(-1)  # (T,)
    assert full.item() == pytest.approx(sum(0.99 ** k * per_step[k].item() for k in range(4)) / 4, rel=1e-5)
    assert masked.item() == pytest.approx((per_step[0].item() + 0.99 * per_step[1].item()) / 4, rel=1e-5)


def truncated_normal_nll(mean, actions, s):
    """-log of N(a; mean, s) truncated to [-1, 1], per element, written out with math.erf (+1e-6 as published)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    out = [(a - m) ** 2 / (2 * s * s) + math.log(s * math.sqrt(2 * math.pi)) + math.log(phi((1 - m) / s) - phi((-1 - m) / s) + 1e-6)
           for m, a in zip(mean.flatten().tolist(), actions.flatten().tolist())]
    return torch.tensor(out).view(mean.shape)


# -----------------------------------------------------------------------------
# Action heads: Gaussian, diffusion, flow matching

HEADS = ["gaussian", "diffusion", "flow"]


def make_head(kind, T=16, A_=4, D=32):
    torch.manual_seed(0)
    cfg = A.InverseConfig(d_model=D, n_head=4, T=T, action_dim=A_, head=kind, unet_dims=(32, 64), dit_layers=2)
    return A.build_head(cfg)


def head_batch(B=4, T=16, A_=4, D=32, seed=0):
    """Tokens as the inverse transformer would give them, smooth chunks scaled to [-1, 1] as the
    Normalizer scales actions, discount weights."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, T, D, generator=g)
    actions = torch.randn(B, T, A_, generator=g).cumsum(1) / 2  # a random walk per dimension
    lo, hi = actions.amin((0, 1)), actions.amax((0, 1))
    actions = (actions - (lo + hi) / 2) / ((hi - lo) / 2)
    return tokens, actions, 0.99 ** torch.arange(T, dtype=torch.float32).expand(B, T)


def unexplained(pred, target):
    """Squared error as a fraction of the target's variance: scale-free."""
    return (((pred - target) ** 2).mean() / target.var()).item()


def train_head(head, tokens, actions, weights, steps, lr=3e-3, repeats=16):
    """AdamW on a tiny batch repeated `repeats` times (fresh noise per copy: steadier gradients for
    the generative heads). The tokens train too, as the inverse transformer under the head does."""
    tokens = torch.nn.Parameter(tokens.clone())
    opt = torch.optim.AdamW([*head.parameters(), tokens], lr=lr)
    rep = lambda x: x.repeat(repeats, *[1] * (x.ndim - 1))  # noqa: E731
    losses = []
    for _ in range(steps):
        loss, _ = head.loss(rep(tokens), rep(actions), rep(weights))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return tokens.detach(), losses


@pytest.mark.parametrize("kind", HEADS)
def test_head_sample_shape_finite_reproducible(kind):
    head = make_head(kind)
    tokens, _, _ = head_batch()
    a = head.sample(tokens, torch.Generator().manual_seed(1))
    assert a.shape == (4, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(a, head.sample(tokens, torch.Generator().manual_seed(1)))
    if kind != "gaussian":  # the Gaussian acts on its mean; the generative heads draw a new chunk per seed
        assert not torch.allclose(a, head.sample(tokens, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("kind", HEADS)
def test_head_loss_weights_each_step(kind):
    """A step with zero weight leaves the loss alone: changing its action changes nothing (Gaussian),
    or only through the other steps' view of it (the denoisers see the whole chunk)."""
    head = make_head(kind)
    tokens, actions, weights = head_batch()
    weights = weights.clone()
    weights[:, 8:] = 0
    changed = actions.clone()
    changed[:, 8:] += 10.0
    torch.manual_seed(3)
    full, metrics = head.loss(tokens, actions, weights)
    torch.manual_seed(3)
    masked, _ = head.loss(tokens, changed, weights)
    assert full.ndim == 0 and torch.isfinite(full) and metrics
    if kind == "gaussian":
        assert torch.allclose(full, masked)
    else:
        assert (masked - full).abs() < 0.5 * full.abs()


@pytest.mark.parametrize("kind", HEADS)
def test_head_overfits_tiny_batch(kind):
    """On 4 (tokens, chunk) pairs the loss falls far, and a sampled chunk reproduces its pair's actions."""
    head = make_head(kind, T=8)
    tokens, actions, weights = head_batch(T=8)
    # Steps that leave the sample error at half the bound or less (measured over seeds 0-3: Gaussian
    # 0.14-0.22, diffusion 0.04-0.22; flow 0.015 at seed 0); the Gaussian's learned std slows its mean's fit.
    steps = {"gaussian": 400, "diffusion": 300, "flow": 200}[kind]
    tokens, losses = train_head(head, tokens, actions, weights, steps=steps)
    first, best_last = np.mean(losses[:10]), min(losses[-10:])
    assert best_last < 0.2 * first, (first, best_last)
    assert unexplained(head.sample(tokens, torch.Generator().manual_seed(0)), actions) < 0.5


def test_head_samplers_follow_their_training_paths():
    """Given the exact noise / velocity of a one-chunk data set (derived from the path each loss trains
    on), DDIM and midpoint sampling return that chunk for any number of steps."""
    tokens, actions, _ = head_batch()
    diffusion, flow = make_head("diffusion"), make_head("flow")
    ab = diffusion.alpha_bar

    def exact_noise(x, k, tokens):  # x_k = sqrt(abar) x0 + sqrt(1 - abar) eps, solved for eps
        a = ab[k][:, None, None]
        return (x - a.sqrt() * actions) / (1 - a).sqrt()

    diffusion.unet.forward = exact_noise
    flow.velocity = lambda x, t, tokens: (actions - x) / (1 - t[:, None, None])  # the straight line to the chunk
    for head, steps in ((diffusion, 2), (diffusion, 16), (diffusion, 100), (flow, 1), (flow, 10)):
        sample = head.sample(tokens, torch.Generator().manual_seed(0), steps=steps)
        assert (sample - actions).abs().max() < 1e-4 * actions.abs().max(), (type(head).__name__, steps)


def test_flow_10_midpoint_steps_approach_the_ode_solution():
    head = make_head("flow")
    tokens, actions, weights = head_batch()
    tokens, _ = train_head(head, tokens, actions, weights, steps=100)
    sample = lambda n: head.sample(tokens, torch.Generator().manual_seed(0), steps=n)  # noqa: E731
    exact = sample(200)
    err = {n: ((sample(n) - exact).norm() / exact.norm()).item() for n in (2, 10)}
    assert err[10] < 0.05 and err[10] < 0.5 * err[2], err


def test_diffusion_schedule_and_odd_horizons():
    ab = E.cosine_alpha_bar(100)
    assert ab.shape == (100,) and (ab[1:] < ab[:-1]).all()
    assert 0.99 < ab[0] < 1 and ab[-1] < 1e-3  # from almost clean to almost pure noise
    head = make_head("diffusion", T=7)  # the U-Net halves T: 7 is padded and cropped back
    tokens, actions, weights = head_batch(T=7)
    assert torch.isfinite(head.loss(tokens, actions, weights)[0])
    assert head.sample(tokens, torch.Generator().manual_seed(0)).shape == (4, 7, 4)


def test_gaussian_head_is_the_published_truncated_normal():
    """Mean tanh(W x + b); loss the NLL of N(mean, 0.1) truncated to [-1, 1], weighted, averaged over all cells."""
    torch.manual_seed(0)
    head = A.build_head(A.InverseConfig(d_model=16, action_dim=3))  # the default: 0.1, as published
    assert head.weight.shape == (3, 16)  # the mean only
    tokens, actions, weights = 3 * torch.randn(2, 4, 16), torch.rand(2, 4, 3) * 2 - 1, torch.rand(2, 4)
    loss, _ = head.loss(tokens, actions, weights)
    mean = head.sample(tokens)
    assert torch.equal(mean, torch.tanh(tokens @ head.weight.T + head.bias)) and mean.abs().max() > 0.9
    expected = (truncated_normal_nll(mean, actions, 0.1) * weights[..., None]).mean()
    assert rel_diff(loss, expected) < 1e-5
    with pytest.raises(A.UserError, match="expected a std > 0, found 0"):
        A.build_head(A.InverseConfig(d_model=16, action_dim=3, gaussian_std=0))


def test_head_config_errors():
    with pytest.raises(A.DataError, match="expected head gaussian, diffusion or flow, found 'vae'"):
        A.build_head(A.InverseConfig(head="vae"))
    with pytest.raises(A.UserError, match="expected 1 to 100 DDIM steps"):
        A.build_head(A.InverseConfig(head="diffusion", diffusion_sample_steps=101))


# -----------------------------------------------------------------------------
# Data: format, validation, protocols


def test_dataset_round_trip_npz_and_directory(tmp_path):
    arrays, meta = tiny_data()
    for path in (tmp_path / "d.npz", tmp_path / "d"):
        preprocess.write_dataset(str(path), arrays, meta)
        ds = A.load_dataset(str(path))
        for key, value in arrays.items():
            np.testing.assert_array_equal(np.asarray(ds.arrays[key]), value)
        assert ds.meta["views"] == meta["views"] and ds.num_episodes == 4
        assert "action_stats" in ds.meta
    assert isinstance(A.load_dataset(str(tmp_path / "d")).arrays["tracks"], np.memmap)


def bad_variants(arrays):
    a = {k: v.copy() for k, v in arrays.items()}
    yield "missing key 'tracks'", {k: v for k, v in a.items() if k != "tracks"}
    yield "'tracks' expected shape", {**a, "tracks": a["tracks"][:, :, :8]}
    nan = a["tracks"].copy()
    nan[3, 0, 2, 1, 0] = np.nan
    yield "'tracks' expected finite", {**a, "tracks": nan}
    yield "'episode_ends' expected strictly increasing", {**a, "episode_ends": a["episode_ends"][[1, 0, 2, 3]]}
    yield "'images' expected dtype uint8", {**a, "images": a["images"].astype(np.float32)}
    bad_actions = a["actions"].copy()
    bad_actions[0, 0] = np.nan
    yield "'actions' expected finite rows", {**a, "actions": bad_actions}


def test_bad_datasets_are_rejected_and_old_data_is_kept(tmp_path):
    arrays, meta = tiny_data()
    path = tmp_path / "d"
    preprocess.write_dataset(str(path), arrays, meta)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    for message, bad in bad_variants(arrays):
        with pytest.raises(A.DataError, match=message):
            preprocess.write_dataset(str(path), bad, meta)
    with pytest.raises(A.DataError, match="missing key 'views'"):
        preprocess.write_dataset(str(path), arrays, {k: v for k, v in meta.items() if k != "views"})
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary leftovers


def test_protocols_few_shot_action_free_and_task_filters(tmp_path):
    arrays, meta = tiny_data(episodes=6)
    ends = arrays["episode_ends"]
    arrays["actions"][ends[1]:ends[2]] = np.nan  # episode 2 is action-free video
    preprocess.write_dataset(str(tmp_path / "d.npz"), arrays, meta)
    corpus = A.Corpus([A.load_dataset(str(tmp_path / "d.npz"))])
    assert corpus.has_actions.tolist() == [True, True, False, True, True, True]
    eps = list(range(6))
    assert A.select_episodes(corpus, eps, need_actions=True) == [0, 1, 3, 4, 5]
    assert A.select_episodes(corpus, eps, need_actions=True, shots=1) == [0, 1]  # first per task
    right = corpus.tasks[0]
    assert A.select_episodes(corpus, eps, exclude_tasks=[right]) == [1, 3, 5]
    assert A.select_episodes(corpus, eps, only_tasks=[right]) == [0, 2, 4]
    train, val = A.split_episodes(corpus, 1)
    assert val == [4, 5] and train == [0, 1, 2, 3]
    actions, valid = corpus.action_chunks(np.array([ends[0] - 2]), 16)
    assert valid[0].tolist() == [True, True] + [False] * 14  # the chunk does not cross into the next episode


def test_corpus_joins_datasets_and_rejects_mismatched_views(tmp_path):
    a1, m1 = tiny_data(episodes=2)
    a2, m2 = tiny_data(episodes=2, seed=1)
    preprocess.write_dataset(str(tmp_path / "a"), a1, m1)
    preprocess.write_dataset(str(tmp_path / "b.npz"), a2, m2)
    corpus = A.Corpus([A.load_dataset(str(tmp_path / "a")), A.load_dataset(str(tmp_path / "b.npz"))])
    n1 = len(a1["images"])
    frames = np.array([n1 + 3, 1, n1 - 1])
    np.testing.assert_array_equal(corpus.gather("images", frames), np.stack([a2["images"][3], a1["images"][1],
                                                                              a1["images"][n1 - 1]]))
    a3, m3 = tiny_data(episodes=2, views=1)
    preprocess.write_dataset(str(tmp_path / "c.npz"), a3, m3)
    with pytest.raises(A.DataError, match="disagree on 'views'"):
        A.Corpus([A.load_dataset(str(tmp_path / "a")), A.load_dataset(str(tmp_path / "c.npz"))])


def test_curves_plot_flat_huge_and_missing_values(tmp_path):
    Image = need("PIL.Image")
    # One evaluation of a diverging run: flat at 2e7 (lo + 1e-9 == lo), a NaN metric, a NaN reference.
    log_rows = [{"step": 1, "loss": 12.9}]
    eval_rows = [{"step": 1, "val_nll": 2.1e7, "moving_px": float("nan")}]
    picture = E.plot_curves("inverse", log_rows, eval_rows, reference=("mean action", {"val_nll": float("nan")}))
    A.write_png(str(tmp_path / "c.png"), picture)
    assert Image.open(tmp_path / "c.png").size == (600, 16 + 2 * 150)


def test_draw_tracks_and_png(tmp_path):
    need("PIL")
    img = np.zeros((20, 20, 3), np.uint8)
    tracks = np.zeros((4, 2, 2), np.float32)
    tracks[:, 0, 0] = np.linspace(-0.5, 0.5, 4)  # point 0 moves right, point 1 stays
    out = E.draw_tracks(img, tracks)
    assert out[10, 5:15].any() and not out[:8].any() and img.sum() == 0
    A.write_png(str(tmp_path / "x.png"), out)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def imported_modules(path):
    """Top-level names of every module a file imports, wherever the import statement is."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_amplify_imports_no_project_module_but_its_optional_companion():
    """amplify.py imports no file of this project except amplify_extras.py, lazily; that one imports none."""
    project = {os.path.splitext(n)[0] for n in os.listdir(HERE) if n.endswith(".py")}
    assert imported_modules(os.path.join(HERE, "amplify.py")) & project == {"amplify_extras"}
    assert imported_modules(os.path.join(HERE, "amplify_extras.py")) & project == set()


def test_amplify_runs_without_its_optional_companion(tmp_path):
    """amplify.py copied alone trains the tokenizer on the plain loss head (the chunked one's loss, to
    float rounding) and refuses what needs amplify_extras.py in one line."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "amplify.py"), alone)
    arrays, meta = tiny_data(episodes=2, frames=18, img=32, grid=5)
    preprocess.write_dataset(str(tmp_path / "data"), arrays, meta)
    losses = {}
    for where in (alone, HERE):  # the same seed and data: the first step's loss, plain head vs chunked
        out = tmp_path / ("alone" if where == alone else "with") / "run"
        proc = subprocess.run([sys.executable, os.path.join(where, "amplify.py"), "--stage", "tokenizer", "--data",
                               str(tmp_path / "data"), "--out", str(out), "--steps", "1", "--log-every", "1", "--precision", "fp32"],
                              capture_output=True, text=True, cwd=where, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[where] = [json.loads(r) for r in open(out / "tokenizer_log.jsonl")][0]["loss"]
    assert losses[alone] == pytest.approx(losses[HERE], rel=1e-4)
    refused = [["--stage", "tokenizer", "--log-to", "tensorboard"], ["--stage", "inverse", "--no-codes", "--action-head",
                                                                      "diffusion"]] + [["--stage", "tokenizer", "--vis"]] * HAVE_PIL
    for flags in refused:
        proc = subprocess.run([sys.executable, os.path.join(alone, "amplify.py"), *flags, "--data", str(tmp_path / "data"),
                               "--out", str(tmp_path / "refused"), "--steps", "1"], capture_output=True, text=True,
                              cwd=alone, timeout=600, env=ENV)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
        assert "amplify_extras.py" in proc.stderr


# -----------------------------------------------------------------------------
# The command line, end to end


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "amplify.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=HERE, timeout=600, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


FAST = ["--log-every", "2", "--eval-every", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """--stage all on a small dataset: every stage runs, policy.pt appears."""
    root = tmp_path_factory.mktemp("cli")
    arrays, meta = tiny_data(episodes=4, frames=18, img=32, grid=5)
    preprocess.write_dataset(str(root / "data"), arrays, meta)
    proc = run_cli("--stage", "all", "--data", root / "data", "--out", root / "run", "--steps", "4", *(["--vis"] if HAVE_PIL else []), *FAST)
    return root, proc


def test_cli_stage_all_writes_policy_that_acts(trained):
    root, proc = trained
    for line in ("tokenizer | step 4/4", "forward | step 4/4", "inverse | step 4/4", "inverse_ft | step 2/2",
                 "samples/s", "tokenizer | eval step 4", "delta_auc", "code_acc", "action_mse", "policy:"):
        assert line in proc.stdout, line
    run = root / "run"
    assert {"tokenizer.pt", "forward.pt", "inverse.pt", "inverse_ft.pt", "policy.pt"} <= set(os.listdir(run))
    assert any(f.startswith("vis_forward") and f.endswith(".png") for f in os.listdir(run)) or not HAVE_PIL
    policy = A.Policy.load(str(run / "policy.pt"))
    assert policy.views == ["view0", "view1"] and policy.img_size == (32, 32) and policy.horizon == 16
    policy.reset()
    obs = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)  # resized to 32x32
    actions = [policy.act(obs, np.zeros(9), "move the square right") for _ in range(3)]
    assert all(a.shape == (7,) and a.dtype == np.float32 and np.isfinite(a).all() for a in actions)
    assert policy.last_tracks.shape == (2, 16, 25, 2)
    assert len(policy.ensembler.chunks) == 3
    with pytest.raises(A.UserError, match="expected images"):
        policy.act(obs[:1], np.zeros(9), "x")


def test_policy_precision_follows_the_hardware_and_bf16_stays_close(trained, monkeypatch):
    """Policy(precision=): "auto" runs under bf16 autocast where training would (CUDA, CPUs that
    multiply bf16 natively) for models wide enough to gain, "fp32" / "bf16" force it. Given the same
    codes, the bf16 inverse model's chunk is not bit-identical to fp32's (autocast is on) but within a
    few percent of its scale."""
    root, _ = trained
    run = str(root / "run")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(A, "cpu_has_bf16", lambda: native)
        assert A.policy_uses_bf16("auto", cpu, 768) == native and not A.policy_uses_bf16("auto", cpu, 64)
        assert A.policy_uses_bf16("bf16", cpu, 64) and not A.policy_uses_bf16("fp32", cpu, 768)
    assert A.policy_uses_bf16("auto", cuda, 768) and not A.policy_uses_bf16("auto", cuda, 64)
    monkeypatch.undo()
    assert not A.Policy.load(run).bf16  # the test models are narrow: fp32 on any CPU
    fp32, bf16 = A.Policy.load(run, precision="fp32"), A.Policy.load(run, precision="bf16")
    assert not fp32.bf16 and bf16.bf16
    obs = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    action = bf16.act(obs, np.zeros(9), "move the square right")
    assert action.shape == (7,) and action.dtype == np.float32 and np.isfinite(action).all()
    assert bf16.last_tracks.shape == (2, 16, 25, 2) and np.isfinite(bf16.last_tracks).all()
    x, p = A.resize_images(torch.as_tensor(obs)[None], fp32.img_size), torch.zeros(1, 9)
    with torch.no_grad():
        codes = fp32.forward.generate(x, ["move the square right"])
        ref = fp32.inverse(x, p, codes)
        with bf16._autocast():
            low = bf16.inverse(x, p, codes).float()
    assert not torch.equal(low, ref)
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    with pytest.raises(A.UserError, match="precision"):
        A.Policy.load(run, precision="half")


def test_frozen_vision_trains_from_a_feature_cache_and_the_policy_shares_one_pass(trained, tmp_path):
    """--frozen-vision: the ResNet does not change, its features are computed once per frame into
    OUT/features (one file for both stages, reused by a rerun) and read instead of the images; the
    policy runs one ResNet pass for both models and acts as it would with two."""
    root, _ = trained
    out = tmp_path / "frozen"
    proc = run_cli("--stage", "all", "--data", root / "data", "--out", out, "--steps", "3", "--frozen-vision", *FAST)
    assert proc.stdout.count("features: 72 frames through the frozen encoder") == 1  # forward and inverse share it
    assert len(os.listdir(out / "features")) == 1
    cache = np.load(next((out / "features").iterdir()), mmap_mode="r")
    fwd = A.load_checkpoint(str(out / "forward.pt"), "forward")
    inv = A.load_checkpoint(str(out / "inverse_ft.pt"), "inverse")
    model = A.model_from_checkpoint(fwd)
    fresh = A.ForwardDynamics(A.config_from_dict(A.ForwardConfig, fwd["config"]))
    for k, v in fresh.vision.resnet.state_dict().items():  # frozen: weights and BatchNorm statistics untouched
        assert torch.equal(model.vision.resnet.state_dict()[k], v), k
        assert torch.equal(inv["model"]["vision.resnet." + k], v), k
    images = torch.as_tensor(np.array(A.load_dataset(str(root / "data")).arrays["images"][:5]))
    with torch.no_grad():
        feats = model.vision.features(images)
        cached = torch.as_tensor(np.array(cache[:5])).float()
        assert_close(cached, feats, 1e-2 * feats.abs().max().item())  # stored as float16
        assert torch.equal(model.vision(feats), model.vision(images))  # features in place of images
    rerun = run_cli("--stage", "forward", "--data", root / "data", "--out", out, "--steps", "3", "--frozen-vision",
                    "--resume", *FAST)
    assert "features:" not in rerun.stdout  # the cache is read, not recomputed
    policy = A.Policy.load(str(out / "policy.pt"))
    assert policy.shared_vision
    obs = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    shared = policy.predict_chunk(obs, np.zeros(9), "move the square right")
    policy.shared_vision = False
    assert np.allclose(policy.predict_chunk(obs, np.zeros(9), "move the square right"), shared, atol=1e-5)
    assert not A.Policy.load(str(root / "run" / "policy.pt")).shared_vision  # trained encoders: two passes


def test_policy_acts_in_data_units(trained):
    root, _ = trained
    ckpt = A.load_checkpoint(str(root / "run" / "inverse.pt"), "inverse")
    ds = A.load_dataset(str(root / "data"))
    train_frames = np.arange(ds.episode_range(1)[1])  # episodes 0 and 1 train; 2 and 3 are held out (one per task)
    np.testing.assert_allclose(ckpt["stats"]["actions"]["mean"], ds.arrays["actions"][train_frames].mean(0), atol=1e-5)
    policy = A.Policy.load(str(root / "run"), precision="fp32")  # "auto" is bf16 on CPUs that have it
    chunk = policy.predict_chunk(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9), "x")
    normalized = (chunk - policy.act_norm.center) / policy.act_norm.scale  # actions: the training range onto [-1, 1]
    lo, hi = (ds.arrays["actions"][train_frames].min(0), ds.arrays["actions"][train_frames].max(0))
    np.testing.assert_allclose(policy.act_norm.center, (lo + hi) / 2, atol=1e-5)
    with torch.no_grad():
        p = torch.as_tensor(policy.prop_norm(np.zeros(9, np.float32))[None])
        x = torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8)
        mean = policy.inverse(x, p, policy.forward.generate(x, ["x"]))
    assert_close(normalized, mean[0], 1e-4)


def test_cli_each_stage_and_resume(trained, tmp_path):
    root, _ = trained
    data, out = root / "data", tmp_path / "run"
    run_cli("--stage", "tokenizer", "--data", data, "--out", out, "--steps", "3", *FAST)
    run_cli("--stage", "forward", "--data", data, "--out", out, "--steps", "3", *FAST)
    run_cli("--stage", "inverse", "--data", data, "--out", out, "--steps", "3", "--shots", "1", *FAST)
    run_cli("--stage", "inverse", "--data", data, "--out", out, "--steps", "2", "--predicted-codes", *FAST)
    run_cli("--stage", "inverse", "--data", data, "--out", tmp_path / "bc", "--steps", "2", "--no-codes", *FAST)
    assert A.load_checkpoint(str(out / "inverse.pt"), "inverse")["protocol"]["train_episodes"] == 2
    assert A.load_checkpoint(str(out / "inverse_ft.pt"), "inverse")["predicted_codes"] is True
    bc = A.Policy.load(str(tmp_path / "bc"))
    assert bc.forward is None and bc.act(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9), "x").shape == (7,)


@pytest.mark.parametrize("head", ["diffusion", "flow"])
def test_cli_action_heads_train_fine_tune_and_act_reproducibly(trained, tmp_path, head):
    """A generative head through the command line (codes of true tracks, fine-tuning on predicted
    codes, the inverse-only baseline) and Policy.load: the checkpoint records the head, and a seeded
    policy repeats an episode's actions after reset."""
    root, _ = trained
    out = tmp_path / "run"
    out.mkdir()
    for name in ("tokenizer.pt", "forward.pt"):
        shutil.copy(root / "run" / name, out / name)
    steps = ("--diffusion-sample-steps", "4") if head == "diffusion" else ("--flow-steps", "3")
    common = ["--data", root / "data", "--action-head", head, *steps, *FAST]
    proc = run_cli("--stage", "inverse", "--out", out, "--steps", "3", *common)
    assert f"head: {head}" in proc.stdout and "val_loss" in proc.stdout and "action_mse" in proc.stdout
    run_cli("--stage", "inverse", "--out", out, "--steps", "2", "--predicted-codes", *common)
    config = A.load_checkpoint(str(out / "inverse_ft.pt"), "inverse")["config"]
    assert config["head"] == head and config[steps[0][2:].replace("-", "_")] == int(steps[1])

    obs = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)

    def episode(policy):
        policy.reset()
        return np.stack([policy.act(obs, np.zeros(9), "move the square right") for _ in range(3)])

    policy = A.Policy.load(str(out))
    first = episode(policy)
    assert first.shape == (3, 7) and np.isfinite(first).all()
    np.testing.assert_array_equal(episode(policy), first)
    assert not np.allclose(episode(A.Policy.load(str(out), seed=1)), first)

    run_cli("--stage", "inverse", "--out", tmp_path / "bc", "--steps", "2", "--no-codes", *common)
    bc = A.Policy.load(str(tmp_path / "bc"))
    assert bc.forward is None and bc.inverse.cfg.head == head and np.isfinite(episode(bc)).all()

    bad = run_cli("--stage", "inverse", "--out", tmp_path / "x", "--diffusion-sample-steps", "101", *common[:2],
                  check=False)
    assert bad.returncode == 2 and "--diffusion-sample-steps: expected 1 to 100 DDIM steps" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_training_data_and_policy_act_see_identical_pixels(trained):
    """A frame at another size reaches the model exactly as preprocessing stored it in the dataset
    (and as the real robot's camera path resizes it): one resize, amplify.resize_images."""
    real_robot = need("real_robot")

    root, _ = trained
    policy = A.Policy.load(str(root / "run"))  # trained on 32x32
    raw = np.random.default_rng(1).integers(0, 255, (2, 48, 48, 3), dtype=np.uint8)
    stored = np.stack([preprocess.fit_square(view[None], 32)[0] for view in raw])  # (V, 32, 32, 3) as in a dataset
    seen = []
    hook = policy.inverse.vision.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        policy.act(raw, np.zeros(9), "move the square right")
    finally:
        hook.remove()
    np.testing.assert_array_equal(seen[0][0].cpu().numpy(), stored)
    np.testing.assert_array_equal(np.stack([real_robot.resize(view, (32, 32)) for view in raw]), stored)


def test_interrupted_training_resumes_exactly(trained, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the step-3 checkpoint, then --resume: the same weights as an uninterrupted run."""
    root, _ = trained
    common = ["--stage", "tokenizer", "--data", str(root / "data"), "--steps", "6", *FAST]
    real_get_lr = A.get_lr

    def interrupt_at_step_4(step, cfg):
        if step == 4:
            raise KeyboardInterrupt
        return real_get_lr(step, cfg)

    monkeypatch.setattr(A, "get_lr", interrupt_at_step_4)
    with pytest.raises(SystemExit) as exit_info:
        A.main(common + ["--out", str(tmp_path / "a")])
    assert exit_info.value.code == 130
    assert A.load_checkpoint(str(tmp_path / "a" / "tokenizer.pt"), "tokenizer")["step"] == 3
    monkeypatch.setattr(A, "get_lr", real_get_lr)
    A.main(common + ["--out", str(tmp_path / "a"), "--resume"])
    assert "resumed from" in capsys.readouterr().out
    A.main(common + ["--out", str(tmp_path / "b")])
    a = A.load_checkpoint(str(tmp_path / "a" / "tokenizer.pt"), "tokenizer")
    b = A.load_checkpoint(str(tmp_path / "b" / "tokenizer.pt"), "tokenizer")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert_close(a["model"][k], b["model"][k], 1e-6, k)


def test_old_checkpoints_are_refused_with_one_line(trained, tmp_path):
    """Checkpoints of the earlier layout (codes through an index embedding, one decoder query per
    point) have no 'format'; they are refused, never loaded into the new models."""
    root, _ = trained
    run = root / "run"
    old = {}
    for stage in ("tokenizer", "forward", "inverse"):
        ckpt = A.load_checkpoint(str(run / f"{stage}.pt"), stage)
        assert ckpt["format"] == A.CHECKPOINT_FORMAT
        ckpt.pop("format")
        old[stage] = tmp_path / f"old_{stage}.pt"
        torch.save(ckpt, old[stage])
    for stage, args in (("tokenizer", ["--stage", "forward", "--tokenizer", old["tokenizer"]]),
                        ("forward", ["--stage", "inverse", "--predicted-codes", "--forward", old["forward"],
                                     "--init", run / "inverse.pt"]),
                        ("inverse", ["--stage", "inverse", "--predicted-codes", "--init", old["inverse"]])):
        proc = run_cli(*args, "--data", root / "data", "--out", tmp_path / "out", "--steps", "1", *FAST, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "expected format 3, found format 1" in proc.stderr, proc.stderr
        assert f"retrain the {stage} stage" in proc.stderr
    bundle = A.load_checkpoint(str(run / "policy.pt"), "policy")
    bundle["forward"].pop("format")
    torch.save(bundle, tmp_path / "old_policy.pt")
    with pytest.raises(A.DataError, match=r"old_policy.pt \(forward\): expected format 3, found format 1"):
        A.load_policy(str(tmp_path / "old_policy.pt"))


def test_both_finetuning_protocols_end_to_end(trained, tmp_path):
    """paper: inverse on true codes, then fine-tuned on predicted codes (the fixture's --stage all);
    published: one inverse model trained from scratch on predicted codes. Both report the held-out
    action error with true and with predicted codes."""
    root, proc = trained
    paper = A.load_checkpoint(str(root / "run" / "inverse_ft.pt"), "inverse")
    assert paper["predicted_codes"] and paper["codes_protocol"] == "paper"
    for line in ("inverse | eval step 4", "action_mse_true", "action_mse_pred", "still_moving_px", "moving_px"):
        assert line in proc.stdout, line
    out = tmp_path / "published"
    proc = run_cli("--stage", "all", "--protocol", "published", "--data", root / "data", "--out", out, "--steps", "3",
                   *FAST)
    assert "inverse_ft | step 3/3" in proc.stdout and "codes: forward-predicted, from scratch" in proc.stdout
    assert "inverse | " not in proc.stdout and not (out / "inverse.pt").exists()  # no true-code stage
    published = A.load_checkpoint(str(out / "inverse_ft.pt"), "inverse")
    assert published["predicted_codes"] and published["codes_protocol"] == "published" and published["step"] == 3
    action = A.load_policy(str(out)).act(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9), "move the square right")
    assert action.shape == (7,) and np.isfinite(action).all()
    proc = run_cli("--stage", "all", "--protocol", "published", "--finetune-steps", "2", "--data", root / "data",
                   "--out", out, *FAST, check=False)
    assert proc.returncode == 2 and "--finetune-steps" in proc.stderr


def test_stages_train_from_python_with_dataclasses(trained, tmp_path):
    """The stage functions need no argparse namespace: dataclass configs in, checkpoints out, and
    the result is the policy the CLI would build."""
    root, _ = trained
    corpus = A.load_corpus([str(root / "data")])
    preset = A.PRESETS["cpu"]
    train = A.TrainConfig(steps=2, batch_size=4, log_every=2, eval_every=2, eval_samples=4)
    run = A.RunConfig(seed=0, device="cpu")
    out = str(tmp_path / "py")
    tokenizer = A.train_tokenizer(corpus, preset["tokenizer"], out, train, run)
    A.train_forward(corpus, preset["forward"], out, train, run)
    A.train_inverse(corpus, preset["inverse"], out, train, run)
    A.train_inverse(corpus, preset["inverse"], out, train, run, codes="pred", init=os.path.join(out, "inverse.pt"))
    assert tokenizer.cfg.grid == 5 and tokenizer.cfg.img_size == (32, 32)  # data fields come from the corpus
    assert {"tokenizer.pt", "forward.pt", "inverse.pt", "inverse_ft.pt"} <= set(os.listdir(out))
    assert A.load_checkpoint(os.path.join(out, "inverse_ft.pt"), "inverse")["predicted_codes"] is True
    A.write_policy(out)
    action = A.load_policy(out).act(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9), "move the square right")
    assert action.shape == (7,) and np.isfinite(action).all()
    with pytest.raises(A.UserError, match="found no"):
        A.load_policy(str(tmp_path / "missing"))


def test_count_params_cli():
    proc = run_cli("--stage", "inverse", "--preset", "paper", "--count-params")
    assert proc.stdout.strip().startswith("params: ")
    assert abs(int(proc.stdout.split()[1]) - PUBLISHED_COUNTS["inverse"]) / PUBLISHED_COUNTS["inverse"] < 0.01


def tree_digest(path):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def assert_refused(proc, *phrases):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def test_cli_rejects_bad_input_and_leaves_files_alone(trained, tmp_path):
    root, _ = trained
    run, data = root / "run", root / "data"
    digest = tree_digest(run)
    assert_refused(run_cli("--stage", "tokenizer", "--data", tmp_path / "nope", "--out", run, check=False),
                   "does not exist")
    arrays, meta = tiny_data(episodes=4, frames=18, img=32, grid=5)
    nan = dict(arrays, tracks=arrays["tracks"].copy())
    nan["tracks"][5, 1, 3, 2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", meta_json=np.array(__import__("json").dumps(meta)), **nan)
    assert_refused(run_cli("--stage", "tokenizer", "--data", tmp_path / "nan.npz", "--out", run, "--overwrite",
                           check=False),
                   "'tracks'", "finite", "frame 5")
    unordered = dict(arrays, episode_ends=arrays["episode_ends"][[0, 2, 1, 3]])
    np.savez(tmp_path / "ends.npz", meta_json=np.array(__import__("json").dumps(meta)), **unordered)
    assert_refused(run_cli("--stage", "tokenizer", "--data", tmp_path / "ends.npz", "--out", run, "--overwrite",
                           check=False),
                   "'episode_ends'", "increasing")
    missing = {k: v for k, v in arrays.items() if k != "images"}
    np.savez(tmp_path / "missing.npz", meta_json=np.array(__import__("json").dumps(meta)), **missing)
    assert_refused(run_cli("--stage", "tokenizer", "--data", tmp_path / "missing.npz", "--out", run, "--overwrite",
                           check=False),
                   "missing key 'images'")
    # A checkpoint of another stage where a tokenizer is expected.
    assert_refused(run_cli("--stage", "forward", "--data", data, "--out", run, "--tokenizer", run / "forward.pt",
                           "--overwrite", check=False), "expected stage 'tokenizer'", "found 'forward'")
    # A checkpoint trained with other views / image size than the data.
    one_view, meta1 = tiny_data(episodes=4, frames=18, img=32, grid=5, views=1)
    preprocess.write_dataset(str(tmp_path / "oneview"), one_view, meta1)
    assert_refused(run_cli("--stage", "forward", "--data", tmp_path / "oneview", "--out", run, "--overwrite", check=False),
                   "views=['view0', 'view1']", "views=['view0']")
    other_size, meta2 = tiny_data(episodes=4, frames=18, img=16, grid=5)
    preprocess.write_dataset(str(tmp_path / "small"), other_size, meta2)
    assert_refused(run_cli("--stage", "inverse", "--data", tmp_path / "small", "--out", run, "--overwrite", check=False),
                   "img_size=[32, 32]", "img_size=[16, 16]")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_refused(run_cli("--stage", "forward", "--data", data, "--out", run, "--tokenizer", tmp_path / "junk.pt",
                           "--overwrite", check=False), "could not read")
    assert_refused(run_cli("--stage", "all", "--data", os.path.join(HERE, "README.md"), "--out", tmp_path / "r",
                           check=False), "expected a directory", ".npz", "README.md")
    assert tree_digest(run) == digest


def copy_run(root, dst):
    import shutil
    shutil.copytree(root / "run", dst)
    return dst


@pytest.mark.parametrize("args", [["--stage", "tokenizer"], ["--stage", "forward"], ["--stage", "inverse"],
                                  ["--stage", "inverse", "--predicted-codes"], ["--stage", "all"],
                                  ["--stage", "tokenizer", "--resume", "--overwrite"]])
def test_existing_checkpoint_refused_without_resume_or_overwrite(trained, tmp_path, args):
    """Issue 14: re-running a stage into its directory replaced tokenizer.pt and kept the models
    trained on the old one. Now: one line naming the flags, before any work, every file unchanged."""
    root, _ = trained
    run = copy_run(root, tmp_path / "run")
    digest = tree_digest(run)
    proc = run_cli(*args, "--data", root / "data", "--out", run, "--steps", "2", *FAST, check=False)
    assert_refused(proc, "--resume", "--overwrite")
    assert tree_digest(run) == digest


def test_overwrite_removes_what_was_trained_on_the_old_model_and_mixes_are_refused(trained, tmp_path):
    root, _ = trained
    run = copy_run(root, tmp_path / "run")
    old_forward = A.load_checkpoint(str(run / "forward.pt"), "forward")
    proc = run_cli("--stage", "tokenizer", "--data", root / "data", "--out", run, "--steps", "3", "--overwrite", *FAST)
    assert "removed" in proc.stdout
    left = set(os.listdir(run))
    assert {"tokenizer.pt", "tokenizer_metrics.jsonl"} | ({"tokenizer_curves.png"} if HAVE_PIL else set()) <= left
    assert not left & {"forward.pt", "inverse.pt", "inverse_ft.pt", "policy.pt", "forward_metrics.jsonl"}, left
    assert not [f for f in left if f.startswith(("vis_forward", "vis_tokenizer"))], left  # --vis was not asked for
    assert [r["step"] for r in A.read_jsonl(str(run / "tokenizer_metrics.jsonl"))] == [3]  # this run only
    # Trained on the new tokenizer: an inverse model. The old forward model, put back by hand, is refused.
    run_cli("--stage", "inverse", "--data", root / "data", "--out", run, "--steps", "2", *FAST)
    A.save_checkpoint(str(run / "forward.pt"), old_forward)
    digest = tree_digest(run)
    proc = run_cli("--stage", "inverse", "--predicted-codes", "--data", root / "data", "--out", run, "--steps", "2",
                   *FAST, check=False)
    assert_refused(proc, "inverse.pt", "forward.pt", "tokenizer")
    proc = run_cli("--stage", "forward", "--data", root / "data", "--out", run, "--steps", "2", "--resume", *FAST,
                   check=False)
    assert_refused(proc, "forward.pt", "tokenizer", "--overwrite")
    assert tree_digest(run) == digest
    with pytest.raises(A.DataError, match="trained with tokenizer"):
        A.Policy.load(str(run))  # a directory of mixed stages
    with pytest.raises(A.DataError, match="trained with tokenizer"):
        A.write_policy(str(run))
    assert not (run / "policy.pt").exists()
    old = A.load_checkpoint(str(root / "run" / "policy.pt"), "policy")  # a bundle mixed by hand
    mixed = {**old, "tokenizer": A.load_checkpoint(str(run / "tokenizer.pt"), "tokenizer")}
    A.save_checkpoint(str(tmp_path / "mixed.pt"), mixed)
    with pytest.raises(A.DataError, match=r"mixed\.pt.*trained with tokenizer [0-9a-f]{12}.*tokenizer [0-9a-f]{12}"):
        A.Policy.load(str(tmp_path / "mixed.pt"))
    A.Policy.load(str(root / "run" / "policy.pt"))  # the consistent one still loads


def test_metrics_files_hold_one_run(trained, tmp_path):
    """A fresh run starts its metrics and progress files anew; --overwrite too."""
    root, _ = trained
    out = tmp_path / "run"
    common = ["--stage", "tokenizer", "--data", root / "data", "--out", out, *FAST]
    run_cli(*common, "--steps", "6")
    assert [r["step"] for r in A.read_jsonl(str(out / "tokenizer_metrics.jsonl"))] == [3, 6]
    run_cli(*common, "--steps", "3", "--overwrite")
    assert [r["step"] for r in A.read_jsonl(str(out / "tokenizer_metrics.jsonl"))] == [3]
    assert [r["step"] for r in A.read_jsonl(str(out / "tokenizer_log.jsonl"))] == [2, 3]


def test_progress_summary_curves_and_labelled_pictures(trained):
    Image = need("PIL.Image")

    root, proc = trained
    assert "elapsed 0:" in proc.stdout and "| eta " in proc.stdout
    for stage, reference in (("tokenizer", "nothing moves"), ("forward", "nothing moves"), ("inverse", "mean action")):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"{stage} | done:"))
        assert "steps in" in line and "held-out" in line and reference in line, line
    run = root / "run"
    for stage in ("tokenizer", "forward", "inverse", "inverse_ft"):
        assert Image.open(run / f"{stage}_curves.png").size[0] >= 300
    vis = np.asarray(Image.open(run / sorted(f for f in os.listdir(run) if f.startswith("vis_forward"))[-1]))
    strip = vis[:12].astype(float)  # the label strip on top of the first view: dark, with bright text
    assert vis.shape[0] > 2 * 128 and strip.max() > 200 and strip.mean() < 80, (strip.max(), strip.mean())


def test_help_shows_each_default_once():
    text = run_cli("--help").stdout
    entries = re.split(r"\n  (?=-)", text)
    assert all(e.count("default") <= 1 for e in entries), [e for e in entries if e.count("default") > 1]
    assert "(default: cpu)" in text


def test_policy_carries_action_layout_and_ranges(trained, tmp_path):
    """real_robot.check_policy refuses a policy whose actions are in other units: the inverse
    checkpoint carries the dataset's meta["action_layout"] and min/max of the training actions."""
    root, _ = trained
    policy = A.Policy.load(str(root / "run"))
    ds = A.load_dataset(str(root / "data"))
    train_rows = ds.arrays["actions"][: ds.episode_range(1)[1]]  # episodes 0 and 1 train
    np.testing.assert_allclose(policy.action_range["min"], train_rows.min(0), atol=1e-6)
    np.testing.assert_allclose(policy.action_range["max"], train_rows.max(0), atol=1e-6)
    assert policy.proprio_range["min"].shape == (9,) and policy.action_layout is None
    arrays, meta = tiny_data(episodes=4, frames=18, img=32, grid=5)
    preprocess.write_dataset(str(tmp_path / "data"), arrays, {**meta, "action_layout": "xyz_gripper"})
    run_cli("--stage", "inverse", "--no-codes", "--data", tmp_path / "data", "--out", tmp_path / "bc", "--steps", "1",
            *FAST)
    assert A.Policy.load(str(tmp_path / "bc")).action_layout == "xyz_gripper"


def test_log_to_tensorboard_holds_the_jsonl_values(trained, tmp_path):
    """--log-to tensorboard: the progress rows, held-out metrics and curves, read back from the event files."""
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained
    out = tmp_path / "tb"
    run_cli("--stage", "tokenizer", "--data", root / "data", "--out", out, "--steps", "3", "--log-to", "tensorboard",
            *FAST)
    events = EventAccumulator(str(out / "tensorboard" / "tokenizer"), size_guidance={"images": 0}).Reload()
    log, metrics = A.read_jsonl(str(out / "tokenizer_log.jsonl")), A.read_jsonl(str(out / "tokenizer_metrics.jsonl"))
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(r["step"], round(r["loss"], 5)) for r in log]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("val/delta_auc")] == \
        [(r["step"], round(r["delta_auc"], 5)) for r in metrics]
    if HAVE_PIL:
        assert [e.step for e in events.Images("curves")] == [3]


def test_log_to_wandb_offline_holds_the_jsonl_values(trained, tmp_path):
    """--log-to wandb runs offline without a network or login (OUT/wandb); the logged values, read
    back from the run file, are the JSONL's."""
    need("wandb")
    root, _ = trained
    out = tmp_path / "wb"
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "amplify.py"), "--stage", "tokenizer", "--data",
                           str(root / "data"), "--out", str(out), "--steps", "3", "--log-to", "wandb",
                           *map(str, FAST)], capture_output=True, text=True, env={**env, "WANDB_SILENT": "true"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    data = runs[0].read_bytes()
    # A history item is the key, then its value as JSON in protobuf field 16 (tag bytes 0x82 0x01, a length byte).
    logged = [float(data[m.end():m.end() + m.group(1)[0]]) for m in re.finditer(rb"train/loss\x82\x01(.)", data, re.S)]
    assert sorted(set(round(v, 5) for v in logged)) == \
        sorted(round(r["loss"], 5) for r in A.read_jsonl(str(out / "tokenizer_log.jsonl")))


def test_goal_conditioned_baseline_reads_the_task_text(trained, tmp_path):
    """--no-codes --goal-conditioned: behaviour cloning that also reads the task (the paper's baselines
    are goal-conditioned). AMPLIFY's own inverse model reads no goal."""
    root, _ = trained
    proc = run_cli("--stage", "inverse", "--no-codes", "--goal-conditioned", "--data", root / "data",
                   "--out", tmp_path / "gc", "--steps", "2", *FAST)
    assert "codes: none (goal-conditioned baseline)" in proc.stdout and "task text read" in proc.stdout
    obs, proprio = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9)
    goal = A.Policy.load(str(tmp_path / "gc"))
    assert goal.inverse.cfg.goal and goal.forward is None
    a, b = goal.predict_chunk(obs, proprio, "move the square right"), goal.predict_chunk(obs, proprio, "open drawer")
    assert np.isfinite(a).all() and not np.allclose(a, b)
    assert not A.Policy.load(str(root / "run")).inverse.cfg.goal


def test_readme_python_example_runs_as_written(trained, tmp_path, monkeypatch):
    """The README's Policy example, executed with its run directory pointed at a trained one."""
    import shutil
    import textwrap

    root, _ = trained
    readme = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "Policy.load(" in b)
    (tmp_path / "runs").mkdir()
    shutil.copytree(root / "run", tmp_path / "runs" / "metaworld")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(textwrap.dedent(example), "README.md", "exec"), scope)
    assert scope["action"].shape == (7,) and np.isfinite(scope["action"]).all()


# -----------------------------------------------------------------------------
# Pretrained encoders (optional): real loading code, on weights the test makes


def test_hugging_face_text_encoder_from_a_local_model(trained, tmp_path, monkeypatch):
    """--text-encoder PATH: frozen, mean-pooled, cached in the checkpoint; new tasks embed lazily."""
    transformers = need("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "move", "the", "square", "right", "down", "reach"]
    model_dir = tmp_path / "tiny-bert"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(vocab))
    transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(str(model_dir))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(model_dir))
    root, _ = trained
    out = tmp_path / "run"
    for stage in ("tokenizer", "forward", "inverse"):
        run_cli("--stage", stage, "--data", root / "data", "--out", out, "--steps", "2", "--text-encoder", model_dir, *FAST)
    ckpt = A.load_checkpoint(str(out / "forward.pt"), "forward")
    assert ckpt["config"]["text_encoder"] == str(model_dir) and ckpt["config"]["text_dim"] == 16
    assert set(ckpt["text_cache"]) == {"move the square right", "move the square down"}
    policy = A.Policy.load(str(out))
    assert "reach" not in policy.forward.text.cache
    policy.act(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(9), "reach")
    assert policy.forward.text.cache["reach"].shape == (16,)


def test_resnet18_weights_load_from_a_state_dict(tmp_path):
    torch.manual_seed(0)
    source = A.ResNet((64, 128, 256, 512), (2, 2, 2, 2))
    state = {**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pt")
    target = A.ResNet((64, 128, 256, 512), (2, 2, 2, 2))
    A.load_resnet18_weights(target, str(tmp_path / "resnet18.pt"))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    with pytest.raises(A.UserError, match="ResNet-18 weights need widths"):
        A.load_resnet18_weights(A.ResNet((16, 32, 64, 128), (1, 1, 1, 1)), str(tmp_path / "resnet18.pt"))
    with pytest.raises(A.UserError, match="expected 'torchvision', 'timm' or an existing file"):
        A.load_resnet18_weights(target, str(tmp_path / "missing.pt"))


# -----------------------------------------------------------------------------
# Scale: torchrun DDP on CPU, datasets larger than memory, the benchmark command


def test_torchrun_two_cpu_ranks_match_a_single_process(trained, tmp_path):
    """Two gloo ranks each train on half of the global batch: same losses, same weights."""
    root, _ = trained
    common = ["--stage", "tokenizer", "--data", root / "data", "--steps", "3", "--batch-size", "4",
              "--log-every", "1", "--eval-every", "3", "--precision", "fp32"]  # bf16 would round halves differently
    import socket
    with socket.socket() as sock:  # a free port, not a fixed one another job may hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(HERE, "amplify.py"), *map(str, common), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_cli(*common, "--out", tmp_path / "one")
    def losses(out):
        return np.array([float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if "| loss " in line])

    assert len(losses(proc.stdout)) == 3
    assert_close(losses(proc.stdout), losses(single.stdout), 2e-4 * np.abs(losses(single.stdout)).max(), "losses")
    assert "ddp: 2 ranks, max weight difference 0" in proc.stdout  # both ranks hold identical weights
    assert proc.stdout.count("tokenizer | step 1/3") == 1  # only rank 0 logs
    a = A.load_checkpoint(str(tmp_path / "ddp" / "tokenizer.pt"), "tokenizer")
    b = A.load_checkpoint(str(tmp_path / "one" / "tokenizer.pt"), "tokenizer")
    for k in a["model"]:
        assert_close(a["model"][k], b["model"][k], 1e-4, k)  # all-reduce sums in another order


def test_main_closes_only_the_process_group_it_did_not_find(tmp_path):
    """amplify.main leaves torchrun's group closed at exit, but a caller's own group stays open."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        A.main(["--stage", "tokenizer", "--count-params"])
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


BIG_DATA_SCRIPT = r"""
import json, os, resource, sys
import numpy as np
import amplify as A
path = sys.argv[1]
os.makedirs(path)
F, V, T, N, H = 29500, 2, 16, 400, 64   # tracks: 29500 * 2 * 16 * 400 * 2 * 4 bytes = 3.0 GB
# Sparse files: the arrays take no disk until written, but every byte is read back as data.
tracks = np.lib.format.open_memmap(os.path.join(path, "tracks.npy"), "w+", np.float32, (F, V, T, N, 2))
images = np.lib.format.open_memmap(os.path.join(path, "images.npy"), "w+", np.uint8, (F, V, H, H, 3))
tracks[-1, 0, 3, :5] = 0.25  # some motion in the very last window
del tracks, images
np.save(os.path.join(path, "episode_ends.npy"), np.linspace(F // 100, F, 100).astype(np.int64))
np.save(os.path.join(path, "tasks.npy"), np.array(["a", "b"] * 50))
with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump({"views": ["a", "b"], "img_size": [H, H], "T": T, "grid": 20}, f)
assert os.path.getsize(os.path.join(path, "tracks.npy")) > 3e9
A.main(["--stage", "tokenizer", "--data", path, "--out", path + "-run", "--steps", "3", "--batch-size", "4",
        "--eval-every", "3", "--log-every", "1"])
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_training_on_a_3gb_tracks_file_stays_under_1_5gb_resident(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BIG_DATA_SCRIPT, str(tmp_path / "big")], capture_output=True,
                          text=True, cwd=HERE, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer | step 3/3" in proc.stdout and "eval step 3" in proc.stdout
    peak = float(proc.stdout.split("peak_rss_mb")[1])
    assert peak < 1536, f"peak resident memory {peak:.0f} MB"


def test_bench_prints_its_figures():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--steps", "1", "--batch-size", "2"],
                          capture_output=True, text=True, cwd=HERE, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and "|" not in line)
    for name in ("tokenizer_train_samples_per_s", "forward_train_samples_per_s", "inverse_train_samples_per_s",
                 "tokenizer_plain_ce_fp32_train_samples_per_s", "tokenizer_speedup_vs_plain_ce_fp32",
                 "forward_frozen_cached_speedup", "inverse_frozen_cached_speedup", "forward_peak_memory_mb",
                 "forward_frozen_cached_peak_memory_mb", "peak_memory_mb", "sample_ms_cached", "sample_ms_uncached",
                 "kv_cache_speedup", "policy_step_ms", "policy_step_ms_frozen_shared", "policy_shared_vision_speedup"):
        assert float(figures[name]) > 0, name
    for name in ("data_wait_share_inline", "data_wait_share_prefetch"):
        assert 0 <= float(figures[name]) < 1, name
    assert figures["kv_cache_identical_codes"] == "True"
    assert figures["policy_shared_vision"] == "True"
