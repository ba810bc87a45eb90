"""hooked_mlx: TransformerLens-style hooked transformers on MLX.

Importing this package first on Linux loads an optimised BLAS before ``mlx.core`` (see ``_blas``).
"""

from . import _blas

_blas.load_blas()

from . import hook_points, utils  # noqa: E402
from .cache import ActivationCache  # noqa: E402
from .config import HookedConfig  # noqa: E402
from .factored_matrix import FactoredMatrix  # noqa: E402
from .hooks import HookedRootModule, HookPoint  # noqa: E402
from .model import HookedTransformer  # noqa: E402
from .names import get_act_name  # noqa: E402

__version__ = "0.1.0"

__all__ = ["HookedTransformer", "HookedConfig", "HookPoint", "HookedRootModule", "ActivationCache",
           "FactoredMatrix", "get_act_name", "hook_points", "utils", "__version__"]
