"""Which onnxruntime provider a `--provider` name means, and why it cannot run here.

An ML engineer who asks for CUDA on a machine without it must hear so at once, with what is
missing, not get CPU figures labelled as GPU ones (the node itself falls back to CPU with a
warning, service/onnx_sessions.py; a benchmark must not).
"""

from __future__ import annotations

from service.model_tools.provenance import gpus

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_problem(provider: str) -> str:
    """Why `provider` cannot run here ('' when it can): named, with what to install."""
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    if wanted in ort.get_available_providers():
        return ""
    found = gpus()
    if found:
        return (f"--provider {provider}: a GPU is present ({found[0]}), but onnxruntime "
                f"{ort.__version__} has no {wanted} (it has {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu in place of onnxruntime")
    return (f"--provider {provider}: no GPU here (nvidia-smi finds none) and onnxruntime "
            f"{ort.__version__} has no {wanted}; run with --provider cpu, or on a machine with an NVIDIA "
            "GPU, its driver and onnxruntime-gpu")
