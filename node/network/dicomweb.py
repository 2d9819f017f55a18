"""DICOMweb retrieval (QIDO-RS to list, WADO-RS to retrieve) through the ``dicomweb-client`` library.

Instances are asked for in the transfer syntax the archive stores them in (``transfer-syntax=*``),
so that nothing is converted on the way, and written back as Part 10 files from what arrived.
"""

from __future__ import annotations

from io import BytesIO
from typing import Iterator

from pydicom.dataset import Dataset

__all__ = ["DicomWebError", "DicomWebSource", "file_bytes"]

#: Any transfer syntax: the archive sends what it has (PS3.18 8.7.3.5.2).
_AS_STORED = (("application/dicom", "*"),)
_SOP_INSTANCE_UID = "00080018"
_SERIES_INSTANCE_UID = "0020000E"
_SOP_CLASS_UID = "00080016"


class DicomWebError(Exception):
    """The DICOMweb service could not be reached or answered with an error."""


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def file_bytes(dataset: Dataset) -> bytes:
    """A retrieved dataset as a Part 10 file: its own file meta and the elements as they were read."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class DicomWebSource:
    """One archive's DICOMweb service.

    Parameters
    ----------
    url : str
        Base URL, e.g. ``http://pacs:8042/dicom-web``.
    timeout : float
        Seconds for each HTTP request.
    """

    def __init__(self, url: str, timeout: float = 60) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url
        self._client = DICOMwebClient(url, timeout=timeout)
        # Transient HTTP errors (429, 503, ...) are retried by the library with backoff.
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)

    def _call(self, what: str, function, *args, **kwargs):
        import requests

        try:
            return function(*args, **kwargs)
        except requests.RequestException as exc:
            raise DicomWebError(f"{what} at {self.url}: {exc}") from exc

    def series(self, study_uid: str) -> list[str]:
        """Series Instance UIDs of a study (QIDO-RS)."""
        found = self._call("QIDO-RS series search", self._client.search_for_series, study_instance_uid=study_uid,
                           get_remaining=True)
        return [uid for uid in (_value(item, _SERIES_INSTANCE_UID) for item in found) if uid]

    def instances(self, study_uid: str, series_uid: str) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of every instance of a series (QIDO-RS)."""
        found = self._call("QIDO-RS instance search", self._client.search_for_instances,
                           study_instance_uid=study_uid, series_instance_uid=series_uid, get_remaining=True)
        return {_value(item, _SOP_INSTANCE_UID): _value(item, _SOP_CLASS_UID) or ""
                for item in found if _value(item, _SOP_INSTANCE_UID)}

    def iter_series(self, study_uid: str, series_uid: str) -> Iterator[Dataset]:
        """Every instance of a series, streamed (WADO-RS)."""
        import requests

        try:
            yield from self._client.iter_series(study_uid, series_uid, media_types=_AS_STORED)
        except requests.RequestException as exc:
            raise DicomWebError(f"WADO-RS series retrieval at {self.url}: {exc}") from exc

    def instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
        """One instance (WADO-RS)."""
        return self._call("WADO-RS instance retrieval", self._client.retrieve_instance, study_uid, series_uid,
                          sop_instance_uid, media_types=_AS_STORED)
