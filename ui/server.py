"""Serving the page and the REST API on one port, with the command-line flags A1111 users know.

    settings = parse_args(["--listen", "--api", "--auth", "me:secret"])
    handle = launch(Engine(models_dir=settings.models_dir), settings)   # returns once it serves
    handle.url; handle.close()

One FastAPI app holds the REST routes (/sdapi/v1/..., when --api is given) and has the Gradio page
mounted at "/"; uvicorn serves it in a thread, so tests can start it in-process on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
import webbrowser
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from engine import Engine

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_OUTPUTS_DIR = PROJECT_DIR / "outputs"
# When no port was asked for and 7860 is taken, try the next ones, as Gradio and A1111 do.
PORT_SEARCH_RANGE = 100
CHECKPOINTS_SUBDIR = "Stable-diffusion"
# A1111's port for --nowebui (the API alone).
NOWEBUI_PORT = 7861
# A1111's --timeout-keep-alive default: seconds an idle HTTP connection stays open.
DEFAULT_KEEP_ALIVE_S = 30

_SAME_ATTENTION = (
    "attention runs on torch's scaled_dot_product_attention (A1111's --opt-sdp-attention), which needs nothing "
    "installed"
)
_NO_OFFLOAD = (
    "models stay whole on the device (no offloading to system memory); if it runs out, use a smaller size or batch"
)
_NOTHING_INSTALLED = "the program installs, updates and downloads nothing at start (make setup installs it once)"
_NO_FACES = "there is no face restoration here"
_OWN_SETTINGS = (
    "each browser keeps its own settings (the Settings tab), and the REST API's /options: nobody's change reaches "
    "another person's page"
)
_NO_STOP_ROUTE = "there is no route that stops the server: stop the process"
# A1111 flags that ask for nothing this program needs doing, and why: accepted so that an A1111 command line starts.
A1111_NOTHING_TO_DO = {
    "--xformers": _SAME_ATTENTION,
    "--force-enable-xformers": _SAME_ATTENTION,
    "--opt-sdp-attention": _SAME_ATTENTION,
    "--opt-sdp-no-mem-attention": _SAME_ATTENTION,
    "--opt-split-attention": _SAME_ATTENTION,
    "--opt-split-attention-v1": _SAME_ATTENTION,
    "--opt-sub-quad-attention": _SAME_ATTENTION,
    "--medvram": _NO_OFFLOAD,
    "--medvram-sdxl": _NO_OFFLOAD,
    "--lowvram": _NO_OFFLOAD,
    "--upcast-sampling": "sampling runs in the model's precision; --no-half runs it in float32",
    "--skip-torch-cuda-test": "the device is the best one torch finds (--device picks another); a CPU needs no test",
    "--enable-insecure-extension-access": "this program has no extensions",
    "--no-gradio-queue": "the queue is what runs one job at a time and shows those waiting their place",
    "--opt-channelslast": "the UNet keeps torch's default memory layout (channels-last measured no faster here)",
    "--lowram": "weights load straight onto the device",
    "--no-hashing": "a model's hash is computed once and cached (models/.hashes.json): infotext and the API name it",
    "--gradio-queue": "the queue is on",
    "--api-log": "the API logs its errors; run with --loglevel DEBUG to see more",
    "--log-startup": "the start is logged at INFO",
    "--administrator": "nothing here needs it",
    "--disable-all-extensions": "this program has no extensions",
    "--disable-extra-extensions": "this program has no extensions",
    "--update-all-extensions": "this program has no extensions",
    "--skip-install": _NOTHING_INSTALLED,
    "--skip-prepare-environment": _NOTHING_INSTALLED,
    "--skip-version-check": _NOTHING_INSTALLED,
    "--skip-python-version-check": _NOTHING_INSTALLED,
    "--reinstall-torch": _NOTHING_INSTALLED,
    "--reinstall-xformers": _NOTHING_INSTALLED,
    "--update-check": _NOTHING_INSTALLED,
    "--no-download-sd-model": _NOTHING_INSTALLED,
    "--dump-sysinfo": _NOTHING_INSTALLED,
    "--tests": _NOTHING_INSTALLED,
    "--no-tests": _NOTHING_INSTALLED,
    "-f": "running as root needs no flag here",
    "--xformers-flash-attention": _SAME_ATTENTION,
    "--opt-split-attention-invokeai": _SAME_ATTENTION,
    "--disable-opt-split-attention": _SAME_ATTENTION,
    "--sub-quad-q-chunk-size": _SAME_ATTENTION,
    "--sub-quad-kv-chunk-size": _SAME_ATTENTION,
    "--sub-quad-chunk-threshold": _SAME_ATTENTION,
    "--always-batch-cond-uncond": "the prompt and the negative prompt always run as one batch",
    "--use-ipex": "the device is the best one torch finds (--device picks another)",
    "--disable-model-loading-ram-optimization": "weights load straight onto the device",
    "--skip-load-model-at-start": "the model loads at start (the embedded one in under a second); "
    "Unload checkpoint frees it",
    "--config": "a checkpoint's kind (SD 1.x, 2.x, SDXL, inpainting) is read from its weights",
    "--allow-code": "this program runs no custom scripts",
    "--gfpgan-dir": _NO_FACES,
    "--gfpgan-model": _NO_FACES,
    "--gfpgan-models-path": _NO_FACES,
    "--codeformer-models-path": _NO_FACES,
    "--unload-gfpgan": _NO_FACES,
    "--bsrgan-models-path": "upscaler models are read from --esrgan-models-path and --realesrgan-models-path",
    "--dat-models-path": "upscaler models are read from --esrgan-models-path and --realesrgan-models-path",
    "--clip-models-path": "there is no CLIP interrogation here",
    "--deepdanbooru": "there is no DeepBooru interrogation here",
    "--textual-inversion-templates-dir": "there is no training here",
    "--localizations-dir": "the page is in English only",
    "--ngrok": "--share opens a public link",
    "--ngrok-region": "--share opens a public link",
    "--ngrok-options": "--share opens a public link",
    "--ui-config-file": _OWN_SETTINGS,
    "--ui-settings-file": _OWN_SETTINGS,
    "--freeze-settings": _OWN_SETTINGS,
    "--freeze-settings-in-sections": _OWN_SETTINGS,
    "--freeze-specific-settings": _OWN_SETTINGS,
    "--show-negative-prompt": "the negative prompt is always shown",
    "--use-textbox-seed": "the seed box takes any seed",
    "--gradio-img2img-tool": "A1111 does nothing with it either",
    "--gradio-inpaint-tool": "A1111 does nothing with it either",
    "--gradio-debug": "run with --loglevel DEBUG",
    "--ui-debug-mode": "the model loads at start (the embedded one in under a second)",
    "--enable-console-prompts": "each job's prompt is in its infotext, logged with the saved picture",
    "--no-progressbar-hiding": "the page shows a job's progress in its own bar",
    "--disable-tls-verify": "the server makes no HTTPS requests",
    "--add-stop-route": _NO_STOP_ROUTE,
    "--api-server-stop": _NO_STOP_ROUTE,
    "--unix-filenames-sanitization": "file names are NNNNN-seed: nothing of the prompt goes into them",
    "--filenames-max-length": "file names are NNNNN-seed: nothing of the prompt goes into them",
    "--no-prompt-history": "the page keeps no prompt history",
}
# The flags above that take a value in A1111 (read and let go of here); the rest are switches.
A1111_VALUE_FLAGS = {
    "--tests",
    "--config",
    "--gfpgan-dir",
    "--gfpgan-model",
    "--gfpgan-models-path",
    "--codeformer-models-path",
    "--bsrgan-models-path",
    "--dat-models-path",
    "--clip-models-path",
    "--textual-inversion-templates-dir",
    "--localizations-dir",
    "--ngrok",
    "--ngrok-region",
    "--ngrok-options",
    "--ui-config-file",
    "--ui-settings-file",
    "--freeze-settings-in-sections",
    "--freeze-specific-settings",
    "--gradio-img2img-tool",
    "--gradio-inpaint-tool",
    "--filenames-max-length",
    "--sub-quad-q-chunk-size",
    "--sub-quad-kv-chunk-size",
    "--sub-quad-chunk-threshold",
}

# Page events that run a generation pass this as `concurrency_id`: with the queue's
# default_concurrency_limit=1 they then run one at a time, whichever tab started them.
GENERATE_CONCURRENCY_ID = "gpu"

# What build_page may hand to the mount (Gradio 6 takes these at launch, not in gr.Blocks()).
_MOUNT_OPTION_NAMES = ("theme", "css", "css_paths", "js", "head", "head_paths")

Credentials = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ServerSettings:
    """The parsed command line: what the server, the page and the API need to know."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # True when no port was given (flag or GRADIO_SERVER_PORT): a taken port then means "try the next".
    port_fallback: bool = False
    share: bool = False
    auth: Credentials = field(default=(), repr=False)
    api: bool = False
    # A1111's --api-auth; the REST API falls back to `auth` when it is empty.
    api_auth: Credentials = field(default=(), repr=False)
    model: str | None = None
    models_dir: Path | None = None
    # A1111's --ckpt-dir: checkpoints from here instead of <models_dir>/Stable-diffusion.
    ckpt_dir: Path | None = None
    # A1111's --lora-dir: LoRAs from here instead of <models_dir>/Lora.
    lora_dir: Path | None = None
    # A1111's --hypernetwork-dir: hypernetworks from here instead of <models_dir>/hypernetworks.
    hypernetwork_dir: Path | None = None
    # A1111's --vae-dir: VAE files from here instead of <models_dir>/VAE.
    vae_dir: Path | None = None
    # A1111's --esrgan-models-path and --realesrgan-models-path: upscaler models from here instead of
    # <models_dir>/ESRGAN and <models_dir>/RealESRGAN.
    esrgan_dir: Path | None = None
    realesrgan_dir: Path | None = None
    # A1111's --styles-file: prompt styles from this file instead of styles.csv beside models/.
    styles_file: Path | None = None
    # A1111's --embeddings-dir: textual inversion embeddings from here instead of embeddings/ beside models/.
    embeddings_dir: Path | None = None
    outputs_dir: Path = DEFAULT_OUTPUTS_DIR
    # False with --no-save: nothing is written to outputs_dir, whatever a page or API request asks.
    save_images: bool = True
    allow_pickle: bool = False
    device: str | None = None
    # A1111's --hide-ui-dir-config: no folder of the server can be named on the page (the Batch from folders).
    hide_ui_dir_config: bool = False
    # A1111's --no-half / --precision full: every model in float32, on a GPU too.
    full_precision: bool = False
    # A1111's --no-half-vae: the VAE in float32 where the rest runs in half precision.
    full_precision_vae: bool = False
    # A1111's --tls-certfile and --tls-keyfile: serve HTTPS with them (both or neither).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # A1111's --loglevel: the log's level (else LOG_LEVEL, else INFO); --disable-console-progressbars.
    loglevel: str | None = None
    progress_bars: bool = True
    # A1111's --cors-allow-origins (comma-separated) and --cors-allow-origins-regex.
    cors_allow_origins: tuple[str, ...] = ()
    cors_allow_origins_regex: str | None = None
    # A1111's --theme: "light" or "dark" opens the page so; None follows the browser's setting.
    theme: str | None = None
    # A1111's --autolaunch: open the page in this machine's browser once it serves.
    autolaunch: bool = False
    # False with A1111's --disable-nan-check: a job whose model makes NaN values runs on to its black picture.
    nan_check: bool = True
    # False with A1111's --nowebui: the REST API alone, no page.
    page: bool = True
    # A1111's --vae-path: this VAE for every job, whatever its SD VAE choice.
    vae_path: Path | None = None
    # A1111's --max-batch-count: the most batches (Batch count, n_iter) a job may have; None keeps the engine's.
    max_batch_count: int | None = None
    # A1111's --subpath: "/PATH" when a reverse proxy serves the page under /PATH; "" serves it at the root.
    subpath: str = ""
    # A1111's --gradio-allowed-path: further files and folders the page may serve.
    allowed_paths: tuple[str, ...] = ()
    # A1111's --timeout-keep-alive: seconds an idle HTTP connection stays open.
    timeout_keep_alive: int = DEFAULT_KEEP_ALIVE_S
    # What each A1111 flag given that has nothing to do here would have done, and why it need not (logged at start).
    a1111_notes: tuple[str, ...] = ()

    @property
    def exposed(self) -> bool:
        """Reachable from other machines: listening beyond loopback, or through a share link."""
        return self.share or not is_loopback(self.host)

    @property
    def server_folders(self) -> bool:
        """Whether the page may read and write folders of this machine that a user names (the Batch from folders
        of img2img, inpaint and Extras): not with --hide-ui-dir-config, and not where others reach the page without
        a login, since whoever reaches it could then read any picture on this machine and write files anywhere it
        may."""
        return not self.hide_ui_dir_config and (not self.exposed or bool(self.auth))

    @property
    def api_credentials(self) -> Credentials:
        return self.api_auth or self.auth


def is_loopback(host: str) -> bool:
    """Only this machine can connect. An empty host binds every interface, so it is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume other machines can reach it


# Command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Stable Diffusion web UI. Without arguments it serves the embedded micro model at "
        "http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are honoured when no flag sets them, "
        "as on Hugging Face Spaces).",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", "--server-name", dest="host", help=f"address to bind (default {DEFAULT_HOST})")
    net.add_argument("--port", type=_port, help=f"port (default {DEFAULT_PORT}, or the next free one)")
    net.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    net.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    net.add_argument(
        "--auth",
        "--gradio-auth",
        dest="auth",
        action="append",
        default=[],
        metavar="USER:PASS[,USER:PASS...]",
        help="require a login for the page and the API (may be repeated)",
    )
    net.add_argument(
        "--auth-file",
        "--gradio-auth-path",
        dest="auth_file",
        action="append",
        default=[],
        metavar="PATH",
        help="file of USER:PASS entries, separated by commas or new lines",
    )
    net.add_argument("--api", action="store_true", help="serve the A1111-compatible REST API under /sdapi/v1")
    net.add_argument(
        "--api-auth",
        dest="api_auth",
        action="append",
        default=[],
        metavar="USER:PASS[,USER:PASS...]",
        help="credentials for the REST API only (default: those of --auth)",
    )
    models = parser.add_argument_group("models and files")
    models.add_argument(
        "--model",
        "--ckpt",
        dest="model",
        help="model to load: a name in the models folder, a path "
        "to a .safetensors file or diffusers folder, or a hub id (default: the embedded micro model)",
    )
    models.add_argument(
        "--models-dir",
        type=Path,
        help="models folder in A1111 layout, holding Stable-diffusion/, Lora/, VAE/, VAE-approx/ (default: models/ beside app.py)",
    )
    models.add_argument(
        "--ckpt-dir",
        type=Path,
        help="folder of checkpoints to list and load, as in A1111 (default: <models-dir>/Stable-diffusion)",
    )
    models.add_argument(
        "--lora-dir",
        type=Path,
        help="LoRA folder for <lora:name:weight> tags, as in A1111 (default: <models-dir>/Lora)",
    )
    models.add_argument(
        "--hypernetwork-dir",
        type=Path,
        help="hypernetwork folder for <hypernet:name:strength> tags, as in A1111 (default: <models-dir>/hypernetworks)",
    )
    models.add_argument(
        "--vae-dir",
        type=Path,
        help="VAE folder for the SD VAE choice, as in A1111 (default: <models-dir>/VAE)",
    )
    models.add_argument(
        "--esrgan-models-path",
        dest="esrgan_dir",
        type=Path,
        help="ESRGAN upscaler models (4x-UltraSharp, ...), as in A1111 (default: <models-dir>/ESRGAN)",
    )
    models.add_argument(
        "--realesrgan-models-path",
        dest="realesrgan_dir",
        type=Path,
        help="Real-ESRGAN upscaler models, as in A1111 (default: <models-dir>/RealESRGAN)",
    )
    models.add_argument(
        "--styles-file",
        type=Path,
        help="A1111's prompt styles file (default: styles.csv beside the models folder)",
    )
    models.add_argument(
        "--embeddings-dir",
        type=Path,
        help="textual inversion embeddings folder, as in A1111 (default: embeddings/ beside the models folder)",
    )
    models.add_argument("--outputs-dir", type=Path, help="where images are saved (default: outputs/ beside app.py)")
    models.add_argument("--no-save", action="store_true", help="never write images to the outputs folder")
    models.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt pickle checkpoints; loading one runs code from the file, so only for files you trust",
    )
    models.add_argument(
        "--hide-ui-dir-config",
        action="store_true",
        help="no folder of this machine can be named on the page (the Batch from folders), as in A1111; "
        "that is also so, without this flag, when others reach the page without a login",
    )
    models.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: the best available)")
    a1111 = parser.add_argument_group(
        "more of A1111's flags", "so that an A1111 command line (its COMMANDLINE_ARGS) starts here as it is"
    )
    a1111.add_argument(
        "--no-half", action="store_true", help="run models in float32 on a GPU too (default there: float16)"
    )
    a1111.add_argument(
        "--precision", choices=("full", "half", "autocast"), default="autocast", help="full: as --no-half"
    )
    a1111.add_argument(
        "--no-half-vae", action="store_true", help="run the VAE in float32 where the rest runs in half precision"
    )
    a1111.add_argument(
        "--use-cpu", nargs="+", default=[], metavar="PART", help="all (or sd): generate on the CPU, as --device cpu"
    )
    a1111.add_argument("--device-id", metavar="N", help="the CUDA device to use, as --device cuda:N")
    a1111.add_argument(
        "--autolaunch", action="store_true", help="open the page in this machine's browser once it serves"
    )
    a1111.add_argument(
        "--cors-allow-origins",
        metavar="URL[,URL...]",
        help="origins whose pages may call the API from a browser, e.g. http://localhost:3456",
    )
    a1111.add_argument("--cors-allow-origins-regex", metavar="REGEX", help="the same, as a regular expression")
    a1111.add_argument("--tls-certfile", type=Path, metavar="PATH", help="serve HTTPS with this certificate")
    a1111.add_argument("--tls-keyfile", type=Path, metavar="PATH", help="and this private key (both are needed)")
    a1111.add_argument(
        "--loglevel",
        type=str.upper,
        choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"),
        help="how much the log says (default: LOG_LEVEL from the environment, else INFO)",
    )
    a1111.add_argument(
        "--disable-console-progressbars",
        action="store_true",
        help="no progress bars in the console when models load",
    )
    a1111.add_argument("--disable-safe-unpickle", action="store_true", help="as --allow-pickle")
    a1111.add_argument(
        "--disable-nan-check",
        action="store_true",
        help="let a job whose model makes NaN values run on to its black picture, rather than stop it with what to try",
    )
    a1111.add_argument(
        "--data-dir",
        type=Path,
        help="A1111's base folder: models/ (and so embeddings/ and styles.csv) and outputs/ in it",
    )
    a1111.add_argument(
        "--nowebui",
        action="store_true",
        help=f"serve the REST API alone, no page (on port {NOWEBUI_PORT} unless --port says otherwise), as A1111",
    )
    a1111.add_argument(
        "--theme", choices=("light", "dark"), help="open the page light or dark (default: as the browser is set)"
    )
    a1111.add_argument(
        "--max-batch-count", type=_positive, metavar="N", help="the most batches a job may have (default 100)"
    )
    a1111.add_argument(
        "--subpath",
        metavar="PATH",
        help="the page's path behind a reverse proxy that serves it under /PATH (the proxy strips it)",
    )
    a1111.add_argument(
        "--gradio-allowed-path",
        dest="allowed_paths",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a further folder the page may serve files from (may be repeated)",
    )
    a1111.add_argument(
        "--timeout-keep-alive",
        type=_positive,
        default=DEFAULT_KEEP_ALIVE_S,
        metavar="SECONDS",
        help="how long an idle HTTP connection stays open (default 30, as A1111)",
    )
    a1111.add_argument(
        "--vae-path",
        type=Path,
        metavar="FILE",
        help="this VAE file (or diffusers VAE folder) decodes every job, whatever SD VAE says, as in A1111",
    )
    for flag in A1111_NOTHING_TO_DO:
        if flag in A1111_VALUE_FLAGS:
            a1111.add_argument(flag, dest=_dest(flag), metavar="VALUE", help=argparse.SUPPRESS)
        else:
            a1111.add_argument(flag, dest=_dest(flag), action="store_true", help=argparse.SUPPRESS)
    parser.epilog = (
        "Also accepted, with nothing to do here (the log says why when one is given): "
        + ", ".join(A1111_NOTHING_TO_DO)
        + "."
    )
    return parser


def _a1111_notes(args: argparse.Namespace) -> tuple[str, ...]:
    """A line for each A1111 flag given that has nothing to do here, saying why."""
    notes = [
        f"{flag}: {why}" for flag, why in A1111_NOTHING_TO_DO.items() if getattr(args, _dest(flag)) not in (None, False)
    ]
    others = [part for part in args.use_cpu if part not in _GENERATING_PARTS]
    if others:
        notes.append(f"--use-cpu {' '.join(others)}: those parts are not run here")
    if args.device and (args.device_id is not None or _generates_on_cpu(args)):
        notes.append(f"--device {args.device} wins over --use-cpu and --device-id")
    return tuple(notes)


# The parts A1111's --use-cpu names that are generation here.
_GENERATING_PARTS = ("all", "sd")


def _generates_on_cpu(args: argparse.Namespace) -> bool:
    return any(part in _GENERATING_PARTS for part in args.use_cpu)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _device(args: argparse.Namespace) -> str | None:
    """--device, else A1111's --use-cpu all|sd (the CPU) or --device-id N (cuda:N)."""
    if args.device:
        return args.device
    if _generates_on_cpu(args):
        return "cpu"
    if args.device_id is not None:
        return f"cuda:{args.device_id}"
    return None


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Flags first, then GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, then defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    # A1111: an explicit server name wins over --listen.
    if args.host:
        host = args.host
    elif args.listen:
        host = "0.0.0.0"
    else:
        host = env.get("GRADIO_SERVER_NAME") or DEFAULT_HOST

    if args.cors_allow_origins_regex is not None:
        try:
            re.compile(args.cors_allow_origins_regex)
        except re.error as exc:
            parser.error(
                f"--cors-allow-origins-regex {args.cors_allow_origins_regex!r}: not a regular expression ({exc})"
            )
    if (args.tls_certfile is None) != (args.tls_keyfile is None):
        parser.error("--tls-certfile and --tls-keyfile go together: give both, or neither")
    for flag, path in (("--tls-certfile", args.tls_certfile), ("--tls-keyfile", args.tls_keyfile)):
        if path is not None and not path.expanduser().is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.tls_certfile is not None and args.share:
        parser.error("--share tunnels to plain HTTP and cannot reach an HTTPS server: drop --share or the --tls flags")
    if args.nowebui and args.share:
        parser.error("--share opens a link to the page, and --nowebui serves none: drop one of them")
    if args.vae_path is not None and not args.vae_path.expanduser().exists():
        parser.error(f"--vae-path {args.vae_path}: no such file or folder")
    for path in args.allowed_paths:
        if not path.expanduser().exists():
            parser.error(f"--gradio-allowed-path {path}: no such file or folder")
    port_fallback = False
    if args.port is not None:
        port = args.port
    elif args.nowebui:
        port = NOWEBUI_PORT
    elif env.get("GRADIO_SERVER_PORT"):
        try:
            port = _port(env["GRADIO_SERVER_PORT"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"GRADIO_SERVER_PORT: {exc}")
    else:
        port, port_fallback = DEFAULT_PORT, True

    try:
        auth = _credentials_from(args.auth, args.auth_file)
        api_auth = _credentials_from(args.api_auth, [])
    except ValueError as exc:
        parser.error(str(exc))

    for flag, folder in (
        ("--data-dir", args.data_dir),
        ("--ckpt-dir", args.ckpt_dir),
        ("--lora-dir", args.lora_dir),
        ("--hypernetwork-dir", args.hypernetwork_dir),
        ("--vae-dir", args.vae_dir),
        ("--esrgan-models-path", args.esrgan_dir),
        ("--realesrgan-models-path", args.realesrgan_dir),
        ("--embeddings-dir", args.embeddings_dir),
    ):
        if folder is not None and not folder.expanduser().is_dir():
            parser.error(f"{flag} {folder}: no such folder")

    data_dir = _expanded(args.data_dir)
    return ServerSettings(
        host=host,
        port=port,
        port_fallback=port_fallback,
        share=args.share,
        auth=auth,
        api=args.api or args.nowebui,
        api_auth=api_auth,
        model=args.model,
        models_dir=args.models_dir or (data_dir / "models" if data_dir else None),
        ckpt_dir=_expanded(args.ckpt_dir),
        lora_dir=_expanded(args.lora_dir),
        hypernetwork_dir=_expanded(args.hypernetwork_dir),
        vae_dir=_expanded(args.vae_dir),
        esrgan_dir=_expanded(args.esrgan_dir),
        realesrgan_dir=_expanded(args.realesrgan_dir),
        styles_file=_expanded(args.styles_file),
        embeddings_dir=_expanded(args.embeddings_dir),
        outputs_dir=args.outputs_dir or (data_dir / "outputs" if data_dir else DEFAULT_OUTPUTS_DIR),
        save_images=not args.no_save,
        allow_pickle=args.allow_pickle or args.disable_safe_unpickle,
        device=_device(args),
        hide_ui_dir_config=args.hide_ui_dir_config,
        full_precision=args.no_half or args.precision == "full",
        full_precision_vae=args.no_half_vae,
        autolaunch=args.autolaunch,
        theme=args.theme,
        tls_certfile=_expanded(args.tls_certfile),
        tls_keyfile=_expanded(args.tls_keyfile),
        loglevel=args.loglevel,
        progress_bars=not args.disable_console_progressbars,
        cors_allow_origins=tuple(
            origin.strip() for origin in (args.cors_allow_origins or "").split(",") if origin.strip()
        ),
        cors_allow_origins_regex=args.cors_allow_origins_regex,
        nan_check=not args.disable_nan_check,
        page=not args.nowebui,
        max_batch_count=args.max_batch_count,
        vae_path=_expanded(args.vae_path),
        subpath="/" + args.subpath.strip("/") if args.subpath and args.subpath.strip("/") else "",
        allowed_paths=tuple(str(_expanded(path)) for path in args.allowed_paths),
        timeout_keep_alive=args.timeout_keep_alive,
        a1111_notes=_a1111_notes(args),
    )


def _expanded(path: Path | None) -> Path | None:
    return path.expanduser() if path is not None else None


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number}: at least 1")
    return number


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 picks a free one)")
    return port


def parse_credentials(text: str, source: str = "--auth") -> Credentials:
    """USER:PASS pairs separated by commas or new lines (A1111's --gradio-auth format)."""
    pairs = []
    for entry in text.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{source}: {entry!r} is not USER:PASSWORD")
        pairs.append((user.strip(), password))
    return tuple(pairs)


def _credentials_from(values: list[str], files: list[Path | str]) -> Credentials:
    pairs: list[tuple[str, str]] = []
    for value in values:
        pairs.extend(parse_credentials(value))
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--auth-file: cannot read {path}: {exc.strerror or exc}") from None
        found = parse_credentials(text, f"--auth-file {path}")
        if not found:
            raise ValueError(f"--auth-file: {path} holds no USER:PASSWORD entry")
        pairs.extend(found)
    return tuple(pairs)


def build_blocks(engine: Engine, settings: ServerSettings) -> gr.Blocks:
    from ui.page import build_page

    return build_page(engine, settings)


def create_app(engine: Engine, settings: ServerSettings) -> tuple[gr.Blocks | None, FastAPI]:
    """The page mounted at "/" of a FastAPI app that also holds the REST API when settings.api is set; no page (None)
    with settings.page off (A1111's --nowebui)."""
    import gradio as gr
    from fastapi import FastAPI

    app = FastAPI(
        title="Stable Diffusion web UI",
        docs_url="/docs" if settings.api else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.api else None,
    )
    _allow_cross_origin(app, settings)
    if settings.api:
        from ui.api import install_api

        # Routes go on before the mount: the page at "/" catches every path left over.
        install_api(app, engine, settings)
    if not settings.page:  # --nowebui (settings.api is set with it)
        return None, app

    blocks = build_blocks(engine, settings)
    # One job at a time on the device: events sharing GENERATE_CONCURRENCY_ID queue behind each other.
    current_queue = getattr(blocks, "_queue", None)
    blocks.queue(default_concurrency_limit=1, max_size=getattr(current_queue, "max_size", None))
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        server_name=settings.host,
        server_port=settings.port,
        auth=list(settings.auth) or None,
        ssr_mode=False,  # server-side rendering needs Node; client-side rendering works everywhere
        show_error=True,
        root_path=settings.subpath or None,
        allowed_paths=list(settings.allowed_paths) or None,
        **_mount_options(blocks),
    )
    return blocks, app


def _allow_cross_origin(app: FastAPI, settings: ServerSettings) -> None:
    """A1111's --cors-allow-origins and --cors-allow-origins-regex: pages served from those origins (a painting
    tool's web front end, say) may call the API from a browser, with its logins."""
    if not settings.cors_allow_origins and not settings.cors_allow_origins_regex:
        return
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allow_origins),
        allow_origin_regex=settings.cors_allow_origins_regex,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=True,
    )


def _mount_options(blocks: Any) -> dict[str, Any]:
    """theme/css/js/head for the mount: from `blocks.mount_options` (a dict build_page may set) or, as
    Gradio's own launch() does, from what was passed to gr.Blocks() (deprecated there in Gradio 6)."""
    options = dict(getattr(blocks, "mount_options", None) or {})
    unknown = set(options) - set(_MOUNT_OPTION_NAMES)
    if unknown:
        raise ValueError(f"mount_options: unknown keys {sorted(unknown)}; allowed: {', '.join(_MOUNT_OPTION_NAMES)}")
    for name in _MOUNT_OPTION_NAMES:
        legacy = getattr(blocks, f"_deprecated_{name}", None)
        if legacy is not None:
            options.setdefault(name, legacy)
    return options


# Serving -----------------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A running server. `url` is where this machine reaches it; `share_url` is set once a share link is up."""

    url: str
    host: str
    port: int
    blocks: Any
    app: Any
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    share_url: str | None = None
    share_error: str | None = None
    _share_thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_for_share(self, timeout: float | None = None) -> str | None:
        """Block until the share link attempt has ended; returns the link or None."""
        if self._share_thread is not None:
            self._share_thread.join(timeout)
        return self.share_url

    def wait(self) -> None:
        """Block until the server stops. Ctrl+C, and SIGTERM (docker stop, a Space restarting), close
        it gracefully: open pages get their streams ended instead of a dropped connection."""
        previous_sigterm = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            previous_sigterm = signal.signal(signal.SIGTERM, _interrupt_main_thread)
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            log.info("Stopping")
            self.close()
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)

    def close(self, timeout: float = 10.0) -> None:
        # Open browser tabs hold event streams that only end when cancelled at shutdown; uvicorn
        # logs each cancellation as an application error, which it is not.
        logging.getLogger("uvicorn.error").addFilter(_drop_shutdown_cancellations)
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)


def _interrupt_main_thread(signum, frame) -> None:
    raise KeyboardInterrupt


def _drop_shutdown_cancellations(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, asyncio.CancelledError):
        return False
    return "timeout graceful shutdown exceeded" not in record.getMessage()


def launch(engine: Engine, settings: ServerSettings, *, block: bool = False) -> ServerHandle:
    """Build the app and serve it; returns once requests are answered (or, with block=True, when it stops)."""
    import uvicorn

    blocks, app = create_app(engine, settings)
    sock = bind_socket(settings.host, settings.port, search=settings.port_fallback)
    port = sock.getsockname()[1]
    tls = {}
    if settings.tls_certfile is not None:
        tls = {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=settings.timeout_keep_alive,
        **tls,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()  # once serving, uvicorn owns the socket and closes it on shutdown
            raise RuntimeError(f"The web server did not start on {settings.host}:{port}; see the log above.")
        time.sleep(0.02)

    scheme = "https" if settings.tls_certfile is not None else "http"
    url = f"{scheme}://{_display_host(settings.host)}:{port}/"
    handle = ServerHandle(
        url=url, host=settings.host, port=port, blocks=blocks, app=app, _server=server, _thread=thread
    )
    if settings.page:
        log.info("Running on %s (model %s)", url, engine.model.title)
    else:
        log.info("Running the REST API alone (--nowebui) on %s (model %s)", url, engine.model.title)
    if not is_loopback(settings.host):
        log.info("Listening on %s:%d: other machines reach it through this machine's address", settings.host, port)
    if settings.api:
        log.info("REST API at %ssdapi/v1/ (docs at %sdocs)", url, url)
    warn_if_exposed(settings)
    if settings.autolaunch:
        # In a thread: a console browser (on a machine with no display) would hold this one until it quits.
        threading.Thread(target=webbrowser.open, args=(url,), name="autolaunch", daemon=True).start()
    if settings.share:
        handle._share_thread = threading.Thread(
            target=_open_share_link, args=(handle, port), name="share-link", daemon=True
        )
        handle._share_thread.start()
    if block:
        handle.wait()
    return handle


def warn_if_exposed(settings: ServerSettings) -> bool:
    """Log a prominent warning when others can reach the app and no login is asked. True when it warned."""
    if not settings.exposed or settings.auth:
        return False
    how = "a public share link" if settings.share else f"{settings.host} (other machines on the network)"
    lines = [
        "!" * 78,
        f"WARNING: the web UI is reachable through {how} and asks for no password.",
        "Anyone who reaches it can generate images, use this machine's GPU/CPU and switch the model.",
        "Add --auth USER:PASSWORD (or --auth-file PATH) to require a login.",
    ]
    if settings.api and not settings.api_credentials:
        lines.append("The REST API (--api) is open too; --auth or --api-auth protects it.")
    if not settings.hide_ui_dir_config:
        lines.append("Batch from folders is off until a login is asked: it reads and writes this machine's folders.")
    lines.append("!" * 78)
    log.warning("\n".join(lines))
    return True


def bind_socket(host: str, port: int, *, search: bool = False) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); with search, the next free port after a taken one."""
    last_error: OSError | None = None
    candidates = range(port, min(port + PORT_SEARCH_RANGE, 65536)) if search and port else [port]
    for candidate in candidates:
        try:
            return _listen(host, candidate)
        except OSError as exc:
            last_error = exc
            if not search:
                break
    if search and port:
        hint = f"ports {port}-{candidates[-1]} are all taken"
    else:
        hint = f"port {port}: {last_error.strerror if last_error else 'unavailable'}"
    raise OSError(f"Cannot listen on {host}: {hint}. Choose another one with --port N.") from last_error


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _open_share_link(handle: ServerHandle, port: int) -> None:
    """Ask Gradio's share server for a tunnel; offline this fails and the local server goes on serving."""
    from gradio import networking

    try:
        url = networking.setup_tunnel(
            local_host="127.0.0.1",
            local_port=port,
            share_token=secrets.token_urlsafe(32),
            share_server_address=None,
            share_server_tls_certificate=None,
        )
    except Exception as exc:  # noqa: BLE001 - any failure here must leave the local server running
        cause = exc.__cause__ or exc
        handle.share_error = f"{exc} ({type(cause).__name__}: {cause})" if cause is not exc else str(exc)
        log.error(
            "Could not create a share link: %s. Is this machine online? The local server keeps running at %s",
            handle.share_error,
            handle.url,
        )
        return
    handle.share_url = url if url.startswith("http") else f"https://{url}"
    log.info("Running on public URL: %s", handle.share_url)
