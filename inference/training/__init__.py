"""Training, export and evaluation of the slice-wise 2D segmentation models (optional extra).

The training and export modules need the ``[train]`` extra (torch, MONAI); :mod:`.data` and
:mod:`.evaluate` need only NumPy, SciPy, nibabel and ONNX Runtime, so a trained model can be
checked where torch is not installed.

Modules
-------
data
    NIfTI cases, the canonical in-plane layout derived from the affine, resampling, normalisation.
augment
    MONAI transforms for training, including the left-right flip that swaps label sides.
train
    Command line: train a MONAI 2D UNet on NIfTI image and label pairs, export it, measure it.
export
    ONNX export of the trained network and the model card written beside it.
evaluate
    Command line: Dice per label of an exported ONNX model against manual labels.
bundled
    The recipe that produced the bundled default model ``musclenode-lumbar-dixon``.
finetune
    ``musclenode models train --from-seg``: fine-tune a model from a site's DICOM SEGs and their
    source series, starting from the weights in its ONNX file (needs highdicom too).
"""
