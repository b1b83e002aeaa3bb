"""Log-linear attention: the op, its backends, and its recurrent state.

``naive.py`` is the O(T²) definition, ``chunked.py`` the O(T log T) torch path, ``recurrent.py``
the one-token step for decoding, ``state.py`` the level arithmetic, state and input checks.
"""

from .api import BACKENDS, log_linear_attn, resolve_backend
from .chunked import chunked_log_linear_attn
from .naive import naive_log_linear_attn
from .recurrent import log_linear_step
from .state import LogLinearState, num_levels

__all__ = [
    "BACKENDS",
    "LogLinearState",
    "chunked_log_linear_attn",
    "log_linear_attn",
    "log_linear_step",
    "naive_log_linear_attn",
    "num_levels",
    "resolve_backend",
]
