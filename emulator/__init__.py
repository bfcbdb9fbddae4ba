"""hsmproxy package."""
