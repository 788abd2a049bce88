"""lightning-fl: federated segmentation from partially labelled sites with conditional distillation (ConDistFL)."""

__version__ = "0.1.0"
