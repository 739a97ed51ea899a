"""Precision variants and the on-disk form of a graph (embedded weights or one external data file).

fp32 and fp16 come straight from tracing (fp16 traces the half-precision model, so norms and the softmax keep
transformers' float32 upcasts). int8 is onnxruntime's dynamic quantization of the fp32 graph: int8 weights per
output channel for every MatMul with a constant weight (projections and lm_head); activations are quantized at
run time. The rotate_half matrix stays float: quantizing the activation side of RoPE would add error for no speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tyr.errors import TyrError

DTYPES: tuple[str, ...] = ("fp32", "fp16", "int8")
# Protobuf cannot serialize a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 2**30)


def save_graph(model, path: Path, external_data: bool) -> str | None:
    """Write ``model`` to ``path``; with ``external_data`` all weights go into one ``<name>.data`` file beside it.

    Returns the data file's name (or None). torch's exporter writes one file per tensor for models over 2 GiB;
    this repacks them into a single file.
    """
    import onnx

    if external_data:
        location = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024, convert_attribute=False)
        return location
    if model.ByteSize() >= 2**31:
        raise TyrError(f"the graph is {model.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB limit: "
                       "save it with external data")
    onnx.save_model(model, str(path))
    return None


def rotation_matmuls(model) -> list[str]:
    """Names of the MatMul nodes that apply rotate_half: the tracer inlines that matrix as a Constant node, while
    projection weights are initializers."""
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in constants]


def quantize_int8(src: Path, dst: Path, external_data: bool) -> None:
    """Dynamic int8 quantization of the fp32 graph at ``src`` into ``dst``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False)
    exclude = rotation_matmuls(graph)
    del graph
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor it skips through the root logger
    # reduce_range: 7-bit weights, so that onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2's
    # VPMADDUBSW sums pairs into saturating int16) give the same products as with it; the graph runs on whichever
    # CPU the user deploys to, not the one that exported it.
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    if not dst.is_file():
        raise TyrError(f"onnxruntime's quantize_dynamic wrote nothing to {dst}")


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
