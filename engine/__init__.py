"""nasweb engine: pure PyTorch implementation of H-Meta-NAS and MetaNAS.

This package must never import Django, Celery or Channels: the web layer calls
into it, never the other way round (tests/test_engine_isolation.py checks it).
"""

__version__ = "0.1.0"
