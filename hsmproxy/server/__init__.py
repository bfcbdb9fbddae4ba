"""hsmproxy.server."""
