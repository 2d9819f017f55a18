"""Export a trained network to ONNX and write the model card beside it.

The exported file follows the card's contract: input ``image`` float32 ``[N, 1, H, W]``, output
``logits`` float32 ``[N, classes, H, W]``, with batch, height and width dynamic so the runtime
may batch windows of any size the network accepts. The legacy TorchScript-based exporter
(``dynamo=False``) is used because torch 2.13's default dynamo exporter needs onnxscript, and the
legacy one writes a MONAI UNet as one self-contained file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from inference.card import LabelInfo, ModelCard, file_sha256

__all__ = ["OPSET", "compare_with_torch", "export_onnx", "write_card"]

OPSET = 17


def export_onnx(network: torch.nn.Module, path: str | Path, window: Sequence[int], channels: int = 1) -> Path:
    """Write ``network`` (put in eval mode) as an ONNX file and check it with the ONNX checker."""
    import onnx

    path = Path(path)
    network.eval()
    example = torch.zeros(1, channels, *window, dtype=torch.float32)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad():
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dynamic, "logits": dynamic})
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def compare_with_torch(network: torch.nn.Module, path: str | Path, shape: Sequence[int], seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime's and torch's outputs on random input.

    ``shape`` should differ from the export example (another batch size and height) so that the
    dynamic axes are exercised too.
    """
    import onnxruntime as ort

    generator = np.random.default_rng(seed)
    x = generator.standard_normal(tuple(shape)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    network.eval()
    with torch.no_grad():
        torch_out = network(torch.from_numpy(x)).numpy()
    if onnx_out.shape != torch_out.shape:
        raise AssertionError(f"ONNX output {onnx_out.shape} differs from torch's {torch_out.shape}")
    return float(np.abs(onnx_out - torch_out).max())


def write_card(path: str | Path, onnx_path: str | Path, *, name: str, version: str,
               labels: Mapping[int, LabelInfo], window: Sequence[int], array_axes: Sequence[str],
               spacing_mm: Sequence[float], contrasts: Sequence[str] = ("water", "fat", "in_phase"),
               overlap: float = 0.5, licence: str = "", provenance: Mapping[str, Any] | None = None,
               training: Mapping[str, Any] | None = None, accuracy: Mapping[str, Any] | None = None) -> ModelCard:
    """Write the card of an exported model and return it as loaded back from disk.

    The ONNX file must lie in the card's folder (the card names it relative to itself); its
    checksum is computed here. Slices are normalised per slice over non-zero pixels, windows
    blended with a Gaussian and each label reduced to its largest connected component, as
    during the evaluation that measured the card's accuracy.
    """
    path, onnx_path = Path(path), Path(onnx_path)
    if onnx_path.resolve().parent != path.resolve().parent:
        raise ValueError(f"{onnx_path} must be in the card's folder {path.parent}")
    card = ModelCard(
        name=name,
        version=version,
        onnx=onnx_path.name,
        sha256=file_sha256(onnx_path),
        labels=dict(sorted(labels.items())),
        output_labels=sorted(labels),
        contrasts=list(contrasts),
        channels=1,
        array_axes=list(array_axes),
        spacing_mm=[float(s) for s in spacing_mm],
        normalisation={"method": "zscore_nonzero"},
        window=[int(w) for w in window],
        overlap=overlap,
        blend="gaussian",
        sigma_scale=0.125,
        largest_component=True,
        crop_foreground=False,
        licence=licence,
        provenance=dict(provenance or {}),
        accuracy=dict(accuracy or {}),
        training=dict(training or {}),
    )
    card.save(path)
    return ModelCard.load(path)
