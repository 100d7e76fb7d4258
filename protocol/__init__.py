"""sparecycles wire protocol: messages, envelope codec, signatures, digests, topics.

A leaf package: it imports no other sparecycles package and opens no sockets.
"""

PROTOCOL_VERSION = 1
