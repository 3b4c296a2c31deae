"""API keys sent as `Authorization: Bearer al_<prefix>_<secret>`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import DatabaseError, connections
from django.db.models import Field, Model
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from orchestration.db import prepared_cursor, timestamptz_fast_loader
from orchestration.models import ApiKey
from orchestration.roles import ADMIN, ROLE_ORDER
from orchestration.services.access import api_key_mark_used, api_key_matches, api_key_parse

Converter = Callable[[Any, Any, Any], Any]


class _Columns:
    """One model's concrete columns in a hand-written SELECT, turned back into an instance
    with the converters the ORM would apply (JSON, and datetimes on SQLite)."""

    def __init__(self, model: type[Model], alias: str, using: str) -> None:
        connection = connections[using]
        self.model = model
        self.using = using
        self.fields: list[Field] = list(model._meta.concrete_fields)
        self.attnames = [field.attname for field in self.fields]
        self.sql = [f"{alias}.{connection.ops.quote_name(field.column)}" for field in self.fields]
        self.converters: list[tuple[int, list[Converter], Any]] = []
        for i, field in enumerate(self.fields):
            column = field.get_col(alias)
            converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
            if converters:
                self.converters.append((i, converters, column))

    def instance(self, values: Sequence[Any]) -> Model:
        values = list(values)
        connection = connections[self.using]
        for i, converters, column in self.converters:
            for converter in converters:
                values[i] = converter(values[i], column, connection)
        return self.model.from_db(self.using, self.attnames, values)


class _KeyLookup:
    """The key, its owner and the owner's strongest role group in one statement, written
    once per database instead of compiled from a queryset on every request (that
    compilation cost more than the query)."""

    def __init__(self, using: str) -> None:
        user_model = get_user_model()
        quote = connections[using].ops.quote_name
        self.key = _Columns(ApiKey, "k", using)
        self.owner = _Columns(user_model, "u", using)
        groups = user_model._meta.get_field("groups")
        owner_id = f"k.{quote(ApiKey._meta.get_field('owner').column)}"
        group_name = f"g.{quote(Group._meta.get_field('name').column)}"
        roles = ", ".join(["%s"] * len(ROLE_ORDER))
        rank = " ".join(f"WHEN %s THEN {i}" for i in range(len(ROLE_ORDER)))
        role = (
            f"SELECT {group_name} FROM {quote(groups.m2m_db_table())} ug "  # noqa: S608
            f"INNER JOIN {quote(Group._meta.db_table)} g "
            f"ON g.{quote(Group._meta.pk.column)} = ug.{quote(groups.m2m_reverse_name())} "
            f"WHERE ug.{quote(groups.m2m_column_name())} = {owner_id} AND {group_name} IN ({roles}) "
            f"ORDER BY CASE {group_name} {rank} END LIMIT 1"
        )
        # The database's clock, read by the statement that runs anyway: a key expires at the
        # same moment on every web host, whatever its own clock says (% doubled: the SQL takes
        # parameters).
        self.postgresql = connections[using].vendor == "postgresql"
        clock = "clock_timestamp()" if self.postgresql else "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"
        # Table and column names come from the models; every value is a parameter.
        self.sql = (
            f"SELECT {', '.join(self.key.sql + self.owner.sql)}, ({role}), {clock} "  # noqa: S608
            f"FROM {quote(ApiKey._meta.db_table)} k INNER JOIN {quote(user_model._meta.db_table)} u "
            f"ON u.{quote(user_model._meta.pk.column)} = {owner_id} "
            f"WHERE k.{quote(ApiKey._meta.get_field('prefix').column)} = %s LIMIT 1"
        )
        self.using = using

    def fetch(self, prefix: str) -> tuple[ApiKey, str | None, dt.datetime] | None:
        """The key, its owner's role and the database's time, or None for an unknown prefix."""
        connection = connections[self.using]
        params = [*ROLE_ORDER, *ROLE_ORDER, prefix]
        if self.postgresql:
            row = self._fetch_prepared(connection, params)
        else:
            with connection.cursor() as cursor:
                cursor.execute(self.sql, params)
                row = cursor.fetchone()
        if row is None:
            return None
        split = len(self.key.fields)
        api_key = self.key.instance(row[:split])
        api_key.owner = self.owner.instance(row[split:-2])
        now = row[-1] if self.postgresql else dt.datetime.fromisoformat(row[-1]).replace(tzinfo=dt.UTC)
        return api_key, row[-2], now

    def _fetch_prepared(self, connection: Any, params: list[str]) -> tuple[Any, ...] | None:
        """The lookup as a prepared statement: planning this join cost twice what running it
        does (0.5 of 0.7 ms), on every request.

        It is the request's first statement, so it also serves as the connection's health
        check (CONN_HEALTH_CHECKS) instead of a `SELECT 1` round trip before it: when it
        fails and the connection does not answer the check either, the connection is
        replaced, as the check would have replaced it, and the lookup (a read) runs again on
        the new one. Inside a transaction, or with the check not due, Django's own check
        runs first, as before any of its cursors."""

        def run() -> tuple[Any, ...] | None:
            with prepared_cursor(connection) as cursor:
                timestamptz_fast_loader(cursor, connection)
                cursor.execute(self.sql, params, prepare=True)
                return cursor.fetchone()

        due = (
            connection.connection is not None
            and connection.health_check_enabled
            and not connection.health_check_done
            and not connection.in_atomic_block
            and not getattr(connection, "pool", None)  # a pool hands out checked connections
        )
        if not due:
            connection.close_if_health_check_failed()
            return run()
        try:
            row = run()
        except DatabaseError:
            if connection.is_usable():
                raise  # the statement failed, not the connection
            connection.close()
            row = run()
        connection.health_check_done = True
        return row


@lru_cache(maxsize=8)
def _key_lookup(using: str, vendor: str) -> _KeyLookup:
    return _KeyLookup(using)


class ApiKeyAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword:
            return None
        if len(header) != 2:
            raise AuthenticationFailed("The Authorization header must be 'Bearer <API key>'.")
        try:
            key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("The API key is malformed.") from None
        parsed = api_key_parse(key)
        if parsed is None:
            raise AuthenticationFailed("The API key is malformed (expected al_<prefix>_<secret>).")
        prefix, secret = parsed
        using = ApiKey.objects.db
        found = _key_lookup(using, connections[using].vendor).fetch(prefix)
        # The same answer for an unknown prefix and a wrong secret: nothing to probe.
        if found is None or not api_key_matches(found[0], secret):
            raise AuthenticationFailed("Invalid API key.")
        api_key, role, now = found
        if api_key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.")
        if api_key.expires_at is not None and api_key.expires_at <= now:
            raise AuthenticationFailed("This API key has expired.")
        if not api_key.owner.is_active:
            raise AuthenticationFailed("The owner of this API key is inactive.")
        api_key_mark_used(api_key=api_key, now=now)
        owner = api_key.owner
        owner._api_role = ADMIN if owner.is_superuser else role
        return owner, api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
