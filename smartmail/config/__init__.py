"""Configuration: settings from SMARTMAIL_* environment variables and the Celery configuration."""

from smartmail.config.settings import Settings, SettingsError, SmtpUrl, get_settings

__all__ = ["Settings", "SettingsError", "SmtpUrl", "get_settings"]
