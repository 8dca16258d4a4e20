"""Training-step throughput of the published AMPLIFY code against ours, at the paper configuration.

    python official/bench_published.py --official /tmp/AMPLIFY              # both in one process
    python official/bench_published.py --official /tmp/AMPLIFY --reps 5 --batch 8 --threads 2

The published models (pairlab/AMPLIFY at f4bcc46, imported from a local clone as make_fixture.py
imports them; nothing of that code is copied here) are built from their own cfg/*.yaml; ours from
amplify.PRESETS["paper"]; both with 2 views (agentview, eye_in_hand), 128x128 images, 7-d actions,
9-d proprio, 400 points, T = 16, random weights and inputs.

One training step per variant, timed alternately (median of --reps after a warm-up call each), so
load that comes and goes on a shared machine hits every variant alike: only ratios within one run
compare. A step is the loop body of the published training scripts up to and including the
optimizer step (the logging after it left out): their autocast block, backward, their gradient
clipping (forward and inverse 1.0, tokenizer none), AdamW with their betas (0.9, 0.95) and weight
decay 0; its forward step runs the frozen ResNet-18 over both views at 224 px, the frozen tokenizer's
codes and the decoding of the predicted tracks, its inverse step the ResNet and the codes; text
embeddings are precomputed (their use_preprocessed_embs). Ours is amplify.py's fit step: bf16
autocast where the CPU multiplies bf16 natively (fp32 otherwise), the frozen tokenizer's codes,
fused AdamW, clipping at 1.0.

Variants: published fp32, published bf16 (CPU autocast; their scripts use fp16 autocast on CUDA),
published forward fp32 without the track decoding (it only feeds their logged metrics), ours as
trained (the ResNet trained), ours fp32, and for forward and inverse ours with a frozen ResNet read
from cached float16 features (B, V, C, h, w), as amplify.py's frozen_features cache feeds them.
Prints `name: value` lines: samples/s and ratios to the published fp32 and bf16 steps.

On a 2-core machine where another process keeps one core busy, use --threads 1: with 2 threads every
parallel operation waits out a scheduler time slice for the thread that shares the busy core, and
the step times measure that wait, not the models.
"""
import argparse
import datetime
import os
import platform
import sys

import torch
from einops import rearrange

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
import make_fixture as MF  # noqa: E402  (official/, next to this file)


def import_both(clone):
    """-> (published namespace, our amplify module, bench module). Both packages are called
    `amplify`: the published one is imported first, its modules are taken out of sys.modules (the
    classes keep them alive), then ours is imported from the repository root."""
    off = MF.load_official(clone)
    for name in [m for m in sys.modules if m == "amplify" or m.startswith("amplify.")]:
        del sys.modules[name]
    sys.path.remove(os.path.abspath(clone))
    sys.path.insert(0, ROOT)
    import amplify
    import bench
    return off, amplify, bench


def host():
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({platform.machine()}), {os.cpu_count()} cpus, bf16/amx flags: {' '.join(native) or 'none'}"


# -----------------------------------------------------------------------------
# The published models and their steps


def published_configs(off, clone):
    """Their cfg/*.yaml as they are: tokenizer, forward, inverse."""
    O = off.OmegaConf
    tok_cfg, fwd_cfg, inv_cfg = (O.load(os.path.join(clone, "cfg", f"train_{s}.yaml"))
                                 for s in ("motion_tokenizer", "forward_dynamics", "inverse_dynamics"))
    return tok_cfg, fwd_cfg, inv_cfg


def adamw(params, cfg):
    """AdamW as their scripts build it (the plain implementation, as on a CPU)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))


def published_step(model, loss_fn, opt, clip, amp):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def frozen(module):
    for p in module.parameters():
        p.requires_grad = False
    return module.eval()


def published_inputs(off, tok_cfg, B, gen):
    V, T, N = len(tok_cfg.cond_cameraviews), tok_cfg.track_pred_horizon, tok_cfg.num_tracks
    traj = MF.random_tracks(off, gen, B, V, T, N, tuple(tok_cfg.img_shape))  # (B, V, T, N, 2), their convention
    images = torch.rand(B, V, *tok_cfg.img_shape, 3, generator=gen)  # float in [0, 1], as their loader gives them
    text_emb = 0.2 * torch.randn(B, 1, 512, generator=gen)  # a precomputed T5-small embedding
    proprio = torch.randn(B, 1, 9, generator=gen)
    actions = 1.8 * torch.rand(B, T, 7, generator=gen) - 0.9  # in (-1, 1): the truncated normal's support
    return traj, images, text_emb, proprio, actions


# -----------------------------------------------------------------------------
# Ours: amplify.py's fit step


def our_step(model, loss_fn, amp, train):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=train.lr, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn()[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
    return step


# -----------------------------------------------------------------------------


def report(stage, seconds, B, params):
    for name, count in params.items():
        print(f"{stage}_{name}_params: {count}")
    for name, s in seconds.items():
        print(f"{stage}_{name}_samples_per_s: {B / s:.2f}")
    for base in ("published_fp32", "published_bf16"):
        for name, s in seconds.items():
            if name.startswith("ours"):
                print(f"{stage}_{name}_vs_{base}: {seconds[base] / s:.2f}")
    if "published_fp32_no_decode" in seconds:
        for name in [n for n in seconds if n.startswith("ours")]:
            print(f"{stage}_{name}_vs_published_fp32_no_decode: {seconds['published_fp32_no_decode'] / seconds[name]:.2f}")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="path to a clone of pairlab/AMPLIFY (f4bcc46)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (median), after one warm-up")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--stages", default="tokenizer,forward,inverse", help="comma-separated subset to run")
    args = p.parse_args()
    if args.reps < 1 or args.batch < 1 or args.threads < 1:
        sys.exit(f"--reps, --batch, --threads: expected positive integers, found {args.reps}, {args.batch}, {args.threads}")
    stages = args.stages.split(",")
    if not set(stages) <= {"tokenizer", "forward", "inverse"}:
        sys.exit(f"--stages: expected a subset of tokenizer,forward,inverse, found {args.stages}")

    off, A, bench = import_both(args.official)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    amp = A.use_bf16("auto", cpu)
    B = args.batch
    print(f"date: {datetime.date.today()} | host: {host()} | torch {torch.__version__} | threads: "
          f"{torch.get_num_threads()} | batch: {B} | reps: {args.reps} | ours as trained: {'bf16' if amp else 'fp32'} "
          f"| published commit: {MF.git_commit(args.official)}", flush=True)

    # Inputs: ours from bench.py's setup (uint8 images, (x, y) tracks on our grid), theirs in their conventions.
    S = bench.setup(argparse.Namespace(preset="paper", device=cpu, batch_size=B, precision="auto", seed=0))
    train = A.PRESETS["paper"]["train"]
    tok_cfg, fwd_cfg, inv_cfg = published_configs(off, args.official)
    traj, images, text_emb, proprio, actions = published_inputs(off, tok_cfg, B, torch.Generator().manual_seed(0))
    V = len(tok_cfg.cond_cameraviews)
    n = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    venc_args = dict(MF.plain(fwd_cfg.forward_dynamics.vision_encoder), pretrained=False)  # no ImageNet weights offline
    torch.manual_seed(0)

    def codes_of(tok):  # their frozen tokenizer's codes of the true tracks: (B, L, D) vectors, (B, L) indices
        return tok.quantize(tok.encode(off.points_to_velocities(traj, time_dim=2)))

    def image_tokens(venc):  # (B*V, 49, 512) from the frozen ResNet-18 at 224 px
        return venc(rearrange(images, "b v h w c -> (b v) h w c"))

    if "tokenizer" in stages:
        pub = off.MotionTokenizer(tok_cfg).train()

        def pub_loss():
            vel = off.points_to_velocities(traj, time_dim=2)
            recon, _, logits = pub(vel)
            return pub.get_loss(x_recon=recon, rel_logits=logits, gt_vel=vel, gt_traj=traj)

        ours = {name: A.MotionTokenizer(S.tok_cfg).train() for name in ("ours", "ours_fp32")}
        steps = {f"published_{k}": published_step(pub, pub_loss, adamw(pub.parameters(), tok_cfg), tok_cfg.clip_grad, a)
                 for k, a in (("fp32", False), ("bf16", True))}
        steps.update({name: our_step(m, lambda m=m: m.loss(S.tracks), amp and name == "ours", train)
                      for name, m in ours.items()})
        report("tokenizer", bench.timed(steps, cpu, args.reps), B, {"published": n(pub), "ours": n(ours["ours"])})
        del pub, ours, steps

    if "forward" in stages or "inverse" in stages:
        pub_tok = frozen(off.MotionTokenizer(tok_cfg))
        venc = off.VisionEncoder(**dict(venc_args, frozen=True)).eval()
        our_tok = frozen(A.MotionTokenizer(S.tok_cfg))

    if "forward" in stages:
        pub = off.ForwardDynamics(trunk_cfg=fwd_cfg.forward_dynamics.transformer, hidden_dim=tok_cfg.hidden_dim,
                                  img_dim=venc.embed_dim, text_dim=512, cond_seq_len=venc.seq_len * V + 1,
                                  pred_seq_len=tok_cfg.track_pred_horizon - 1, codebook_size=tok_cfg.codebook_size,
                                  quantize=pub_tok.quantize).train()

        def pub_loss(decode=True):
            obs = {"image": rearrange(image_tokens(venc), "(b v) s d -> b (v s) d", v=V)}
            _, indices = codes_of(pub_tok)
            pred, loss = pub(obs, {"text_emb": text_emb}, targets=indices.long())
            if decode:  # their loop decodes the predicted codes to tracks every step (for its metrics)
                vel, _ = pub_tok.decode(pub_tok.quantize.indices_to_codes(pred))
                off.velocities_to_points(vel, time_dim=2, init_points=traj[:, :, [0]])
            return loss

        optim = fwd_cfg.optim
        steps = {f"published_{k}": published_step(pub, lambda d=d: pub_loss(d), adamw(pub.parameters(), optim),
                                                  optim.clip_grad, a)
                 for k, a, d in (("fp32", False, True), ("bf16", True, True), ("fp32_no_decode", False, False))}
        for name, cfg in (("ours", "forward"), ("ours_fp32", "forward"), ("ours_frozen_cached", "forward_frozen")):
            m = A.build_model("forward", S.cfgs[cfg]).train()
            m.code_in.proj.load_state_dict(our_tok.code_out.state_dict())  # as train_forward starts it
            x = S.images
            if "frozen" in name:
                with torch.no_grad():
                    x = m.vision.features(S.images).half()  # (B, V, C, h, w), as the cache holds them

            def loss_fn(m=m, x=x):
                with torch.no_grad():
                    codes = our_tok.encode(S.tracks)[1]
                return m.loss(x, S.tasks, codes)
            steps[name] = our_step(m, loss_fn, amp and name != "ours_fp32", train)
            if name == "ours":
                ours_count = n(m)
        report("forward", bench.timed(steps, cpu, args.reps), B,
               {"published": n(pub) - n(pub_tok.quantize), "published_resnet": n(venc), "ours": ours_count})
        del pub, steps

    if "inverse" in stages:
        inv_cfg.num_img_tokens, inv_cfg.img_embed_dim, inv_cfg.text_embed_dim = venc.seq_len, venc.embed_dim * V, 512
        pub = off.InverseDynamics(tok_cfg, inv_cfg).train()

        def pub_loss():
            with torch.no_grad():
                tokens = rearrange(image_tokens(venc), "(b v) s d -> b s (v d)", v=V)  # views stacked in channels
                batch = {"img_tokens": tokens, "proprioception": proprio, "codes": codes_of(pub_tok)[0]}
            return pub.loss_fn(pub(batch), actions)

        steps = {f"published_{k}": published_step(pub, pub_loss, adamw(pub.parameters(), inv_cfg), inv_cfg.clip_grad, a)
                 for k, a in (("fp32", False), ("bf16", True))}
        for name, cfg in (("ours", "inverse"), ("ours_fp32", "inverse"), ("ours_frozen_cached", "inverse_frozen")):
            m = A.build_model("inverse", S.cfgs[cfg]).train()
            m.code_in.proj.load_state_dict(our_tok.code_out.state_dict())
            x = S.images
            if "frozen" in name:
                with torch.no_grad():
                    x = m.vision.features(S.images).half()

            def loss_fn(m=m, x=x):
                with torch.no_grad():
                    codes = our_tok.encode(S.tracks)[1]
                return m.loss(x, S.proprio, codes, S.actions.clamp(-0.9, 0.9), S.valid, S.tasks)  # in [-1, 1], as ours scales them
            steps[name] = our_step(m, loss_fn, amp and name != "ours_fp32", train)
            if name == "ours":
                ours_count = n(m)
        report("inverse", bench.timed(steps, cpu, args.reps), B,
               {"published": n(pub), "published_resnet": n(venc), "ours": ours_count})


if __name__ == "__main__":
    main()
