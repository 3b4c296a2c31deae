from django.db import models

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.ids import new_id
from orchestration.models.base import CreatedModel, DomainCheck, in_choices


class Event(CreatedModel):
    """The append-only audit log (seed 000's `events`), also the outbox for the stream relay.

    The database rejects UPDATE, DELETE and TRUNCATE on this table (triggers in migration
    0002). `sequence` is an identity column: the order in which rows were allocated, used
    for ordering and by the relay; `event_id` is the stable public id (unique, kept when an
    event is re-published). workflow_id and agent_id are plain columns, not foreign keys: the
    audit trail outlives the rows it describes.
    """

    sequence = models.BigAutoField(primary_key=True)
    event_id = models.CharField(max_length=255, default=new_id, editable=False)
    event_type = models.CharField(max_length=100, choices=EventType.choices)
    entity_type = models.CharField(max_length=100, choices=EntityType.choices, null=True, blank=True)
    entity_id = models.CharField(max_length=255, null=True, blank=True)
    workflow_id = models.CharField(max_length=255, null=True, blank=True)
    agent_id = models.CharField(max_length=255, null=True, blank=True)
    session_id = models.CharField(max_length=255, null=True, blank=True)
    source = models.CharField(max_length=100, default="platform")
    payload = models.JSONField(default=dict, blank=True)
    severity = models.CharField(max_length=20, choices=Severity.choices, default=Severity.INFO)

    class Meta:
        db_table = "events"
        ordering = ["sequence"]
        indexes = [
            models.Index(fields=["entity_type", "entity_id"], name="idx_events_entity"),
            models.Index(fields=["event_type"], name="idx_events_type"),
            models.Index(fields=["workflow_id", "sequence"], name="idx_events_workflow"),
            models.Index(fields=["agent_id", "sequence"], name="idx_events_agent"),
            # created_at gets a BRIN index on PostgreSQL (migration 0002): rows arrive in time
            # order, so a BRIN index is tiny and serves time-range scans at scale.
        ]
        constraints = [
            # A constraint rather than unique=True: same guarantee, without the extra
            # varchar_pattern_ops index Django adds for unique text fields on PostgreSQL.
            models.UniqueConstraint(fields=["event_id"], name="events_event_id_unique"),
            DomainCheck(
                field="event_type", condition=in_choices("event_type", EventType), name="events_event_type_valid"
            ),
            DomainCheck(
                field="entity_type",
                condition=models.Q(entity_type__isnull=True) | in_choices("entity_type", EntityType),
                name="events_entity_type_valid",
            ),
            DomainCheck(field="severity", condition=in_choices("severity", Severity), name="events_severity_valid"),
        ]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.event_type} {self.entity_type or ''}:{self.entity_id or ''}"
