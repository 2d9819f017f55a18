"""Import published MuscleMap checkpoints: a MONAI UNet ``.pth`` and its JSON configuration.

MuscleMap (https://github.com/MuscleMap/MuscleMap, MIT licence) publishes 2D MONAI UNets for
muscle segmentation with a JSON file per model (``parameters``: ``roi_size``, ``pix_dim``,
``spatial_window_batch_size``; ``model``: the UNet's arguments; ``labels``: region, anatomy,
side and value of each label). :func:`import_checkpoint` turns such a pair into an ONNX file and
a model card (:mod:`inference.card`) that the node's runtime (:mod:`inference.runtime`) runs
with MuscleMap's own preprocessing; ``musclenode models import-musclemap`` is its command line.

What MuscleMap does, and how the card says it
---------------------------------------------
Followed: ``scripts/mm_segment.py`` and ``scripts/mm_util.py`` of MuscleMap as stored at commit
``915b1f6667a6`` (read, not copied). MuscleMap's ``setup.py`` pins ``monai==1.3.2`` and
``torch==2.4.0`` (as stored at commit ``c7dc4c061054``); the configurations in
``../shared/data/musclemap`` are those of MuscleMap's tag 1.3. Which commit the tag points to
was not checked, and other stored versions of ``mm_util`` differ (chunking in memory, argmax
labels resampled by nearest neighbour, 26-connected components). ``mm_segment`` runs, per NIfTI
volume:

1. ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd(axcodes="RAS")``,
   ``Spacingd(pixdim=(1, 1, -1), mode="bilinear")``: 1 x 1 mm in-plane, slice spacing kept.
   After ``Orientation("RAS")`` array axis 0 grows towards the patient's right and axis 1
   towards anterior, and ``SliceInferer(spatial_dim=2)`` cuts along axis 2, so every 2D input
   has rows towards R and columns towards A: card ``array_axes`` ``["R", "A"]``,
   ``spacing_mm`` ``[1, 1]``.
2. ``NormalizeIntensityd(nonzero=True)``: z-score over the non-zero voxels of the whole volume,
   card ``normalisation`` ``{"method": "zscore_nonzero", "scope": "volume", "max_slices": 25}``
   (``run_inference`` cuts volumes of more than ``chunk_size`` = 25 slices into chunks of 25
   and preprocesses each chunk on its own).
3. ``CropForegroundd(source_key="image", margin=20)``: the bounding box of voxels positive after
   normalisation, plus 20 voxels, clipped to the volume (MONAI 1.3's ``allow_smaller=True``):
   card ``crop_foreground`` true. The runtime's volume scope places the resampling grid, takes
   the statistics and the box, blends the windows and resamples the scores back as MONAI does
   (see :mod:`inference.runtime`).
4. ``SliceInferer(roi_size, sw_batch_size=1, spatial_dim=2, mode="gaussian", overlap=0.9)``
   (MONAI's ``sigma_scale`` 0.125): card ``window`` from ``roi_size`` (128 x 128 abdomen,
   256 x 256 whole body), ``blend`` gaussian, ``sigma_scale`` 0.125. The card's ``overlap`` is
   the import's choice (default 0.5); MuscleMap's default 0.9 is recorded in ``provenance``.
5. ``Invertd(nearest_interp=False)`` on the raw class scores (no softmax), then
   ``AsDiscreted(argmax=True)``; for the whole-body model ``RemapLabels`` from class index to
   label value: class ``k`` is the ``k``-th smallest label value of the configuration.
6. ``connected_chunks``: the largest 3D connected component (6-connected) of every label over
   the whole volume. The node's runtime keeps the largest 2D component per label and slice
   (card ``largest_component`` true); that is the one step it does not reproduce exactly.

Labels
------
MuscleMap's abdomen model: 1 right multifidus, 2 left multifidus, 3 right erector spinae,
4 left erector spinae, 5 right psoas major, 6 left psoas major, 7 right quadratus lumborum,
8 left quadratus lumborum (its configuration's ``labels``). The whole-body model's lumbar labels
are 5101/5102 (thoracolumbar) multifidus left/right, 5111/5112 erector spinae, 5121/5122 psoas
major, 5131/5132 quadratus lumborum. Both are mapped onto the node's values in
:data:`NODE_VALUES` (the abdomen model's own numbering); every other class of the whole-body model
becomes 0, an ignored class. Only labels of the ``abdomen`` region are taken: the neck's
"semispinalis cervicis and multifidus" is not a lumbar multifidus.

torch and MONAI are needed only to import (the ``train`` extra); the imported model runs with
ONNX Runtime alone.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .card import LabelInfo, ModelCard, file_sha256
from .vocabulary import Contrast, Muscle, Side

__all__ = [
    "MUSCLEMAP_COMMIT",
    "MUSCLEMAP_DEFAULT_OVERLAP",
    "MUSCLEMAP_CHUNK_SLICES",
    "NODE_VALUES",
    "ImportErrorMM",
    "MuscleMapConfig",
    "LabelMapping",
    "load_config",
    "label_mapping",
    "build_network",
    "load_state_dict",
    "export_onnx",
    "make_card",
    "import_checkpoint",
    "reference_segmentation",
]

log = logging.getLogger(__name__)

MUSCLEMAP_REPOSITORY = "https://github.com/MuscleMap/MuscleMap"
#: The MuscleMap code whose inference this module reproduces.
MUSCLEMAP_COMMIT = "915b1f6667a66f01a65350ea53f2d8c3164c6d3f"
#: ``mm_segment -s`` default: percent overlap 90.
MUSCLEMAP_DEFAULT_OVERLAP = 0.9
#: ``mm_segment -c`` default: volumes of more slices are preprocessed in chunks of this many.
MUSCLEMAP_CHUNK_SLICES = 25
#: ``CropForegroundd(margin=20)``.
MUSCLEMAP_CROP_MARGIN = 20
#: Overlap written into imported cards unless asked otherwise (MuscleMap's own default is 0.9).
DEFAULT_OVERLAP = 0.5
#: Contrasts the card accepts, preferred first. MuscleMap's models are "contrast agnostic"
#: (trained on T1-, T2-weighted and Dixon images); water is preferred as for the bundled model.
DEFAULT_CONTRASTS = (Contrast.WATER, Contrast.IN_PHASE, Contrast.T1, Contrast.T2, Contrast.OPPOSED_PHASE,
                     Contrast.FAT)

#: MuscleMap anatomy names (region ``abdomen``) to canonical muscles: MuscleMap's words, not ours.
_ANATOMY = {
    "multifidus": Muscle.MULTIFIDUS,
    "thoracolumbar multifidus": Muscle.MULTIFIDUS,
    "erector spinae": Muscle.ERECTOR_SPINAE,
    "psoas major": Muscle.PSOAS_MAJOR,
    "quadratus lumborum": Muscle.QUADRATUS_LUMBORUM,
}
#: The node's label value of each lumbar muscle and side in imported MuscleMap models: the
#: numbering of MuscleMap's abdomen model (muscle by muscle, right then left).
NODE_VALUES: dict[tuple[Muscle, Side], int] = {
    (Muscle.MULTIFIDUS, Side.RIGHT): 1, (Muscle.MULTIFIDUS, Side.LEFT): 2,
    (Muscle.ERECTOR_SPINAE, Side.RIGHT): 3, (Muscle.ERECTOR_SPINAE, Side.LEFT): 4,
    (Muscle.PSOAS_MAJOR, Side.RIGHT): 5, (Muscle.PSOAS_MAJOR, Side.LEFT): 6,
    (Muscle.QUADRATUS_LUMBORUM, Side.RIGHT): 7, (Muscle.QUADRATUS_LUMBORUM, Side.LEFT): 8,
}
_SIDES = {side.value: side for side in Side}


class ImportErrorMM(ValueError):
    """A MuscleMap checkpoint or configuration cannot be imported (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Configuration and labels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MuscleMapConfig:
    """A MuscleMap model configuration (the JSON file beside a ``.pth``).

    Attributes
    ----------
    roi_size : tuple of int
        Sliding-window size (rows, columns of the RAS slice).
    pix_dim : tuple of float
        ``Spacingd`` pixdim; a non-positive entry keeps that axis' spacing.
    window_batch_size : int
        ``spatial_window_batch_size`` (MuscleMap's ``sw_batch_size``).
    network : dict
        The ``model`` section: ``spatial_dims``, ``in_channels``, ``out_channels``, ``channels``,
        ``act``, ``strides``, ``num_res_units``, ``norm`` (and a ``version``).
    labels : tuple of dict
        ``region``, ``anatomy``, ``side``, ``value`` of each label.
    path : Path or None
    sha256 : str
        Of the file.
    """

    roi_size: tuple[int, int]
    pix_dim: tuple[float, ...]
    window_batch_size: int
    network: dict[str, Any]
    labels: tuple[dict[str, Any], ...]
    path: Path | None = None
    sha256: str = ""

    @property
    def out_channels(self) -> int:
        return int(self.network["out_channels"])

    @property
    def in_channels(self) -> int:
        return int(self.network["in_channels"])

    @property
    def model_version(self) -> str:
        return str(self.network.get("version", "unversioned"))


def load_config(path: str | Path) -> MuscleMapConfig:
    """Read and check a MuscleMap model configuration.

    Raises
    ------
    ImportErrorMM
        When the file is unreadable, lacks a key ``mm_segment`` reads, or describes a network
        the node cannot run (not 2D, an unknown normalisation layer).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        parameters, network, labels = data["parameters"], dict(data["model"]), data["labels"]
        roi = tuple(int(v) for v in parameters["roi_size"])
        pix_dim = tuple(float(v) for v in parameters["pix_dim"])
        batch = int(parameters.get("spatial_window_batch_size", 1))
        for key in ("spatial_dims", "in_channels", "out_channels", "channels", "act", "strides",
                    "num_res_units", "norm"):
            network[key]  # noqa: B018 - presence check, as mm_segment reads them
        labels = tuple(dict(entry) for entry in labels)
        for entry in labels:
            int(entry["value"]), str(entry["anatomy"]), str(entry["side"])
    except (OSError, json.JSONDecodeError) as exc:
        raise ImportErrorMM(f"MuscleMap configuration {path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ImportErrorMM(f"MuscleMap configuration {path} lacks or garbles {exc}") from None
    if int(network["spatial_dims"]) != 2 or len(roi) != 2:
        raise ImportErrorMM(f"{path}: only 2D MuscleMap models (spatial_dims 2, a 2D roi_size) can be imported")
    if str(network["norm"]).lower() != "instance":
        raise ImportErrorMM(f"{path}: normalisation layer {network['norm']!r} is not the 'instance' mm_segment knows")
    if len(pix_dim) < 2 or min(pix_dim[:2]) <= 0:
        raise ImportErrorMM(f"{path}: pix_dim {pix_dim} does not give an in-plane spacing")
    return MuscleMapConfig(roi_size=(roi[0], roi[1]), pix_dim=pix_dim, window_batch_size=batch,
                           network=network, labels=labels, path=path, sha256=file_sha256(path))


@dataclass(frozen=True)
class LabelMapping:
    """How MuscleMap's output classes become the node's label values.

    Attributes
    ----------
    musclemap_values : list of int
        MuscleMap's label value of each output class after the background (class ``k`` ->
        ``musclemap_values[k-1]``).
    output_labels : list of int
        The node's value of each class after the background, 0 for a class the node ignores.
    labels : dict of int to LabelInfo
        The node's values and their meaning.
    """

    musclemap_values: list[int]
    output_labels: list[int]
    labels: dict[int, LabelInfo]

    def to_node(self) -> dict[int, int]:
        """MuscleMap label value -> node value (0 for ignored labels)."""
        return dict(zip(self.musclemap_values, self.output_labels))


def label_mapping(config: MuscleMapConfig) -> LabelMapping:
    """Class index to MuscleMap value to node value, as ``mm_segment`` numbers the classes.

    ``mm_segment`` builds ``id_map`` from the sorted label values: class ``k`` is the ``k``-th
    smallest value. For the abdomen model (values 1 to 8) that is the identity it also applies
    without remapping; the whole-body model's 99 values (1101 ... 8162) map onto classes 1-99.

    Raises
    ------
    ImportErrorMM
        When the number of labels does not match the network's outputs, a value repeats, or no
        lumbar muscle is among the labels.
    """
    values = [int(entry["value"]) for entry in config.labels]
    if len(set(values)) != len(values):
        raise ImportErrorMM("the configuration repeats a label value")
    ordered = sorted(values)
    if len(ordered) + 1 != config.out_channels:
        raise ImportErrorMM(f"{len(ordered)} labels but {config.out_channels} network outputs"
                            " (expected one more, the background)")
    meaning: dict[int, LabelInfo] = {}
    node_of: dict[int, int] = {}
    for entry in config.labels:
        muscle = _ANATOMY.get(str(entry["anatomy"]).strip().lower())
        side = _SIDES.get(str(entry["side"]).strip().lower())
        if muscle is None or side is None or str(entry.get("region", "abdomen")).lower() != "abdomen":
            continue
        node = NODE_VALUES[(muscle, side)]
        if node in meaning:
            raise ImportErrorMM(f"two labels of the configuration are the {side} {muscle}")
        meaning[node] = LabelInfo(muscle, side)
        node_of[int(entry["value"])] = node
    if not meaning:
        raise ImportErrorMM("none of the configuration's labels is a lumbar muscle of the abdomen region"
                            f" ({', '.join(m.words for m in Muscle)})")
    return LabelMapping(musclemap_values=ordered, output_labels=[node_of.get(v, 0) for v in ordered],
                        labels=dict(sorted(meaning.items())))


# ---------------------------------------------------------------------------------------------
# Network and export (torch, MONAI)
# ---------------------------------------------------------------------------------------------


def build_network(config: MuscleMapConfig):  # -> torch.nn.Module
    """The MONAI UNet ``mm_segment`` builds from a configuration (eval mode, random weights)."""
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    net = config.network
    return UNet(spatial_dims=int(net["spatial_dims"]), in_channels=int(net["in_channels"]),
                out_channels=int(net["out_channels"]), channels=[int(c) for c in net["channels"]],
                act=net["act"], strides=[int(s) for s in net["strides"]],
                num_res_units=int(net["num_res_units"]), norm=Norm.INSTANCE).eval()


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """The weights of a MuscleMap ``.pth``.

    MuscleMap saves a bare ``state_dict`` (``torch.load(..., weights_only=True)`` then
    ``model.load_state_dict``). Checkpoints that wrap it (``{"state_dict": ...}``,
    ``{"model": ...}``) or carry DataParallel's ``module.`` prefix are unwrapped too. Only
    tensors are read (``weights_only=True``): a checkpoint cannot run code.
    """
    import torch

    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for missing, damaged or pickled files
        raise ImportErrorMM(f"cannot read the checkpoint {path}: {exc}") from None
    for key in ("state_dict", "model_state_dict", "model", "network"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise ImportErrorMM(f"{path} holds no state_dict")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return dict(state)


def export_onnx(network: Any, path: str | Path, window: Sequence[int], channels: int = 1) -> Path:
    """Write the network as ONNX (opset 17, the legacy exporter), batch, height and width dynamic.

    torch 2.13 exports with the dynamo exporter by default, which needs onnxscript;
    ``dynamo=False`` writes a MONAI UNet as one self-contained file.
    """
    import torch

    path = Path(path)
    network.eval()
    example = torch.zeros(1, channels, *[int(w) for w in window], dtype=torch.float32)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI's InstanceNorm keeps no running statistics, so "train=True" is what eval does too.
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dynamic, "logits": dynamic})
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx comes with the train extra
        return path
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def _largest_difference(network: Any, onnx_path: Path, window: Sequence[int], channels: int) -> float:
    """Largest |ONNX Runtime - torch| over a batch of two normalised-looking random windows."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).standard_normal((2, channels, *window)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        torch_out = network(torch.from_numpy(x)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


# ---------------------------------------------------------------------------------------------
# Card and import
# ---------------------------------------------------------------------------------------------


def _default_name(config: MuscleMapConfig) -> str:
    stem = config.path.stem if config.path else "model"
    stem = re.sub(r"_?model$", "", stem)
    return "musclemap-" + re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")


def make_card(config: MuscleMapConfig, onnx_path: Path, *, name: str, checkpoint_sha256: str,
              overlap: float = DEFAULT_OVERLAP, contrasts: Sequence[str] = DEFAULT_CONTRASTS,
              torch_difference: float | None = None) -> ModelCard:
    """The card of an exported MuscleMap model (not yet saved; ``onnx_path`` must exist)."""
    mapping = label_mapping(config)
    unknown = [c for c in contrasts if c not in set(Contrast)]
    if unknown:
        raise ImportErrorMM(f"unknown contrasts {unknown}")
    ignored = sum(1 for v in mapping.output_labels if v == 0)
    provenance: dict[str, Any] = {
        "source": f"MuscleMap ({MUSCLEMAP_REPOSITORY}), imported with musclenode models import-musclemap",
        "configuration": config.path.name if config.path else "",
        "configuration_sha256": config.sha256,
        "checkpoint_sha256": checkpoint_sha256,
        "musclemap_model_version": config.model_version,
        "network": {k: config.network[k] for k in ("spatial_dims", "in_channels", "out_channels", "channels",
                                                     "act", "strides", "num_res_units", "norm")},
        "reproduces": f"MuscleMap scripts/mm_segment.py and scripts/mm_util.py at commit {MUSCLEMAP_COMMIT[:12]}"
                      " (MONAI 1.3.2): RAS, Spacing pix_dim " + json.dumps(list(config.pix_dim))
                      + ", NormalizeIntensity(nonzero) over the volume in chunks of"
                      f" {MUSCLEMAP_CHUNK_SLICES} slices, CropForeground(margin={MUSCLEMAP_CROP_MARGIN},"
                      " allow_smaller=True), SliceInferer gaussian, Invertd on the scores, argmax",
        "musclemap_defaults": {"overlap": MUSCLEMAP_DEFAULT_OVERLAP, "sw_batch_size": config.window_batch_size,
                               "chunk_size": MUSCLEMAP_CHUNK_SLICES},
        "differences": "overlap as in this card (MuscleMap's default 0.9 is slower); largest connected "
                       "component per label per slice (2D, 8-connected) where MuscleMap keeps the largest "
                       "3D (6-connected) component over the volume",
        "label_values": {"musclemap_to_node": {str(k): v for k, v in mapping.to_node().items() if v},
                         "ignored_classes": ignored},
    }
    if torch_difference is not None:
        provenance["onnx_vs_torch_max_abs_difference"] = torch_difference
    return ModelCard(
        name=name,
        version=f"{config.model_version}+{checkpoint_sha256[:12]}",
        onnx=onnx_path.name,
        sha256=file_sha256(onnx_path),
        labels=mapping.labels,
        output_labels=mapping.output_labels,
        contrasts=list(contrasts),
        channels=config.in_channels,
        array_axes=["R", "A"],
        spacing_mm=[float(config.pix_dim[0]), float(config.pix_dim[1])],
        normalisation={"method": "zscore_nonzero", "scope": "volume", "max_slices": MUSCLEMAP_CHUNK_SLICES},
        window=[int(config.roi_size[0]), int(config.roi_size[1])],
        overlap=float(overlap),
        blend="gaussian",
        sigma_scale=0.125,
        largest_component=True,
        crop_foreground=True,
        licence="MuscleMap code and configuration: MIT (MuscleMap). Weights: as published by MuscleMap for "
                "this checkpoint; check their terms before redistributing.",
        provenance=provenance,
        accuracy={"summary": "not measured by musclenode (see MuscleMap's publications)"},
    )


def import_checkpoint(checkpoint: str | Path, config_path: str | Path, out_dir: str | Path,
                      name: str | None = None, overlap: float = DEFAULT_OVERLAP,
                      verify: bool = True) -> ModelCard:
    """Import a MuscleMap checkpoint: write ``NAME.onnx`` and its card ``NAME.json`` into ``out_dir``.

    Parameters
    ----------
    checkpoint : path-like
        MuscleMap ``.pth`` (a state_dict of the configuration's UNet).
    config_path : path-like
        Its JSON configuration.
    out_dir : path-like
        Folder for the model (created); add it to the node's model folders.
    name : str, optional
        Model name (default ``musclemap-`` and the configuration's file name, e.g.
        ``musclemap-contrast-agnostic-abdomen``).
    overlap : float
        Sliding-window overlap written into the card.
    verify : bool
        Compare ONNX Runtime with torch on random windows and refuse a difference above 1e-3.

    Returns
    -------
    ModelCard
        As loaded back from the written card.

    Raises
    ------
    ImportErrorMM
        When the configuration, the checkpoint or the export is unusable.
    """
    import torch

    config = load_config(config_path)
    checkpoint = Path(checkpoint)
    name = name or _default_name(config)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ImportErrorMM(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    network = build_network(config)
    try:
        network.load_state_dict(load_state_dict(checkpoint), strict=True)
    except RuntimeError as exc:
        raise ImportErrorMM(f"{checkpoint} does not fit the network of {config.path.name}: "
                            f"{str(exc).splitlines()[0]}") from None
    network.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    with torch.no_grad():
        export_onnx(network, onnx_path, config.roi_size, config.in_channels)
    difference = _largest_difference(network, onnx_path, config.roi_size, config.in_channels) if verify else None
    if difference is not None and difference > 1e-3:
        raise ImportErrorMM(f"ONNX Runtime differs from torch by {difference:.2g} on random windows")
    card = make_card(config, onnx_path, name=name, checkpoint_sha256=file_sha256(checkpoint),
                     overlap=overlap, torch_difference=difference)
    card_path = out_dir / f"{name}.json"
    card.save(card_path)
    return ModelCard.load(card_path)


# ---------------------------------------------------------------------------------------------
# MuscleMap's own inference, for comparisons
# ---------------------------------------------------------------------------------------------


def reference_segmentation(nifti_path: str | Path, network: Any, config: MuscleMapConfig,
                           overlap: float = MUSCLEMAP_DEFAULT_OVERLAP, sw_batch_size: int | None = None,
                           chunk_slices: int = MUSCLEMAP_CHUNK_SLICES, largest_component: bool = True,
                           remap: bool = True) -> np.ndarray:
    """Segment a NIfTI volume as MuscleMap's ``mm_segment`` does, with MONAI and torch (CPU).

    This is the reference the node's runtime is compared with (tests, ``bench/``), written
    after ``mm_segment.main`` and ``mm_util.run_inference`` at :data:`MUSCLEMAP_COMMIT`:
    volumes of more than ``chunk_slices`` slices are cut into chunks (saved with the volume's
    header, as MuscleMap does) that are preprocessed and segmented one by one. MONAI >= 1.5
    needs ``allow_smaller=True`` on CropForeground to crop as MuscleMap's pinned MONAI 1.3 did.

    Parameters
    ----------
    nifti_path : path-like
    network : torch.nn.Module
        The configuration's UNet with its weights.
    config : MuscleMapConfig
    overlap : float
        Sliding-window overlap (MuscleMap's default 0.9).
    sw_batch_size : int, optional
        Windows per network call (default: the configuration's, 1).
    chunk_slices : int
        ``mm_segment``'s ``chunk_size``.
    largest_component : bool
        Keep the largest 3D 6-connected component per label (``connected_chunks``).
    remap : bool
        Class index to MuscleMap label value (``RemapLabels``; the identity for values 1..n).

    Returns
    -------
    numpy.ndarray
        int16 labels on the NIfTI's voxel grid (MuscleMap's label values).
    """
    import nibabel as nib
    import torch
    from monai.inferers import SliceInferer
    from monai.transforms import (AsDiscreted, Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped,
                                  Invertd, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd)
    from scipy import ndimage

    pre = Compose([
        LoadImaged(keys=["image"], image_only=False),
        EnsureChannelFirstd(keys=["image"]),
        Orientationd(keys=["image"], axcodes="RAS"),
        Spacingd(keys=["image"], pixdim=config.pix_dim, mode="bilinear"),
        NormalizeIntensityd(keys=["image"], nonzero=True),
        CropForegroundd(keys=["image"], source_key="image", margin=MUSCLEMAP_CROP_MARGIN, allow_smaller=True),
        EnsureTyped(keys=["image"]),
    ])
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", meta_keys="pred_meta_dict",
                orig_meta_keys="image_meta_dict", meta_key_postfix="meta_dict", nearest_interp=False,
                to_tensor=True, device="cpu"),
        AsDiscreted(keys="pred", argmax=True),
    ])
    inferer = SliceInferer(roi_size=tuple(config.roi_size), sw_batch_size=sw_batch_size or config.window_batch_size,
                           spatial_dim=2, mode="gaussian", overlap=overlap)
    network.eval()

    def run(path: str) -> np.ndarray:
        data = pre({"image": path})
        tensor = data["image"].float().unsqueeze(0)
        with torch.inference_mode():
            pred = inferer(tensor, network)
        out = post({"pred": pred.squeeze(0), "image": data["image"], "image_meta_dict": data["image_meta_dict"]})
        return out["pred"].detach().cpu().numpy()[0].astype(np.int16)

    image = nib.load(str(nifti_path))
    depth = image.shape[-1]
    if depth <= chunk_slices:
        labels = run(str(nifti_path))
    else:
        voxels = np.asarray(image.get_fdata(), dtype=np.float32)
        labels = np.zeros(image.shape, np.int16)
        with tempfile.TemporaryDirectory(prefix="musclemap-chunks-") as folder:
            for start in range(0, depth, chunk_slices):
                stop = min(start + chunk_slices, depth)
                chunk = Path(folder) / f"chunk_{start}_{stop}.nii"
                nib.save(nib.Nifti1Image(voxels[..., start:stop], image.affine, image.header), str(chunk))
                labels[..., start:stop] = run(str(chunk))
    if remap:
        values = np.array([0] + sorted(int(e["value"]) for e in config.labels), dtype=np.int32)
        labels = values[labels].astype(np.int16)
    if largest_component:
        structure = ndimage.generate_binary_structure(3, 1)
        for value in np.unique(labels):
            if value == 0:
                continue
            components, count = ndimage.label(labels == value, structure=structure)
            if count > 1:
                keep = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
                labels[(components != 0) & (components != keep)] = 0
    return labels
