"""Run a training recipe: train_micro's stages one after another, each starting from the model the
stage before it exported, as one command that carries on where it stopped.

    .venv/bin/python -m training.run_recipe budget     # training/recipes/budget.json
    .venv/bin/python -m training.run_recipe shipped --dry-run   # print the stages' commands

A recipe is a JSON file: {"description": ..., "stages": [{"name": ..., "flags": [...]}, ...]}, the
flags those of `python -m training.train_micro`. Every stage gets a work folder of its own under
--work (`<n>-<name>/`, checkpoints and train.log in it); every stage after the first starts with
--init-from the folder the stage before it exported (`<n>-<name>/model/`); the last exports to --out.
A stage that finished is marked by a `done` file in its work folder and skipped when the recipe is
run again, so a stopped recipe resumes at the stage it was in, and that stage at its last checkpoint.
The `done` file records the stage's flags: a stage whose flags have changed since it finished stops
the recipe with the differences, since its weights (and every later stage's) came from the old ones;
delete its folder, and those of the stages after it, to rerun them.

With --max-minutes the recipe stops itself after that long (at the running stage's next UNet step,
checkpointed, exit status 75), so that it can be run a session at a time: the same command carries on.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .train_micro import DEFAULT_OUT, REPO, STOPPED_FOR_TIME, parse_args

log = logging.getLogger("run_recipe")

RECIPES = Path(__file__).resolve().parent / "recipes"
# Set by the runner for each stage; a recipe that sets them would fight it.
RUNNER_FLAGS = ("--work", "--out", "--init-from", "--max-minutes")
# Options that change when a run checks, saves or stops, never the weights it ends on (the tests show
# it for the checks and the stop), so a finished stage whose recipe changes only these still stands.
# (--max-minutes is the runner's now, but a stage may have been recorded with it before.)
WEIGHT_NEUTRAL_OPTIONS = ("--eval-every", "--checkpoint-every", "--max-minutes")


@dataclass(frozen=True)
class Stage:
    name: str
    flags: list[str]


def recipe_names() -> str:
    """The recipes in training/recipes/, by name, as a comma-separated list."""
    return ", ".join(sorted(p.stem for p in RECIPES.glob("*.json")))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RECIPES / f"{name_or_path}.json"
    if not path.is_file():
        raise SystemExit(f"recipe: got {name_or_path!r}; allowed: a JSON file, or one of {recipe_names()}")
    return path


def load_recipe(path: Path) -> list[Stage]:
    """The recipe's stages, refusing flags the runner sets itself and any a later stage cannot take."""
    try:
        stages = [Stage(str(entry["name"]), list(entry["flags"])) for entry in json.loads(path.read_text())["stages"]]
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"{path}: not a recipe ({error!r}); allowed: JSON of the form "
            '{"stages": [{"name": "main", "flags": ["--unet-steps=6000"]}, ...]}'
        ) from error
    if not stages:
        raise SystemExit(f"{path}: stages: got none; allowed: one or more")
    for number, stage in enumerate(stages, 1):
        for flag in stage.flags:
            if not flag.startswith("--"):
                # A value given as an item of its own would be read as a flag when a rerun compares the
                # stage's flags with those it finished with.
                raise SystemExit(
                    f"{path}: stage {number} ({stage.name}) has the flag {flag!r}; allowed: each item an option "
                    'with its value after "=", such as "--unet-steps=6000"'
                )
            option = flag.split("=", 1)[0]
            if option in RUNNER_FLAGS or (number > 1 and option == "--vae-from"):
                raise SystemExit(
                    f"{path}: stage {number} ({stage.name}) sets {option}; allowed: the runner sets --work, "
                    "--out, --init-from and --max-minutes, and only the first stage may set --vae-from"
                )
    return stages


def stage_folder(work: Path, number: int, stage: Stage) -> Path:
    return work / f"{number}-{stage.name}"


def stage_command(stages: list[Stage], number: int, work: Path, out: Path) -> list[str]:
    """train_micro's command line for stage `number` (from 1)."""
    stage = stages[number - 1]
    folder = stage_folder(work, number, stage)
    command = [sys.executable, "-m", "training.train_micro", *stage.flags, f"--work={folder}"]
    if number > 1:
        command.append(f"--init-from={stage_folder(work, number - 1, stages[number - 2]) / 'model'}")
    command.append(f"--out={out if number == len(stages) else folder / 'model'}")
    return command


def check_commands(stages: list[Stage], work: Path, out: Path) -> None:
    """Refuse the recipe, before any stage runs, where train_micro would refuse a stage's command line: a mistake in
    a late stage would otherwise surface only after the hours the stages before it take."""
    for number, stage in enumerate(stages, 1):
        try:
            parse_args(stage_command(stages, number, work, out)[3:])
        except SystemExit as refused:
            # argparse has written its message (the usage and the error) to stderr.
            raise SystemExit(
                f"Stage {number} ({stage.name}): train_micro refuses its command line (the error above); "
                "nothing was run."
            ) from refused


def run(stages: list[Stage], work: Path, out: Path, max_minutes: float | None = None) -> None:
    start = time.time()
    for number, stage in enumerate(stages, 1):
        folder = stage_folder(work, number, stage)
        if (folder / "done").is_file():
            refuse_if_changed(number, stage, folder, len(stages))
            log.info("Stage %d/%d %s: done before, skipped", number, len(stages), stage.name)
            if number == len(stages) and not (out / "model_index.json").is_file():
                # Finished, but exported elsewhere (another --out): write this --out from its checkpoint.
                log.info("Exporting its model to %s", out)
                run_stage(number, stage, folder, [*stage_command(stages, number, work, out), "--export-only"])
            continue
        command = stage_command(stages, number, work, out)
        if max_minutes is not None:
            minutes_left = max_minutes - (time.time() - start) / 60
            if minutes_left <= 0:
                stop_for_time(f"before stage {number}/{len(stages)} {stage.name}")
            command.append(f"--max-minutes={minutes_left:.3f}")
        folder.mkdir(parents=True, exist_ok=True)
        if number > 1:
            # The stage before exported its VAE unchanged, so its latents are usually this stage's too;
            # train_micro checks that they are before it uses them, and encodes again if not.
            previous = stage_folder(work, number - 1, stages[number - 2]) / "latents.pt"
            if previous.is_file() and not (folder / "latents.pt").exists():
                shutil.copyfile(previous, folder / "latents.pt")
        log.info("Stage %d/%d %s: %s", number, len(stages), stage.name, shlex.join(command))
        stage_start = time.time()
        run_stage(number, stage, folder, command)
        (folder / "done").write_text(
            json.dumps({"seconds": round(time.time() - stage_start), "flags": stage.flags}, indent=1) + "\n"
        )
        log.info(
            "Stage %d/%d %s finished in %.1f minutes", number, len(stages), stage.name, (time.time() - stage_start) / 60
        )
    log.info("Recipe finished in %.1f minutes (this run); the model is in %s", (time.time() - start) / 60, out)


def weight_flags(flags: list[str]) -> list[str]:
    return [flag for flag in flags if flag.split("=", 1)[0] not in WEIGHT_NEUTRAL_OPTIONS]


def refuse_if_changed(number: int, stage: Stage, folder: Path, count: int) -> None:
    """Stop if the finished stage in `folder` ran with other flags than the recipe now gives it."""
    try:
        recorded = json.loads((folder / "done").read_text())["flags"]
    except (ValueError, KeyError, TypeError):
        # Marked done before the flags were recorded: nothing to compare with.
        log.warning(
            "Stage %d/%d %s: its flags were not recorded, so a change cannot be seen", number, count, stage.name
        )
        return
    then, now = sorted(weight_flags(recorded)), sorted(weight_flags(stage.flags))
    if then != now:
        gone = [flag for flag in then if flag not in now] or ["nothing"]
        new = [flag for flag in now if flag not in then] or ["nothing"]
        raise SystemExit(
            f"Stage {number} ({stage.name}) finished with other flags than the recipe now gives it: "
            f"it ran with {' '.join(gone)}, the recipe now says {' '.join(new)}. Its weights and every later "
            f"stage's came from the old flags: delete {folder} and the stage folders after it to rerun them "
            "with the new ones, or put the old flags back."
        )


def stop_for_time(where: str) -> None:
    log.info("Time budget (--max-minutes) reached %s: run the same command again to carry on", where)
    raise SystemExit(STOPPED_FOR_TIME)


def run_stage(number: int, stage: Stage, folder: Path, command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, check=False)
    if result.returncode == STOPPED_FOR_TIME:
        stop_for_time(f"in stage {number} ({stage.name}), its checkpoint in {folder}")
    if result.returncode != 0:
        raise SystemExit(
            f"Stage {number} ({stage.name}) failed with exit status {result.returncode}; its log is "
            f"{folder / 'train.log'}. "
            "Run the recipe again to resume it at its last checkpoint."
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a recipe's name in training/recipes/ ({recipe_names()}) or a JSON file")
    parser.add_argument("--work", type=Path, default=None, help="stage folders go here (training/runs/<recipe>)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the last stage exports the model here")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this long in all, at the running stage's next UNet step (checkpointed, exit status 75); "
        "the same command carries on",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands and stop")
    args = parser.parse_args(argv)
    if args.max_minutes is not None and args.max_minutes < 0:
        parser.error(f"--max-minutes must be 0 or more, not {args.max_minutes}")
    path = recipe_path(args.recipe)
    stages = load_recipe(path)
    work = (args.work or REPO / "training" / "runs" / path.stem).resolve()
    out = args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    check_commands(stages, work, out)
    if args.dry_run:
        for number in range(1, len(stages) + 1):
            sys.stdout.write(shlex.join(stage_command(stages, number, work, out)) + "\n")
        return
    run(stages, work, out, args.max_minutes)


if __name__ == "__main__":
    main()
