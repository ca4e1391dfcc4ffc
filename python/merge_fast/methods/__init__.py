"""Every merge method, on arrays or model folders. One module per family; all of them
call :func:`merge`."""
from ._dispatch import merge
from .basic import *  # noqa: F401,F403
from .basic import __all__ as _basic
from .data_aware import *  # noqa: F401,F403
from .data_aware import __all__ as _data_aware
from .geometric import *  # noqa: F401,F403
from .geometric import __all__ as _geometric
from .sparsified import *  # noqa: F401,F403
from .sparsified import __all__ as _sparsified
from .spectral import *  # noqa: F401,F403
from .spectral import __all__ as _spectral

__all__ = ["merge", *_basic, *_sparsified, *_geometric, *_data_aware, *_spectral]
