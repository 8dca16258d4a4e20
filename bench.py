"""bench.py: throughput, memory and sampling latency of the three AMPLIFY models and the policy.

  python bench.py --preset paper             # Table 10 sizes; on a GPU at the preset's batch, bf16 autocast
  python bench.py --preset cpu --steps 5

Prints `name: value` lines on LIBERO-shaped random inputs (2 views, 128x128, A = 7, P = 9).
Every speed-up is a ratio of two variants timed alternately in the same run (chunked vs plain
tokenizer loss, bf16 vs fp32, frozen cached encoder vs full step, prefetched vs inline data, one
shared vision pass vs two, cached vs uncached sampling, the policy step in bf16 vs fp32), so it
holds on a busy machine; absolute figures are only comparable on the same machine under the same
load. Peak memory of a training variant is measured alone: in a fresh process on CPU (peak
resident set), after a reset on CUDA.
Then the inverse model with each action head (gaussian, diffusion, flow), timed alternately, as
ratios to the Gaussian head.
"""
import argparse
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import amplify as A


# -----------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, device, reps):
    """Median seconds of each of `fns` ({name: fn}), called alternately `reps` times after a warm-up
    call each: load that comes and goes on a shared machine hits every variant alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def peak_rss_mb():
    """This process's peak resident set (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource  # ru_maxrss is in KiB on Linux, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# What is measured: LIBERO-shaped inputs and one training step per variant


def setup(args):
    """Configs and random inputs for the preset: 2 views, 128x128 images, A = 7, P = 9."""
    preset, device = A.PRESETS[args.preset], args.device
    S = argparse.Namespace(device=device, V=2, size=(128, 128), A=7, P=9, seed=args.seed)
    S.B = args.batch_size or (preset["train"].batch_size if device.type == "cuda" else 8)
    S.bf16 = A.use_bf16(args.precision, device)
    S.tok_cfg = replace(preset["tokenizer"], views=S.V, img_size=S.size)
    fwd = replace(preset["forward"], views=S.V, img_size=S.size, vision=replace(preset["forward"].vision, weights=""))
    inv = replace(preset["inverse"], views=S.V, img_size=S.size, action_dim=S.A, proprio_dim=S.P,
                  vision=replace(preset["inverse"].vision, weights=""))
    frozen = {"forward": replace(fwd, vision=replace(fwd.vision, frozen=True)),
              "inverse": replace(inv, vision=replace(inv.vision, frozen=True))}
    S.cfgs = {"forward": fwd, "inverse": inv, "forward_frozen": frozen["forward"], "inverse_frozen": frozen["inverse"]}
    g = torch.Generator().manual_seed(args.seed)
    B, V, T, N = S.B, S.V, S.tok_cfg.T, S.tok_cfg.grid ** 2
    start = torch.as_tensor(A.grid_points(S.tok_cfg.grid))
    steps = torch.randint(-2, 3, (B, V, T - 1, N, 2), generator=g).float() * 2 / S.size[0]
    S.tracks = torch.cat([start.expand(B, V, 1, -1, -1), start + steps.cumsum(2)], dim=2).to(device)
    S.images = torch.randint(0, 256, (B, V, *S.size, 3), dtype=torch.uint8, generator=g).to(device)
    S.tasks = [f"task {i % 4}" for i in range(B)]
    K = int(np.prod(A.fsq_levels(S.tok_cfg.codebook_size)))
    S.codes = torch.randint(0, K, (B, T - 1), generator=g).to(device)
    S.proprio, S.actions = torch.randn(B, S.P, generator=g).to(device), torch.randn(B, T, S.A, generator=g).to(device)
    S.valid = torch.ones(B, T, device=device)
    return S


def plain_tokenizer_loss(model, tracks):
    """The tokenizer loss as computed before the chunked head: the whole (B*V*N*L, Cw) logits tensor."""
    logits, _ = model(tracks)  # (B, V, L, N, Cw)
    target = A.tracks_to_classes(tracks, model.cfg.img_size, model.cfg.window)
    return F.cross_entropy(rearrange(logits, "b v l n cw -> (b v n l) cw"), rearrange(target, "b v l n -> (b v n l)"))


def build(S, name):
    """A training variant: (model on the device in train mode, loss_fn(model) -> loss, bf16 autocast?).

    *_fp32 runs without autocast; *_frozen_cached is the frozen encoder fed the features a cache
    would hold (computed once here, float16), so its step is what training from the cache costs.
    """
    torch.manual_seed(S.seed)
    amp = S.bf16 and "fp32" not in name
    if name.startswith("tokenizer"):
        model = A.MotionTokenizer(S.tok_cfg).to(S.device).train()
        if "plain_ce" in name:
            return model, lambda m: plain_tokenizer_loss(m, S.tracks), amp
        return model, lambda m: m.loss(S.tracks)[0], amp
    stage = name.split("_")[0]
    model = A.build_model(stage, S.cfgs[stage + ("_frozen" if "frozen" in name else "")]).to(S.device).train()
    x = S.images
    if "frozen" in name:
        with torch.no_grad():
            x = model.vision.features(S.images).half()  # (B, V, C, h, w), as read from the cache
    if stage == "forward":
        return model, lambda m: m.loss(x, S.tasks, S.codes)[0], amp
    return model, lambda m: m.loss(x, S.proprio, S.codes, S.actions, S.valid)[0], amp


def make_step(model, loss_fn, amp):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device_type(model) in ("cpu", "cuda"))

    def step():
        with torch.autocast(device_type(model), dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def device_type(model):
    return next(model.parameters()).device.type


def state_mb(model):
    """Weights, gradients and AdamW's two moments of the trainable parameters, plus frozen weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return (16 * trainable + 4 * frozen) / 2 ** 20


def _peak_memory_child(args, name, queue):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    S = setup(args)
    if name != "baseline":  # baseline: torch and the inputs, no model
        model, loss_fn, amp = build(S, name)
        step = make_step(model, loss_fn, amp)
        step()
        step()  # the optimizer state exists from the first step on
    queue.put(peak_rss_mb())


def peak_memory_mb(args, S, name):
    """Peak memory of a training variant alone: CUDA allocations after a reset, or on CPU the peak
    resident set of a fresh process that builds it and takes two steps (PyTorch itself included)."""
    if S.device.type == "cuda":
        model, loss_fn, amp = build(S, name)
        step = make_step(model, loss_fn, amp)
        step()
        torch.cuda.reset_peak_memory_stats(S.device)
        step()
        return torch.cuda.max_memory_allocated(S.device) / 2 ** 20
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_memory_child, args=(args, name, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


# -----------------------------------------------------------------------------
# Data: batches made inline or prefetched


def data_wait(S, model, reps):
    """Share of step time spent waiting for the batch: frozen forward steps reading cached features
    and tracks from memory-mapped files (codes from a tokenizer, as in training), the batch made
    inline vs by amplify.Prefetcher."""
    tokenizer = A.MotionTokenizer(S.tok_cfg).to(S.device).eval()
    step_fn = {}
    with tempfile.TemporaryDirectory() as tmp:
        n = 4 * S.B
        with torch.no_grad():
            one = model.vision.features(S.images[:1]).half().cpu().numpy()
        files = {"images": (one, (n,) + one.shape[1:]), "tracks": (S.tracks[:1].half().cpu().numpy(),
                                                                   (n,) + tuple(S.tracks.shape[1:]))}
        arrays = {}
        for key, (row, shape) in files.items():
            a = np.lib.format.open_memmap(os.path.join(tmp, key + ".npy"), "w+", np.float16, shape)
            a[:] = row
            a.flush()
            del a
            arrays[key] = np.load(os.path.join(tmp, key + ".npy"), mmap_mode="r")
        rng = np.random.default_rng(0)

        def make(_):
            frames = rng.choice(n, S.B)
            return {"images": A.read_rows(arrays["images"], frames),
                    "tracks": A.read_rows(arrays["tracks"], frames).astype(np.float32)}

        def loss_fn(m):
            with torch.no_grad():
                codes = tokenizer.encode(step_fn["batch"]["tracks"])[1]
            return m.loss(step_fn["batch"]["images"], S.tasks, codes)[0]

        step = make_step(model, loss_fn, S.bf16)

        def train_on(batch):
            step_fn["batch"] = A.to_device(batch, S.device)
            step()

        shares = {}
        for label in ("inline", "prefetch"):
            train_on(make(0))  # warm-up
            sync(S.device)
            t0, wait = time.perf_counter(), 0.0
            if label == "inline":
                for i in range(reps):
                    t1 = time.perf_counter()
                    batch = make(i)
                    wait += time.perf_counter() - t1
                    train_on(batch)
            else:
                with A.Prefetcher(make, range(reps), S.device) as loader:
                    for _ in range(reps):
                        train_on(loader.next())
                    wait = loader.wait
            sync(S.device)
            shares[label] = wait / (time.perf_counter() - t0)
        arrays.clear()  # close the memory maps before their directory goes
    return shares


# -----------------------------------------------------------------------------
# The benchmark


def bench(args):
    """Print `name: value` lines for the preset (see the module docstring)."""
    reps = args.steps
    S = setup(args)
    device = S.device
    print(f"device: {device} | preset: {args.preset} | batch: {S.B} | threads: {torch.get_num_threads()} | "
          f"precision: {'bf16' if S.bf16 else 'fp32'} | cpu native bf16: {A.cpu_has_bf16()}", flush=True)

    if device.type != "cuda":
        print(f"baseline_peak_memory_mb: {peak_memory_mb(args, S, 'baseline'):.0f}")  # a process with torch and inputs
    # Training steps, variants of a stage timed alternately.
    fp32 = ["_fp32"] if S.bf16 else []  # the same step without autocast: what bf16 gains
    groups = {stage: [stage] + extra + [stage + f for f in fp32] for stage, extra in
              (("tokenizer", ["tokenizer_plain_ce_fp32"]), ("forward", ["forward_frozen_cached"]),
               ("inverse", ["inverse_frozen_cached"]))}
    built = {}
    for stage, names in groups.items():
        built.update({name: build(S, name) for name in names})
        steps = {name: make_step(*built[name]) for name in names}
        seconds = timed(steps, device, reps)
        print(f"{stage}_params: {sum(p.numel() for p in built[stage][0].parameters())}")
        for name in names:
            print(f"{name}_train_samples_per_s: {S.B / seconds[name]:.2f}")
        if stage == "tokenizer":
            plain = seconds["tokenizer_plain_ce_fp32"]
            print(f"tokenizer_speedup_vs_plain_ce_fp32: {plain / seconds['tokenizer']:.2f}")
            if S.bf16:
                print(f"tokenizer_fp32_speedup_vs_plain_ce_fp32: {plain / seconds['tokenizer_fp32']:.2f}")
        else:
            print(f"{stage}_frozen_cached_speedup: {seconds[stage] / seconds[stage + '_frozen_cached']:.2f}")
        if S.bf16:
            print(f"{stage}_bf16_speedup: {seconds[stage + '_fp32'] / seconds[stage]:.2f}")
        for name in names:
            print(f"{name}_peak_memory_mb: {peak_memory_mb(args, S, name):.0f}")
            print(f"{name}_weights_grads_adam_mb: {state_mb(built[name][0]):.0f}", flush=True)
        for name in names[1:]:
            del built[name]  # keep the defaults (and the frozen models, rebuilt below) only

    shares = data_wait(S, build(S, "forward_frozen_cached")[0], reps)
    print(f"data_wait_share_inline: {shares['inline']:.3f}")
    print(f"data_wait_share_prefetch: {shares['prefetch']:.3f}", flush=True)

    # Sampling: the forward model's 15 codes with and without the key/value cache (bf16 as the policy).
    forward = built["forward"][0].eval()
    one_image, one_task = S.images[:1], S.tasks[:1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=S.bf16):
        cached = forward.generate(one_image, one_task, use_cache=True)
        uncached = forward.generate(one_image, one_task, use_cache=False)
        t = timed({"cached": lambda: forward.generate(one_image, one_task, use_cache=True),
                   "uncached": lambda: forward.generate(one_image, one_task, use_cache=False)}, device, reps)
    print(f"sample_ms_cached: {1000 * t['cached']:.1f}")
    print(f"sample_ms_uncached: {1000 * t['uncached']:.1f}")
    print(f"kv_cache_speedup: {t['uncached'] / t['cached']:.2f}")
    print(f"kv_cache_identical_codes: {bool(torch.equal(cached, uncached))}", flush=True)

    # The policy step: trained encoders (two ResNet passes) vs frozen equal ones (one shared pass),
    # and, where bf16 is on, the same step forced to bf16 and to fp32.
    data = {"views": [f"view{v}" for v in range(S.V)], "img_size": list(S.size), "T": S.tok_cfg.T,
            "grid": S.tok_cfg.grid}
    unit = lambda n: {"mean": [0.0] * n, "std": [1.0] * n, "min": [-1.0] * n, "max": [1.0] * n}  # noqa: E731
    stats = {"actions": unit(S.A), "proprio": unit(S.P)}

    def ckpt(stage, m):
        return {"stage": stage, "format": A.CHECKPOINT_FORMAT, "config": asdict(m.cfg), "model": m.state_dict(),
                "data": data, "stats": stats}

    tok = ckpt("tokenizer", built["tokenizer"][0])
    frozen = {stage: A.build_model(stage, S.cfgs[stage + "_frozen"]) for stage in ("forward", "inverse")}
    parts = {"": (ckpt("inverse", built["inverse"][0]), tok, ckpt("forward", forward)),
             "_frozen_shared": (ckpt("inverse", frozen["inverse"]), tok, ckpt("forward", frozen["forward"]))}
    policies = {k: A.Policy(*p, device=str(device), precision=args.precision) for k, p in parts.items()}
    # What bf16 gains at this width ("auto" uses it from width 256): the "" policy is one of the two
    # arithmetics, the other is timed beside it.
    same = "_bf16" if policies[""].bf16 else "_fp32"
    other = "_fp32" if same == "_bf16" else "_bf16"
    if S.bf16:
        policies[other] = A.Policy(*parts[""], device=str(device), precision=other[1:])
    obs, prop = S.images[0].cpu().numpy(), np.zeros(S.P, dtype=np.float32)
    t = timed({k: (lambda p=p: p.act(obs, prop, "task 0")) for k, p in policies.items()}, device, reps)
    if S.bf16:
        t[same] = t[""]
    print(f"policy_shared_vision: {policies['_frozen_shared'].shared_vision}")
    for k, s in t.items():
        print(f"policy_step_ms{k}: {1000 * s:.1f}")
        print(f"policy_hz{k}: {1 / s:.1f}")
    print(f"policy_shared_vision_speedup: {t[''] / t['_frozen_shared']:.2f}")
    if S.bf16:
        print(f"policy_bf16: {policies[''].bf16}")
        print(f"policy_bf16_speedup: {t['_fp32'] / t['_bf16']:.2f}")
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else peak_rss_mb()
    print(f"peak_memory_mb: {peak:.0f}", flush=True)  # this whole process
    bench_heads(S, tok, ckpt("forward", forward), ckpt("inverse", built["inverse"][0]), (obs, prop), reps,
                args.precision)


def bench_heads(S, tok, fwd, inv, observation, reps, precision):
    """The inverse model with each action head: training samples/s, the model's own latency for one
    chunk, and the whole policy step (which adds the forward model's codes), timed alternately and
    printed as ratios to the Gaussian head measured in the same run."""
    heads = ("gaussian", "diffusion", "flow")
    steps, chunks, policies = {}, {}, {}
    for head in heads:
        torch.manual_seed(S.seed)
        model = A.InverseDynamics(replace(S.cfgs["inverse"], head=head)).to(S.device).train()
        steps[head] = make_step(model, lambda m: m.loss(S.images, S.proprio, S.codes, S.actions, S.valid)[0], S.bf16)
        chunks[head] = lambda m=model: m(S.images[:1], S.proprio[:1], S.codes[:1])
        policies[head] = (model, inv)
        print(f"inverse_{head}_params: {sum(p.numel() for p in model.parameters())}")
    train_s = timed(steps, S.device, reps)
    for model, _ in policies.values():
        model.eval()
    with torch.no_grad():
        chunk_s = timed(chunks, S.device, reps)
    acting = {head: A.Policy({**inv, "config": asdict(m.cfg), "model": m.state_dict()}, tok, fwd, device=str(S.device),
                             precision=precision)
              for head, (m, inv) in policies.items()}
    step_s = timed({head: (lambda p=p: p.act(*observation, "task 0")) for head, p in acting.items()}, S.device, reps)
    for head in heads:
        print(f"inverse_{head}_train_samples_per_s: {S.B / train_s[head]:.2f}")
        print(f"inverse_{head}_chunk_ms: {1000 * chunk_s[head]:.1f}")
        print(f"policy_step_ms_{head}: {1000 * step_s[head]:.1f}")
    for head in heads[1:]:  # ratios measured in this run: they hold on any machine
        print(f"{head}_vs_gaussian_train_samples_per_s: {train_s['gaussian'] / train_s[head]:.2f}")
        print(f"{head}_vs_gaussian_inverse_chunk_ms: {chunk_s[head] / chunk_s['gaussian']:.2f}")
        print(f"{head}_vs_gaussian_policy_step_ms: {step_s[head] / step_s['gaussian']:.2f}", flush=True)


def build_parser():
    p = argparse.ArgumentParser(description="AMPLIFY benchmark: throughput, memory, latency.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(A.PRESETS), default="cpu", help="model sizes")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions")
    p.add_argument("--batch-size", type=int, help="training batch (none given: the preset's on CUDA, else 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", choices=A.PRECISIONS, default="auto",
                   help="training and policy arithmetic, as amplify.py --precision and Policy(precision=) "
                        "(auto: bf16 on CUDA and CPUs with native bf16)")
    p.add_argument("--seed", type=int, default=0, help="seeds the models and the random inputs")
    p.add_argument("--threads", type=int, help="torch CPU threads (none given: torch's choice)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = A.pick_device(args.device)
    bench(args)


if __name__ == "__main__":
    main()
