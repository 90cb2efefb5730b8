"""Memory savers: what lets a model train in the memory a user has.

Entry points: `checkpointing.GradientCheckpointing` (per-block recompute), `offload.BlockOffloader`
(weights to the CPU between blocks), `device_memory.activation_budget`, `quantized.require_bypass_for_quantized`,
`autograd_safety.AutogradSafety` (train through model code that writes in place).
"""
