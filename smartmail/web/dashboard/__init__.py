"""Read-only dashboard pages for operators: campaigns, one campaign, sites; a signed-cookie login with an API key."""
