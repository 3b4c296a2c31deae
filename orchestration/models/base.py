from typing import Any

from django.db import models
from django.db.models.functions import Now
from django.utils import timezone


class CreatedModel(models.Model):
    """created_at comes from the database clock (one clock for every web and worker host);
    an explicit value is still accepted (imports, sample data)."""

    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        abstract = True


class UpdatedAtField(models.DateTimeField):
    """When the row last changed, on the database's clock: a new row's is its INSERT's time
    (the database's default, read back as created_at is: the two are equal), and on PostgreSQL
    and SQLite a BEFORE/AFTER UPDATE trigger (migration 0002) sets it on every UPDATE, including
    conditional `.update()` calls that bypass save(). save() of an existing row also sets the
    instance's to this host's time, as auto_now would, so that the object a caller holds is not
    left with the previous one (the row holds the trigger's). An auto_now field took this host's
    time for a new row too: on a host behind the database, a row updated before it was created."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("db_default", Now())
        kwargs.setdefault("editable", False)  # as auto_now's: no form or serializer writes it
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        if add:
            return getattr(model_instance, self.attname)  # the database's default unless given
        value = timezone.now()
        if not model_instance._state.adding:
            # A new row whose key is given (an agent added in the console) is saved by an UPDATE
            # tried first: the INSERT that follows when it matches nothing keeps the default.
            setattr(model_instance, self.attname, value)
        return value


class TimestampedModel(CreatedModel):
    """created_at plus updated_at (UpdatedAtField)."""

    updated_at = UpdatedAtField()

    class Meta:
        abstract = True


def in_choices(field: str, choices: type[models.TextChoices]) -> models.Q:
    return models.Q(**{f"{field}__in": choices.values})


class DomainCheck(models.CheckConstraint):
    """A CHECK constraint on one column that PostgreSQL enforces through the column's type: a
    domain over the column's own type (`<table>_<column>`) holding the check, under the
    constraint's name. Elsewhere (SQLite) it is the table CHECK constraint it declares.

    Why: PostgreSQL reads every CHECK constraint of a table back from its stored form and plans
    it again for each INSERT or UPDATE statement on the table, whichever columns it writes (on
    this project's tables 5 to 10 µs a constraint, 40 to 60 µs a statement; a quarter of the
    database's CPU time per attempt in the throughput benchmark, docs/benchmarks.md). A domain's
    checks are prepared once per session and run only when a value of that column is written.
    Violations name the constraint as before (`diag.constraint_name`); the message says
    "value for domain … violates check constraint …".

    The domain stays when the constraint is removed (the column keeps it as its type, without
    the check), so changing the condition (Django removes, then adds) swaps the domain's check
    and neither rewrites the table nor rebuilds its indexes; the added check scans the rows,
    as a table CHECK does. A later AlterField that changes the column's type alone would
    replace the domain by Django's type and drop the check with it: tests/orchestration/
    test_schema.py fails then. Changed together with the condition (RemoveConstraint,
    AlterField, AddConstraint, as makemigrations orders them), the added check makes the domain
    again over the new type. Giving an existing column its domain (ALTER COLUMN TYPE) rebuilds
    the partial and expression indexes that name the column, and drops its statistics (the
    column is analyzed again).
    """

    def __init__(self, *, field: str, condition: Any, name: str, **kwargs: Any) -> None:
        self.field = field
        super().__init__(condition=condition, name=name, **kwargs)

    def domain_name(self, model: Any) -> str:
        return f"{model._meta.db_table}_{model._meta.get_field(self.field).column}"

    def _domain_check_sql(self, model: Any, schema_editor: Any) -> str:
        referenced = {name for name, *_ in model._get_expr_references(self.condition)}
        if referenced != {self.field}:
            raise ValueError(f"{self.name}: a domain check may name only its field {self.field!r}, not {referenced}")
        column = schema_editor.quote_name(model._meta.get_field(self.field).column)
        return self._get_check_sql(model, schema_editor).replace(column, "VALUE")

    def _domain_sql(self, model: Any, schema_editor: Any) -> list[str]:
        field = model._meta.get_field(self.field)
        domain = self.domain_name(model)
        table, column = model._meta.db_table, field.column
        base = field.db_parameters(schema_editor.connection)["type"]
        q, value = schema_editor.quote_name, schema_editor.quote_value
        # Unless the column already has the domain as its type (a condition changed: the check
        # alone is replaced), the domain is made anew over the column's type: the table is new,
        # Django changed the column's type (an AlterField in the same migration, such as a
        # longer max_length: the old domain would take the column back to its old type), or a
        # dropped table left the domain behind with its checks. DROP DOMAIN fails if another
        # column has it or the name is another kind of type. ALTER COLUMN TYPE drops the
        # column's planner statistics: a column that had some is analyzed again. A session
        # that ran a PL/pgSQL trigger of the table keeps its expressions planned for the old
        # type, and PostgreSQL refuses its every later write through it until it reconnects
        # ("type of parameter ... does not match that when preparing the plan"): the table's
        # PL/pgSQL trigger functions are made again as they are, which every session then
        # compiles anew. Only the model's own names go in, quoted by Django.
        ensure = f"""DO $domain$
        DECLARE
            analyzed boolean;
            definition text;
        BEGIN
            IF (SELECT atttypid FROM pg_attribute
                WHERE attrelid = {value(q(table))}::regclass AND attname = {value(column)})
                IS DISTINCT FROM to_regtype({value(q(domain))})
            THEN
                DROP DOMAIN IF EXISTS {q(domain)};
                CREATE DOMAIN {q(domain)} AS {base};
                analyzed := EXISTS (
                    SELECT FROM pg_stats s
                    JOIN pg_namespace n ON n.nspname = s.schemaname
                    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename
                    WHERE c.oid = {value(q(table))}::regclass AND s.attname = {value(column)});
                ALTER TABLE {q(table)} ALTER COLUMN {q(column)} TYPE {q(domain)};
                IF analyzed THEN
                    ANALYZE {q(table)} ({q(column)});
                END IF;
                FOR definition IN
                    SELECT pg_get_functiondef(p.oid) FROM pg_proc p
                    JOIN pg_language l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
                    WHERE p.oid IN (SELECT tgfoid FROM pg_trigger
                                    WHERE tgrelid = {value(q(table))}::regclass AND NOT tgisinternal)
                      AND pg_has_role(p.proowner, 'USAGE')
                LOOP
                    EXECUTE definition;
                END LOOP;
            END IF;
        END $domain$"""  # noqa: S608 (names from the model, quoted)
        check = self._domain_check_sql(model, schema_editor)
        return [ensure, f"ALTER DOMAIN {q(domain)} ADD CONSTRAINT {q(self.name)} CHECK ({check})"]

    def constraint_sql(self, model: Any, schema_editor: Any) -> str | None:
        if schema_editor.connection.vendor != "postgresql":
            return super().constraint_sql(model, schema_editor)
        # Inside CREATE TABLE: the domain becomes the column's type once the table exists.
        # Django runs deferred statements without parameters (execute(sql, None)), as it runs
        # create_sql: a literal % stays as it is.
        schema_editor.deferred_sql.extend(self._domain_sql(model, schema_editor))
        return None

    def create_sql(self, model: Any, schema_editor: Any) -> Any:
        if schema_editor.connection.vendor != "postgresql":
            return super().create_sql(model, schema_editor)
        return ";\n".join(self._domain_sql(model, schema_editor))

    def remove_sql(self, model: Any, schema_editor: Any) -> Any:
        if schema_editor.connection.vendor != "postgresql":
            return super().remove_sql(model, schema_editor)
        q = schema_editor.quote_name
        return f"ALTER DOMAIN {q(self.domain_name(model))} DROP CONSTRAINT {q(self.name)}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, models.CheckConstraint):
            return super().__eq__(other) and getattr(other, "field", None) == self.field
        return super().__eq__(other)

    def deconstruct(self) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        path, args, kwargs = super().deconstruct()
        kwargs["field"] = self.field
        return path, args, kwargs
