"""What a message says: template rendering, the template store, MIME building, signed links."""
