"""The plain moegpt model (no torch.distributed here; parallelism is applied from outside)."""

from moegpt.model.model import MoEGPT, ModelOutput, build_model, compute_weight

__all__ = ["MoEGPT", "ModelOutput", "build_model", "compute_weight"]
