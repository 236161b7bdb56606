"""What ``train/run.py`` does with a command line before Hydra runs it, with cheap imports only.

Hydra and the config schema import in a fraction of a second; the training pipeline (torch, torchvision,
timm, scikit-learn, TensorBoard) takes several seconds more. ``train/run.py`` calls :func:`accept_command_line`
before the pipeline is imported, so that a typo, a wrong type or an out-of-range value is one line within about
a second (``benchmarks/config_error.py`` measures it), and so that nothing is created or written for a command
that is refused: the run folder is made, checked writable and locked only after the config passed every check.
"""
from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR
from scoring.errors import fail
from train.config import ConfigError, validate
from train.rundir import prepare_run_dir



def describe_composition_error(err: Exception) -> str:
    """Hydra's multi-line composition message (and its omegaconf cause) as one line with a fix."""
    text = str(err).split("Config search path")[0]
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


def _known_models(name: str) -> list[str]:
    """Registered model names. A name with its own ``conf/model/<name>.yaml`` is known without importing the
    registry (seconds of imports): every such file names a registered model, which a test checks."""
    if (CONF_DIR / "model" / f"{name}.yaml").is_file():
        return [name]
    import models

    return models.list_models()


def accept_command_line(argv: list[str]) -> None:
    """Compose and validate the overrides ``argv``, then create, check and lock the run folder; on any problem
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
        validate(cfg, _known_models(cfg.model.name))
        if cfg.smoke:
            from train.smoke import smoke_config

            smoke_config(cfg)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
            prepare_run_dir(run_dir_of(cfg))
    except ConfigError as err:
        fail(str(err))
