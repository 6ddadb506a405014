"""Protocol frontends: thin translators between a wire protocol and ``iskander.core.dataplane``."""
