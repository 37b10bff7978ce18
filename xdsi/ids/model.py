"""Request and result values of the Imaging Document Source, free of any XML or HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from xdsi.archive.retrieve import InstanceRef
from xdsi.wire.ebrs import RegistryError, response_status


@dataclass(frozen=True)
class DocumentRequest:
    """One requested instance, with the study and series it was asked under."""

    study_uid: str
    series_uid: str
    repository_unique_id: str
    document_unique_id: str
    home_community_id: str | None = None


@dataclass
class Resolved:
    """A document request that passed the identity checks, with the archived instance it names."""

    request: DocumentRequest
    ref: InstanceRef


@dataclass
class ReturnedDocument:
    """A document in a response: its bytes are produced only when ``chunks()`` is called (while streaming)."""

    request: DocumentRequest
    mime_type: str
    produce: Callable[[], Iterator[bytes]]
    ref: InstanceRef | None = None
    transfer_syntax: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # e.g. rendered parameters actually used
    close: Callable[[], None] = lambda: None  # releases a spool that was produced but will not be streamed

    def chunks(self) -> Iterator[bytes]:
        return self.produce()


@dataclass
class RetrieveResult:
    documents: list[ReturnedDocument]
    errors: list[RegistryError]

    @property
    def status(self) -> str:
        return response_status(len(self.documents), self.errors)

    def close(self) -> None:
        """Release every produced document (spools of converted instances, rendered images)."""
        for d in self.documents:
            d.close()


def errors_for(requests: Sequence[DocumentRequest], code: str, context: str) -> list[RegistryError]:
    return [RegistryError(code, context, r.document_unique_id or None) for r in requests]
