"""SmartMail's HTTP side (FastAPI): the unsubscribe pages now, the v1 API as it grows; see web/app.py."""
