"""Start the web UI: `python app.py` serves the embedded micro model at http://127.0.0.1:7860.

Flags as AUTOMATIC1111 users know them (python app.py --help lists all):
    --listen            bind 0.0.0.0 so other machines reach it      --port N    another port
    --share             also open a public Gradio link (needs internet)
    --auth user:pass    ask for a login (also --gradio-auth, --auth-file / --gradio-auth-path)
    --api               the A1111 REST API under /sdapi/v1 (docs at /docs)
    --model NAME|PATH   the model to load           --models-dir DIR   models folder in A1111 layout
On Hugging Face Spaces it starts with no arguments: GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured.
"""

from __future__ import annotations

import logging
import os
import sys

from ui.server import ServerSettings, launch, parse_args

log = logging.getLogger("app")


def configure_logging(level: str | None = None, *, progress_bars: bool = True) -> None:
    """The log at `level` (else LOG_LEVEL, else INFO); without `progress_bars`, diffusers' and transformers' load
    bars stay out of the console (A1111's --disable-console-progressbars)."""
    logging.basicConfig(
        level=level or os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # One line per HTTP request from these would bury what matters.
    for noisy in ("httpx", "httpcore", "urllib3", "gradio_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers advises installing torchvision when diffusers' pipelines import CLIP's image processor; no
    # pipeline here uses one (there is no safety checker), so that advice would only send users after a package.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage()
    )
    if not progress_bars:
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def create_engine(settings: ServerSettings):
    import torch

    from engine import Engine, Limits

    return Engine(
        model=settings.model,
        models_dir=settings.models_dir,
        checkpoints_dir=settings.ckpt_dir,
        lora_dir=settings.lora_dir,
        hypernetwork_dir=settings.hypernetwork_dir,
        vae_dir=settings.vae_dir,
        esrgan_dir=settings.esrgan_dir,
        realesrgan_dir=settings.realesrgan_dir,
        styles_file=settings.styles_file,
        embeddings_dir=settings.embeddings_dir,
        device=settings.device,
        dtype=torch.float32 if settings.full_precision else None,
        full_precision_vae=settings.full_precision_vae,
        nan_check=settings.nan_check,
        allow_pickle=settings.allow_pickle,
        limits=Limits(max_n_iter=settings.max_batch_count) if settings.max_batch_count else None,
        vae_path=settings.vae_path,
        warm_up=True,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings.loglevel, progress_bars=settings.progress_bars)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from engine import EngineError

    for note in settings.a1111_notes:
        log.info("A1111 flag with nothing to do here: %s", note)
    log.info("Loading model %s", settings.model or "(embedded micro model)")
    try:
        engine = create_engine(settings)
    except EngineError as exc:
        log.error("Could not start: %s", exc)
        return 1
    try:
        launch(engine, settings, block=True)
    except OSError as exc:
        log.error("Could not start the web server: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
