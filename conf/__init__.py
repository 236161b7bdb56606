"""The Hydra config groups (task/, model/, train/, compress/, experiment/, config.yaml), shipped as package data.

:data:`CONF_DIR` is where they are: the one place every command, the kit check and the tests find them.
"""
from pathlib import Path

#: The folder of config.yaml and the config groups.
CONF_DIR = Path(__file__).resolve().parent
