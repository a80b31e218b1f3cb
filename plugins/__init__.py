"""tokenmem.plugins: the evictors, one module each (``namm`` is a package). Importing this package registers
every built-in evictor; ``import tokenmem`` does (top-down: the core never imports the plugins)."""

from . import full, h2o, namm, random_keep, recent, separator, sink  # noqa: F401  (registration side effects)
from . import ada, expected_attention, infinipot_v, keydiff, knorm, pyramid, snapkv, tova  # noqa: F401  (the evictor zoo)
from .full import FullEvictor
from .h2o import H2OEvictor
from .namm import NAMM, NAMMConfig
from .random_keep import RandomEvictor
from .recent import RecentEvictor
from .separator import SeparatorEvictor
from .sink import SinkEvictor

__all__ = ["FullEvictor", "H2OEvictor", "NAMM", "NAMMConfig", "RandomEvictor", "RecentEvictor", "SeparatorEvictor", "SinkEvictor"]
