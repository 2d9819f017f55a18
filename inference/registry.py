"""The model registry: model cards found in the bundled folder and in folders a site adds.

A model is a card ``NAME.json`` beside its ONNX file (see :mod:`inference.card`). The bundled
models live in ``inference/models/``; a site adds folders of its own. Folders are searched in
the order given and the bundled folder last, so a site can replace a bundled model by placing a
card of the same name in its own folder; the card that is shadowed is reported.

Several versions of one name may exist (a site's fine-tuned versions beside the bundled one, see
:mod:`inference.training.finetune`). A plain name selects a release version (one without a local
``+...`` part): that of the first folder holding one, the highest (:func:`version_key`) where
that folder holds several. A site's fine-tuned versions (``1.0.0+site.1``) are local versions:
only ``NAME@VERSION`` selects them, so that a briefly trained model never becomes the model in
use without someone choosing it (a name with local versions only is selected by its plain name,
as there is nothing else). A card of the same name and version in a later folder is shadowed
entirely.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .card import KIND_MUSCLES, CardError, ModelCard

__all__ = [
    "DEFAULT_LEVEL_MODEL",
    "DEFAULT_MODEL",
    "ModelNotFound",
    "Scan",
    "accuracy_summary",
    "bundled_dir",
    "default_model_name",
    "list_models",
    "load_model",
    "scan_models",
    "split_name",
    "version_key",
]

log = logging.getLogger(__name__)

#: Name of the bundled model the node uses unless configured otherwise.
DEFAULT_MODEL = "musclenode-lumbar-dixon"
#: Name of the bundled level model (kind ``vertebrae``): vertebral bodies on sagittal series.
DEFAULT_LEVEL_MODEL = "musclenode-lumbar-vertebrae"


class ModelNotFound(CardError, LookupError):
    """No card of the requested name in the searched folders."""


def bundled_dir() -> Path:
    """The folder of the models shipped with musclenode."""
    return Path(__file__).resolve().parent / "models"


def default_model_name() -> str:
    """Name of the model used when the configuration names none."""
    return DEFAULT_MODEL


@dataclass(frozen=True)
class Scan:
    """What a search of the model folders found.

    Attributes
    ----------
    cards : list of ModelCard
        The card a plain name selects, one per name, sorted by name.
    problems : list of str
        Cards that could not be read, folders that do not exist, cards shadowed by a card of the
        same name in an earlier folder.
    versions : list of ModelCard
        Every usable card, one per name and version (those a plain name does not select too),
        sorted by name and then by :func:`version_key`.
    """

    cards: list[ModelCard] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    versions: list[ModelCard] = field(default_factory=list)

    def selected(self, card: ModelCard) -> bool:
        """Whether a plain name selects this card (rather than only ``NAME@VERSION``)."""
        return any(c.name == card.name and c.version == card.version and c.path == card.path for c in self.cards)


def version_key(version: str) -> tuple:
    """Sort key of a version: numbers compare as numbers, ``1.0.0 < 1.0.0+site.2 < 1.0.0+site.10 < 1.1.0``."""
    public, _, local = version.partition("+")

    def parts(text: str) -> tuple:
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", text) if p)

    return (parts(public), bool(local), parts(local))


def split_name(name: str) -> tuple[str, str | None]:
    """``"NAME@VERSION"`` to ``("NAME", "VERSION")``; a plain name to ``(name, None)``."""
    base, at, version = name.partition("@")
    return base, (version if at and version else None)


def _folders(extra_dirs: Iterable[str | Path]) -> list[Path]:
    folders = [Path(d).expanduser() for d in extra_dirs] + [bundled_dir()]
    return list(dict.fromkeys(f.resolve() for f in folders))


def scan_models(extra_dirs: Iterable[str | Path] = ()) -> Scan:
    """Read every card in the extra folders (in order), then in the bundled folder.

    Parameters
    ----------
    extra_dirs : iterable of path-like
        Site folders of models, searched before the bundled one.

    Returns
    -------
    Scan
    """
    found: dict[str, ModelCard] = {}
    versions: dict[tuple[str, str], ModelCard] = {}
    problems: list[str] = []
    for folder in _folders(extra_dirs):
        if not folder.is_dir():
            if folder != bundled_dir():
                problems.append(f"{folder}: model folder does not exist")
            continue
        here: dict[str, ModelCard] = {}
        for path in sorted(folder.glob("*.json")):
            try:
                card = ModelCard.load(path)
            except CardError as exc:
                problems.append(str(exc))
                continue
            key = (card.name, card.version)
            if key in versions:
                problems.append(f"{path}: model {card.name} {card.version} is shadowed by {versions[key].path}")
                continue
            versions[key] = card
            if "+" in card.version:  # a local version: selected by NAME@VERSION only (module notes)
                continue
            if card.name in found:
                problems.append(f"{path}: model {card.name} is shadowed by {found[card.name].path}"
                                f" (select it as {card.name}@{card.version})")
                continue
            if card.name not in here or version_key(card.version) > version_key(here[card.name].version):
                here[card.name] = card
        found.update(here)
    ordered = sorted(versions.values(), key=lambda c: (c.name, version_key(c.version)))
    for card in ordered:  # names with local versions only: the highest, in folder order
        if card.name not in found:
            found[card.name] = max((c for c in ordered if c.name == card.name), key=lambda c: version_key(c.version))
    return Scan(cards=[found[name] for name in sorted(found)], problems=problems, versions=ordered)


def list_models(extra_dirs: Iterable[str | Path] = ()) -> list[ModelCard]:
    """The usable model cards, sorted by name; unreadable or shadowed cards are logged."""
    scan = scan_models(extra_dirs)
    for problem in scan.problems:
        log.warning("model registry: %s", problem)
    return scan.cards


def load_model(name: str, extra_dirs: Iterable[str | Path] = (), verify: bool = True,
               kind: str | None = KIND_MUSCLES) -> ModelCard:
    """The card of a model by name, its ONNX file checked against the card's checksum.

    Parameters
    ----------
    name : str
        Model name (the card's ``name``, not its file name), or ``NAME@VERSION`` for one version
        (see the module's docstring for which version a plain name selects).
    extra_dirs : iterable of path-like
        Site folders, searched before the bundled one.
    verify : bool
        Check the ONNX file's sha256 now, so that a damaged model fails when the node starts
        rather than at the first series.
    kind : str or None
        The kind of model wanted (:data:`inference.card.KINDS`): by default a muscle model, so a
        level model (kind ``vertebrae``) named as the muscle model is refused, not run; None
        accepts any kind (``musclenode models show``).

    Raises
    ------
    ModelNotFound
        With the names that do exist.
    CardError
        When the ONNX file does not match the card, or the model is not of ``kind``.
    """
    scan = scan_models(extra_dirs)
    base, version = split_name(name)
    for card in scan.cards if version is None else scan.versions:
        if card.name == base and (version is None or card.version == version):
            if kind is not None and card.kind != kind:
                raise CardError(f"model {card.name} segments {card.kind}, not {kind}: "
                                + ("name a muscle model (musclenode models list)" if kind == KIND_MUSCLES
                                   else f"name a {kind} model (musclenode models list)"))
            if verify:
                card.verify()
            return card
    where = ", ".join(str(f) for f in _folders(extra_dirs))
    if version is not None and any(c.name == base for c in scan.versions):
        known = ", ".join(c.version for c in scan.versions if c.name == base)
        raise ModelNotFound(f"no version {version!r} of model {base!r} in {where} (versions: {known})")
    known = ", ".join(c.name for c in scan.cards if kind is None or c.kind == kind) or "none"
    raise ModelNotFound(f"no model named {base!r} in {where} (available: {known})")


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return sum(numbers) / len(numbers) if numbers else None


def accuracy_summary(card: ModelCard) -> str:
    """One line on a card's measured accuracy.

    A card's ``accuracy`` may carry ``"summary"`` text, which is used as is; otherwise Dice per
    contrast as the training tools write it (``dice -> contrast -> group -> label -> value``) is
    reduced to the mean over labels of the ``"all"`` group (else the last group), e.g.
    ``"Dice water 0.87, fat 0.80"``; contrasts measured on synthetic images (listed in
    ``synthetic_inputs``) say so: ``"synthetic t2 0.93"``.
    """
    accuracy: Mapping[str, Any] = card.accuracy or {}
    if isinstance(accuracy.get("summary"), str) and accuracy["summary"]:
        return accuracy["summary"]
    dice = accuracy.get("dice")
    if not isinstance(dice, Mapping) or not dice:
        return "not measured"
    made = accuracy.get("synthetic_inputs")
    made = made if isinstance(made, Mapping) else {}
    parts = []
    for contrast, groups in dice.items():
        if not isinstance(groups, Mapping) or not groups:
            continue
        group = groups.get("all", list(groups.values())[-1])
        mean = _mean(group.values()) if isinstance(group, Mapping) else None
        if mean is not None:
            parts.append(f"{'synthetic ' if contrast in made else ''}{contrast} {mean:.2f}")
    return f"{accuracy.get('metric', 'Dice')} " + ", ".join(parts) if parts else "not measured"
