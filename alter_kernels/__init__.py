"""ALTER ops: entropy, inverted hinge loss, routing and the grouped AsymLoRA matmuls.

Every op takes ``backend=None | "eager" | "triton" | "cpp"`` (see ``_dispatch``).
"""
from alter_kernels._dispatch import BACKENDS, BackendUnavailable, available_backends
from alter_kernels.asym_lora import asym_lora
from alter_kernels.entropy import fused_linear_entropy, tsallis_entropy
from alter_kernels.gated_asym_lora import gated_asym_lora
from alter_kernels.ihl import inverted_hinge_loss
from alter_kernels.routing import moe_align, route
from alter_kernels.token_losses import token_losses

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "asym_lora",
    "fused_linear_entropy",
    "gated_asym_lora",
    "inverted_hinge_loss",
    "moe_align",
    "route",
    "token_losses",
    "tsallis_entropy",
]
__version__ = "0.1.0"
