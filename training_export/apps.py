from django.apps import AppConfig


class TrainingExportConfig(AppConfig):
    name = "training_export"
    verbose_name = "Training data export"
    default_auto_field = "django.db.models.BigAutoField"
