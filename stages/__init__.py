"""The pipeline's stages, one module each; importing this package registers them all."""
from . import (calibrate, clean_state_dict, convert, load_checkpoint, lower, quantize,  # noqa: F401
               size_audit, verify, wrap)
