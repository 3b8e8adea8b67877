"""Who may call the HTTP API: keys, their scopes and their request rates."""
