"""Write a ResNet-50-sized model folder that fits ich_ct's `ct-slices` input, for benchmarks.

`befund model bench` must work for any ONNX model that fits a task, not only the small
reference CNNs (84 k parameters). This builds ResNet-50's topology (bottleneck blocks
3-4-6-3, widths 256-2048, 23.5 M parameters, about 2.7 GFLOP per 128 x 128 input) with
onnx.helper, with random He-initialised weights (the residual branches scaled down so that
activations stay finite), input `slices` [-1, 9, 128, 128] and one logit, and a card copied
from models/ich_ct (same task, selector and preprocessing; no validated domain or
calibration: it is for timing, its verdicts mean nothing). `--tiny` writes a narrow
one-block-per-stage version for tests.

    .venv/bin/python benchmarks/resnet_model.py --out var/models/resnet50_ct [--tiny]
    .venv/bin/befund model check var/models/resnet50_ct
    .venv/bin/befund model bench var/models/resnet50_ct --batches 1,8,32 --concurrency 1,2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.model_card import load_card, sha256_of  # noqa: E402

OPSET = 17
# (bottleneck width, output width, blocks, stride of the first block) per stage
STAGES_50 = ((64, 256, 3, 1), (128, 512, 4, 2), (256, 1024, 6, 2), (512, 2048, 3, 2))


class _Graph:
    def __init__(self, seed: int):
        self.nodes, self.inits = [], []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
             gain: float = 1.0) -> str:
        from onnx import helper, numpy_helper

        w = self.name("w")
        b = self.name("b")
        std = gain * np.sqrt(2.0 / (cin * k * k))
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32), w))
        self.inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        from onnx import helper

        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def add(self, a: str, b: str) -> str:
        from onnx import helper

        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        return y


def build(tiny: bool = False, seed: int = 0, channels: int = 9, size: int = 128):  # noqa: ANN201 - onnx.ModelProto
    from onnx import TensorProto, checker, helper, numpy_helper

    scale, stages = (8, tuple((m, o, 1, s) for m, o, _, s in STAGES_50)) if tiny else (1, STAGES_50)
    g = _Graph(seed)
    x = g.conv("slices", channels, 64 // scale, 7, stride=2)
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1] * 4))
    x, cin = pooled, 64 // scale
    for mid, out, blocks, stride in stages:
        mid, out = mid // scale, out // scale
        for i in range(blocks):
            s = stride if i == 0 else 1
            shortcut = g.conv(x, cin, out, 1, stride=s, relu=False) if i == 0 else x
            y = g.conv(x, cin, mid, 1)
            y = g.conv(y, mid, mid, 3, stride=s)
            y = g.conv(y, mid, out, 1, relu=False, gain=0.2)  # a small residual branch keeps sums finite
            x, cin = g.relu(g.add(shortcut, y)), out
    gap, flat = g.name("gap"), g.name("flat")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    g.nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    fc = (g.rng.standard_normal((1, cin)) * 0.01).astype(np.float32)
    g.inits.append(numpy_helper.from_array(fc, "fc_w"))
    g.inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "fc_b"))
    g.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        g.nodes, "resnet50_ct" if not tiny else "resnet_tiny_ct",
        [helper.make_tensor_value_info("slices", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="befund")
    model.ir_version = 8
    checker.check_model(model)
    return model


def write_model_folder(out: Path, tiny: bool = False) -> Path:
    """model.onnx + card.yaml (ich_ct's card with this name, file, sha256 and opset)."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    reference = load_card(ROOT / "models" / "ich_ct")
    model = build(tiny, channels=reference.input.shape[1], size=reference.input.shape[2])
    onnx.save(model, str(out / "model.onnx"))
    card = yaml.safe_load((ROOT / "models" / "ich_ct" / "card.yaml").read_text())
    for key in ("validated_domain", "calibration", "validation"):
        card.pop(key, None)
    name = "resnet_tiny_ct" if tiny else "resnet50_ct"
    card.update({
        "name": name, "version": "0.0.1", "file": "model.onnx", "opset": OPSET,
        "sha256": sha256_of(out / "model.onnx"),
        "description": f"{'A narrow one-block-per-stage' if tiny else 'A ResNet-50-sized'} network "
                       "with random weights for benchmarks (benchmarks/resnet_model.py); its "
                       "verdicts mean nothing.",
        "intended_use": "Benchmarking befund model bench only. Random weights; never for any diagnosis.",
    })
    (out / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
    load_card(out)  # the folder is a valid model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--tiny", action="store_true", help="a narrow, shallow version (tests)")
    args = ap.parse_args()
    folder = write_model_folder(Path(args.out), args.tiny)
    size_mb = (folder / "model.onnx").stat().st_size / 1e6
    print(f"wrote {folder / 'model.onnx'} ({size_mb:.1f} MB) and card.yaml")


if __name__ == "__main__":
    main()
