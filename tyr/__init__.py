"""tyr: deployment-focused structural pruning of LLMs (Týr-the-Pruner) with vLLM and ONNX exports."""

from tyr.models import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"
