"""Workers: the Celery app, transports and (later) traffic shaping."""
