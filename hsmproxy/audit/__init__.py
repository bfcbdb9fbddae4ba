"""The tamper-evident audit trail (format 2): a hash chain of records, sealed by checkpoints signed in
the HSM, verifiable offline with the pinned public keys alone.

* :mod:`~hsmproxy.audit.form`: the record lines (canonical JSON, ``seq``, ``prev`` = leaf hash of the
  previous line) and the host-command template.
* :mod:`~hsmproxy.audit.merkle`: RFC 9162 Merkle trees, frontier, inclusion proofs.
* :mod:`~hsmproxy.audit.checkpoint`: checkpoint statements, signatures, pinned keys.
* :mod:`~hsmproxy.audit.signer`: who signs (the nodes; a software key in tests).
* :mod:`~hsmproxy.audit.writer`: the one writer of a proxy (group commit, durability, refusal tallies).
* :mod:`~hsmproxy.audit.files`, :mod:`~hsmproxy.audit.keytrail`: files and restarts; keystore steps.
* :mod:`~hsmproxy.audit.verify`, :mod:`~hsmproxy.audit.v1`, :mod:`~hsmproxy.audit.cli`: offline
  verification (format 2, and format-1 HMAC trails on a node), proofs, ``hsmproxy audit``.
* :mod:`~hsmproxy.audit.syslog`: a copy of the trail (or its checkpoints) for a SIEM.
* :mod:`~hsmproxy.audit.settings`: ``[audit]``.
"""
