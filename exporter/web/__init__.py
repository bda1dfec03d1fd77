"""The web front door: the HTTP server, its connection limits, TLS and basic auth from
--web.config.file, and the status page."""
