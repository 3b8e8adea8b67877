"""Workers: the Celery app, the dispatch seam, delivery, claims, transports, the SMTP window, traffic shaping."""
