"""Former home of ``jmed.transforms.params``, kept so that old imports keep working."""

from jmed.transforms.params import *  # noqa: F403
from jmed.transforms.params import __all__  # noqa: F401
