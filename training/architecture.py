"""The micro model's components: standard diffusers/transformers classes at a small size.

Nothing here is custom: the saved folder loads with StableDiffusionPipeline.from_pretrained like any
SD 1.x model, so every engine feature (samplers, previews, img2img, inpaint, prompt weighting) runs
on it unchanged.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.presets import TOKENIZER_DIR

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16  # 64x64 pictures, VAE downsamples 4x


def build_tokenizer() -> CLIPTokenizer:
    # The real CLIP BPE vocabulary (49,408 tokens): token counts and 75-token chunks match SD's.
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        # Several channels per norm group: with one channel per group GroupNorm becomes instance
        # norm, which erases a flat colour field's colour (this data is all flat colour fields).
        norm_num_groups=8,
        sample_size=64,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        # Cross-attention at 8x8 and 4x4 (and the middle block): enough to place a shape and bind
        # its colour in a 64-pixel picture, and it keeps 20 steps under a second on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=TEXT_HIDDEN,
        # An attention-pooled summary of the prompt added to the timestep embedding (a standard
        # UNet2DConditionModel option): the picture's global colours follow the prompt from the first,
        # noisiest steps, while cross-attention places the shape.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        norm_num_groups=16,
    )


def build_scheduler() -> DDPMScheduler:
    # SD 1.x's training schedule, so A1111's samplers and schedule types behave as they do there.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
