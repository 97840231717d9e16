"""Which mini-decoder recipe learns the miniature world's colours? A measured sweep.

Trains, in one process with plain PyTorch loops (a recipe search, not the platform's jobs):
the mini CLIP (contrastive, on world scenes; or `--clip` a registered one), the mini VAE, then
one U-Net per recipe conditioned on the frozen mini CLIP text encoder; each U-Net draws
text-to-image samples for single-object prompts of the training split and for held-out
colour/background pairs (no training image shows them: can the decoder compose?), and the world
scorer reads colour, shape and background back from the pixels. Prints one table row per recipe;
chance is 1/8 for colours and 1/4 for shapes.

    .venv/bin/python bench/mini_sweep.py                      # ≈ 15 min per recipe on 1 core, + the CLIP and VAE
    .venv/bin/python bench/mini_sweep.py --unet-steps 200 --recipes v_zero_pooled   # smoke
    .venv/bin/python bench/mini_sweep.py --clip models:/kosmos-g-mini-clip/1 --recipes v_zero_pooled,v_zero \
        --save-dir bench/results/sweep   # --score-decoder bench/results/sweep/v_zero --split cases: score one again
    .venv/bin/python bench/mini_sweep.py --score-decoder models:/kosmos-g-mini-decoder/1 [--split held_out|cases]
        # the same scoring for a decoder the platform job registered (SD diffusers folder); held_out:
        # colour/background pairs no training image shows; cases: the world evaluation's own held-out
        # cases (one and two subjects) asked in words, a ceiling for the image-prompted model
    .venv/bin/python bench/mini_sweep.py --continue-decoder models:/kosmos-g-mini-decoder/1 \
        --unet-steps 1000 --score-every 250 --eval-prompts 100 --out bench/results/continue.json
        # the registered U-Net trained further: its held-out cases in words after every 250 steps
    .venv/bin/python bench/mini_sweep.py --clip DIR/v_zero_pooled/text_encoder --seed 1 --recipes v_zero_pooled
        # the same recipe from another seed (VAE, U-Net, batch order): how much of a result is noise
    .venv/bin/python bench/mini_sweep.py --clip-steps 1500 --clip-schedule decay
        # the CLIP trained here with the platform jobs' warm-up + linear decay instead of a constant lr
    .venv/bin/python bench/mini_sweep.py --clip-steps 1500 --clip-check-every 250 --recipes v_zero_pooled
        # does the CLIP trained here tell the shapes apart, and from which step (zero-shot check)
    .venv/bin/python bench/mini_sweep.py --clip DIR/text_encoder --ema [--unet-schedule decay] --recipes v_zero_pooled
        # each U-Net scored twice, its last weights and their moving average (the same run: a paired
        # comparison); --unet-schedule decay trains it with the decoder job's schedule
    .venv/bin/python bench/mini_sweep.py --unet-steps 2000 --unet-schedule decay --cases 100 \
        --recipes v_zero_pooled,v_zero_pooled_4heads,v_zero_pooled_4heads_attn
        # U-Net attention layouts; each also scored on the evaluation's cases in words, two subjects included
    .venv/bin/python bench/mini_sweep.py --unet-steps 2000 --unet-schedule decay --cases 100 --pair-share 0.67
        # each U-Net example a two-object scene with probability 0.67 (38% when drawn uniformly)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kosmos_g.models.image_decoder import denoising_loss, noised_latents
from kosmos_g.models.images import CLIP_MEAN, CLIP_STD
from kosmos_g.models.mini import (MiniClipConfig, MiniDecoderConfig, build_clip, build_scheduler, build_unet,
                                  build_vae, clip_loss, vae_loss)
from kosmos_g.models.tokenizers import build_clip_tokenizer
from kosmos_g.platform.data import world
from kosmos_g.platform.data.world_scorer import read_scene

RECIPES = {
    "eps": dict(prediction_type="epsilon", zero_terminal_snr=False, pooled_text=False),
    "v_zero": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=False),
    "v_zero_pooled": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=True),
    # The mini preset's U-Net with 4 cross-attention heads of 32 channels instead of 32 of 4.
    "v_zero_pooled_4heads": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=True,
                                 unet_heads=4),
    # ... and cross-attention at the 16 x 16 level too.
    "v_zero_pooled_4heads_attn": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=True,
                                      unet_heads=4, full_resolution_attention=True),
    "v_zero_attn": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=False,
                        full_resolution_attention=True),
    # The preset's U-Net with its examples weighted by Min-SNR-5 (`image_decoder.denoising_loss`).
    "v_zero_pooled_minsnr5": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=True,
                                  min_snr_gamma=5.0),
    "v_zero_pooled_attn": dict(prediction_type="v_prediction", zero_terminal_snr=True, pooled_text=True,
                               full_resolution_attention=True),
}


def scene_tensors(count: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, size, size) in [-1, 1] and captions, training split."""
    scene_list = world.scenes(seed, count, "train")
    images = np.stack([np.asarray(s.render().resize((size, size), resample=2)) for s in scene_list])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [s.caption for s in scene_list]


def clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as the world scorer reads pictures."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def encode_captions(text, captions: list[str], chunk: int = 256, layer: int = -1) -> torch.Tensor:
    """The text encoder's 77 hidden states of each caption (SD's CLIP padding), in chunks: its last
    layer's (SD v1.5), or with `layer` another layer's (0: the token + position embeddings) through
    the final layer norm, as diffusers' `clip_skip` reads them."""
    ids = build_clip_tokenizer()(captions, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids

    def states(chunk_ids: torch.Tensor) -> torch.Tensor:
        if layer == -1:
            return text(input_ids=chunk_ids).last_hidden_state
        hidden = text(input_ids=chunk_ids, output_hidden_states=True).hidden_states[layer]
        return text.final_layer_norm(hidden)

    return torch.cat([states(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The VAE posterior means (unscaled), in chunks."""
    return torch.cat([vae.encode(pixels[i:i + chunk]).latent_dist.mean for i in range(0, len(pixels), chunk)])


def unet_loss(unet, scheduler, empty: torch.Tensor, latents: torch.Tensor, condition: torch.Tensor,
              cond_dropout: float = 0.1, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The decoder job's U-Net objective (`noised_latents`: the scheduler's prediction type;
    `denoising_loss`: its weighting), the empty caption's condition for `cond_dropout` of the
    examples (classifier-free guidance)."""
    noisy, timesteps, target = noised_latents(scheduler, latents)
    drop = torch.rand(latents.shape[0]) < cond_dropout
    condition = torch.where(drop[:, None, None], empty, condition)
    prediction = unet(noisy, timesteps, encoder_hidden_states=condition).sample
    return denoising_loss(prediction, target, scheduler, timesteps, min_snr_gamma)


def train(module, loss_fn, steps: int, lr: float, batch_of, label: str, optimizer=None,
          schedule: str = "constant", after_step=None) -> float:
    """AdamW at a constant `lr`, or with schedule "decay" the platform jobs' (50 warm-up steps,
    then linear decay to 0: platform/train/loop.lr_lambda); `after_step()` after every update."""
    optimizer = optimizer or torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                               weight_decay=0.01)
    scheduler = None
    if schedule == "decay":
        from kosmos_g.platform.train.config import OptimConfig
        from kosmos_g.platform.train.loop import lr_lambda

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(OptimConfig(lr=lr, warmup_steps=50), steps))
    started, window = time.perf_counter(), []
    for step in range(1, steps + 1):
        loss = loss_fn(*batch_of(step))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        window.append(float(loss.detach()))
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"[{label}] step {step}/{steps} loss {np.mean(window):.4f} "
                  f"({(time.perf_counter() - started) / step:.2f} s/step)", flush=True)
            last, window = float(np.mean(window)), []
    return last


@torch.no_grad()
def sample(unet, vae, scheduler_config, condition, empty, steps: int, guidance: float, seed: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(condition.shape[0], unet.config.in_channels, size, size, generator=generator)
    both = torch.cat([empty.expand(condition.shape[0], -1, -1), condition])
    for t in scheduler.timesteps:
        out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=both).sample
        uncond, cond = out.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def score(images: torch.Tensor, prompts: list[tuple[str, str, str]]) -> dict[str, float]:
    """Colour/shape of the largest object and the background, read from pixels."""
    hits = {"colour": 0, "shape": 0, "background": 0}
    for image, (colour, shape, background) in zip(images, prompts):
        reading = read_scene(to_uint8(image))
        hits["background"] += reading.background == background
        if reading.objects:
            largest = max(reading.objects, key=lambda o: o.area)
            hits["colour"] += largest.colour == colour
            hits["shape"] += largest.shape == shape
    return {k: v / len(prompts) for k, v in hits.items()}


def eval_prompts(count: int, seed: int, split: str = "train") -> list[tuple[str, str, str]]:
    """(colour, shape, background) prompts: of the training split, or only held-out pairs (the
    background the colour never appears on in any training data, as the Kosmos-G evaluation asks)."""
    rng = np.random.default_rng(seed)
    prompts = []
    while len(prompts) < count:
        colour, background = rng.choice(world.COLOURS, 2, replace=False)
        if (world.held_out_background(colour) == background) == (split == "held_out"):
            prompts.append((str(colour), str(rng.choice(world.SHAPES)), str(background)))
    return prompts


def load_decoder(uri: str):
    """(unet, vae, text encoder, scheduler config) of a mini decoder in SD's layout: registered, in storage or local."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from kosmos_g.platform.weights import local_dir

    folder = local_dir(uri)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    return unet, vae, text, DDPMScheduler.from_pretrained(folder, subfolder="scheduler").config


def text_to_image(decoder, prompts: list[str], guidance: float, chunk: int = 64, layer: int = -1) -> torch.Tensor:
    """DDIM 25 steps (the world evaluation's sampler), seed 0 per chunk of prompts."""
    unet, vae, text, scheduler_config = decoder
    hidden = encode_captions(text, prompts + [""], layer=layer)
    condition, empty = hidden[:-1], hidden[-1:]
    return torch.cat([sample(unet, vae, scheduler_config, condition[i:i + chunk], empty, 25, guidance, 0)
                      for i in range(0, len(prompts), chunk)])


def case_pictures(decoder, count: int, guidance: float = 4.0, layer: int = -1) -> list:
    """[(case, picture)]: the world evaluation's `count` single and `count // 2` two-subject
    held-out cases (platform/evaluation/world.py), each drawn by a loaded mini decoder from its
    words (`a red star on a purple background`)."""
    from PIL import Image

    from kosmos_g.platform.evaluation import world as world_eval

    cases = [case for case in world_eval.cases(count, count // 2) if case.kind != "text"]
    images = text_to_image(decoder, [case.text for case in cases], guidance, layer=layer)
    return [(case, Image.fromarray(to_uint8(image))) for case, image in zip(cases, images)]


def score_on(decoder, count: int, split: str = "train", guidance: float = 4.0, layer: int = -1) -> dict[str, float]:
    """Text-to-image accuracy of a loaded mini decoder on `count` single-object prompts of `split`;
    with split "cases", on the world evaluation's own held-out cases (platform/evaluation/world.py)
    prompted in words: the most an image-prompted Kosmos-G on this decoder could be expected to draw."""
    if split == "cases":
        from kosmos_g.platform.evaluation import world as world_eval

        pictures = case_pictures(decoder, count, guidance, layer)
        return world_eval.summarise([{"kind": case.kind, "prompt": case.prompt, **world_eval.score(case, picture)}
                                     for case, picture in pictures])
    prompts = eval_prompts(count, 1, split)
    images = text_to_image(decoder, [f"a {c} {s} on a {b} background" for c, s, b in prompts], guidance, layer=layer)
    return score(images, prompts)


def score_decoder(uri: str, count: int, threads: int, split: str = "train", guidance: float = 4.0,
                  layer: int = -1) -> dict[str, float]:
    """`score_on` a registered (or local) mini decoder."""
    torch.set_num_threads(threads)
    return score_on(load_decoder(uri), count, split, guidance, layer)


def continue_decoder(uri: str, steps: int, score_every: int, args) -> list[dict]:
    """Train a registered decoder's U-Net `steps` more steps (plain loop, its own loss: the
    scheduler's prediction type, 10% empty-caption dropout) on training-split scenes, scoring the
    evaluation's held-out cases in words every `score_every` steps: do more U-Net steps buy shapes?"""
    from diffusers import DDPMScheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = load_decoder(uri)
    unet, vae, text, scheduler_config = decoder
    scheduler = DDPMScheduler.from_config(scheduler_config)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    pixels, captions = scene_tensors(args.scenes, 0, size)
    hidden = encode_captions(text, captions + [""])
    condition_all, empty = hidden[:-1], hidden[-1:]
    latents = encode_latents(vae, pixels) * vae.config.scaling_factor
    rng = np.random.default_rng(0)

    def batch_of(_):
        i = torch.from_numpy(rng.integers(0, len(captions), args.batch))
        return latents[i], condition_all[i]

    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)  # one for every round
    rows = []
    for done in range(0, steps + 1, score_every):
        if done:
            unet.train()
            train(unet, lambda latents, condition: unet_loss(unet, scheduler, empty, latents, condition),
                  score_every, args.lr, batch_of, f"unet +{done}", optimizer)
            unet.eval()
        rows.append({"added_steps": done, **score_on(decoder, args.eval_prompts, "cases")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--save-dir", help="keep each recipe's decoder under DIR/<recipe> (unet/, vae/, text_encoder/, scheduler/)")
    parser.add_argument("--clip", metavar="URI", help="condition on this registered/local mini CLIP's text encoder "
                                                       "(e.g. models:/kosmos-g-mini-clip/1) instead of training one")
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--clip-schedule", choices=("constant", "decay"), default="constant",
                        help="the mini CLIP trained here: constant lr, or the platform jobs' warm-up + linear decay")
    parser.add_argument("--clip-check-every", type=int, default=0, metavar="N",
                        help="print the CLIP's zero-shot colour binding and shape choice every N of its steps "
                             "(chance 0.5 and 0.25; the CLIP jobs log the same check once, at their end)")
    parser.add_argument("--seed", type=int, default=0, help="initialisations and batch order of what is trained here "
                                                            "(the scenes and the scoring prompts stay the same)")
    parser.add_argument("--unet-schedule", choices=("constant", "decay"), default="constant",
                        help="each U-Net: constant lr, or the decoder job's warm-up + linear decay")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pair-share", type=float, default=0.0, metavar="P",
                        help="each U-Net example is a two-object scene with probability P (0: uniform over the "
                             "scenes, of which 38%% have two objects); the CLIP and VAE see the scenes as they come")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--cases", type=int, default=0, metavar="N",
                        help="also score each recipe on N of the world evaluation's one-subject cases and N/2 of its "
                             "two-subject cases, in words (split 'cases'): two objects' colours kept apart")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/mini_sweep.json")
    parser.add_argument("--score-decoder", metavar="URI", help="only score this registered/local decoder")
    parser.add_argument("--split", choices=("train", "held_out", "cases"), default="train",
                        help="with --score-decoder: prompts of the training split, held-out colour/background "
                             "pairs, or the world evaluation's cases in words (--eval-prompts singles, half as many pairs)")
    parser.add_argument("--guidance", type=float, default=4.0, help="with --score-decoder: classifier-free guidance")
    parser.add_argument("--ema", action="store_true",
                        help="also keep an exponential moving average of each U-Net's weights (diffusers' EMAModel, "
                             "decay (1 + t) / (10 + t)) and score it beside the raw weights of the same run")
    parser.add_argument("--text-layer", type=int, default=-1,
                        help="condition on this hidden layer of the text encoder (through its final layer norm, "
                             "diffusers' clip_skip): -1 the last (SD v1.5), 0 the embeddings; a sweep's or "
                             "--score-decoder's")
    parser.add_argument("--continue-decoder", metavar="URI",
                        help="train this decoder's U-Net --unet-steps more, scoring the held-out cases in words")
    parser.add_argument("--score-every", type=int, default=250, help="with --continue-decoder")
    parser.add_argument("--lr", type=float, default=3e-4, help="with --continue-decoder (a fresh AdamW)")
    args = parser.parse_args(argv)
    if args.continue_decoder:
        rows = continue_decoder(args.continue_decoder, args.unet_steps, args.score_every, args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
        return {"continued": rows}
    if args.score_decoder:
        result = score_decoder(args.score_decoder, args.eval_prompts, args.threads, args.split, args.guidance,
                               args.text_layer)
        if args.split == "cases":
            print(f"{args.score_decoder} (evaluation cases in words, guidance {args.guidance:g}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
            return result
        print(f"{args.score_decoder} ({args.split}, guidance {args.guidance:g}): colour {result['colour']:.2f} shape {result['shape']:.2f} "
              f"background {result['background']:.2f} (chance 0.125 / 0.25 / 0.125)")
        return result
    results = sweep(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def text_encoder(args, pixels: torch.Tensor, captions: list[str]):
    """(frozen CLIP text encoder, its final contrastive loss or None): the registered one of
    `--clip`, else a mini CLIP trained here on the scenes."""
    if args.clip:
        from transformers import CLIPTextModel

        from kosmos_g.platform.weights import local_dir

        return CLIPTextModel.from_pretrained(local_dir(args.clip)).eval().requires_grad_(False), None
    tokens = build_clip_tokenizer()(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    rng = np.random.default_rng(args.seed)
    clip = build_clip(MiniClipConfig())

    def clip_batch(_):
        i = torch.from_numpy(rng.integers(0, len(captions), 64))
        return ids[i], mask[i], clip_pixels(pixels[i])

    final = train(clip, lambda a, m, p: clip_loss(clip, a, m, p), args.clip_steps, 5e-4, clip_batch, "clip",
                  schedule=args.clip_schedule, after_step=zero_shot_check(clip, args.clip_check_every))
    return clip.text_model.eval().requires_grad_(False), final  # a CLIPTextModel, as SD folders hold


def zero_shot_check(clip, every: int):
    """An `after_step` that prints the CLIP's zero-shot colour binding and shape choice (the CLIP
    jobs' check, platform/evaluation/clip_binding.py) every `every` steps; None when 0."""
    if not every:
        return None
    from kosmos_g.platform.evaluation.clip_binding import binding_accuracy
    from kosmos_g.platform.evaluation.metrics import ClipScorer

    scorer, step = ClipScorer.of(clip, build_clip_tokenizer()), 0

    def check():
        nonlocal step
        step += 1
        if step % every == 0:
            clip.eval()
            scores = binding_accuracy(scorer.text_scores)
            clip.train()
            print(f"[clip] step {step} zero-shot: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()),
                  flush=True)

    return check


def sweep(args) -> dict:
    """The text encoder and the VAE once, then one U-Net per recipe from the same seed and data,
    each scored on training-split prompts and on held-out colour/background pairs."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    decoder_base = MiniDecoderConfig()
    pixels, captions = scene_tensors(args.scenes, 0, decoder_base.image_size)
    is_pair = np.array([" and " in caption for caption in captions])  # two-object scenes (38% of them)
    pair_rows, single_rows = np.flatnonzero(is_pair), np.flatnonzero(~is_pair)
    text, clip_final = text_encoder(args, pixels, captions)
    hidden = encode_captions(text, captions + [""], layer=args.text_layer)
    condition_all, empty = hidden[:-1], hidden[-1:]
    rng = np.random.default_rng(args.seed)

    def indices(batch: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, len(captions), batch))

    vae = build_vae(decoder_base)
    vae_final = train(vae, lambda p: vae_loss(vae, p, decoder_base.vae_kl_weight)["loss"], args.vae_steps, 1e-3,
                      lambda _: (pixels[indices(args.batch)],), "vae")
    vae.eval().requires_grad_(False)
    latents_all = encode_latents(vae, pixels)
    scale = float(1 / latents_all.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        reconstructed = vae.decode(latents_all[:256]).sample.clamp(-1, 1)
    prompts_rec = [(s.objects[0].colour, s.objects[0].shape, s.background) for s in world.scenes(0, 256, "train")]
    results = {"clip": args.clip or f"trained here ({args.clip_steps} steps, {args.clip_schedule} lr)",
               "seed": args.seed, "pair_share": args.pair_share or float(is_pair.mean()),
               "unet_schedule": args.unet_schedule, "text_layer": args.text_layer,
               "clip_loss": clip_final, "vae_loss": vae_final,
               "vae_scaling_factor": scale, "vae_reconstruction": score(reconstructed, prompts_rec), "recipes": {}}
    print(f"[vae] reconstructions read back: {results['vae_reconstruction']}", flush=True)

    def unet_indices(batch: int) -> torch.Tensor:
        """Uniform over the scenes, or with --pair-share each example a two-object scene with that probability."""
        if not args.pair_share:
            return indices(batch)
        take_pair = rng.random(batch) < args.pair_share
        return torch.from_numpy(np.where(take_pair, pair_rows[rng.integers(0, len(pair_rows), batch)],
                                         single_rows[rng.integers(0, len(single_rows), batch)]))

    def unet_batch(_):
        i = unet_indices(args.batch)
        return latents_all[i] * scale, condition_all[i]

    for name in args.recipes.split(","):
        cfg = MiniDecoderConfig(**RECIPES[name])
        torch.manual_seed(args.seed)
        unet, scheduler = build_unet(cfg, condition_all.shape[-1]), build_scheduler(cfg)
        started = time.perf_counter()
        ema = None
        if args.ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(unet.parameters())
        final = train(unet, lambda latents, condition: unet_loss(unet, scheduler, empty, latents, condition,
                                                                 min_snr_gamma=cfg.min_snr_gamma),
                      args.unet_steps, 1e-3, unet_batch, f"unet {name}", schedule=args.unet_schedule,
                      after_step=None if ema is None else lambda: ema.step(unet.parameters()))
        train_s = time.perf_counter() - started
        unet.eval()
        decoder = (unet, vae, text, scheduler.config)  # scored with its last weights, then (--ema) their average
        for weights in ("raw", "ema") if ema is not None else ("raw",):
            if weights == "ema":
                ema.copy_to(unet.parameters())
            label = name if weights == "raw" else f"{name}+ema"
            if args.save_dir:  # the folders `load_decoder` reads: --score-decoder DIR/<recipe> scores it again
                for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text), ("scheduler", scheduler)):
                    module.save_pretrained(Path(args.save_dir) / label / part)
            results["recipes"][label] = {"loss": final, "train_s": train_s,
                                         "train": score_on(decoder, args.eval_prompts, "train", layer=args.text_layer),
                                         "held_out": score_on(decoder, args.eval_prompts, "held_out",
                                                              layer=args.text_layer)}
            if args.cases:
                results["recipes"][label]["cases"] = score_on(decoder, args.cases, "cases", layer=args.text_layer)
            print(f"[unet {label}] {results['recipes'][label]}", flush=True)
    print("\nrecipe              training pairs: colour shape background | held-out pairs: colour shape background")
    for name, row in results["recipes"].items():
        cells = " | ".join(" ".join(f"{row[split][k]:6.2f}" for k in ("colour", "shape", "background"))
                           for split in ("train", "held_out"))
        pair, apart = (row.get("cases", {}).get(f"world_pair_{k}") for k in ("both_colours", "both_apart"))
        pairs = "" if pair is None else f" | two subjects in words: both colours {pair:.2f}"
        print(f"{name:18s}  {cells}{pairs}" + ("" if apart is None else f" (apart {apart:.2f})"))
    print("chance                               0.125 0.25 0.125")
    return results

if __name__ == "__main__":
    main()
