"""Integrations with other rate-limiting packages."""
