"""The Celery service: configuration, application, tasks and their operational commands."""
