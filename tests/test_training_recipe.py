"""Training recipes: train_micro's stages chained by one command that resumes where it stopped."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from training import run_recipe, train_micro


@pytest.mark.parametrize("name", ["budget", "budget-own-vae", "shipped"])
def test_every_stage_of_the_shipped_recipes_is_a_valid_training_command(name):
    stages = run_recipe.load_recipe(run_recipe.recipe_path(name))
    for number in range(1, len(stages) + 1):
        command = run_recipe.stage_command(stages, number, train_micro.DEFAULT_WORK, train_micro.DEFAULT_OUT)
        assert command[1:3] == ["-m", "training.train_micro"]
        args = train_micro.parse_args(command[3:])
        # Each stage after the first starts from the model the stage before it exported.
        if number > 1:
            assert args.init_from.parent.name.startswith(f"{number - 1}-")
    assert args.out == train_micro.DEFAULT_OUT


def test_a_recipe_that_sets_what_the_runner_sets_is_refused_by_stage_and_flag(tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"stages": [{"name": "a", "flags": []}, {"name": "b", "flags": ["--vae-from=x"]}]}))
    with pytest.raises(SystemExit, match=r"stage 2 \(b\) sets --vae-from"):
        run_recipe.load_recipe(recipe)
    recipe.write_text(json.dumps({"stages": [{"name": "a", "flags": ["--out=x"]}]}))
    with pytest.raises(SystemExit, match=r"stage 1 \(a\) sets --out"):
        run_recipe.load_recipe(recipe)
    recipe.write_text(json.dumps({"stages": [{"name": "a", "flags": ["--max-minutes=5"]}]}))
    with pytest.raises(SystemExit, match=r"stage 1 \(a\) sets --max-minutes"):
        run_recipe.load_recipe(recipe)
    # A value as an item of its own would pass for a flag when a rerun compares the stage's flags.
    recipe.write_text(json.dumps({"stages": [{"name": "a", "flags": ["--eval-every", "1200"]}]}))
    with pytest.raises(SystemExit, match=r"stage 1 \(a\) has the flag '1200'; allowed: .*\"--unet-steps=6000\""):
        run_recipe.load_recipe(recipe)
    with pytest.raises(SystemExit, match="got 'nope'; allowed: a JSON file, or one of budget, budget-own-vae, shipped"):
        run_recipe.recipe_path("nope")
    for text in ('{"stages": [{"name": "a"}]}', "[1, 2]", "not json"):
        recipe.write_text(text)
        with pytest.raises(SystemExit, match="bad.json: not a recipe .*allowed: JSON of the form"):
            run_recipe.load_recipe(recipe)


def test_latents_are_read_back_only_when_the_same_encoder_made_them(tmp_path, monkeypatch):
    vae = train_micro.load_vae(train_micro.DEFAULT_OUT)
    _, images = train_micro.training_pictures(4, seed=0)
    first = train_micro.encode_latents(vae, images, tmp_path)
    encoded = []
    real_encode = train_micro.encode_pictures
    monkeypatch.setattr(train_micro, "encode_pictures", lambda *a: encoded.append(1) or real_encode(*a))
    assert torch.equal(train_micro.encode_latents(vae, images, tmp_path), first) and not encoded
    # A decoder change leaves the latents as they were; an encoder change does not.
    with torch.no_grad():
        vae.decoder.conv_out.bias += 1
    train_micro.encode_latents(vae, images, tmp_path)
    assert not encoded
    with torch.no_grad():
        vae.encoder.conv_in.bias += 1
    again = train_micro.encode_latents(vae, images, tmp_path)
    assert encoded and not torch.equal(again, first)
    # Other pictures: encoded again too; and a cache from before the digest (a bare tensor) is not trusted.
    train_micro.encode_latents(vae, images.flip(0), tmp_path)
    assert len(encoded) == 2
    torch.save(first, tmp_path / "latents.pt")
    assert not torch.equal(train_micro.encode_latents(vae, images, tmp_path), first) and len(encoded) == 3


def test_a_recipe_runs_its_stages_in_order_and_a_rerun_skips_the_finished_ones(tmp_path, caplog):
    tiny = ["--images=16", "--batch=4", "--eval-every=1000"]
    recipe = tmp_path / "tiny.json"
    stages = [
        {
            "name": "first",
            "flags": [f"--vae-from={train_micro.DEFAULT_OUT}", "--unet-steps=2", "--low-noise-steps=0", *tiny],
        },
        {"name": "second", "flags": ["--unet-steps=0", "--low-noise-steps=3", "--text-lr=0", *tiny]},
    ]
    recipe.write_text(json.dumps({"stages": stages}))
    work, out = tmp_path / "work", tmp_path / "out"
    caplog.set_level("INFO")
    run_recipe.main([str(recipe), f"--work={work}", f"--out={out}"])

    first, last = train_micro.load_exported(work / "1-first" / "model"), train_micro.load_exported(out)
    first_unet, last_unet = first[1].state_dict(), last[1].state_dict()
    # The second stage started from the first's UNet (three steps move it a little) and froze its text encoder.
    assert 0 < max((first_unet[key] - last_unet[key]).abs().max().item() for key in first_unet) < 0.01
    first_text, last_text = first[2].state_dict(), last[2].state_dict()
    assert all(torch.equal(first_text[key], last_text[key]) for key in first_text)
    # Same VAE, so the second stage read the first's latents back instead of encoding them again.
    second_log = (work / "2-second" / "train.log").read_text()
    assert "encoding again" not in second_log and "Resumed" not in second_log
    assert torch.load(work / "2-second" / "latents.pt")["key"] == torch.load(work / "1-first" / "latents.pt")["key"]
    # The exported folder does not carry the paths of the machine that trained it.
    assert str(tmp_path) not in "".join(path.read_text() for path in out.glob("*/*.json"))

    exported = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    caplog.clear()
    run_recipe.main([str(recipe), f"--work={work}", f"--out={out}"])
    assert "Stage 1/2 first: done before, skipped" in caplog.text
    assert "Stage 2/2 second: done before, skipped" in caplog.text
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == exported
    # Finished, then asked for elsewhere: the last stage's model is written there from its checkpoint.
    run_recipe.main([str(recipe), f"--work={work}", f"--out={tmp_path / 'elsewhere'}"])
    elsewhere_unet = train_micro.load_exported(tmp_path / "elsewhere")[1].state_dict()
    assert all(torch.equal(elsewhere_unet[key], last_unet[key]) for key in last_unet)

    # A finished stage whose flags changed stops the recipe, naming the change, before anything runs;
    # flags that never change the weights (when to check or save) and their order do not count.
    stages[0]["flags"] = [*reversed(stages[0]["flags"][:-1]), "--eval-every=7", "--checkpoint-every=5"]
    recipe.write_text(json.dumps({"stages": stages}))
    caplog.clear()
    run_recipe.main([str(recipe), f"--work={work}", f"--out={out}"])
    assert "Stage 1/2 first: done before, skipped" in caplog.text
    stages[0]["flags"] = [flag.replace("--unet-steps=2", "--unet-steps=3") for flag in stages[0]["flags"]]
    recipe.write_text(json.dumps({"stages": stages}))
    with pytest.raises(
        SystemExit,
        match=r"Stage 1 \(first\) finished with other flags .*: it ran with --unet-steps=2, the recipe now says "
        r"--unet-steps=3\..* delete .*1-first and the stage folders after it",
    ):
        run_recipe.main([str(recipe), f"--work={work}", f"--out={out}"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == exported
    # A stage marked done before the flags were recorded is taken as it is, with a warning.
    (work / "1-first" / "done").write_text("12 s\n")
    caplog.clear()
    run_recipe.main([str(recipe), f"--work={work}", f"--out={out}"])
    assert "its flags were not recorded" in caplog.text and "Stage 2/2 second: done before, skipped" in caplog.text


def test_a_recipe_stopped_by_its_time_budget_exports_nothing_and_the_same_command_finishes_it(tmp_path, caplog):
    recipe = tmp_path / "tiny.json"
    flags = [f"--vae-from={train_micro.DEFAULT_OUT}", "--unet-steps=2", "--low-noise-steps=1", "--images=16"]
    recipe.write_text(json.dumps({"stages": [{"name": "only", "flags": [*flags, "--batch=4", "--eval-every=1000"]}]}))
    work, out = tmp_path / "work", tmp_path / "out"
    command = [str(recipe), f"--work={work}", f"--out={out}"]
    caplog.set_level("INFO")
    # No time left: the stage is not started.
    with pytest.raises(SystemExit) as stopped:
        run_recipe.main([*command, "--max-minutes=0"])
    assert stopped.value.code == train_micro.STOPPED_FOR_TIME and not work.exists()
    assert "reached before stage 1/1 only: run the same command again" in caplog.text
    # A quarter of a second: the stage starts and its budget runs out while it loads, before its first step.
    with pytest.raises(SystemExit) as stopped:
        run_recipe.main([*command, "--max-minutes=0.004"])
    assert stopped.value.code == train_micro.STOPPED_FOR_TIME
    assert "Time budget reached at step 0 of 3" in (work / "1-only" / "train.log").read_text()
    assert (work / "1-only" / "checkpoint.pt").is_file()
    assert not (work / "1-only" / "done").exists() and not out.exists()
    caplog.clear()
    run_recipe.main(command)
    assert "Resumed at step 0" in (work / "1-only" / "train.log").read_text()
    assert (work / "1-only" / "done").is_file() and torch.load(work / "1-only" / "checkpoint.pt")["step"] == 3
    assert train_micro.load_exported(out)[1] is not None


def test_a_training_run_stopped_by_its_time_budget_carries_on_to_the_weights_of_one_that_was_not(tmp_path):
    flags = [f"--vae-from={train_micro.DEFAULT_OUT}", "--unet-steps=2", "--low-noise-steps=1", "--images=16"]
    flags += ["--batch=4", "--eval-every=1000"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_micro.main([*flags, f"--work={straight}", f"--out={straight / 'model'}"])
    with pytest.raises(SystemExit) as exit_status:
        train_micro.main([*flags, f"--work={stopped}", f"--out={stopped / 'model'}", "--max-minutes=0"])
    assert exit_status.value.code == train_micro.STOPPED_FOR_TIME and not (stopped / "model").exists()
    train_micro.main([*flags, f"--work={stopped}", f"--out={stopped / 'model'}"])
    first, second = (train_micro.load_exported(folder / "model")[1].state_dict() for folder in (straight, stopped))
    assert all(torch.equal(first[key], second[key]) for key in first)
    with pytest.raises(SystemExit) as refused:
        train_micro.parse_args(["--max-minutes=-1"])
    assert refused.value.code == 2


def test_a_stage_train_micro_would_refuse_stops_the_recipe_before_anything_runs(tmp_path, capsys):
    recipe = tmp_path / "late-mistake.json"
    stages = [{"name": "fine", "flags": ["--unet-steps=2"]}, {"name": "broken", "flags": ["--shape-balance=2"]}]
    recipe.write_text(json.dumps({"stages": stages}))
    with pytest.raises(SystemExit, match=r"Stage 2 \(broken\): train_micro refuses its command line .*nothing was run"):
        run_recipe.main([str(recipe), f"--work={tmp_path / 'work'}", f"--out={tmp_path / 'out'}", "--dry-run"])
    assert "--shape-balance must be between 0 and 1, not 2.0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_a_failing_stage_stops_the_recipe_and_says_where_its_log_is(tmp_path):
    recipe = tmp_path / "failing.json"
    missing = tmp_path / "no-such-model"
    recipe.write_text(json.dumps({"stages": [{"name": "broken", "flags": [f"--vae-from={missing}"]}]}))
    with pytest.raises(SystemExit, match=r"Stage 1 \(broken\) failed with exit status 1; its log is .*train.log"):
        run_recipe.main([str(recipe), f"--work={tmp_path / 'work'}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "work" / "1-broken" / "done").exists()


def test_dry_run_prints_each_stage_command(tmp_path, capsys):
    run_recipe.main(["budget", "--dry-run", f"--work={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert f"--init-from={tmp_path / '1-main' / 'model'}" in shlex.split(lines[1])
