"""What an ONNX file says about itself: its opset and the arithmetic one input costs.

Reading the graph needs the `onnx` package (a development dependency); onnxruntime alone
exposes names, shapes and types but not the opset or the operators' weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _onnx():  # noqa: ANN202 - the module
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("reading the ONNX graph needs the onnx package: .venv/bin/pip install "
                          "-r requirements-dev.lock (or pip install onnx)") from exc
    return onnx


def opsets(path: Path) -> dict[str, int]:
    """{domain: version} the file imports; the default domain ("ai.onnx") is the opset."""
    model = _onnx().load(str(path), load_external_data=False)
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


def flops_per_item(path: Path) -> dict[str, Any]:
    """Multiply-adds x 2 of one batch item through Conv, Gemm and MatMul nodes (the layers that
    dominate a CNN; elementwise ops are left out and named as such). Shapes come from ONNX
    shape inference with the batch axis set to 1."""
    onnx = _onnx()
    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    counted: dict[str, float] = {}
    unknown = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        weight = shapes.get(node.input[1])
        if not out or not weight or -1 in out or -1 in weight:
            unknown.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":
            flops = 2.0 * float(np.prod(out)) * float(np.prod(weight[1:]))
        elif node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = weight[1] if trans_b else weight[0]
            flops = 2.0 * float(np.prod(out)) * k
        else:
            flops = 2.0 * float(np.prod(out)) * weight[-2]
        counted[node.op_type] = counted.get(node.op_type, 0.0) + flops
    return {"flops": sum(counted.values()), "by_op": counted, "nodes_not_counted": unknown,
            "parameters": int(sum(np.prod(init.dims) for init in model.graph.initializer)),
            "left_out": "elementwise ops (ReLU, Add, pooling, normalisation)"}
