"""The secondary site's storage daemon (`secondaryd`)."""
