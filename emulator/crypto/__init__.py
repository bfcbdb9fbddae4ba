"""Reference crypto core of the bundled payShield-compatible emulator.

Pure functions only: no sockets, no asyncio and no host-command parsing.
Built on psec, pyemv, pydukpt and cryptography; hand-written only where no
library does the job (Thales variant LMK and key block, AES DUKPT, ISO-1 and
Diebold PIN blocks, hsmproxy's PIN-under-LMK encoding). Independent of the
``hsmproxy`` package on purpose, so each can check the other.
"""

from emulator.crypto.errors import CryptoError

__all__ = ["CryptoError"]
