"""The config room (torch-free): ``trainer/config.py`` moved to ``schema.py`` whole; the next commit
splits it along its concerns and lists the re-exports."""

from trainer.config.schema import *  # noqa: F403
from trainer.config.schema import _all_keys  # noqa: F401
