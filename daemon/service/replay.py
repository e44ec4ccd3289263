"""`chargeflow rejections replay`: kept rejections fed again through decide-and-commit.

Once the cause of a rejection is fixed (a start that came after the grace period has arrived
since, a firmware bug is fixed on the bike's side, a pricing file is corrected), its raw
payload can be decided again, as if it had just arrived, through the same unit of work the
daemon uses (not over MQTT). Replaying is idempotent: a message that is now accepted is stored
once (a second replay is a duplicate), and one that is still invalid stays one kept rejection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from daemon.config import Settings
from daemon.db.store import Store
from daemon.db.views import KeptRejection, ReadModel, RejectionFilter
from daemon.mqtt.schemas import decode
from daemon.mqtt.topics import topics_for
from daemon.service.arrival import Arrival, Settled
from daemon.service.ingestion import configured_ingestion
from domain.events import Outcome

__all__ = ["Replayed", "replay"]

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a kept rejection became when it was decided again."""

    rejection: KeptRejection
    outcome: str  # accepted, duplicate, deferred, rejected, not_replayed
    reason: str | None = None
    detail: str | None = None

    def to_document(self) -> dict[str, object]:
        return {
            "id": self.rejection.id,
            "topic": self.rejection.topic,
            "was": self.rejection.reason,
            "now": self.outcome,
            "reason": self.reason,
            "detail": self.detail,
        }


async def replay(
    settings: Settings,
    store: Store,
    selection: RejectionFilter,
    most: int,
    progress: Callable[[int], None] = lambda n: None,
) -> list[Replayed]:
    """Decide the (at most ``most``) selected kept rejections again, oldest first, in batches;
    what each became. ``selection.limit`` is the page size they are read with."""
    chosen = await _chosen(ReadModel(store.pool), selection, most)
    ingestion = await configured_ingestion(settings, store)
    topics = topics_for(settings.topic_prefix)
    results: list[Replayed] = []
    for start in range(0, len(chosen), _CHUNK):
        chunk, arrivals = [], []
        now = datetime.now(UTC)
        for kept in chosen[start : start + _CHUNK]:
            if kept.payload_redacted is not None:
                results.append(
                    Replayed(kept, "not_replayed", None,
                             f"its payload was redacted ({kept.payload_redacted})")
                )  # fmt: skip
                continue
            if len(kept.payload) < kept.payload_size:
                results.append(
                    Replayed(kept, "not_replayed", None,
                             f"only {len(kept.payload)} of its {kept.payload_size} bytes are kept")
                )  # fmt: skip
                continue
            inbound = decode(kept.topic, kept.payload, topics, settings.max_payload_bytes)
            chunk.append(kept)
            arrivals.append(Arrival(kept.topic, kept.payload, now, inbound))
        if arrivals:
            settled, _ = await ingestion.commit_batch(arrivals)
            results += map(_replayed, chunk, settled)
        progress(len(results))
    return sorted(results, key=lambda r: r.rejection.id)


async def _chosen(reads: ReadModel, selection: RejectionFilter, most: int) -> list[KeptRejection]:
    """The selected kept rejections, page by page up to ``most``, in arrival order."""
    chosen: list[KeptRejection] = []
    page = selection
    while True:
        found = await reads.rejections(page)
        chosen += found
        if len(found) < page.limit or len(chosen) >= most:
            break
        page = replace(page, before=found[-1].id)
    return sorted(chosen[:most], key=lambda r: r.id)


def _replayed(kept: KeptRejection, settled: Settled) -> Replayed:
    if settled.rejection is not None:
        reason = settled.rejection
        return Replayed(kept, "rejected", str(reason.reason), reason.detail)
    if settled.dropped is not None:
        return Replayed(kept, "not_replayed", None, settled.dropped)
    return Replayed(kept, str(settled.outcome or Outcome.ACCEPTED))
