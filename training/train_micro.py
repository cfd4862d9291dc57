"""Train the micro model: VAE first, then UNet and text encoder together; export a diffusers folder.

    .venv/bin/python -m training.train_micro                 # from scratch (or carries on from a checkpoint)
    .venv/bin/python -m training.train_micro --export-only   # write the folder from the last checkpoint

The UNet/text-encoder training has two phases: --unet-steps on captions that match their pictures
(cosine learning-rate schedule), then --low-noise-steps that also show some pictures, at low noise
only, with captions of other colours, so that img2img at a low strength keeps the picture's colours.
The checkpoint at the end of the first phase is kept as checkpoint-step<N>.pt, so the second can be
rerun alone (README).

With --init-from an exported model folder, training starts from that model's weights instead (its
VAE too): the shipped model's six fine-tunes (img2img, emphasis, empty-prompt) were run that way, and
`python -m training.run_recipe shipped` runs this run and them in order (README).

Deterministic for a given seed and step count; checkpoints every few hundred steps into --work, so a
stopped run carries on where it stopped (the RNG states are in the checkpoint too). With --max-minutes
it stops itself: checkpointed, nothing exported, exit status 75 (STOPPED_FOR_TIME), and the same
command carries on.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.presets import family_defaults
from engine.prompts import apply_emphasis, encode_prompt_a1111
from engine.samplers import build_scheduler, diffusers_strength, img2img_steps
from engine.vae import encode_to_means

from . import architecture, dataset, quality

log = logging.getLogger("train_micro")

# The exit status of a run that --max-minutes stopped before its last step (sysexits' EX_TEMPFAIL, "try
# again later"): a caller such as run_recipe must not take it for a finished run, whose model is exported.
STOPPED_FOR_TIME = 75

# The VAE posterior's starting log-variance (narrow_posterior).
POSTERIOR_LOGVAR_INIT = -4.0
# A palette colour whose round trip through the finished VAE is off by more than this (of 255) is not kept
# apart from another: the shipped VAE's worst colour is 3.3, a merged one's 20 and more.
COLOUR_ERROR_WARNING = 8.0
# A palette colour whose shapes come back from the finished VAE read as another colour this often. Per pixel,
# a colour's error is mostly its backgrounds': a VAE can keep two colours apart there and still draw a small
# black shape green (one from-scratch VAE: 17% of black shapes, its per-pixel errors all under 4; the shipped
# VAE: under 5%, small yellow shapes read orange).
SHAPE_COLOUR_MISREAD_WARNING = 0.1
# Pictures the two checks read: the per-pixel one the first of these, the shape-colour one all of them.
COLOUR_CHECK_PICTURES = 512
SHAPE_CHECK_PICTURES = 1024
# What both warnings advise. The seed matters most: from scratch on one host, seed 0's VAE misread a sixth of
# its black shapes where seeds 1 and 2 misread at most 3% of any colour.
RETRAIN_VAE_ADVICE = (
    "train another (delete the vae and vae-finetuned folders in --work; another --vae-seed, or more --vae-steps)"
)

# The precision export stores the weights in (keeping the folder small); a new VAE is rounded to it before
# it encodes the UNet's latents.
EXPORT_DTYPE = torch.float16

# Learning rate in the low-noise phase, relative to the base rates: twice where the main phase ends.
LOW_NOISE_LR_FACTOR = 0.2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "Stable-diffusion" / "micro-shapes"
DEFAULT_WORK = REPO / "training" / "runs" / "micro-shapes"
CHECKPOINT_NAME = "checkpoint.pt"  # the rolling checkpoint a run resumes and --export-only writes from
FAMILY_MARKER = {"_lantern_family": "micro"}
# What the page opens with for this model, and so what the training checks sample with.
MICRO_DEFAULTS = family_defaults(FAMILY_MARKER["_lantern_family"])


# Options that are a fraction (0 to 1); parse_args refuses anything else, naming the option.
SHARE_OPTIONS = (
    "emphasis_share",
    "caption_dropout",
    "recolour_share",
    "recolour_background_share",
    "shape_balance",
    "vae_shape_balance",
    "hold_recolour_share",
    "hold_empty_share",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="diffusers folder to write")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints, latents and the log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vae-seed",
        type=int,
        default=None,
        help="seed of the VAE and its decoder fine-tune (their start, order and pictures), --seed by default; "
        "the VAE's colours depend on it most (seed 0 merged black and green on one host, seeds 1 and 2 did not)",
    )
    parser.add_argument("--images", type=int, default=30000, help="pictures generated for training")
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--decoder-steps", type=int, default=1000, help="decoder-only fine-tuning steps")
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument(
        "--low-noise-steps",
        type=int,
        default=1800,
        help="steps after --unet-steps that also train on recoloured captions at low noise (for img2img)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=7e-4)
    parser.add_argument("--text-lr", type=float, default=1e-3)
    parser.add_argument("--aux-weight", type=float, default=0.1)
    parser.add_argument(
        "--offset-noise",
        type=float,
        default=0.3,
        help="add this much per-channel constant noise (offset noise), so the picture's mean colour is learnt",
    )
    parser.add_argument(
        "--emphasis-share",
        type=float,
        default=0.0,
        help="weight each colour word, as (red:1.3) does, in this share of captions, the weight following "
        "that colour's area (the shipped model's emphasis fine-tune uses it with --colour-attention)",
    )
    parser.add_argument(
        "--colour-attention",
        type=float,
        default=0.0,
        # (No percent sign: argparse formats help strings with %.)
        help="weight of a loss that asks the UNet's cross-attention to put a share of at least "
        f"{COLOUR_ATTENTION_TARGET} on the prompt's colour words, so their emphasis weights reach the picture",
    )
    parser.add_argument(
        "--caption-dropout",
        type=float,
        default=dataset.CAPTION_DROPOUT,
        help="share of pictures trained with the empty prompt (what CFG and negative prompts subtract from)",
    )
    parser.add_argument("--eval-every", type=int, default=600, help="steps between quality checks (~30 s each)")
    parser.add_argument("--checkpoint-every", type=int, default=300)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop this many minutes after starting, at the next UNet step (the VAE phases always finish): "
        "checkpointed, nothing exported, exit status 75; the same command carries on",
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop at this step (the schedule still counts --unet-steps)"
    )
    parser.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from an exported micro model folder (its VAE, text encoder and UNet) instead of training "
        "the VAE and a UNet from scratch; with --unet-steps 0 only the low-noise phase runs on it",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="use this finished VAE (a micro model folder, or its vae folder) instead of training one; "
        "the UNet and text encoder still train from scratch",
    )
    parser.add_argument(
        "--recolour-share",
        type=float,
        default=dataset.RECOLOUR_SHARE,
        help="share of the low-noise phase's pictures captioned with other colours",
    )
    parser.add_argument(
        "--recolour-background-share",
        type=float,
        default=dataset.RECOLOUR_BACKGROUND_SHARE,
        help="share of the recoloured captions (--recolour-share, --hold-recolour-share) that name another "
        "background colour too; the rest change only the shape's colour, which is all img2img at a low "
        "strength is measured on",
    )
    parser.add_argument(
        "--low-noise-timesteps",
        type=int,
        default=dataset.LOW_NOISE_STEPS,
        help="recoloured captions meet pictures noised to at most this timestep (of 1,000)",
    )
    parser.add_argument(
        "--vae-shape-balance",
        type=float,
        default=0.0,
        help="0 to 1: --shape-balance for the VAE and its decoder fine-tune, per picture pixel; a small shape's "
        "few pixels otherwise count for little, and two close colours (green and black) can come back alike there "
        "(at 0.15 and 0.5 they came apart; the budget-own-vae recipe uses 0.15: docs/micro-shapes-training.md)",
    )
    parser.add_argument(
        "--shape-balance",
        type=float,
        default=0.0,
        help="0 to 1: how far the loss's weight per latent pixel moves from uniform towards giving the "
        "shape's pixels as much weight in all as the background's (a small shape covers 5-15 percent)",
    )
    parser.add_argument(
        "--hold-weight",
        type=float,
        default=0.0,
        help="with --init-from: weight of a loss that keeps the UNet's noise predictions at timesteps from "
        "--hold-from-timestep up (to below --hold-to-timestep) equal to the starting model's (so a low-noise "
        "repair leaves the high-noise behaviour that samplers such as LMS depend on as it was); each step "
        "then takes about twice as long",
    )
    parser.add_argument(
        "--hold-from-timestep",
        type=int,
        default=200,
        help="lowest timestep (of 1,000) that --hold-weight holds; img2img at strength 0.1 stays below 100",
    )
    parser.add_argument(
        "--hold-to-timestep",
        type=int,
        default=1000,
        help="--hold-weight holds timesteps below this one; holding only the low ones (say 0 to 150) keeps "
        "what img2img at a low strength does while the rest are retrained",
    )
    parser.add_argument(
        "--hold-recolour-share",
        type=float,
        default=0.0,
        help="give the hold's captioned pictures (see --hold-empty-share) captions of their own, never "
        "empty: this share of them of other colours than the picture's (what img2img at a low strength asks "
        "for), the rest the picture's own",
    )
    parser.add_argument(
        "--hold-empty-share",
        type=float,
        default=0.5,
        help="share of the hold's pictures given the empty prompt (the rest keep their captions); 0 holds "
        "only the prompted predictions and leaves the empty prompt's free to move",
    )
    parser.add_argument(
        "--min-timestep",
        type=int,
        default=0,
        help="the first phase noises its pictures to this timestep (of 1,000) or more, so a fine-tune can "
        "change how a sampler starts a picture without training the nearly finished ones",
    )
    parser.add_argument(
        "--snr-gamma",
        type=float,
        default=5.0,
        help="min-SNR loss weighting: a timestep's loss is weighed by min(SNR, gamma) / SNR, so the nearly "
        "clean timesteps (where a shape's rim is drawn) count less the smaller it is; 0 weighs all alike",
    )
    parser.add_argument(
        "--shape-shares",
        type=parse_shape_shares,
        default=None,
        metavar="circle=S,square=S,triangle=S",
        help="draw each batch's pictures so the shapes come in these shares (normalised to sum to 1; a "
        "shape left out keeps 1/3) instead of as the dataset holds them (about a third each), e.g. more "
        "circles, whose rims are the slowest to come right",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="run the UNet and text encoder passes in bfloat16 autocast (about 14%% faster a step on a CPU "
        "with AVX-512 BF16; other weights than float32's, as deterministic)",
    )
    parser.add_argument(
        "--cfg-target-scale",
        type=float,
        default=0.0,
        metavar="CFG",
        help="below --cfg-target-below, give each captioned picture the target that makes CFG at this scale "
        "predict its own noise: the noise moved (1 - 1/CFG) of the way to the empty prompt's prediction. "
        "CFG extrapolates the prompted-minus-empty gap, which on a nearly drawn picture exaggerates its "
        "outline (circles drawn as rounded diamonds); 0 (default) trains every picture on its noise",
    )
    parser.add_argument(
        "--cfg-target-below",
        type=int,
        default=600,
        help="timestep (of 1,000) below which --cfg-target-scale applies; above it the full gap is kept, "
        "which is where guidance sets the colours",
    )
    args = parser.parse_args(argv)
    if args.snr_gamma < 0:
        parser.error(f"--snr-gamma must be 0 or more, not {args.snr_gamma}")
    if args.max_minutes is not None and args.max_minutes < 0:
        parser.error(f"--max-minutes must be 0 or more, not {args.max_minutes}")
    if args.hold_weight and not args.init_from:
        parser.error("--hold-weight holds the --init-from model's predictions; give --init-from")
    if not 0 <= args.hold_from_timestep < args.hold_to_timestep <= 1000:
        parser.error(
            f"--hold-from-timestep ({args.hold_from_timestep}) and --hold-to-timestep ({args.hold_to_timestep}) "
            "must satisfy 0 <= from < to <= 1000"
        )
    if args.cfg_target_scale and args.cfg_target_scale < 1:
        parser.error(f"--cfg-target-scale must be 0 (off) or 1 or more, not {args.cfg_target_scale}")
    if not 0 < args.cfg_target_below <= 1000:
        parser.error(f"--cfg-target-below must be from 1 to 1000, not {args.cfg_target_below}")
    if not 0 <= args.min_timestep < 1000:
        parser.error(f"--min-timestep must be from 0 to 999, not {args.min_timestep}")
    # Each is compared with a random number or splits a batch or a loss: outside 0 to 1 it would act as 0
    # or 1 without a word.
    for share in SHARE_OPTIONS:
        value = getattr(args, share)
        if not 0.0 <= value <= 1.0:
            parser.error(f"--{share.replace('_', '-')} must be between 0 and 1, not {value}")
    if args.init_from and args.vae_from:
        parser.error("--init-from already brings its model's VAE; leave out --vae-from")
    if args.vae_seed is not None and (args.init_from or args.vae_from):
        parser.error("--vae-seed seeds a VAE trained here; --init-from and --vae-from bring a finished one")
    # Without a checkpoint there is nothing trained to write: the untrained weights would land in --out.
    if args.export_only and not (checkpoint := args.work / CHECKPOINT_NAME).is_file():
        parser.error(f"--export-only writes the model from {checkpoint}, which is not there; give the --work of a run")
    if args.vae_seed is None:
        args.vae_seed = args.seed
    return args


def parse_shape_shares(text: str) -> dict[str, float]:
    """ "circle=0.5,square=0.3" -> every shape's share of the batches, summing to 1 (one left out keeps 1/3)."""
    shares = dict.fromkeys(dataset.SHAPES, 1 / len(dataset.SHAPES))
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in shares:
            raise argparse.ArgumentTypeError(f"shape {name!r} in {text!r}; allowed: {', '.join(dataset.SHAPES)}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"share of {name} {value!r} in {text!r}; allowed: a number") from None
        if not 0 <= shares[name] < math.inf:
            raise argparse.ArgumentTypeError(f"share of {name} {value!r} in {text!r}; allowed: 0 or more")
    total = sum(shares.values())
    if total <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} gives every shape a share of 0; at least one must be more")
    return {name: share / total for name, share in shares.items()}


# Data -------------------------------------------------------------------------------------------


def scene_draw_weights(scenes: list[dataset.ShapeScene], shares: dict[str, float]) -> torch.Tensor:
    """Each scene's chance of being drawn into a batch, so that the shapes come in `shares` whatever
    their counts in `scenes` (a shape `scenes` lacks is never drawn)."""
    counts = collections.Counter(scene.shape for scene in scenes)
    return torch.tensor([shares[scene.shape] / counts[scene.shape] for scene in scenes], dtype=torch.float64)


def training_pictures(count: int, seed: int) -> tuple[list[dataset.ShapeScene], torch.Tensor]:
    scenes, pixels = dataset.make_images(count, seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return scenes, images


class CaptionBatcher:
    """Draws captions for scenes and turns them into token ids, per-token emphasis weights and the
    labels the auxiliary heads learn."""

    def __init__(
        self,
        tokenizer,
        rng: random.Random,
        emphasis_rng: random.Random,
        emphasis_share: float = 0.0,
        dropout: float = dataset.CAPTION_DROPOUT,
    ):
        self.tokenizer = tokenizer
        self.dropout = dropout
        self.rng = rng
        self.emphasis_rng = emphasis_rng
        self.emphasis_share = emphasis_share
        self._ids: dict[str, list[int]] = {}
        vocab = tokenizer.get_vocab()
        self.shape_nouns = {vocab[f"{shape}</w>"] for shape in [*dataset.SHAPES, "shape"]}
        self.background_noun = vocab["background</w>"]
        self.colour_ids = {colour: vocab[f"{colour}</w>"] for colour in dataset.COLOURS}

    def token_ids(self, caption: str) -> list[int]:
        if caption not in self._ids:
            self._ids[caption] = self.tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        return self._ids[caption]

    def draw(self, scenes: list[dataset.ShapeScene]) -> tuple[torch.Tensor, list[list[float]], dict[str, torch.Tensor]]:
        ids, weights, labels = [], [], {"colour": [], "background": [], "shape": [], "size": []}
        for scene in scenes:
            caption, template = dataset.random_caption(scene, self.rng, dropout=self.dropout)
            ids.append(self.token_ids(caption))
            token_weights = [1.0] * len(ids[-1])
            if template:
                for colour, weight in dataset.emphasis_weights(
                    scene, template, self.emphasis_rng, self.emphasis_share
                ).items():
                    token_weights[ids[-1].index(self.colour_ids[colour])] = weight
            weights.append(token_weights)
            named = dataset.named_attributes(template) if template else dict.fromkeys(labels, False)
            labels["colour"].append(dataset.COLOURS.index(scene.colour) if named["colour"] else -100)
            labels["background"].append(dataset.COLOURS.index(scene.background) if named["background"] else -100)
            labels["shape"].append(dataset.SHAPES.index(scene.shape) if named["shape"] else -100)
            labels["size"].append(dataset.SIZES.index(scene.size) if named["size"] else -100)
        return torch.tensor(ids), weights, {k: torch.tensor(v) for k, v in labels.items()}


def named_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over the captions that name the attribute (label -100: not named), or zero when
    none in the batch does (no caption with the noun at all included). torch's mean over no labels is
    nan; its gradient is zero, so training was never harmed, but the logged loss read "nan" on such
    batches (common with mostly empty captions)."""
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-100)


class AuxiliaryHeads(nn.Module):
    """Throwaway classifiers on the text encoder's output, used only in training.

    They make the encoder state, at the end-of-text token and at the nouns, which colour belongs to
    the shape and which to the background: word order decides it ("red on blue" vs "blue on red"),
    and a small encoder trained by the diffusion loss alone learns that binding slowly.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.eos = nn.ModuleDict(
            {
                "colour": nn.Linear(hidden, len(dataset.COLOURS)),
                "background": nn.Linear(hidden, len(dataset.COLOURS)),
                "shape": nn.Linear(hidden, len(dataset.SHAPES)),
                "size": nn.Linear(hidden, len(dataset.SIZES)),
            }
        )
        self.shape_noun_colour = nn.Linear(hidden, len(dataset.COLOURS))
        self.background_noun_colour = nn.Linear(hidden, len(dataset.COLOURS))

    def loss(self, hidden, input_ids, labels, shape_nouns: set[int], background_noun: int) -> torch.Tensor:
        batch = torch.arange(hidden.shape[0])
        eos = hidden[batch, input_ids.argmax(-1)]  # first end-of-text token (highest id), as CLIP pools
        total = sum(named_cross_entropy(head(eos), labels[k]) for k, head in self.eos.items())
        for noun_ids, head, key in (
            (shape_nouns, self.shape_noun_colour, "colour"),
            ({background_noun}, self.background_noun_colour, "background"),
        ):
            is_noun = torch.isin(input_ids, torch.tensor(sorted(noun_ids)))
            rows, cols = is_noun.nonzero(as_tuple=True)
            total = total + named_cross_entropy(head(hidden[rows, cols]), labels[key][rows])
        return total


class CrossAttentionMaps:
    """Attention processors for the UNet's cross-attention layers that compute what diffusers'
    AttnProcessor computes for them (3-D inputs, no attention mask, no norms or residual inside the
    layer: this architecture's case) and keep the attention maps of the last forward pass (one tensor
    per layer, batch x heads x pixels x tokens), so training can see where in the prompt the picture looks."""

    def __init__(self, unet):
        self.maps: list[torch.Tensor] = []
        unet.set_attn_processor(
            {name: self if ".attn2." in name else processor for name, processor in unet.attn_processors.items()}
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, None)
        self.maps.append(probabilities.unflatten(0, (-1, attn.heads)))
        output = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](output))


# A1111's emphasis scales only the tokens inside the parentheses. Trained on its own, this model's
# cross-attention looks at the nouns, the end of text and the padding, which the causal encoder has
# filled with the colours, and spends under 1% on the colour words themselves, so "(blue:1.4)" and
# "(blue:0.6)" drew the same picture. Asking for a share on the colour words makes their weight count.
COLOUR_ATTENTION_TARGET = 0.3


def colour_attention_share(maps: list[torch.Tensor], on_colour_word: torch.Tensor) -> torch.Tensor:
    """Per caption, the share of cross-attention (over layers, heads and pixels) on the tokens that
    `on_colour_word` (batch x tokens, 0/1) marks."""
    return torch.stack([(layer * on_colour_word[:, None, None, :]).sum(-1).mean(dim=(1, 2)) for layer in maps]).mean(0)


def colour_attention_shortfall(share: torch.Tensor, names_a_colour: torch.Tensor) -> torch.Tensor:
    """How far the captions that name a colour fall short of COLOUR_ATTENTION_TARGET, on average."""
    if not names_a_colour.any():
        return share.new_zeros(())
    return F.relu(COLOUR_ATTENTION_TARGET - share[names_a_colour]).mean()


# VAE ---------------------------------------------------------------------------------------------


def train_vae(images: torch.Tensor, scenes: list[dataset.ShapeScene], args, work: Path):
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if (folder / "config.json").is_file():
        log.info("VAE: using %s", folder)
        return AutoencoderKL.from_pretrained(folder)
    torch.manual_seed(args.vae_seed)
    vae = architecture.build_vae()
    narrow_posterior(vae)
    order = torch.Generator().manual_seed(args.vae_seed + 1)
    start = time.time()
    fit_reconstruction(
        vae,
        images,
        list(vae.parameters()),
        lr=1.5e-3,
        steps=args.vae_steps,
        order=order,
        stage="vae",
        shape_weights=_vae_shape_weights(scenes, args.vae_shape_balance),
    )
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(2048, len(images)), 256)]
        )
    # Unit-variance latents, as SD's 0.18215 makes them: the noise schedule assumes it.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(folder, safe_serialization=True)
    log.info("VAE trained in %.0f s; scaling_factor %.4f", time.time() - start, vae.config.scaling_factor)
    report_colour_errors("VAE", vae, scenes, images, final=False)
    return vae


def _vae_shape_weights(
    scenes: list[dataset.ShapeScene], balance: float
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function from a batch's picture indices to per-pixel loss weights [B, 1, 64, 64], balanced as
    `shape_balanced_weights`; none at balance 0, so a run without the option computes its loss exactly as
    before the option existed."""
    if not balance:
        return None

    def weights(indices: torch.Tensor) -> torch.Tensor:
        # Drawn per batch: 30,000 full-size coverage maps would hold half a gigabyte for a few ms a step.
        coverage = np.stack([dataset.shape_coverage(scenes[i], dataset.IMAGE_SIZE) for i in indices.tolist()])
        return shape_balanced_weights(torch.from_numpy(coverage)[:, None], balance)

    return weights


def fit_reconstruction(
    vae,
    images: torch.Tensor,
    trainable: list,
    *,
    lr: float,
    steps: int,
    order,
    stage: str,
    shape_weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Train `trainable` to reconstruct batches of 16 pictures (MSE + 0.1 L1, cosine learning rate).

    With the encoder among them, the posterior's KL term (weight 1e-6, as SD's VAE) joins the loss;
    with it frozen (the decoder fine-tune), the encoder runs without gradients. `shape_weights` maps the
    batch's picture indices to per-pixel weights for both terms."""
    train_encoder = any(param.requires_grad for param in vae.encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        indices = torch.randint(0, len(images), (16,), generator=order)
        batch = images[indices]
        with torch.set_grad_enabled(train_encoder):
            posterior = vae.encode(batch).latent_dist
            latents = posterior.sample(generator=order)
        recon = vae.decode(latents).sample
        if shape_weights is None:
            loss = F.mse_loss(recon, batch) + 0.1 * F.l1_loss(recon, batch)
        else:
            weights = shape_weights(indices)
            loss = (weights * (recon - batch).square()).mean() + 0.1 * (weights * (recon - batch).abs()).mean()
        if train_encoder:
            loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d loss %.5f (%.0f s)", stage, step, loss.item(), time.time() - start)


def narrow_posterior(vae) -> None:
    """Start the encoder's posterior at std e^-2 instead of 1.

    With the default init the posterior's std is about as large as the latents' own spread, and with
    a KL weight of 1e-6 over 700 steps it never shrinks: only two of the four latent channels then
    carry colour, and on some hosts (float round-off differs with the thread count) two close palette
    colours, green and black or yellow and orange, share one latent and decode alike. Started narrow,
    the one such run measured again (seed 0, two threads, green and black merged before) brought every
    colour back within 6.7 of 255 after the decoder fine-tune (README)."""
    with torch.no_grad():
        vae.quant_conv.bias[architecture.LATENT_CHANNELS :] = POSTERIOR_LOGVAR_INIT


def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """`images` [B, 3, H, W] in -1..1 sent through the VAE (the posterior's mean) and back, as 0-255 floats
    [B, H, W, 3]."""
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(images[i : i + 128]).latent_dist.mean).sample for i in range(0, len(images), 128)]
        )
    return ((recon.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255)


def colour_reconstruction_errors(vae, images: torch.Tensor, count: int = COLOUR_CHECK_PICTURES) -> dict[str, float]:
    """Mean absolute round-trip error (0-255) of each palette colour's pixels over `count` pictures.

    A VAE that merges two colours shows it here as one or two colours far above the rest."""
    return _colour_errors(images[:count], round_trip(vae, images[:count]))


def _colour_errors(sample: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """colour_reconstruction_errors of `sample` [B, 3, H, W] from its round trip `decoded` (round_trip's)."""
    original = ((sample.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255)
    labels = torch.from_numpy(dataset.nearest_palette(original.reshape(-1, 1, 3).numpy().round())).reshape(-1)
    error = (decoded - original).abs().mean(-1).reshape(-1)
    return {
        name: float(error[labels == index].mean())
        for index, name in enumerate(dataset.COLOURS)
        if (labels == index).any()
    }


def shape_colour_misreads(
    vae, scenes: list[dataset.ShapeScene], images: torch.Tensor, count: int = SHAPE_CHECK_PICTURES
) -> dict[str, float]:
    """For each palette colour, the share of the first `count` pictures with a shape of that colour whose
    round trip the quality classifier reads with another shape colour."""
    return _shape_colour_misreads(scenes, round_trip(vae, images[:count]))


def _shape_colour_misreads(scenes: list[dataset.ShapeScene], decoded: torch.Tensor) -> dict[str, float]:
    """shape_colour_misreads from the first pictures' round trip `decoded` (round_trip's)."""
    decoded = decoded.round().to(torch.uint8).numpy()
    shapes, misread = collections.Counter(), collections.Counter()
    for scene, picture in zip(scenes, decoded, strict=False):
        shapes[scene.colour] += 1
        misread[scene.colour] += dataset.classify(Image.fromarray(picture)).colour != scene.colour
    return {name: misread[name] / shapes[name] for name in dataset.COLOURS if shapes[name]}


def report_colour_errors(
    stage: str, vae, scenes: list[dataset.ShapeScene], images: torch.Tensor, *, final: bool
) -> dict[str, float]:
    """Log each palette colour's round-trip error, and how often its shapes come back read as another colour;
    for the finished VAE (`final`), warn about a colour that does not come back. (Before the decoder
    fine-tune, errors of 10-17 are usual; the fine-tune brings them down to about 3-7 when the latents keep
    the colours apart, and cannot when they do not.)"""
    # One round trip serves both checks, the per-pixel one reading its first pictures. (round_trip works 128
    # at a time, so those come out as they would on their own.)
    decoded = round_trip(vae, images[:SHAPE_CHECK_PICTURES])
    errors = _colour_errors(images[:COLOUR_CHECK_PICTURES], decoded[:COLOUR_CHECK_PICTURES])
    log.info("%s colour round-trip error (0-255): %s", stage, ", ".join(f"{k} {v:.1f}" for k, v in errors.items()))
    misreads = _shape_colour_misreads(scenes, decoded)
    log.info("%s shapes read as another colour: %s", stage, ", ".join(f"{k} {v:.1%}" for k, v in misreads.items()))
    most_misread = max(misreads, key=misreads.get)
    if final and misreads[most_misread] > SHAPE_COLOUR_MISREAD_WARNING:
        log.warning(
            "%s: %.0f%% of the %s shapes come back read as another colour (more than %.0f%%): the VAE draws "
            "small shapes of that colour as a neighbouring one, and the model will confuse them; reuse a VAE that "
            "keeps them apart with --vae-from, or %s (--vae-shape-balance keeps them apart too, but see "
            "docs/micro-shapes-training.md on what it costs the shapes)",
            stage,
            100 * misreads[most_misread],
            most_misread,
            100 * SHAPE_COLOUR_MISREAD_WARNING,
            RETRAIN_VAE_ADVICE,
        )
    worst = max(errors, key=errors.get)
    if final and errors[worst] > COLOUR_ERROR_WARNING:
        log.warning(
            "%s: %s comes back %.1f off (more than %.0f): the VAE's latents do not keep it apart from a "
            "neighbouring colour, and the model will confuse them; %s, or reuse a VAE that keeps the colours "
            "apart with --vae-from",
            stage,
            worst,
            errors[worst],
            COLOUR_ERROR_WARNING,
            RETRAIN_VAE_ADVICE,
        )
    return errors


def finetune_decoder(vae, images: torch.Tensor, scenes: list[dataset.ShapeScene], args, work: Path):
    """Sharpen the decoder with the encoder frozen: the latent space (and so the UNet's training data)
    stays exactly the same, while edges and corners come back crisper (a triangle must not decode round)."""
    from diffusers import AutoencoderKL

    folder = work / "vae-finetuned"
    if (folder / "config.json").is_file():
        log.info("VAE decoder: using %s", folder)
        return AutoencoderKL.from_pretrained(folder).eval()
    tuned = copy.deepcopy(vae).train()
    trainable = [*tuned.decoder.parameters(), *tuned.post_quant_conv.parameters()]
    for param in tuned.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    order = torch.Generator().manual_seed(args.vae_seed + 5)
    fit_reconstruction(
        tuned,
        images,
        trainable,
        lr=1e-3,
        steps=args.decoder_steps,
        order=order,
        stage="decoder",
        shape_weights=_vae_shape_weights(scenes, args.vae_shape_balance),
    )
    tuned.eval()
    tuned.save_pretrained(folder, safe_serialization=True)
    report_colour_errors("VAE decoder", tuned, scenes, images, final=True)
    return tuned


def round_to_export_precision(module: nn.Module) -> nn.Module:
    """`module` with its weights rounded to EXPORT_DTYPE, as export stores them, and kept in float32.
    A new VAE is rounded before it encodes the UNet's latents, so they are the latents the exported
    model's encoder gives: img2img's are the ones the UNet learnt from, and a later stage started from
    the export reads them back instead of encoding 30,000 pictures again (about two minutes)."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(EXPORT_DTYPE).float())
    return module


def encode_pictures(vae, images: torch.Tensor) -> torch.Tensor:
    """The UNet's latents of `images` (scaled by the VAE's factor), encoded 512 at a time."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    return latents * vae.config.scaling_factor


def encode_latents(vae, images: torch.Tensor, work: Path) -> torch.Tensor:
    """encode_pictures, kept in `work` so a resumed run, or the next stage of a recipe on the same VAE,
    reads them back. They are read back only if made by an encoder with the same weights from the same
    pictures; otherwise they are encoded again (a minute or two for 30,000 pictures)."""
    path = work / "latents.pt"
    key = latents_key(vae, images)
    if path.is_file():
        kept = torch.load(path)
        # (A bare tensor is a cache from before the digest: which VAE made it is unknown.)
        if isinstance(kept, dict) and kept.get("key") == key:
            return kept["latents"]
        log.info("%s was encoded by another VAE or from other pictures: encoding again", path)
    latents = encode_pictures(vae, images)
    torch.save({"key": key, "latents": latents}, path)
    return latents


def latents_key(vae, images: torch.Tensor) -> str:
    """A digest of what the latents depend on: the encoder's weights (with quant_conv), the scaling
    factor and the pictures."""
    digest = hashlib.sha256(str(vae.config.scaling_factor).encode())
    for name, tensor in vae.state_dict().items():
        if not name.startswith("decoder.") and not name.startswith("post_quant_conv."):
            digest.update(name.encode())
            digest.update(tensor.float().contiguous().numpy().tobytes())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


# UNet + text encoder ---------------------------------------------------------------------------


def check_pipeline(vae, text_encoder, unet, tokenizer):
    """A pipeline that samples as the page does with this model: its default sampler and schedule,
    configured by the engine's own code."""
    pipe = build_pipeline(vae, text_encoder, unet, tokenizer)
    pipe.scheduler = build_scheduler(pipe.scheduler.config, MICRO_DEFAULTS.sampler_name, MICRO_DEFAULTS.scheduler)
    return pipe


def check_pictures(pipe, prompts: list[str], seeds: list[int], steps: int = MICRO_DEFAULTS.steps):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=quality.DEFAULT_CFG,
            generator=generators,
            height=64,
            width=64,
        ).images


def evaluate(
    vae,
    text_encoder,
    unet,
    tokenizer,
    seed: int,
    count: int = 24,
    steps: int = MICRO_DEFAULTS.steps,
    emphasis: bool = False,
) -> dict[str, float]:
    """The training run's check: what tools/measure_micro_quality.py measures, on fewer pictures, batched.

    An earlier check sampled with DPM++ 2M Karras at 15 steps and disagreed with the table: one run's
    step-6,000 weights read 100% of backgrounds there, 80% with the page's Euler a at 20 steps.
    """
    pipe = check_pipeline(vae, text_encoder, unet, tokenizer)
    rng = random.Random(seed)
    scenes = [dataset.random_scene(rng) for _ in range(count)]
    prompts = [
        dataset.fill_template(dataset.FULL_TEMPLATES[i % len(dataset.FULL_TEMPLATES)], s) for i, s in enumerate(scenes)
    ]
    images = check_pictures(pipe, prompts, [seed + i for i in range(count)], steps)
    readings = [dataset.classify(image) for image in images]
    scores = {
        "background": sum(r.background == s.background for r, s in zip(readings, scenes, strict=True)) / count,
        "colour": sum(r.colour == s.colour for r, s in zip(readings, scenes, strict=True)) / count,
        "shape": sum(r.shape == s.shape for r, s in zip(readings, scenes, strict=True)) / count,
        "img2img": img2img_score(pipe, seed, steps),
    }
    if emphasis:  # 24 more pictures: only worth their time when the run trains emphasis
        scores["emphasis"] = emphasis_score(pipe, seed, steps)
    return scores


def emphasis_score(pipe, seed: int, steps: int, seeds: int = 3) -> float:
    """Share of quality.EMPHASIS_CASES where "(blue:1.4)" gives more blue pixels than "(blue:0.6)"."""
    with torch.no_grad():
        unconditional = encode_prompt_a1111("", pipe.tokenizer, pipe.text_encoder)

    def draw(prompt: str, image_seed: int):
        with torch.no_grad():
            return pipe(
                prompt_embeds=encode_prompt_a1111(prompt, pipe.tokenizer, pipe.text_encoder),
                negative_prompt_embeds=unconditional,
                num_inference_steps=steps,
                guidance_scale=quality.DEFAULT_CFG,
                generator=torch.Generator().manual_seed(image_seed),
                height=64,
                width=64,
            ).images[0]

    moved, total = quality.emphasis_moves(draw, range(seed, seed + seeds))
    return moved / total


def img2img_score(pipe, seed: int, steps: int, seeds: int = 4) -> float:
    """Share of red-circle pictures that a "blue circle" prompt leaves red at denoising strength 0.1
    and turns blue at 0.75 (the two sides of what img2img's strength means)."""
    draw = check_drawer(pipe, steps)
    return sum(quality.img2img_colours(draw, seed + offset).follows_strength for offset in range(seeds)) / seeds


def check_drawer(pipe, steps: int = MICRO_DEFAULTS.steps) -> Callable[..., Image.Image]:
    """draw(prompt, seed, init=None, strength=0.0): one picture, txt2img or (with `init`) img2img, as the
    page makes it."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    encode_to_means(img2img)  # the picture's mean latents, as the engine encodes it

    def draw(prompt: str, seed: int, init: Image.Image | None = None, strength: float = 0.0) -> Image.Image:
        if init is None:
            return check_pictures(pipe, [prompt], [seed], steps)[0]
        with torch.no_grad():
            return img2img(
                prompt,
                image=init,
                # Steps counted as the engine counts them (A1111's: one more than diffusers').
                strength=diffusers_strength(img2img_steps(MICRO_DEFAULTS.sampler_name, steps, strength), steps),
                num_inference_steps=steps,
                guidance_scale=quality.DEFAULT_CFG,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]

    return draw


def build_pipeline(vae, text_encoder, unet, tokenizer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=architecture.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lr_factor(step: int, total: int, warmup: int = 200) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def shape_balanced_weights(coverage: torch.Tensor, balance: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W] with mean 1 per picture, from each latent pixel's shape
    coverage [B, 1, H, W]: `balance` 0 weighs every pixel alike, 1 gives the shape's pixels half of
    the weight in all however small the shape is, `balance` between blends the two."""
    area = coverage.mean(dim=(1, 2, 3), keepdim=True).clamp(1e-3, 1 - 1e-3)
    balanced = 0.5 * coverage / area + 0.5 * (1 - coverage) / (1 - area)
    return (1 - balance) + balance * balanced


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each timestep's weight in the loss: min(SNR, gamma) / SNR (min-SNR weighting), or 1 for gamma 0.

    Weighed so (gamma 5 by default), the nearly-clean timesteps stop dominating the loss and the
    composition (colours, where the shape goes) is learnt sooner."""
    if not gamma:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param, 1 - decay)


def train_unet(
    vae,
    latents,
    scenes,
    args,
    work: Path,
    start_from: tuple[nn.Module, nn.Module] | None = None,
    deadline: float | None = None,
):
    """Train UNet and text encoder (from scratch, or from `start_from`'s (unet, text_encoder) weights).

    Returns the averaged UNet and text encoder, the tokenizer, and whether the run stopped at `deadline`
    (a time.time()) before its last step."""
    tokenizer = architecture.build_tokenizer()
    torch.manual_seed(args.seed + 2)
    unet = architecture.build_unet()
    text_encoder = architecture.build_text_encoder(len(tokenizer))
    if start_from is not None:
        unet.load_state_dict(start_from[0].state_dict())
        text_encoder.load_state_dict(start_from[1].state_dict())
    held_unet = None
    if args.hold_weight:
        held_unet = copy.deepcopy(start_from[0]).eval().requires_grad_(False)
    heads = AuxiliaryHeads(architecture.TEXT_HIDDEN)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    # Installed after the copies: the average, which is evaluated and exported, keeps diffusers' processors.
    attention_maps = CrossAttentionMaps(unet) if args.colour_attention else None
    optimizer = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": args.unet_lr, "base_lr": args.unet_lr},
            {"params": [*text_encoder.parameters(), *heads.parameters()], "lr": args.text_lr, "base_lr": args.text_lr},
        ],
        weight_decay=0.01,
    )
    noise_schedule = architecture.build_scheduler()
    snr_weight = min_snr_weights(noise_schedule.alphas_cumprod, args.snr_gamma)
    data_order = torch.Generator().manual_seed(args.seed + 3)
    # Without the option the batches are drawn as they always were, so older runs repeat exactly.
    draw_weights = scene_draw_weights(scenes, args.shape_shares) if args.shape_shares else None
    captions = CaptionBatcher(
        tokenizer, random.Random(args.seed + 4), random.Random(args.seed + 6), args.emphasis_share, args.caption_dropout
    )
    colour_word_ids = torch.tensor(sorted(captions.colour_ids.values()))
    pixel_weights = None
    if args.shape_balance:
        # The background fills most of every picture, so a plain loss spends most of itself there while
        # the shape's colour is what the model is slowest to get right. Each picture's weights are fixed,
        # so they are worked out once here rather than at every step.
        side = latents.shape[-1]
        coverage = torch.from_numpy(np.stack([dataset.shape_coverage(s, side) for s in scenes]))[:, None]
        pixel_weights = shape_balanced_weights(coverage, args.shape_balance)
    empty_ids = torch.tensor([captions.token_ids("")])
    # Own streams: runs without the option draw exactly what they drew before it existed.
    hold_captions = CaptionBatcher(
        tokenizer, random.Random(args.seed + 7), random.Random(args.seed + 8), args.emphasis_share, dropout=0.0
    )
    hold_recolour_rng = random.Random(args.seed + 9)
    # Its own stream, first used in the low-noise phase: the steps before that phase draw exactly what
    # they drew before it existed.
    recolour_rng = random.Random(args.seed + 5)
    step = 0
    checkpoint_path = work / CHECKPOINT_NAME
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        heads.load_state_dict(state["heads"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        # The loaded state carries the rates the run started with; this command line's rates win, so a
        # phase rerun from a kept checkpoint with, say, --text-lr 0 does freeze the text encoder.
        for group, base_lr in zip(optimizer.param_groups, (args.unet_lr, args.text_lr), strict=True):
            group["base_lr"] = base_lr
        data_order.set_state(state["data_order"])
        captions.rng.setstate(state["caption_rng"])
        if "emphasis_rng" in state:  # checkpoints from before the option have none
            captions.emphasis_rng.setstate(state["emphasis_rng"])
        if "recolour_rng" in state:
            recolour_rng.setstate(state["recolour_rng"])
        if "hold_recolour_rng" in state:
            hold_captions.rng.setstate(state["hold_caption_rng"])
            hold_captions.emphasis_rng.setstate(state["hold_emphasis_rng"])
            hold_recolour_rng.setstate(state["hold_recolour_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("Resumed at step %d", step)

    def save_checkpoint() -> None:
        state = {
            "step": step,
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "heads": heads.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_order": data_order.get_state(),
            "caption_rng": captions.rng.getstate(),
            "emphasis_rng": captions.emphasis_rng.getstate(),
            "recolour_rng": recolour_rng.getstate(),
            "hold_caption_rng": hold_captions.rng.getstate(),
            "hold_emphasis_rng": hold_captions.emphasis_rng.getstate(),
            "hold_recolour_rng": hold_recolour_rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    if args.export_only:
        return ema_unet, ema_text, tokenizer, False
    start, first_step = time.time(), step
    unet.train()
    text_encoder.train()
    while step < args.unet_steps + args.low_noise_steps:
        if deadline is not None and time.time() > deadline:
            log.info("Time budget reached at step %d of %d", step, args.unet_steps + args.low_noise_steps)
            save_checkpoint()
            return ema_unet, ema_text, tokenizer, True
        if args.stop_after is not None and step >= args.stop_after:
            log.info("Stopping at step %d as asked", step)
            break
        if draw_weights is None:
            index = torch.randint(0, len(latents), (args.batch,), generator=data_order)
        else:
            index = torch.multinomial(draw_weights, args.batch, replacement=True, generator=data_order)
        batch_latents = latents[index]
        batch_scenes = [scenes[i] for i in index.tolist()]
        in_low_noise_phase = step >= args.unet_steps
        recolour = [in_low_noise_phase and recolour_rng.random() < args.recolour_share for _ in batch_scenes]
        input_ids, token_weights, labels = captions.draw(
            [
                dataset.recoloured(s, recolour_rng, args.recolour_background_share) if r else s
                for s, r in zip(batch_scenes, recolour, strict=True)
            ]
        )
        noise = torch.randn(batch_latents.shape, generator=data_order)
        if args.offset_noise:
            # Plain noise leaves the picture's mean almost intact even at the last timestep, so the model
            # learns to read the background colour from the noise instead of from the prompt; sampling
            # then starts from noise with no such colour. Per-channel offsets hide the mean too.
            offset = torch.randn((args.batch, batch_latents.shape[1], 1, 1), generator=data_order)
            noise = noise + args.offset_noise * offset
        timesteps = training_timesteps(recolour, args.min_timestep, args.low_noise_timesteps, data_order)
        noisy = noise_schedule.add_noise(batch_latents, noise, timesteps)
        # Weights, gradients and the optimiser stay in float32; only the passes' arithmetic is rounded.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            target = noise
            if args.cfg_target_scale:
                with torch.no_grad():
                    empty_conditioning = text_encoder(empty_ids).last_hidden_state
                captioned = (input_ids != empty_ids).any(-1)
                target = cfg_consistent_target(
                    unet,
                    noisy,
                    timesteps,
                    noise,
                    empty_conditioning,
                    captioned & (timesteps < args.cfg_target_below),
                    args.cfg_target_scale,
                )
            hidden = text_encoder(input_ids).last_hidden_state
            # The UNet sees the prompt weighted as the engine weights it. Multiplied only: "Original" emphasis
            # then rescales the chunk to its old mean, which is ill-conditioned while the encoder is fresh
            # (its outputs average almost exactly zero) and a ~1e-5 change once trained.
            conditioning = apply_emphasis(hidden, token_weights, "No norm")
            if attention_maps is not None:
                attention_maps.maps.clear()
            predicted = unet(noisy, timesteps, conditioning).sample
            squared_error = F.mse_loss(predicted, target, reduction="none")
            if pixel_weights is not None:
                squared_error = squared_error * pixel_weights[index]
            per_sample = squared_error.mean(dim=(1, 2, 3))
            diffusion_loss = (per_sample * snr_weight[timesteps]).mean()
            aux_loss = heads.loss(hidden, input_ids, labels, captions.shape_nouns, captions.background_noun)
            loss = diffusion_loss + args.aux_weight * aux_loss
            colour_share = None
            if attention_maps is not None:
                on_colour_word = torch.isin(input_ids, colour_word_ids)
                colour_share = colour_attention_share(attention_maps.maps, on_colour_word.float())
                names_a_colour = on_colour_word.any(-1)
                loss = loss + args.colour_attention * colour_attention_shortfall(colour_share, names_a_colour)
            hold_gap = None
            # After the colour-attention loss has read its maps: this second UNet pass records more of them.
            if held_unet is not None:
                hold_conditioning = conditioning
                if args.hold_recolour_share:
                    hold_ids, hold_weights, _ = hold_captions.draw(
                        partly_recoloured(
                            batch_scenes, args.hold_recolour_share, hold_recolour_rng, args.recolour_background_share
                        )
                    )
                    hold_conditioning = apply_emphasis(
                        text_encoder(hold_ids).last_hidden_state, hold_weights, "No norm"
                    )
                hold_gap = held_prediction_gap(
                    unet,
                    held_unet,
                    noise_schedule,
                    batch_latents,
                    noise,
                    hold_conditioning,
                    text_encoder(empty_ids).last_hidden_state,
                    (args.hold_from_timestep, args.hold_to_timestep),
                    data_order,
                    empty_share=args.hold_empty_share,
                )
                loss = loss + args.hold_weight * hold_gap
        factor = lr_factor(step, args.unet_steps) if not in_low_noise_phase else LOW_NOISE_LR_FACTOR
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        # From a finished model the average starts full: its first steps would otherwise replace the weights.
        decay = 0.999 if start_from is not None else min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        step += 1
        if step % 50 == 0:
            log.info(
                "step %d diffusion %.4f aux %.3f%s%s (%.2f s/step)",
                step,
                diffusion_loss.item(),
                aux_loss.item(),
                "" if colour_share is None else f" colour-word attention {colour_share[names_a_colour].mean():.2f}",
                "" if hold_gap is None else f" hold gap {hold_gap.item():.5f}",
                (time.time() - start) / max(1, step - first_step),
            )
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            save_checkpoint()
        if step == args.unet_steps and args.low_noise_steps:
            # Kept apart from the rolling checkpoint: put over checkpoint.pt in a copy of --work, it lets
            # the low-noise phase be rerun with other flags without rerunning the main phase.
            shutil.copyfile(checkpoint_path, work / f"checkpoint-step{step}.pt")
        if step % args.eval_every == 0:
            scores = evaluate(vae, ema_text, ema_unet, tokenizer, seed=12345, emphasis=args.emphasis_share > 0)
            log.info("eval step %d %s", step, json.dumps(scores))
    save_checkpoint()
    return ema_unet, ema_text, tokenizer, False


def cfg_consistent_target(
    unet, noisy, timesteps, noise, empty_conditioning, rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """The batch's noise, except in `rows`: there the target whose CFG at `scale` is the noise itself.

    CFG samples with empty + scale * (prompted - empty). For that to equal the noise, the prompted
    prediction must be empty + (noise - empty) / scale, the noise moved (1 - 1/scale) of the way to the
    empty prompt's prediction (taken without gradient, so the empty prompt keeps learning the plain
    target from the captions dropped)."""
    if not rows.any():
        return noise
    with torch.no_grad():
        empty = unet(noisy[rows], timesteps[rows], empty_conditioning.expand(int(rows.sum()), -1, -1)).sample
    target = noise.clone()
    target[rows] = noise[rows] + (1 - 1 / scale) * (empty - noise[rows])
    return target


def training_timesteps(
    recolour: list[bool], min_timestep: int, low_noise_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    """A batch's timesteps: from `min_timestep` (--min-timestep) up, except that a recoloured caption
    only ever meets a nearly finished picture (below `low_noise_timesteps`)."""
    timesteps = torch.randint(min_timestep, 1000, (len(recolour),), generator=generator)
    return torch.where(torch.tensor(recolour), timesteps % low_noise_timesteps, timesteps)


def partly_recoloured(
    scenes: list[dataset.ShapeScene],
    share: float,
    rng: random.Random,
    background_share: float = dataset.RECOLOUR_BACKGROUND_SHARE,
) -> list[dataset.ShapeScene]:
    """`scenes` with about `share` of them given other colours (--hold-recolour-share), `background_share`
    of those another background colour too."""
    return [dataset.recoloured(scene, rng, background_share) if rng.random() < share else scene for scene in scenes]


def held_prediction_gap(
    unet,
    held_unet,
    noise_schedule,
    latents,
    noise,
    conditioning,
    empty_conditioning,
    held_timesteps,
    generator,
    empty_share: float = 0.5,
) -> torch.Tensor:
    """Mean squared gap between `unet`'s and `held_unet`'s noise predictions at timesteps in
    `held_timesteps` (--hold-from-timestep up to below --hold-to-timestep). By default half the batch
    keeps its captions and half gets the empty prompt: CFG samples from their difference, so both must be
    held for a sampler to see the same guidance. `empty_share` (--hold-empty-share) moves that split."""
    batch = len(latents)
    timesteps = torch.randint(*held_timesteps, (batch,), generator=generator)
    noisy = noise_schedule.add_noise(latents, noise, timesteps)
    captioned = int(batch * (1 - empty_share))
    mixed = torch.cat([conditioning[:captioned], empty_conditioning.expand(batch - captioned, -1, -1)])
    with torch.no_grad():
        target = held_unet(noisy, timesteps, mixed.detach()).sample
    return F.mse_loss(unet(noisy, timesteps, mixed).sample, target)


# A1111's "Original" emphasis multiplies the weighted tokens' outputs, then rescales the whole chunk by
# old mean / new mean. Trained from scratch, this encoder's outputs can average almost exactly zero (one own-VAE
# model: 0.00002 over "a green circle on a blue background"), and that factor is then huge or negative:
# "(blue:1.2)" flipped the sign of the whole prompt and drew an orange shape on white. Real CLIP's outputs
# average well away from zero; export moves this encoder's there too, without changing what it draws. Lifted to
# this floor, that model read emphasis 24/24 (from 18/24). The shipped model's smallest mean is 0.0059 over
# caption_sample (0.0046 over every shape and size) and its emphasis reads 24/24, so it is left as it is.
TEXT_MEAN_FLOOR = 0.005


def caption_sample() -> list[str]:
    """The empty caption and every template's caption for every shape colour and background pair, the pairs
    taking the shapes and sizes in turn."""
    pairs = [
        (colour, background)
        for colour, background in itertools.product(dataset.COLOURS, repeat=2)
        if colour != background
    ]
    scenes = [
        dataset.ShapeScene(
            dataset.SHAPES[index % len(dataset.SHAPES)],
            colour,
            background,
            dataset.SIZES[index % len(dataset.SIZES)],
            (0, 0, 1, 1),  # captions do not name the position
        )
        for index, (colour, background) in enumerate(pairs)
    ]
    templates = dataset.FULL_TEMPLATES + dataset.PARTIAL_TEMPLATES
    return ["", *sorted({dataset.fill_template(template, scene) for template in templates for scene in scenes})]


def caption_means(text_encoder, tokenizer, captions: list[str], batch: int = 1024) -> torch.Tensor:
    """Each caption's mean encoder output over its 77-token chunk, as A1111's emphasis takes it."""
    means = []
    for start in range(0, len(captions), batch):
        ids = tokenizer(
            captions[start : start + batch], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            means.append(text_encoder(ids).last_hidden_state.float().mean(dim=(1, 2)))
    return torch.cat(means)


def lift_text_mean(text_encoder, unet, tokenizer, floor: float = TEXT_MEAN_FLOOR) -> float:
    """Shift the encoder's outputs by one constant so that every training caption's mean (the empty prompt's
    too) is at least `floor`, and take the shift back out in the UNet; returns the shift (0 when the means
    are already at least `floor`, or all at most -`floor`). Adding the same vector c to every token moves all of a
    query's cross-attention scores by the same amount, which softmax ignores, and each attention output by
    to_v(c) - to_v(0), since the weights sum to 1; the output projection's bias takes that back. So a prompt
    without weights draws what it drew before; a weighted one now keeps its chunk's mean in proportion."""
    means = caption_means(text_encoder, tokenizer, caption_sample())
    if means.min() >= floor or means.max() <= -floor:
        return 0.0
    shift = floor - means.min().item()
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    with torch.no_grad():
        offset = torch.full_like(final_norm.bias, shift)
        final_norm.bias += offset
        for module in unet.modules():
            if getattr(module, "is_cross_attention", False):
                moved = module.to_v.weight @ offset.to(module.to_v.weight.dtype)
                module.to_out[0].bias -= module.to_out[0].weight @ moved
    log.info(
        "Text encoder: outputs lifted by %.4f, so every caption averages at least %.3f (from %.5f): A1111's emphasis "
        "divides by that mean",
        shift,
        floor,
        means.min().item(),
    )
    return shift


def export(vae, unet, text_encoder, tokenizer, out: Path, latent_rgb: dict | None = None) -> None:
    """Write the model folder; `latent_rgb` is the VAE's preview table where one was fit to it before (else it is
    fit now, about 2.5 s)."""
    from engine.previews import fit_latent_rgb, save_latent_rgb_table

    pipe = build_pipeline(copy.deepcopy(vae), copy.deepcopy(text_encoder), copy.deepcopy(unet), tokenizer)
    lift_text_mean(pipe.text_encoder, pipe.unet, tokenizer)
    # Half precision on disk keeps the folder small; the engine loads it at the device's own precision.
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.to(EXPORT_DTYPE)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # A model folder is made to be shared: leave out diffusers' note of the folder a component was
    # loaded from, which is a path on the machine that trained it.
    for config_path in out.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # SD's own tokenizer layout (vocab.json, merges.txt), from the files the tokenizer was built from:
    # less than half the size of the tokenizer.json that save_pretrained writes in its place.
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(architecture.TOKENIZER_DIR, out / "tokenizer")
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(FAMILY_MARKER)
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    save_latent_rgb_table(out / "latent_rgb.json", latent_rgb or fit_latent_rgb(vae.float()))
    log.info("Exported to %s", out)


def load_exported(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vae, unet, text_encoder) of an exported model, in float32 for training."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (
        load_vae(folder),
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32),
    )


def load_vae(folder: Path):
    """The VAE of a model folder (its vae/ subfolder) or a VAE folder itself, in float32 for training."""
    from diffusers import AutoencoderKL

    subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch.float32).eval()


def main(argv=None) -> None:
    args = parse_args(argv)
    deadline = None if args.max_minutes is None else time.time() + args.max_minutes * 60
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.work / "train.log")],
    )
    log.info("Arguments: %s", vars(args))
    # A model to start from is loaded before the pictures are made, so a wrong folder fails at once.
    start_from = None
    if args.init_from:
        vae, unet, text_encoder = load_exported(args.init_from)
        start_from = (unet, text_encoder)
    elif args.vae_from:
        vae = load_vae(args.vae_from)
    scenes, images = training_pictures(args.images, args.seed)
    if args.init_from:
        latents = encode_latents(vae, images, args.work)
    elif args.vae_from:
        report_colour_errors(f"VAE from {args.vae_from}", vae, scenes, images, final=True)
        latents = encode_latents(vae, images, args.work)
    else:
        # The VAE learns from pictures of its own seed; the UNet's latents are always its own pictures'.
        vae_scenes, vae_images = (
            (scenes, images) if args.vae_seed == args.seed else training_pictures(args.images, args.vae_seed)
        )
        vae = round_to_export_precision(train_vae(vae_images, vae_scenes, args, args.work).eval())
        latents = encode_latents(vae, images, args.work)
        vae = finetune_decoder(vae, vae_images, vae_scenes, args, args.work)
        del vae_scenes, vae_images
    unet, text_encoder, tokenizer, out_of_time = train_unet(vae, latents, scenes, args, args.work, start_from, deadline)
    if out_of_time:
        # A half-trained model must not land where the finished one goes (for the shipped recipe, the
        # models folder); --export-only writes it from the checkpoint for a look.
        log.info("Stopped at --max-minutes, checkpoint in %s, nothing exported: the same command carries on", args.work)
        raise SystemExit(STOPPED_FOR_TIME)
    from engine.previews import load_latent_rgb_table

    # A VAE taken from another folder is never trained here, so that folder's preview table still fits it.
    vae_source = args.init_from or args.vae_from
    latent_rgb = load_latent_rgb_table(vae_source / "latent_rgb.json") if vae_source else None
    export(vae, unet, text_encoder, tokenizer, args.out, latent_rgb)


if __name__ == "__main__":
    main()
