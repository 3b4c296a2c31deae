"""SQL shared by the migrations that install database rules (the loader skips `_` modules)."""


def sqlite_updated_at_trigger(table: str, pk: str) -> str:
    return f"""
        CREATE TRIGGER update_{table}_updated_at AFTER UPDATE ON {table}
        WHEN NEW.updated_at IS OLD.updated_at
        BEGIN UPDATE {table} SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE {pk} = NEW.{pk}; END
        """
