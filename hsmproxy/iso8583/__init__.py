"""ISO 8583 gateway: PIN and MAC translation where the messages flow (service and inline modes).

Modules: :mod:`.codec` (specs, offsets, masking, field 55 TLV), :mod:`.config` (``protocol =
"iso8583"`` listeners and ``[[iso8583.routes]]``), :mod:`.keys` (named keys from the keystore),
:mod:`.gateway` (one message in, one answer out), :mod:`.server` (listeners and upstream links),
:mod:`.netmgmt` (0800/0810), :mod:`.bench` (the ``iso`` scenario of ``hsmproxy bench``).
"""
