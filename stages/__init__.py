"""The pipeline's stages, one module each; importing this package registers them all."""
from . import (baseline, benchmark, calibrate, clean_state_dict, convert,  # noqa: F401
               load_checkpoint, lower, preprocess, quantize, size_audit, verify, verify_target, wrap)
