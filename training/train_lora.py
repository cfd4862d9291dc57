"""Train a LoRA for the micro model and save it the way kohya-ss's sd-scripts (and so A1111) save them.

    .venv/bin/python -m training.train_lora                      # models/Lora/micro-purple.safetensors

The LoRA teaches one thing the model cannot do alone: it draws the shape purple, whatever colour the
prompt names, on the background the prompt names (53 of 60 test prompts; README). Its pictures are the training set's scenes
with the shape recoloured purple (scenes whose background is purple are left out) and their
captions unchanged, so `<lora:micro-purple:1>` turns "a red circle on a white background" into a
purple circle on white. It adapts both the UNet's attention projections and the text encoder's
(kohya's `lora_unet_*` and `lora_te_*` keys), so the weights for each, and a LoRA's effect on the
prompt's encoding, can be tested with a model whose pictures mean something. Deterministic for a
given seed and step count on one host; about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from engine.presets import SHIPPED_MICRO_LORA, SHIPPED_MICRO_MODEL
from training import dataset
from training.finetune import altered_scenes, fit

log = logging.getLogger("train_lora")

DEFAULT_OUT = SHIPPED_MICRO_LORA
LORA_COLOUR = "purple"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MICRO_MODEL, help="the model folder to adapt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the LoRA file to write")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


def kohya_state_dict(peft_state: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT's `<module>.lora_A.weight`/`lora_B.weight` keys as kohya's `<prefix>_<module_with_underscores>`
    `.lora_down.weight`/`.lora_up.weight`, with the `.alpha` each module's scale is read from."""
    converted = {}
    for key, value in peft_state.items():
        module, _, kind = key.rpartition(".lora_")
        name = f"{prefix}_{module.replace('.', '_')}"
        converted[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.detach().half().contiguous()
        converted[f"{name}.alpha"] = torch.tensor(float(alpha)).half()
    return converted


def main(argv=None) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32, safety_checker=None)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=UNET_TARGETS))
    text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TEXT_TARGETS))
    trainable = [p for module in (unet, text_encoder) for p in module.parameters() if p.requires_grad]

    def purple(scene: dataset.ShapeScene) -> dataset.ShapeScene | None:
        return None if scene.background == LORA_COLOUR else dataclasses.replace(scene, colour=LORA_COLOUR)

    pairs = altered_scenes(args.images, args.seed, purple)
    fit(pipe, pairs, trainable, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)

    state = {
        **kohya_state_dict(get_peft_model_state_dict(unet), "lora_unet", args.rank),
        # kohya's SD 1.x text encoder prefix; the module paths are CLIPTextModel's under text_model.
        **kohya_state_dict(get_peft_model_state_dict(text_encoder), "lora_te_text_model", args.rank),
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.rank),
        "ss_output_name": args.out.stem,
        "ss_base_model_version": "micro-shapes",
        "ss_training_comment": f"Draws every shape {LORA_COLOUR} (training/train_lora.py, {args.steps} steps)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    log.info("Wrote %s (%d tensors)", args.out, len(state))


if __name__ == "__main__":
    main()
