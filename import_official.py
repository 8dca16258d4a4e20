"""Published AMPLIFY checkpoints (pairlab/AMPLIFY) -> this implementation's: tokenizer.pt, forward.pt,
inverse.pt and, when all three are given, policy.pt.

  python import_official.py BUNDLE.pt --out DIR                  # the three models and their ResNet-18
  python import_official.py tokenizer.pt [forward.pt] [inverse.pt] --out DIR --vision-weights timm

The models of amplify.py are the published ones layer for layer (docs/PUBLISHED_ARCHITECTURE.md), so a
conversion renames weights and bridges two conventions: the published tracks are (row, col) and
their points column-major over the grid, ours (x, y) and row-major. A stage checkpoint holds
`model` (a state dict) and `config` (the resolved training YAML); a bundle holds all three models
with their ResNet-18 under `model` and the stage configs under `config`. The forward and inverse
stage checkpoints hold neither the ResNet-18 nor the tokenizer config they depend on: give the
tokenizer checkpoint beside them, and the ResNet weights with --vision-weights. The converted
checkpoints train on with `amplify.py --resume`; test_official.py checks the outputs against the
published code's.
"""

import argparse
import math
import os
from dataclasses import asdict

import torch
from einops import rearrange

from amplify import (CHECKPOINT_FORMAT, RESNET18, DataError, ForwardConfig, InverseConfig, ResNet, TokenizerConfig,
                     UserError, VisionConfig, build_model, cli, load_resnet18_weights, log, n_params, save_checkpoint,
                     weights_hash, write_policy)

OFFICIAL_BLOCK = {"ln_1": "ln1", "ln_2": "ln2", "ln_3": "ln3", "ln_4": "ln4", "mlp.c_fc": "mlp.0",
                  "mlp.c_proj": "mlp.2", "mlp_2.c_fc": "mlp2.0", "mlp_2.c_proj": "mlp2.2", "attn.c_attn": "attn.qkv",
                  "attn.c_proj": "attn.out", "self_attn.c_attn": "attn.qkv", "self_attn.c_proj": "attn.out",
                  "cross_attn.q_proj": "cross.q", "cross_attn.kv_proj": "cross.kv", "cross_attn.c_proj": "cross.out"}
OFFICIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def official_transformer(state, src, dst):
    """Their TransformerEncoder/Decoder's weights under prefix `src` -> our Transformer's under `dst`."""
    out = {}
    for key, value in state.items():
        if not key.startswith(src + "transformer.") or key.endswith("attn_mask"):  # masks are rebuilt, not loaded
            continue
        key = key[len(src + "transformer."):]
        if key == "pos_emb.weight":
            out[dst + "pos"] = value
        elif key.startswith("h."):
            _, i, rest = key.split(".", 2)
            name, param = rest.rsplit(".", 1)
            out[f"{dst}blocks.{i}.{OFFICIAL_BLOCK.get(name, name)}.{param}"] = value  # an unknown name fails to load
        else:
            out[dst + key] = value  # ln_f
    return out


def official_linears(state, names):
    """{our Linear: the published Linear} -> our weights and biases, taken from theirs."""
    return {f"{ours}.{p}": state[f"{theirs}.{p}"] for ours, theirs in names.items() for p in ("weight", "bias")}


def official_point_order(grid):
    """Our point n (row-major: n = row * grid + col) is the published point col * grid + row."""
    n = torch.arange(grid * grid)
    return (n % grid) * grid + n // grid


def official_get(config, key, where, expected=None):
    if key not in config:
        raise DataError(f"{where}: expected key '{key}' in the published config, found none")
    if expected is not None and config[key] != expected:
        raise DataError(f"{where}: expected {key}={expected!r} (what this implementation can express), "
                        f"found {config[key]!r}")
    return config[key]


def official_tokenizer(state, config, where):
    """-> (TokenizerConfig, view names, our state dict)."""
    get = lambda key, expected=None: official_get(config, key, where, expected)  # noqa: E731
    for key, value in (("per_view", False), ("cond_on_img", False), ("causal_encoder", True), ("point_dim", 2)):
        get(key, value)
    T, N, views = get("true_horizon"), get("num_tracks"), list(get("cond_cameraviews"))
    get("track_pred_horizon", T)
    grid, window = math.isqrt(N), get("loss")["rel_cls_img_size"]
    if grid * grid != N or window[0] != window[1] or get("num_layers") < 2:
        raise DataError(f"{where}: expected a square grid of points, a square window and at least 2 layers, found "
                        f"num_tracks={N}, rel_cls_img_size={window}, num_layers={get('num_layers')}")
    weights = get("loss").get("loss_weights", {})
    cfg = TokenizerConfig(d_model=get("hidden_dim"), n_layer=get("num_layers"), n_head=get("num_heads"),
                          dropout=get("attn_pdrop"), codebook_size=get("codebook_size"), views=len(views),
                          img_size=tuple(get("img_shape")), T=T, window=window[0],
                          head_hidden=get("decoder_mlp_hidden_dim"), grid=grid,
                          view_weights=tuple(float(weights.get(v, 1.0)) for v in views), readout="argmax")
    D, perm = cfg.d_model, official_point_order(grid)
    vel_in = rearrange(state["encoder.encoder_proj.weight"], "d (v n rc) -> d v n rc", v=len(views), rc=2)
    mlp_in = state["decoder.decoder_mlp.0.weight"]  # (hidden, 3D): [step feature, point, view]
    ours = {"vel_in.weight": rearrange(vel_in[:, :, perm].flip(-1), "d v n xy -> d (v n xy)"),  # (row, col) -> (x, y)
            "vel_in.bias": state["encoder.encoder_proj.bias"],
            "point_emb": state["decoder.track_pos_emb.weight"][perm], "view_emb": state["decoder.view_emb.weight"],
            "mlp_step.weight": mlp_in[:, :D], "mlp_point.weight": mlp_in[:, D:2 * D],
            "mlp_view.weight": mlp_in[:, 2 * D:], "mlp_step.bias": state["decoder.decoder_mlp.0.bias"],
            **official_linears(state, {"to_latent": "quantize.project_in", "code_out": "quantize.project_out",
                                       "mlp_out": "decoder.decoder_mlp.2", "head": "decoder.decoder_proj"})}
    ours.update(official_transformer(state, "encoder.encoder.", "encoder."))
    ours.update(official_transformer(state, "decoder.decoder.", "decoder."))
    return cfg, views, ours


def official_vision(n_tokens, where):
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise DataError(f"{where}: expected a square map of image tokens per view, found {n_tokens}")
    return VisionConfig(**RESNET18, upsample=32 * side, frozen=True)  # ResNet-18 maps 32 px to one cell


def official_forward(state, config, tok: TokenizerConfig, where):
    config = official_get(config, "forward_dynamics", where)
    trunk, text = official_get(config, "transformer", where), official_get(config, "text_encoder", where)
    official_get(trunk, "bias", where, False)
    # positions: the image tokens, text, sos and L-1 codes (L + 1 = T of them besides the images)
    n_img = (state["trunk.transformer.pos_emb.weight"].shape[0] - tok.T) // tok.views
    cfg = ForwardConfig(d_model=tok.d_model, n_layer=trunk["n_layer"], n_head=trunk["n_head"],
                        dropout=trunk["dropout"], codebook_size=tok.codebook_size, views=tok.views,
                        img_size=tok.img_size, T=tok.T, vision=official_vision(n_img, where),
                        text_encoder=f"t5-{text.get('size', 'small')}", text_dim=state["text_proj.weight"].shape[1])
    ours = {"sos": state["sos_token"].reshape(-1),
            **official_linears(state, {"head": "unembed", "code_in.proj": "quantize.project_out",
                                       "img_proj": "img_proj", "text.proj": "text_proj"})}
    ours.update(official_transformer(state, "trunk.", "trunk."))
    return cfg, ours


def official_inverse(state, config, tok: TokenizerConfig, code_out, where):
    get = lambda key, expected=None: official_get(config, key, where, expected)  # noqa: E731
    for key, value in (("type", "gaussian"), ("action_squash", True), ("action_squash_scale", 1.0),
                       ("cond_on_img", True), ("cond_on_proprio", True), ("cond_on_text", False)):
        get(key, value)
    if config.get("action_horizon") not in (None, tok.T):
        raise DataError(f"{where}: expected action_horizon {tok.T} (the tokenizer's horizon), "
                        f"found {config['action_horizon']}")
    cfg = InverseConfig(d_model=tok.d_model, n_layer=get("num_layers"), n_head=get("num_heads"),
                        dropout=get("attn_pdrop"), codebook_size=tok.codebook_size, views=tok.views,
                        img_size=tok.img_size, T=tok.T, vision=official_vision(get("num_img_tokens"), where),
                        gamma=get("action_loss_discount"), use_codes=get("cond_on_tracks"), head="gaussian",
                        gaussian_std=get("std"), action_dim=get("action_dim"), proprio_dim=get("proprio_dim"))
    ours = {"latents": state["head.latents"].reshape(tok.T, -1),
            **official_linears(state, {"head": "head.action_proj", "img_proj": "img_proj",
                                       "proprio_proj": "proprio_proj"})}
    if cfg.use_codes:  # the published inverse model reads codes through the tokenizer's project_out, not saved with it
        ours.update({"code_in.proj.weight": code_out["weight"], "code_in.proj.bias": code_out["bias"]})
    ours.update(official_transformer(state, "head.decoder.", "decoder."))
    return cfg, ours


def official_resnet(state, prefix="img_encoder.model."):
    """timm's ResNet-18 as the published vision encoder holds it (model.0 = conv1, ...) -> our ResNet's names."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            out[f"{OFFICIAL_RESNET.get(index, index)}.{rest}"] = value
    return out


def import_official(paths, out, vision_weights="", overwrite=False):
    """Published checkpoint(s) -> our tokenizer.pt, forward.pt, inverse.pt (and policy.pt when all three
    are there) in `out`. Every model is built and loaded strictly before anything is written."""
    found = {}
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"import: path does not exist: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"published checkpoint {path}: could not read it as a torch checkpoint "
                            f"({type(e).__name__})") from None
        if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "config"))):
            found_keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise DataError(f"published checkpoint {path}: expected a published AMPLIFY checkpoint (a dict with 'model' "
                            f"and 'config'), found {found_keys}")
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # torch.compile'd training
        if "motion_tokenizer_cfg" in ckpt["config"]:  # a bundle: the three models and the ResNet-18
            c = ckpt["config"]
            for stage, prefix, key in (("tokenizer", "motion_tokenizer.", "motion_tokenizer_cfg"),
                                       ("forward", "forward_dynamics.", "forward_dynamics_cfg"),
                                       ("inverse", "inverse_dynamics.", "inverse_dynamics_cfg")):
                found[stage] = ({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, c[key], path)
            found["resnet"] = official_resnet(state)
        else:
            stage = ("tokenizer" if "encoder.encoder_proj.weight" in state else "forward" if "sos_token" in state
                     else "inverse" if "head.latents" in state else None)
            if stage is None:
                raise DataError(f"published checkpoint {path}: expected the weights of a published motion tokenizer, "
                                f"forward or (Gaussian) inverse model, found keys {sorted(state)[:4]}")
            if stage in found:
                raise UserError(f"import: two {stage} checkpoints given ({found[stage][2]}, {path})")
            found[stage] = (state, ckpt["config"], path)
    if "tokenizer" not in found:
        raise UserError("import: the forward and inverse models take their width, codes and views from "
                        "the tokenizer: give its checkpoint too")
    stage = "tokenizer"
    try:  # a weight or config key the published code always writes, missing: another model's checkpoint
        tok_cfg, views, tok_state = official_tokenizer(*found["tokenizer"])
        converted = {"tokenizer": (tok_cfg, tok_state)}
        if "forward" in found:
            stage = "forward"
            converted["forward"] = official_forward(*found["forward"][:2], tok_cfg, found["forward"][2])
        if "inverse" in found:
            stage, code_out = "inverse", {p: tok_state[f"code_out.{p}"] for p in ("weight", "bias")}
            converted["inverse"] = official_inverse(*found["inverse"][:2], tok_cfg, code_out, found["inverse"][2])
    except (KeyError, TypeError) as e:
        raise DataError(f"published checkpoint {found[stage][2]}: expected a published {stage} checkpoint, "
                        f"found no {e}") from None
    resnet = found.get("resnet")
    if resnet is None and set(converted) - {"tokenizer"}:
        if not vision_weights:
            raise UserError("import: published forward and inverse checkpoints hold no ResNet-18 (the "
                            "published code uses timm's ImageNet weights): give --vision-weights timm, torchvision "
                            "or a path")
        r = ResNet(**RESNET18)
        load_resnet18_weights(r, vision_weights)
        resnet = r.state_dict()
    data = {"views": views, "img_size": list(tok_cfg.img_size), "T": tok_cfg.T, "grid": tok_cfg.grid}
    payloads, sizes = {}, {}
    for stage, (cfg, state) in converted.items():
        if stage != "tokenizer":
            state = {**state, **{f"vision.resnet.{k}": v for k, v in resnet.items()}}
        try:
            model = build_model(stage, cfg, state)  # strict: a missing or left-over weight is an error
        except RuntimeError as e:
            raise DataError(f"published checkpoint {found[stage][2]}: the {stage} weights do not fit the published "
                            f"architecture ({str(e).splitlines()[0]} ...)") from None
        payloads[stage] = {"stage": stage, "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": 0,
                           "config": asdict(cfg), "data": data, "imported_from": os.path.abspath(found[stage][2]),
                           "trained_with": {}}
        sizes[stage] = n_params(model)
    tok_hash = weights_hash(payloads["tokenizer"])
    for stage in set(payloads) - {"tokenizer"}:  # provenance: the codes they read are this tokenizer's
        if stage == "forward" or converted[stage][0].use_codes:
            payloads[stage]["trained_with"] = {"tokenizer": tok_hash}
    if "inverse" in payloads:  # the published code trains on LIBERO's actions and proprio as they are
        unit = lambda n: {"mean": [0.0] * n, "std": [1.0] * n, "min": [-1.0] * n, "max": [1.0] * n}  # noqa: E731
        cfg = converted["inverse"][0]
        payloads["inverse"].update(stats={"actions": unit(cfg.action_dim), "proprio": unit(cfg.proprio_dim)},
                                   action_layout=None, predicted_codes=False, codes_protocol=None)
    targets = {stage: os.path.join(out, stage + ".pt") for stage in payloads}
    taken = [p for p in targets.values() if os.path.exists(p)]
    if taken and not overwrite:
        raise UserError(f"import: {taken[0]} exists; --overwrite replaces it")
    for stage, payload in payloads.items():
        save_checkpoint(targets[stage], payload)
        log(f"imported {stage}: {payload['imported_from']} -> {targets[stage]} ({sizes[stage]})" + (
            " | text: t5-small's first token, as published (the Hugging Face weights are needed to embed a task)"
            if stage == "forward" else ""))
    if len(payloads) == 3:
        log(f"policy: {write_policy(out)}")
    return targets


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert published AMPLIFY checkpoints into amplify.py's.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="a bundle, or stage checkpoints with their "
                   "tokenizer's")
    p.add_argument("--out", required=True, help="directory for tokenizer.pt, forward.pt, inverse.pt (and policy.pt)")
    p.add_argument("--vision-weights", default="", help="ResNet-18 weights for forward and inverse stage "
                   "checkpoints: 'timm' (the published code's), 'torchvision' or a state-dict path")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --out")
    args = p.parse_args(argv)
    cli(import_official, args.checkpoints, args.out, args.vision_weights, args.overwrite)


if __name__ == "__main__":
    main()
