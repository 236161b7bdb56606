"""What ``train/run.py`` does with a command line before Hydra runs it, with cheap imports first.

Hydra and the config schema import in a fraction of a second; the training pipeline (torch, torchvision,
timm, scikit-learn, TensorBoard) takes several seconds more. ``train/run.py`` calls :func:`accept_command_line`
before the pipeline is imported, so that a typo, a key the config does not have, a wrong type or an out-of-range
value is one line within about a second (``benchmarks/config_error.py`` measures it). A command that passes those
checks then has its model, compress stages and ``init=`` path checked without data (train/upfront.py, which imports
torch and the models). Nothing is created or written for a command that is refused: the run folder is made,
checked writable and locked only after the config passed every check.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR
from scoring.errors import UserError, fail
from train.config import check_added_keys, closest_key, unknown_key_fix, validate
from train.rundir import fail_on_write_problem, prepare_run_dir

#: Hydra's message for an override of a key the config does not have; it suggests adding the key with ``+``,
#: which only an open dictionary (``model.kwargs``, compress stages) would read.
_NOT_A_KEY = re.compile(r"Could not override '([^']+)'\.\s*To append to your config use \+\S+?=(\S*)")


def describe_composition_error(err: Exception) -> str:
    """Hydra's multi-line composition message (and its omegaconf cause) as one line with a fix."""
    text = str(err).split("Config search path")[0]
    unknown = _NOT_A_KEY.search(text)
    near = closest_key(unknown.group(1)) if unknown else None
    if near is not None:
        return f"{unknown.group(1)} is not a key of the config ; fix: {unknown_key_fix(near, unknown.group(2))}"
    cause = err.__cause__
    if cause is not None:
        detail = str(cause).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in detail if "full_key:" in line), None)
        text += f": {detail[0]}" + (f" (key {key})" if key else "")
    fix = ("pick one of the available options listed" if "Available options" in text else
           "correct the override; `python train/run.py --help` lists groups and conf/*.yaml documents each key")
    return f"{text} ; fix: {fix}"


def run_dir_of(cfg: DictConfig) -> Path:
    """The folder Hydra will run ``cfg`` (composed with its ``hydra`` node) in."""
    HydraConfig.instance().set_config(cfg)  # what `${hydra:...}` in hydra.run.dir reads, as Hydra sets it
    return Path(OmegaConf.select(cfg, "hydra.run.dir"))


def job_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` as Hydra hands it to a job: without its ``hydra`` node (whose interpolations resolve only
    inside a Hydra run)."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    return job


def _known_models(name: str) -> list[str]:
    """Registered model names. A name with its own ``conf/model/<name>.yaml`` is known without importing the
    registry (seconds of imports): every such file names a registered model, which a test checks."""
    if (CONF_DIR / "model" / f"{name}.yaml").is_file():
        return [name]
    import models

    return models.list_models()


def accept_command_line(argv: list[str]) -> None:
    """Compose and check the overrides ``argv``, then create, check and lock the run folder; on any problem
    print one line and exit with status 2. Command lines with flags (``--multirun``, ``--cfg``, ``--help``) are
    Hydra's; each of their jobs is checked by the pipeline itself (train/pipeline.py)."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=argv, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        fail(describe_composition_error(err))
    try:
        check_added_keys(argv)
        validate(cfg, _known_models(cfg.model.name))
        # Seconds of imports (torch, models, compress), only for a command that passed the cheap checks.
        from train.smoke import smoke_config
        from train.upfront import check_without_data

        job = job_config(cfg)
        if job.plan:  # a plan loads no teacher: one the recipe leaves unset is listed in the plan, not refused
            from train.plan import unset_teachers
            job, _ = unset_teachers(job)
        check_without_data(smoke_config(job) if job.smoke else job)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
            prepare_run_dir(run_dir_of(cfg))
    except UserError as err:
        fail(str(err))
    except OSError as err:  # a full disk or a read-only one, met before the run folder (torch's temporary files)
        fail_on_write_problem(err)
        raise
