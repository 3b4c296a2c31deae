from django.conf import settings
from django.db import models
from django.utils import timezone

from orchestration.models.base import TimestampedModel


class ApiKey(TimestampedModel):
    """An API key (seed 004's planned move from Redis to PostgreSQL).

    The secret is never stored: only a short lookup `prefix` and a hash of the secret.
    """

    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=128)
    name = models.CharField(max_length=100)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="api_keys",
        db_column="owner_id",
        db_index=False,
    )
    permissions = models.JSONField(
        default=list, blank=True, help_text="seed 004 permission names; empty means the owner's role"
    )
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_keys"
        ordering = ["-created_at"]
        verbose_name = "API key"
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="api_keys_owner_name_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()
