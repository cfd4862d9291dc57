"""A1111's random sources: CPU (torch's CPU generator) and NV (the numbers torch draws on an NVIDIA GPU, which A1111
draws by default there). With NV, a picture made on an NVIDIA card comes out the same here: the same starting noise,
the same noise at each step, drawn in the order A1111's ImageRNG draws it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading

import httpx
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from torchsde._brownian.brownian_interval import _randn as torchsde_randn

from engine import GenerationRequest, InvalidRequestError
from engine.infotext import parse_infotext, parse_infotext_params
from engine.noise import NoiseVariation, RandomSource, reseed_after_start, seed_noise, slerp
from engine.philox import PhiloxNoise
from tests.test_pad_conds import unet_calls

REQUEST = GenerationRequest(prompt="a red circle on a blue background", steps=6, seed=21, sampler_name="Euler a")


def numbers(*values: str) -> torch.Tensor:
    return torch.tensor([np.float32(value) for value in values])


def test_nv_noise_is_what_torch_draws_on_an_nvidia_gpu():
    # torch.manual_seed(0); torch.randn(3, 4, device="cuda"): the numbers A1111's NV source is known by.
    expected = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    assert torch.allclose(PhiloxNoise(0).randn((3, 4)), torch.tensor(expected), atol=3e-7)


def test_nv_noise_matches_a1111s_nv_source_bit_for_bit():
    # Each from A1111's modules/rng_philox.py Generator: a second draw (each draw moves the generator on by one,
    # whatever its size), a seed above 2^32 (its high word keys the generator too), and a latent-sized draw.
    generator = PhiloxNoise(42)
    generator.randn((4,))
    second = numbers("0.13913749", "-0.10821616", "-0.7174222", "0.75664866", "0.37148824", "-1.0049413")
    assert torch.equal(generator.randn((6,)), second)
    high = numbers("-2.8427474", "1.3404924", "0.27223086", "1.4550629", "-0.7352961", "-0.5022603")
    assert torch.equal(PhiloxNoise(2**32 + 5).randn((6,)), high)
    shaped = PhiloxNoise(3).randn((2, 3))
    assert shaped.dtype == torch.float32 and torch.equal(
        shaped, numbers("0.42634466", "-0.7515958", "-1.1873199", "1.4030232", "-0.4080657", "0.05716899").view(2, 3)
    )
    latent = PhiloxNoise(1234).randn((4, 64, 64)).numpy()
    assert hashlib.sha256(latent.tobytes()).hexdigest()[:16] == "88135047049e05aa"


def test_nv_generators_draw_nvidia_noise_in_the_batch_thread_and_start_anew_when_reseeded():
    """Every generator drawn from in the batch's thread draws as a CUDA generator would."""
    source = RandomSource("NV")
    generators = source.generators([5, 9])
    with source.drawing():
        # As diffusers draws a batch: one draw per image's generator.
        first = randn_tensor((2, 4, 3, 3), generator=generators)
        second = randn_tensor((2, 4, 3, 3), generator=generators)
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(torch.randn(3, generator=generators[0])))
        thread.start()
        thread.join()
        generators[1].manual_seed(9 + 100)  # A1111's ENSD: the steps' noise from seed + delta, from its start
        reseeded = torch.randn((4, 3, 3), generator=generators[1], dtype=torch.float64)
        with pytest.raises(RuntimeError, match="NV noise: rand drew"):
            torch.rand(3, generator=generators[0])
        # The SDE samplers' Brownian tree (torchsde) seeds a fresh generator for each draw, on the GPU in A1111.
        brownian = torchsde_randn((2, 4, 3, 3), torch.float32, torch.device("cpu"), 777)
    five, nine = PhiloxNoise(5), PhiloxNoise(9)
    assert torch.equal(first, torch.stack([five.randn((4, 3, 3)), nine.randn((4, 3, 3))]))
    assert torch.equal(second, torch.stack([five.randn((4, 3, 3)), nine.randn((4, 3, 3))]))
    # Another thread (another user's job) is not drawn for: torch keeps the mode per thread.
    assert torch.equal(elsewhere[0], torch.randn(3, generator=torch.Generator().manual_seed(5)))
    assert reseeded.dtype == torch.float64 and torch.equal(reseeded, PhiloxNoise(109).randn((4, 3, 3)).double())
    assert torch.equal(brownian, PhiloxNoise(777).randn((2, 4, 3, 3)))
    # The CPU source draws torch's own numbers.
    cpu = RandomSource("CPU")
    with cpu.drawing():
        drawn = randn_tensor((1, 4, 3, 3), generator=cpu.generators([5]))
    assert torch.equal(drawn[0], seed_noise(5, (4, 3, 3)))


def test_variation_seeds_draw_both_seeds_from_the_source():
    base = PhiloxNoise(7).randn((4, 8, 8))
    with RandomSource("NV").drawing():  # as in a batch: the variation seed's fresh generator draws NVIDIA's numbers
        varied = NoiseVariation([7], [99], 0.3).vary(base[None])[0]
        fresh = seed_noise(99, (4, 8, 8))
    assert torch.equal(varied, slerp(0.3, base, PhiloxNoise(99).randn((4, 8, 8))))
    assert torch.equal(fresh, PhiloxNoise(99).randn((4, 8, 8)))


def test_the_noise_is_drawn_in_a1111s_order(micro_engine, monkeypatch):
    """A1111's ImageRNG: each image's first draw from its seed is the starting noise; with ENSD the steps then draw
    from seed + delta, anew; every step draws once per image, in the batch's order."""
    drawn = []
    original = PhiloxNoise.randn

    def recording(self, shape):
        drawn.append((self.seed, self.draws, tuple(shape)))
        return original(self, shape)

    monkeypatch.setattr(PhiloxNoise, "randn", recording)
    request = dataclasses.replace(REQUEST, randn_source="NV", batch_size=2, steps=4, eta_noise_seed_delta=100)
    list(micro_engine.generate(request))
    shape = (1, 4, 16, 16)
    for seed in (21, 22):
        image = [draw for draw in drawn if draw[0] in (seed, seed + 100)]
        assert image[:4] == [(seed, 0, shape)] + [(seed + 100, step, shape) for step in range(3)], seed


def test_nv_starts_txt2img_from_each_seeds_nvidia_noise(micro_engine):
    request = dataclasses.replace(REQUEST, sampler_name="Euler", randn_source="NV", batch_size=2)
    result, samples = unet_calls(micro_engine, request, record=lambda args, kwargs: args[0].clone())
    starts = [samples[0][0], samples[len(samples) // 2][0]]  # each image's first UNet call (on a CPU, one by one)
    for start, seed in zip(starts, (21, 22), strict=True):
        noise = PhiloxNoise(seed).randn((4, 16, 16))
        assert torch.allclose(start / start.std(), noise / noise.std(), atol=1e-5)
    assert result.infotexts[0].endswith("RNG: NV")


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_an_nv_picture_differs_from_cpus_and_its_infotext_makes_it_again(micro_engine, sampler):
    request = dataclasses.replace(REQUEST, sampler_name=sampler)
    cpu = list(micro_engine.generate(request))[-1]
    nv = list(micro_engine.generate(dataclasses.replace(request, randn_source="NV")))[-1]
    assert nv.images[0].tobytes() != cpu.images[0].tobytes()
    assert parse_infotext_params(nv.infotexts[0])["RNG"] == "NV"
    assert parse_infotext_params(cpu.infotexts[0])["RNG"] == "CPU"
    again = parse_infotext(nv.infotexts[0])
    assert again.randn_source == "NV"
    assert list(micro_engine.generate(again))[-1].images[0].tobytes() == nv.images[0].tobytes()


def test_nv_reaches_img2img_inpaint_latent_noise_and_the_hires_pass(micro_engine, red_circle):
    from PIL import Image

    picture = {"init_images": [red_circle], "denoising_strength": 0.6}
    cases = {
        "img2img": picture,
        "latent noise": {**picture, "mask": Image.new("L", red_circle.size, 255), "inpainting_fill": 2},
        "hires": {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "hr_upscaler": "Latent"},
    }
    for name, fields in cases.items():
        request = dataclasses.replace(REQUEST, **fields)
        cpu = list(micro_engine.generate(request))[-1]
        nv = list(micro_engine.generate(dataclasses.replace(request, randn_source="NV")))[-1]
        assert nv.images[0].tobytes() != cpu.images[0].tobytes(), name
        read = parse_infotext(nv.infotexts[0]).randn_source
        again = list(micro_engine.generate(dataclasses.replace(request, randn_source=read)))[-1]
        assert again.images[0].tobytes() == nv.images[0].tobytes(), name


def test_a1111s_infotexts_say_which_source_made_them():
    base = "a red circle\nSteps: 20, Sampler: Euler a, Seed: 5"
    # A1111 writes no RNG for its default GPU source, and always its version: an NVIDIA card's noise.
    assert parse_infotext(base + ", Version: v1.10.1").randn_source == "NV"
    assert parse_infotext(base + ", RNG: CPU, Version: v1.10.1").randn_source == "CPU"
    assert parse_infotext(base + ", RNG: NV, Version: v1.10.1").randn_source == "NV"
    assert parse_infotext(base + ", RNG: GPU").randn_source == "NV"
    # Without a version: not A1111's (this engine's texts before they wrote their RNG drew CPU noise).
    assert parse_infotext(base).randn_source == "CPU"
    with pytest.raises(InvalidRequestError, match=re.escape("RNG: got 'AMD'; allowed: one of CPU, NV (GPU means NV)")):
        parse_infotext(base + ", RNG: AMD")


def test_an_a1111_infotext_draws_nv_noise_and_says_so_before_its_version(micro_engine):
    text = "a red circle on a blue background\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 21, Version: v1.10.1"
    result = list(micro_engine.generate(parse_infotext(text)))[-1]
    assert result.infotexts[0].endswith(", RNG: NV, Version: v1.10.1")
    nv = list(micro_engine.generate(dataclasses.replace(REQUEST, steps=4, randn_source="NV")))[-1]
    assert result.images[0].tobytes() == nv.images[0].tobytes()


def test_a_bad_source_is_refused_by_name(micro_engine):
    with pytest.raises(InvalidRequestError, match=re.escape("randn_source: got 'AMD'; allowed: one of CPU, NV")):
        micro_engine.validate(dataclasses.replace(REQUEST, randn_source="AMD"))


def test_the_api_takes_a1111s_randn_source_option(micro_engine, tmp_path):
    from ui.server import ServerSettings, launch

    handle = launch(micro_engine, ServerSettings(host="127.0.0.1", port=0, api=True, outputs_dir=tmp_path, page=False))
    payload = {"prompt": REQUEST.prompt, "steps": 4, "seed": 21, "sampler_name": "Euler a"}
    try:
        with httpx.Client(base_url=handle.url + "sdapi/v1/", timeout=120) as api:

            def infotext(body) -> str:
                return json.loads(api.post("txt2img", json=body).json()["info"])["infotexts"][0]

            assert infotext(payload).endswith("RNG: CPU")
            # A1111's GPU source is an NVIDIA card's numbers: NV.
            for value in ("NV", "GPU"):
                assert infotext({**payload, "override_settings": {"randn_source": value}}).endswith("RNG: NV")
            refused = api.post("txt2img", json={**payload, "override_settings": {"randn_source": "AMD"}})
            assert refused.status_code == 422 and refused.json()["field"] == "override_settings.randn_source"
            assert api.post("options", json={"randn_source": "NV"}).status_code == 200
            assert api.get("options").json()["randn_source"] == "NV"
            assert infotext(payload).endswith("RNG: NV")
            api.post("options", json={"randn_source": "CPU"})
            assert infotext(payload).endswith("RNG: CPU")
    finally:
        handle.close()


def test_the_ensd_reseed_is_seen_by_the_nv_source():
    """reseed_after_start seeds the batch's generators anew; their NVIDIA noise starts anew from seed + delta."""

    class Pipeline:
        def prepare_latents(self, shape, dtype, device, generator, latents=None):
            return torch.stack([torch.randn(shape, generator=g) for g in generator])

    source, pipe = RandomSource("NV"), Pipeline()
    generators = source.generators([5, 9])
    reseed_after_start(pipe, [5, 9], 100)
    with source.drawing():
        start = pipe.prepare_latents((3,), None, None, generators)
        after = torch.randn(3, generator=generators[0])
    assert torch.equal(start[1], PhiloxNoise(9).randn((3,)))
    assert torch.equal(after, PhiloxNoise(105).randn((3,)))
