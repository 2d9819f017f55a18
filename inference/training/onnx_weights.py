"""A trained model's network rebuilt in torch from its ONNX file and card, for training to start
from its weights (fine-tuning, ``train --init-card``).

The card's ``training.network`` describes the MONAI UNet (:mod:`.network`); the ONNX
initializers carry its weights under the state_dict's names, except the PReLU slopes, which the
exporter renames and which are found through the nodes that use them. The mapping is checked by
comparing ONNX Runtime's and torch's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from inference.card import ModelCard

from .network import NetworkConfig, build_network

__all__ = ["MAX_MAPPING_DIFFERENCE", "WeightsError", "network_from_onnx", "onnx_state_dict"]

#: The largest difference between ONNX Runtime's and torch's class scores accepted as a faithful
#: mapping of the weights (float32 arithmetic in a different order stays far below it).
MAX_MAPPING_DIFFERENCE = 1e-3


class WeightsError(ValueError):
    """The card describes no network this code can rebuild, or its ONNX weights do not fit it."""


def _prelu_key(node_name: str) -> str | None:
    """``/model/model.1/submodule/submodule.0/conv/unit0/adn/A/PRelu`` to its state_dict key."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or parts[-1] != "PRelu":
        return None
    attributes, previous = [], None
    for part in parts[:-1]:
        attributes.append(part[len(previous) + 1:] if previous and part.startswith(previous + ".") else part)
        previous = part
    return ".".join(attributes) + ".weight"


def onnx_state_dict(onnx_path: str | Path, expected: Mapping[str, Any]) -> dict[str, Any]:
    """A torch state_dict for a network of the ``expected`` keys and shapes from ONNX initializers.

    Initializers named as the state_dict's keys are taken as they are; PReLU slopes, which the
    exporter renames (``onnx::PRelu_202``) and reshapes, are found through the PRelu node that
    uses them, whose name is the module's path.

    Raises
    ------
    WeightsError
        When a key has no initializer or its shape differs.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        key = _prelu_key(node.name) if node.op_type == "PRelu" else None
        if key and len(node.input) > 1 and node.input[1] in arrays:
            arrays.setdefault(key, arrays[node.input[1]])
    state, problems = {}, []
    for key, tensor in expected.items():
        array = arrays.get(key)
        if array is None:
            problems.append(f"{key} missing")
        elif array.size != tensor.numel():
            problems.append(f"{key} has {array.size} values, the network {tensor.numel()}")
        else:
            state[key] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(tuple(tensor.shape)))
    if problems:
        raise WeightsError(f"{Path(onnx_path).name}: its weights do not fit the network its card describes: "
                            + "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    return state


def network_from_onnx(card: ModelCard) -> tuple[Any, Any, float]:
    """The card's network as a torch module, its weights read from the card's ONNX file.

    Returns
    -------
    tuple
        ``(network, NetworkConfig, largest absolute difference)`` between ONNX Runtime's and
        torch's class scores on a random input ``[2, channels, window + 32, window]``.

    Raises
    ------
    WeightsError
        When the card describes no network this code can build (``training.network`` of a
        MONAI 2D UNet with stride-2 levels and instance norm), the weights do not fit, or the
        outputs differ by more than 1e-3.
    """
    from . import export

    net = (card.training or {}).get("network") or {}
    if net.get("architecture") != "monai.networks.nets.UNet" or net.get("spatial_dims") != 2:
        raise WeightsError(f"model {card.name} {card.version}: its card does not describe a MONAI 2D UNet "
                            "(training.network), so training cannot start from its weights; only models trained "
                            "by musclenode's training code can be fine-tuned")
    if any(s != 2 for s in net.get("strides", [])) or net.get("norm", "instance") != "instance":
        raise WeightsError(f"model {card.name}: network {net} is not the UNet musclenode trains")
    config = NetworkConfig(tuple(int(c) for c in net["channels"]), int(net["num_res_units"]),
                           classes=int(net["out_channels"]), in_channels=int(net["in_channels"]))
    if config.classes != card.classes:
        raise WeightsError(f"model {card.name}: the network has {config.classes} outputs, the card {card.classes}")
    network = build_network(config)
    network.load_state_dict(onnx_state_dict(card.onnx_path, network.state_dict()), strict=True)
    network.eval()
    difference = export.compare_with_torch(
        network, card.onnx_path, (2, config.in_channels, card.window[0] + 32, card.window[1]))
    if not difference <= MAX_MAPPING_DIFFERENCE:
        raise WeightsError(f"model {card.name}: the network rebuilt from its ONNX weights differs from the ONNX "
                            f"model by {difference:.2e}; the weights were not mapped faithfully")
    return network, config, difference
