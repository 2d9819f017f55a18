"""The network musclenode trains: a MONAI 2D UNet, and what its card records of it."""

from __future__ import annotations

from dataclasses import dataclass

from monai.networks.nets import UNet

__all__ = ["NetworkConfig", "build_network"]


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the MONAI UNet: enough to rebuild it from a checkpoint."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    res_units: int = 2
    classes: int = 5
    in_channels: int = 1

    def as_dict(self) -> dict:
        return {"architecture": "monai.networks.nets.UNet", "spatial_dims": 2,
                "in_channels": self.in_channels, "out_channels": self.classes,
                "channels": list(self.channels), "strides": [2] * (len(self.channels) - 1),
                "num_res_units": self.res_units, "norm": "instance"}


def build_network(config: NetworkConfig) -> UNet:
    """The 2D UNet: stride-2 levels, so windows must be multiples of 2 ** (levels - 1)."""
    return UNet(spatial_dims=2, in_channels=config.in_channels, out_channels=config.classes,
                channels=config.channels, strides=(2,) * (len(config.channels) - 1),
                num_res_units=config.res_units)
