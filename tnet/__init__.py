"""tnet: move files and short messages between machines on one local network.

A daemon per machine (``tnet.daemon``) speaks the wire protocol of
``tnet.protocol`` with its peers; the CLI (``tnet.cli``) drives the local
daemon through two UNIX sockets; ``tnet.util`` holds configuration and small
helpers. docs/PROTOCOL.md describes the bytes.
"""

__version__ = "0.1.0"
