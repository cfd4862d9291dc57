"""The server: A1111-style flags, exposure warnings, logins, the share link offline, and app.py itself."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ui.server import DEFAULT_OUTPUTS_DIR, ServerSettings, bind_socket, launch, parse_args, warn_if_exposed

PROJECT_DIR = Path(__file__).resolve().parent.parent


def parse(*argv: str, **environ: str) -> ServerSettings:
    return parse_args(list(argv), environ=environ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Flags ---------------------------------------------------------------------------------------


def test_defaults_serve_locally_on_7860():
    settings = parse()
    assert (settings.host, settings.port, settings.port_fallback) == ("127.0.0.1", 7860, True)
    assert not settings.api and not settings.share and settings.auth == () and not settings.exposed
    assert settings.save_images and settings.outputs_dir == DEFAULT_OUTPUTS_DIR
    assert settings.model is None and settings.models_dir is None and not settings.allow_pickle


def test_listen_binds_all_interfaces_and_host_wins_over_it():
    assert parse("--listen").host == "0.0.0.0"
    assert parse("--listen").exposed
    assert parse("--listen", "--host", "192.168.1.5").host == "192.168.1.5"
    assert parse("--server-name", "::1").host == "::1" and not parse("--host", "::1").exposed


def test_port_flag_turns_off_the_search_for_a_free_port():
    settings = parse("--port", "9001")
    assert (settings.port, settings.port_fallback) == (9001, False)


@pytest.mark.parametrize("bad", ["-1", "70000", "http"])
def test_bad_port_is_refused(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--port", bad)
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_spaces_environment_is_honoured_when_no_flag_says_otherwise():
    spaces = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7860"}
    settings = parse(**spaces)
    assert (settings.host, settings.port, settings.port_fallback) == ("0.0.0.0", 7860, False)
    settings = parse("--host", "127.0.0.1", "--port", "8000", **spaces)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    with pytest.raises(SystemExit):
        parse(GRADIO_SERVER_PORT="seventy")


def test_auth_pairs_from_flags_in_a1111_format():
    assert parse("--auth", "ann:pw").auth == (("ann", "pw"),)
    settings = parse("--gradio-auth", "ann:pw, bob:p:w:d", "--auth", "cy:x")
    assert settings.auth == (("ann", "pw"), ("bob", "p:w:d"), ("cy", "x"))
    assert "pw" not in repr(settings)  # passwords stay out of logs


@pytest.mark.parametrize("bad", ["ann", ":pw", "ann:"])
def test_malformed_auth_is_refused_with_the_format(bad, capsys):
    with pytest.raises(SystemExit):
        parse("--auth", bad)
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_auth_file_holds_pairs_on_lines_or_separated_by_commas(tmp_path, capsys):
    path = tmp_path / "logins.txt"
    path.write_text("ann:pw1\n\nbob:pw2, cy:pw3\n")
    assert parse("--auth-file", str(path)).auth == (("ann", "pw1"), ("bob", "pw2"), ("cy", "pw3"))
    assert ("dee", "4") in parse("--gradio-auth-path", str(path), "--auth", "dee:4").auth
    with pytest.raises(SystemExit):
        parse("--auth-file", str(tmp_path / "missing.txt"))
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit):
        parse("--auth-file", str(tmp_path / "empty.txt"))


def test_api_auth_defaults_to_the_page_login():
    assert parse("--api", "--auth", "ann:pw").api_credentials == (("ann", "pw"),)
    settings = parse("--api", "--auth", "ann:pw", "--api-auth", "bot:key")
    assert settings.api_credentials == (("bot", "key"),) and settings.auth == (("ann", "pw"),)


def test_models_and_files_flags(tmp_path):
    settings = parse(
        "--model",
        "my.safetensors",
        "--models-dir",
        str(tmp_path),
        "--outputs-dir",
        str(tmp_path / "out"),
        "--no-save",
        "--allow-pickle",
        "--device",
        "cpu",
        "--api",
    )
    assert settings.model == "my.safetensors" and settings.models_dir == tmp_path
    assert settings.outputs_dir == tmp_path / "out" and not settings.save_images
    assert settings.allow_pickle and settings.device == "cpu" and settings.api


def test_ckpt_dir_is_any_checkpoints_folder_as_in_a1111(tmp_path, models_dir, capsys):
    import shutil

    from app import create_engine

    checkpoints = tmp_path / "my-checkpoints"
    shutil.copytree(models_dir / "Stable-diffusion" / "tiny-sd", checkpoints / "tiny-sd")
    settings = parse("--ckpt-dir", str(checkpoints), "--models-dir", str(tmp_path / "models"), "--model", "tiny-sd")
    assert settings.ckpt_dir == checkpoints and settings.models_dir == tmp_path / "models"
    engine = create_engine(settings)
    assert engine.model.path == str(checkpoints / "tiny-sd")
    assert [info.name for info in engine.list_models()] == ["tiny-sd"]
    with pytest.raises(SystemExit):
        parse("--ckpt-dir", str(tmp_path / "missing"))
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "field"), [("--lora-dir", "lora_dir"), ("--embeddings-dir", "embeddings_dir")])
def test_lora_and_embeddings_folders_are_given_as_in_a1111(tmp_path, capsys, flag, field):
    folder = tmp_path / "here"
    folder.mkdir()
    assert getattr(parse(flag, str(folder)), field) == folder
    with pytest.raises(SystemExit):
        parse(flag, str(tmp_path / "missing"))
    assert flag in capsys.readouterr().err


# Exposure warning ----------------------------------------------------------------------------


def test_exposed_without_login_warns_loudly(caplog):
    caplog.set_level(logging.WARNING, logger="ui.server")
    assert warn_if_exposed(parse("--share"))
    assert "public share link" in caplog.text and "--auth" in caplog.text
    caplog.clear()
    assert not warn_if_exposed(parse("--listen", "--auth", "ann:pw"))
    assert not warn_if_exposed(parse())
    assert caplog.text == ""


def test_folders_of_this_machine_are_named_on_the_page_only_by_those_who_may(caplog):
    # img2img's Batch from folders reads and writes this machine's files for whoever reaches the page.
    assert parse().server_folders and parse("--host", "localhost").server_folders
    assert not parse("--listen").server_folders and not parse("--share").server_folders
    assert parse("--listen", "--auth", "ann:pw").server_folders
    assert not parse("--hide-ui-dir-config").server_folders
    assert not parse("--listen", "--auth", "ann:pw", "--hide-ui-dir-config").server_folders
    caplog.set_level(logging.WARNING, logger="ui.server")
    assert warn_if_exposed(parse("--listen"))
    assert "Batch from folders is off until a login is asked" in caplog.text


def test_launch_with_listen_and_no_login_logs_the_warning(engine, caplog):
    caplog.set_level(logging.INFO, logger="ui.server")
    handle = launch(engine, ServerSettings(host="0.0.0.0", port=0))
    try:
        assert httpx.get(handle.url, timeout=30).status_code == 200
        assert handle.url.startswith("http://127.0.0.1:")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("asks for no password" in r.getMessage() for r in warnings)
    finally:
        handle.close()
    assert not handle.running


# More of A1111's flags ---------------------------------------------------------------------------

# A command line as A1111 users keep it in webui-user.sh's COMMANDLINE_ARGS.
A1111_COMMAND_LINE = (
    "--xformers --medvram --no-half-vae --api --listen --theme dark --skip-torch-cuda-test "
    "--enable-insecure-extension-access --use-cpu interrogate"
).split()


def test_an_a1111_command_line_starts_and_says_what_each_flag_without_work_here_does(caplog, models_dir):
    import app

    settings = parse(*A1111_COMMAND_LINE)
    assert settings.api and settings.host == "0.0.0.0" and settings.full_precision_vae
    assert not settings.full_precision and settings.device is None
    notes = "\n".join(settings.a1111_notes)
    for flag in ("--xformers", "--medvram", "--skip-torch-cuda-test", "--use-cpu interrogate"):
        assert flag in notes
    assert settings.theme == "dark"
    assert "--no-half-vae" not in notes and "--api" not in notes and "--theme" not in notes  # those do something
    caplog.set_level(logging.INFO, logger="app")
    # The notes come before the model loads (here it cannot: the log still has them).
    assert app.main(["--xformers", "--models-dir", str(models_dir), "--model", "no-such-model"]) == 1
    assert "--xformers: attention runs on torch's scaled_dot_product_attention" in caplog.text
    with pytest.raises(SystemExit):
        parse("--no-such-flag")  # a flag A1111 does not have either is still refused


# Every flag of A1111's modules/cmd_args.py (1.10), with a value where it takes one.
EVERY_A1111_FLAG = (
    "-f --update-all-extensions --skip-python-version-check --skip-torch-cuda-test --reinstall-xformers "
    "--reinstall-torch --update-check --tests tests --no-tests --skip-install --config v1.yaml --ckpt micro-shapes "
    "--gfpgan-dir g --gfpgan-model g.pth --no-half --no-half-vae --no-progressbar-hiding --max-batch-count 16 "
    "--textual-inversion-templates-dir t --localizations-dir l --allow-code --medvram --medvram-sdxl --lowvram "
    "--lowram --always-batch-cond-uncond --unload-gfpgan --precision autocast --upcast-sampling --ngrok token "
    "--ngrok-region us --ngrok-options {} --enable-insecure-extension-access --codeformer-models-path c "
    "--gfpgan-models-path g --bsrgan-models-path b --dat-models-path d --clip-models-path c --xformers "
    "--force-enable-xformers --xformers-flash-attention --deepdanbooru --opt-split-attention --opt-sub-quad-attention "
    "--sub-quad-q-chunk-size 1024 --sub-quad-kv-chunk-size 512 --sub-quad-chunk-threshold 80 "
    "--opt-split-attention-invokeai --opt-split-attention-v1 --opt-sdp-attention --opt-sdp-no-mem-attention "
    "--disable-opt-split-attention --disable-nan-check --use-cpu interrogate --use-ipex "
    "--disable-model-loading-ram-optimization --listen --port 7861 --show-negative-prompt "
    "--ui-config-file ui-config.json --hide-ui-dir-config --freeze-settings --freeze-settings-in-sections s "
    "--freeze-specific-settings s --ui-settings-file config.json --gradio-debug --gradio-auth u:p --gradio-img2img-tool x "
    "--gradio-inpaint-tool x --opt-channelslast --autolaunch --theme dark --use-textbox-seed "
    "--disable-console-progressbars --enable-console-prompts --disable-safe-unpickle --api --api-auth u:p --api-log "
    "--ui-debug-mode --device-id 0 --administrator --cors-allow-origins http://a --cors-allow-origins-regex .* "
    "--disable-tls-verify --server-name 127.0.0.1 --gradio-queue --no-gradio-queue --skip-version-check --no-hashing "
    "--no-download-sd-model --subpath lantern --add-stop-route --api-server-stop --timeout-keep-alive 60 "
    "--disable-all-extensions --disable-extra-extensions --skip-load-model-at-start --unix-filenames-sanitization "
    "--filenames-max-length 128 --no-prompt-history --loglevel INFO --log-startup --skip-prepare-environment "
    "--dump-sysinfo"
).split()


def test_every_a1111_flag_is_taken_and_those_with_nothing_to_do_say_why():
    settings = parse(*EVERY_A1111_FLAG)
    notes = "\n".join(settings.a1111_notes)
    for flag in (
        "--ui-config-file",
        "--freeze-settings",
        "--ngrok",
        "--clip-models-path",
        "--skip-load-model-at-start",
    ):
        assert f"{flag}: " in notes
    assert "--ui-config-file: each browser keeps its own settings" in notes
    # The ones that do something here.
    assert (settings.max_batch_count, settings.subpath, settings.timeout_keep_alive) == (16, "/lantern", 60)
    assert "--max-batch-count" not in notes and "--subpath" not in notes


def test_a1111_flags_that_name_nothing_are_refused_saying_so(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse("--vae-path", str(tmp_path / "vae.safetensors"))
    assert "vae.safetensors: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--gradio-allowed-path", str(tmp_path / "missing"))
    assert "missing: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--max-batch-count", "0")


def test_max_batch_count_subpath_and_keep_alive_reach_the_engine_and_the_server(models_dir, tmp_path):
    import app
    from engine import GenerationRequest, InvalidRequestError

    settings = parse(
        "--max-batch-count", "3", "--subpath", "/tools/lantern/", "--timeout-keep-alive", "45",
        "--gradio-allowed-path", str(tmp_path), "--models-dir", str(models_dir), "--port", "0", "--api",
    )  # fmt: skip
    engine = app.create_engine(settings)
    with pytest.raises(InvalidRequestError, match="n_iter"):
        engine.validate(GenerationRequest(prompt="x", n_iter=4))
    handle = launch(engine, settings)
    try:
        assert handle._server.config.timeout_keep_alive == 45
        # Behind a proxy that strips /tools/lantern, the page names its files under that path.
        config = httpx.get(handle.url + "config", timeout=30).json()
        assert config["root"].endswith("/tools/lantern")
        flags = httpx.get(handle.url + "sdapi/v1/cmd-flags", timeout=30).json()
        assert (flags["max_batch_count"], flags["subpath"], flags["vae_path"]) == (3, "tools/lantern", None)
    finally:
        handle.close()


def test_a1111s_precision_and_device_flags_set_what_the_engine_runs_on(tmp_path, monkeypatch):
    import torch

    import app

    assert parse("--no-half").full_precision and parse("--precision", "full").full_precision
    assert not parse("--precision", "autocast").full_precision
    assert parse("--use-cpu", "all").device == "cpu" and parse("--use-cpu", "sd", "interrogate").device == "cpu"
    assert parse("--device-id", "1").device == "cuda:1"
    with_both = parse("--device", "cuda:0", "--device-id", "1")
    assert with_both.device == "cuda:0" and any("wins" in note for note in with_both.a1111_notes)
    made = {}
    monkeypatch.setattr("engine.Engine", lambda **options: made.update(options))
    app.create_engine(parse("--no-half", "--no-half-vae", "--disable-nan-check"))
    assert made["dtype"] == torch.float32 and made["full_precision_vae"] and not made["nan_check"]
    app.create_engine(parse())
    assert made["dtype"] is None and not made["full_precision_vae"]  # the device's default: float16 on a GPU
    assert made["nan_check"]


def test_data_dir_holds_models_and_outputs_and_safe_unpickle_off_allows_pickles(tmp_path, capsys):
    settings = parse("--data-dir", str(tmp_path))
    assert settings.models_dir == tmp_path / "models" and settings.outputs_dir == tmp_path / "outputs"
    given = parse("--data-dir", str(tmp_path), "--models-dir", str(tmp_path / "m"), "--outputs-dir", "o")
    assert given.models_dir == tmp_path / "m" and given.outputs_dir == Path("o")
    with pytest.raises(SystemExit):
        parse("--data-dir", str(tmp_path / "missing"))
    assert "--data-dir" in capsys.readouterr().err
    assert parse("--disable-safe-unpickle").allow_pickle and not parse().allow_pickle


def test_nowebui_serves_the_api_alone_on_7861(engine, capsys):
    settings = parse("--nowebui")
    assert settings.api and not settings.page and settings.port == 7861
    with pytest.raises(SystemExit):
        parse("--nowebui", "--share")
    assert "--nowebui" in capsys.readouterr().err
    handle = launch(engine, parse("--nowebui", "--port", "0"))
    try:
        assert httpx.get(handle.url + "sdapi/v1/samplers", timeout=30).status_code == 200
        assert httpx.get(handle.url, timeout=30).status_code == 404  # no page
        generated = httpx.post(handle.url + "sdapi/v1/txt2img", json={"steps": 2}, timeout=60)
        assert generated.status_code == 200 and generated.json()["images"]
    finally:
        handle.close()


def test_cors_origins_let_those_pages_call_the_api_from_a_browser(engine, capsys):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    settings = parse(
        "--api", "--port", "0", "--cors-allow-origins", "http://paint.example, http://localhost:3456",
        "--cors-allow-origins-regex", r"https://.*\.tools\.example",
    )  # fmt: skip
    assert settings.cors_allow_origins == ("http://paint.example", "http://localhost:3456")
    handle = launch(engine, settings)
    try:
        url = handle.url + "sdapi/v1/txt2img"
        for origin in ("http://localhost:3456", "https://draw.tools.example"):
            answer = httpx.options(url, headers={"Origin": origin, **preflight}, timeout=30)
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        elsewhere = httpx.get(handle.url + "sdapi/v1/samplers", headers={"Origin": "http://other.example"}, timeout=30)
        assert elsewhere.status_code == 200 and "access-control-allow-origin" not in elsewhere.headers
    finally:
        handle.close()
    handle = launch(engine, parse("--api", "--port", "0"))  # without the flags no page elsewhere may call it
    try:
        answer = httpx.get(handle.url + "sdapi/v1/samplers", headers={"Origin": "http://localhost:3456"}, timeout=30)
        assert "access-control-allow-origin" not in answer.headers
    finally:
        handle.close()
    with pytest.raises(SystemExit):
        parse("--cors-allow-origins-regex", "(unclosed")
    assert "--cors-allow-origins-regex" in capsys.readouterr().err


# A self-signed certificate for localhost and 127.0.0.1 (valid for a century), made for these tests only.
TLS_DIR = PROJECT_DIR / "tests" / "data" / "tls"


def test_tls_flags_serve_https(engine, capsys):
    tls = ("--tls-certfile", str(TLS_DIR / "localhost.crt"), "--tls-keyfile", str(TLS_DIR / "localhost.key"))
    handle = launch(engine, parse("--api", "--port", "0", *tls))
    try:
        assert handle.url.startswith("https://127.0.0.1:")
        assert httpx.get(handle.url + "sdapi/v1/samplers", verify=False, timeout=30).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(handle.url.replace("https://", "http://") + "sdapi/v1/samplers", timeout=30)
    finally:
        handle.close()
    for bad, said in (
        (tls[:2], "go together"),
        ((*tls, "--share"), "--share"),
        (("--tls-certfile", "missing.crt", "--tls-keyfile", "missing.key"), "no such file"),
    ):
        with pytest.raises(SystemExit):
            parse(*bad)
        assert said in capsys.readouterr().err


def test_loglevel_sets_the_logs_level(monkeypatch):
    import app

    assert parse("--loglevel", "debug").loglevel == "DEBUG" and parse().loglevel is None
    configured = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **options: configured.update(options))
    app.configure_logging("WARNING")
    assert configured["level"] == "WARNING"
    monkeypatch.setenv("LOG_LEVEL", "error")
    app.configure_logging(None)
    assert configured["level"] == "ERROR"


def test_autolaunch_opens_the_page_in_a_browser(engine, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    handle = launch(engine, parse("--autolaunch", "--port", "0", "--no-save"))
    try:
        deadline = time.monotonic() + 10
        while not opened and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened == [handle.url]
    finally:
        handle.close()
    launch(engine, parse("--port", "0", "--no-save")).close()
    time.sleep(0.5)
    assert len(opened) == 1  # without the flag no browser opens


# Logins ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(engine, tmp_path_factory):
    settings = ServerSettings(
        host="127.0.0.1", port=0, api=True, auth=(("ann", "pw"),), outputs_dir=tmp_path_factory.mktemp("out")
    )
    handle = launch(engine, settings)
    yield handle
    handle.close()


def test_api_needs_the_login_when_auth_is_set(guarded):
    url = guarded.url + "sdapi/v1/sd-models"
    response = httpx.get(url, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(url, auth=("ann", "wrong"), timeout=30).status_code == 401
    assert httpx.get(url, auth=("bob", "pw"), timeout=30).status_code == 401
    assert httpx.get(url, auth=("ann", "pw"), timeout=30).status_code == 200
    generate = httpx.post(guarded.url + "sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64}, timeout=60)
    assert generate.status_code == 401


def test_page_needs_the_login_when_auth_is_set(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        assert client.get("config").status_code == 401
        assert client.post("login", data={"username": "ann", "password": "wrong"}).status_code == 400
        assert client.post("login", data={"username": "ann", "password": "pw"}).status_code == 200
        assert client.get("config").status_code == 200


def test_api_auth_is_separate_from_the_page_login(engine):
    settings = ServerSettings(port=0, api=True, auth=(("ann", "pw"),), api_auth=(("bot", "key"),))
    handle = launch(engine, settings)
    try:
        url = handle.url + "sdapi/v1/samplers"
        assert httpx.get(url, auth=("bot", "key"), timeout=30).status_code == 200
        assert httpx.get(url, auth=("ann", "pw"), timeout=30).status_code == 401
    finally:
        handle.close()


def test_without_api_flag_there_is_no_rest_api(engine):
    handle = launch(engine, ServerSettings(port=0))
    try:
        assert httpx.get(handle.url + "sdapi/v1/samplers", timeout=30).status_code == 404
        assert httpx.get(handle.url, timeout=30).status_code == 200
    finally:
        handle.close()


# Share link offline ------------------------------------------------------------------------------


def test_share_offline_fails_clearly_and_the_local_server_keeps_serving(engine, caplog, monkeypatch):
    from gradio import networking

    # Stand-in for "no internet": the share server's address refuses connections at once.
    monkeypatch.setattr(networking, "GRADIO_API_SERVER", f"http://127.0.0.1:{free_port()}/v3/tunnel-request")
    caplog.set_level(logging.INFO, logger="ui.server")
    handle = launch(engine, ServerSettings(port=0, api=True, share=True))
    try:
        assert handle.wait_for_share(timeout=60) is None
        assert handle.share_error
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("Could not create a share link" in m and "keeps running" in m for m in errors)
        assert any("public share link" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert httpx.get(handle.url, timeout=30).status_code == 200
        response = httpx.post(handle.url + "sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64}, timeout=60)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
    finally:
        handle.close()


# Ports -----------------------------------------------------------------------------------------


def test_taken_port_is_an_error_when_asked_for_and_skipped_otherwise():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="--port"):
            bind_socket("127.0.0.1", port)
        sock = bind_socket("127.0.0.1", port, search=True)
        try:
            assert sock.getsockname()[1] > port
        finally:
            sock.close()


# app.py itself, started as Hugging Face Spaces start it ---------------------------------------


# Ctrl+C at a terminal; SIGTERM from docker stop or a Space restarting. Both close the server gracefully.
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_app_py_starts_with_no_arguments_like_a_space_and_stops_cleanly(models_dir, tmp_path, stop_signal):
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # If it ever hangs on Ctrl+C, SIGABRT makes it write every thread's stack into the log.
        "PYTHONFAULTHANDLER": "1",
    }
    log_path = tmp_path / "app.log"
    # The test presses Ctrl+C as at a terminal. A shell starts background jobs with SIGINT ignored,
    # a child inherits that, and Python then never raises KeyboardInterrupt; a handler set here is
    # reset to the default in the child instead, however the tests themselves were started.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    # --models-dir only so the test reuses the session's tiny model instead of building one in ./models.
    try:
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "app.py", "--models-dir", str(models_dir), "--disable-console-progressbars"],
                cwd=PROJECT_DIR,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        output = log_path.read_text()
        assert process.poll() is None, output
        assert f"Running on http://127.0.0.1:{port}/" in output, output
        assert "micro-shapes" in output  # the embedded default
        assert "torchvision" not in output, output  # no advice to install what the program does not use
        assert "Loading pipeline components" not in output, output  # --disable-console-progressbars
    finally:
        process.send_signal(stop_signal)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            time.sleep(5)
            process.kill()
            pytest.fail(f"app.py did not stop within 60 s of {stop_signal.name}; its threads:\n" + log_path.read_text())
    output = log_path.read_text()
    assert code == 0, output
    assert "Stopping" in output, output  # it closed the server rather than dying


def test_app_main_reports_a_model_that_cannot_be_loaded(models_dir, caplog):
    import app

    caplog.set_level(logging.ERROR)
    assert app.main(["--model", "no-such-model", "--models-dir", str(models_dir)]) == 1
    assert "Could not start" in caplog.text and "no-such-model" in caplog.text
