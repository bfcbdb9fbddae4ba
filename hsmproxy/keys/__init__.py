"""hsmproxy.keys."""
