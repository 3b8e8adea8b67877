"""Analytics: roll-ups of the event stream per hour and day, and the KPIs computed from them."""
