"""Parity with the published AMPLIFY code: `pytest test_official.py`.

official/fixture.pt holds the three published models (pairlab/AMPLIFY f4bcc46) at a small config
with random weights, the inputs they were run on and what they returned (official/README.md). The
published checkpoints are rebuilt from it as its training scripts save them (`model` + `config`),
and as a bundle; import_official.py converts them, and our models must give the published outputs
on the same inputs: codes, decoder logits, forward logits and greedy codes, the inverse model's
action mean and loss, the vision tokens. The published code is not needed to run this.
"""
import os
import subprocess
import sys

import pytest
import torch
from einops import rearrange

import amplify as A
import import_official as I

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = torch.load(os.path.join(HERE, "official", "fixture.pt"), weights_only=True)
TOL = 1e-4  # the bound on outputs in fp32 (max abs difference)


def max_diff(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def resnet_weights():
    """The fixture's ResNet-18, redrawn from its recipe (the weights are not stored) and checked."""
    state = {}
    for r in FIXTURE["vision"]["resnet_recipe"]:
        g = torch.Generator().manual_seed(r["seed"])
        draw = torch.randn if r["kind"] == "normal" else torch.rand
        t = r["offset"] + r["scale"] * draw(r["shape"], generator=g)
        total, absolute = FIXTURE["vision"]["resnet_checksums"][r["key"]]
        assert abs(t.double().sum().item() - total) <= 1e-6 * max(1.0, abs(absolute))
        state[r["key"]] = t
    return state  # the published names: model.0.weight ... (what a bundle holds under img_encoder.)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published checkpoints as files: three stage checkpoints, a bundle, and the ResNet-18 in
    torchvision's names (what --vision-weights reads)."""
    d = tmp_path_factory.mktemp("published")
    paths = {}
    for stage in ("tokenizer", "forward", "inverse"):
        paths[stage] = str(d / f"{stage}.pt")
        torch.save({"model": FIXTURE[stage]["state_dict"], "config": FIXTURE[stage]["config"], "epoch": 3}, paths[stage])
    resnet = resnet_weights()
    paths["resnet"] = str(d / "resnet18.pt")
    torch.save(I.official_resnet(resnet, prefix="model."), paths["resnet"])
    model = {f"img_encoder.{k}": v for k, v in resnet.items()}
    for stage, prefix in (("tokenizer", "motion_tokenizer."), ("forward", "forward_dynamics."),
                          ("inverse", "inverse_dynamics.")):
        model.update({prefix + k: v for k, v in FIXTURE[stage]["state_dict"].items()})
    config = {"motion_tokenizer_cfg": FIXTURE["tokenizer"]["config"], "forward_dynamics_cfg": FIXTURE["forward"]["config"],
              "inverse_dynamics_cfg": FIXTURE["inverse"]["config"], "vision_encoder_cfg": {}, "text_encoder_cfg": {}}
    paths["bundle"] = str(d / "bundle.pt")
    torch.save({"config": config, "model": model, "metadata": {}}, paths["bundle"])
    return paths


@pytest.fixture(scope="module", params=["stages", "bundle"])
def imported(request, published, tmp_path_factory):
    """Our checkpoints converted from the published stage checkpoints or from the bundle."""
    out = str(tmp_path_factory.mktemp("imported"))
    if request.param == "stages":
        I.import_official([published[s] for s in ("tokenizer", "forward", "inverse")], out, published["resnet"])
    else:
        I.import_official([published["bundle"]], out)
    return {s: A.load_checkpoint(os.path.join(out, s + ".pt"), s) for s in ("tokenizer", "forward", "inverse")}, out


def our_tracks(traj, grid):
    """Published tracks (..., N, (row, col)), points column-major -> ours (..., N, (x, y)), row-major."""
    return traj[..., I.official_point_order(grid), :].flip(-1)


def test_tokenizer_gives_the_published_codes_logits_tracks_and_loss(imported):
    ckpts, _ = imported
    model = A.model_from_checkpoint(ckpts["tokenizer"])
    fx, grid = FIXTURE["tokenizer"], ckpts["tokenizer"]["config"]["grid"]
    tracks, perm = our_tracks(fx["inputs"]["traj"], grid), I.official_point_order(grid)
    with torch.no_grad():
        codes, indices = model.encode(tracks)
        logits = model.decode_logits(codes)  # (B, V, L, N, Cw), our points
        recon = model.decode(indices, tracks[:, :, 0])  # argmax readout, the published one
        loss = model.loss(tracks)[0]
    B, V, L, N = logits.shape[:4]
    theirs = rearrange(fx["outputs"]["logits"], "b (v l n) c -> b v l n c", v=V, l=L)[:, :, :, perm]
    assert torch.equal(indices, fx["outputs"]["indices"].long())
    assert max_diff(codes, fx["outputs"]["fsq_codes"]) < TOL
    assert max_diff(logits, theirs) < TOL
    assert max_diff(recon, our_tracks(fx["outputs"]["traj_recon"], grid)) < TOL
    assert max_diff(loss, fx["outputs"]["loss"]) < TOL  # views weighted 0.9 / 0.1, as the published config says
    assert ckpts["tokenizer"]["config"]["view_weights"] == [0.9, 0.1] or tuple(ckpts["tokenizer"]["config"]["view_weights"]) == (0.9, 0.1)


def forward_inputs(ckpt):
    """The fixture's image tokens (B, V*cells, 512) as our feature maps (B, V, C, h, w), its text
    embeddings as a T5 cache (no T5 weights here), one made-up task per row."""
    fx, V = FIXTURE["forward"], len(ckpt["data"]["views"])
    tokens = fx["inputs"]["image_tokens"]
    side = int((tokens.shape[1] // V) ** 0.5)
    feats = rearrange(tokens, "b (v h w) c -> b v c h w", v=V, h=side)
    tasks = [f"task {i}" for i in range(tokens.shape[0])]
    return feats, tasks, {t: e[0] for t, e in zip(tasks, fx["inputs"]["text_emb"])}


def test_forward_model_gives_the_published_logits_and_greedy_codes(imported):
    ckpts, _ = imported
    model = A.model_from_checkpoint(ckpts["forward"])
    assert model.cfg.text_encoder == "t5-small" and model.head.out_features == 2048  # 2048 classes, as published
    feats, tasks, cache = forward_inputs(ckpts["forward"])
    model.text.cache = cache
    fx = FIXTURE["forward"]
    targets = fx["inputs"]["targets"].long()
    with torch.no_grad():
        logits = model.logits(model.condition(feats, tasks), targets[:, :-1])
        loss = model.loss(feats, tasks, targets)[0]
        greedy = model.generate(feats, tasks)
        uncached = model.generate(feats, tasks, use_cache=False)
    assert max_diff(logits, fx["outputs"]["logits"]) < TOL
    assert max_diff(loss, fx["outputs"]["loss"]) < TOL
    assert torch.equal(greedy, fx["outputs"]["ar_indices"].long()) and torch.equal(uncached, greedy)
    assert (greedy >= 1920).any()  # the published quirk the fixture pins: classes past FSQ's 1920 codes, wrapped


def test_inverse_model_gives_the_published_action_mean_and_loss(imported):
    ckpts, _ = imported
    model = A.model_from_checkpoint(ckpts["inverse"])
    fx, V = FIXTURE["inverse"], len(ckpts["inverse"]["data"]["views"])
    tokens = fx["inputs"]["image_tokens"]  # (B, cells, V*512): the views side by side in each cell
    side = int(tokens.shape[1] ** 0.5)
    feats = rearrange(tokens, "b (h w) (v c) -> b v c h w", v=V, h=side)
    proprio, codes, actions = fx["inputs"]["proprio"][:, 0], fx["inputs"]["code_indices"].long(), fx["inputs"]["actions"]
    with torch.no_grad():
        mean = model(feats, proprio, codes)
        loss = model.loss(feats, proprio, codes, actions, torch.ones(actions.shape[:2]))[0]
    assert max_diff(mean, fx["outputs"]["mean"]) < TOL
    assert abs(loss.item() - fx["outputs"]["loss"].item()) < TOL * max(1.0, abs(fx["outputs"]["loss"].item()))
    # The published inverse model reads codes through the tokenizer's project_out, which its checkpoint lacks.
    assert torch.equal(model.code_in.proj.weight, FIXTURE["tokenizer"]["state_dict"]["quantize.project_out.weight"])


def test_vision_encoder_gives_the_published_tokens():
    """128 px frames in [0, 1], resized to 224 (bilinear, no antialias), ResNet-18, no ImageNet normalization."""
    fx = FIXTURE["vision"]
    images = fx["inputs"]["images"]  # (1, V, 128, 128, 3) uint8
    enc = A.VisionEncoder(A.VisionConfig(**A.RESNET18, upsample=224, frozen=True), images.shape[1], (128, 128))
    enc.resnet.load_state_dict(I.official_resnet(resnet_weights(), prefix="model."))
    with torch.no_grad():
        tokens = rearrange(enc.eval()(images), "b v c h w -> (b v) (h w) c")
    theirs = fx["outputs"]["tokens"]
    assert max_diff(tokens, theirs) < TOL * theirs.abs().max().item()  # relative: values up to ~20


def test_imported_checkpoints_make_a_policy_and_keep_the_published_config(imported):
    ckpts, out = imported
    assert os.path.exists(os.path.join(out, "policy.pt"))
    policy = A.Policy.load(out, precision="fp32")
    assert policy.views == ["agentview", "eye_in_hand"] and policy.horizon == 16
    cfg = ckpts["tokenizer"]["config"]
    assert (cfg["d_model"], cfg["n_layer"], cfg["n_head"], cfg["readout"]) == (32, 2, 2, "argmax")
    inv = ckpts["inverse"]
    assert inv["stats"]["actions"]["min"] == [-1.0] * 7 and inv["trained_with"]["tokenizer"] == A.weights_hash(ckpts["tokenizer"])


def run_cli(*args, script="amplify.py"):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_imports_and_refuses_bad_input_in_one_line(published, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(published["tokenizer"], "--out", str(out), script="import_official.py")
    assert proc.returncode == 0, proc.stderr
    assert "imported tokenizer" in proc.stderr + proc.stdout and os.listdir(out) == ["tokenizer.pt"]
    before = (out / "tokenizer.pt").read_bytes()
    cases = [
        ((published["tokenizer"],), "exists; --overwrite replaces it"),
        ((published["forward"],), "give its checkpoint too"),
        ((published["tokenizer"], published["forward"]), "give --vision-weights"),
        ((published["resnet"],), "expected a published AMPLIFY checkpoint"),
        ((str(tmp_path / "missing.pt"),), "path does not exist"),
    ]
    for paths, message in cases:
        proc = run_cli(*paths, "--out", str(out), script="import_official.py")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert os.listdir(out) == ["tokenizer.pt"] and (out / "tokenizer.pt").read_bytes() == before


def test_a_config_the_format_cannot_express_is_refused(published, tmp_path):
    ckpt = torch.load(published["inverse"], weights_only=True)
    ckpt["config"] = {**ckpt["config"], "type": "diffusion"}
    torch.save(ckpt, tmp_path / "diffusion.pt")
    with pytest.raises(A.DataError, match="expected type='gaussian'"):
        I.import_official([published["tokenizer"], str(tmp_path / "diffusion.pt")], str(tmp_path / "out"),
                          published["resnet"])
    assert not os.path.exists(tmp_path / "out")


def test_imported_models_train_on_and_resume(published, tmp_path):
    """An imported tokenizer and inverse model continue training on data of their shape with --resume
    (their config, not the preset's; the optimizer starts afresh), and the inverse model keeps the
    published normalization (actions as they are)."""
    import json

    import numpy as np

    import testdata
    arrays, meta = testdata.synthetic_dataset(episodes=2, frames=20, img_size=128, grid=4, action_dim=7, proprio_dim=9)
    meta["views"] = ["agentview", "eye_in_hand"]
    arrays["actions"] = np.clip(arrays["actions"], -1, 1)
    np.savez(tmp_path / "data.npz", meta_json=np.array(json.dumps(meta)), **arrays)
    out = tmp_path / "run"
    I.import_official([published[s] for s in ("tokenizer", "forward", "inverse")], str(out), published["resnet"])
    before = A.load_checkpoint(str(out / "inverse.pt"), "inverse")
    for stage in ("inverse", "tokenizer"):  # the inverse model first: it reads the imported tokenizer's codes
        proc = run_cli("--stage", stage, "--data", str(tmp_path / "data.npz"), "--out", str(out), "--resume",
                       "--steps", "2", "--eval-every", "2", "--val-episodes", "0", "--threads", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout + proc.stderr
    for stage in ("tokenizer", "inverse"):
        ckpt = A.load_checkpoint(str(out / f"{stage}.pt"), stage)
        assert ckpt["step"] == 2 and "optimizer" in ckpt and ckpt["config"]["d_model"] == 32  # the imported model
    after = A.load_checkpoint(str(out / "inverse.pt"), "inverse")
    assert after["stats"] == before["stats"]
    moved = max(max_diff(after["model"][k], before["model"][k]) for k in before["model"] if before["model"][k].is_floating_point())
    assert moved > 0  # it trained


def test_a_checkpoint_missing_a_published_weight_is_refused_in_one_line(published, tmp_path):
    ckpt = torch.load(published["tokenizer"], weights_only=True)
    del ckpt["model"]["decoder.view_emb.weight"]
    torch.save(ckpt, tmp_path / "broken.pt")
    proc = run_cli(str(tmp_path / "broken.pt"), "--out", str(tmp_path / "out"), script="import_official.py")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "expected a published tokenizer checkpoint, found no 'decoder.view_emb.weight'" in proc.stderr
    assert not os.path.exists(tmp_path / "out")
