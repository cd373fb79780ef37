"""The package version, and the version of the adapter format it writes.

Format 1: caprese_config.json held the CapreseConfig fields and the weights' sha256.
Format 2: it also records `format`, `caprese_version` and `trained` (what produced the
weights, e.g. the distillation stage); format 1 adapters still load.
"""

__version__ = "0.2.0"
ADAPTER_FORMAT = 2
