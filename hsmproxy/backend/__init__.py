"""hsmproxy.backend."""
