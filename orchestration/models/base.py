from django.db import models
from django.db.models.functions import Now


class CreatedModel(models.Model):
    """created_at comes from the database clock (one clock for every web and worker host);
    an explicit value is still accepted (imports, sample data)."""

    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        abstract = True


class TimestampedModel(CreatedModel):
    """created_at plus updated_at.

    updated_at is set by Django on save() and, on PostgreSQL and SQLite, by a BEFORE/AFTER
    UPDATE trigger as well (see migration 0002), so conditional `.update()` calls, which
    bypass auto_now, keep it true too.
    """

    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


def in_choices(field: str, choices: type[models.TextChoices]) -> models.Q:
    return models.Q(**{f"{field}__in": choices.values})
