"""Development helpers: the demo, the local SMTP sink and the on-demand local Redis."""
