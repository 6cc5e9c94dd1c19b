"""edgegen.export: Gemma 4 target + assistant pair -> verified ONNX bundle.

Imports torch and transformers; the runtime (`edgegen.runtime`) never does.
"""

from edgegen.export.compat import apply_transformers_shims

apply_transformers_shims()
