"""Inpainting as A1111 does it, around diffusers' inpaint pipelines: the inpaint area (Whole picture or Only
masked) and the masked content (what the masked part starts from).

Masked content (`inpainting_fill`):
- 0 fill: the masked part is painted over with the colours around it, blurred (pixels, before encoding);
- 1 original: the picture as it is;
- 2 latent noise: the masked part of the encoded picture is replaced by the seed's noise;
- 3 latent nothing: ... by zeros.
Only what the pipeline starts from changes: outside the mask, the result is the original picture's pixels.

While it samples, the picture is held outside the mask as A1111 holds it (InpaintBlend), for every model, an
inpainting one too: its k-diffusion samplers take the picture's latents there as the denoised prediction, its DDIM,
PLMS and UniPC show them to the model in place of the noisy latents; and the sampled latents are the picture's
there before they are decoded. (diffusers' inpaint pipeline instead lays the picture, noised to the next step's
level with the starting noise, over the latents after each step, and only for models without a mask input.)
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .checkpoint import INPAINTING_CHANNELS
from .color_correction import corrected
from .images import resize_to
from .noise import seed_noise
from .request import GenerationRequest, Limits, _as_float, _as_int, _in_range
from .samplers import runs_a1111_ddim, runs_a1111_plms, runs_a1111_unipc, t_to_sigma
from .traced_unet import UNetStandIn
from .vae import decode_pictures, mean_latents

log = logging.getLogger(__name__)

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)
# The blur radii and how often each is laid on, widest first, for the fill (A1111's masking.fill).
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def inpaint(pipe, kwargs: dict, req: GenerationRequest, sources, init_images, mask, seeds) -> list[Image.Image]:
    """Run the inpaint pipeline for one batch. `sources` are the init images as given, `init_images` them at
    the generation size and `mask` the mask there (inverted and blurred as asked)."""
    if req.inpaint_full_res:
        full_mask = painted_mask(req)
        region = inpaint_region(full_mask, req.inpaint_full_res_padding, req.width, req.height)
        if region is not None:
            return _only_masked(pipe, kwargs, req, sources, full_mask, region, seeds)
        log.info("Inpaint area Only masked: the mask is blank, so the whole picture is used")
    generated = _run(pipe, kwargs, req, init_images, mask, seeds)
    # Outside the mask the original pixels come back untouched, as in A1111: the VAE round trip would otherwise
    # soften the whole picture. A1111 lays them over the result through the blurred mask doubled (its
    # mask_for_overlay), so the painted part keeps its own pixels up to where the blur reaches half way.
    overlay = Image.eval(mask, lambda value: min(255, 2 * value))
    return [Image.composite(out, original, overlay) for out, original in zip(generated, init_images, strict=True)]


def _run(pipe, kwargs: dict, req: GenerationRequest, pictures, mask, seeds) -> list[Image.Image]:
    """The pipeline over `pictures` (at the generation size) with the masked content asked for."""
    # A1111 fills the masked part for every masked content but "original". The sampling starts from the filled
    # picture for "fill" (the latent fills replace the masked part after encoding), and colour correction
    # matches it whichever it is.
    filled = pictures
    if req.inpainting_fill == FILL or (req.inpainting_fill != ORIGINAL and req.color_correction):
        filled = [fill_masked(picture, mask) for picture in pictures]
    if req.inpainting_fill == FILL:
        pictures = filled
    width, height = pictures[0].size
    pixels = pipe.image_processor.preprocess(pictures, height=height, width=width)
    picture_latents = mean_latents(pipe.vae, pixels)
    _encode_once(pipe, pixels, picture_latents)
    if req.inpainting_fill in (LATENT_NOISE, LATENT_NOTHING):
        _install_latent_fill(pipe, req.inpainting_fill, mask, seeds)
    inpainting_unet = pipe.unet.config.in_channels == INPAINTING_CHANNELS
    # A model without a mask input is given none: diffusers' pipeline would blend the picture in its own way.
    pipeline_mask = mask if inpainting_unet else Image.new("L", mask.size, 255)
    kwargs.update(image=pictures, mask_image=[pipeline_mask] * len(pictures), output_type="latent")
    if req.inpainting_mask_weight != 1 and inpainting_unet:
        kwargs["masked_image_latents"] = _partly_masked(pipe, pictures, mask, req.inpainting_mask_weight)
    elif not inpainting_unet:
        # The pipeline would encode a masked picture for the mask input this UNet lacks, and never read it: given
        # latents in its place, it skips that encode.
        scale = pipe.vae_scale_factor
        kwargs["masked_image_latents"] = torch.zeros(
            1, pipe.vae.config.latent_channels, height // scale, width // scale
        )
    held = mask if req.latent_mask is None else req.latent_mask  # Outpainting mk2 holds the latents apart
    keep = 1 - latent_mask(held, (picture_latents.shape[3], picture_latents.shape[2]))
    timesteps = any(
        runs(req.sampler_name, req.scheduler) for runs in (runs_a1111_ddim, runs_a1111_plms, runs_a1111_unipc)
    )
    pipe.unet = InpaintBlend(
        pipe.unet,
        picture_latents,
        keep,
        pipe.scheduler.alphas_cumprod,
        pipe.scheduler.config.prediction_type,
        before=timesteps,
    )
    sampled = pipe(**kwargs).images
    # A1111 lays the picture's latents over the sampled ones outside the mask before decoding, as the samplers
    # that blend the model's input leave them elsewhere there.
    keep = keep.to(sampled)
    sampled = sampled * (1 - keep) + picture_latents.to(sampled) * keep
    return corrected(req, decode_pictures(pipe, sampled), filled)


def latent_mask(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A1111's latent mask (1 × 1 × height × width, 1 where the picture is repainted): the mask resized to the latent
    `size` (bicubic) and rounded, so each latent pixel is either kept or repainted."""
    resized = np.around(np.asarray(mask.convert("L").resize(size), dtype=np.float32) / 255.0)
    return torch.from_numpy(resized)[None, None]


class InpaintBlend(UNetStandIn):
    """A1111's hold on the picture outside the mask while inpainting (its CFGDenoiser's mask blend), standing in
    for a pipeline's UNet. `picture` holds the picture's latents (one row per picture), `keep` is 1 where they are
    kept. With `before` (A1111's DDIM, PLMS and UniPC) the model is shown them there in place of the noisy latents;
    otherwise (its k-diffusion samplers) the model's answer is changed there to the one whose denoised prediction
    is the picture's latents. Guidance combines its rows with weights that sum to 1, so blending each row blends
    the guided answer alike."""

    def __init__(
        self,
        unet: torch.nn.Module,
        picture: torch.Tensor,
        keep: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        *,
        before: bool,
    ):
        super().__init__(unet)
        self.picture, self.keep, self.before = picture, keep, before
        self.prediction_type = prediction_type
        alphas = alphas_cumprod.double()
        self._log_sigmas = ((1 - alphas) / alphas).sqrt().log().cpu().numpy()

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        picture = self.picture.to(sample).repeat(sample.shape[0] // self.picture.shape[0], 1, 1, 1)
        keep, channels = self.keep.to(sample), picture.shape[1]
        latents = sample[:, :channels]
        if self.before:
            held = latents * (1 - keep) + picture * keep
            sample = torch.cat([held, sample[:, channels:]], dim=1)
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        answer = self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        alpha = self._alpha(timestep).to(sample)
        # The model's input is sqrt(alpha) x0 + sqrt(1 - alpha) noise: the noise (or v) that makes x0 the picture.
        noise = (latents - alpha.sqrt() * picture) / (1 - alpha).sqrt()
        held = noise if self.prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * picture
        blended = answer * (1 - keep) + held.to(answer) * keep
        return UNet2DConditionOutput(sample=blended) if return_dict else (blended,)

    def _alpha(self, timestep) -> torch.Tensor:
        """The noise level the model reads from `timestep`, fractional too (k-diffusion's t_to_sigma)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten()[:1].cpu().numpy()
        sigma = t_to_sigma(t.clip(0, len(self._log_sigmas) - 1), self._log_sigmas)[0]
        return torch.tensor(1 / (1 + sigma**2), dtype=torch.float64)


def _partly_masked(pipe, pictures, mask: Image.Image, weight: float) -> torch.Tensor:
    """An inpainting model's masked picture at A1111's mask weight below 1: lerp(picture, picture with the masked part
    blanked, weight), the mask rounded, as pixels that the pipeline then encodes as it encodes its own (weight 1)."""
    width, height = pictures[0].size
    pixels = pipe.image_processor.preprocess(pictures, height=height, width=width)
    rounded = pipe.mask_processor.preprocess(mask, height=height, width=width)  # 0 or 1, as the pipeline's
    return pixels * (1 - weight * rounded)


def sketched_inpaint(
    original: Image.Image,
    sketched: Image.Image,
    strokes: Image.Image,
    *,
    mask_blur: int,
    mask_transparency: float,
    limits: Limits | None = None,
) -> tuple[Image.Image, Image.Image]:
    """A1111's Inpaint sketch: strokes painted in colour over `original` (`sketched` is the picture with them,
    `strokes` where they cover it, as an L image) are both what is repainted and what the repainted part starts
    from. Returns (init image, mask): the mask is every painted pixel at full strength dimmed by
    `mask_transparency` (0 to 100 %), and the init image is the sketch, blurred by `mask_blur`, laid over the
    original through that mask blurred alike. The request's mask blur then softens the mask again, as in A1111."""
    limits = limits or Limits()
    mask_blur = _as_int(mask_blur, "mask_blur")
    _in_range(mask_blur, "mask_blur", 0, limits.max_mask_blur)
    mask_transparency = _as_float(mask_transparency, "mask_transparency")
    _in_range(mask_transparency, "mask_transparency", 0, 100)
    original = original.convert("RGB")
    sketched = sketched.convert("RGB")
    if sketched.size != original.size:
        sketched = sketched.resize(original.size, Image.Resampling.LANCZOS)
    strokes = strokes.convert("L")
    if strokes.size != original.size:
        strokes = strokes.resize(original.size, Image.Resampling.NEAREST)
    # A1111 takes every pixel the sketch changed at full strength, the soft edges of a stroke included.
    mask = strokes.point(lambda value: 255 if value else 0)
    mask = ImageEnhance.Brightness(mask).enhance(1 - mask_transparency / 100)
    blur = ImageFilter.GaussianBlur(mask_blur)
    return Image.composite(sketched.filter(blur), original, mask.filter(blur)), mask


def painted_mask(req: GenerationRequest) -> Image.Image:
    """The mask at the init image's own size, inverted and blurred as asked (A1111 blurs it there)."""
    mask = req.mask
    if req.inpainting_mask_invert:
        mask = Image.eval(mask, lambda value: 255 - value)
    if req.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(req.mask_blur))
    return mask


def inpaint_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "Only masked" region: the painted pixels' bounding box, `padding` pixels wider on each side
    (within the picture), then grown along one axis to the generation size's aspect ratio, as A1111's
    expand_crop_region grows it. None when nothing is painted."""
    box = mask.getbbox()
    if box is None:
        return None
    picture_w, picture_h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, picture_w), min(box[3] + padding, picture_h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grown(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), picture_h)
    else:
        x1, x2 = _grown(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), picture_w)
    return x1, y1, x2, y2


def _grown(start: int, end: int, extra: int, limit: int) -> tuple[int, int]:
    """[start, end) grown by `extra`, half each side, shifted back inside [0, limit) where it runs over."""
    start -= extra // 2
    end += extra - extra // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def _only_masked(pipe, kwargs: dict, req: GenerationRequest, sources, mask, region, seeds) -> list[Image.Image]:
    """A1111's "Inpaint area: Only masked": the region around the mask is cut out, brought to the generation
    size (Resize and fill), inpainted there at full resolution, and pasted back (Crop and resize) into the
    picture at its own size; outside the (blurred) mask every pixel stays the original's."""
    x1, y1, x2, y2 = region
    size = (x2 - x1, y2 - y1)
    pictures = [source if source.size == mask.size else source.resize(mask.size) for source in sources]
    crops = [resize_to(picture.crop(region), req.width, req.height, 2) for picture in pictures]
    crop_mask = resize_to(mask.crop(region), req.width, req.height, 2)
    generated = _run(pipe, kwargs, req, crops, crop_mask, seeds)
    images = []
    for out, picture in zip(generated, pictures, strict=True):
        canvas = picture.copy()
        canvas.paste(resize_to(out, *size, 1), (x1, y1))
        images.append(Image.composite(canvas, picture, mask))
    return images


def fill_masked(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture with its masked part painted over by the colours around it: the unmasked pixels,
    blurred ever less widely and laid over each other, so nearby colours win (A1111's "fill")."""
    keep = ImageOps.invert(mask.convert("L"))
    # Premultiplied alpha ("RGBa"): blurring spreads the kept colours without the masked part's.
    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", picture.size)
    for radius, times in _FILL_PASSES:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            filled.alpha_composite(layer)
    return filled.convert("RGB")


def _encode_once(pipe, pixels: torch.Tensor, latents: torch.Tensor) -> None:
    """Make this job's pipeline take `latents` where it would encode `pixels` (the pictures it starts from) again:
    the same mean latents, without a second pass through the VAE's encoder. Anything else it encodes as before. The
    pipeline object is the job's own."""
    encode = pipe._encode_vae_image

    def encode_once(image, generator=None):
        if image.shape == pixels.shape and torch.equal(image, pixels.to(image.device, image.dtype)):
            return latents.to(image.device, image.dtype).clone()  # in the pipeline's dtype, as encode_to_means's
        return encode(image, generator)

    pipe._encode_vae_image = encode_once


def _install_latent_fill(pipe, content: int, mask: Image.Image, seeds) -> None:
    """Make this job's pipeline replace the masked part of the encoded picture by the seed's noise (latent
    noise) or zeros (latent nothing), where the pipeline encodes the picture it starts from. The pipeline
    object is the job's own, so nothing is shared."""
    prepare_latents, encode = pipe.prepare_latents, pipe._encode_vae_image

    def filled_encode(image, generator):
        latents = encode(image, generator)
        masked = latent_mask(mask, (latents.shape[3], latents.shape[2])).to(latents.device, latents.dtype)
        if content == LATENT_NOTHING:
            replacement = torch.zeros_like(latents)
        else:
            noise = [seed_noise(seeds[i % len(seeds)], latents.shape[1:]) for i in range(latents.shape[0])]
            replacement = torch.stack(noise).to(latents.device, latents.dtype)
        return latents * (1 - masked) + replacement * masked

    @functools.wraps(prepare_latents)
    def prepare_with_fill(*args, **kwargs):
        # Only the picture the sampling starts from: an inpainting model's masked-picture input is encoded
        # elsewhere (prepare_mask_latents) and stays as it is.
        pipe._encode_vae_image = filled_encode
        try:
            return prepare_latents(*args, **kwargs)
        finally:
            pipe._encode_vae_image = encode

    pipe.prepare_latents = prepare_with_fill
