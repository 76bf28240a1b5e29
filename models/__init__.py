"""torch + TorchRec: batches, shared blocks, input encoders, rankers, training, registry."""

import logging as _logging

# fbgemm_gpu (imported by torchrec) calls logging.basicConfig(level=DEBUG) at import time,
# which hijacks the root logger (Prefect's console formatting, DEBUG noise from every
# library). Import it once here and put the root logger back as it was.
_root = _logging.getLogger()
_handlers, _level = list(_root.handlers), _root.level
import torchrec as _torchrec  # noqa: E402, F401

_root.handlers[:] = _handlers
_root.setLevel(_level)
