"""Local development: DEBUG on unless told otherwise, static files served by runserver."""

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import MIDDLEWARE, STORAGES

DEBUG = env.bool("DEBUG", True)
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
MIDDLEWARE = [m for m in MIDDLEWARE if m != "whitenoise.middleware.WhiteNoiseMiddleware"]
