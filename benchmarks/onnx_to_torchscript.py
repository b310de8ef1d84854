"""Rebuild a sequential ONNX CNN (tumor_wsi) in torch and save it as TorchScript, for WSInfer.

No retraining: the network is rebuilt node by node from the ONNX graph (Conv with its folded
batch norm, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm) and the initializers are copied.
Runs in the benchmark venv (.wsinfer-venv, which has torch and onnx), never in the product's:

    .wsinfer-venv/bin/python benchmarks/onnx_to_torchscript.py MODEL.onnx OUT.pt \
        [--check-input X.npy --check-output Y.npy]

With --check-input, the TorchScript model's outputs on X are saved to Y so the caller can
compare them with onnxruntime.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def rebuild(model: onnx.ModelProto) -> nn.Sequential:
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    layers: list[nn.Module] = []
    previous = model.graph.input[0].name
    for node in model.graph.node:
        if node.input[0] != previous:
            raise ValueError(f"{node.op_type} {node.name}: the graph is not a plain chain of layers")
        previous = node.output[0]
        a = _attrs(node)
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            pads = a.get("pads", [0, 0, 0, 0])
            if a.get("group", 1) != 1 or pads[:2] != pads[2:]:
                raise ValueError(f"Conv {node.name}: groups or asymmetric pads are not supported")
            conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), tuple(a.get("strides", [1, 1])),
                             tuple(pads[:2]), tuple(a.get("dilations", [1, 1])), bias=len(node.input) > 2)
            conv.weight.data.copy_(w)
            if conv.bias is not None:
                conv.bias.data.copy_(weights[node.input[2]])
            layers.append(conv)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        elif node.op_type == "MaxPool":
            pads = a.get("pads", [0, 0, 0, 0])
            layers.append(nn.MaxPool2d(tuple(a["kernel_shape"]), tuple(a.get("strides", a["kernel_shape"])),
                                       tuple(pads[:2]), ceil_mode=bool(a.get("ceil_mode", 0))))
        elif node.op_type == "GlobalAveragePool":
            layers.append(nn.AdaptiveAvgPool2d(1))
        elif node.op_type == "Flatten":
            layers.append(nn.Flatten(a.get("axis", 1)))
        elif node.op_type == "Gemm":
            w = weights[node.input[1]]
            if not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise ValueError(f"Gemm {node.name}: only y = x W^T + b is supported")
            fc = nn.Linear(w.shape[1], w.shape[0])
            fc.weight.data.copy_(w)
            fc.bias.data.copy_(weights[node.input[2]])
            layers.append(fc)
        else:
            raise ValueError(f"ONNX op {node.op_type} ({node.name}) is not supported by this converter")
    return nn.Sequential(*layers).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx_model")
    ap.add_argument("out")
    ap.add_argument("--check-input")
    ap.add_argument("--check-output")
    args = ap.parse_args()
    net = rebuild(onnx.load(args.onnx_model))
    scripted = torch.jit.script(net)
    scripted.save(args.out)
    if args.check_input:
        x = torch.from_numpy(np.load(args.check_input))
        with torch.no_grad():
            y = torch.jit.load(args.out)(x).numpy()
        np.save(args.check_output, y)
    print(f"saved {args.out}: {len(net)} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
