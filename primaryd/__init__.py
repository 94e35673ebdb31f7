"""The primary site's storage daemon (`primaryd`)."""
