import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

application = get_wsgi_application()

# Read the migration files now (a second or more on a busy host), not in the first /readyz,
# whose checks each have 2 s.
from config.health import migrations_on_disk  # noqa: E402

migrations_on_disk()
