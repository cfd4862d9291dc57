"""Engine: the one object front ends talk to. It owns a loaded model and runs jobs one at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from . import loopback, outpaint, outpaint_mk2, samplers, sd_upscale
from .embeddings import EmbeddingsReport, folder_signature, load_embeddings, unload_embeddings
from .errors import EngineError, InvalidRequestError, ModelLoadError, TaskStopped
from .events import JobControl, JobState, PreviewSettings, Progress, Result, Waiting
from .extras import ExtrasRequest, upscale_picture
from .extras import check as check_extras
from .generate import check_cfgpp_has_a_negative, run_batch
from .hypernet import HypernetFile, HypernetUse, hypernet_uses, scan_hypernets
from .images import resize_to
from .infotext import format_infotext
from .inpaint import ORIGINAL
from .lora import LoraFile, LoraUse, lora_uses, scan_loras
from .memory import is_out_of_memory, memory_report, out_of_memory_message, release_cached_memory
from .merge import MergeRequest, MergeResult, run_merge
from .merge import check as check_merge
from .models import LoadedModel, ModelInfo, ModelRegistry, default_dtype, load_model, pick_device
from .pad_conds import lengths_differ
from .presets import DEFAULT_MODELS_DIR, MICRO_MODEL_NAME, SHIPPED_MICRO_MODEL, FamilyDefaults
from .previews import make_previewer
from .prompt_list import PromptList
from .prompt_list import expand as expand_prompt_list
from .prompt_matrix import MatrixPlan, PromptMatrix
from .prompt_matrix import plan as plan_prompt_matrix
from .prompt_schedule import composable_parts, is_composed, prompt_schedule
from .prompts import Conditioning, PromptReading, SDXLEmbeds, describe_prompt, make_prompt_encoders
from .refiner import Refiner
from .request import HR_UPSCALERS, PICTURE_UPSCALERS, SEED_MAX, GenerationRequest, Limits, validate_request
from .styles import PromptStyle, apply_styles, check_style_name, delete_style, read_styles, save_style
from .tiles import TileGrid, TileJob, cut_tiles, plan_tiles
from .tiling import circular_padding
from .tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from .traced_unet import TraceBudget
from .upscalers import LoadedUpscalers, UpscalerFile, scan_upscalers
from .upscalers import choose as upscaler_choice
from .vae import AUTOMATIC as VAE_AUTOMATIC
from .vae import NONE as VAE_NONE
from .vae import VaeFile, scan_vaes
from .vae import choose as vae_choice
from .vae import near_checkpoint as vae_near_checkpoint
from .vae import weights_file as vae_weights_file

log = logging.getLogger(__name__)

_DONE = object()
# How often a job waiting for the device says so, and notices a Stop.
WAIT_REPORT_INTERVAL_S = 0.5


class Engine:
    """Generates images for requests, streaming Progress events and ending with one Result.

    `model` is a name in the models folder, a local path (diffusers folder or .safetensors file)
    or a hub id; None is the embedded micro model (or, without it, the random-weight tiny model).
    All state lives on the instance: a server shares one Engine between its users, and jobs run
    one at a time.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        models_dir: str | os.PathLike | None = None,
        checkpoints_dir: str | os.PathLike | None = None,
        embeddings_dir: str | os.PathLike | None = None,
        lora_dir: str | os.PathLike | None = None,
        hypernetwork_dir: str | os.PathLike | None = None,
        vae_dir: str | os.PathLike | None = None,
        esrgan_dir: str | os.PathLike | None = None,
        realesrgan_dir: str | os.PathLike | None = None,
        styles_file: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        limits: Limits | None = None,
        allow_pickle: bool = False,
        preview: PreviewSettings | None = None,
        exact_batches: bool | None = None,
        trace_unet: bool = True,
        warm_up: bool = False,
        full_precision_vae: bool = False,
        nan_check: bool = True,
        vae_path: str | os.PathLike | None = None,
    ):
        self.models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
        self.limits = limits or Limits()
        self.preview = preview or PreviewSettings()
        self.device = pick_device(device)
        self.dtype = dtype or default_dtype(self.device)
        # Batched kernels sum in a different order than single ones, so an image made inside a
        # batch can differ by one level in a few pixels. Sampling image by image makes a seed's
        # image byte-identical in any batch; it costs nothing on a CPU and some throughput on a GPU.
        self.exact_batches = self.device.type == "cpu" if exact_batches is None else exact_batches
        # Families that ask for it run their UNet as TorchScript traces on a CPU (same pixels, faster);
        # False keeps every UNet a Python module.
        self.trace_unet = trace_unet
        self.trace_budget = TraceBudget()  # the traces every model this engine loads may make (traced_unet.py)
        # A1111's --no-half-vae: every model's VAE in float32 where the rest runs in half precision.
        self.full_precision_vae = full_precision_vae
        # A1111's NaN check (off with --disable-nan-check): a job whose latents turn NaN stops with what to try.
        self.nan_check = nan_check
        # A1111's --vae-path: this VAE decodes (and encodes) every job, whatever its SD VAE choice says.
        self.forced_vae = None
        if vae_path is not None:
            path = Path(vae_path).expanduser()
            if not (path.is_file() or (path / "config.json").is_file()):
                raise ModelLoadError(f"--vae-path {path}: no such VAE file or diffusers VAE folder")
            self.forced_vae = VaeFile(path.name, path)
        # A server warms up each model it loads whose UNet runs traced (see _warm_up_locked).
        self.warm_up = warm_up
        self.registry = ModelRegistry(
            self.models_dir,
            checkpoints_dir=checkpoints_dir,
            embeddings_dir=embeddings_dir,
            lora_dir=lora_dir,
            hypernetwork_dir=hypernetwork_dir,
            vae_dir=vae_dir,
            esrgan_dir=esrgan_dir,
            realesrgan_dir=realesrgan_dir,
            styles_file=styles_file,
            allow_pickle=allow_pickle,
        )
        self._job_lock = threading.Lock()
        self._styles_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._current: JobControl | None = None
        self._state = JobState()
        self._loaded: LoadedModel | None = None
        # The model unload_model() let go of: what the page and API still name as the checkpoint, and what the
        # next use loads back.
        self._unloaded: ModelInfo | None = None
        # The hires checkpoint and refiner the last job used (A1111's "Hires checkpoint" and refiner), by path, kept
        # loaded for the next job that names them; let go of by a job without them, a model switch and unload_model().
        self._second_models: dict[str, LoadedModel] = {}
        self.upscalers = LoadedUpscalers(self.device)
        self.load_model(model if model is not None else self._default_model())

    # Models ---------------------------------------------------------------------------------

    def _default_model(self) -> str:
        """The micro model (from this models folder, else the copy shipped with the program); without
        it, the random-weight tiny model, built on first use."""
        for folder in (self.models_dir / "Stable-diffusion" / MICRO_MODEL_NAME, SHIPPED_MICRO_MODEL):
            if (folder / "model_index.json").is_file():
                return str(folder)
        return str(ensure_tiny_model(self.models_dir))

    def list_models(self) -> list[ModelInfo]:
        listed = self.registry.scan()
        loaded = self._loaded.info if self._loaded else self._unloaded
        # The loaded model knows its hash even when it lives outside the models folder.
        return [loaded if loaded and info.path == loaded.path else info for info in listed]

    def list_loras(self) -> list[LoraFile]:
        """The LoRAs in the LoRA folder (models/Lora, or --lora-dir), for `<lora:name:weight>` tags."""
        return list(scan_loras(self.registry.lora_dir).values())

    def list_vaes(self) -> dict[str, VaeFile]:
        """The VAEs in the VAE folder (models/VAE, or --vae-dir), by the name A1111 shows."""
        return scan_vaes(self.registry.vae_dir)

    def list_upscalers(self) -> dict[str, UpscalerFile]:
        """The upscaler models in models/ESRGAN and models/RealESRGAN, by the name A1111 shows."""
        return scan_upscalers(self.registry.esrgan_dir, self.registry.realesrgan_dir)

    def hires_upscalers(self) -> list[str]:
        """The hires fix's upscalers: the latent and picture ones built in, then the upscaler models there are."""
        return [*HR_UPSCALERS, *self.list_upscalers()]

    def upscaler_folders(self) -> str:
        """Where upscaler models are looked for, for messages."""
        return f"{self.registry.esrgan_dir} and {self.registry.realesrgan_dir}"

    def upscale(self, req: ExtrasRequest, *, control: JobControl | None = None) -> tuple[Image.Image, dict[str, str]]:
        """A1111's Extras upscale of one picture: the result and its "Postprocess ..." parameters. Refused
        (InvalidRequestError) before any work; runs when no job holds the device. Interrupting `control` (or the
        running job: interrupt()) stops it at its next tile with TaskStopped; a stop asked for while it waited
        for the device stops it before it starts."""
        available = self.list_upscalers()
        folders = self.upscaler_folders()
        checked = check_extras(
            req, self.limits, lambda value, field: upscaler_choice(value, available, PICTURE_UPSCALERS, field, folders)
        )
        networks = {}
        for field in ("upscaler_1", "upscaler_2"):
            name = getattr(checked, field)
            if name in available:
                networks[name] = self.upscalers.get(available[name], field)
        model_runs = [
            checked.upscaler_1 in networks,
            checked.extras_upscaler_2_visibility > 0 and checked.upscaler_2 in networks,
        ].count(True)
        control = control if control is not None else JobControl()
        # Tiles count as steps, and each upscaler model as a batch.
        with self._device_task("extras", batch_count=model_runs, control=control) as report:
            if control.interrupted:
                raise TaskStopped("Upscale stopped before it started.")

            def on_tile(number: int, done: int, total: int) -> None:
                # A finished pass is kept: the stop is seen at the next pass's first tile, or the next picture.
                if control.interrupted and done < total:
                    raise TaskStopped(f"Upscale stopped after {done} of {total} tiles; its picture was not kept.")
                report(done, total, number)

            return upscale_picture(checked.image, checked, networks, on_tile=on_tile)

    def merge_checkpoints(self, req: MergeRequest, *, control: JobControl | None = None) -> MergeResult:
        """A1111's Checkpoint Merger: a new checkpoint in the checkpoints folder from two or three models.
        Refused (InvalidRequestError naming the field) before anything is written; holds the device, as a
        job does, and shows in progress() as mode "merge", one step a tensor. Interrupting `control` (or the
        running job: interrupt()) stops it at its next tensor with TaskStopped, before anything is written."""
        inputs = check_merge(req, self.registry, self.list_vaes())
        control = control if control is not None else JobControl()
        with self._device_task("merge", control=control) as report:
            if control.interrupted:
                raise TaskStopped("Merge stopped before it started; nothing was written.")

            def on_tensor(done: int, total: int) -> None:
                if control.interrupted:
                    raise TaskStopped(f"Merge stopped after {done - 1} of {total} tensors; nothing was written.")
                report(done, total)

            return run_merge(inputs, self.registry, on_tensor=on_tensor)

    @contextlib.contextmanager
    def _device_task(self, mode: str, batch_count: int = 1, control: JobControl | None = None):
        """Hold the device for work that is no generation (an upscale, a merge), shown in progress() and to jobs
        waiting for the device as `mode`, as a generation is; yields report(step, total, batch_no=0). `control` is
        the running job's while it runs: interrupt() reaches it (the work decides whether it stops)."""
        with self._job_lock:
            started, control = time.perf_counter(), control if control is not None else JobControl()
            self._current = control
            self._state = JobState(
                running=True, job_id=control.job_id, mode=mode, batch_count=batch_count, started_at=time.time()
            )

            def report(step: int, total: int, batch_no: int = 0) -> None:
                self._state = dataclasses.replace(
                    self._state,
                    step=step,
                    total=total,
                    batch_no=min(batch_no, max(batch_count - 1, 0)),
                    elapsed=time.perf_counter() - started,
                )

            try:
                yield report
            finally:
                self._current = None
                self._state = JobState(running=False, job_id=control.job_id, mode=mode)

    def job_vae(
        self, sd_vae: str, available: dict[str, VaeFile] | None = None, model: LoadedModel | None = None
    ) -> VaeFile | None:
        """The VAE file a job's sd_vae choice means for `model`, by default the loaded one (None: the model's
        own); `available` is the VAE folder's listing when the caller has just read it."""
        if self.forced_vae is not None:
            return self.forced_vae
        if sd_vae == VAE_NONE:
            return None
        if sd_vae == VAE_AUTOMATIC:
            return vae_near_checkpoint((model or self._require_model()).info.path)
        available = self.list_vaes() if available is None else available
        found = available.get(sd_vae)
        if found is None:  # removed from the folder while the job waited
            vae_choice(sd_vae, available, self.registry.vae_dir)
        return found

    def refresh_embeddings(self) -> EmbeddingsReport:
        """Read the embeddings folder again if its files changed since the model read it (A1111's refresh).
        Waits for a running job: no prompt is encoded while the tokenizer changes."""
        if self._loaded is None and self._unloaded is not None:
            return EmbeddingsReport()  # read afresh when the model loads back
        model = self._require_model()
        if folder_signature(self.registry.embeddings_dir) == model.embeddings.signature:
            return model.embeddings
        with self._job_lock:
            loader = model.loader_pipeline()
            unload_embeddings(loader, model.embeddings)
            model.embeddings = load_embeddings(loader, self.registry.embeddings_dir)
            # New encoders: they know the tokenizer's embedding tokens, and nothing cached under the old ones.
            model.prompt_encoder, model.compel_encoder = make_prompt_encoders(model.components)
        return model.embeddings

    def describe_loras(self, prompt: str) -> list[LoraUse]:
        """The LoRAs a prompt's tags switch on, with their weights; raises InvalidRequestError as a job would."""
        uses = lora_uses(prompt or "")
        self._require_model().loras.resolve(uses)
        return uses

    def describe_hypernets(self, prompt: str) -> list[HypernetUse]:
        """The hypernetworks a prompt's tags switch on, with their strengths, each file read; raises
        InvalidRequestError as a job would."""
        uses = hypernet_uses(prompt or "")
        model = self._require_model()
        model.hypernets.resolve(uses, model.components["unet"])
        return uses

    def list_hypernets(self) -> list[HypernetFile]:
        """The hypernetworks in the hypernetwork folder (models/hypernetworks, or --hypernetwork-dir)."""
        return list(scan_hypernets(self.registry.hypernetwork_dir).values())

    def load_model(self, model: str | os.PathLike) -> ModelInfo:
        """Switch to `model`; waits for a running job to finish. Raises ModelLoadError."""
        info = self.registry.resolve(model)
        if self._loaded is not None and Path(self._loaded.info.path) == Path(info.path):
            return self._loaded.info
        with self._job_lock:
            return self._switch_locked(info)

    def _switch_locked(self, info: ModelInfo) -> ModelInfo:
        """Load `info` in place of the loaded model; the caller holds the job lock (no job runs)."""
        if self._loaded is not None and Path(self._loaded.info.path) == Path(info.path):
            return self._loaded.info
        with self._model_lock:
            # The old model goes first, so that two models never sit in memory together.
            previous, self._loaded, self._second_models = self._loaded, None, {}
            try:
                self._loaded = self._load(info)
            except ModelLoadError:
                self._loaded = previous  # a failed switch keeps the model that worked
                raise
            del previous
            self._unloaded = None
            log.info("Loaded model %s (%s)", self._loaded.info.title, self._loaded.family)
            # Only where it was measured to pay: a real model on a CPU would spend seconds on it.
            if self.warm_up and self._loaded.traced_unet is not None:
                self._warm_up_locked()
            return self._loaded.info

    @contextlib.contextmanager
    def reserved(self, checkpoint: str | os.PathLike, *, restore: bool = True) -> Iterator[DeviceReservation]:
        """Hold the device for a run of jobs on `checkpoint` (A1111's API override_settings.sd_model_checkpoint):
        waits for the running job, loads the checkpoint, and, unless `restore` is False, loads the model before it
        back at the end. Jobs given the reservation (generate(..., reservation=)) run on it in turn; every other
        job, model switch or upload waits until it ends, so none of them runs on the wrong model or switches it
        away under these. Raises ModelLoadError (nothing held) when the checkpoint does not load."""
        info = self.registry.resolve(checkpoint)
        self._job_lock.acquire()
        reservation = DeviceReservation(self)
        try:
            before = self._loaded.info if self._loaded is not None else self._unloaded
            self._switch_locked(info)
            yield reservation
        finally:
            reservation.active = False
            try:
                if restore and before is not None and Path(before.path) != Path(self.model.path):
                    self._switch_locked(before)
            except ModelLoadError:
                log.exception("Could not load %s back after a job on %s", before.title, info.title)
            finally:
                self._job_lock.release()

    def _load(self, info: ModelInfo) -> LoadedModel:
        """`info` loaded on this engine's device, dtype and UNet tracing (the caller holds what lock it needs)."""
        return load_model(
            info,
            registry=self.registry,
            device=self.device,
            dtype=self.dtype,
            trace_unet=self.trace_unet,
            trace_budget=self.trace_budget,
            full_precision_vae=self.full_precision_vae,
        )

    def unload_model(self) -> ModelInfo | None:
        """A1111's "Unload SD checkpoint": let go of the loaded model's weights (device and host memory), for
        another program to use. It stays the checkpoint the page and API name; the next job, prompt
        reading or reload_model() loads it back. Waits for a running job. None when nothing was loaded."""
        with self._job_lock, self._model_lock:
            if self._loaded is None:
                return self._unloaded
            self._unloaded, self._loaded, self._second_models = self._loaded.info, None, {}
        self.upscalers.clear()
        # The pipeline's modules hold reference cycles (hooks, traces): collect them now, not at some later
        # allocation, and hand the device's cached blocks back so other programs see the memory free.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("Unloaded model %s", self._unloaded.title)
        return self._unloaded

    def reload_model(self) -> ModelInfo:
        """Load back the model unload_model() let go of (nothing to do when one is loaded)."""
        return self._require_model().info

    @property
    def model_loaded(self) -> bool:
        return self._loaded is not None

    def memory(self) -> dict:
        """This program's and the device's memory, in A1111's /memory shape (engine/memory.py)."""
        return memory_report(self.device)

    def _warm_up_locked(self) -> None:
        """Make one step of the model's default picture and throw it away, so that the first person to
        press Generate does not pay for the UNet's trace for that shape (about a second on a 2-core CPU
        for the embedded models), nor for each module's first allocations.

        Runs under the job lock, and leaves the progress state as it found it: no job happened."""
        model = self._require_model()
        defaults = model.defaults
        request = self.validate(
            GenerationRequest(
                sampler_name=defaults.sampler_name,
                scheduler=defaults.scheduler,
                steps=1,
                cfg_scale=defaults.cfg_scale,
                seed=0,
            )
        )
        previewer = _previewer_for(model, self.preview)
        state, started = self._state, time.perf_counter()
        try:
            with cpu_threads_for(model, request.width * request.height):
                self._run_locked(request, JobControl(), previewer, self.preview, emit=lambda event: None)
        except Exception:  # noqa: BLE001 - a model that fails here gets the same error, reported, on its first job
            log.warning("Warming up %s failed", model.info.title, exc_info=True)
        else:
            log.info("Warmed up %s in %.1f s", model.info.title, time.perf_counter() - started)
        finally:
            self._state = state

    @property
    def model(self) -> ModelInfo:
        """The current checkpoint, loaded or let go of by unload_model() (naming it loads nothing)."""
        if self._loaded is None and self._unloaded is not None:
            return self._unloaded
        return self._require_model().info

    @property
    def loaded(self) -> LoadedModel:
        return self._require_model()

    def defaults(self) -> FamilyDefaults:
        return self._require_model().defaults

    def _require_model(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            # A switch may be under way (the old model already let go of): wait for it rather than say none is loaded.
            with self._model_lock:
                loaded = self._loaded
        if loaded is None and self._unloaded is not None:
            loaded = self._load_back()
        if loaded is None:
            raise ModelLoadError("No model is loaded: load one from the model list.")
        return loaded

    def _load_back(self) -> LoadedModel | None:
        """Load the model unload_model() let go of. Only the model lock is taken: a job that needs the model
        may already hold the job lock, and while no model is loaded no job can be using one."""
        with self._model_lock:
            if self._loaded is None and self._unloaded is not None:
                info = self._unloaded
                self._loaded = self._load(info)
                self._unloaded = None
                log.info("Loaded model %s back (%s)", info.title, self._loaded.family)
            return self._loaded

    # Samplers and prompts -------------------------------------------------------------------

    def samplers(self) -> list[str]:
        return samplers.sampler_names()

    def schedulers(self) -> list[str]:
        return samplers.schedule_type_names()

    def sampler_aliases(self, name: str) -> list[str]:
        return list(samplers.get_sampler(name).aliases)

    def token_counts(self, text: str, composable: bool = False) -> list[int]:
        """Tokens per 75-token chunk; `composable` for a prompt (its AND parts counted apart, the longest
        shown), not for a negative prompt."""
        encoder = self._require_model().prompt_encoder
        if encoder is None:
            tokenizer = self._require_model().components["tokenizer"]
            return [len(tokenizer(text or "", add_special_tokens=False).input_ids)]
        return encoder.token_counts(text or "", composable)

    # Jobs -----------------------------------------------------------------------------------

    def describe_prompt(self, text: str, steps: int = 20) -> list[PromptReading]:
        """How the A1111 syntax reads `text` at each stretch of `steps` steps (fragments, weights, chunks)."""
        return describe_prompt(text or "", max(1, int(steps)), self._require_model().prompt_encoder)

    @staticmethod
    def composable_parts(text: str) -> list[tuple[str, float]]:
        """A prompt's AND parts with their weights (one part of weight 1 for a plain prompt)."""
        return composable_parts(text or "")

    def prompt_list_requests(self, base: GenerationRequest, prompt_list: PromptList) -> list[GenerationRequest]:
        """A1111's "Prompts from file or textbox": one request per line of the list, made from `base`. Every line is
        checked before any job runs; InvalidRequestError names the line, then the field."""
        requests = []
        for number, request in expand_prompt_list(base, prompt_list):
            try:
                self.validate(request)
            except InvalidRequestError as exc:
                field = (
                    exc.field if exc.field.startswith("prompt list line") else f"prompt list line {number}: {exc.field}"
                )
                raise InvalidRequestError(field, exc.value, exc.allowed) from exc
            requests.append(request)
        return requests

    def prompt_matrix_plan(self, base: GenerationRequest, matrix: PromptMatrix) -> MatrixPlan:
        """A1111's "Prompt matrix": one request per combination of the prompt's | parts, made from `base`. Every
        picture's request is checked before any job runs; InvalidRequestError names the picture, then the field."""
        matrix_plan = plan_prompt_matrix(base, matrix)
        for number, request in enumerate(matrix_plan.requests, start=1):
            try:
                self.validate(request)
            except InvalidRequestError as exc:
                raise InvalidRequestError(
                    f"prompt matrix picture {number}: {exc.field}", exc.value, exc.allowed
                ) from exc
        return matrix_plan

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """A checked, normalized copy of `req`; raises InvalidRequestError naming the bad field."""
        if not isinstance(req, GenerationRequest):
            raise EngineError(f"expected a GenerationRequest, got {type(req).__name__}")
        # The folders are read only for a name that is not built in (the page and most API jobs send one that is).
        upscalers = {} if req.hr_upscaler in HR_UPSCALERS else self.list_upscalers()
        if req.enable_hr in (True, 1) and isinstance(req.hr_upscaler, str):
            # Matched without case, with or without the file's extension; refused naming what there is.
            req = dataclasses.replace(
                req,
                hr_upscaler=upscaler_choice(
                    req.hr_upscaler, upscalers, HR_UPSCALERS, "hr_upscaler", self.upscaler_folders()
                ),
            )
        checked = validate_request(
            req,
            limits=self.limits,
            native_size=self.defaults().native_size,
            resolve_sampler=samplers.resolve,
            upscalers=tuple(upscalers),
        )
        if checked.styles:
            prompt, negative = apply_styles(
                checked.prompt, checked.negative_prompt, checked.styles, self.styles(), self.registry.styles_file
            )
            checked = dataclasses.replace(checked, prompt=prompt, negative_prompt=negative, styles=None)
        if checked.enable_hr and checked.hr_checkpoint_name:
            checked = dataclasses.replace(
                checked, hr_checkpoint_name=self._second_title(checked.hr_checkpoint_name, "hr_checkpoint_name")
            )
        # A sampler the loaded model cannot run is refused before the job waits (a hires pass on another model, or a
        # model switched meanwhile, is checked when its pass starts).
        loaded = self._require_model()
        check_cfgpp_has_a_negative(loaded, checked.sampler_name)
        if checked.enable_hr and not checked.hr_checkpoint_name and checked.hr_sampler_name:
            check_cfgpp_has_a_negative(loaded, checked.hr_sampler_name, "hr_sampler_name")
        if checked.refiner_checkpoint:
            refiner = self._second_title(checked.refiner_checkpoint, "refiner_checkpoint")
            if refiner and checked.prompt_syntax == "a1111" and is_composed(composable_parts(checked.prompt)):
                raise InvalidRequestError(
                    "refiner_checkpoint", refiner, "None with a composable prompt (AND), which the refiner does not run"
                )
            checked = dataclasses.replace(checked, refiner_checkpoint=refiner)
        # An unknown LoRA, or a weight that is not a number, is refused before the job waits in a queue.
        self.describe_loras(checked.prompt)
        self.describe_hypernets(checked.prompt)
        if checked.enable_hr and checked.hr_prompt:
            try:
                self.describe_loras(checked.hr_prompt)
                self.describe_hypernets(checked.hr_prompt)
            except InvalidRequestError as exc:
                raise InvalidRequestError("hr_prompt", exc.value, exc.allowed) from exc
        if self.forced_vae is not None:  # --vae-path: the job's own choice is not read, nor the VAE folder
            available = None
            checked = dataclasses.replace(checked, sd_vae=self.forced_vae.name)
        else:
            available = self.list_vaes()
            checked = dataclasses.replace(checked, sd_vae=vae_choice(checked.sd_vae, available, self.registry.vae_dir))
        # A VAE for another kind of model is refused now, not after the job waited; it stays loaded for the job.
        vae_file = self.job_vae(checked.sd_vae, available)
        if vae_file is not None:
            self._require_model().vaes.get(vae_file)
        if checked.enable_hr and checked.hr_upscaler in upscalers:
            self.upscalers.get(upscalers[checked.hr_upscaler])  # a file that is no upscaler is refused now
        return checked

    def _second_title(self, name: str, field: str) -> str:
        """The title of the model a hires checkpoint or refiner names ("" when it is the loaded one);
        InvalidRequestError naming `field` when there is no such model."""
        try:
            info = self.registry.with_hash(self.registry.resolve(name))
        except ModelLoadError as exc:
            titles = ", ".join(info.title for info in self.list_models()) or "none"
            none = "'Use same checkpoint'" if field == "hr_checkpoint_name" else "'None'"
            raise InvalidRequestError(field, name, f"a checkpoint from the model list ({titles}), or {none}") from exc
        return "" if Path(info.path) == Path(self.model.path) else info.title

    def _second_models_for(self, req: GenerationRequest, model: LoadedModel) -> dict[str, LoadedModel]:
        """The models a job's hires checkpoint and refiner name, by field ("hr_checkpoint_name",
        "refiner_checkpoint"; absent: none, or `model` itself), loaded now or kept from the last job that named
        them. Models no longer named are let go of first, so at most the two a job uses stay loaded. Runs under
        the job lock."""
        names = {}
        if req.mode == "txt2img" and req.enable_hr and req.hr_checkpoint_name:
            names["hr_checkpoint_name"] = req.hr_checkpoint_name
        if req.refiner_checkpoint:
            names["refiner_checkpoint"] = req.refiner_checkpoint
        paths = {}
        for field, name in names.items():
            try:
                path = str(Path(self.registry.resolve(name).path))
            except ModelLoadError as exc:  # removed from the folder while the job waited
                raise InvalidRequestError(field, name, "a checkpoint from the model list") from exc
            if Path(path) != Path(model.info.path):
                paths[field] = path
        self._second_models = {path: kept for path, kept in self._second_models.items() if path in paths.values()}
        for field, path in paths.items():
            if path not in self._second_models:
                self._second_models[path] = self._load_second(names[field], field, model)
        return {field: self._second_models[path] for field, path in paths.items()}

    def _load_second(self, name: str, field: str, model: LoadedModel) -> LoadedModel:
        try:
            second = self._load(self.registry.resolve(name))
        except ModelLoadError as exc:
            raise InvalidRequestError(field, name, "a model that loads") from exc
        # Latents and prompt conditioning pass from one model to the other: only the same kind of model fits.
        if second.family != model.family or second.inpainting_unet != model.inpainting_unet:
            ours = f"{model.family}{', inpainting' if model.inpainting_unet else ''}"
            theirs = f"{second.family}{', inpainting' if second.inpainting_unet else ''}"
            raise InvalidRequestError(
                field, name, f"a checkpoint of the loaded model's kind ({ours}; this one is {theirs})"
            )
        log.info("Loaded %s %s", "refiner" if field == "refiner_checkpoint" else "hires checkpoint", second.info.title)
        return second

    def styles(self) -> dict[str, PromptStyle]:
        """The prompt styles in styles.csv (read on each call: the file may be edited while the app runs)."""
        return read_styles(self.registry.styles_file)

    def save_style(self, name: str, prompt: str, negative_prompt: str) -> PromptStyle:
        """Add a style to styles.csv, or replace the one of that name (A1111's style editor); InvalidRequestError
        naming the field for a name or text that cannot be saved."""
        style = PromptStyle(
            check_style_name(name),
            _style_text(prompt, "style prompt"),
            _style_text(negative_prompt, "style negative prompt"),
        )
        with self._styles_lock:  # two users saving at once must not lose either's style
            save_style(self.registry.styles_file, style)
        log.info("Saved style %r to %s", style.name, self.registry.styles_file)
        return style

    def delete_style(self, name: str) -> None:
        """Remove a style from styles.csv; InvalidRequestError naming a style that is not there."""
        with self._styles_lock:
            delete_style(self.registry.styles_file, check_style_name(name))
        log.info("Deleted style %r from %s", name, self.registry.styles_file)

    def interrupt(self) -> None:
        """Stop the running job (whoever started it) at its next step."""
        current = self._current
        if current is not None:
            current.interrupt()

    def skip(self) -> None:
        """Cut the running job's current batch short; its next batch still runs."""
        current = self._current
        if current is not None:
            current.skip()

    def progress(self) -> JobState:
        return self._state

    def generate(
        self,
        req: GenerationRequest,
        *,
        control: JobControl | None = None,
        preview: PreviewSettings | None = None,
        reservation: DeviceReservation | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> Iterator[Waiting | Progress | Result]:
        """Yield Waiting while another job holds the device, Progress events, then one Result (with no
        images when stopped before it started). Raises InvalidRequestError before any work. A job given the
        `reservation` its caller holds (reserved()) runs on it without waiting. A job given a `checkpoint` runs on
        that model, loaded when its turn comes if another is loaded then (one of a grid's cells, say, whatever
        another user switched to meanwhile); without one it runs on the model loaded then."""
        control = control or JobControl()
        preview = preview or self.preview
        if reservation is not None and (reservation.engine is not self or not reservation.active):
            raise EngineError("That device reservation has ended: start the job within reserved()")
        pinned = self.registry.resolve(checkpoint) if checkpoint is not None else None
        validated_on = self._require_model()
        asked, req = req, self.validate(req)
        if not isinstance(preview.every, int) or preview.every < 1:
            raise InvalidRequestError("preview interval", preview.every, "a whole number of steps, at least 1")
        if not isinstance(preview.min_interval_s, (int, float)) or not preview.min_interval_s >= 0:
            raise InvalidRequestError(
                "preview min_interval_s", preview.min_interval_s, "a number of seconds, 0 or more"
            )

        events: queue.Queue = queue.Queue()
        worker = threading.Thread(
            target=self._run_job,
            args=(asked, req, validated_on, pinned, control, preview, reservation is not None, events),
            name=f"job-{control.job_id}",
            daemon=True,
        )
        worker.start()
        finished = False
        try:
            while True:
                event = events.get()
                if event is _DONE:
                    finished = True
                    return
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event
        finally:
            if not finished:
                # The caller stopped listening (closed the generator): don't keep computing for nobody.
                control.interrupt()

    def _run_job(
        self,
        asked: GenerationRequest,
        req: GenerationRequest,
        validated_on: LoadedModel,
        pinned: ModelInfo | None,
        control: JobControl,
        preview: PreviewSettings,
        reserved: bool,
        events: queue.Queue,
    ) -> None:
        """`req` is `asked` as validated against the model `validated_on`, before the job waited; `pinned` is the
        model the job must run on (None: the one loaded when it starts)."""
        ran_out_of_memory = False
        try:
            if not reserved and not self._wait_for_device(control, events.put):
                events.put(self._stopped_before_start(req, control))
                return
            try:
                if pinned is not None:
                    self._switch_locked(pinned)
                model = self._require_model()
                if model is not validated_on:
                    # Another model was loaded while the job waited: its sizes, samplers and VAEs are checked anew.
                    req = self.validate(asked)
                previewer = _previewer_for(model, preview)
                with cpu_threads_for(model, req.width * req.height):
                    run = self._run_locked
                    if req.loopback:
                        run = self._run_loopback
                    elif req.outpaint_mk2:
                        run = self._run_outpaint_mk2
                    result = run(req, control, previewer, preview, events.put)
            finally:
                if not reserved:
                    self._job_lock.release()
            events.put(result)
        except EngineError as exc:
            events.put(exc)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the caller, not kill the thread
            if is_out_of_memory(exc):
                # Not chained: the traceback's frames hold the job's tensors, which must go before the cache is freed.
                ran_out_of_memory = True
                log.warning("Job %s ran out of memory: %s", control.job_id, exc)
                error = EngineError(out_of_memory_message(exc, self.device, req.width, req.height, req.batch_size))
            else:
                log.exception("Job %s failed", control.job_id)
                error = EngineError(f"Generation failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            events.put(error)
        finally:
            if ran_out_of_memory:
                release_cached_memory(self.device)
            events.put(_DONE)

    def _wait_for_device(self, control: JobControl, emit) -> bool:
        """Take the job lock. While another job holds it (one from the REST API, say, which does not
        wait in the page's queue) or a model loads, emit Waiting with what runs meanwhile.
        False when the job is stopped before it gets the lock."""
        if self._job_lock.acquire(blocking=False):
            return True
        while True:
            emit(Waiting(ahead=self._state, job_id=control.job_id))
            if self._job_lock.acquire(timeout=WAIT_REPORT_INTERVAL_S):
                return True
            if control.interrupted:
                return False

    def _stopped_before_start(self, req: GenerationRequest, control: JobControl) -> Result:
        return Result(
            images=[],
            seeds=[],
            infotexts=[],
            request=req,
            model=self._loaded.info if self._loaded is not None else self._unloaded,
            interrupted=True,
            job_id=control.job_id,
        )

    def _run_loopback(self, req, control: JobControl, previewer, preview: PreviewSettings, emit) -> Result:
        """A1111's Loopback (engine/loopback.py): one img2img job per loop, each from the picture before, all
        under the one lock, progress counting loops over the whole job."""
        req = req.with_seeds_drawn()
        loops, pictures = req.loopback_loops, req.n_iter
        extra = {
            **req.extra_params,
            "Final denoising strength": f"{req.loopback_final_denoising:g}",
            "Denoising curve": req.loopback_curve,
        }
        kept: list[Result] = []  # the loops whose pictures the job gives
        done: list[Result] = []  # every loop run
        skipped: list[int] = []
        next_seed = req.seed
        for _picture in range(pictures):
            loop_req = dataclasses.replace(
                req,
                seed=next_seed,
                n_iter=1,
                batch_size=1,
                loopback=False,
                extra_params=extra,
                # Every loop is colour-corrected to the first picture, as A1111's loopback does it.
                color_reference=req.init_images[0] if req.color_correction else None,
            )
            last = None
            for loop in range(loops):
                result = self._run_locked(
                    loop_req, control, previewer, preview, emit, batch_span=(len(done), loops * pictures)
                )
                done.append(result)
                if control.interrupted:  # as in A1111, the loop Stop cut is dropped
                    break
                next_seed = (loop_req.seed + 1) % (SEED_MAX + 1)  # on from the loop before, across pictures too
                if result.skipped_batches:  # Skip ends this picture's loops
                    skipped.append(len(done) - 1)
                    break
                last = result
                if pictures == 1:
                    kept.append(result)
                loop_req = dataclasses.replace(
                    loop_req,
                    init_images=result.images[:1],
                    mask=_mask_for(loop_req.mask, result.images[0], req.resize_mode),
                    inpainting_fill=ORIGINAL if loop_req.mask is not None else loop_req.inpainting_fill,
                    seed=next_seed,
                    denoising_strength=loopback.denoising_strength(
                        req.denoising_strength, req.loopback_final_denoising, req.loopback_curve, loops, loop + 1
                    ),
                )
            else:  # with a batch count, each picture's last loop
                if pictures > 1 and last is not None:
                    kept.append(last)
            if control.interrupted:
                break
        return _result_of_parts(req, control, done, kept, skipped)

    def _run_outpaint_mk2(self, req, control: JobControl, previewer, preview: PreviewSettings, emit) -> Result:
        """A1111's Outpainting mk2 (engine/outpaint_mk2.py): for each picture of the batch count, an inpaint job per
        side over the batch the side before grew, all under the one lock, progress counting passes over the whole
        job. Each picture's infotext is its first pass's, as A1111 gives it. Skip drops the picture being grown; Stop
        ends the job, keeping the pictures finished before."""
        req = req.with_seeds_drawn()
        picture = req.init_images[0]
        shares = outpaint_mk2.side_pixels(picture.size, req.outpaint_mk2_pixels, req.outpaint_mk2_directions)
        passes = len(shares) * req.n_iter
        blur = req.outpaint_mk2_mask_blur
        done: list[Result] = []
        kept: list[tuple[list[Image.Image], Result]] = []  # each picture's grown batch, and its first pass
        skipped: list[int] = []
        for number in range(req.n_iter):
            # As a batch count counts seeds on (A1111's script would give every picture the same seed).
            seed = (req.seed + number * req.batch_size) % (SEED_MAX + 1)
            pictures, first = [picture] * req.batch_size, None
            for side, pixels in shares.items():
                grown = outpaint_mk2.side_pass(
                    pictures,
                    side,
                    pixels,
                    blur,
                    (req.width, req.height),
                    req.outpaint_mk2_noise_q,
                    req.outpaint_mk2_color_variation,
                )
                width, height = grown.size
                pass_req = dataclasses.replace(
                    req,
                    seed=seed,
                    n_iter=1,
                    width=width,
                    height=height,
                    init_images=grown.crops,
                    mask=grown.mask,
                    latent_mask=grown.latent_mask,
                    mask_blur=blur * outpaint_mk2.MASK_BLUR_FACTOR,
                    inpainting_fill=ORIGINAL,
                    inpainting_mask_invert=0,
                    inpaint_full_res=False,
                    outpaint_mk2=False,
                )
                result = self._run_locked(pass_req, control, previewer, preview, emit, batch_span=(len(done), passes))
                done.append(result)
                if control.interrupted or result.skipped_batches:
                    break
                first = first or result
                pictures = grown.finished(result.images)
            else:
                kept.append((pictures, first))
                continue
            if control.interrupted:
                break
            skipped.append(len(done) - 1)
        firsts = [first for _, first in kept]
        return _result_of_parts(req, control, done, firsts, skipped, [image for grown, _ in kept for image in grown])

    def _run_locked(
        self,
        req,
        control: JobControl,
        previewer,
        preview: PreviewSettings,
        emit,
        batch_span: tuple[int, int] | None = None,
    ) -> Result:
        """One job, the lock held. `batch_span` (first batch's number, batches in all) numbers its batches within a
        larger job (a loopback's loops); by default they count from 0 to this job's own."""
        model = self._require_model()
        started = time.perf_counter()
        self._current = control
        req = req.with_seeds_drawn()
        seed, subseed = req.seed, req.subseed
        total_images = req.batch_size * req.n_iter
        # As in A1111: a batch counts up the seed, or, with a variation strength, keeps the seed and counts
        # up the variation seed, so that it shows variations of one picture.
        varying = req.subseed_strength > 0
        seeds = [seed + (0 if varying else index) for index in range(total_images)]
        subseeds = [subseed + index for index in range(total_images)]
        # Samplers whose noise comes from one seed per batch run one image at a time, so that
        # the image for a seed never depends on the batch it was made in.
        one_by_one = self.exact_batches or samplers.get_sampler(req.sampler_name).batch_shares_noise
        per_call = 1 if one_by_one else req.batch_size
        batches = [range(i, min(i + per_call, total_images)) for i in range(0, total_images, per_call)]
        tile_grid = None  # SD upscale's and outpainting's: every tile of every picture is a batch of its own
        if req.sd_upscale:  # with A1111's seeds
            size = sd_upscale.upscaled_size(req.init_images[0].size, req.sd_upscale_scale, req.sd_upscale_upscaler)
            tile_grid = plan_tiles(*size, req.width, req.height, req.sd_upscale_overlap)
            seeds, subseeds = [], []
            for picture_no in range(req.n_iter):
                picture_seeds = sd_upscale.tile_seeds(
                    seed + picture_no, subseed, tile_grid.count, req.batch_size, varying
                )
                seeds += picture_seeds[0]
                subseeds += picture_seeds[1]
        elif req.outpaint:  # the seed counts up tile after tile, picture after picture, as A1111's script does
            layout = outpaint.layout(
                req.init_images[0].size, req.outpaint_pixels, req.outpaint_directions, req.width, req.height
            )
            tile_grid = layout.grid
            seeds = [seed + index for index in range(req.n_iter * len(layout.redrawn))]
            subseeds = [subseed] * len(seeds)
        if tile_grid is not None:
            batches = [range(index, index + 1) for index in range(len(seeds))]
        first_batch, batch_total = batch_span or (0, len(batches))
        self._state = JobState(
            running=True,
            job_id=control.job_id,
            mode=req.mode,
            batch_no=first_batch,
            batch_count=batch_total,
            started_at=time.time(),
        )

        def emit_progress(event: Progress) -> None:
            self._state = JobState(
                running=True,
                job_id=control.job_id,
                mode=req.mode,
                step=event.step,
                total=event.total,
                batch_no=event.batch_no,
                batch_count=event.batch_count,
                elapsed=event.elapsed,
                preview=event.preview if event.preview is not None else self._state.preview,
                started_at=self._state.started_at,
            )
            emit(event)

        images, image_indexes, skipped = [], [], []
        tile_job = None
        preview_seconds = 0.0
        try:
            vae_file = self.job_vae(req.sd_vae)
            vae = model.vaes.get(vae_file) if vae_file is not None else None
            if vae is not None and preview.mode == "vae":  # previews decode with the job's VAE too
                previewer = make_previewer("vae", vae=vae, latent_rgb=model.latent_rgb, taesd=model.taesd)
            lora_hashes = self._switch_networks(model, req)
            conditioning = self._encode_prompts(model, req)
            hires_conditioning = None
            upscaler = None
            if req.mode == "txt2img" and req.enable_hr and req.hr_upscaler not in HR_UPSCALERS:
                found = self.list_upscalers().get(req.hr_upscaler)
                if found is None:  # removed from the folder while the job waited
                    raise InvalidRequestError(
                        "hr_upscaler", req.hr_upscaler, f"an upscaler in {self.upscaler_folders()}"
                    )
                upscaler = self.upscalers.get(found)
            hires_loras = None  # the hires prompt's request, when its LoRAs differ from the first prompt's
            second_models = self._second_models_for(req, model)
            hires_model = second_models.get("hr_checkpoint_name")  # None: the hires pass runs on `model`
            hires_vae = None
            if hires_model is not None:
                # A1111's hires checkpoint: the second pass's prompts, LoRAs and VAE are that model's own.
                hires_request = req.hires_pass()
                lora_hashes = {**lora_hashes, **self._switch_networks(hires_model, hires_request)}
                hires_conditioning = self._encode_prompts(hires_model, hires_request)
                hires_vae = self._second_vae(req, hires_model)
            elif req.mode == "txt2img" and req.enable_hr and req.hires_prompts != (req.prompt, req.negative_prompt):
                hires_request = req.hires_pass()
                if _network_set(model, hires_request.prompt) != _network_set(model, req.prompt):
                    # As A1111 does: the hires prompt's LoRAs and hypernetworks run in the second pass (and its
                    # LoRAs encode its prompts).
                    hires_loras = hires_request
                    lora_hashes = {**lora_hashes, **self._switch_networks(model, hires_request)}
                    hires_conditioning = self._encode_prompts(model, hires_request)
                    self._switch_networks(model, req)
                else:
                    hires_conditioning = self._encode_prompts(model, hires_request)
            refiner = self._refiner(req, second_models.get("refiner_checkpoint"))
            if refiner is not None:
                lora_hashes = {**lora_hashes, **refiner.lora_hashes}
            if req.sd_upscale:
                tile_job = TileJob(tile_grid, self._sd_upscale_tiles(req, tile_grid), tuple(range(tile_grid.count)))
            elif req.outpaint:
                tile_job = outpaint.tile_job(req, layout)
            with contextlib.ExitStack() as tiled:
                if req.tiling:
                    padded = [(model, vae), (hires_model, hires_vae)]
                    if refiner is not None:
                        padded.append((refiner.model, refiner.vae))
                    seen = set()
                    for each, each_vae in padded:
                        if each is not None and id(each) not in seen:
                            seen.add(id(each))
                            tiled.enter_context(circular_padding(each.components["unet"], each_vae or each.vae))
                for batch_no, batch_indexes in enumerate(batches):
                    if control.interrupted:
                        break
                    if hires_loras is not None and batch_no > 0:  # the last batch's hires pass switched them
                        self._switch_networks(model, req)
                    outcome = run_batch(
                        model,
                        req if tile_job is None else tile_job.request(req, batch_no),
                        seeds=[seeds[index] for index in batch_indexes],
                        subseeds=[subseeds[index] for index in batch_indexes],
                        vae=vae,
                        conditioning=conditioning,
                        hires_conditioning=hires_conditioning,
                        upscaler=upscaler,
                        hires_model=hires_model,
                        hires_vae=hires_vae,
                        refiner=refiner,
                        before_hires=(
                            functools.partial(self._switch_networks, model, hires_loras) if hires_loras else None
                        ),
                        control=control,
                        previewer=previewer,
                        preview_every=preview.every,
                        preview_interval_s=preview.min_interval_s,
                        nan_check=self.nan_check,
                        emit=emit_progress,
                        batch_no=first_batch + batch_no,
                        batch_count=batch_total,
                        started=started,
                    )
                    images.extend(outcome.images)
                    preview_seconds += outcome.preview_seconds
                    image_indexes.extend(batch_indexes)
                    if outcome.stopped and not control.interrupted:
                        skipped.append(batch_no)
        finally:
            # Hypernetworks hook the UNet for this job only: the next one runs it as it is (and traced).
            for each in (model, *self._second_models.values()):
                each.hypernets.off()
            self._current = None
            self._state = JobState(
                running=False,
                job_id=control.job_id,
                mode=req.mode,
                interrupted=control.interrupted,
                skipped=bool(skipped),
                preview=self._state.preview,
            )

        if tile_job is not None:  # each picture has its first tile's seeds
            images, image_indexes = tile_job.join(images, image_indexes)
            per_picture = len(tile_job.redrawn)
            seeds = [seeds[picture_no * per_picture] for picture_no in range(req.n_iter)]
            subseeds = [subseeds[picture_no * per_picture] for picture_no in range(req.n_iter)]
        infotexts = []
        padded_lengths = any(lengths_differ(each) for each in (conditioning, hires_conditioning) if each is not None)
        vae_hash = self.registry.sha256_of(vae_weights_file(vae_file))[:10] if vae_file is not None else None
        embedding_hashes = model.embeddings.hashes_used(
            [req.prompt, req.negative_prompt], model.components["tokenizer"]
        )
        image_seeds = [seeds[index] for index in image_indexes]
        image_subseeds = [subseeds[index] for index in image_indexes]
        for image, image_seed, image_subseed in zip(images, image_seeds, image_subseeds, strict=True):
            text = format_infotext(
                req,
                image_seed,
                subseed=image_subseed,
                model_name=_model_name(model.info),
                model_hash=model.info.hash,
                vae_name=vae_file.name if vae_file is not None else None,
                vae_hash=vae_hash,
                embedding_hashes=embedding_hashes,
                lora_hashes=lora_hashes,
                inpainting_model=model.inpainting_unet,
                zero_terminal_snr_model=bool(model.scheduler_config.get("rescale_betas_zero_snr")),
                lengths_differ=padded_lengths,
            )
            image.info["parameters"] = text
            infotexts.append(text)
        return Result(
            images=images,
            seeds=image_seeds,
            infotexts=infotexts,
            request=req,
            model=model.info,
            interrupted=control.interrupted,
            elapsed=time.perf_counter() - started,
            job_id=control.job_id,
            skipped_batches=skipped,
            preview_seconds=preview_seconds,
            subseeds=image_subseeds,
        )

    def _sd_upscale_tiles(self, req: GenerationRequest, grid: TileGrid) -> list[Image.Image]:
        """SD upscale's tiles: the init image upscaled as Extras does it, cut where `grid` says."""
        name = req.sd_upscale_upscaler
        networks = {}
        if name not in PICTURE_UPSCALERS:
            found = self.list_upscalers().get(name)
            if found is None:  # removed from the folder while the job waited
                raise InvalidRequestError("sd_upscale_upscaler", name, f"an upscaler in {self.upscaler_folders()}")
            networks[name] = self.upscalers.get(found, "sd_upscale_upscaler")
        picture = req.init_images[0]
        upscaled, _ = upscale_picture(
            picture, ExtrasRequest(image=picture, upscaling_resize=req.sd_upscale_scale, upscaler_1=name), networks
        )
        return cut_tiles(upscaled, grid)

    def _refiner(self, req: GenerationRequest, refiner_model: LoadedModel | None) -> Refiner | None:
        """A job's refiner (None without one): its LoRAs switched on and its prompts encoded for the pass it joins,
        the hires pass when there is one (A1111's default), and the VAE the job's SD VAE choice means for it."""
        if refiner_model is None:
            return None
        joined = req.hires_pass() if req.mode == "txt2img" and req.enable_hr else req
        lora_hashes = self._switch_networks(refiner_model, joined)
        return Refiner(
            model=refiner_model,
            conditioning=self._encode_prompts(refiner_model, joined),
            vae=self._second_vae(req, refiner_model) or refiner_model.vae,
            switch_at=req.refiner_switch_at,
            lora_hashes=lora_hashes,
        )

    def _second_vae(self, req: GenerationRequest, second: LoadedModel):
        """The VAE the job's SD VAE choice means for a hires checkpoint or refiner (None: the model's own)."""
        vae_file = self.job_vae(req.sd_vae, model=second)
        return second.vaes.get(vae_file) if vae_file is not None else None

    def _switch_networks(self, model: LoadedModel, req: GenerationRequest) -> dict[str, str]:
        """Switch on the LoRAs and hypernetworks the prompt's tags name (and off any others); {name: short hash} of
        the LoRAs (A1111's "Lora hashes")."""
        unet = model.components["unet"]
        model.hypernets.switch(unet, model.hypernets.resolve(hypernet_uses(req.prompt), unet))
        found = model.loras.resolve(lora_uses(req.prompt))
        if model.loras.activate(model.loader_pipeline, found, model.family):
            # A LoRA on the text encoder changes what a prompt encodes to.
            model.prompt_encoder.clear_cache()
            model.compel_encoder.clear_cache()
        return {lora.name: model.loras.short_hash(lora) for _use, lora in found}

    def _encode_prompts(self, model: LoadedModel, req: GenerationRequest) -> Conditioning:
        # A1111 lays the prompt-editing schedule over all the job's steps, in img2img too.
        steps = req.steps
        clip_skip = _clip_skip(req)
        composed: list = []
        padding = None
        try:
            if req.prompt_syntax == "compel":
                positive, negative = model.compel_encoder.encode(req.prompt, req.negative_prompt, clip_skip=clip_skip)
                positive_schedule, negative_schedule = [(steps, positive)], [(steps, negative)]
            else:
                # Each AND part of the prompt has its own prompt-editing schedule, as in A1111; the negative
                # prompt is one text (A1111 does not split it).
                parts = composable_parts(req.prompt)
                part_texts = [prompt_schedule(text, steps) for text, _weight in parts]
                negative_texts = prompt_schedule(req.negative_prompt, steps)
                positives, negatives = model.prompt_encoder.encode_many(
                    [text for texts in part_texts for _, text in texts],
                    [text for _, text in negative_texts],
                    clip_skip=clip_skip,
                    emphasis=req.emphasis,
                )
                padding = model.prompt_encoder.padding(clip_skip=clip_skip, emphasis=req.emphasis)
                encoded = iter(positives)
                part_schedules = [[(end, next(encoded)) for end, _ in texts] for texts in part_texts]
                positive_schedule = part_schedules[0]
                negative_schedule = [(end, embeds) for (end, _), embeds in zip(negative_texts, negatives, strict=True)]
                if is_composed(parts):
                    composed = [
                        (schedule, weight) for schedule, (_text, weight) in zip(part_schedules, parts, strict=True)
                    ]
        except ValueError as exc:  # compel's parser and the encoders' own checks
            raise InvalidRequestError(
                "prompt", req.prompt, f"text the {req.prompt_syntax} syntax reads ({exc})"
            ) from exc

        def on_model(embeds):
            if isinstance(embeds, SDXLEmbeds):
                return SDXLEmbeds(*(part.to(model.device, model.dtype) for part in embeds))
            return embeds.to(model.device, model.dtype)

        def to_model(schedule):
            return [(end, on_model(embeds)) for end, embeds in schedule]

        return Conditioning(
            to_model(positive_schedule),
            to_model(negative_schedule),
            steps,
            parts=[(to_model(schedule), weight) for schedule, weight in composed],
            padding=None if padding is None else padding.to(model.device, model.dtype),
        )


@contextlib.contextmanager
def cpu_threads_for(model: LoadedModel, pixels: int) -> Iterator[None]:
    """Run with the model family's intra-op thread count on a CPU when the images are small enough
    for it, then put torch's setting back.

    Jobs hold the engine's job lock, so no other job's work sees the changed count."""
    defaults = model.defaults
    wanted = defaults.cpu_threads
    too_large = defaults.cpu_threads_max_pixels is not None and pixels > defaults.cpu_threads_max_pixels
    if wanted is None or too_large or model.device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(min(wanted, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class DeviceReservation:
    """The device held by Engine.reserved() for its caller's jobs; inactive once the reservation ends."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.active = True


def _previewer_for(model: LoadedModel, preview: PreviewSettings):
    return make_previewer(preview.mode, vae=model.vae, latent_rgb=model.latent_rgb, taesd=model.taesd)


def _result_of_parts(
    req, control: JobControl, done: list[Result], kept: list[Result], skipped: list[int], images=None
) -> Result:
    """The one Result of a job run as several (a loopback's loops, Outpainting mk2's passes): the `kept` parts'
    pictures (or `images`, what was made of them), seeds and infotexts, and the time and previews of all `done`."""
    return Result(
        images=[image for result in kept for image in result.images] if images is None else images,
        seeds=[value for result in kept for value in result.seeds],
        infotexts=[text for result in kept for text in result.infotexts],
        request=req,
        model=done[0].model,
        interrupted=control.interrupted,
        elapsed=sum(result.elapsed for result in done),
        job_id=control.job_id,
        skipped_batches=skipped,
        preview_seconds=sum(result.preview_seconds for result in done),
        subseeds=[value for result in kept for value in result.subseeds],
    )


def _mask_for(mask, picture: Image.Image, resize_mode: int):
    """A loopback's mask for its next loop, whose init image is the last loop's picture: the mask resized to it,
    as A1111 resizes a mask to the generation size (None stays None)."""
    if mask is None or mask.size == picture.size:
        return mask
    return resize_to(mask, picture.width, picture.height, resize_mode)


def _network_set(model: LoadedModel, prompt: str) -> list[tuple]:
    """The LoRAs a prompt switches on, with their text-encoder and UNet weights, and its hypernetworks with theirs."""
    loras = [(lora.name, use.text_encoder, use.unet) for use, lora in model.loras.resolve(lora_uses(prompt))]
    return loras + [(use.name.lower(), use.strength) for use in hypernet_uses(prompt)]


def _style_text(text, field: str) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidRequestError(field, text, "text")
    return text


def _clip_skip(req: GenerationRequest) -> int:
    # Checked by validate_request; A1111 writes it only when it is not 1.
    return int(req.extra_params.get("Clip skip", 1))


def _model_name(info: ModelInfo) -> str:
    # A1111 writes the checkpoint's file stem; the tiny model's folder name reads the same way.
    return Path(info.name).name if info.name else TINY_MODEL_NAME
